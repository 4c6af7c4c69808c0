"""scripts/refiner_ceiling.py: ground-truth boxes through the refiner, on the demo exams."""

from __future__ import annotations

from common.data.demo_exams import make_demo_exam_dataset

from conftest import load_script, read_csv


def test_threshold_refiner_on_ground_truth_boxes_reproduces_the_masks(tmp_path):
    exams = make_demo_exam_dataset(tmp_path / "exams", n_exams=4, frames=(4, 4))
    result = load_script("refiner_ceiling").refiner_ceiling(str(exams), str(tmp_path / "out"), refiner="threshold",
                                                            overlay_count=0)
    polyp_frames = [r for r in read_csv(exams / "instance_labels.csv") if r["label"] == "1"]
    assert result["images"] == len(polyp_frames) > 0
    # the "refined" mask is the thresholded ground truth itself: every accepted frame scores Dice 1
    assert result["accepted"] > 0 and result["mean_dice"] == 1.0
