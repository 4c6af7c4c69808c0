"""Poly learning rate with linear warm-up and the AdamW of ToCo / EndoKED-WSSS (``PolyWarmupAdamW``).

Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo), CVPR 2023, §4.1; EndoKED-WSSS
(Wang et al., arXiv 2310.11173) trains with it unchanged (specs/endoked.md §3.4 step 6, §6): AdamW with betas
(0.9, 0.999), weight decay 1e-2, base lr 6e-5 on the encoder and 10x on the classifiers, projection head and
decoder; warm-up over 1,500 iterations from 1e-6 x lr, then poly 0.9 decay to 0 at 80,000 iterations.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["PolyWarmupLR", "poly_warmup_factor", "toco_optimizer"]


def poly_warmup_factor(
    step: int, warmup_iters: int = 1500, max_iters: int = 80000, warmup_ratio: float = 1e-6, power: float = 0.9
) -> float:
    """Multiplier of the base learning rate at the 0-based optimisation step ``t``::

        f(t) = 1 - (1 - t / W) (1 - r)      for t < W
        f(t) = (1 - t / T) ** power         for W <= t <= T   (0 past T)

    Args:
        step: ``t >= 0``.
        warmup_iters: ``W`` (0: no warm-up).
        max_iters: ``T``.
        warmup_ratio: ``r = f(0)``.
        power: poly exponent.
    """
    if step < 0:
        raise ValueError(f"poly_warmup_factor: step must be >= 0, got {step}")
    if max_iters < 1 or not 0 <= warmup_iters <= max_iters:
        raise ValueError(f"poly_warmup_factor: need max_iters >= 1 and 0 <= warmup_iters <= max_iters, got "
                         f"warmup_iters={warmup_iters}, max_iters={max_iters}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"poly_warmup_factor: warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if step < warmup_iters:
        return 1.0 - (1.0 - step / warmup_iters) * (1.0 - warmup_ratio)
    return max(1.0 - step / max_iters, 0.0) ** power


class PolyWarmupLR(LambdaLR):
    """``LambdaLR`` with :func:`poly_warmup_factor`; call ``step()`` once per iteration, after the optimiser step.

    Every parameter group follows ``lr_g(t) = lr_g(0) f(t)`` with its own initial lr (so the 10x groups stay 10x).

    Args:
        optimizer: e.g. from :func:`toco_optimizer`.
        warmup_iters, max_iters, warmup_ratio, power: those of :func:`poly_warmup_factor`.
        last_epoch: index of the last step taken (-1: a new schedule).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_iters: int = 1500,
        max_iters: int = 80000,
        warmup_ratio: float = 1e-6,
        power: float = 0.9,
        last_epoch: int = -1,
    ) -> None:
        poly_warmup_factor(0, warmup_iters, max_iters, warmup_ratio, power)  # validate the arguments now
        factor = functools.partial(poly_warmup_factor, warmup_iters=warmup_iters, max_iters=max_iters,
                                   warmup_ratio=warmup_ratio, power=power)
        super().__init__(optimizer, factor, last_epoch=last_epoch)


def toco_optimizer(
    network: nn.Module,
    lr: float = 6e-5,
    weight_decay: float = 1e-2,
    betas: Sequence[float] = (0.9, 0.999),
    lr_multipliers: Sequence[float] = (1.0, 1.0, 10.0, 10.0),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over ``network.param_groups()`` = [encoder non-norm, encoder norm, classifiers + proj_head, decoder].

    Group ``g`` gets ``lr * lr_multipliers[g]`` and the same weight decay (frozen parameters in a group never get a
    gradient, so AdamW leaves them alone).

    Args:
        network: exposes ``param_groups() -> list of parameter lists`` (:class:`common.networks.toco_vit.ToCoViT`).
        lr: base learning rate (6e-5).
        weight_decay: decoupled weight decay (1e-2).
        betas: Adam betas.
        lr_multipliers: one per group (1, 1, 10, 10).
        eps: Adam epsilon.
    """
    if not callable(getattr(network, "param_groups", None)):
        raise ValueError(f"toco_optimizer: network {type(network).__name__} has no param_groups() method")
    groups = [list(group) for group in network.param_groups()]
    if len(groups) != len(lr_multipliers):
        raise ValueError(f"toco_optimizer: network.param_groups() returned {len(groups)} groups but "
                         f"lr_multipliers has {len(lr_multipliers)} values")
    return torch.optim.AdamW(
        [{"params": params, "lr": lr * mult} for params, mult in zip(groups, lr_multipliers)],
        lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
    )
