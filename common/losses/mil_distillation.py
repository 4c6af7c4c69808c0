"""EndoKED-MIL losses: teacher bag losses, min-max-normalised merged pseudo labels and the student loss.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging Large
Language and Vision Models" (EndoKED), arXiv 2310.11173, specs/endoked.md §2.4 and §7 rows 2, 4. With bag label
``Y ∈ {0, 1}`` and ``ε = 1e-5``:

* teacher 1 (ABMIL): ``L_T1 = −[Y log(p + ε) + (1 − Y) log(1 − p + ε)]``, ``p = softmax(y¹)[1]``;
* teacher 2 (DSMIL): ``L_T2 = ½ CE(softmax(y²), Y) + ½ BCE(max_i s²_i, Y)`` (the CE of an already softmaxed output
  is the official behaviour);
* pseudo labels: ``ŝ^t_i = clamp((s^t_i − min_t) / (max_t − min_t), ε, 1 − ε)``, ``ỹ_i = Σ_t μ_t ŝ^t_i``, and
  ``ỹ_i = 0`` for the instances of negative bags;
* student: ``L_S = −mean_i[w_n (1 − ỹ_i) log(p_{i,0} + ε) + (1 − w_n) ỹ_i log(p_{i,1} + ε)]``, ``p_i = softmax``
  of the student output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "EPS",
    "abmil_bag_loss",
    "dsmil_bag_loss",
    "minmax_normalise",
    "merge_pseudo_labels",
    "student_distillation_loss",
]

EPS = 1e-5
"""The ``ε`` of all EndoKED-MIL losses and of the pseudo-label clamp."""


def _bag_targets(name: str, bag_probs: torch.Tensor, bag_label: torch.Tensor | float | int) -> torch.Tensor:
    """``bag_label`` as a float ``[B]`` matching ``bag_probs [B, C]``, checked to be 0 or 1."""
    if bag_probs.ndim != 2 or bag_probs.shape[1] < 2:
        raise ValueError(f"{name}: bag_probs must be [B, C >= 2] probabilities, got {tuple(bag_probs.shape)}")
    label = torch.as_tensor(bag_label, device=bag_probs.device).reshape(-1).float()
    if label.numel() != bag_probs.shape[0]:
        raise ValueError(f"{name}: {label.numel()} bag label(s) for {bag_probs.shape[0]} bag output(s)")
    if not bool(((label == 0) | (label == 1)).all()):
        raise ValueError(f"{name}: bag labels must be 0 or 1, got {label.tolist()}")
    return label


def abmil_bag_loss(bag_probs: torch.Tensor, bag_label: torch.Tensor | float | int, eps: float = EPS) -> torch.Tensor:
    """ABMIL teacher loss ``L_T1`` (module docstring), mean over the bags.

    Args:
        bag_probs: ``softmax`` of the bag logits, ``[B, 2]`` (``B`` = 1 per bag in EndoKED).
        bag_label: ``Y``, ``[B]`` (or a scalar).
        eps: ``ε``.

    Returns:
        scalar loss.
    """
    label = _bag_targets("abmil_bag_loss", bag_probs, bag_label)
    p = bag_probs[:, 1].float()
    return -(label * torch.log(p + eps) + (1 - label) * torch.log(1 - p + eps)).mean()


def dsmil_bag_loss(bag_probs: torch.Tensor, instance_scores: torch.Tensor, bag_label: torch.Tensor | float | int,
                   softmax_twice: bool = True) -> torch.Tensor:
    """DSMIL teacher loss ``L_T2 = ½ CE + ½ BCE(max_i s²_i, Y)`` (specs/endoked.md §2.4, §7 row 4).

    Args:
        bag_probs: ``softmax`` of the bag logits ``y²``, ``[B, C]`` (what the official loop passes in).
        instance_scores: ``s²_i = softmax(c_i)[1]``, ``[B, N]`` (one row per bag).
        bag_label: ``Y``, ``[B]`` (or a scalar).
        softmax_twice: faithful (default): ``CE(bag_probs, Y)``, i.e. a second softmax over the probabilities,
            ``−log softmax(p)_Y``. False: the CE of the logits, ``−log p_Y`` (``log_softmax(log p) = log p`` since
            ``Σ p = 1``, so this equals ``CE(y², Y)``), computed here as the NLL of ``log p``.

    Returns:
        scalar loss.
    """
    label = _bag_targets("dsmil_bag_loss", bag_probs, bag_label)
    if instance_scores.ndim != 2 or instance_scores.shape[0] != bag_probs.shape[0] or instance_scores.shape[1] == 0:
        raise ValueError(f"dsmil_bag_loss: instance_scores must be [B, N >= 1] with B = {bag_probs.shape[0]}, got "
                         f"{tuple(instance_scores.shape)}")
    probs = bag_probs.float()
    if softmax_twice:
        ce = F.cross_entropy(probs, label.long())
    else:
        ce = F.nll_loss(torch.log(probs.clamp_min(torch.finfo(probs.dtype).tiny)), label.long())
    bce = F.binary_cross_entropy(instance_scores.float().max(dim=1).values, label)
    return 0.5 * ce + 0.5 * bce


def minmax_normalise(scores: torch.Tensor, lo: float, hi: float, eps: float = EPS) -> torch.Tensor:
    """``clamp((s − lo) / (hi − lo), ε, 1 − ε)``, element-wise.

    Args:
        scores: instance scores of one teacher, any shape.
        lo, hi: that teacher's minimum and maximum instance score over the training instances of the epoch.
        eps: ``ε`` of the clamp.

    Raises:
        ValueError: ``hi <= lo`` (all recorded scores equal: the normalisation is undefined).
    """
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise ValueError(f"minmax_normalise: need max > min of the recorded scores, got min={lo}, max={hi}")
    return ((scores.float() - lo) / (hi - lo)).clamp(eps, 1 - eps)


def merge_pseudo_labels(scores: Sequence[torch.Tensor], ranges: Sequence[tuple[float, float]],
                        weights: Sequence[float], bag_labels: torch.Tensor) -> torch.Tensor:
    """Instance pseudo labels ``ỹ_i = Σ_t μ_t ŝ^t_i``, forced to 0 in negative bags (module docstring).

    Args:
        scores: one ``[N]`` tensor of instance scores per teacher (``s¹`` ABMIL attention logits, ``s²`` DSMIL
            positive probabilities).
        ranges: ``(min_t, max_t)`` per teacher, over the training instances of the last teacher epoch.
        weights: ``μ_t`` per teacher (``--PLMergeWeight``, e.g. 0.5, 0.5).
        bag_labels: the label of each instance's bag, ``[N]``.

    Returns:
        float ``[N]`` targets in ``[0, 1]`` when ``Σ μ_t <= 1``.
    """
    if not (len(scores) == len(ranges) == len(weights)) or not scores:
        raise ValueError(f"merge_pseudo_labels: need one range and one weight per teacher, got {len(scores)} score "
                         f"tensor(s), {len(ranges)} range(s), {len(weights)} weight(s)")
    labels = torch.as_tensor(bag_labels).reshape(-1)
    merged = torch.zeros(labels.numel(), device=scores[0].device)
    for t, (s, (lo, hi), mu) in enumerate(zip(scores, ranges, weights)):
        s = s.reshape(-1)
        if s.numel() != labels.numel():
            raise ValueError(f"merge_pseudo_labels: teacher {t + 1} gives {s.numel()} scores for {labels.numel()} "
                             "instances")
        merged = merged + float(mu) * minmax_normalise(s, lo, hi)
    return torch.where(labels.to(merged.device) > 0, merged, torch.zeros_like(merged))


def student_distillation_loss(student_logits: torch.Tensor, targets: torch.Tensor, w_neg: float = 0.1,
                              eps: float = EPS) -> torch.Tensor:
    """Student loss ``L_S`` (module docstring).

    Args:
        student_logits: ``[N, C]`` student output; ``p = softmax`` over dim 1 and only ``p[:, 0]``, ``p[:, 1]`` are
            used (``C`` = 2, or 4096 with the faithful student bug, §7 row 1).
        targets: pseudo labels ``ỹ``, ``[N]`` in ``[0, 1]``.
        w_neg: ``w_n`` (``--stu_loss_weight_neg``): 0.1 (intended); the script default 1.0 zeroes the positive term
            (§7 row 2).
        eps: ``ε``.

    Returns:
        scalar loss.
    """
    if student_logits.ndim != 2 or student_logits.shape[1] < 2:
        raise ValueError(f"student_distillation_loss: student_logits must be [N, C >= 2], got "
                         f"{tuple(student_logits.shape)}")
    targets = targets.reshape(-1).float()
    if targets.numel() != student_logits.shape[0]:
        raise ValueError(f"student_distillation_loss: {targets.numel()} targets for {student_logits.shape[0]} "
                         "instances")
    if not 0.0 <= w_neg <= 1.0:
        raise ValueError(f"student_distillation_loss: w_neg must be in [0, 1], got {w_neg}")
    probs = torch.softmax(student_logits.float(), dim=1)
    terms = w_neg * (1 - targets) * torch.log(probs[:, 0] + eps) + (1 - w_neg) * targets * torch.log(probs[:, 1] + eps)
    return -terms.mean()
