"""Pseudo masks from probability maps: threshold -> one box prompt -> refiner -> PNG + filtered list.

The pseudo-label step of EndoKED (Wang et al., arXiv 2310.11173; specs/endoked.md §3.6, §4.4) applied to a list
of positive images. Per image ``i`` (native size ``H x W``):

1. ``prob = prob_fn(image)``, ``(H, W)``; optionally min-max normalised ``prob <- (prob - min) / (max - min + 1e-8)``;
2. binary map ``M = prob > t`` (CAM stage, §3.6: ``t = 0.65``, strict) or ``M = prob >= t`` (prediction stage,
   §4.4: min-max normalised Polyp-PVT probability, ``t = 0.01``, inclusive);
3. :func:`~common.transforms.box_prompts.mask_to_box` accepts the image with one box or rejects it with a reason;
4. accepted: ``mask = refiner(image, box, M)`` (:mod:`common.networks.box_refiners`) is written as
   ``labels/<label_name>``, a uint8 PNG with values 0/255 at native size, and the pair goes into the filtered list.

Output folder (specs/endoked.md §1 data contracts), built in a staging folder and published in one rename, so
``out_dir`` is either the previous complete result or the new one, never half-written::

    out_dir/labels/00000.png ...        pseudo masks of the accepted images
    out_dir/filtered.csv                filtered_img_path,filtered_label_name   (accepted images only)
    out_dir/rejected.csv                img_path,label_name,reason
    out_dir/pseudo_mask_dice.csv        img_path,label_name,accepted,dice       (only with ground truth)
    out_dir/overlays/00000.png ...      figures of the first ``overlay_count`` images

``label_name`` is the 5-digit position of the image in ``image_paths`` plus ``.png`` (the positive list's running
index), so an image keeps its name from round to round while the set of accepted images changes.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib
import numpy as np
from PIL import Image, ImageDraw

from common.metrics.polyp import MIN_MAX_EPS, normalise_ground_truth, smoothed_dice
from common.networks.box_refiners import BoxRefiner
from common.transforms.box_prompts import BoxDecision, mask_to_box
from common.utils.figures import GT_COLOUR, PRED_COLOUR, outline
from common.utils.files import staged_folder, write_csv

__all__ = ["PseudoMaskResult", "generate_pseudo_masks", "read_filtered_list", "label_name_of",
           "FILTERED_COLUMNS"]

logger = logging.getLogger(__name__)

FILTERED_COLUMNS: tuple[str, str] = ("filtered_img_path", "filtered_label_name")
"""Header of the filtered list read by the segmentation stage."""

_REJECTED_COLUMNS = ("img_path", "label_name", "reason")
_DICE_COLUMNS = ("img_path", "label_name", "accepted", "dice")
_BOX_COLOUR = (255, 255, 0)
_MAP_COLOUR = (255, 255, 255)


@dataclass(frozen=True)
class PseudoMaskResult:
    """What :func:`generate_pseudo_masks` wrote.

    Attributes:
        out_dir, label_dir, filtered_csv, rejected_csv, overlay_dir: published paths.
        dice_csv: per-image Dice table, None without ground truth.
        n_images, n_accepted, n_rejected: counts; ``n_images = n_accepted + n_rejected``.
        coverage: ``n_accepted / n_images``.
        mean_dice: mean Dice of the pseudo masks of the *accepted* images that have ground truth (None when there
            is none). Rejected images get no pseudo mask and no Dice; read ``mean_dice`` together with ``coverage``.
        n_dice: number of images averaged in ``mean_dice``.
    """

    out_dir: Path
    label_dir: Path
    filtered_csv: Path
    rejected_csv: Path
    overlay_dir: Path
    dice_csv: Path | None
    n_images: int
    n_accepted: int
    n_rejected: int
    coverage: float
    mean_dice: float | None
    n_dice: int


def label_name_of(index: int) -> str:
    """Pseudo-mask file name of the image at position ``index`` of the positive list: ``"00042.png"``."""
    return f"{index:05d}.png"


def _read_image(path: str | os.PathLike, role: str, mode: str) -> np.ndarray:
    """Pixels of an image file converted to PIL ``mode``; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.array(img.convert(mode))  # a writable copy
    except Exception as err:  # UnidentifiedImageError, truncated files, ...
        raise ValueError(f"{role} file {path} cannot be read as an image: {type(err).__name__}: {err}") from err


def _probability(prob_fn: Callable[[np.ndarray], np.ndarray], image: np.ndarray, path: str,
                 min_max_normalise: bool) -> np.ndarray:
    prob = np.asarray(prob_fn(image), dtype=np.float64)
    if prob.shape != image.shape[:2]:
        raise ValueError(f"{path}: prob_fn returned shape {prob.shape}, expected the image size {image.shape[:2]}")
    if not np.isfinite(prob).all():
        raise ValueError(f"{path}: prob_fn returned non-finite values")
    if min_max_normalise:
        prob = (prob - prob.min()) / (prob.max() - prob.min() + MIN_MAX_EPS)
    return prob


