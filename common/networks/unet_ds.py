"""3D U-Net with four deep-supervision heads, the network of the URPC baseline in DHC.

Luo et al., "Efficient Semi-supervised Gross Target Volume of Nasopharyngeal Carcinoma Segmentation via Uncertainty
Rectified Pyramid Consistency", MICCAI 2021: one 3D U-Net whose decoder stages each end in a segmentation head
(the "pyramid" of predictions whose disagreement URPC penalises, :mod:`common.losses.urpc`). DHC (Wang & Li,
MICCAI 2023, specs/dhc.md §9 row "urpc") trains it with the SSL4MIS-lineage layout ("unet_3D_dv_semi", itself
adapted from Oktay et al.'s Attention-Gated Networks 3D U-Net), reconstructed here block by block.

Layout, with ``w_k = ⌊64 · 2^k / feature_scale⌋`` (feature_scale 4: 16, 32, 64, 128, 256), ``conv`` a
``Conv3d 3x3x3 (pad 1, bias) -> norm -> ReLU`` (:class:`~common.networks.vnet.ConvBlock` with two stages) and
``up`` a trilinear ×2 interpolation (``align_corners=False``)::

    e1 = enc1(x)                      2 convs  C_in   -> w0   (D,    H,    W)
    e2 = enc2(maxpool(e1))            2 convs  w0     -> w1   (D/2,  ...)
    e3 = enc3(maxpool(e2))            2 convs  w1     -> w2   (D/4,  ...)
    e4 = enc4(maxpool(e3))            2 convs  w2     -> w3   (D/8,  ...)
    e5 = enc5(maxpool(e4))            2 convs  w3     -> w4   (D/16, ...)   (the "center" block)
    u4 = drop_0.5(dec4([e4, up(e5)]))  2 convs  w3+w4  -> w3   (D/8)
    u3 = drop_0.3(dec3([e3, up(u4)]))  2 convs  w2+w3  -> w2   (D/4)
    u2 = drop_0.2(dec2([e2, up(u3)]))  2 convs  w1+w2  -> w1   (D/2)
    u1 = drop_0.1(dec1([e1, up(u2)]))  2 convs  w0+w1  -> w0   (D)
    head_s = up_{2^s}(Conv3d_1x1x1(u_{s+1}))   w -> C, s = 0 (finest, no resampling), 1 (×2), 2 (×4), 3 (×8)

``[a, b]`` is the channel concatenation, skip first; ``maxpool`` is ``MaxPool3d(2)``; ``drop_p`` is
``Dropout3d(p)`` (whole channels, ``train()`` mode only). The dropped-out decoder output feeds both its head and the
next decoder stage. Each head is a 1x1x1 convolution (with bias) followed by trilinear upsampling to the input size,
so every head gives logits ``[B, C, D, H, W]``.

Choices (each checked against the public SSL4MIS / DHC network definition):

* Normalisation: the original's ``is_batchnorm=True`` branch actually builds ``InstanceNorm3d`` (affine-free, no
  running statistics), so ``normalization="instancenorm"`` is the default and adds no parameters; ``"batchnorm"``
  is available (γ = 1, β = 0 at init; the lineage draws γ ~ N(1, 0.02)).
* Init: every ``Conv3d`` weight ``kaiming_normal_`` (fan_in, gain √2), biases at PyTorch's default
  (:func:`~common.networks.vnet.kaiming_normal_init_`).
* The original pads the skip by the size difference before concatenating; with D, H, W divisible by 16 the difference
  is always 0, so no padding is done and other sizes are rejected.
* A head's 1x1x1 convolution is applied before its upsampling, as in the original (both are linear and the
  interpolation weights sum to 1, so the order changes cost, not values).
* In ``eval()`` mode the original returns the finest head only; here :meth:`UNetDS3D.forward` always returns the
  finest head (what validation, sliding-window inference and TorchScript use) and :meth:`UNetDS3D.forward_heads`
  all four.

``UNetDS3D(1, 14)`` has 5,887,432 parameters (derivation in ``tests/test_networks_unet_ds.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.vnet import NORMALIZATIONS, ConvBlock, kaiming_normal_init_

__all__ = ["UNetDS3D", "DEFAULT_DROPOUT"]

DEFAULT_DROPOUT = (0.5, 0.3, 0.2, 0.1)
"""``Dropout3d`` probabilities after the decoder stages, coarsest (1/8 resolution) first."""

_BASE_WIDTHS = (64, 128, 256, 512, 1024)
_LEVELS = len(_BASE_WIDTHS) - 1  # four 2x poolings: spatial dims must be divisible by 2^4 = 16
_GROUPS = 16  # ConvBlock's groupnorm group count


class UNetDS3D(nn.Module):
    """3D U-Net with four trilinearly upsampled deep-supervision heads (module docstring for the layout).

    Args:
        in_channels: input channels (1 for CT).
        out_channels: classes ``C`` including background.
        feature_scale: divisor of the widths ``64, 128, 256, 512, 1024`` (4: 16 ... 256); each width is
            ``⌊64 · 2^k / feature_scale⌋`` and must be >= 1.
        dropout: four ``Dropout3d`` probabilities in ``[0, 1)`` after the decoder stages, coarsest first.
        normalization: ``"instancenorm"`` (the original, affine-free), ``"batchnorm"``, ``"groupnorm"`` (16 groups;
            every width must be a multiple of 16) or ``"none"``.

    Input ``[B, in_channels, D, H, W]`` with D, H, W divisible by 16 (with instance norm, ``D·H·W / 16^3 > 1``: the
    bottleneck needs more than one voxel); output logits ``[B, out_channels, D, H, W]``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        feature_scale: float = 4,
        dropout: Sequence[float] = DEFAULT_DROPOUT,
        normalization: str = "instancenorm",
    ) -> None:
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UNetDS3D: {name} must be a positive integer, got {value!r}.")
        if not isinstance(feature_scale, (int, float)) or not 0 < feature_scale <= _BASE_WIDTHS[0]:
            raise ValueError(f"UNetDS3D: feature_scale must be in (0, {_BASE_WIDTHS[0]}] so that the first width "
                             f"64 / feature_scale is >= 1, got {feature_scale!r}.")
        dropout = tuple(float(p) for p in dropout) if isinstance(dropout, Sequence) else (float(dropout),)
        if len(dropout) != _LEVELS or not all(0.0 <= p < 1.0 for p in dropout):
            raise ValueError(f"UNetDS3D: dropout must hold {_LEVELS} probabilities in [0, 1) (one per decoder "
                             f"stage, coarsest first), got {dropout}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"UNetDS3D: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        widths = [int(base / feature_scale) for base in _BASE_WIDTHS]
        if normalization == "groupnorm" and any(w % _GROUPS for w in widths):
            raise ValueError(f"UNetDS3D: normalization='groupnorm' uses {_GROUPS} groups, so every width must be a "
                             f"multiple of {_GROUPS}; feature_scale={feature_scale} gives {widths}.")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.normalization = normalization
        self.widths = tuple(widths)

        inputs = [in_channels, *widths[:-1]]
        self.encoders = nn.ModuleList(ConvBlock(2, c_in, c_out, normalization) for c_in, c_out in zip(inputs, widths))
        # decoders[k] restores level k (finest first): input = skip (w_k) + upsampled coarser features (w_{k+1})
        self.decoders = nn.ModuleList(ConvBlock(2, widths[k] + widths[k + 1], widths[k], normalization)
                                      for k in range(_LEVELS))
        self.dropouts = nn.ModuleList(nn.Dropout3d(p) for p in reversed(dropout))  # finest first, like decoders
        self.heads = nn.ModuleList(nn.Conv3d(widths[k], out_channels, 1) for k in range(_LEVELS))
        kaiming_normal_init_(self)

    def _check_input(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        if x.ndim != 5 or shape[1] != self.in_channels:
            raise ValueError(f"UNetDS3D: expected input [B, {self.in_channels}, D, H, W], got shape {shape}.")
        factor = 2**_LEVELS
        if any(s % factor for s in shape[2:]):
            raise ValueError(f"UNetDS3D: spatial dims of input shape {shape} must all be divisible by {factor} "
                             f"({_LEVELS} max-poolings by 2).")
        if self.normalization == "instancenorm" and shape[2] * shape[3] * shape[4] <= factor**3:
            raise ValueError(f"UNetDS3D: input shape {shape} leaves a single bottleneck voxel, which instance "
                             f"normalisation cannot normalise; use a larger patch.")

    def _decode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Decoder outputs after their dropout, ``[B, w_k, D / 2^k, H / 2^k, W / 2^k]`` for k = 0..3 (finest first)."""
        self._check_input(x)
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        decoded: list[torch.Tensor] = []
        for k in reversed(range(_LEVELS)):
            up = F.interpolate(x, scale_factor=2.0, mode="trilinear", align_corners=False)
            x = self.dropouts[k](self.decoders[k](torch.cat([skips[k], up], dim=1)))
            decoded.insert(0, x)
        return decoded

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four heads' logits ``[B, out_channels, D, H, W]``, finest (full-resolution decoder) first."""
        heads = []
        for k, features in enumerate(self._decode(x)):
            logits = self.heads[k](features)
            heads.append(logits if k == 0 else
                         F.interpolate(logits, scale_factor=float(2**k), mode="trilinear", align_corners=False))
        return heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, out_channels, D, H, W]`` of the finest head (train and eval mode; the coarser heads are not
        computed)."""
        return self.heads[0](self._decode(x)[0])
