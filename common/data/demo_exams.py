"""Embedded default exam dataset: synthetic colonoscopy exams (bags of frames) with free-text reports.

A report-supervised MIL bundle run without ``dataset_dir`` uses this dataset, so that it works offline and out
of the box (nothing is ever downloaded)::

    "dataset_dir": "$common.data.demo_exams.ensure_demo_exam_dataset(@bundle_root + '/data/demo_exams')"

Layout (:py:mod:`common.data.exam_bags`), without ``exam_labels.csv``: the report labeller writes it::

    <root>/exams/<exam_id>/frame_NN.jpg     RGB JPEG frames of one exam
    <root>/masks/<exam_id>/frame_NN.png     0/255 polyp mask of every frame (all zero for polyp-free frames)
    <root>/reports.csv                      exam_id,report (UTF-8, English and Chinese alternating)
    <root>/instance_labels.csv              image,label (frame path relative to <root>, 1 = the frame shows a polyp)
    <root>/.complete                        JSON marker with the generator's parameters, written last

Exams (EndoKED, Wang et al., arXiv:2310.11173, §1 of specs/endoked.md: one exam = one report = one bag):

* ``n_exams`` exams with a definite report, half of them positive (``n_exams // 2``): a positive exam has
  ``n_p`` polyp frames, ``n_p`` drawn uniformly from ``[ceil(0.3 n), floor(0.6 n)]`` clipped to ``[1, n - 1]``
  for ``n`` frames, the others polyp-free; a negative exam has only polyp-free frames. ``n`` is drawn uniformly
  from ``frames[0]..frames[1]``. Reports read like "A 6 mm sessile polyp in the sigmoid colon, removed by cold
  snare." / "乙状结肠见一枚0.6cm息肉" or "No polyps were seen." / "全结肠未见息肉"
  (:func:`common.data.exam_bags.exam_report`);
* ``n_uncertain`` more exams with a hedged report ("Possible small polyp ..., not confirmed" / "可疑息肉"), which
  a report labeller should leave out; the first has polyp frames, the next none, alternating.

Exam order is a seeded shuffle. Frames are drawn by the demo polyp renderer
(:py:mod:`common.data.demo_polyps`, ``render_frame``) at twice the frame size, with smaller polyps, and cut to
the frame size ``(h, w)``: a polyp frame is a window that holds the whole polyp mask (a random one among
those that do); a polyp-free frame is a window inside :func:`common.data.exam_bags.polyp_free_window` of the
rendered mask (at least half the side), so polyp and polyp-free frames share scale, texture and lighting and
differ only by the polyp. A render without a suitable window is drawn again.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .demo_polyps import JPEG_QUALITY, render_frame, FrameStyle
from .exam_bags import EXAMS_DIR, INSTANCE_LABELS_CSV, MASKS_DIR, REPORTS_CSV, exam_report, polyp_free_window
from .generated import ensure_generated

__all__ = ["make_demo_exam_dataset", "ensure_demo_exam_dataset"]

GENERATOR_VERSION = 1
_MAX_RENDERS = 50
_EXAM_STYLE = FrameStyle(semi_axis=(0.05, 0.11), height=(0.6, 1.0), tint=1.0, light=(1.0, 1.0, 1.0), vignette=0.35,
                     gain=1.0)
"""Polyp semi-axis as a fraction of the doubled render width: 10-22 % of a frame's width."""


def _render_window(rng: np.random.Generator, size: tuple[int, int], polyp: bool) -> tuple[np.ndarray, np.ndarray]:
    """One ``(h, w)`` frame cut from a ``(2h, 2w)`` render (module docstring): ``(rgb (h, w, 3), mask (h, w))``
    uint8, mask 0/255 (all zero when ``polyp`` is False)."""
    h, w = size
    for _ in range(_MAX_RENDERS):
        rgb, mask = render_frame(rng, 2 * h, 2 * w, _EXAM_STYLE)
        if polyp:
            ys, xs = np.nonzero(mask)
            if not len(ys):
                continue
            y_range = (max(0, int(ys.max()) + 1 - h), min(int(ys.min()), h))  # top rows whose window holds the polyp
            x_range = (max(0, int(xs.max()) + 1 - w), min(int(xs.min()), w))
            if y_range[0] > y_range[1] or x_range[0] > x_range[1]:
                continue
        else:
            free = polyp_free_window(mask, crop_fraction=0.5)
            if free is None:
                continue
            y0, x0, y1, x1 = free
            y_range, x_range = (y0, y1 - h), (x0, x1 - w)
        top, left = int(rng.integers(y_range[0], y_range[1] + 1)), int(rng.integers(x_range[0], x_range[1] + 1))
        window = (slice(top, top + h), slice(left, left + w))
        return rgb[window], (mask[window] if polyp else np.zeros((h, w), np.uint8))
    raise RuntimeError(f"no {'polyp' if polyp else 'polyp-free'} window of {size} in {_MAX_RENDERS} renders.")


