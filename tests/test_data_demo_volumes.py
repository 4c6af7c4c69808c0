"""common.data.demo_volumes: the embedded synthetic 13-organ CT set (MSD layout, class-imbalanced, generated once)."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from common.data.demo_volumes import DEMO_ORGANS, make_demo_volume_dataset
from common.data.volume_folders import msd_cases, read_label_map, volume_datalists


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_volume_dataset(tmp_path_factory.mktemp("demo") / "demo", n_cases=4, shape=(64, 64, 40))


def test_msd_layout_and_label_map(demo):
    meta = json.loads((demo / "dataset.json").read_text())
    assert meta["numTraining"] == 4 and len(meta["training"]) == 4
    assert read_label_map(demo) == {0: "background", **{k: n for k, n in enumerate(DEMO_ORGANS, start=1)}}
    cases = msd_cases(demo, num_classes=14)  # shapes, affines and label values checked
    assert [c["case"] for c in cases] == ["case_0000", "case_0001", "case_0002", "case_0003"]


def test_volumes_are_3d_ct_with_every_organ_and_a_strong_imbalance(demo):
    image = nib.load(demo / "imagesTr" / "case_0000.nii.gz")
    label = nib.load(demo / "labelsTr" / "case_0000.nii.gz")
    assert image.shape == label.shape == (64, 64, 40) and np.array_equal(image.affine, label.affine)
    assert image.affine.diagonal().tolist() == [1.5, 1.5, 3.0, 1.0]
    hu = np.asarray(image.dataobj)
    assert hu.dtype == np.int16 and hu.min() < -900 and hu.max() > 150  # air and contrast-enhanced vessels
    counts = np.bincount(np.asarray(label.dataobj).ravel(), minlength=14)
    assert (counts[1:] > 0).all() and counts.size == 14
    # liver semi-axes 1.3 (0.14, 0.13, 0.18) (64, 64, 40) = (11.6, 10.8, 9.4) voxels -> 4/3 pi abc ~ 4.9e3 voxels;
    # adrenal 1.3 (0.015, 0.015, 0.03) (64, 64, 40) = (1.25, 1.25, 1.56) -> ~10 voxels: a ratio of a few hundred
    assert counts[6] / max(counts[12], counts[13]) > 100


def test_generated_once_and_deterministic(demo, tmp_path):
    before = (demo / "labelsTr" / "case_0001.nii.gz").stat().st_mtime_ns
    make_demo_volume_dataset(demo, n_cases=4, shape=(64, 64, 40))
    assert (demo / "labelsTr" / "case_0001.nii.gz").stat().st_mtime_ns == before
    other = make_demo_volume_dataset(tmp_path / "again", n_cases=4, shape=(64, 64, 40))
    for name in ("imagesTr/case_0002.nii.gz", "labelsTr/case_0002.nii.gz"):
        assert np.array_equal(np.asarray(nib.load(demo / name).dataobj), np.asarray(nib.load(other / name).dataobj))


def test_default_split_of_twelve_cases(tmp_path):
    root = make_demo_volume_dataset(tmp_path / "demo")
    roles = volume_datalists(root, labelled_percent=20, num_classes=14)
    # N = 12: n_test = 12 - floor(48/5) = 3, n_eval = 9 - floor(45/6) = 2, train 7, floor(0.2 * 7) = 1 labelled
    assert {k: len(v) for k, v in roles.items()} == {"labelled": 1, "unlabelled": 6, "eval": 2, "test": 3}


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n_cases must be >= 2"):
        make_demo_volume_dataset(tmp_path / "x", n_cases=1)
    with pytest.raises(ValueError, match="shape"):
        make_demo_volume_dataset(tmp_path / "x", shape=(8, 64, 40))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("data")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        make_demo_volume_dataset(tmp_path / "taken")
