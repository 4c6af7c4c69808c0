"""CLD's class-confidence bank, category sampling rates and sampled pseudo-label CE, for DHC's CLD baseline.

Lin, Yao, Li, Zheng & Li, "Calibrating Label Distribution for Class-Imbalanced Barely-Supervised Knee
Segmentation" (CLD), MICCAI 2022, LNCS 13438 (arXiv 2205.03644); used as the "cld" baseline of Wang & Li, "DHC",
MICCAI 2023 (specs/dhc.md §9, row "cld"). CLD is cross pseudo supervision (two networks) with three additions:

1. **label quantity distribution** — a static class weight from the labelled ground-truth histogram ``N``,
   ``w_c = (max_k N_k / N_c)^{1/3}`` (:func:`label_quantity_weights`), in the supervised CE + Dice and the
   pseudo-label CE;
2. **label position distribution** — a cropping probability mask built from where the labels lie, so that more
   training sub-volumes are cropped around the (small) cartilages, for labelled and unlabelled volumes alike.
   DHC's version has **no** such crop (it uses DHC's uniform random crop); nothing of it is here. (CLD has no
   copy-paste augmentation.)
3. **dual uncertainty-aware sampling supervision** — per branch, a confidence bank of the mean softmax of the
   ground-truth class on the labelled voxels (:class:`ConfidenceBank`), turned into sampling rates
   (:func:`sampling_rates`); a random voxel mask keeps the voxels the branch predicts as ``c`` with probability
   ``s_c`` (:func:`sampling_mask`), so classes the branch is unsure of keep more pseudo-labelled voxels::

       conf_c ← mean over window voxels with y = c of p_c          (every ``period`` iterations, EMA m)
       s_c    = ((1 − conf_c) / (max_k (1 − conf_k) + 1e-12))^γ    (γ = 0.5)
       keep_i = [u_i > 1 − s_{ŷ_i}],   u_i ~ U[0, 1),  ŷ = the branch's own arg-max
       L_cps  = (1 / V) Σ_i keep_i w_{y_i} CE(z_i, y_i)             (y = the other branch's arg-max; V all voxels)

Bank details (as the original): the sums ``Σ p_{i,y_i}`` and counts per ground-truth class are accumulated over
``period`` iterations (DHC 8, CLD 2); at the end of a window ``new_c = sum_c / (count_c + 1e-12)`` — **a class with
no labelled voxel in the window gets 0** — and the bank is set to ``new`` at the first refresh, then
``conf ← m conf + (1 − m) new`` (``m = 0.999``). Deviation: the original starts the bank from ``U(0, 1)`` random
values (branch B a copy of A's), used only until the first refresh; here it starts at 0, i.e. ``s = 1`` for every
class (all voxels kept, plain CPS) until then. On several ranks the window sums and counts are summed over the
ranks at each refresh.

Class weight: specs/dhc.md §9 reports that DHC's ``train_cld.py`` calls a missing ``dataset.weight()``; the
released script (both versions in the repository's history) in fact defines it in a dataset subclass, as
``w_c = (max_k N_k / N_c)^{1/3}`` of the labelled volumes (item 1), so DHC's CLD ran with those weights (a class
absent from the labelled volumes would get an infinite weight there; :func:`label_quantity_weights` refuses it).
The weight is an argument of the method: ``w ≡ 1`` by default, :func:`label_quantity_weights` of the labelled
histogram for DHC's/CLD's rule.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from common.losses.debiased_pseudo_labels import masked_cross_entropy
from common.losses.debiased_weighting import class_counts
from common.losses.weighted_ce_dice import check_logits, label_map
from common.utils.distributed import all_reduce_sum

logger = logging.getLogger(__name__)

__all__ = ["ConfidenceBank", "label_quantity_weights", "sampled_cross_entropy", "sampling_mask", "sampling_rates"]


def label_quantity_weights(counts: torch.Tensor | Sequence[float], power: float = 1.0 / 3.0) -> torch.Tensor:
    """CLD's static class weights ``w_c = (max_k N_k / N_c)^power`` from the labelled class histogram ``N``.

    Example: ``N = [1000, 125, 8]`` -> ratios ``[1, 8, 125]`` -> ``w = [1, 2, 5]`` (power 1/3).

    A class with no labelled voxel (DHC's code gives it an infinite weight) gets the largest weight of the present
    classes, as rare as the rarest one seen, and a warning is logged.

    Args:
        counts: ``[C]`` voxel counts of the labelled ground truth, at least one class present.
        power: exponent (1/3 in CLD), >= 0.

    Returns:
        ``[C]`` float32 weights, the most frequent class 1.

    Raises:
        ValueError: not a 1-D vector of >= 2 finite values >= 0, no class present, or ``power < 0``.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or not bool(torch.isfinite(counts).all()):
        raise ValueError(f"label_quantity_weights: counts must be a 1-D vector of >= 2 finite counts, "
                         f"got {counts.tolist()}")
    if bool((counts < 0).any()) or not bool((counts > 0).any()):
        raise ValueError(f"label_quantity_weights: counts must be >= 0 with at least one class present, "
                         f"got {counts.tolist()}")
    if power < 0:
        raise ValueError(f"label_quantity_weights: power must be >= 0, got {power}")
    present = counts > 0
    if not bool(present.all()):
        logger.warning("label_quantity_weights: classes %s have no labelled voxel; they get the rarest present "
                       "class's weight", torch.nonzero(~present).flatten().tolist())
    rarest = counts[present].min()
    return (counts.max() / torch.where(present, counts, rarest)).pow(power).float()


class ConfidenceBank(nn.Module):
    """Per-class mean confidence of one branch on its labelled voxels (module docstring, item 3).

    Buffers: ``confidence`` ``[C]`` float32 (start 0), ``conf_sum`` / ``conf_count`` ``[C]`` float64 (the open
    window), ``step`` int64 (calls of :meth:`update`).

    Args:
        num_classes: C, including background.
        momentum: EMA momentum ``m`` in [0, 1] (0.999).
        period: iterations per refresh, >= 1 (DHC 8).
    """

    def __init__(self, num_classes: int, momentum: float = 0.999, period: int = 8) -> None:
        super().__init__()
        for name, value, low in (("num_classes", num_classes, 2), ("period", period, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"ConfidenceBank: {name} must be an int >= {low}, got {value!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ConfidenceBank: momentum must lie in [0, 1], got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.period = period
        self.register_buffer("confidence", torch.zeros(num_classes))
        self.register_buffer("conf_sum", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("conf_count", torch.zeros(num_classes, dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def update(self, probs: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Add one iteration's labelled voxels to the window; refresh the bank every ``period`` calls.

        Args:
            probs: the branch's softmax on the labelled patches ``[L, C, *spatial]``.
            label: ground truth ``[L, 1, *spatial]`` or ``[L, *spatial]``, class indices in ``[0, C)``.

        Returns:
            a copy of the bank ``[C]`` to use in this iteration.
        """
        if probs.ndim < 3 or probs.shape[1] != self.num_classes or probs.shape[0] < 1:
            raise ValueError(f"ConfidenceBank.update: probabilities must be [L >= 1, {self.num_classes}, *spatial], "
                             f"got {tuple(probs.shape)}")
        label = label_map(label, probs, "ConfidenceBank.update")
        gt_prob = probs.detach().double().gather(1, label.unsqueeze(1)).flatten()
        self.conf_sum += torch.bincount(label.flatten(), weights=gt_prob, minlength=self.num_classes)
        self.conf_count += class_counts(label, self.num_classes).to(self.conf_count.device)
        self.step += 1
        if int(self.step) % self.period == 0:
            new = (all_reduce_sum(self.conf_sum) / (all_reduce_sum(self.conf_count) + 1e-12)).float()
            if int(self.step) == self.period:
                self.confidence.copy_(new)
            else:
                self.confidence.mul_(self.momentum).add_((1.0 - self.momentum) * new)
            self.conf_sum.zero_()
            self.conf_count.zero_()
        return self.get_confidence()

    def get_confidence(self) -> torch.Tensor:
        """Current bank ``[C]`` (a detached copy)."""
        return self.confidence.detach().clone()


def sampling_rates(confidence: torch.Tensor, gamma: float = 0.5) -> torch.Tensor:
    """``s_c = ((1 − conf_c) / (max_k (1 − conf_k) + 1e-12))^γ``: 1 for the least confident class.

    Args:
        confidence: ``[C]`` bank values in [0, 1].
        gamma: exponent γ >= 0 (0.5).

    Returns:
        ``[C]`` rates in [0, 1] (float32).
    """
    confidence = torch.as_tensor(confidence).float()
    if confidence.ndim != 1 or confidence.numel() < 2:
        raise ValueError(f"sampling_rates: confidence must be a [C] vector with C >= 2, "
                         f"got shape {tuple(confidence.shape)}")
    if gamma < 0:
        raise ValueError(f"sampling_rates: gamma must be >= 0, got {gamma}")
    doubt = 1.0 - confidence
    return (doubt / (doubt.max() + 1e-12)).pow(gamma)


def sampling_mask(probs: torch.Tensor, rates: torch.Tensor, uniform: torch.Tensor | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Random voxel mask keeping a voxel predicted as ``c`` with probability ``s_c``: ``[u_i > 1 − s_{ŷ_i}]``.

    Args:
        probs: the branch's softmax or logits ``[N, C, *spatial]`` (only the arg-max ``ŷ`` is used).
        rates: ``[C]`` sampling rates (:func:`sampling_rates`).
        uniform: optional draws ``u`` ``[N, *spatial]`` in [0, 1); by default ``torch.rand`` (with ``generator``).
        generator: random generator of the default draws.

    Returns:
        bool ``[N, *spatial]``.
    """
    if probs.ndim < 3 or probs.shape[1] < 2:
        raise ValueError(f"sampling_mask: probs must be [N, C, *spatial] with C >= 2, got {tuple(probs.shape)}")
    rates = torch.as_tensor(rates, device=probs.device).float()
    if rates.shape != (probs.shape[1],):
        raise ValueError(f"sampling_mask: rates must be [{probs.shape[1]}], got {tuple(rates.shape)}")
    shape = (probs.shape[0], *probs.shape[2:])
    if uniform is None:
        uniform = torch.rand(shape, generator=generator, device=probs.device)
    elif tuple(uniform.shape) != shape:
        raise ValueError(f"sampling_mask: uniform must be {shape}, got {tuple(uniform.shape)}")
    return uniform.to(probs.device) > 1.0 - rates[probs.detach().argmax(dim=1)]


def sampled_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
                          class_weight: torch.Tensor) -> torch.Tensor:
    """``(1 / V) Σ_i keep_i w_{y_i} CE(z_i, y_i)``: DHC/CLD's ``WeightedCrossEntropyLoss`` with a voxel map (the
    class-weighted CE is *not* normalised by the weights; ``V`` = all voxels of all samples).

    Args:
        logits: ``[N, C, *spatial]``.
        labels: pseudo labels ``[N, *spatial]`` or ``[N, 1, *spatial]``.
        keep: ``[N, *spatial]`` bool / 0-1 voxel mask.
        class_weight: ``[C]`` non-negative weights ``w``.

    Returns:
        scalar.
    """
    check_logits(logits, "sampled_cross_entropy")
    weight = torch.as_tensor(class_weight, device=logits.device).float()
    if weight.shape != (logits.shape[1],) or not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError(f"sampled_cross_entropy: class_weight must be [{logits.shape[1]}] finite values >= 0, "
                         f"got {weight.tolist()}")
    labels = label_map(labels, logits, "sampled_cross_entropy")
    if keep.shape != labels.shape:
        raise ValueError(f"sampled_cross_entropy: keep {tuple(keep.shape)} must be {tuple(labels.shape)}, the "
                         f"shape of the labels")
    voxel_weight = keep.detach().float() * weight[labels]
    return masked_cross_entropy(logits, labels, voxel_weight, normalise="all")
