"""Per-organ Dice and directed average surface distance of the DHC evaluation protocol.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023; evaluation script ``code/evaluate_Ntimes.py`` (specs/dhc.md §7, §10 items 4–5).
For every test case and every foreground class ``c`` of the label maps ``P`` (prediction) and ``G`` (ground truth):

* both present: ``Dice = 100 · 2|P_c ∩ G_c| / (|P_c| + |G_c|)`` (medpy ``binary.dc``) and
  ``ASD = mean_{p ∈ ∂P_c} min_{g ∈ ∂G_c} ‖p − g‖`` (medpy ``binary.asd``: *directed*, prediction → ground truth,
  not the symmetric ``assd``), where the border ``∂M = M XOR erode(M)`` uses one erosion with the
  connectivity-1 cross (voxels outside the volume count as background) and distances are in voxels unless a
  spacing is given;
* exactly one present: Dice 0 and ASD :data:`ONE_EMPTY_ASD` (= 128, a fixed penalty in voxels);
* both absent: Dice **1** and ASD 0 — the official script forgets the ×100 here (a scale bug, reproduced by
  default); ``fix_empty_dice_scale=True`` gives 100.

Aggregation (:func:`aggregate`): per class, the mean over cases; "Avg" = the mean over classes of those means.

MONAI's ``DiceMetric``/``SurfaceDistanceMetric`` return NaN/inf on empty masks instead of the table above, which is
why the protocol is written out here.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from scipy import ndimage

__all__ = [
    "ONE_EMPTY_ASD",
    "surface_voxels",
    "dice_coefficient",
    "directed_asd",
    "case_metrics",
    "aggregate",
    "write_metrics_csv",
    "format_metrics_table",
    "save_slice_figure",
]

logger = logging.getLogger(__name__)

ONE_EMPTY_ASD = 128.0


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


def _as_labels(x: np.ndarray | torch.Tensor, name: str, n_classes: int) -> np.ndarray:
    """Integer label map; float maps are accepted when every value is a whole number in ``[0, n_classes)``."""
    a = _as_numpy(x)
    if a.dtype == bool or not np.issubdtype(a.dtype, np.number):
        raise ValueError(f"{name}: expected an integer label map, got dtype {a.dtype}")
    if np.issubdtype(a.dtype, np.floating) and not np.array_equal(a, np.round(a)):
        raise ValueError(f"{name}: label map holds non-integer values")
    if a.size and (a.min() < 0 or a.max() >= n_classes):
        raise ValueError(f"{name}: labels span [{a.min()}, {a.max()}], outside [0, {n_classes - 1}]"
                         f" (n_classes={n_classes})")
    return a.astype(np.int64, copy=False)


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Border of a boolean mask as medpy defines it: ``M XOR erode(M)``, one erosion with the connectivity-1 cross.

    Voxels outside the array count as background, so a mask touching the volume edge has its edge voxels on the
    border. Returns a boolean array of the mask's shape (any number of dimensions).
    """
    mask = np.asarray(mask, dtype=bool)
    cross = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask ^ ndimage.binary_erosion(mask, structure=cross, iterations=1)


def dice_coefficient(pred: np.ndarray, gt: np.ndarray) -> float:
    """medpy ``binary.dc``: ``2|P ∩ G| / (|P| + |G|)`` in [0, 1] on boolean masks of one shape; 0 if both are empty."""
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"dice_coefficient: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    return 2.0 * np.count_nonzero(pred & gt) / total if total else 0.0


def directed_asd(pred: np.ndarray, gt: np.ndarray, spacing: float | Sequence[float] | None = None) -> float:
    """medpy ``binary.asd(pred, gt)``: mean distance from the prediction's border voxels to the nearest GT border voxel.

    ``ASD(P → G) = mean_{p ∈ ∂P} EDT(¬∂G)[p]`` with :func:`surface_voxels` borders and the Euclidean distance
    transform ``EDT`` of the complement of the GT border (``scipy.ndimage.distance_transform_edt``).

    Args:
        pred: boolean mask ``P``, shape ``[D, H, W]`` (any dimensionality).
        gt: boolean mask ``G`` of the same shape.
        spacing: voxel size per axis (or one number for all); None measures in voxels, as DHC does.

    Returns:
        the directed average surface distance (not symmetric: ``directed_asd(G, P)`` differs in general).
    """
    pred, gt = np.asarray(pred, dtype=bool), np.asarray(gt, dtype=bool)
    if pred.shape != gt.shape:
        raise ValueError(f"directed_asd: prediction {pred.shape} and ground truth {gt.shape} differ in shape")
    if not pred.any() or not gt.any():
        raise ValueError("directed_asd: the prediction and the ground truth must both be non-empty")
    sampling = None
    if spacing is not None:
        sampling = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
        if sampling.ndim != 1 or sampling.size not in (1, pred.ndim) or not np.all(sampling > 0):
            raise ValueError(f"directed_asd: spacing {spacing} must be one positive value or one per axis of"
                             f" {pred.shape}")
        sampling = np.broadcast_to(sampling, (pred.ndim,))
    distance = ndimage.distance_transform_edt(~surface_voxels(gt), sampling=sampling)
    return float(distance[surface_voxels(pred)].mean())


