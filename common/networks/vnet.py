"""The UA-MT-style 3D VNet used by both branches of DHC, the two-branch :class:`DualVNet`, the initialisers and
the checkpoint loader.

Yu et al., "Uncertainty-aware Self-ensembling Model for Semi-supervised 3D Left Atrium Segmentation",
MICCAI 2019 (the VNet variant); used unchanged by Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training
Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §3).

This is *not* Milletari's VNet (``monai.networks.nets.VNet``: 5x5x5 convolutions, residual blocks, PReLU):
every block here is a plain stack of ``Conv3d 3x3x3 (pad 1) -> norm -> ReLU``, resolution changes by
``k=2, s=2`` (transposed) convolutions, and skips are *added*, not concatenated. Module names reproduce the
official state-dict keys (``block_one.conv.0.weight`` ... ``out_conv.bias``), so the official
``best_model.pth`` (``{"A": state_dict, "B": state_dict}``) loads strictly with :func:`load_dhc_checkpoint`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from common.networks.branches import BRANCH_OUTPUTS, Branches
from common.utils.checkpoints import load_checkpoint, load_state_dict_strict

__all__ = [
    "NORMALIZATIONS",
    "ConvBlock",
    "DownsamplingConvBlock",
    "UpsamplingDeconvBlock",
    "VNet",
    "DualVNet",
    "kaiming_normal_init_",
    "xavier_normal_init_",
    "branch_b_init",
    "load_dhc_checkpoint",
]

logger = logging.getLogger(__name__)

NORMALIZATIONS = ("batchnorm", "groupnorm", "instancenorm", "none")
"""Normalisations of the original blocks. ``groupnorm`` uses 16 groups; ``instancenorm`` is affine-free."""

_GROUPS = 16


def _norm(normalization: str, channels: int) -> list[nn.Module]:
    """The normalisation layer after a convolution, as a 0- or 1-element list."""
    if normalization == "batchnorm":
        return [nn.BatchNorm3d(channels)]
    if normalization == "groupnorm":
        return [nn.GroupNorm(num_groups=_GROUPS, num_channels=channels)]
    if normalization == "instancenorm":
        return [nn.InstanceNorm3d(channels)]
    return []


class ConvBlock(nn.Module):
    """``n_stages`` x (``Conv3d 3x3x3, padding 1`` -> norm -> ReLU) in ``self.conv``; shape-preserving.

    Args:
        n_stages: number of convolutions (1, 2 or 3 in the VNet).
        in_channels: channels of the input ``[B, in_channels, D, H, W]``.
        out_channels: channels of every convolution output.
        normalization: one of :data:`NORMALIZATIONS`.
    """

    def __init__(self, n_stages: int, in_channels: int, out_channels: int, normalization: str = "batchnorm") -> None:
        super().__init__()
        ops: list[nn.Module] = []
        for stage in range(n_stages):
            ops.append(nn.Conv3d(in_channels if stage == 0 else out_channels, out_channels, 3, padding=1))
            ops += _norm(normalization, out_channels)
            ops.append(nn.ReLU())
        self.conv = nn.Sequential(*ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class DownsamplingConvBlock(nn.Module):
    """``Conv3d(kernel=stride, stride)`` -> norm -> ReLU: ``[B, C_in, D, H, W] -> [B, C_out, D/s, H/s, W/s]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, normalization: str = "batchnorm") -> None:
        super().__init__()
        conv = nn.Conv3d(in_channels, out_channels, stride, stride=stride, padding=0)
        self.conv = nn.Sequential(conv, *_norm(normalization, out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpsamplingDeconvBlock(nn.Module):
    """``ConvTranspose3d(kernel=stride, stride)`` -> norm -> ReLU: ``[B, C_in, D, H, W] -> [B, C_out, sD, sH, sW]``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2, normalization: str = "batchnorm") -> None:
        super().__init__()
        deconv = nn.ConvTranspose3d(in_channels, out_channels, stride, stride=stride, padding=0)
        self.conv = nn.Sequential(deconv, *_norm(normalization, out_channels), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class VNet(nn.Module):
    """UA-MT / DHC VNet: 4 down- and 4 up-sampling stages with additive skips (specs/dhc.md §3).

    With ``f = n_filters`` and every ``conv`` a ``Conv3d 3x3x3 -> norm -> ReLU``::

        x1 = block_one(x)                                  1 conv,  C_in -> f      (D,    H,    W)
        x2 = block_two(block_one_dw(x1))                   2 convs, 2f             (D/2,  H/2,  W/2)
        x3 = block_three(block_two_dw(x2))                 3 convs, 4f             (D/4,  ...)
        x4 = block_four(block_three_dw(x3))                3 convs, 8f             (D/8,  ...)
        x5 = drop(block_five(block_four_dw(x4)))           3 convs, 16f            (D/16, ...)
        x6 = block_six(block_five_up(x5) + x4)             3 convs, 8f
        x7 = block_seven(block_six_up(x6) + x3)            3 convs, 4f
        x8 = block_eight(block_seven_up(x7) + x2)          2 convs, 2f
        x9 = drop(block_nine(block_eight_up(x8) + x1))     1 conv,  f
        y  = out_conv(x9)                                  Conv3d 1x1x1 with bias, f -> C_out

    ``drop`` is ``Dropout3d`` (whole channels zeroed), applied only when dropout is enabled and only in
    ``train()`` mode. DHC builds ``VNet(1, C, 32, "batchnorm", has_dropout=True)`` for training (37,778,126
    parameters for C = 14) and ``has_dropout=False`` for testing; the parameters do not depend on dropout.

    Dropout switches (``has_dropout`` is the original flag, ``dropout`` the MONAI convention that MONAI Label's
    epistemic scoring writes into ``network_def``):

    =====================  ================  ====================================
    ``dropout``            ``has_dropout``   result
    =====================  ================  ====================================
    ``None`` (default)     False / True      off / on with p = 0.5 (the original)
    ``p`` in (0, 1)        either            on with probability p
    ``0.0``                False             off
    ``0.0``                True              ValueError (contradictory)
    =====================  ================  ====================================

    Args:
        in_channels: input channels (``n_channels``; 1 for CT/MRI).
        out_channels: classes ``C`` incl. background (``n_classes``).
        n_filters: base width ``f`` (32 in DHC).
        normalization: one of :data:`NORMALIZATIONS` (DHC: ``"batchnorm"``). ``"groupnorm"`` (16 groups) needs
            ``n_filters`` divisible by 16.
        has_dropout: enable ``Dropout3d(0.5)`` after ``block_five`` and ``block_nine``.
        dropout: dropout probability; a value > 0 enables dropout regardless of ``has_dropout``.

    Input ``[B, in_channels, D, H, W]`` with D, H, W divisible by 16; output logits ``[B, out_channels, D, H, W]``.
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
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels), ("n_filters", n_filters)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"VNet: {name} must be a positive integer, got {value!r}.")
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"VNet: normalization must be one of {NORMALIZATIONS}, got {normalization!r}.")
        if normalization == "groupnorm" and n_filters % _GROUPS:
            raise ValueError(f"VNet: normalization='groupnorm' uses {_GROUPS} groups, so n_filters must be a "
                             f"multiple of {_GROUPS}; got n_filters={n_filters}.")
        if dropout is not None and not 0.0 <= dropout < 1.0:
            raise ValueError(f"VNet: dropout must be in [0, 1), got {dropout!r}.")
        if dropout == 0.0 and has_dropout:
            raise ValueError("VNet: has_dropout=True contradicts dropout=0.0; pass dropout=None for p=0.5 "
                             "or has_dropout=False.")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.has_dropout = has_dropout if dropout is None else dropout > 0.0

        f, norm = n_filters, normalization
        self.block_one = ConvBlock(1, in_channels, f, norm)
        self.block_one_dw = DownsamplingConvBlock(f, 2 * f, normalization=norm)
        self.block_two = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_two_dw = DownsamplingConvBlock(2 * f, 4 * f, normalization=norm)
        self.block_three = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_three_dw = DownsamplingConvBlock(4 * f, 8 * f, normalization=norm)
        self.block_four = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_four_dw = DownsamplingConvBlock(8 * f, 16 * f, normalization=norm)
        self.block_five = ConvBlock(3, 16 * f, 16 * f, norm)
        self.block_five_up = UpsamplingDeconvBlock(16 * f, 8 * f, normalization=norm)
        self.block_six = ConvBlock(3, 8 * f, 8 * f, norm)
        self.block_six_up = UpsamplingDeconvBlock(8 * f, 4 * f, normalization=norm)
        self.block_seven = ConvBlock(3, 4 * f, 4 * f, norm)
        self.block_seven_up = UpsamplingDeconvBlock(4 * f, 2 * f, normalization=norm)
        self.block_eight = ConvBlock(2, 2 * f, 2 * f, norm)
        self.block_eight_up = UpsamplingDeconvBlock(2 * f, f, normalization=norm)
        self.block_nine = ConvBlock(1, f, f, norm)
        self.out_conv = nn.Conv3d(f, out_channels, 1, padding=0)
        self.dropout = nn.Dropout3d(p=0.5 if dropout is None else dropout)

    def _check_input(self, x: torch.Tensor) -> None:
        shape = tuple(x.shape)
        if x.ndim != 5 or shape[1] != self.in_channels:
            raise ValueError(f"VNet: expected input [B, {self.in_channels}, D, H, W], got shape {shape}.")
        if any(s % 16 for s in shape[2:]):
            raise ValueError(f"VNet: spatial dims of input shape {shape} must all be divisible by 16 "
                             "(four stride-2 downsamplings).")

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(x) if self.has_dropout else x

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Encoder features ``(x1, ..., x5)``: ``[B, f * 2^k, D / 2^k, H / 2^k, W / 2^k]`` for k = 0..4."""
        self._check_input(x)
        x1 = self.block_one(x)
        x2 = self.block_two(self.block_one_dw(x1))
        x3 = self.block_three(self.block_two_dw(x2))
        x4 = self.block_four(self.block_three_dw(x3))
        x5 = self._drop(self.block_five(self.block_four_dw(x4)))
        return x1, x2, x3, x4, x5

    def decode(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits ``[B, out_channels, D, H, W]`` from the encoder features of :meth:`encode`."""
        x1, x2, x3, x4, x5 = features
        x6 = self.block_six(self.block_five_up(x5) + x4)
        x7 = self.block_seven(self.block_six_up(x6) + x3)
        x8 = self.block_eight(self.block_seven_up(x7) + x2)
        x9 = self._drop(self.block_nine(self.block_eight_up(x8) + x1))
        return self.out_conv(x9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]`` logits (D, H, W divisible by 16)."""
        return self.decode(self.encode(x))


@torch.no_grad()
def kaiming_normal_init_(module: nn.Module) -> nn.Module:
    """DHC's initialisation (specs/dhc.md §3), in place; returns ``module``.

    Every ``Conv3d`` weight ~ N(0, 2 / fan_in) (``kaiming_normal_``, fan_in = C_in * k^3, gain sqrt(2));
    every ``BatchNorm3d`` gets gamma = 1, beta = 0. Conv biases and ``ConvTranspose3d`` layers keep PyTorch's
    default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm3d):
            m.weight.fill_(1.0)
            m.bias.zero_()
    return module


