"""Per-step linear warm-up then half-cosine decay of ASG pre-training, as a ``LambdaLR``.

Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training" (ASG), MICCAI 2024; specs/asg.md §5:
the released ``CosineAnnealingWarmupRestarts(first_cycle_steps=T, cycle_mult=1, max_lr=4e-5, min_lr=1e-8,
warmup_steps=0.4 T)`` stepped once per optimisation step. With ``W = int(warmup_fraction · T)``::

    lr(t) = min + (max - min) · t / W                                  t < W
    lr(t) = min + (max - min) · ½ (1 + cos(π (t - W) / (T - W)))         W <= t <= T
    lr(t) = min                                                        t > T

so ``lr(0) = min``, ``lr(W) = max`` and ``lr(T) = min``. Past ``T`` the released scheduler would start a new cycle
(warm-up again); ``T`` is the planned number of steps, so it is never reached there, and here the rate stays at
``min``. This replaces the git-only ``cosine_annealing_warmup`` package.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR", "warmup_cosine_factor", "warmup_cosine_lr"]


def _check(total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> None:
    if total_steps < 1:
        raise ValueError(f"warmup cosine schedule: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup cosine schedule: warmup_steps must be in [0, total_steps={total_steps}), got "
                         f"{warmup_steps}")
    if not 0 <= min_lr <= max_lr or max_lr <= 0:
        raise ValueError(f"warmup cosine schedule: need 0 <= min_lr <= max_lr and max_lr > 0, got min_lr={min_lr}, "
                         f"max_lr={max_lr}")


def warmup_cosine_lr(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """``lr(t)`` of the module docstring at the 0-based optimisation step ``t = step``.

    Args:
        step: ``t >= 0``.
        total_steps: ``T >= 1``.
        warmup_steps: ``W`` in ``[0, T)``.
        max_lr: peak rate (reached at ``t = W``).
        min_lr: rate at ``t = 0`` and from ``t = T`` on, ``0 <= min_lr <= max_lr``.
    """
    _check(total_steps, warmup_steps, max_lr, min_lr)
    if step < 0:
        raise ValueError(f"warmup cosine schedule: step must be >= 0, got {step}")
    if step < warmup_steps:
        return min_lr + (max_lr - min_lr) * step / warmup_steps
    if step >= total_steps:
        return min_lr
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, max_lr: float, min_lr: float) -> float:
    """``lr(t) / max_lr``, the ``LambdaLR`` multiplier of a group whose initial rate is ``max_lr``."""
    return warmup_cosine_lr(step, total_steps, warmup_steps, max_lr, min_lr) / max_lr


class WarmupCosineLR(LambdaLR):
    """``LambdaLR`` following :func:`warmup_cosine_lr`; call ``step()`` once per optimisation step.

    Every parameter group uses its own initial ``lr`` as ``max_lr`` (the same ``min_lr`` for all) and
    ``W = int(warmup_fraction · total_steps)``.

    Args:
        optimizer: e.g. AdamW(lr=4e-5, weight_decay=0.05).
        total_steps: ``T`` (planned optimisation steps).
        warmup_fraction: ``W / T`` in ``[0, 1)`` (0.4).
        min_lr: floor rate (1e-8), at most every group's initial rate.
        last_epoch: index of the last step taken (-1: a new schedule).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.4,
                 min_lr: float = 1e-8, last_epoch: int = -1) -> None:
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"WarmupCosineLR: warmup_fraction must be in [0, 1), got {warmup_fraction}")
        if total_steps < 1:
            raise ValueError(f"WarmupCosineLR: total_steps must be >= 1, got {total_steps}")
        warmup_steps = int(warmup_fraction * total_steps)
        factors = []
        for index, group in enumerate(optimizer.param_groups):
            max_lr = group.get("initial_lr", group["lr"])
            if min_lr > max_lr:
                raise ValueError(f"WarmupCosineLR: min_lr={min_lr} exceeds the lr {max_lr} of parameter group "
                                 f"{index}")
            _check(total_steps, warmup_steps, max_lr, min_lr)
            factors.append(functools.partial(warmup_cosine_factor, total_steps=total_steps,
                                             warmup_steps=warmup_steps, max_lr=max_lr, min_lr=min_lr))
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        super().__init__(optimizer, factors, last_epoch=last_epoch)
