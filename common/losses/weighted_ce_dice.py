"""Class-weighted cross-entropy + soft Dice of DHC, with the class weights passed at every call.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (arXiv 2307.11960): the supervised loss "w_ce+dice" and the cross pseudo
supervision CE of both branches (specs/dhc.md §4.1-4.2). DHC recomputes the weight vector ``w`` every iteration
(DiffDW for branch A, DistDW for branch B, see :mod:`common.losses.debiased_weighting`), so unlike MONAI's
``DiceCELoss`` (weights fixed at construction) the weights are an argument of ``forward``.

Also holds the batch-pooled Dice per class, soft (loss, smooth 1) and hard (DiffDW's learning signal, smooth 1e-8).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

from common.utils.distributed import all_reduce_sum

__all__ = ["WeightedCEDiceLoss", "batch_dice", "check_logits", "hard_batch_dice", "label_map", "weighted_cross_entropy",
           "weighted_dice_loss"]

logger = logging.getLogger(__name__)

DICE_EPS = 1e-8  # added to every Dice denominator on top of the smoothing term (specs/dhc.md §4.1, §4.4)


def check_logits(logits: torch.Tensor, name: str) -> int:
    """The class count ``C`` of ``logits`` ``[B, C, *spatial]``; ``name`` (the caller) is named when ``C < 2``."""
    if logits.ndim < 3 or logits.shape[1] < 2:
        raise ValueError(f"{name}: logits must be [B, C, *spatial] with C >= 2, got shape {tuple(logits.shape)}")
    return logits.shape[1]


def label_map(target: torch.Tensor, logits: torch.Tensor, name: str) -> torch.Tensor:
    """``target`` ``[B, 1, *spatial]`` or ``[B, *spatial]``, integer values in ``[0, C)`` -> long ``[B, *spatial]``."""
    num_classes, spatial = logits.shape[1], logits.shape[2:]
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != (logits.shape[0], *spatial):
        raise ValueError(
            f"{name}: target shape {tuple(target.shape)} does not match logits {tuple(logits.shape)} "
            f"(expected [B, 1, *spatial] or [B, *spatial])"
        )
    if target.is_floating_point() and not torch.equal(target, target.round()):
        raise ValueError(f"{name}: target holds non-integer values; expected class indices")
    target = target.long()
    if target.numel() and (int(target.min()) < 0 or int(target.max()) >= num_classes):
        raise ValueError(
            f"{name}: target values must lie in [0, {num_classes}), got range "
            f"[{int(target.min())}, {int(target.max())}]"
        )
    return target


def _check_weight(weight: torch.Tensor, num_classes: int, name: str) -> torch.Tensor:
    weight = torch.as_tensor(weight).detach().float().reshape(-1)
    if weight.numel() != num_classes:
        raise ValueError(f"{name}: weight must hold one value per class ({num_classes}), got {weight.numel()}")
    if not bool((torch.isfinite(weight) & (weight >= 0)).all()):
        raise ValueError(f"{name}: weight must be finite and >= 0, got {weight.tolist()}")
    return weight


def _one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """long ``[B, *spatial]`` -> one-hot ``[B, C, *spatial]``."""
    return F.one_hot(labels, num_classes).movedim(-1, 1).to(dtype)


def batch_dice(pred: torch.Tensor, target: torch.Tensor, smooth: float, over_ranks: bool = False) -> torch.Tensor:
    """Dice per class with the sums pooled over the batch and all voxels ("batch dice").

    ``D_c = (2 sum_{b,i} p_{b,c,i} g_{b,c,i} + s) / (sum_{b,i} p_{b,c,i} + sum_{b,i} g_{b,c,i} + s + 1e-8)``

    Args:
        pred: probabilities or one-hot prediction ``[B, C, *spatial]``.
        target: one-hot ground truth ``[B, C, *spatial]``.
        smooth: ``s`` (1 in DHC's loss, 1e-8 in DiffDW's hard Dice).
        over_ranks: in a multi-process run, pool the sums over the ranks too (the global batch; no gradient).

    Returns:
        ``[C]`` Dice per class, background included.
    """
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"batch_dice: pred {tuple(pred.shape)} and target {tuple(target.shape)} must both be "
                         f"[B, C, *spatial]")
    dims = (0, *range(2, pred.ndim))
    intersection, total = (pred * target).sum(dim=dims), pred.sum(dim=dims) + target.sum(dim=dims)
    if over_ranks:
        intersection, total = all_reduce_sum(intersection), all_reduce_sum(total)
    return (2.0 * intersection + smooth) / (total + smooth + DICE_EPS)


@torch.no_grad()
def hard_batch_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1e-8,
                    over_ranks: bool = False) -> torch.Tensor:
    """Hard Dice per class of ``argmax_c logits`` against ``target``, pooled over the batch, background included.

    With the default smoothing this is DiffDW's ``d = (2TP + 1e-8) / (2TP + FP + FN + 1e-8 + 1e-8)``
    (specs/dhc.md §4.4 step 1); a class absent from both prediction and ground truth gets exactly 0.5.

    Args:
        logits: ``[B, C, *spatial]``.
        target: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``.
        smooth: smoothing added to numerator and denominator.
        over_ranks: in a multi-process run, pool over the ranks' batches (DiffDW: every rank gets the same Dice).

    Returns:
        ``[C]`` float32 Dice per class, detached.
    """
    num_classes = check_logits(logits, "hard_batch_dice")
    labels = label_map(target, logits, "hard_batch_dice")
    pred = _one_hot(logits.argmax(dim=1), num_classes, torch.float32)
    return batch_dice(pred, _one_hot(labels, num_classes, torch.float32), smooth, over_ranks)


def weighted_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, nan_guard: bool = True
) -> torch.Tensor:
    """Class-weighted CE normalised by the summed weights of the targets (PyTorch's ``weight=``, ``'mean'``).

    ``L_CE = sum_i w_{y_i} (-log p_{i, y_i}) / sum_i w_{y_i}``, ``i`` over all voxels of all samples, so a global
    scale of ``w`` does not change the value and a class with ``w_c = 0`` is ignored.

    When every target voxel has weight 0 (DistDW's background weight is exactly 0 and the pseudo labels of a whole
    batch can be background only) the ratio is 0/0. With ``nan_guard`` the term is skipped instead (the returned
    0 keeps the graph, so ``backward`` still works) and a warning is logged (specs/dhc.md §4.3); without it the NaN
    of the original code is returned.

    Args:
        logits: ``[B, C, *spatial]``.
        target: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``.
        weight: ``[C]`` non-negative class weights (detached).
        nan_guard: skip the term when ``sum_i w_{y_i} = 0``.

    Returns:
        scalar.
    """
    num_classes = check_logits(logits, "weighted_cross_entropy")
    labels = label_map(target, logits, "weighted_cross_entropy")
    weight = _check_weight(weight, num_classes, "weighted_cross_entropy").to(logits.device)
    voxel_ce = F.cross_entropy(logits.float(), labels, reduction="none")
    voxel_weight = weight[labels]
    numerator, denominator = (voxel_weight * voxel_ce).sum(), voxel_weight.sum()
    if nan_guard and denominator.item() == 0:
        logger.warning("weighted_cross_entropy: all %d target voxels have weight 0; CE term skipped", labels.numel())
        return numerator  # exactly 0, still attached to the graph
    return numerator / denominator


def weighted_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, smooth: float = 1.0
) -> torch.Tensor:
    """Negative class-weighted soft Dice, batch-pooled, background excluded.

    ``L_Dice = -(1 / (C - 1)) sum_{c=1}^{C-1} w_c D_c`` with ``D_c`` of :func:`batch_dice` on ``p = softmax(z)``.
    The value is negative (not ``1 - D``; same gradient as ``sum_c w_c (1 - D_c) / (C - 1)``) and, unlike the CE,
    scales with ``w``. ``w_0`` is not used.

    Args:
        logits: ``[B, C, *spatial]``.
        target: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]``.
        weight: ``[C]`` non-negative class weights (detached).
        smooth: ``s`` of :func:`batch_dice` (1 in DHC).

    Returns:
        scalar.
    """
    num_classes = check_logits(logits, "weighted_dice_loss")
    labels = label_map(target, logits, "weighted_dice_loss")
    weight = _check_weight(weight, num_classes, "weighted_dice_loss").to(logits.device)
    probs = torch.softmax(logits.float(), dim=1)
    dice = batch_dice(probs, _one_hot(labels, num_classes, probs.dtype), smooth)
    return -(weight[1:] * dice[1:]).sum() / (num_classes - 1)


class WeightedCEDiceLoss(_Loss):
    """DHC's "w_ce+dice": ``lambda_ce * L_CE(z, y; w) + lambda_dice * L_Dice(z, y; w)`` with ``w`` given per call.

    See :func:`weighted_cross_entropy` and :func:`weighted_dice_loss` for the two terms (specs/dhc.md §4.1). DHC uses
    both lambdas = 1 for the supervised loss on the labelled patches, and CE alone (``lambda_dice=0``; the Dice is
    then not computed) for the cross pseudo supervision on all patches (§4.2).

    Args:
        lambda_ce: weight of the CE term.
        lambda_dice: weight of the Dice term.
        smooth: Dice smoothing (1 in DHC).
        nan_guard: skip the CE term when all target voxels have weight 0 (see :func:`weighted_cross_entropy`).
    """

    def __init__(
        self, lambda_ce: float = 1.0, lambda_dice: float = 1.0, smooth: float = 1.0, nan_guard: bool = True
    ) -> None:
        super().__init__()
        if lambda_ce < 0 or lambda_dice < 0:
            raise ValueError(f"WeightedCEDiceLoss: lambda_ce ({lambda_ce}) and lambda_dice ({lambda_dice}) "
                             f"must be >= 0")
        self.lambda_ce = lambda_ce
        self.lambda_dice = lambda_dice
        self.smooth = smooth
        self.nan_guard = nan_guard

    def forward(self, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: ``[B, C, *spatial]`` raw network outputs.
            target: class indices ``[B, 1, *spatial]`` or ``[B, *spatial]`` (integer or integer-valued float).
            weight: ``[C]`` class weights of this iteration (detached; must be finite and >= 0).

        Returns:
            scalar loss.
        """
        loss = logits.new_zeros((), dtype=torch.float32)
        if self.lambda_ce:
            loss = loss + self.lambda_ce * weighted_cross_entropy(logits, target, weight, self.nan_guard)
        if self.lambda_dice:
            loss = loss + self.lambda_dice * weighted_dice_loss(logits, target, weight, self.smooth)
        return loss
