"""CReST-style class-rebalancing weights for the CReST baseline of DHC's comparison (specs/dhc.md §9 row "crest").

Wei, Sohn, Mellina, Yuille & Yang, "CReST: A Class-Rebalancing Self-Training Framework for Imbalanced
Semi-Supervised Learning", CVPR 2021. CReST samples pseudo-labelled examples of class ``c`` with rate
``mu_c = (N_{C+1-c} / N_1) ** alpha`` (classes sorted by decreasing frequency, ``alpha = 1/3``): the rarest class
keeps everything, the most frequent one the smallest share. The DHC baseline turns these rates into a CE/Dice class
weight vector of a CPS co-training pair, one vector per branch (specs/dhc.md §9):

1. ``mu_c = ((N_c + eps) / (max_k N_k + eps)) ** alpha``,  ``eps = 1e-8`` (so an absent class gets a tiny, non-zero
   ``mu``), C classes incl. background;
2. rank the classes by decreasing ``N_c`` (a **stable** sort: tied classes keep increasing class-index order), and
   give the class at rank ``r`` (0 = most frequent) the ``mu`` of rank ``C - 1 - r``:
   ``w[order[r]] = mu[order[C - 1 - r]]`` -- the most frequent class gets the smallest ``mu``, the rarest 1.

The weights are a permutation of the ``mu`` values, so they lie in ``(0, 1]``, and the rarest class gets exactly 1.
Because of the stable sort, among tied classes the lower class index gets the smaller (or equal) weight, e.g.
counts ``[5, 5, 1]`` -> ``mu = [1, 1, 0.585]`` -> ``w = [0.585, 1, 1]`` (not symmetric in the tied classes 0, 1).

It is the **weight vector** that is EMA'd (not the counts): ``w <- m w + (1 - m) w_cur`` with ``m = 0.99`` and
``w_cur`` from the branch's own arg-max counts on the unlabelled patches of the current iteration; the EMA starts
from the weights of the labelled ground-truth histogram (whole stored labelled volumes, as for DistDW:
:func:`common.losses.debiased_weighting.class_counts`, ``common.engines.co_training.labelled_class_counts``). The same
vector weights the branch's supervised CE + Dice and its CPS CE.

:class:`CReSTWeighting` follows :class:`common.losses.debiased_weighting.DistDW`: an ``nn.Module`` whose whole state
lives in buffers (``state_dict`` restores it), ``update`` once per iteration, counts summed over the ranks of a
``torch.distributed`` run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.losses.debiased_weighting import argmax_counts

__all__ = ["CReSTWeighting", "crest_weights"]

EPS = 1e-8


def crest_weights(counts: torch.Tensor | Sequence[float], alpha: float = 1.0 / 3.0) -> torch.Tensor:
    """CReST class weights from class counts (module docstring, specs/dhc.md §9 row "crest").

    ``mu_c = ((N_c + 1e-8) / (max_k N_k + 1e-8)) ** alpha``; with ``order`` = class indices sorted by decreasing
    ``N`` (stable: ties in increasing index order), ``w[order[r]] = mu[order[C - 1 - r]]``.

    Example (C = 3, alpha = 1/3): ``N = [8, 1, 27]`` -> ``mu = [2/3, 1/3, 1]``, order ``[2, 0, 1]`` ->
    ``w = [2/3, 1, 1/3]``.

    Args:
        counts: ``[C]`` non-negative class counts ``N``, C >= 2.
        alpha: exponent (1/3 in CReST and DHC's baseline), > 0.

    Returns:
        ``[C]`` float64 weights in ``(0, 1]``.

    Raises:
        ValueError: counts not a 1-D vector of >= 2 values >= 0, or alpha <= 0.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or bool((counts < 0).any()) or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"crest_weights: counts must be a 1-D vector of >= 2 finite counts >= 0, "
                         f"got {counts.tolist()}")
    if not alpha > 0:
        raise ValueError(f"crest_weights: alpha must be > 0, got {alpha}")
    mu = ((counts + EPS) / (counts.max() + EPS)) ** alpha
    order = torch.sort(counts, descending=True, stable=True).indices  # most frequent first, ties by class index
    weights = torch.empty_like(mu)
    weights[order] = mu[order].flip(0)  # rank r gets the mu of rank C - 1 - r
    return weights


class CReSTWeighting(nn.Module):
    """Per-branch CReST class weights with an EMA of the weight vector (module docstring, specs/dhc.md §9).

    * ``init_weights(N)``: ``w = crest_weights(N)`` with ``N`` the voxel histogram of the labelled ground truth; this
      is the EMA's starting point (until then ``w = 1``, and ``update`` refuses to run).
    * ``update(z_u)`` each iteration, before the losses: ``N`` = histogram of ``argmax_c`` of the branch's own logits
      on the unlabelled patches (summed over the ranks), ``w_cur = crest_weights(N)``,
      ``w <- m w + (1 - m) w_cur``. The counts themselves are **not** smoothed or kept.

    Args:
        num_classes: C, including background.
        momentum: EMA momentum ``m`` of the weights (0.99).
        alpha: CReST exponent (1/3).
    """

    def __init__(self, num_classes: int, momentum: float = 0.99, alpha: float = 1.0 / 3.0) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"CReSTWeighting: num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"CReSTWeighting: momentum must lie in [0, 1], got {momentum}")
        if not alpha > 0:
            raise ValueError(f"CReSTWeighting: alpha must be > 0, got {alpha}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.alpha = alpha
        self.register_buffer("weights", torch.ones(num_classes))
        self.register_buffer("initialised", torch.tensor(False))

    def _counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        counts = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
        if counts.shape != (self.num_classes,) or bool((counts < 0).any()):
            raise ValueError(f"CReSTWeighting: counts must be {self.num_classes} values >= 0, got {counts.tolist()}")
        return counts

    def init_weights(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Set ``w = crest_weights(counts)`` from the labelled GT histogram ``[C]``; returns a copy ``[C]``."""
        self.weights.copy_(crest_weights(self._counts(counts), self.alpha))
        self.initialised.fill_(True)
        return self.get_weights()

    @torch.no_grad()
    def update_counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """One EMA step ``w <- m w + (1 - m) crest_weights(counts)``; returns a copy of the new ``w`` ``[C]``."""
        if not bool(self.initialised):
            raise RuntimeError("CReSTWeighting: call init_weights(labelled class counts) before the first update")
        current = crest_weights(self._counts(counts), self.alpha).to(self.weights)
        self.weights.mul_(self.momentum).add_((1.0 - self.momentum) * current)
        return self.get_weights()

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """EMA step from the branch's own logits on the unlabelled patches.

        Args:
            logits: ``[B, C, *spatial]``; ``N_c`` = number of voxels whose arg-max class is ``c``.

        Returns:
            copy of the new weights ``[C]`` (float32).
        """
        return self.update_counts(argmax_counts(logits, self.num_classes, "CReSTWeighting"))

    def get_weights(self) -> torch.Tensor:
        """Current weights ``[C]`` (a detached copy)."""
        return self.weights.detach().clone()
