"""Consumers of the EndoKED-MIL score export: per-bag CSVs of frame scores -> image lists of the WSSS stage.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging
Large Language and Vision Models", arXiv:2310.11173 (2023); specs/endoked.md §1, §2.7 and §7 row 10.

The MIL exporter writes one CSV per exam (bag) ``b`` into a folder, named ``<exam_id>_gt1.csv`` for a positive
bag (``Y_b = 1``) and ``<exam_id>_gt0.csv`` for a negative one, with the columns ``'0'`` = frame path and
``'1'`` = the student's polyp probability ``p_i in [0, 1]``, one row per frame in bag order. Relative frame
paths are taken relative to the CSV's folder.

Selection of the images that train the CAM network (:func:`select_wsss_images`):

* positives: every frame ``i`` of a positive bag with ``p_i >= tau`` (``tau = 0.8``), image label 1;
* negatives: from every negative bag of ``n`` frames, ``k = floor(f n)`` frames (``f = 0.1``: ``n // 10``),
  image label 0. The released loader takes the first ``k`` rows by original row order (it sorts by score but then
  indexes by the original row labels, ``dataset_loader_zhongshan_ALL.py:70-79``): ``negative_rule="first"``
  (faithful). The intended rule, the ``k`` frames with the lowest scores, is the default (``"lowest"``);
  ``"random"`` draws ``k`` frames without replacement.

:func:`write_positive_list` writes the positive list of §1 (``img_path,label_name``) that the CAM -> box -> SAM
stage reads; ``label_name`` is the pseudo mask's file name, a 5-digit running index + ``.png``.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.utils.files import write_csv

from .exam_bags import read_csv_table

__all__ = ["NEGATIVE_RULES", "read_bag_score_csvs", "select_wsss_images", "write_positive_list"]

logger = logging.getLogger(__name__)

NEGATIVE_RULES: tuple[str, ...] = ("lowest", "first", "random")
"""Ways of picking the ``floor(f n)`` negative frames of a negative bag (module docstring)."""

_BAG_CSV = re.compile(r"^(?P<exam>.+?)_gt(?P<label>[01])\.csv$")


def read_bag_score_csvs(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of every ``<exam_id>_gt1.csv`` / ``<exam_id>_gt0.csv`` in ``folder`` (module docstring).

    Other files are ignored. CSVs are read in name order, rows in file order.

    Returns:
        ``[{"image": absolute path str, "score": float, "bag_label": 0 | 1, "exam_id": str}, ...]``.

    Raises:
        FileNotFoundError: ``folder`` does not exist, holds no bag CSV, or a CSV names a frame that does not
            exist (the message names the CSV and the frame).
        ValueError: a CSV without the columns ``'0'`` and ``'1'``, a score that is not a number in ``[0, 1]``
            (CSV, row and value named), or one exam id with both a gt0 and a gt1 CSV.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"MIL score folder {folder} does not exist.")
    csvs = [(p, _BAG_CSV.match(p.name)) for p in sorted(folder.iterdir()) if p.is_file()]
    csvs = [(p, m) for p, m in csvs if m is not None]
    if not csvs:
        raise FileNotFoundError(f"no per-bag score CSV (<exam_id>_gt1.csv or <exam_id>_gt0.csv) in {folder}.")
    rows: list[dict[str, Any]] = []
    seen: dict[str, Path] = {}
    for path, match in csvs:
        exam_id, bag_label = match["exam"], int(match["label"])
        if exam_id in seen:
            raise ValueError(f"exam {exam_id!r} has two score CSVs, {seen[exam_id]} and {path}; a bag is either "
                             "positive (gt1) or negative (gt0).")
        seen[exam_id] = path
        table = read_csv_table(path, ("0", "1"))
        if not table:
            logger.warning("score CSV %s has no rows", path)
        for line, row in enumerate(table, start=2):
            image = Path(row["0"]).expanduser()
            image = image if image.is_absolute() else path.parent / image
            if not image.is_file():
                raise FileNotFoundError(f"{path}, line {line}: frame {image} does not exist.")
            try:
                score = float(row["1"])
            except ValueError:
                score = math.nan
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"{path}, line {line}: score {row['1']!r} of frame {image} is not a number in [0, 1].")
            rows.append({"image": str(image.absolute()), "score": score, "bag_label": bag_label, "exam_id": exam_id})
    return rows


def select_wsss_images(
    rows: Sequence[Mapping[str, Any]],
    positive_threshold: float = 0.8,
    negative_fraction: float = 0.1,
    negative_rule: str = "lowest",
    seed: int = 0,
    positive_top_k: int | None = None,
) -> list[dict[str, Any]]:
    """Images and image labels for the CAM network (module docstring).

    Args:
        rows: from :func:`read_bag_score_csvs` (``image``, ``score``, ``bag_label``, ``exam_id``); a bag's rows in
            their original order.
        positive_threshold: ``tau``; frames of positive bags with ``score >= tau`` are positives.
        negative_fraction: ``f``; ``floor(f n)`` frames of each negative bag of ``n`` frames are negatives.
        negative_rule: ``"lowest"`` (the ``k`` lowest scores, ties by row order; default), ``"first"`` (the first
            ``k`` rows, the released code) or ``"random"`` (``k`` rows drawn with ``numpy.random.default_rng(seed)``,
            one stream over the bags in order).
        seed: seed of ``"random"``.
        positive_top_k: instead of the threshold, the ``k`` highest-scored frames of every positive bag (ties by row
            order), as EndoKED's "Large" loader does with ``k = 2`` (§2.7); it keeps every positive exam in play
            when the scores are not (yet) calibrated.

    Returns:
        ``[{"image": str, "label": 1}, ...]`` for the positives in row order, then ``[{"image": str, "label": 0}]``
        for the negatives, bag by bag, each bag's picks in row order.

    Raises:
        ValueError: threshold or fraction outside ``[0, 1]``, an unknown rule, or rows of one exam with different
            bag labels.
    """
    if not 0.0 <= positive_threshold <= 1.0 or not 0.0 <= negative_fraction <= 1.0:
        raise ValueError(f"positive_threshold and negative_fraction must be in [0, 1], got {positive_threshold} "
                         f"and {negative_fraction}.")
    if negative_rule not in NEGATIVE_RULES:
        raise ValueError(f"negative_rule must be one of {NEGATIVE_RULES}, got {negative_rule!r}.")
    if positive_top_k is not None and int(positive_top_k) < 1:
        raise ValueError(f"positive_top_k must be >= 1 or None, got {positive_top_k}.")
    bags: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        bag = bags.setdefault(str(row["exam_id"]), [])
        if bag and int(bag[0]["bag_label"]) != int(row["bag_label"]):
            raise ValueError(f"exam {row['exam_id']!r} has rows with bag labels {bag[0]['bag_label']} and "
                             f"{row['bag_label']}; one bag has one label.")
        bag.append(row)
    rng = np.random.default_rng(seed)
    positives, negatives = [], []
    for bag in bags.values():
        if int(bag[0]["bag_label"]) == 1:
            if positive_top_k is None:
                picked = [i for i, r in enumerate(bag) if float(r["score"]) >= positive_threshold]
            else:
                picked = sorted(sorted(range(len(bag)), key=lambda i: -float(bag[i]["score"]))[:int(positive_top_k)])
            positives += [{"image": bag[i]["image"], "label": 1} for i in picked]
            continue
        k = math.floor(negative_fraction * len(bag) + 1e-9)  # the epsilon keeps e.g. 0.1 * 30 from flooring to 2
        if negative_rule == "first":
            picked = range(k)
        elif negative_rule == "lowest":
            picked = sorted(sorted(range(len(bag)), key=lambda i: float(bag[i]["score"]))[:k])
        else:
            picked = sorted(rng.choice(len(bag), size=k, replace=False).tolist())
        negatives += [{"image": bag[i]["image"], "label": 0} for i in picked]
    if not positives:
        logger.warning("no frame of a positive bag reaches the score threshold %s", positive_threshold)
    logger.info("selected %d positive and %d negative images from %d bags (negative rule %r)", len(positives),
                len(negatives), len(bags), negative_rule)
    return positives + negatives


def write_positive_list(rows: Sequence[Mapping[str, Any]], csv_path: str | os.PathLike) -> Path:
    """Write the positive image list of spec §1: header ``img_path,label_name``, ``label_name`` = 5-digit running
    index from 0 + ``.png`` (``00000.png``, ``00001.png``, ...), the pseudo mask's file name.

    Args:
        rows: dicts with ``"image"``; rows with a ``"label"`` other than 1 (the negatives of
            :func:`select_wsss_images`) are not written.
        csv_path: output CSV, written atomically.

    Raises:
        ValueError: no positive row to write.
    """
    images = [str(r["image"]) for r in rows if int(r.get("label", 1)) == 1]
    if not images:
        raise ValueError(f"no positive image to write to {csv_path}.")
    return write_csv(csv_path, ("img_path", "label_name"), [(image, f"{i:05d}.png") for i, image in enumerate(images)])