def case_metrics(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    n_classes: int,
    spacing: float | Sequence[float] | None = None,
    fix_empty_dice_scale: bool = False,
    case: str = "case",
) -> dict[str, np.ndarray]:
    """DHC's per-case table: Dice (×100) and directed ASD for every foreground class ``1 … n_classes − 1``.

    Args:
        pred: predicted label map ``[D, H, W]`` (integers, or whole-valued floats), values in ``[0, n_classes)``.
        gt: ground-truth label map of the same shape (already resized to the prediction grid).
        n_classes: number of classes including the background 0.
        spacing: voxel size for the ASD; None (DHC) measures in voxels of the evaluation grid.
        fix_empty_dice_scale: score a class absent from both maps 100 instead of DHC's 1.
        case: case name used in error messages.

    Returns:
        ``{"dice": [C - 1], "asd": [C - 1]}`` float64 arrays, index ``c - 1`` for class ``c``.
    """
    if n_classes < 2:
        raise ValueError(f"{case}: n_classes must be at least 2 (background + one organ), got {n_classes}")
    p = _as_labels(pred, f"{case} prediction", n_classes)
    g = _as_labels(gt, f"{case} ground truth", n_classes)
    if p.shape != g.shape:
        raise ValueError(f"{case}: prediction {p.shape} and ground truth {g.shape} differ in shape")
    dice = np.empty(n_classes - 1, dtype=np.float64)
    asd = np.empty(n_classes - 1, dtype=np.float64)
    for c in range(1, n_classes):
        p_c, g_c = p == c, g == c
        p_any, g_any = bool(p_c.any()), bool(g_c.any())
        if p_any and g_any:
            dice[c - 1] = 100.0 * dice_coefficient(p_c, g_c)
            asd[c - 1] = directed_asd(p_c, g_c, spacing)
        elif p_any or g_any:
            dice[c - 1], asd[c - 1] = 0.0, ONE_EMPTY_ASD
        else:
            dice[c - 1], asd[c - 1] = (100.0 if fix_empty_dice_scale else 1.0), 0.0
    return {"dice": dice, "asd": asd}


def aggregate(per_case: Mapping[str, Mapping[str, np.ndarray]] | Sequence[Mapping[str, np.ndarray]]) -> dict:
    """Per-class means over cases, then their mean over classes (DHC's "Avg. Dice" / "Avg. ASD").

    Args:
        per_case: :func:`case_metrics` results, as a sequence or a mapping case name → result.

    Returns:
        ``{"dice": [C - 1], "asd": [C - 1], "avg_dice": float, "avg_asd": float}``.
    """
    cases = list(per_case.values()) if isinstance(per_case, Mapping) else list(per_case)
    if not cases:
        raise ValueError("aggregate: no case to aggregate")
    dice = np.stack([np.asarray(m["dice"], dtype=np.float64) for m in cases])
    asd = np.stack([np.asarray(m["asd"], dtype=np.float64) for m in cases])
    mean_dice, mean_asd = dice.mean(axis=0), asd.mean(axis=0)
    return {"dice": mean_dice, "asd": mean_asd, "avg_dice": float(mean_dice.mean()), "avg_asd": float(mean_asd.mean())}


def _check_names(class_names: Sequence[str], n_foreground: int, where: str) -> None:
    if len(class_names) != n_foreground:
        raise ValueError(f"{where}: {len(class_names)} class names for {n_foreground} foreground classes")