def _refine(refiner: BoxRefiner, image: np.ndarray, decision: BoxDecision, binary: np.ndarray,
            path: str) -> np.ndarray:
    mask = np.asarray(refiner(image, np.asarray(decision.box), binary))
    if mask.shape != image.shape[:2]:
        raise ValueError(f"{path}: refiner returned a mask of shape {mask.shape}, expected {image.shape[:2]}")
    return mask != 0


def _draw_box(canvas: Image.Image, box: tuple[int, int, int, int] | None) -> None:
    if box is not None:
        x0, y0, x1, y1 = box
        ImageDraw.Draw(canvas).rectangle((x0, y0, x1 - 1, y1 - 1), outline=_BOX_COLOUR, width=2)


def _save_overlay(path: Path, image: np.ndarray, prob: np.ndarray, binary: np.ndarray, decision: BoxDecision,
                  mask: np.ndarray | None, gt: np.ndarray | None) -> None:
    """Two panels side by side: left, the image with the pseudo mask (red) and ground truth (green) outlines;
    right, the probability heat map (jet, 50 % over the image) with the thresholded map's outline (white); the
    box in yellow on both; the decision's reason written on top."""
    left = image.copy()
    if gt is not None:
        left[outline(gt)] = GT_COLOUR
    if mask is not None:
        left[outline(mask)] = PRED_COLOUR
    heat = matplotlib.colormaps["jet"](np.clip(prob, 0.0, 1.0))[..., :3] * 255.0
    right = (0.5 * image + 0.5 * heat).astype(np.uint8)
    right[outline(binary)] = _MAP_COLOUR
    panels = [Image.fromarray(left), Image.fromarray(right)]
    for panel in panels:
        _draw_box(panel, decision.box)
    width, height = panels[0].size
    canvas = Image.new("RGB", (2 * width, height))
    canvas.paste(panels[0], (0, 0))
    canvas.paste(panels[1], (width, 0))
    ImageDraw.Draw(canvas).text((4, 4), decision.reason, fill=_BOX_COLOUR)
    canvas.save(path)


