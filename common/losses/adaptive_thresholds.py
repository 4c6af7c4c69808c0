"""Adsh class-adaptive confidence thresholds and the logit-masking CE of DHC's Adsh baseline.

Guo & Li, "Class-Imbalanced Semi-Supervised Learning with Adaptive Thresholding" (Adsh), ICML 2022, PMLR 162;
used as the "adsh" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for
Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9, row "adsh").

**Adsh as published** (Algorithm 1, FixMatch image classifier; as in the authors' release). Once per epoch
(from the third epoch on) the model, in eval mode, predicts every unlabelled image; ``S_k`` is the list of
confidences ``max_j p_j`` of the images predicted as ``k``, sorted in descending order, ``N_k = |S_k|``. With ``k = 1``
the majority class of the (long-tailed) data set and ``τ_1 = 0.95`` fixed::

    ρ   = |{s ∈ S_1 : s ≥ τ_1}| / N_1                 (share of confident majority-class predictions; 1 if none)
    τ_k = min(τ_1, S_k[max(0, round(ρ N_k − 1))])     (0-based index; k ≥ 2; classes never predicted keep τ_k)

so every class selects about the same share ρ of its predictions as the majority class does with the fixed
threshold. The weak view's pseudo label ``argmax p`` trains the strong view where ``max p`` passes
``τ_{argmax p}``; every ``τ_k = τ_1`` (plain FixMatch) before the first estimate.

**DHC's segmentation version** (implemented here). Per branch, the softmax maps ``p`` ``[U, C, d, h, w]`` of the
unlabelled patches are collected over a window of iterations; at its end (every ``period`` iterations)::

    N_c = #{voxels with argmax_j p_j = c}                    (window, all unlabelled patches)
    k*  = argmax_c N_c                                      (the class with most predicted voxels; first on ties)
    ρ   = (#{voxels with p_{k*} > t} + 1e-8) / (N_{k*} + 1e-8),   t = 0.9
    r_c = min(⌊ρ N_c⌋, V − 1)                               (V = voxels in the window)
    τ_c = the value at 0-based rank r_c of the *class-c probabilities of all V voxels*, sorted descending

and each patch's voxel ``i`` gets a per-class mask ``m_{i,c} = [p_{i,c} > τ_c]`` (``[N, C, d, h, w]``) from the
branch that *provides* the pseudo label. The masks **multiply the logits** of the branch being trained before a
plain CE averaged over all voxels (DHC's ``ClassDependent_WeightedCrossEntropyLoss``)::

    L = (1 / V) Σ_i [ log Σ_c exp(m_{i,c} z_{i,c}) − m_{i,y_i} z_{i,y_i} ],   y = argmax of the other branch

so a masked channel's logit becomes 0 (not −∞): a voxel with every channel masked adds the constant ``ln C`` and no
gradient; a voxel whose pseudo-label channel is masked while others are kept pushes the kept logits down.

How DHC differs from the paper (all kept here, as they produced DHC's reported Adsh numbers):
(1) the majority class is re-chosen at every estimate (most predicted voxels), and its threshold is re-estimated
too (no fixed ``τ_1``); (2) ``t = 0.9``, strict ``>``; (3) ranks are taken over class ``c``'s probability at *every*
voxel, not only over the voxels predicted as ``c``, at 0-based rank ``⌊ρ N_c⌋``, with no ``min(τ_1, ·)`` cap;
(4) thresholds start at 0 (every channel kept: plain CPS until the first estimate), not at ``τ_1``; (5) estimates
come from the training forward passes of a window of recent iterations (train mode, dropout on), not from an
eval-mode pass over the unlabelled set; (6) per-class channel masks multiply the logits instead of a per-voxel
mask on the loss; all voxels of all patches (labelled too) enter the CE.

Window and memory: DHC stores ``#U // 4`` full softmax maps (``#U//4 × C × patch`` floats, ~235 MB for Synapse
20 %, ~3.3 GB for AMOS) and estimates when that buffer is full — it counts *patches* (2 per iteration) and skips
storing on the estimating iteration, so Synapse 20 % (``#U = 16``, 4 slots) re-estimates every 3rd iteration from
the 4 patches of the 2 iterations before it; when ``#U // 4`` is odd (Synapse 40 %, AMOS 2 % and 5 %) one slot is
never written and enters every estimate as a patch of zeros, counted as background (not reproduced). Here
``period`` counts *iterations* (:func:`adsh_period` gives ``max(#U // 4, 1)``) and the window includes the
estimating iteration. Instead of the maps, the window keeps

* ``predicted_counts`` ``[C]`` (``N_c``) and ``confident_counts`` ``[C]`` (``#{p_c > t}``, so ``ρ`` can be formed for
  whichever class turns out to be ``k*``), and
* ``histogram`` ``[C, B]``: for every class the counts of ``p_c`` in ``B`` equal bins, bin ``b = min(⌊p B⌋, B − 1)``;

``τ_c`` is the lower edge ``b*/B`` of the bin holding rank ``r_c`` (``b*`` = the highest bin whose count of values
in bins ``≥ b*`` exceeds ``r_c``). This differs from the exact order statistic by less than ``1/B`` (1e-4 with the
default ``B = 10⁴``) and keeps the rank-``r_c`` voxel's bin (DHC's strict ``>`` drops the voxel itself). Memory is
``C (B + 2)`` int64 per branch whatever the window. On several ranks the window counts are summed over the ranks at
each estimate, so every rank gets the same thresholds.

Every state (thresholds, window, iteration counter) is a buffer: ``state_dict`` restores it, a resumed run
continues the window where it stopped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.losses.weighted_ce_dice import check_logits, label_map
from common.utils.distributed import all_reduce_sum

__all__ = ["AdaptiveThresholds", "adsh_period", "logit_masked_cross_entropy"]


def adsh_period(num_unlabelled: int) -> int:
    """``max(#U // 4, 1)``: iterations between two threshold estimates (DHC's buffer of ``#U // 4`` patches,
    counted here in iterations; module docstring).

    Raises:
        ValueError: ``num_unlabelled < 1``.
    """
    if isinstance(num_unlabelled, bool) or not isinstance(num_unlabelled, int) or num_unlabelled < 1:
        raise ValueError(f"adsh_period: num_unlabelled must be an int >= 1, got {num_unlabelled!r}")
    return max(num_unlabelled // 4, 1)


class AdaptiveThresholds(nn.Module):
    """DHC/Adsh per-class thresholds of one branch, re-estimated every ``period`` iterations (module docstring).

    * :meth:`update` ``(p_u)`` once per iteration with the branch's softmax on the unlabelled patches: adds them to
      the window; on every ``period``-th call estimates ``τ`` from the window (summed over ranks) and empties it.
    * :meth:`mask` ``(p)``: ``[p_{i,c} > τ_c]`` as float ``[N, C, *spatial]``.

    Buffers: ``thresholds`` ``[C]`` float32 (start 0), ``predicted_counts`` / ``confident_counts`` ``[C]`` int64,
    ``histogram`` ``[C, bins]`` int64, ``step`` int64 (calls of :meth:`update`).

    Args:
        num_classes: C, including background.
        period: iterations per window (DHC: :func:`adsh_period` of the number of unlabelled cases).
        major_threshold: ``t`` of ``ρ``, in (0, 1) (DHC 0.9).
        bins: histogram bins ``B`` on [0, 1] (resolution of ``τ``), >= 2.
    """

    def __init__(self, num_classes: int, period: int, major_threshold: float = 0.9, bins: int = 10000) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("period", period, 1), ("bins", bins, 2)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"AdaptiveThresholds: {name} must be an int >= {low}, got {value!r}")
        if not 0.0 < major_threshold < 1.0:
            raise ValueError(f"AdaptiveThresholds: major_threshold must lie in (0, 1), got {major_threshold}")
        self.num_classes = num_classes
        self.period = period
        self.major_threshold = major_threshold
        self.bins = bins
        self.register_buffer("thresholds", torch.zeros(num_classes))
        self.register_buffer("predicted_counts", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("confident_counts", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("histogram", torch.zeros(num_classes, bins, dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def _check(self, probs: torch.Tensor, name: str) -> None:
        if probs.ndim < 3 or probs.shape[1] != self.num_classes or probs.shape[0] < 1:
            raise ValueError(f"AdaptiveThresholds.{name}: probabilities must be [N >= 1, {self.num_classes}, "
                             f"*spatial], got {tuple(probs.shape)}")

    @torch.no_grad()
    def record(self, probs: torch.Tensor) -> None:
        """Add softmax maps ``[U, C, *spatial]`` to the window (no estimate, counter unchanged)."""
        self._check(probs, "record")
        probs = probs.detach().float()
        self.predicted_counts += torch.bincount(probs.argmax(dim=1).flatten(), minlength=self.num_classes)
        self.confident_counts += (probs > self.major_threshold).transpose(0, 1).reshape(self.num_classes, -1).sum(1)
        for c in range(self.num_classes):
            index = (probs[:, c] * self.bins).long().clamp_(0, self.bins - 1).flatten()
            self.histogram[c] += torch.bincount(index, minlength=self.bins)

    @torch.no_grad()
    def estimate(self) -> torch.Tensor:
        """Thresholds from the window (summed over ranks), stored in ``thresholds``; the window is emptied.

        Returns:
            a copy of the new ``τ`` ``[C]``.

        Raises:
            ValueError: the window is empty.
        """
        predicted = all_reduce_sum(self.predicted_counts)
        confident = all_reduce_sum(self.confident_counts)
        histogram = all_reduce_sum(self.histogram)
        voxels = int(predicted.sum())
        if voxels == 0:
            raise ValueError("AdaptiveThresholds.estimate: the window is empty; call record() first")
        major = int(predicted.argmax())
        rho = (float(confident[major]) + 1e-8) / (float(predicted[major]) + 1e-8)
        ranks = torch.floor(rho * predicted.double()).long().clamp_(max=voxels - 1)
        at_or_above = histogram.flip(-1).cumsum(-1).flip(-1)  # [C, B]: values in bins >= b
        top_bin = (at_or_above > ranks[:, None]).sum(-1) - 1
        self.thresholds.copy_(top_bin.to(self.thresholds.dtype) / self.bins)
        self.predicted_counts.zero_()
        self.confident_counts.zero_()
        self.histogram.zero_()
        return self.get_thresholds()

    @torch.no_grad()
    def update(self, probs: torch.Tensor) -> torch.Tensor:
        """One iteration: :meth:`record` ``probs``, count it, :meth:`estimate` when ``step`` reaches a multiple of
        ``period``. Returns a copy of the thresholds to use in this iteration."""
        self.record(probs)
        self.step += 1
        if int(self.step) % self.period == 0:
            return self.estimate()
        return self.get_thresholds()

    @torch.no_grad()
    def mask(self, probs: torch.Tensor) -> torch.Tensor:
        """Per-class channel mask ``[p_{i,c} > τ_c]``, float ``[N, C, *spatial]`` (detached)."""
        self._check(probs, "mask")
        shape = (1, self.num_classes) + (1,) * (probs.ndim - 2)
        return (probs.detach().float() > self.thresholds.view(shape)).float()

    def get_thresholds(self) -> torch.Tensor:
        """Current ``τ`` ``[C]`` (a detached copy)."""
        return self.thresholds.detach().clone()


def logit_masked_cross_entropy(logits: torch.Tensor, target: torch.Tensor, channel_mask: torch.Tensor
                               ) -> torch.Tensor:
    """DHC's ``ClassDependent_WeightedCrossEntropyLoss``: CE of the element-wise masked logits, mean over voxels.

    ``L = (1 / V) Σ_i CE(m_i ⊙ z_i, y_i)``, ``V`` = all voxels of all samples; masked channels become logit 0.

    Args:
        logits: ``[N, C, *spatial]`` (cast to float32).
        target: class indices ``[N, *spatial]`` or ``[N, 1, *spatial]``.
        channel_mask: ``[N, C, *spatial]``, 0/1 (detached).

    Returns:
        scalar.
    """
    check_logits(logits, "logit_masked_cross_entropy")
    if channel_mask.shape != logits.shape:
        raise ValueError(f"logit_masked_cross_entropy: channel_mask {tuple(channel_mask.shape)} must have the "
                         f"shape of logits {tuple(logits.shape)}")
    target = label_map(target, logits, "logit_masked_cross_entropy")
    return F.cross_entropy(logits.float() * channel_mask.detach().float(), target)
