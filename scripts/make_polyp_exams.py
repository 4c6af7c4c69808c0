"""Build an exam (bag) dataset for report-supervised MIL from public polyp frames with masks.

Usage::

    python scripts/make_polyp_exams.py --polyp_root ../shared/data/polyp --out_dir /tmp/polyp_exams
    python scripts/make_polyp_exams.py --polyp_root /data/PraNet --out_dir ./exams --frames_per_exam "[4,8]" \
        --positive_fraction 0.5 --crop_fraction 0.35 --size "[352,352]" --seed 0

Every source frame with its mask is a positive frame; its polyp-free crop (the largest window with the frame's
aspect that avoids the dilated mask, at least ``crop_fraction`` of the side) is a negative frame. Positive exams
mix positive frames and negative crops, negative exams hold only negative crops, and a source frame and its crop
never fall in different exams. The output follows the layout of :py:mod:`common.data.exam_bags` with
``exam_labels.csv`` and matching English/Chinese ``reports.csv`` (so the report labeller can be checked on it),
``instance_labels.csv``, ``masks/`` and ``sources.csv``; see
:py:func:`common.data.exam_bags.make_exams_from_polyp_sets` (EndoKED, Wang et al., arXiv:2310.11173).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import fire

from common.data.exam_bags import make_exams_from_polyp_sets

__all__ = ["make_polyp_exams"]

logger = logging.getLogger("make_polyp_exams")


def make_polyp_exams(
    polyp_root: str,
    out_dir: str,
    frames_per_exam: Sequence[int] = (3, 6),
    positive_fraction: float = 0.5,
    crop_fraction: float = 0.35,
    size: Sequence[int] = (352, 352),
    seed: int = 0,
) -> str:
    """Write the exam dataset built from the polyp sets under ``polyp_root`` to ``out_dir`` (module docstring).

    Args:
        polyp_root: PraNet, flat ``<Set>/images|masks`` or Kvasir-SEG folder.
        out_dir: new or empty output folder.
        frames_per_exam: ``(min, max)`` frames per exam.
        positive_fraction: fraction of positive exams.
        crop_fraction: smallest side of a negative crop, as a fraction of the frame's side.
        size: ``(height, width)`` of every written frame.
        seed: seed of the shuffles and draws.

    Returns:
        ``out_dir``.
    """
    out = make_exams_from_polyp_sets(polyp_root, out_dir, frames_per_exam=frames_per_exam,
                                     positive_fraction=positive_fraction, crop_fraction=crop_fraction, size=size,
                                     seed=seed)
    logger.info("exam dataset written to %s", out)
    return str(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(make_polyp_exams)
