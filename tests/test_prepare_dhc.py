"""scripts/prepare_dhc.py end to end on tiny Decathlon, AMOS and Synapse folders written with nibabel.

Expected counts and values are worked out by hand; the arithmetic is in the comments."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from common.data.volume_folders import dhc_datalists, dhc_npy_cases
from conftest import REPO_ROOT, load_script
from test_data_volume_folders import make_msd, tiny_image, tiny_label, write_nifti


prepare_dhc = load_script("prepare_dhc")


def _ids(path) -> list[str]:
    return path.read_text().split()


def test_end_to_end_on_a_tiny_decathlon_folder(tmp_path):
    src = make_msd(tmp_path / "src", n=6)
    dst = tmp_path / "out"
    prepare_dhc.prepare(str(src), str(dst), labelled_percent=[25, 50], seed=0, n_eval=1, n_test=1,
                        spatial_size=(8, 12, 10))
    splits = dst / "splits"
    assert sorted(p.name for p in splits.iterdir()) == [
        "eval.txt", "labeled_25p.txt", "labeled_50p.txt", "test.txt", "train.txt", "unlabeled_25p.txt",
        "unlabeled_50p.txt"]
    train, eval_, test = _ids(splits / "train.txt"), _ids(splits / "eval.txt"), _ids(splits / "test.txt")
    # N = 6, n_eval = n_test = 1 -> 4 train; 25 % -> floor(1.0) = 1 labelled, 50 % -> floor(2.0) = 2 labelled
    assert (len(train), len(eval_), len(test)) == (4, 1, 1)
    assert sorted(train + eval_ + test) == [f"case_{i:04d}" for i in range(6)]
    l25, l50 = _ids(splits / "labeled_25p.txt"), _ids(splits / "labeled_50p.txt")
    assert len(l25) == 1 and len(l50) == 2 and set(l25) < set(l50)  # nested labelled sets
    assert sorted(l50 + _ids(splits / "unlabeled_50p.txt")) == train
    # npy: (D, H, W) = spatial_size, image float32 in [0, 1] (min-max: exactly 0 and 1), labels uint8 in 0..3
    for case in dhc_npy_cases(dst, num_classes=4):
        image, label = np.load(case["image"]), np.load(case["label"])
        assert image.shape == label.shape == (8, 12, 10)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.min() == 0.0 and image.max() == 1.0
        assert set(np.unique(label).tolist()) <= {0, 1, 2, 3}
    record = json.loads((dst / "prepare_dhc.json").read_text())
    assert record["counts"] == {"train": 4, "eval": 1, "test": 1} and record["window"] == [-75.0, 275.0]
    assert record["labels"]["3"] == "c" and record["spatial_size"] == [8, 12, 10]
    lists = dhc_datalists(dst, 50, num_classes=4)  # the output reads back as a DHC folder
    assert [c["case"] for c in lists["labelled"]] == l50
    # the same seed gives the same split files
    prepare_dhc.prepare(str(src), str(tmp_path / "again"), labelled_percent=[25, 50], seed=0, n_eval=1, n_test=1,
                        spatial_size=(8, 12, 10))
    for name in ("train.txt", "eval.txt", "test.txt", "labeled_25p.txt", "labeled_50p.txt"):
        assert (tmp_path / "again" / "splits" / name).read_text() == (splits / name).read_text()


def test_native_resolution_keeps_the_grid_in_dhc_axis_order(tmp_path):
    src = make_msd(tmp_path / "src", n=3)
    dst = tmp_path / "out"
    prepare_dhc.prepare(str(src), str(dst), labelled_percent=100, n_eval=1, n_test=1, spatial_size=None)
    # NIfTI (x, y, z) = (20, 24, 28) -> (D, H, W) = (28, 24, 20); the label is transposed voxel for voxel
    label = np.load(dst / "npy" / "case_0001_label.npy")
    assert label.shape == (28, 24, 20)
    np.testing.assert_array_equal(label, tiny_label().transpose(2, 1, 0))
    # image: clip(x, -75, 275) then (x - min) / (max - min), checked at one voxel of air and by its range
    image = np.load(dst / "npy" / "case_0001_image.npy")
    raw = np.clip(tiny_image(1).astype(np.float32), -75, 275).transpose(2, 1, 0)
    assert raw.min() == -75  # air clipped to -75 -> 0
    assert image[0, 0, 0] == 0.0  # voxel (0, 0, 0) is air (-1000 HU)
    np.testing.assert_allclose(image, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-6)
    assert len(_ids(dst / "splits" / "labeled_100p.txt")) == 1  # N_train = 3 - 1 - 1 = 1, all labelled


def test_amos_layout_takes_test_from_validation(tmp_path):
    src = make_msd(tmp_path / "amos", n=10, prefix="amos")
    make_msd(src, n=2, section="validation", prefix="amos", start=500)
    assert prepare_dhc.detect_layout(src) == "amos"
    dst = tmp_path / "out"
    prepare_dhc.prepare(str(src), str(dst), labelled_percent=20, spatial_size=(4, 6, 5))
    # 10 imagesTr: eval = 10 - floor(9 * 10 / 10) = 1, train = 9; 20 % -> floor(1.8) = 1 labelled; test = imagesVa
    splits = dst / "splits"
    assert (len(_ids(splits / "train.txt")), len(_ids(splits / "eval.txt"))) == (9, 1)
    assert _ids(splits / "test.txt") == ["amos_0500", "amos_0501"]
    assert len(_ids(splits / "labeled_20p.txt")) == 1
    assert (dst / "npy" / "amos_0501_label.npy").is_file()


def test_synapse_layout_ids(tmp_path):
    base = tmp_path / "Synapse" / "RawData" / "Training"
    for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10):
        write_nifti(base / "img" / f"img{i:04d}.nii.gz", tiny_image(i))
        write_nifti(base / "label" / f"label{i:04d}.nii.gz", tiny_label())
    dst = tmp_path / "out"
    prepare_dhc.prepare(str(tmp_path / "Synapse"), str(dst), labelled_percent=20, spatial_size=(4, 6, 5))
    # N = 10: train+eval = floor(4 * 10 / 5) = 8, test = 2; train = floor(5 * 8 / 6) = 6, eval = 2;
    # 20 % of 6 -> floor(1.2) = 1 labelled
    splits = dst / "splits"
    assert [len(_ids(splits / f)) for f in ("train.txt", "eval.txt", "test.txt", "labeled_20p.txt")] == [6, 2, 2, 1]
    assert (dst / "npy" / "0007_image.npy").is_file()
    assert json.loads((dst / "prepare_dhc.json").read_text())["labels"]["6"] == "liver"


def test_refuses_a_non_empty_output_and_writes_nothing_on_bad_splits(tmp_path):
    src = make_msd(tmp_path / "src", n=6)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"output folder .*out exists and is not empty"):
        prepare_dhc.prepare(str(src), str(dst))
    assert sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    # N_train = 6 - 1 - 1 = 4: 10 % -> floor(0.4) = 0 labelled -> refused before anything is written
    with pytest.raises(ValueError, match=r"labelled_percent=10 of N=4"):
        prepare_dhc.prepare(str(src), str(tmp_path / "new"), labelled_percent=10, n_eval=1, n_test=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]
    with pytest.raises(FileNotFoundError, match="source folder .* does not exist"):
        prepare_dhc.prepare(str(tmp_path / "missing"), str(tmp_path / "new"))
    with pytest.raises(ValueError, match="layout must be"):
        prepare_dhc.prepare(str(src), str(tmp_path / "new"), layout="brats")


def test_failure_midway_leaves_no_output(tmp_path, monkeypatch):
    src = make_msd(tmp_path / "src", n=4)
    calls = []

    def failing_save(path, array):
        calls.append(path)
        if len(calls) == 3:
            raise OSError("disk full")
        with open(path, "wb") as f:
            np.lib.format.write_array(f, array)

    monkeypatch.setattr(prepare_dhc.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        prepare_dhc.prepare(str(src), str(tmp_path / "out"), labelled_percent=50, n_eval=1, n_test=1,
                            spatial_size=(4, 6, 5))
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no out, no temp folder


@pytest.mark.slow
def test_command_line(tmp_path):
    src = make_msd(tmp_path / "src", n=4)
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "prepare_dhc.py"), "--src", str(src), "--dst",
         str(tmp_path / "out"), "--labelled_percent", "50", "--n_eval", "1", "--n_test", "1", "--spatial_size",
         "[4,6,5]"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "labelled 50%: 1 labelled / 1 unlabelled" in result.stderr  # N_train = 2, floor(0.5 * 2) = 1
    assert np.load(tmp_path / "out" / "npy" / "case_0002_image.npy").shape == (4, 6, 5)
