"""Class-wise confidence array, Gompertz fuzzy-rank fusion and class-wise voxel sampling of the "Basak et al." baseline.

Basak, Ghosal & Sarkar, "Addressing Class Imbalance in Semi-supervised Image Segmentation: A Study on Cardiac MRI",
MICCAI 2022 (arXiv 2209.00123): a confidence array records per-class scores of the student on the labelled data, a
fuzzy rank-based fusion with the Gompertz function (Kundu, Basak, Singh, Ahmadian, Ferrara & Sarkar, "Fuzzy
rank-based fusion of CNN models using Gompertz function for screening COVID-19 CT-scans", Scientific Reports 11,
14133, 2021) turns the three scores into one class confidence ``CC``, under-performing classes are sampled more
often in the unlabelled loss ("class-wise sampling") and every sampled voxel is weighted by its confidence
("dynamic stabilisation"). Used as the "acisis" baseline of Wang & Li, "DHC", MICCAI 2023 (specs/dhc.md §9); the
formulas below are those of that baseline (the code behind DHC's "Basak et al." table rows), with the two
corrections listed at the end.

Notation: C classes incl. background, ``p = softmax(z)`` of the student, ``y`` the ground truth, ``V_c`` the
labelled voxels with ``y_i = c`` in one iteration (pooled over the batch and, in a distributed run, the ranks).

1. Scores of one iteration (:func:`class_score_sums`; ``M = 3`` rows, a class absent from ``y`` scores 0)::

       entropy_c    = (1/|V_c|) Σ_{i∈V_c} p_{i,c} Σ_k ln(p_{i,k} + 1e-12)   (≤ 0: p_c-weighted sum of log-probs)
       confidence_c = (1/|V_c|) Σ_{i∈V_c} p_{i,c}                           (mean probability of the true class)
       variance_c   = (1/|V_c|) Σ_{i∈V_c} (max_k p_{i,k} − p_{i,c})         (gap to the winning class)

   The names are the baseline's; the "entropy" is not Shannon's ``−Σ_k p_k ln p_k`` and the "variance" is a
   probability gap (no Monte-Carlo passes), as in the DHC baseline. The three do not point the same way (a
   well-learnt class has a low entropy score and gap but a high confidence); the fusion treats them alike.
2. The per-iteration scores are summed over ``T`` iterations (one epoch in the baseline); at the ``T``-th the
   mean ``A = sum / T`` ``[3, C]`` is normalised over the classes, ``S_j = softmax_c(A_j)``.
3. Gompertz fuzzy rank of each normalised score, ``R_{j,c} = 1 − exp(−exp(−2 S_{j,c}))`` (decreasing in ``S``;
   ``R(0) = 1 − e^{-1} ≈ 0.632``, ``R(1) ≈ 0.127``). In each row the ``k`` classes with the smallest ``R`` (the
   largest ``S``; ties with the ``k``-th value kept too) keep ``R`` and ``S``; the others get the rank penalty
   ``P_R = 0.632`` and the score penalty ``P_S = 0`` (:func:`fuzzy_rank_scores`)::

       FR_c  = Σ_j K_{j,c},   K_{j,c} = R_{j,c} if kept else P_R        (fused rank sum)
       CCF_c = 1 − (1/M) Σ_j S_{j,c} [kept]                              (complement of the confidence factor)
       CC_cur = FR ⊙ CCF / max_c (FR ⊙ CCF)                              (in (0, 1]; the largest class gets 1)

4. ``CC ← μ CC + (1 − μ) CC_cur`` (``μ = 0.99``, ``CC`` starts at 0), then the sampling rates
   ``s_c = ((1 − CC_c) / (max_k (1 − CC_k) + 1e-12)) ^ γ`` (``γ = 2.5``; rates start at 1, and the class with the
   smallest ``CC`` gets 1) — CLD's rate formula with another exponent
   (:func:`common.losses.cld_sampling.sampling_rates`). A large fused score means a large rank sum, i.e. small
   normalised scores, so those classes are sampled *least*.
5. Sampling mask on the unlabelled patches from the student's own prediction ``ŷ_i = argmax_c p_{i,c}`` and
   ``q_i = max_c p_{i,c}`` with ``u_i ~ U[0, 1)``: ``m_i = [u_i > 1 − s_{ŷ_i}] · q_i ^ β`` (``β = 1.5``), so a voxel
   predicted as ``c`` is kept with probability ``s_c`` (CLD's mask, :func:`common.losses.cld_sampling.sampling_mask`)
   and weighted by its confidence (:func:`stabilised_sampling_mask`).

Tensor shapes: logits ``[B, C, *spatial]``, labels ``[B, *spatial]`` or ``[B, 1, *spatial]``, scores ``[3, C]``,
``CC`` and rates ``[C]``, mask ``[B, *spatial]``.

Corrections to the DHC baseline's code (model card): (a) there the three scores multiply the probabilities of
labelled patch ``b`` with the class mask of every patch ``b'`` (a broadcasting slip, ``[B, 1, ...]`` against
``[B, ...]``), which mixes the patches of a batch of 2; here every voxel is paired with its own label;
(b) there ``k ≥ C`` fails (``numpy.partition`` out of range; DHC only ran C = 14 and 16 with ``k = 12``); here
``k`` is capped at C, i.e. nothing is penalised. In a ``torch.distributed`` run the per-class sums and voxel counts
are summed over the ranks before the means, so every rank holds the same ``CC``.

:class:`ConfidenceArray` holds the state in buffers (``state_dict`` restores a run mid-window).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.losses.cld_sampling import sampling_mask, sampling_rates
from common.losses.weighted_ce_dice import check_logits, label_map
from common.utils.distributed import all_reduce_sum

__all__ = [
    "SCORE_NAMES",
    "ConfidenceArray",
    "class_confidence",
    "class_score_sums",
    "fuzzy_rank_scores",
    "gompertz_rank",
    "stabilised_sampling_mask",
]

SCORE_NAMES = ("entropy", "confidence", "variance")
"""Rows of the score arrays, in order."""

LOG_EPS = 1e-12  # inside the logarithm of the entropy score
COUNT_EPS = 1e-12  # added to the voxel counts |V_c| (an absent class scores 0)


def gompertz_rank(scores: torch.Tensor) -> torch.Tensor:
    """Gompertz fuzzy rank ``R = 1 − exp(−exp(−2 x))`` element-wise (Kundu et al. 2021); decreasing in ``x``."""
    return 1.0 - torch.exp(-torch.exp(-2.0 * scores))


@torch.no_grad()
def class_score_sums(logits: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of the three voxel scores (module docstring, step 1) and the voxel counts ``|V_c|``.

    Args:
        logits: ``[B, C, *spatial]`` student logits on the labelled patches (detached; cast to float32).
        label: ``[B, 1, *spatial]`` or ``[B, *spatial]`` class indices.

    Returns:
        ``(sums [3, C], counts [C])``, float32, rows in :data:`SCORE_NAMES` order; divide for the class means.
    """
    num_classes = check_logits(logits, "class_score_sums")
    labels = label_map(label, logits, "class_score_sums").reshape(-1)
    probs = torch.softmax(logits.detach().float(), dim=1).movedim(1, -1).reshape(-1, num_classes)
    true_prob = probs.gather(1, labels[:, None])[:, 0]
    voxel_scores = torch.stack([true_prob * torch.log(probs + LOG_EPS).sum(dim=1),
                                true_prob,
                                probs.max(dim=1).values - true_prob])
    sums = torch.zeros(len(SCORE_NAMES), num_classes, device=probs.device).index_add_(1, labels, voxel_scores)
    counts = torch.bincount(labels, minlength=num_classes).float()
    return sums, counts


