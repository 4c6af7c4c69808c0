"""Image-level datalists of the EndoKED-WSSS stage, from MIL scores or from frame labels of an exam dataset.

The CAM network learns polyp / no-polyp labels of single frames (specs/endoked.md §3.1). Its training frames come
either from the MIL stage (paper intent: frames of positive exams whose student score is >= 0.8, and a tenth of the
frames of each negative exam, :mod:`common.data.mil_scores`) or, without MIL scores, from the frame labels of an
exam dataset (``instance_labels.csv``; the released run's "public training images" variant, §7 row 9). Validation
uses the frames that have a ground-truth mask (``masks/<exam>/<stem>.png``, :func:`exam_mask_path`) in exams the
training list does not use, so CAMs and the decoder are scored on unseen exams.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .exam_bags import EXAMS_DIR, MASKS_DIR, exam_frames, read_instance_labels
from .mil_scores import read_bag_score_csvs, select_wsss_images

__all__ = ["exam_mask_path", "exam_mask_paths", "wsss_datalists", "require_role"]


def exam_mask_path(image: str | os.PathLike) -> str | None:
    """Ground-truth mask of an exam frame, ``<root>/masks/<exam>/<stem>.png`` for ``<root>/exams/<exam>/<file>``,
    or None when the frame is not in that layout or has no mask."""
    image = Path(image)
    if image.parent.parent.name != EXAMS_DIR:
        return None
    mask = image.parent.parent.parent / MASKS_DIR / image.parent.name / f"{image.stem}.png"
    return str(mask) if mask.is_file() else None


def exam_mask_paths(images: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{image: mask}`` for the frames of ``images`` that have a ground-truth mask (:func:`exam_mask_path`)."""
    return {str(image): mask for image in images if (mask := exam_mask_path(image)) is not None}


def _exam_of(image: str) -> str:
    return Path(image).parent.name


def wsss_datalists(
    dataset_dir: str | os.PathLike,
    mil_scores: str | os.PathLike | None = None,
    train_fraction: float = 0.7,
    seed: int = 42,
    positive_threshold: float = 0.8,
    negative_fraction: float = 0.1,
    negative_rule: str = "lowest",
    positive_top_k: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Training, validation and pseudo-label lists of the WSSS stage.

    Args:
        dataset_dir: exam dataset (layout in :mod:`common.data.exam_bags`).
        mil_scores: folder of the MIL stage's per-exam score CSVs (``<exam>_gt1.csv`` / ``_gt0.csv``); None uses
            the frame labels of ``instance_labels.csv`` on a seeded ``train_fraction`` split of the exam folders.
        train_fraction, seed: that split (the MIL stage's 70/30, seed 42).
        positive_threshold, negative_fraction, negative_rule, positive_top_k: frame selection from MIL scores
            (:func:`~common.data.mil_scores.select_wsss_images`; §2.7, §7 row 10).

    Returns:
        ``{"train": [{"image", "label": float 0/1}], "val": [{"image", "label": mask path, "class": float 0/1}],
        "pseudo": [image paths of the positive training frames]}``; ``val`` holds the masked frames of exams
        outside the training list (empty when there is none).

    Raises:
        ValueError: no positive training frame, or no frame labels when ``mil_scores`` is None.
    """
    dataset_dir = Path(dataset_dir)
    exams = sorted(p.name for p in (dataset_dir / EXAMS_DIR).iterdir() if p.is_dir()) \
        if (dataset_dir / EXAMS_DIR).is_dir() else []
    if mil_scores is not None:
        rows = read_bag_score_csvs(mil_scores)
        selected = select_wsss_images(rows, positive_threshold, negative_fraction, negative_rule, seed, positive_top_k)
        train = [{"image": row["image"], "label": float(row["label"])} for row in selected]
        train_exams = {row["exam_id"] for row in rows}
        source = f"MIL scores in {mil_scores}"
    else:
        labels = read_instance_labels(dataset_dir)
        if not labels:
            raise ValueError(f"{dataset_dir} has no instance_labels.csv: give --mil_scores (the MIL bundle's export) "
                             "or frame labels (image,label) for the WSSS stage")
        if len(exams) < 2:
            raise ValueError(f"{dataset_dir / EXAMS_DIR} holds {len(exams)} exam folder(s); the exam-level split "
                             "needs at least 2")
        n_train = min(max(int(round(train_fraction * len(exams))), 1), len(exams) - 1)
        train_exams = {exams[i] for i in np.random.default_rng(seed).permutation(len(exams))[:n_train]}
        train = [{"image": str(dataset_dir / image), "label": float(label)} for image, label in sorted(labels.items())
                 if _exam_of(image) in train_exams]
        source = f"frame labels of {dataset_dir}"
    pseudo = [item["image"] for item in train if item["label"] == 1.0]
    if not pseudo:
        raise ValueError(f"no positive training frame from the {source}: the CAM network needs polyp frames "
                         "(check positive_threshold and the exam labels)")
    val = []
    for exam in exams:
        if exam in train_exams:
            continue
        for frame in exam_frames(dataset_dir / EXAMS_DIR / exam):
            mask = exam_mask_path(frame)
            if mask is not None:
                val.append({"image": str(frame), "label": mask, "class": float(_has_foreground(mask))})
    return {"train": train, "val": val, "pseudo": pseudo}


def _has_foreground(mask: str) -> bool:
    from PIL import Image

    with Image.open(mask) as m:
        return bool(np.asarray(m.convert("L")).max() > 0)


def require_role(datalists: dict[str, list[Any]], role: str, dataset_dir: str | os.PathLike) -> list[Any]:
    """``datalists[role]``, or a ValueError saying why it is empty (configs call this where an empty list would
    fail deep inside a data loader)."""
    items = datalists.get(role, [])
    if not items:
        hint = {"val": "no frame of an exam outside the training list has a mask in masks/<exam>/<stem>.png"}
        raise ValueError(f"no {role} frames in {dataset_dir}: {hint.get(role, 'check the data')}")
    return items