def write_metrics_csv(
    path: str | Path, per_case: Mapping[str, Mapping[str, np.ndarray]], class_names: Sequence[str]
) -> Path:
    """One row per case (Dice per class, ASD per class, and their means over classes), then a ``mean`` row.

    Columns: ``case, dice_<name>…, avg_dice, asd_<name>…, avg_asd``; the ``mean`` row holds :func:`aggregate`.

    Args:
        path: CSV file to write (parent folders are created).
        per_case: case name → :func:`case_metrics` result.
        class_names: the ``C − 1`` foreground class names, in label order.
    """
    summary = aggregate(per_case)
    _check_names(class_names, len(summary["dice"]), f"write_metrics_csv({path})")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ["case", *(f"dice_{n}" for n in class_names), "avg_dice", *(f"asd_{n}" for n in class_names), "avg_asd"]
    rows = [[name, *m["dice"], np.mean(m["dice"]), *m["asd"], np.mean(m["asd"])] for name, m in per_case.items()]
    rows.append(["mean", *summary["dice"], summary["avg_dice"], *summary["asd"], summary["avg_asd"]])
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([row[0], *(f"{float(v):.6f}" for v in row[1:])] for row in rows)
    logger.info("wrote %d case rows to %s", len(per_case), path)
    return path


def format_metrics_table(class_names: Sequence[str], summary: Mapping, digits: int = 2) -> str:
    """Plain-text table ``class | Dice | ASD``, one line per foreground class, then ``Avg``.

    Args:
        class_names: the ``C − 1`` foreground class names, in label order.
        summary: :func:`aggregate` result.
        digits: decimals printed.
    """
    _check_names(class_names, len(summary["dice"]), "format_metrics_table")
    width = max(len("class"), len("Avg"), *(len(n) for n in class_names))
    lines = [f"{'class':<{width}}  {'Dice':>8}  {'ASD':>8}"]
    for name, d, a in zip(class_names, summary["dice"], summary["asd"]):
        lines.append(f"{name:<{width}}  {d:>8.{digits}f}  {a:>8.{digits}f}")
    lines.append(f"{'Avg':<{width}}  {summary['avg_dice']:>8.{digits}f}  {summary['avg_asd']:>8.{digits}f}")
    return "\n".join(lines)


def save_slice_figure(
    image: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    pred: np.ndarray | torch.Tensor,
    png_path: str | Path,
    n_slices: int = 4,
    class_colours: Sequence | None = None,
) -> Path:
    """PNG of a few axial slices with ground-truth (solid) and predicted (dashed) contours, one colour per class.

    Slices are spread evenly over the axial indices (axis 0) where the ground truth or the prediction has
    foreground (over the whole volume when both are empty).

    Args:
        image: ``[D, H, W]`` intensities (shown in grey, per-slice min–max).
        gt: ``[D, H, W]`` ground-truth label map.
        pred: ``[D, H, W]`` predicted label map.
        png_path: file to write (parent folders are created).
        n_slices: number of slices shown (fewer when the foreground spans fewer slices).
        class_colours: matplotlib colours for classes ``1, 2, …`` (index ``c − 1``); default ``tab20``, dark hues
            first.
    """
    img = _as_numpy(image).astype(np.float32)
    g, p = _as_numpy(gt).astype(np.int64), _as_numpy(pred).astype(np.int64)
    if img.ndim != 3 or g.shape != img.shape or p.shape != img.shape:
        raise ValueError(
            f"save_slice_figure({png_path}): image {img.shape}, gt {g.shape} and pred {p.shape} must be equal [D, H, W]"
        )
    if n_slices < 1:
        raise ValueError(f"save_slice_figure: n_slices must be positive, got {n_slices}")
    n_fg = int(max(g.max(), p.max(), 0))
    # default: the 10 dark hues of tab20 (even entries) first, then their light variants
    tab20 = colormaps["tab20"]
    colours = list(class_colours) if class_colours else [tab20(2 * i % 20 + i // 10 % 2) for i in range(n_fg)]
    if len(colours) < n_fg:
        raise ValueError(f"save_slice_figure: {len(colours)} class colours for labels up to {n_fg}")

    fg_slices = np.flatnonzero(((g > 0) | (p > 0)).any(axis=(1, 2)))
    if fg_slices.size == 0:
        fg_slices = np.arange(img.shape[0])
    picks = np.unique(fg_slices[np.round(np.linspace(0, fg_slices.size - 1, n_slices)).astype(int)])

    fig = Figure(figsize=(3.0 * len(picks), 3.4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    shown: set[int] = set()
    for ax, z in zip(axes, picks):
        ax.imshow(img[z], cmap="gray", interpolation="nearest")
        for labels, style in ((g[z], "solid"), (p[z], "dashed")):
            for c in np.unique(labels[labels > 0]):
                ax.contour(labels == c, levels=[0.5], colors=[colours[c - 1]], linestyles=style, linewidths=1.2)
                shown.add(int(c))
        ax.set_title(f"slice {z}")
        ax.axis("off")
    handles = [Line2D([], [], color=colours[c - 1], label=f"class {c}") for c in sorted(shown)]
    if handles:
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), fontsize="small", frameon=False)
    fig.suptitle("ground truth solid, prediction dashed", fontsize="small")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return png_path
