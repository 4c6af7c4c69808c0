"""How good can the box refiner be? Pseudo masks from the ground-truth box of every polyp frame of an exam dataset.

The EndoKED pseudo-mask stage is CAM -> box -> refiner (specs/endoked.md §3.6). Feeding the ground-truth mask as the
"CAM" gives the box the refiner would get from a perfect CAM, so the mean Dice of the refined masks against the same
ground truth is the ceiling of the refiner alone (GrabCut offline, SAM with a checkpoint)::

    python scripts/refiner_ceiling.py --exams /data/exams --out_dir /tmp/ceiling [--refiner sam --sam_checkpoint ...]
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import fire
import numpy as np
from PIL import Image

from common.data.exam_bags import INSTANCE_LABELS_CSV
from common.data.wsss_images import exam_mask_paths
from common.engines.pseudo_masks import generate_pseudo_masks
from common.networks.box_refiners import make_box_refiner


def refiner_ceiling(exams: str, out_dir: str, refiner: str = "grabcut", sam_checkpoint: str | None = None,
                    sam_model_type: str = "vit_h", overlay_count: int = 4) -> dict[str, float | int | str]:
    """Pseudo masks of the polyp frames of ``exams`` (``instance_labels.csv`` label 1) from their ground-truth boxes,
    written to ``out_dir`` (``common.engines.pseudo_masks`` layout); logs and returns the counts and the mean Dice."""
    root = Path(exams)
    with open(root / INSTANCE_LABELS_CSV, newline="") as f:
        frames = [str(root / row["image"]) for row in csv.DictReader(f) if row["label"] == "1"]
    gt = exam_mask_paths(frames)
    missing = [f for f in frames if f not in gt]
    if not frames or missing:
        raise ValueError(f"{root}: {len(frames)} polyp frame(s), {len(missing)} without a mask in masks/ "
                         f"(e.g. {missing[:1]})")
    truth = {f: np.asarray(Image.open(gt[f]).convert("L"), np.float32) / 255.0 for f in frames}
    order = iter(frames)
    result = generate_pseudo_masks(frames, lambda image: truth[next(order)],
                                   make_box_refiner(refiner, sam_checkpoint=sam_checkpoint,
                                                    sam_model_type=sam_model_type),
                                   out_dir, threshold=0.5, gt_paths=gt, overlay_count=overlay_count, progress=False)
    logging.getLogger("refiner_ceiling").info("%s refiner on ground-truth boxes: %d of %d frames accepted, mean Dice "
                                              "%.3f", refiner, result.n_accepted, result.n_images, result.mean_dice)
    return {"images": result.n_images, "accepted": result.n_accepted, "mean_dice": result.mean_dice,
            "out_dir": str(result.out_dir)}


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    fire.Fire(refiner_ceiling)
