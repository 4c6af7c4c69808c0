"""Downstream heads over a pre-trained ASG image encoder: linear probe and segmentation decoders.

Spec ``specs/asg.md`` (ASG, Li et al., MICCAI 2024; downstream protocols from MGCA):

* §6.2 :class:`LinearProbe`: frozen encoder (eval mode on every batch), Dropout -> Linear on the global feature
  (ViT [CLS] after the final LN, or ResNet-50 pooled layer4).
* §6.4 :class:`SETRSegmenter`: ViT patch tokens -> Linear -> map -> 4 x (Conv3x3, BN, ReLU, bilinear x2) -> Conv3x3.
* §6.4 :class:`ResNetUNetSegmenter`: a U-Net over the ResNet-50 stages (MONAI ``FlexibleUNet(backbone="resnet50")``,
  the same encoder layout as torchvision's, standing in for ``segmentation_models_pytorch.Unet("resnet50")``) with
  the pre-trained encoder weights copied in.
* :func:`load_encoder_weights`: the image-encoder part of an :class:`common.networks.asg.ASGModel` checkpoint.

A frozen encoder has ``requires_grad=False`` and stays in eval mode even after ``.train()`` (its BatchNorm
statistics, if any, do not move), as in MGCA's fine-tuners.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from monai.networks.nets import FlexibleUNet
from torch import Tensor, nn

from common.networks.asg import ResNetImageEncoder
from common.utils.checkpoints import load_checkpoint, load_state_dict_strict

__all__ = ["LinearProbe", "SETRSegmenter", "ResNetUNetSegmenter", "load_encoder_weights"]


def _freeze(module: nn.Module) -> None:
    """``requires_grad=False`` on every parameter and eval mode."""
    module.requires_grad_(False)
    module.eval()


class LinearProbe(nn.Module):
    """Linear evaluation (§6.2): ``logits = Linear(Dropout(encoder(x)[0]))``, ``[B, 3, H, W] -> [B, C]``.

    The encoder (duck type of :class:`common.networks.asg.ViTImageEncoder`) is frozen and kept in eval mode; only
    the head (``global_width * C + C`` parameters) is trainable.
    """

    def __init__(self, encoder: nn.Module, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        _freeze(self.encoder)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(encoder.global_width, num_classes))

    def train(self, mode: bool = True) -> LinearProbe:
        """Set the head's mode; the frozen encoder stays in eval mode."""
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` -> logits ``[B, num_classes]``."""
        with torch.no_grad():
            feature = self.encoder(x)[0]
        return self.head(feature)


class SETRSegmenter(nn.Module):
    """SETR-style segmentation decoder over ViT patch tokens (§6.4).

    ``P [B, N, D]`` -> Linear(D, D) -> ``[B, D, grid, grid]`` -> for each of ``channels``: Conv3x3 -> BN -> ReLU ->
    bilinear x2 (``align_corners=True``) -> (Dropout2d(``dropout``)) -> Conv3x3(-> ``out_channels``) logits
    ``[B, out, 16*grid, 16*grid]`` (224 for ViT-B/16), bilinearly resized to the input size when it differs.

    Args:
        encoder: duck type of :class:`common.networks.asg.ViTImageEncoder` (``local_width``, ``grid``).
        freeze_encoder: ``requires_grad=False`` and eval mode for the encoder (the protocol of §6.4).
        dropout: Dropout2d before the last conv (0 = off; used for MONAI Label's epistemic scoring).
    """

    def __init__(self, encoder: nn.Module, channels: Sequence[int] = (512, 256, 128, 64), out_channels: int = 1,
                 freeze_encoder: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.encoder = encoder
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            _freeze(self.encoder)
        width = encoder.local_width
        self.proj = nn.Linear(width, width)
        blocks: list[nn.Module] = []
        for c_in, c_out in zip((width, *channels[:-1]), channels):
            blocks += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                       nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)]
        self.decoder = nn.Sequential(*blocks)
        self.dropout = nn.Dropout2d(dropout)
        self.out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)

    def train(self, mode: bool = True) -> SETRSegmenter:
        """Set the decoder's mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` -> logits ``[B, out_channels, H, W]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_encoder):
            _, patches = self.encoder(x)
        grid = self.encoder.grid
        feature_map = self.proj(patches).transpose(1, 2).reshape(x.shape[0], -1, grid, grid)
        logits = self.out(self.dropout(self.decoder(feature_map)))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return logits


class ResNetUNetSegmenter(nn.Module):
    """U-Net over a pre-trained ResNet-50 (§6.4): MONAI ``FlexibleUNet(backbone="resnet50", spatial_dims=2)`` with
    decoder channels (256, 128, 64, 32, 16) and skips from conv1 / layer1..layer4; the weights of ``encoder.model``
    (torchvision layout, classifier excluded) are copied into its encoder. ``[B, 3, H, W] -> [B, out, H, W]``
    (H, W multiples of 32, e.g. 224; no 299-px upsampling here).

    Args:
        encoder: the pre-trained :class:`common.networks.asg.ResNetImageEncoder` (its weights are copied).
        freeze_encoder: ``requires_grad=False`` and eval mode for the U-Net's encoder.
        dropout: dropout of the U-Net decoder blocks (MONAI Label's epistemic scoring).
    """

    def __init__(self, encoder: ResNetImageEncoder, freeze_encoder: bool = True, out_channels: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.unet = FlexibleUNet(in_channels=3, out_channels=out_channels, backbone="resnet50", pretrained=False,
                                 spatial_dims=2, dropout=dropout)
        weights = {k: v for k, v in encoder.model.state_dict().items() if not k.startswith("fc.")}
        self.unet.encoder.load_state_dict(weights, strict=True)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            _freeze(self.unet.encoder)

    def train(self, mode: bool = True) -> ResNetUNetSegmenter:
        """Set the decoder's mode; a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.freeze_encoder:
            self.unet.encoder.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, 3, H, W]`` -> logits ``[B, out_channels, H, W]``."""
        return self.unet(x)


def load_encoder_weights(encoder: nn.Module, checkpoint_path: str | os.PathLike,
                         prefix: str = "image_encoder.") -> nn.Module:
    """Load the image-encoder part of a pre-training checkpoint into ``encoder`` (strict) and return it.

    The checkpoint is an ``ASGModel`` state dict, bare or saved as ``{"model": state_dict}`` (or
    ``{"state_dict": ...}``); the keys starting with ``prefix`` are taken with the prefix removed (a DDP
    ``module.`` is stripped first).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is unreadable, holds no key with ``prefix``, or the encoder's keys / shapes differ
            (names the file).
    """
    path = Path(checkpoint_path)
    loaded = load_checkpoint(path, "pre-training checkpoint")
    for wrapper in ("model", "state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(wrapper), Mapping):
            loaded = loaded[wrapper]
            break
    if not isinstance(loaded, Mapping):
        raise ValueError(f"pre-training checkpoint '{path}' does not hold a state dict")
    state = {k.removeprefix("module."): v for k, v in loaded.items()}
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not encoder_state:
        raise ValueError(f"pre-training checkpoint '{path}' has no key starting with '{prefix}' "
                         f"(keys e.g. {list(state)[:5]})")
    load_state_dict_strict(encoder, encoder_state, path)
    return encoder
