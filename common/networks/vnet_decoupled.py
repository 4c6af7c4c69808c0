"""The decoupled VNet of DST (shared encoder, three decoders) and its warm-start gradient reversal layer.

Chen, Jiang, Wang, Wan, Wang & Long, "Debiased Self-Training for Semi-Supervised Learning", NeurIPS 2022
(arXiv 2202.07136), as adapted to 3D segmentation by the "dst" baseline of Wang & Li, "DHC: Dual-debiased
Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023
(specs/dhc.md §9, the DHC repository's ``VNet_Decoupled``). DST decouples pseudo-label *generation* from pseudo-label
*use* with two heads on one feature extractor ψ, and adds a third, adversarial head::

    features = ψ(x) = (x1, ..., x5)                      the VNet encoder (specs/dhc.md §3), shared
    z_main   = h(features)                               main head (supervised; the prediction at test time)
    z_pseudo = h_pseudo(features)                        pseudo-label head
    z_worst  = h_worst(R(x1), ..., R(x5))                worst-case head behind the gradient reversal R

In 3D every "head" is a whole VNet decoder (``block_five_up`` ... ``block_nine``, Dropout3d, 1x1x1 ``out_conv``)
with its own weights; the reversal is applied to all five encoder features the worst-case decoder reads (its input
and its four additive skips), as in the DHC repository.

Warm-start gradient reversal (Ganin & Lempitsky's GRL with the warm start of TLlib's
``WarmStartGradientReverseLayer``, the layer DST uses)::

    R(x) = x,   dR/dx = −λ(i) I,   λ(i) = 2 (hi − lo) / (1 + exp(−α i / N)) − (hi − lo) + lo
                                        = lo + (hi − lo) tanh(α i / (2 N))

``i`` = optimisation steps taken so far (a buffer, ``num_steps``, so a checkpoint restores it), DHC's
``lo = 0, hi = 0.1, α = 1, N = max_iters = 500``. λ starts at ``lo`` and tends to ``hi`` only asymptotically:
λ(250) = 0.1 tanh(0.25) ≈ 0.0245, λ(500) = 0.1 tanh(0.5) ≈ 0.0462, λ(2400) ≈ 0.0984 (DHC Synapse 20 % runs
≈ 2.4 k iterations). The layer does not step itself: the training method calls :meth:`WarmStartGradientReverse.step`
once per iteration (DHC steps after the optimiser; the coefficient of an iteration is fixed when its forward runs,
so stepping right after the forward gives the same sequence).

Shapes: input ``[B, in_channels, D, H, W]`` (D, H, W divisible by 16); every head ``[B, out_channels, D, H, W]``.
``forward(x)`` returns the main head only (validation, sliding windows, TorchScript, MONAI Label);
``forward_heads(x)`` returns ``(z_main, z_pseudo, z_worst)``.

Choices: the main path keeps :class:`~common.networks.vnet.VNet`'s module names (``block_*``, ``out_conv``), so a
plain VNet state dict loads into it; the other decoders are ``decoder_pseudo.*`` and ``decoder_worst.*`` (the DHC
repository names the main decoder ``decoder.*`` and the 1x1x1 convolution ``head``; its GRL step counter is a
Python attribute that its checkpoints do not save). One Dropout3d after the shared bottleneck, one per decoder
after ``block_nine`` (each decoder draws its own mask), as the original.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from common.networks.branches import Branches
from common.networks.vnet import ConvBlock, UpsamplingDeconvBlock, VNet, branch_b_init, kaiming_normal_init_

__all__ = [
    "warm_start_coefficient",
    "GradientReverseFunction",
    "WarmStartGradientReverse",
    "VNetDecoder",
    "DecoupledVNet",
    "DualDecoupledVNet",
]


def warm_start_coefficient(step: int, lo: float = 0.0, hi: float = 0.1, alpha: float = 1.0,
                           max_iters: int = 500) -> float:
    """``λ(i) = 2 (hi − lo) / (1 + exp(−α i / N)) − (hi − lo) + lo`` with ``i = step``, ``N = max_iters``."""
    return 2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_iters)) - (hi - lo) + lo


class GradientReverseFunction(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``−coeff`` (no gradient for ``coeff``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, coeff: float) -> torch.Tensor:  # type: ignore[override]
        ctx.coeff = coeff
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output * -ctx.coeff, None


class WarmStartGradientReverse(nn.Module):
    """Gradient reversal with the warm-start coefficient λ(i) of the module docstring.

    Args:
        lo, hi: start and asymptote of λ, ``0 <= lo <= hi`` (DHC: 0 and 0.1).
        alpha: speed α > 0 (1).
        max_iters: scale N > 0 of the step axis (DHC: 500).

    Buffer ``num_steps`` (int64 scalar): the steps taken, advanced by :meth:`step`.
    """

    def __init__(self, lo: float = 0.0, hi: float = 0.1, alpha: float = 1.0, max_iters: int = 500) -> None:
        super().__init__()
        if not 0.0 <= lo <= hi:
            raise ValueError(f"WarmStartGradientReverse: need 0 <= lo <= hi, got lo={lo}, hi={hi}")
        if alpha <= 0 or max_iters <= 0:
            raise ValueError(f"WarmStartGradientReverse: alpha and max_iters must be > 0, got alpha={alpha}, "
                             f"max_iters={max_iters}")
        self.lo, self.hi, self.alpha, self.max_iters = lo, hi, alpha, max_iters
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))

    def coefficient(self) -> float:
        """λ at the current step."""
        return warm_start_coefficient(int(self.num_steps), self.lo, self.hi, self.alpha, self.max_iters)

    def step(self) -> None:
        """Advance ``i`` by one (once per optimisation step)."""
        self.num_steps += 1

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every tensor unchanged; their gradients are multiplied by ``−λ(i)`` (one λ read for all of them)."""
        coeff = self.coefficient()
        return tuple(GradientReverseFunction.apply(t, coeff) for t in tensors)