def make_demo_exam_dataset(
    folder: str | os.PathLike,
    n_exams: int = 12,
    frames: Sequence[int] = (4, 8),
    size: Sequence[int] = (96, 128),
    seed: int = 0,
    n_uncertain: int = 2,
) -> Path:
    """Generate the synthetic exam dataset at ``folder`` (module docstring), unless it is there.

    Written once, atomically and under a file lock (:func:`common.data.generated.ensure_generated`, as the demo
    polyp dataset): a second call with the same parameters returns at once; a folder made by this generator with
    other parameters is regenerated; any other non-empty folder is refused (FileExistsError).
    Deterministic: the same arguments give the same bytes (same numpy, Pillow and libjpeg).

    Args:
        folder: dataset folder to create.
        n_exams: exams with a definite report, ``n_exams // 2`` of them positive; at least 2.
        frames: range ``(min, max)`` of the number of frames per exam, ``2 <= min <= max``.
        size: frame size ``(height, width)``, each at least 32 pixels.
        seed: random seed.
        n_uncertain: extra exams with an uncertain report, ``>= 0``.

    Returns:
        ``folder`` as a Path.

    Raises:
        ValueError: bad counts, frame range or size.
        FileExistsError: ``folder`` exists, is not empty and was not made by this generator.
    """
    frames = tuple(int(n) for n in frames)
    size = tuple(int(s) for s in size)
    if int(n_exams) < 2 or int(n_uncertain) < 0:
        raise ValueError(f"n_exams must be >= 2 and n_uncertain >= 0, got n_exams={n_exams}, "
                         f"n_uncertain={n_uncertain}.")
    if len(frames) != 2 or not 2 <= frames[0] <= frames[1]:
        raise ValueError(f"frames must be (min, max) with 2 <= min <= max, got {frames}.")
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width) with both >= 32 pixels, got {size}.")
    params = {"generator": __name__, "version": GENERATOR_VERSION, "n_exams": int(n_exams), "frames": list(frames),
              "size": list(size), "seed": int(seed), "n_uncertain": int(n_uncertain)}

    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(np.random.SeedSequence([int(seed)]))
        n_pos = int(n_exams) // 2
        # (report label, has polyp frames): definite positives and negatives, then uncertain ones alternating
        kinds = [(1, True)] * n_pos + [(0, False)] * (int(n_exams) - n_pos)
        kinds += [(None, i % 2 == 0) for i in range(int(n_uncertain))]
        files, instance_rows, report_rows = [], [], []
        for index, k in enumerate(rng.permutation(len(kinds))):
            report_label, has_polyp = kinds[k]
            exam_id = f"exam_{index:03d}"
            n = int(rng.integers(frames[0], frames[1] + 1))
            n_polyp = 0
            if has_polyp:
                low, high = max(1, math.ceil(0.3 * n)), max(1, min(n - 1, math.floor(0.6 * n)))
                n_polyp = int(rng.integers(low, max(low, high) + 1))
            polyp_frames = set(rng.choice(n, size=n_polyp, replace=False).tolist())
            (tmp / EXAMS_DIR / exam_id).mkdir(parents=True)
            (tmp / MASKS_DIR / exam_id).mkdir(parents=True)
            for j in range(n):
                rgb, mask = _render_window(rng, size, j in polyp_frames)
                image_rel = f"{EXAMS_DIR}/{exam_id}/frame_{j:02d}.jpg"
                mask_rel = f"{MASKS_DIR}/{exam_id}/frame_{j:02d}.png"
                Image.fromarray(rgb).save(tmp / image_rel, quality=JPEG_QUALITY)
                Image.fromarray(mask).save(tmp / mask_rel)
                files += [image_rel, mask_rel]
                instance_rows.append((image_rel, int(j in polyp_frames)))
            report_rows.append((exam_id, exam_report(report_label, rng, ("en", "zh")[index % 2])))
        for name, header, rows in ((REPORTS_CSV, ("exam_id", "report"), report_rows),
                                   (INSTANCE_LABELS_CSV, ("image", "label"), instance_rows)):
            with open(tmp / name, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
            files.append(name)
        return files

    return ensure_generated(folder, params, write, "demo exam dataset")


def ensure_demo_exam_dataset(folder: str | os.PathLike, **kwargs) -> str:
    """:py:func:`make_demo_exam_dataset` returning ``str(folder)``, for config expressions such as
    ``"dataset_dir": "$common.data.demo_exams.ensure_demo_exam_dataset(@bundle_root + '/data/demo_exams')"``."""
    return str(make_demo_exam_dataset(folder, **kwargs))