def generate_pseudo_masks(
    image_paths: Sequence[str | os.PathLike],
    prob_fn: Callable[[np.ndarray], np.ndarray],
    refiner: BoxRefiner,
    out_dir: str | os.PathLike,
    threshold: float = 0.65,
    threshold_inclusive: bool = False,
    min_max_normalise: bool = False,
    area_range: tuple[float, float] = (0.01, 0.35),
    max_components: int = 3,
    gt_paths: dict[str, str] | None = None,
    overlay_count: int = 8,
    progress: bool = True,
) -> PseudoMaskResult:
    """Write the pseudo masks and lists of one labelling round (module docstring).

    Args:
        image_paths: the positive images, in the positive list's order (it fixes the label names).
        prob_fn: ``(H, W, 3)`` uint8 RGB image -> ``(H, W)`` float map at native size: the multi-scale CAM of the
            WSSS network, or the Polyp-PVT probability.
        refiner: :class:`~common.networks.box_refiners.BoxRefiner` called as ``refiner(image, box, M)``.
        out_dir: output folder; replaced as a whole when the run completes.
        threshold: ``t`` of the binary map (0.65 for CAMs, 0.01 for min-max normalised predictions).
        threshold_inclusive: ``M = prob >= t`` instead of ``prob > t`` (True for the prediction stage, §4.4).
        min_max_normalise: min-max normalise every map first (True for the prediction stage).
        area_range, max_components: box filter of :func:`~common.transforms.box_prompts.mask_to_box`.
        gt_paths: image path (as in ``image_paths``) -> ground-truth mask file, for the pseudo-mask quality table.
            Dice is protocol (b)'s smoothed ``(2|P∩G| + 1) / (|P| + |G| + 1)`` with ``G = gt / max(gt) >= 0.5``,
            computed for accepted images only (rejected ones have no mask; they are listed with an empty Dice and
            counted by ``coverage``).
        overlay_count: number of leading images (accepted or not) drawn in ``overlays/``.
        progress: log every image at INFO level (DEBUG otherwise).

    Returns:
        :class:`PseudoMaskResult` with counts, coverage, mean Dice and the published paths.

    Raises:
        FileNotFoundError: an image or ground-truth file is missing (named).
        ValueError: empty ``image_paths``, a ``gt_paths`` key that is not in ``image_paths``, an unreadable image,
            a map or mask of the wrong size, or non-finite map values (the image is named). Nothing is published
            when any error is raised.
    """
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ValueError("generate_pseudo_masks: image_paths is empty")
    if overlay_count < 0:
        raise ValueError(f"generate_pseudo_masks: overlay_count must be >= 0, got {overlay_count}")
    gt_paths = {str(k): str(v) for k, v in (gt_paths or {}).items()}
    unknown = sorted(gt_paths.keys() - set(paths))
    if unknown:
        raise ValueError(f"generate_pseudo_masks: gt_paths has {len(unknown)} image(s) not in image_paths, "
                         f"e.g. {unknown[0]}")
    log = logger.info if progress else logger.debug
    out_dir = Path(out_dir)
    filtered, rejected, dice_rows = [], [], []
    with staged_folder(out_dir) as stage:
        (stage / "labels").mkdir()
        (stage / "overlays").mkdir()
        for index, path in enumerate(paths):
            label_name = label_name_of(index)
            image = _read_image(path, "image", "RGB")
            prob = _probability(prob_fn, image, path, min_max_normalise)
            binary = prob >= threshold if threshold_inclusive else prob > threshold
            decision = mask_to_box(binary, area_range, max_components)
            mask = None
            if decision.accepted:
                mask = _refine(refiner, image, decision, binary, path)
                Image.fromarray(mask.astype(np.uint8) * 255).save(stage / "labels" / label_name)
                filtered.append((path, label_name))
            else:
                rejected.append((path, label_name, decision.reason))
            gt = None
            if path in gt_paths:
                gt = normalise_ground_truth(_read_image(gt_paths[path], "ground-truth", "L")) >= 0.5
                if gt.shape != image.shape[:2]:
                    raise ValueError(f"ground-truth file {gt_paths[path]} is {gt.shape}, its image {path} is "
                                     f"{image.shape[:2]}")
                dice = smoothed_dice(mask, gt) if mask is not None else None
                dice_rows.append((path, label_name, int(mask is not None), "" if dice is None else f"{dice:.6f}"))
            if index < overlay_count:
                _save_overlay(stage / "overlays" / label_name, image, prob, binary, decision, mask, gt)
            log("pseudo mask %d/%d %s: %s", index + 1, len(paths), path, decision.reason)
        write_csv(stage / "filtered.csv", FILTERED_COLUMNS, filtered)
        write_csv(stage / "rejected.csv", _REJECTED_COLUMNS, rejected)
        if gt_paths:
            write_csv(stage / "pseudo_mask_dice.csv", _DICE_COLUMNS, dice_rows)
    dices = [float(row[3]) for row in dice_rows if row[3] != ""]
    result = PseudoMaskResult(
        out_dir=out_dir, label_dir=out_dir / "labels", filtered_csv=out_dir / "filtered.csv",
        rejected_csv=out_dir / "rejected.csv", overlay_dir=out_dir / "overlays",
        dice_csv=out_dir / "pseudo_mask_dice.csv" if gt_paths else None,
        n_images=len(paths), n_accepted=len(filtered), n_rejected=len(rejected),
        coverage=len(filtered) / len(paths), mean_dice=float(np.mean(dices)) if dices else None, n_dice=len(dices),
    )
    logger.info("pseudo masks in %s: %d of %d images accepted (coverage %.3f), mean Dice %s over %d",
                out_dir, result.n_accepted, result.n_images, result.coverage, result.mean_dice, result.n_dice)
    return result


def read_filtered_list(csv_path: str | os.PathLike, label_dir: str | os.PathLike) -> list[dict[str, str]]:
    """The segmentation stage's datalist from a filtered list: ``[{"image": path, "label": label_dir/name}, ...]``.

    Args:
        csv_path: CSV with the header ``filtered_img_path,filtered_label_name`` (extra columns are ignored).
        label_dir: folder holding the pseudo masks named in ``filtered_label_name``.

    Raises:
        FileNotFoundError: the CSV, or an image or label file it lists, does not exist (named; all missing files
            are counted, the first few named).
        ValueError: a column is missing, or the list has no row.
    """
    csv_path, label_dir = Path(csv_path), Path(label_dir)
    if not csv_path.is_file():
        raise FileNotFoundError(f"filtered list {csv_path} does not exist")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        missing_columns = [c for c in FILTERED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing_columns:
            raise ValueError(f"filtered list {csv_path} lacks the column(s) {', '.join(missing_columns)} "
                             f"(header: {reader.fieldnames})")
        items = [{"image": row[FILTERED_COLUMNS[0]], "label": str(label_dir / row[FILTERED_COLUMNS[1]])}
                 for row in reader]
    if not items:
        raise ValueError(f"filtered list {csv_path} lists no image")
    missing = [p for item in items for p in (item["image"], item["label"]) if not Path(p).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" (and {len(missing) - 5} more)" if len(missing) > 5 else "")
        raise FileNotFoundError(f"filtered list {csv_path}: {len(missing)} listed file(s) do not exist: {shown}")
    return items