@torch.no_grad()
def xavier_normal_init_(module: nn.Module) -> nn.Module:
    """Initialisation of branch B in the CPS-family baselines, in place; returns ``module``.

    Every ``Conv3d`` weight ~ N(0, 2 / (fan_in + fan_out)) (``xavier_normal_``, gain 1; fan = C * k^3);
    ``BatchNorm3d`` gamma = 1, beta = 0; conv biases and ``ConvTranspose3d`` layers keep their defaults.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv3d):
            nn.init.xavier_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm3d):
            m.weight.fill_(1.0)
            m.bias.zero_()
    return module


def branch_b_init(init_b: str, owner: str) -> Callable[[nn.Module], nn.Module]:
    """The initialisation of a co-training pair's branch B (branch A is always kaiming): ``"kaiming"`` (DHC) or
    ``"xavier"`` (CPS, DST); ``owner`` names the network in the error."""
    inits = {"kaiming": kaiming_normal_init_, "xavier": xavier_normal_init_}
    if init_b not in inits:
        raise ValueError(f"{owner}: init_b must be 'kaiming' or 'xavier', got {init_b!r}")
    return inits[init_b]


class DualVNet(Branches):
    """Both VNet branches of a co-training pair in one module; ``forward`` is the ensemble of their logits.

    ``forward(x) = (z_A + z_B) / 2`` (``branches="AB"``, DHC's ``--cps AB`` test) or one branch's logits
    (``"A"``: the UA-MT student). ``[B, in_channels, D, H, W] -> [B, out_channels, D, H, W]``, D, H, W divisible
    by 16. Its ``state_dict`` holds ``branch_a.*`` and ``branch_b.*`` (one ``model.pt`` for both branches); see
    :class:`~common.networks.branches.Branches`.

    Args:
        in_channels, out_channels, n_filters, normalization, has_dropout, dropout: those of :class:`VNet`, for
            both branches.
        init_b: ``"kaiming"`` (DHC, both branches) or ``"xavier"`` (branch B of CPS).
        branches: which logits ``forward`` returns: ``"AB"`` (mean), ``"A"`` or ``"B"``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        n_filters: int = 32,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout: float | None = None,
        init_b: str = "kaiming",
        branches: str = "AB",
    ) -> None:
        init = branch_b_init(init_b, "DualVNet")
        if branches not in BRANCH_OUTPUTS:
            raise ValueError(f"DualVNet: branches must be 'AB', 'A' or 'B', got {branches!r}")
        branch_a = kaiming_normal_init_(VNet(in_channels, out_channels, n_filters, normalization, has_dropout, dropout))
        branch_b = VNet(in_channels, out_channels, n_filters, normalization, has_dropout, dropout)
        super().__init__(branch_a, init(branch_b), branches)


