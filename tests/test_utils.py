"""All-or-nothing output folders and overlay figures."""

import numpy as np
import pytest
from PIL import Image

from common.utils.figures import GT_COLOUR, PRED_COLOUR, save_overlay
from common.utils.files import publish_folder, staged_folder


def test_publish_replaces_the_previous_output_whole(tmp_path):
    target, staging = tmp_path / "out", tmp_path / "out.partial"
    target.mkdir()
    (target / "old.png").write_text("previous run")
    staging.mkdir()
    (staging / "new.png").write_text("this run")
    publish_folder(staging, target)
    assert [p.name for p in target.iterdir()] == ["new.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or backup folder left
    with pytest.raises(FileNotFoundError, match="nothing to publish"):
        publish_folder(staging, target)


def test_staged_folder_publishes_only_a_completed_block(tmp_path):
    out = tmp_path / "out"
    with staged_folder(out) as tmp:
        assert tmp.parent == tmp_path and not out.exists()  # nothing under the final name while writing
        (tmp / "a.txt").write_text("1")
    assert (out / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError), staged_folder(out) as tmp:
        (tmp / "b.txt").write_text("2")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the previous output, untouched
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # and no staging folder left behind


def test_overlay_draws_ground_truth_green_and_prediction_red(tmp_path):
    Image.new("RGB", (12, 10), (128, 128, 128)).save(tmp_path / "img.png")
    gt = np.zeros((10, 12))
    gt[2:8, 2:6] = 255
    pred = np.zeros((10, 12), bool)
    pred[2:8, 7:11] = True
    out = np.asarray(Image.open(save_overlay(tmp_path / "img.png", gt, pred, tmp_path / "o" / "x.png")))
    assert tuple(out[2, 2]) == GT_COLOUR and tuple(out[2, 7]) == PRED_COLOUR  # corners lie on the outlines
    assert tuple(out[0, 0]) == (128, 128, 128)  # away from both masks the image is unchanged
    with pytest.raises(ValueError, match="does not match"):
        save_overlay(tmp_path / "img.png", gt, pred[:5], tmp_path / "y.png")


def test_choose_names_the_id_and_the_choices():
    from common.utils.config import choose

    assert choose({"a": 1, "b": 2}, "b", "switch") == 2
    with pytest.raises(ValueError, match=r"switch must be one of \['a', 'b'\], got 'c'"):
        choose({"a": 1, "b": 2}, "c", "switch")
