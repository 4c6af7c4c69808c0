"""SimiS class weights: the per-branch re-weighting baseline of DHC's comparison (specs/dhc.md §9, row "simis").

Chen, Fan, Wang, Wang, Schiele, Xie, Savvides & Raj, "An Embarrassingly Simple Baseline for Imbalanced
Semi-Supervised Learning" (SimiS), arXiv 2211.11086, 2022; used as a segmentation baseline by Wang & Li, "DHC",
MICCAI 2023. As in that baseline, each branch of the CPS pair keeps its own weight vector ``w`` ``[C]`` (C classes incl.
background), driven by the class frequencies of its own arg-max over the *whole* batch (labelled + unlabelled
patches), and applies it to its weighted CE, Dice and cross-pseudo-supervision CE
(:class:`common.losses.weighted_ce_dice.WeightedCEDiceLoss`).

The state lives in buffers (``state_dict``/``load_state_dict`` restore it; ``.to(device)`` moves it), following
:class:`common.losses.debiased_weighting.DistDW`. An engine calls ``update`` once per iteration, before the losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.losses.debiased_weighting import argmax_counts

__all__ = ["SimiSWeighting", "simis_weights"]


def simis_weights(counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """SimiS weights from class counts (specs/dhc.md §9 "simis").

    ``pi_c = N_c / sum_k N_k``,  ``w_c = C (max_k pi_k - pi_c)``.

    The most frequent class gets exactly 0; every weight lies in ``[0, C)``. Equal counts give ``w = 0`` for every
    class (well defined, unlike DistDW's 0/0). Example: ``N = [6, 3, 1]`` -> ``pi = [.6, .3, .1]`` ->
    ``w = 3 [0, .3, .5] = [0, .9, 1.5]``.

    Args:
        counts: ``[C]`` non-negative class counts ``N`` (C >= 2).

    Returns:
        ``[C]`` float64 weights.

    Raises:
        ValueError: counts not a 1-D vector of >= 2 finite values >= 0, or all zero (frequencies undefined).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or not bool(torch.isfinite(counts).all()) or bool((counts < 0).any()):
        raise ValueError(f"simis_weights: counts must be a 1-D vector of >= 2 finite counts >= 0, "
                         f"got {counts.tolist()}")
    total = counts.sum()
    if total <= 0:
        raise ValueError("simis_weights: all class counts are 0; class frequencies undefined")
    freq = counts / total
    return counts.numel() * (freq.max() - freq)


class SimiSWeighting(nn.Module):
    """SimiS per-branch class weights with an EMA (specs/dhc.md §9 "simis"); one instance per branch.

    * Start: ``w = C 1`` (constructor). :meth:`init_weights` with the labelled ground-truth histogram then applies
      one EMA step towards its SimiS weights, ``w_0 = m C 1 + (1 - m) simis_weights(N_GT)``; this is what the
      spec's "init ~ C 1" means (with ``m = 0.99`` every ``w_0,c`` lies in ``[0.99 C, C]``). Calling it is
      optional: without it the EMA starts from exactly ``C 1``; the two differ by at most ``(1 - m) C``.
    * ``update(z)`` each iteration, *before* the losses (the weights used at iteration t already include batch t):
      ``N_c`` = number of voxels of the branch's logits ``z`` ``[N, C, *spatial]`` (all ``N = L + U`` patches of
      the batch, summed over ranks) whose arg-max is ``c``; ``w <- m w + (1 - m) simis_weights(N)``.

    The batch's most frequent predicted class (usually background) contributes 0 each step, so its weight decays
    towards 0 (``C m^t`` if it stays the most frequent). With ``m < 1`` the weights never become all zero; with
    ``m = 0`` and a batch whose arg-max is a single class, they do (the weighted CE guards that 0/0 case,
    :func:`common.losses.weighted_ce_dice.weighted_cross_entropy`).

    Args:
        num_classes: C, including background.
        momentum: EMA momentum ``m`` (0.99 in the DHC baseline).
    """

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"SimiSWeighting: num_classes must be an int >= 2, got {num_classes!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"SimiSWeighting: momentum must lie in [0, 1], got {momentum}")
        self.num_classes = num_classes
        self.momentum = float(momentum)
        self.register_buffer("weights", torch.full((num_classes,), float(num_classes)))

    def _counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        counts = torch.as_tensor(counts, dtype=torch.float64).detach().cpu()
        if counts.shape != (self.num_classes,):
            raise ValueError(f"SimiSWeighting: counts must have shape ({self.num_classes},), "
                             f"got {tuple(counts.shape)}")
        return counts

    def _step(self, start: torch.Tensor, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        current = simis_weights(self._counts(counts)).to(self.weights)
        self.weights.copy_(self.momentum * start + (1.0 - self.momentum) * current)
        return self.get_weights()

    @torch.no_grad()
    def init_weights(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Reset to ``w = m C 1 + (1 - m) simis_weights(counts)`` (labelled GT histogram, e.g. from
        :func:`common.losses.debiased_weighting.class_counts`); returns a copy ``[C]``. Idempotent."""
        start = torch.full_like(self.weights, float(self.num_classes))
        return self._step(start, counts)

    @torch.no_grad()
    def update_counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """One EMA step ``w <- m w + (1 - m) simis_weights(counts)``; returns a copy of the new ``w`` ``[C]``."""
        return self._step(self.weights.clone(), counts)

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """EMA step from this branch's logits on the whole batch.

        Args:
            logits: ``[N, C, *spatial]`` (labelled and unlabelled patches); ``N_c`` = number of voxels whose
                arg-max class is ``c``, summed over ranks when distributed.

        Returns:
            copy of the new weights ``[C]`` (float32, on the buffer's device).

        Raises:
            ValueError: wrong shape, or no voxels.
        """
        return self.update_counts(argmax_counts(logits, self.num_classes, "SimiSWeighting"))

    def get_weights(self) -> torch.Tensor:
        """Current weights ``[C]`` (a detached copy)."""
        return self.weights.detach().clone()
