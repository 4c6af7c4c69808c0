"""Downstream chest X-ray metrics of ASG: zero-shot AUC / max-F1 / ACC and the per-image segmentation Dice.

Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training" (ASG), MICCAI 2024; specs/asg.md §6.3
and §6.4.

Zero-shot classification (MedKLIP's protocol, inferred for ASG), per class with labels ``y`` and scores ``s``:

* ``auc = roc_auc_score(y, s)``;
* along ``precision_recall_curve(y, s)`` (the point at threshold ``t_k`` predicts ``s >= t_k``),
  ``F1_k = 2 P_k R_k / (P_k + R_k)`` (0 where ``P_k + R_k = 0``), ``f1 = max_k F1_k`` and ``t* = t_{argmax}`` (the
  lowest threshold reaching the maximum);
* ``acc = mean((s > t*) == y)``. The comparison is strictly greater, as in MedKLIP: the samples scoring exactly
  ``t*``, counted positive by the max-F1 point, are predicted negative for the accuracy.

``t*`` is chosen on the evaluated set itself, as in MedKLIP.

Segmentation (MGCA's ``ssl_segmenter``): ``P = prob > 0.5``, ``G = target > 0.5`` per image; Dice is
``2|P∩G| / (|P| + |G|)`` when ``G`` is non-empty, else 1 if ``P`` is empty and 0 otherwise; averaged over the
images of a batch, then over the batches (:class:`SegmentationDice`, ``average="batch"``). ``monai.metrics.DiceMetric``
skips or scores empty ground truths differently, hence this code.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from ignite.metrics.metric import reinit__is_reduced, sync_all_reduce
from sklearn.metrics import precision_recall_curve, roc_auc_score

__all__ = ["SegmentationDice", "multilabel_zero_shot", "per_image_dice", "zero_shot_metrics"]

logger = logging.getLogger(__name__)

METRIC_KEYS = ("auc", "f1", "acc")


def _as_vector(x: Any, name: str) -> np.ndarray:
    array = np.asarray(torch.as_tensor(x).detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"zero_shot_metrics: {name} must be a non-empty 1-D array, got shape {array.shape}")
    return array


def zero_shot_metrics(y_true: Any, scores: Any) -> dict[str, float]:
    """AUC, max-F1, accuracy at the max-F1 threshold, and that threshold (module docstring).

    Args:
        y_true: ``[N]`` binary labels (0 / 1).
        scores: ``[N]`` scores, higher = more likely positive (e.g. sigmoid of the "pneumonia" tag logit).

    Returns:
        ``{"auc", "f1", "acc", "threshold"}`` as fractions in [0, 1] (threshold in score units).

    Raises:
        ValueError: shapes differ, labels other than 0 / 1, non-finite scores, or only one class in ``y_true``
            (AUC undefined).
    """
    y, s = _as_vector(y_true, "y_true"), _as_vector(scores, "scores")
    if y.shape != s.shape:
        raise ValueError(f"zero_shot_metrics: y_true {y.shape} and scores {s.shape} differ in shape")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError(f"zero_shot_metrics: y_true must hold only 0 and 1, got {np.unique(y)[:8].tolist()}")
    if not np.isfinite(s).all():
        raise ValueError("zero_shot_metrics: scores hold NaN or infinite values")
    if np.unique(y).size < 2:
        raise ValueError(f"zero_shot_metrics: y_true holds a single class ({int(y[0])}) over {y.size} samples; "
                         "AUC is undefined")
    precision, recall, thresholds = precision_recall_curve(y, s)
    denom = precision + recall
    f1 = np.divide(2.0 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    best = int(np.argmax(f1[:-1]))  # the last point (P = 1, R = 0) has no threshold and F1 = 0
    threshold = float(thresholds[best])
    return {"auc": float(roc_auc_score(y, s)), "f1": float(f1[best]), "acc": float(np.mean((s > threshold) == y)),
            "threshold": threshold}


def multilabel_zero_shot(y_true: Any, scores: Any, names: Sequence[str]) -> dict[str, dict]:
    """:func:`zero_shot_metrics` of every class and the mean of auc / f1 / acc over the scored classes.

    A class whose labels hold one value only (AUC undefined) is skipped with a warning naming it.

    Args:
        y_true: ``[N, C]`` binary labels.
        scores: ``[N, C]`` scores.
        names: the ``C`` class names.

    Returns:
        ``{"per_class": {name: {"auc", "f1", "acc", "threshold"}}, "mean": {"auc", "f1", "acc"},
        "skipped": [names]}``.

    Raises:
        ValueError: shapes or names do not match, or every class is skipped.
    """
    y = np.asarray(torch.as_tensor(y_true).cpu() if isinstance(y_true, torch.Tensor) else y_true, dtype=np.float64)
    s = np.asarray(torch.as_tensor(scores).detach().cpu() if isinstance(scores, torch.Tensor) else scores,
                   dtype=np.float64)
    names = list(names)
    if y.ndim != 2 or y.shape != s.shape or y.shape[1] != len(names):
        raise ValueError(f"multilabel_zero_shot: y_true {y.shape} and scores {s.shape} must both be [N, C] with "
                         f"C = {len(names)} names")
    if len(set(names)) != len(names):
        raise ValueError(f"multilabel_zero_shot: class names must be unique, got {names}")
    skipped = [name for c, name in enumerate(names) if np.unique(y[:, c]).size < 2]
    if skipped:
        logger.warning("multilabel_zero_shot: skipping classes with a single label value (AUC undefined): %s",
                       skipped)
    per_class = {name: zero_shot_metrics(y[:, c], s[:, c]) for c, name in enumerate(names) if name not in skipped}
    if not per_class:
        raise ValueError(f"multilabel_zero_shot: every class ({names}) has a single label value; nothing to score")
    mean = {key: float(np.mean([m[key] for m in per_class.values()])) for key in METRIC_KEYS}
    return {"per_class": per_class, "mean": mean, "skipped": skipped}


def per_image_dice(probs: torch.Tensor, target: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Per-image Dice with the empty-ground-truth rule of §6.4.

    ``P = probs > threshold``, ``G = target > 0.5``; ``2|P∩G| / (|P| + |G|)`` if ``|G| > 0``, else
    ``1.0 if |P| = 0 else 0.0``.

    Args:
        probs: ``[B, 1, H, W]`` (any ``[B, ...]``) foreground probabilities.
        target: same shape, binary mask.
        threshold: binarisation threshold of ``probs``.

    Returns:
        float ``[B]``.
    """
    return _dice(probs, target, threshold).float()


