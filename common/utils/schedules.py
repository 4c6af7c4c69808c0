"""Per-iteration schedules and the teacher EMA of DINO / Sparsam.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, §3.1 and App. B;
used by Sparsam (Nielsen et al., Bioengineering 2023; specs/sparsam.md §4-§5). Every schedule is a numpy array with
one value per optimisation step, indexed by the global iteration counter.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = [
    "MOMENTUM_SCHEDULES",
    "cosine_schedule",
    "ema_update",
    "linear_warmup_constant",
    "teacher_momentum_schedule",
]

MOMENTUM_SCHEDULES = ("constant", "dino_cosine", "released_2025")


def _check_iters(total_iters: int, warmup_iters: int) -> None:
    if total_iters < 1:
        raise ValueError(f"total_iters must be >= 1, got {total_iters}")
    if not 0 <= warmup_iters <= total_iters:
        raise ValueError(f"warmup_iters must be in [0, total_iters={total_iters}], got {warmup_iters}")


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, warmup_start: float = 0.0
) -> np.ndarray:
    """Linear warm-up followed by a half-cosine decay (DINO's ``cosine_scheduler``).

    With ``W = warmup_iters`` and ``N = total_iters - W``::

        v[i]     = linspace(warmup_start, base, W)[i]                        for i < W  (v[W-1] = base)
        v[W + j] = final + (base - final) * (1 + cos(pi * j / N)) / 2        for 0 <= j < N

    so the cosine part starts at ``base`` and stops one step short of ``final`` (its last value is
    ``final + (base - final) * (1 + cos(pi (N-1)/N)) / 2``), exactly as in DINO.

    Args:
        base: value at the end of the warm-up / start of the cosine.
        final: value the cosine decays (or grows) towards.
        total_iters: length of the schedule (epochs x iterations per epoch).
        warmup_iters: number of linear warm-up iterations.
        warmup_start: value at iteration 0 when ``warmup_iters > 0``.

    Returns:
        float64 array ``[total_iters]``.
    """
    _check_iters(total_iters, warmup_iters)
    warmup = np.linspace(warmup_start, base, warmup_iters)
    n_cos = total_iters - warmup_iters
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * np.arange(n_cos) / max(n_cos, 1)))
    return np.concatenate([warmup, cosine])


def linear_warmup_constant(start: float, end: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """Linear ramp ``start -> end`` over ``warmup_iters`` iterations (both ends included), then constant ``end``.

    The DINO / Sparsam teacher temperature: ``start = 0.02``, ``end = 0.04``, ``warmup_iters = 10 x len(loader)``
    (specs/sparsam.md §4).

    Returns:
        float64 array ``[total_iters]``.
    """
    _check_iters(total_iters, warmup_iters)
    return np.concatenate([np.linspace(start, end, warmup_iters), np.full(total_iters - warmup_iters, float(end))])


def teacher_momentum_schedule(kind: str, base: float = 0.9995, *, total_iters: int) -> np.ndarray:
    """EMA momentum ``lambda`` of the teacher per iteration (specs/sparsam.md §5, bundle decision).

    * ``"constant"``: ``lambda = base`` throughout (Sparsam code of the paper / Zenodo-weights era, default).
    * ``"dino_cosine"``: cosine ``base -> 1`` (original DINO, with ``base = 0.996``).
    * ``"released_2025"``: cosine ``1 -> base`` (Sparsam commit d2659c7, arguments of its scheduler swapped).

    Returns:
        float64 array ``[total_iters]``.
    """
    if not 0.0 <= base <= 1.0:
        raise ValueError(f"teacher momentum base must be in [0, 1], got {base}")
    if kind == "constant":
        _check_iters(total_iters, 0)
        return np.full(total_iters, float(base))
    if kind == "dino_cosine":
        return cosine_schedule(base, 1.0, total_iters)
    if kind == "released_2025":
        return cosine_schedule(1.0, base, total_iters)
    raise ValueError(f"unknown teacher momentum schedule kind {kind!r}; expected one of {MOMENTUM_SCHEDULES}")


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """In-place teacher update ``theta_t <- lambda * theta_t + (1 - lambda) * theta_s`` (DINO Eq. in §3.1).

    Only ``parameters()`` are averaged (in matching order); buffers such as BatchNorm running statistics are left
    untouched, as in Sparsam (the teacher's own forward passes update them).

    Args:
        teacher: module updated in place.
        student: module with the same parameter list.
        momentum: ``lambda`` in [0, 1].
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameter tensors but student has {len(s_params)}")
    for i, (t, s) in enumerate(zip(t_params, s_params)):
        if t.shape != s.shape:
            raise ValueError(f"parameter #{i}: teacher shape {tuple(t.shape)} != student shape {tuple(s.shape)}")
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1.0 - momentum)