class VNetDecoder(nn.Module):
    """A second VNet decoder: :class:`~common.networks.vnet.VNet`'s ``block_five_up`` ... ``block_nine``, Dropout3d
    and ``out_conv``, under the same names so that :meth:`VNet.decode` runs on it unchanged.

    Args:
        out_channels: classes C.
        n_filters: the encoder's base width f (input features have 16f ... f channels).
        normalization: one of :data:`common.networks.vnet.NORMALIZATIONS`.
        has_dropout: Dropout3d after ``block_nine`` (train mode only).
        dropout_p: its probability.
    """

    decode = VNet.decode
    _drop = VNet._drop

    def __init__(self, out_channels: int, n_filters: int, normalization: str, has_dropout: bool,
                 dropout_p: float) -> None:
        super().__init__()
        self.has_dropout = has_dropout
        stages = (("five", "six", 3), ("six", "seven", 3), ("seven", "eight", 2), ("eight", "nine", 1))
        for level, (up_name, block_name, n_convs) in enumerate(stages):
            width = n_filters * 2 ** (3 - level)  # 8f, 4f, 2f, f
            setattr(self, f"block_{up_name}_up", UpsamplingDeconvBlock(2 * width, width, normalization=normalization))
            setattr(self, f"block_{block_name}", ConvBlock(n_convs, width, width, normalization))
        self.out_conv = nn.Conv3d(n_filters, out_channels, 1, padding=0)
        self.dropout = nn.Dropout3d(p=dropout_p)

    def forward(self, features: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Logits ``[B, C, D, H, W]`` from the encoder features ``(x1, ..., x5)`` of :meth:`VNet.encode`."""
        return self.decode(features)


class DecoupledVNet(VNet):
    """DST's decoupled VNet (module docstring): the VNet (encoder + main decoder) plus a pseudo-label decoder and a
    worst-case decoder behind a :class:`WarmStartGradientReverse`.

    Args:
        in_channels, out_channels, n_filters, normalization, has_dropout, dropout: those of
            :class:`~common.networks.vnet.VNet` (DHC: ``1, C, 32, "batchnorm", True``), shared by all decoders.
        grl_lo, grl_hi, grl_alpha, grl_max_iters: the reversal's warm start (0, 0.1, 1, 500).

    ``forward(x)``: main logits; ``forward_heads(x)``: ``(main, pseudo, worst)`` logits, each ``[B, C, D, H, W]``.
    Weights keep PyTorch's default initialisation (apply :func:`~common.networks.vnet.kaiming_normal_init_` or
    :func:`~common.networks.vnet.xavier_normal_init_`, as :class:`DualDecoupledVNet` does).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        n_filters: int = 32,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout: float | None = None,
        grl_lo: float = 0.0,
        grl_hi: float = 0.1,
        grl_alpha: float = 1.0,
        grl_max_iters: int = 500,
    ) -> None:
        super().__init__(in_channels, out_channels, n_filters, normalization, has_dropout, dropout)
        p = self.dropout.p
        self.decoder_pseudo = VNetDecoder(out_channels, n_filters, normalization, self.has_dropout, p)
        self.decoder_worst = VNetDecoder(out_channels, n_filters, normalization, self.has_dropout, p)
        self.grl = WarmStartGradientReverse(grl_lo, grl_hi, grl_alpha, grl_max_iters)

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(z_main, z_pseudo, z_worst)`` ``[B, C, D, H, W]`` from one shared encoder pass; the worst-case decoder
        reads the encoder features through the gradient reversal."""
        features = self.encode(x)
        return self.decode(features), self.decoder_pseudo(features), self.decoder_worst(self.grl(*features))


class DualDecoupledVNet(Branches):
    """The two co-trained :class:`DecoupledVNet` branches of the DHC "dst" baseline; ``forward`` is the mean of their
    main logits (DHC's ``--cps AB`` evaluation). Its ``state_dict`` holds ``branch_a.*`` and ``branch_b.*``
    (:class:`~common.networks.branches.Branches`).

    Args:
        in_channels, out_channels, n_filters, normalization, has_dropout, dropout: those of :class:`DecoupledVNet`.
        init_b: initialisation of branch B, ``"xavier"`` (DHC's train_dst.py, like CPS) or ``"kaiming"``; branch A
            is always kaiming-initialised.
        grl_lo, grl_hi, grl_alpha, grl_max_iters: the reversal's warm start of both branches.
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int = 14,
        n_filters: int = 32,
        normalization: str = "batchnorm",
        has_dropout: bool = False,
        dropout: float | None = None,
        init_b: str = "xavier",
        grl_lo: float = 0.0,
        grl_hi: float = 0.1,
        grl_alpha: float = 1.0,
        grl_max_iters: int = 500,
    ) -> None:
        init = branch_b_init(init_b, "DualDecoupledVNet")
        args = (in_channels, out_channels, n_filters, normalization, has_dropout, dropout,
                grl_lo, grl_hi, grl_alpha, grl_max_iters)
        super().__init__(kaiming_normal_init_(DecoupledVNet(*args)), init(DecoupledVNet(*args)), "AB")
