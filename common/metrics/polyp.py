"""Per-image polyp segmentation measures of the EndoKED / Polyp-PVT evaluation protocols.

specs/endoked.md §5.1. Every measure is computed per image at the ground truth's native size, then averaged
over the images of a set:

* preparation: logits ``P1 + P2`` are resized bilinearly (``align_corners=False``) to the ground truth size,
  ``r = sigmoid``, then min–max normalised ``r <- (r - min) / (max - min + 1e-8)``; the ground truth is divided
  by its maximum (:func:`prepare_probability`, :func:`normalise_ground_truth`);
* protocol (a), training-time soft Dice: ``(2 sum(r g) + 1) / (sum(r) + sum(g) + 1)``, no threshold;
* protocol (b), EndoKED's headline Dice: ``P = r >= 0.5``, ``G = g >= 0.5``,
  ``Dice = (2|P∩G| + 1) / (|P| + |G| + 1)`` rounded to 4 decimals per image;
* protocol (c), the baselines' script: smoothed Dice and Jaccard ``(|P∩G| + 1) / (|P∪G| + 1)``, plus the
  unsmoothed F1 (= Dice), Jaccard, precision and recall of scikit-learn (0 where the denominator is 0, so an image
  with empty P and G scores 0), and medpy's HD95 (only where both P and G are non-empty: NaN otherwise).

The smoothing and min–max normalisation differ from ``monai.metrics.DiceMetric``, which is why these are written
here rather than taken from MONAI.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import CumulativeIterationMetric
from scipy import ndimage

from common.metrics.saliency import saliency_measures

__all__ = [
    "prepare_probability",
    "normalise_ground_truth",
    "soft_dice",
    "smoothed_dice",
    "smoothed_iou",
    "confusion_counts",
    "hd95",
    "polyp_measures",
    "PolypDiceMetric",
]

MIN_MAX_EPS = 1e-8


def prepare_probability(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits at network resolution → min–max normalised probability at the ground truth's size.

    Args:
        logits: ``[h, w]``, ``[1, h, w]`` or ``[1, 1, h, w]`` raw outputs (``P1 + P2`` for Polyp-PVT).
        size: ``(H, W)`` of the ground truth.

    Returns:
        ``[H, W]`` float tensor ``r`` in [0, 1].
    """
    x = torch.as_tensor(logits).float()
    while x.ndim < 4:
        x = x.unsqueeze(0)
    if x.shape[:2] != (1, 1):
        raise ValueError(f"prepare_probability expects one single-channel map, got shape {tuple(logits.shape)}")
    x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
    r = torch.sigmoid(x)[0, 0]
    return (r - r.min()) / (r.max() - r.min() + MIN_MAX_EPS)


def normalise_ground_truth(gt: np.ndarray | torch.Tensor) -> np.ndarray:
    """Ground truth divided by its maximum (``g in [0, 1]``); an all-zero mask stays zero. Returns ``[H, W]`` float."""
    g = np.asarray(torch.as_tensor(gt).detach().cpu(), dtype=np.float64).squeeze()
    if g.ndim != 2:
        raise ValueError(f"ground truth must be a single 2-D mask, got shape {g.shape}")
    peak = g.max()
    return g / peak if peak > 0 else g


def soft_dice(prob: np.ndarray, gt: np.ndarray, smooth: float = 1.0) -> float:
    """Protocol (a): ``(2 sum(r g) + s) / (sum(r) + sum(g) + s)`` on soft maps."""
    return float((2.0 * (prob * gt).sum() + smooth) / (prob.sum() + gt.sum() + smooth))


def smoothed_dice(pred: np.ndarray, gt: np.ndarray, smooth: float = 1.0) -> float:
    """``(2|P∩G| + s) / (|P| + |G| + s)`` on boolean masks (protocols (b), (c))."""
    inter = np.logical_and(pred, gt).sum()
    return float((2.0 * inter + smooth) / (pred.sum() + gt.sum() + smooth))


def smoothed_iou(pred: np.ndarray, gt: np.ndarray, smooth: float = 1.0) -> float:
    """``(|P∩G| + s) / (|P∪G| + s)`` on boolean masks (protocol (c))."""
    return float((np.logical_and(pred, gt).sum() + smooth) / (np.logical_or(pred, gt).sum() + smooth))


def confusion_counts(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int, int]:
    """``(TP, FP, FN)`` pixel counts of boolean masks."""
    tp = int(np.logical_and(pred, gt).sum())
    return tp, int(pred.sum()) - tp, int(gt.sum()) - tp