def _dice(probs: torch.Tensor, target: torch.Tensor, threshold: float) -> torch.Tensor:
    """:func:`per_image_dice` in float64 (the metric accumulates in double precision)."""
    if probs.ndim < 2 or probs.shape != target.shape:
        raise ValueError(f"per_image_dice: probs and target must both be [B, 1, H, W] of the same shape, got "
                         f"{tuple(probs.shape)} and {tuple(target.shape)}")
    pred = (probs.detach() > threshold).flatten(1)
    truth = (target.detach() > 0.5).flatten(1).to(pred.device)
    inter = (pred & truth).sum(1).double()
    size_p, size_g = pred.sum(1).double(), truth.sum(1).double()
    dice = 2.0 * inter / (size_p + size_g).clamp(min=1.0)
    return torch.where(size_g > 0, dice, (size_p == 0).double())


def _stack(x: Any) -> torch.Tensor:
    """A batched tensor, or a decollated list of per-image tensors stacked on dim 0."""
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Sequence) and x and all(isinstance(v, torch.Tensor) for v in x):
        return torch.stack(list(x))
    raise ValueError(f"SegmentationDice: y_pred and y must be tensors or lists of tensors, got {type(x).__name__}")


class SegmentationDice(Metric):
    """Mean per-image Dice (:func:`per_image_dice`) as an ignite ``Metric``.

    ``average="batch"`` (default, MGCA's ``ssl_segmenter``): the mean over the images of each ``update`` call, then
    the mean over the calls. ``average="image"``: the plain mean over every image. Sums and counts are all-reduced
    over the ranks before the ratio.

    Args:
        threshold: binarisation threshold of the probabilities (0.5).
        average: ``"batch"`` or ``"image"``.
        output_transform: engine output -> ``(y_pred, y)``: probabilities and masks ``[B, 1, H, W]`` (or lists of
            ``[1, H, W]``); e.g. ``monai.handlers.from_engine(["pred", "label"])`` after a sigmoid post-transform.
        device: where the sums are kept.
    """

    def __init__(self, threshold: float = 0.5, average: str = "batch", output_transform: Callable = lambda x: x,
                 device: str | torch.device = "cpu") -> None:
        if average not in ("batch", "image"):
            raise ValueError(f"SegmentationDice: average must be 'batch' or 'image', got {average!r}")
        self.threshold = float(threshold)
        self.average = average
        super().__init__(output_transform=output_transform, device=device)

    @reinit__is_reduced
    def reset(self) -> None:
        self._sum = torch.tensor(0.0, dtype=torch.float64, device=self._device)
        self._count = torch.tensor(0, dtype=torch.int64, device=self._device)

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        y_pred, y = output
        dice = _dice(_stack(y_pred), _stack(y), self.threshold).to(self._device)
        if dice.numel() == 0:
            return
        if self.average == "batch":
            self._sum += dice.mean()
            self._count += 1
        else:
            self._sum += dice.sum()
            self._count += dice.numel()

    @sync_all_reduce("_sum", "_count")
    def compute(self) -> float:
        if int(self._count) == 0:
            raise NotComputableError("SegmentationDice must have at least one image before it can be computed")
        return float(self._sum / self._count)
