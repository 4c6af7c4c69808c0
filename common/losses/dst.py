"""DST's worst-case estimation loss and its confidence-masked pseudo-label cross-entropy, for 3D segmentation.

Chen, Jiang, Wang, Wan, Wang & Long, "Debiased Self-Training for Semi-Supervised Learning", NeurIPS 2022
(arXiv 2202.07136); the "dst" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for
Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9). Logits are
``[N, C, *spatial]``; every mean below is over all voxels of all patches.

**Worst-case estimation.** The worst-case head ``h_worst`` should agree with the main head ``h`` on the labelled
patches and contradict it as much as possible on the unlabelled ones; with ``ŷ = argmax_c z_main`` (detached)::

    L_worst = η' · mean_{i ∈ l} CE(z_worst_i, ŷ_i) + mean_{i ∈ u} −log(min(1 − p_worst_{i, ŷ_i} + 1e-6, 1))

``p_worst = softmax(z_worst)``, ``η' = 2`` (DST's default, hard-coded in DHC's train_dst.py). The targets on the
labelled patches are the *main head's arg-max*, not the ground truth (DST/TLlib and DHC alike); the shifted log
``log(min(x + 1e-6, 1))`` keeps the unlabelled term finite when ``p_worst → 1`` (at most ``−ln 1e-6 ≈ 13.8``) and
never negative. ``h_worst`` minimises ``L_worst``; the encoder, which feeds it through the gradient reversal of
:class:`~common.networks.vnet_decoupled.WarmStartGradientReverse`, maximises it.

**Confidence-masked pseudo labels.** From a teacher's logits ``t``: ``ŷ_i = argmax_c softmax(t_i)``, kept where
``max_c softmax(t_i) > τ`` (strictly; τ = 0.95); the student's CE on the kept voxels is summed and divided by *all*
voxels (``normalise="all"``, DHC's ``Onehot_WeightedCrossEntropyLoss`` with the mask as weight map, and DST's
``(CE · mask).mean()``), or by the kept ones (``"mask"``) — :func:`~common.losses.debiased_pseudo_labels.
masked_cross_entropy`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.losses.debiased_pseudo_labels import masked_cross_entropy

__all__ = ["shift_log", "worst_case_estimation_loss", "confidence_pseudo_labels", "confidence_masked_cross_entropy"]

SHIFT = 1e-6
"""Offset of the shifted log of the unlabelled worst-case term."""


def shift_log(x: torch.Tensor, offset: float = SHIFT) -> torch.Tensor:
    """``log(min(x + offset, 1))`` element-wise."""
    return torch.log(torch.clamp(x + offset, max=1.0))


def _check_pair(main: torch.Tensor, worst: torch.Tensor, part: str) -> None:
    if main.ndim < 3 or main.shape[1] < 2 or main.shape != worst.shape:
        raise ValueError(f"worst_case_estimation_loss: {part} main and worst logits must both be [N, C >= 2, "
                         f"*spatial] of one shape, got {tuple(main.shape)} and {tuple(worst.shape)}")
    if main.shape[0] == 0:
        raise ValueError(f"worst_case_estimation_loss: the {part} part is empty (N = 0)")


def worst_case_estimation_loss(
    main_labelled: torch.Tensor,
    worst_labelled: torch.Tensor,
    main_unlabelled: torch.Tensor,
    worst_unlabelled: torch.Tensor,
    eta_prime: float = 2.0,
) -> torch.Tensor:
    """``L_worst`` of the module docstring.

    Args:
        main_labelled, worst_labelled: ``[L, C, *spatial]`` main and worst-case logits of the labelled patches.
        main_unlabelled, worst_unlabelled: ``[U, C, *spatial]`` the same for the unlabelled patches.
        eta_prime: η' >= 0, weight of the labelled term.

    Returns:
        float32 scalar, differentiable in the worst-case logits only (the main logits only give the targets).
    """
    _check_pair(main_labelled, worst_labelled, "labelled")
    _check_pair(main_unlabelled, worst_unlabelled, "unlabelled")
    if main_labelled.shape[1:] != main_unlabelled.shape[1:]:
        raise ValueError(f"worst_case_estimation_loss: labelled {tuple(main_labelled.shape)} and unlabelled "
                         f"{tuple(main_unlabelled.shape)} logits differ beyond the batch axis")
    if eta_prime < 0:
        raise ValueError(f"worst_case_estimation_loss: eta_prime must be >= 0, got {eta_prime}")
    target_l = main_labelled.detach().argmax(dim=1)
    target_u = main_unlabelled.detach().argmax(dim=1)
    loss_l = F.cross_entropy(worst_labelled.float(), target_l)
    not_target = 1.0 - torch.softmax(worst_unlabelled.float(), dim=1)
    loss_u = F.nll_loss(shift_log(not_target), target_u)
    return eta_prime * loss_l + loss_u


@torch.no_grad()
def confidence_pseudo_labels(teacher_logits: torch.Tensor, threshold: float = 0.95
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard pseudo labels and their confidence mask.

    Args:
        teacher_logits: ``[N, C, *spatial]``.
        threshold: τ in [0, 1); a voxel is kept when its top softmax probability is strictly above τ.

    Returns:
        ``(labels, mask)``: int64 ``[N, *spatial]`` arg-max and bool ``[N, *spatial]`` ``max_c p > τ``.
    """
    if teacher_logits.ndim < 3 or teacher_logits.shape[1] < 2:
        raise ValueError(f"confidence_pseudo_labels: logits must be [N, C >= 2, *spatial], "
                         f"got {tuple(teacher_logits.shape)}")
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"confidence_pseudo_labels: threshold must lie in [0, 1), got {threshold}")
    confidence, labels = torch.softmax(teacher_logits.detach().float(), dim=1).max(dim=1)
    return labels, confidence > threshold


def confidence_masked_cross_entropy(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, threshold: float = 0.95, normalise: str = "all"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CE of the student on the teacher's confident arg-max (module docstring).

    Args:
        student_logits: ``[N, C, *spatial]`` (receives the gradient).
        teacher_logits: ``[N, C, *spatial]`` (detached).
        threshold: τ of :func:`confidence_pseudo_labels`.
        normalise: ``"all"`` (DST, DHC) or ``"mask"`` (see
            :func:`~common.losses.debiased_pseudo_labels.masked_cross_entropy`).

    Returns:
        ``(loss, labels, mask)``: float32 scalar and the teacher's labels / mask ``[N, *spatial]``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"confidence_masked_cross_entropy: student {tuple(student_logits.shape)} and teacher "
                         f"{tuple(teacher_logits.shape)} logits must have one shape")
    labels, mask = confidence_pseudo_labels(teacher_logits, threshold)
    return masked_cross_entropy(student_logits, labels, mask, normalise), labels, mask