def _ratio(num: float, den: float) -> float:
    """scikit-learn's ``zero_division=0`` convention."""
    return num / den if den > 0 else 0.0


def _surface(mask: np.ndarray) -> np.ndarray:
    """Boundary pixels: the mask minus its erosion by the 4-connected cross (pixels outside the image count as 0)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing: tuple[float, ...] | None = None) -> float:
    """95th percentile of the pooled symmetric surface distances, as ``medpy.metric.binary.hd95``.

    ``d(P→G)`` are the Euclidean distances from every boundary pixel of P to the nearest boundary pixel of G, and
    ``d(G→P)`` the reverse; ``HD95 = percentile_95(concat(d(P→G), d(G→P)))`` (linear interpolation). Note this pools
    both directions, unlike ``monai.metrics.compute_hausdorff_distance(percentile=95)``, which takes the maximum of
    the two directed percentiles.

    Returns:
        the distance in pixels (or in ``spacing`` units), NaN when P or G is empty.
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if not pred.any() or not gt.any():
        return math.nan
    pred_border, gt_border = _surface(pred), _surface(gt)
    d_pg = ndimage.distance_transform_edt(~gt_border, sampling=spacing)[pred_border]
    d_gp = ndimage.distance_transform_edt(~pred_border, sampling=spacing)[gt_border]
    return float(np.percentile(np.concatenate([d_pg, d_gp]), 95))


def polyp_measures(
    prob: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor, threshold: float = 0.5, saliency: bool = True
) -> dict[str, float]:
    """Every per-image measure of protocols (a)–(c), plus the saliency measures of the polyp literature.

    Args:
        prob: ``[H, W]`` min–max normalised probability (:func:`prepare_probability`).
        gt: ``[H, W]`` ground truth, any scale (divided by its maximum here).
        threshold: binarisation threshold for P and G (0.5 in both protocols).
        saliency: also compute S-measure, weighted F, mean E-measure and MAE (slower: about 10 ms per image).

    Returns:
        ``dice`` (protocol (b), rounded to 4 decimals), ``iou`` (smoothed), ``soft_dice`` (protocol (a)),
        ``f1``, ``jaccard``, ``precision``, ``recall`` (protocol (c), unsmoothed), ``hd95`` (NaN if P or G is
        empty) and, with ``saliency``, ``s_measure``, ``weighted_f``, ``mean_e``, ``mae``.
    """
    r = np.asarray(torch.as_tensor(prob).detach().cpu(), dtype=np.float64).squeeze()
    g = normalise_ground_truth(gt)
    if r.shape != g.shape:
        raise ValueError(f"prediction {r.shape} and ground truth {g.shape} differ in size")
    pred_bin, gt_bin = r >= threshold, g >= threshold
    tp, fp, fn = confusion_counts(pred_bin, gt_bin)
    out = {
        "dice": round(smoothed_dice(pred_bin, gt_bin), 4),
        "iou": smoothed_iou(pred_bin, gt_bin),
        "soft_dice": soft_dice(r, g),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "jaccard": _ratio(tp, tp + fp + fn),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "hd95": hd95(pred_bin, gt_bin),
    }
    if saliency:
        out.update(saliency_measures(np.clip(r, 0.0, 1.0), gt_bin))
    return out


class PolypDiceMetric(CumulativeIterationMetric):
    """Protocol (b) Dice (or (a) soft Dice) per image, for MONAI engines (wrap with ``IgniteMetricHandler``).

    ``y_pred`` holds logits at network resolution and ``y`` the ground truth at native resolution: with the
    engines' ``decollate=True`` every image arrives on its own, so images of different sizes need no padding.

    Args:
        soft: use protocol (a) soft Dice instead of the thresholded Dice of protocol (b).
        threshold: binarisation threshold of protocol (b).
    """

    def __init__(self, soft: bool = False, threshold: float = 0.5) -> None:
        super().__init__()
        self.soft = soft
        self.threshold = threshold

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """``y_pred`` ``[B, 1, h, w]`` logits, ``y`` ``[B, 1, H, W]`` masks → ``[B, 1]`` per-image Dice."""
        scores = []
        for logits, label in zip(y_pred, y):
            g = normalise_ground_truth(label)
            r = prepare_probability(logits, g.shape).cpu().numpy().astype(np.float64)
            if self.soft:
                scores.append(soft_dice(r, g))
            else:
                scores.append(round(smoothed_dice(r >= self.threshold, g >= self.threshold), 4))
        return torch.tensor(scores, dtype=torch.float64).unsqueeze(1)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """Mean over every image seen since the last ``reset()``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("PolypDiceMetric: no image has been evaluated")
        return data.float().mean()