def fuzzy_rank_scores(scores: torch.Tensor, top_k: int, penalty: float = 0.632) -> torch.Tensor:
    """Fused score ``FR ⊙ CCF`` of ``M`` normalised score rows (module docstring, step 3; Kundu et al. 2021).

    Args:
        scores: ``[M, C]`` normalised scores ``S`` (one row per metric).
        top_k: classes kept per row (capped at C); the rest get ``penalty`` as rank and 0 as score.
        penalty: rank penalty ``P_R`` in (0, 1] (0.632 = ``R(0)``, rounded).

    Returns:
        ``[C]`` fused scores (lower = better ranked).
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"fuzzy_rank_scores: scores must be [M, C] with C >= 2, got {tuple(scores.shape)}")
    if top_k < 1:
        raise ValueError(f"fuzzy_rank_scores: top_k must be >= 1, got {top_k}")
    if not 0.0 < penalty <= 1.0:
        raise ValueError(f"fuzzy_rank_scores: penalty must lie in (0, 1], got {penalty}")
    ranks = gompertz_rank(scores)
    kth = ranks.kthvalue(min(top_k, scores.shape[1]), dim=1, keepdim=True).values
    kept = ranks <= kth
    fused_rank = torch.where(kept, ranks, torch.full_like(ranks, penalty)).sum(dim=0)
    complement = 1.0 - torch.where(kept, scores, torch.zeros_like(scores)).sum(dim=0) / scores.shape[0]
    return fused_rank * complement


def class_confidence(mean_scores: torch.Tensor, top_k: int, penalty: float = 0.632) -> torch.Tensor:
    """``CC_cur = F / max F`` with ``F = fuzzy_rank_scores(softmax_c(mean_scores))`` (module docstring, steps 2-3).

    Args:
        mean_scores: ``[M, C]`` averaged class scores ``A``.
        top_k, penalty: see :func:`fuzzy_rank_scores`.

    Returns:
        ``[C]`` values in (0, 1].
    """
    fused = fuzzy_rank_scores(torch.softmax(mean_scores.float(), dim=1), top_k, penalty)
    return fused / fused.max()


@torch.no_grad()
def stabilised_sampling_mask(logits: torch.Tensor, rates: torch.Tensor, uniform: torch.Tensor | None = None,
                             confidence_exponent: float = 1.5) -> torch.Tensor:
    """Voxel weights ``m_i = [u_i > 1 − s_{ŷ_i}] · q_i ^ β`` (module docstring, step 5): CLD's class-wise random mask
    (:func:`common.losses.cld_sampling.sampling_mask`) times the confidence weight ``q ^ β``.

    Args:
        logits: ``[B, C, *spatial]`` student logits on the unlabelled patches (detached; cast to float32).
        rates: ``[C]`` sampling rates ``s``.
        uniform: ``[B, *spatial]`` draws ``u`` from U[0, 1); ``torch.rand`` when None.
        confidence_exponent: ``β`` >= 0 (1.5).

    Returns:
        ``[B, *spatial]`` float32 weights in [0, 1].
    """
    if not confidence_exponent >= 0:
        raise ValueError(f"stabilised_sampling_mask: confidence_exponent must be >= 0, got {confidence_exponent}")
    kept = sampling_mask(logits, rates, uniform)
    confidence = torch.softmax(logits.detach().float(), dim=1).max(dim=1).values
    return kept.float() * confidence ** confidence_exponent


class ConfidenceArray(nn.Module):
    """Confidence array, class confidence and sampling rates over refresh windows (module docstring).

    Buffers: ``score_sums`` ``[3, C]`` (sum of the per-iteration class means of the current window),
    ``iterations`` (iterations in the window), ``class_conf`` ``[C]`` (``CC``, starts at 0) and ``rates`` ``[C]``
    (start at 1). :meth:`update` once per iteration records the labelled scores and, when the window holds
    ``refresh_iters`` iterations, refreshes ``CC`` and the rates and empties the window (the refreshed rates are
    already used for that iteration's mask, as in the baseline).

    Args:
        num_classes: C, including background.
        refresh_iters: window length ``T`` (the baseline: the iterations of one epoch, ``⌈#U / batch⌉``).
        momentum: EMA momentum ``μ`` of ``CC`` in [0, 1] (0.99).
        top_k: classes kept per score row in the fusion (12; capped at C).
        penalty: rank penalty ``P_R`` (0.632).
        rate_exponent: ``γ`` (2.5).
        confidence_exponent: ``β`` (1.5).
    """

    def __init__(self, num_classes: int, refresh_iters: int, momentum: float = 0.99, top_k: int = 12,
                 penalty: float = 0.632, rate_exponent: float = 2.5, confidence_exponent: float = 1.5) -> None:
        super().__init__()
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"ConfidenceArray: num_classes must be an int >= 2, got {num_classes!r}")
        if refresh_iters < 1:
            raise ValueError(f"ConfidenceArray: refresh_iters must be >= 1, got {refresh_iters}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"ConfidenceArray: momentum must lie in [0, 1], got {momentum}")
        if top_k < 1:
            raise ValueError(f"ConfidenceArray: top_k must be >= 1, got {top_k}")
        if not 0.0 < penalty <= 1.0:
            raise ValueError(f"ConfidenceArray: penalty must lie in (0, 1], got {penalty}")
        if not (rate_exponent >= 0 and confidence_exponent >= 0 and math.isfinite(rate_exponent + confidence_exponent)):
            raise ValueError(f"ConfidenceArray: need rate_exponent >= 0 and confidence_exponent >= 0, got "
                             f"{rate_exponent} and {confidence_exponent}")
        self.num_classes, self.refresh_iters, self.momentum = num_classes, refresh_iters, float(momentum)
        self.top_k, self.penalty = top_k, float(penalty)
        self.rate_exponent, self.confidence_exponent = float(rate_exponent), float(confidence_exponent)
        self.register_buffer("score_sums", torch.zeros(len(SCORE_NAMES), num_classes))
        self.register_buffer("iterations", torch.tensor(0, dtype=torch.long))
        self.register_buffer("class_conf", torch.zeros(num_classes))
        self.register_buffer("rates", torch.ones(num_classes))

    @torch.no_grad()
    def record(self, logits: torch.Tensor, label: torch.Tensor) -> None:
        """Add this iteration's class means (sums and counts pooled over the ranks) to the window."""
        if logits.shape[1] != self.num_classes:
            raise ValueError(f"ConfidenceArray: logits have {logits.shape[1]} channels, expected "
                             f"num_classes={self.num_classes}")
        sums, counts = class_score_sums(logits, label)
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
        self.score_sums += (sums / (counts + COUNT_EPS)).to(self.score_sums)
        self.iterations += 1

    @torch.no_grad()
    def refresh(self) -> torch.Tensor:
        """``CC ← μ CC + (1 − μ) class_confidence(score_sums / iterations)``, new rates, empty window; returns
        a copy of the rates ``[C]``."""
        if int(self.iterations) == 0:
            raise RuntimeError("ConfidenceArray.refresh: no iteration recorded since the last refresh")
        current = class_confidence(self.score_sums / self.iterations, self.top_k, self.penalty)
        self.class_conf.copy_(self.momentum * self.class_conf + (1.0 - self.momentum) * current)
        self.rates.copy_(sampling_rates(self.class_conf, self.rate_exponent))
        self.score_sums.zero_()
        self.iterations.zero_()
        return self.rates.clone()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """:meth:`record`, then :meth:`refresh` when the window is full; returns a copy of the rates ``[C]``.

        Args:
            logits: ``[B, C, *spatial]`` student logits on the labelled patches.
            label: their class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``.
        """
        self.record(logits, label)
        if int(self.iterations) >= self.refresh_iters:
            return self.refresh()
        return self.rates.clone()

    @torch.no_grad()
    def sampling_mask(self, logits: torch.Tensor, uniform: torch.Tensor | None = None) -> torch.Tensor:
        """:func:`stabilised_sampling_mask` with the current rates; ``uniform`` defaults to ``torch.rand``."""
        return stabilised_sampling_mask(logits, self.rates, uniform, self.confidence_exponent)
