"""SS-Net's network: the DHC VNet plus the per-voxel projection, prediction and per-class selector MLPs of its
class-separation (contrastive) loss.

Wu, Wu, Wu, Ge & Cai, "Exploring Smoothness and Class-Separation for Semi-supervised Medical Image Segmentation",
MICCAI 2022 (arXiv 2203.01324), as run by the "ssnet" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous
Co-training Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9,
the DHC repository's ``VNet4SSNet``). The heads are those of the class-wise memory-bank contrastive learning of
Alonso, Sabater, Ferstl, Montesano & Murillo, "Semi-Supervised Semantic Segmentation with Pixel-Level Contrastive
Learning from a Class-wise Memory Bank", ICCV 2021, which SS-Net reuses.

With ``f = n_filters`` (the decoder's last width) and ``F = 2f`` (the head width)::

    (x1, ..., x5) = encode(x);  z = decode(x1, ..., x5)    the VNet of common/networks/vnet.py, logits [B, C, D, H, W]
    e = drop(block_nine(block_eight_up(x8) + x1))         the input of ``out_conv``: embedding [B, f, D, H, W]
    projection_head  = Linear(f, F)  -> BatchNorm1d(F) -> ReLU          -> Linear(F, F)    [V, f] -> [V, F]
    prediction_head  = Linear(F, F)  -> BatchNorm1d(F) -> ReLU          -> Linear(F, F)    [V, F] -> [V, F]
    class_selectors[c], memory_selectors[c], c = 0 .. C-1:
                       Linear(F, F)  -> BatchNorm1d(F) -> LeakyReLU(0.2) -> Linear(F, 1)    [V, F] -> [V, 1]

The heads act on voxels (``V`` = voxels, the embedding moved to ``[V, f]``); a selector's output is a score whose
sigmoid weights a feature in the loss or ranks it for the memory bank (:mod:`common.losses.ssnet`).

Widths: ``F = 2f`` as in DHC's ``VNet4SSNet`` (``dim_in = n_filters``, ``feat_dim = 2 n_filters``: 32 -> 64 for
f = 32); SS-Net's own LA network hard-codes 16 -> 32 for its f = 16, the same ratio. For ``C = 14``, ``f = 32`` the
heads add 136,732 parameters to the VNet's 37,778,126 (tests/test_networks_vnet_ssnet.py).

Choices: the VNet part keeps :class:`~common.networks.vnet.VNet`'s module names (a VNet state dict loads into it
with ``strict=False``, leaving the heads); the selectors are ``class_selectors.<c>`` / ``memory_selectors.<c>``
(the original: ``contrastive_class_selector_<c>`` / ``contrastive_class_selector_memory<c>`` attributes). The
embedding is read as the input of ``out_conv`` through a forward pre-hook, so :meth:`VNet.decode` runs unchanged.
Like DHC's SS-Net run, the weights keep PyTorch's default initialisation (its ``train_ssnet.py`` applies no
kaiming init).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.networks.vnet import VNet

__all__ = ["head_mlp", "SSNetVNet"]


def head_mlp(in_features: int, hidden: int, out_features: int, activation: nn.Module) -> nn.Sequential:
    """``Linear(in, hidden) -> BatchNorm1d(hidden) -> activation -> Linear(hidden, out)`` on ``[V, in]``."""
    return nn.Sequential(nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), activation,
                         nn.Linear(hidden, out_features))


class SSNetVNet(VNet):
    """The VNet with SS-Net's projection, prediction and selector heads (module docstring).

    Args:
        in_channels, out_channels, n_filters, normalization, has_dropout, dropout: those of
            :class:`~common.networks.vnet.VNet` (DHC: ``1, C, 32, "batchnorm", True``).

    ``forward(x)``: logits ``[B, C, D, H, W]``; ``forward_features(x)``: ``(logits, embedding [B, f, D, H, W])``.
    Attributes ``embedding_dim = f`` and ``feature_dim = 2f`` give the head widths.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_filters: int = 32,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout: float | None = None,
    ) -> None:
        super().__init__(in_channels, out_channels, n_filters, normalization, has_dropout, dropout)
        self.embedding_dim = n_filters
        self.feature_dim = width = 2 * n_filters
        self.projection_head = head_mlp(n_filters, width, width, nn.ReLU())
        self.prediction_head = head_mlp(width, width, width, nn.ReLU())
        self.class_selectors = nn.ModuleList(
            head_mlp(width, width, 1, nn.LeakyReLU(0.2)) for _ in range(out_channels))
        self.memory_selectors = nn.ModuleList(
            head_mlp(width, width, 1, nn.LeakyReLU(0.2)) for _ in range(out_channels))

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C, D, H, W], embedding [B, f, D, H, W])`` of one pass; the embedding is the decoder's last
        feature map after its dropout, i.e. what ``out_conv`` reads."""
        captured: list[torch.Tensor] = []

        def capture(_module: nn.Module, args: tuple[Any, ...]) -> None:
            captured.append(args[0])

        handle = self.out_conv.register_forward_pre_hook(capture)
        try:
            logits = self.decode(self.encode(x))
        finally:
            handle.remove()
        return logits, captured[0]

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """Projection head on per-voxel embeddings ``[V, f] -> [V, 2f]``."""
        return self.projection_head(embedding)

    def predict(self, embedding: torch.Tensor) -> torch.Tensor:
        """Projection then prediction head ``[V, f] -> [V, 2f]`` (the features the contrastive loss compares with
        the memory bank)."""
        return self.prediction_head(self.projection_head(embedding))