def load_dhc_checkpoint(network: nn.Module, path: str | os.PathLike, branch: str = "A") -> nn.Module:
    """Load one branch of an official DHC ``best_model.pth`` into ``network`` (strict), in place.

    The official training saves ``{"A": state_dict_A, "B": state_dict_B}`` (specs/dhc.md §4.6); branch A is
    the DiffDW branch, B the DistDW branch. The file is read with ``weights_only=True`` onto the CPU.

    Returns:
        ``network``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``branch`` is not "A"/"B"; the file is unreadable or lacks the branch; or the branch's
            keys/shapes differ from ``network`` (missing / unexpected / mismatched keys named).
    """
    if branch not in ("A", "B"):
        raise ValueError(f"load_dhc_checkpoint: branch must be 'A' or 'B', got {branch!r}.")
    checkpoint = load_checkpoint(path, "DHC checkpoint")
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get(branch), Mapping):
        keys = sorted(map(str, checkpoint)) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(f"DHC checkpoint '{path}' has no state dict under branch key {branch!r} "
                         f"(expected {{'A': ..., 'B': ...}}; found {keys}).")
    load_state_dict_strict(network, checkpoint[branch], f"{path}[{branch!r}]")
    logger.info("loaded DHC branch %s from '%s'", branch, path)
    return network
