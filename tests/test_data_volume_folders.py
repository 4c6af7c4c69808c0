"""Tests of the CT/MR volume readers and split builder (common.data.volume_folders) and of the DHC preprocessing
chain (common.transforms.dhc_preprocessing). Expected values are worked out by hand; the arithmetic is in the
comments."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from common.data.volume_folders import (
    ROLES,
    check_case,
    datalists_from_splits,
    dhc_datalists,
    dhc_npy_cases,
    make_splits,
    msd_cases,
    msd_datalists,
    msd_test_images,
    n_labelled,
    read_dhc_splits,
    read_label_map,
    split_file_names,
    synapse_cases,
    volume_datalists,
    write_dhc_splits,
)
from common.transforms.dhc_preprocessing import dhc_preprocessing
from conftest import require_data

# ---------------------------------------------------------------------------------------------------- helpers

SHAPE = (20, 24, 28)  # NIfTI (x, y, z)
NUM_CLASSES = 4


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 3.0, 1.0]) if affine is None else affine), str(path))
    return path


def tiny_label(shape=SHAPE) -> np.ndarray:
    """Background with one block of each organ 1..3 (sizes 6^3, 4^3, 2^3: an imbalanced toy abdomen)."""
    label = np.zeros(shape, dtype=np.uint8)
    label[2:8, 2:8, 2:8] = 1
    label[10:14, 10:14, 10:14] = 2
    label[15:17, 15:17, 15:17] = 3
    return label


def tiny_image(seed: int, shape=SHAPE) -> np.ndarray:
    """HU-like int16 volume: air (-1000) with organs around 0..300 HU, so the -75..275 clip is exercised."""
    rng = np.random.default_rng(seed)
    image = np.full(shape, -1000, dtype=np.int16)
    image[tiny_label(shape) > 0] = 60
    image[1:19, 1:23, 1:27] += rng.integers(-40, 300, size=(18, 22, 26)).astype(np.int16)
    return image


def make_msd(root: Path, n: int = 6, shape=SHAPE, labels=None, section: str = "training",
             prefix: str = "case", start: int = 0) -> Path:
    """A Decathlon folder with ``n`` cases ``<prefix>_XXXX`` of ``shape`` and C = 4 classes."""
    folder = {"training": "Tr", "validation": "Va"}[section]
    entries = []
    for i in range(start, start + n):
        name = f"{prefix}_{i:04d}.nii.gz"
        write_nifti(root / f"images{folder}" / name, tiny_image(i, shape))
        write_nifti(root / f"labels{folder}" / name, tiny_label(shape))
        entries.append({"image": f"./images{folder}/{name}", "label": f"./labels{folder}/{name}"})
    path = root / "dataset.json"
    content = json.loads(path.read_text()) if path.is_file() else {
        "name": "tiny", "labels": labels or {"0": "background", "1": "a", "2": "b", "3": "c"}}
    content[section] = entries
    path.write_text(json.dumps(content))
    return root


def make_dhc(root: Path, cases=("a", "b", "c", "d", "e"), shape=(4, 6, 8)) -> Path:
    """A DHC npy folder with splits labelled {a}, unlabelled {b, c}, eval {d}, test {e} at 20 %."""
    (root / "npy").mkdir(parents=True)
    for case in cases:
        np.save(root / "npy" / f"{case}_image.npy", np.zeros(shape, np.float32))
        np.save(root / "npy" / f"{case}_label.npy", np.ones(shape, np.float32))  # float labels, as DHC stores them
    write_dhc_splits(root, {"labelled": ["a"], "unlabelled": ["b", "c"], "eval": ["d"], "test": ["e"]}, 20)
    return root


# ---------------------------------------------------------------------------------------------------- Decathlon


def test_msd_cases_lists_sorted_checked_pairs(tmp_path):
    make_msd(tmp_path, n=3)
    cases = msd_cases(tmp_path)
    assert [c["case"] for c in cases] == ["case_0000", "case_0001", "case_0002"]
    assert cases[1] == {"image": str(tmp_path / "imagesTr" / "case_0001.nii.gz"),
                        "label": str(tmp_path / "labelsTr" / "case_0001.nii.gz"), "case": "case_0001"}


def test_read_label_map_accepts_decathlon_and_nnunet_forms(tmp_path):
    make_msd(tmp_path, n=1)
    assert read_label_map(tmp_path) == {0: "background", 1: "a", 2: "b", 3: "c"}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "liver": 1}, "training": []}))
    assert read_label_map(tmp_path) == {0: "background", 1: "liver"}


def test_msd_test_images_are_optional(tmp_path):
    make_msd(tmp_path, n=1)
    assert msd_test_images(tmp_path) == []
    write_nifti(tmp_path / "imagesTs" / "case_0100.nii.gz", tiny_image(0))
    assert msd_test_images(tmp_path) == [{"image": str(tmp_path / "imagesTs" / "case_0100.nii.gz"),
                                          "case": "case_0100"}]


def test_msd_datalists_roles(tmp_path):
    make_msd(tmp_path, n=6)
    # N = 6, n_eval = n_test = 1 -> N_train = 4; 50 % -> floor(0.5 * 4) = 2 labelled, 2 unlabelled
    lists = msd_datalists(tmp_path, labelled_percent=50, n_eval=1, n_test=1, seed=3)
    assert list(lists) == list(ROLES)
    assert [len(lists[r]) for r in ROLES] == [2, 2, 1, 1]
    assert sorted(c["case"] for r in ROLES for c in lists[r]) == [f"case_{i:04d}" for i in range(6)]
    pinned = {"labelled": ["case_0000"], "unlabelled": ["case_0001"], "eval": ["case_0002"], "test": []}
    lists = msd_datalists(tmp_path, splits=pinned)
    assert [c["case"] for c in lists["labelled"]] == ["case_0000"] and lists["test"] == []


def test_synapse_raw_layout(tmp_path):
    base = tmp_path / "RawData" / "Training"
    for case in ("0001", "0002"):
        write_nifti(base / "img" / f"img{case}.nii.gz", tiny_image(0))
        write_nifti(base / "label" / f"label{case}.nii.gz", tiny_label())
    cases = synapse_cases(tmp_path, num_classes=NUM_CLASSES)
    assert [c["case"] for c in cases] == ["0001", "0002"]
    assert cases[0]["label"] == str(base / "label" / "label0001.nii.gz")
    (base / "label" / "label0002.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"case '0002'.*has no label .*label0002\.nii\.gz"):
        synapse_cases(tmp_path)


# ---------------------------------------------------------------------------------------------------- splits


def test_make_splits_synapse_protocol_counts():
    ids = [f"{i:04d}" for i in range(30)]
    for percent, expected in ((10, 2), (20, 4), (40, 8)):
        # N = 30: train+eval = floor(4*30/5) = 24, test = 6; train = floor(5*24/6) = 20, eval = 4;
        # labelled = floor(r * 20): 10 % -> 2, 20 % -> 4, 40 % -> 8
        s = make_splits(ids, percent, seed=0)
        assert (len(s["train"]), len(s["eval"]), len(s["test"])) == (20, 4, 6)
        assert (len(s["labelled"]), len(s["unlabelled"])) == (expected, 20 - expected)
        assert sorted(s["labelled"] + s["unlabelled"]) == s["train"]
        assert sorted(s["train"] + s["eval"] + s["test"]) == ids
    # one seed: same train/eval/test for every percentage, labelled sets nested (prefixes of one permutation)
    s10, s20, s40 = (make_splits(ids, p, seed=0) for p in (10, 20, 40))
    assert s10["test"] == s20["test"] == s40["test"] and s10["eval"] == s40["eval"]
    assert set(s10["labelled"]) < set(s20["labelled"]) < set(s40["labelled"])


def test_make_splits_amos_and_n20_counts():
    ids = [f"amos_{i:04d}" for i in range(240)]
    for percent, expected in ((2, 4), (5, 10), (10, 21)):
        # 240 - 24 eval = 216 train: 2 % -> floor(4.32) = 4, 5 % -> floor(10.8) = 10, 10 % -> floor(21.6) = 21
        s = make_splits(ids, percent, n_eval=24, n_test=0, seed=1)
        assert (len(s["train"]), len(s["eval"]), len(s["test"]), len(s["labelled"])) == (216, 24, 0, expected)
    # N = 20 training cases, 20 % -> floor(0.2 * 20) = 4 labelled
    s = make_splits([str(i) for i in range(20)], 20, n_eval=0, n_test=0)
    assert (len(s["labelled"]), len(s["unlabelled"])) == (4, 16)
    assert n_labelled(216, 2.5) == 5  # floor(0.025 * 216) = floor(5.4) = 5


def test_make_splits_is_reproducible_with_the_seed():
    ids = [f"c{i}" for i in range(12)]
    a = make_splits(ids, 50, n_eval=2, n_test=2, seed=7)
    assert a == make_splits(list(reversed(ids)), 50, n_eval=2, n_test=2, seed=7)  # input order does not matter
    others = [make_splits(ids, 50, n_eval=2, n_test=2, seed=s) for s in range(8, 12)]
    assert any(o["test"] != a["test"] or o["labelled"] != a["labelled"] for o in others)


def test_zero_labelled_percentage_is_refused():
    ids = [str(i) for i in range(6)]
    # N_train = 6 - 1 - 1 = 4; floor(0.2 * 4) = floor(0.8) = 0 labelled -> refused; 25 % would give 1
    with pytest.raises(ValueError, match=r"labelled_percent=20 of N=4 training cases .* = 0 labelled.*>= 25"):
        make_splits(ids, 20, n_eval=1, n_test=1)
    assert len(make_splits(ids, 25, n_eval=1, n_test=1)["labelled"]) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"case_ids": [], "labelled_percent": 20}, "no case id"),
        ({"case_ids": ["a", "b", "a"], "labelled_percent": 50}, r"repeated case id\(s\) \['a'\]"),
        ({"case_ids": ["a", "b"], "labelled_percent": 0}, r"labelled_percent must be in \(0, 100\], got 0"),
        ({"case_ids": ["a", "b"], "labelled_percent": 150}, r"labelled_percent must be in \(0, 100\], got 150"),
        ({"case_ids": ["a", "b"], "labelled_percent": 50, "n_eval": 1, "n_test": 1}, "leaves no training case"),
        ({"case_ids": ["a", "b"], "labelled_percent": 50, "n_eval": -1, "n_test": 0}, "n_eval=-1"),
    ],
)
def test_make_splits_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_splits(**kwargs)


# ---------------------------------------------------------------------------------------------------- bad input


def test_shape_mismatch_names_the_case(tmp_path):
    make_msd(tmp_path, n=2)
    write_nifti(tmp_path / "labelsTr" / "case_0001.nii.gz", np.zeros((20, 24, 27), np.uint8))
    with pytest.raises(ValueError, match=r"case 'case_0001'.*shape \(20, 24, 28\) but label .* \(20, 24, 27\)"):
        msd_cases(tmp_path)


def test_affine_mismatch_beyond_tolerance(tmp_path):
    make_msd(tmp_path, n=1)
    label = tmp_path / "labelsTr" / "case_0000.nii.gz"
    shifted = np.diag([1.5, 1.5, 3.0, 1.0])
    shifted[0, 3] = 1e-4  # 1e-4 mm < default tolerance 1e-3: accepted
    write_nifti(label, tiny_label(), shifted)
    msd_cases(tmp_path)
    shifted[0, 3] = 0.5  # 0.5 mm > 1e-3: refused
    write_nifti(label, tiny_label(), shifted)
    with pytest.raises(ValueError, match=r"case 'case_0000': the affines .* differ by up to 0\.5"):
        msd_cases(tmp_path)
    assert len(msd_cases(tmp_path, affine_atol=1.0)) == 1  # 0.5 mm < tolerance 1.0: accepted


def test_labels_outside_the_label_map_are_named(tmp_path):
    make_msd(tmp_path, n=2)
    label = tiny_label()
    label[0, 0, 0], label[0, 0, 1] = 7, 9
    write_nifti(tmp_path / "labelsTr" / "case_0001.nii.gz", label)
    with pytest.raises(ValueError, match=r"case 'case_0001'.*values \[7, 9\] outside the label map \[0, 1, 2, 3\]"):
        msd_cases(tmp_path)
    with pytest.raises(ValueError, match=r"values \[9\] outside the label map"):
        msd_cases(tmp_path, num_classes=8)  # num_classes overrides dataset.json: 0..7 allowed, 9 is not
    assert len(msd_cases(tmp_path, check_labels=False)) == 2


def test_non_integral_labels_are_refused(tmp_path):
    np.save(tmp_path / "x_image.npy", np.zeros((2, 2, 2), np.float32))
    np.save(tmp_path / "x_label.npy", np.full((2, 2, 2), 0.5, np.float32))
    with pytest.raises(ValueError, match=r"case 'x'.*non-integer values 0\.5"):
        check_case(tmp_path / "x_image.npy", tmp_path / "x_label.npy", "x", range(2))


def test_non_3d_input_is_refused(tmp_path):
    make_msd(tmp_path, n=1)
    write_nifti(tmp_path / "imagesTr" / "case_0000.nii.gz", np.zeros((*SHAPE, 2), np.int16))
    with pytest.raises(ValueError, match=r"case 'case_0000': image .* has shape \(20, 24, 28, 2\); expected a 3D"):
        msd_cases(tmp_path)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        msd_cases(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"dataset\.json does not exist"):
        msd_cases(tmp_path)
    make_msd(tmp_path, n=2)
    (tmp_path / "labelsTr" / "case_0001.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"label file .*case_0001\.nii\.gz of case 'case_0001' does not exist"):
        msd_cases(tmp_path)


def test_unreadable_file_is_named(tmp_path):
    make_msd(tmp_path, n=1)
    (tmp_path / "imagesTr" / "case_0000.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(ValueError, match=r"image file .*case_0000\.nii\.gz of case 'case_0000' cannot be read"):
        msd_cases(tmp_path)


def test_empty_or_malformed_dataset_is_refused(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}, "training": []}))
    with pytest.raises(ValueError, match=r"lists no case in 'training': the dataset is empty"):
        msd_cases(tmp_path)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"0": "bg"}, "training": ["a.nii.gz"]}))
    with pytest.raises(ValueError, match=r"training\[0\] must be"):
        msd_cases(tmp_path)
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        msd_cases(tmp_path)
    (tmp_path / "npy").mkdir()
    with pytest.raises(ValueError, match="holds no <case>_image.npy file: the dataset is empty"):
        dhc_npy_cases(tmp_path)


def test_duplicate_case_is_refused(tmp_path):
    make_msd(tmp_path, n=1)
    content = json.loads((tmp_path / "dataset.json").read_text())
    content["training"] *= 2
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.raises(ValueError, match="lists case 'case_0000' twice"):
        msd_cases(tmp_path)


# ---------------------------------------------------------------------------------------------------- DHC layout


def test_dhc_layout_datalists(tmp_path):
    make_dhc(tmp_path)
    assert split_file_names(20)["labelled"] == "labeled_20p.txt" and split_file_names(2.5)["unlabelled"] == (
        "unlabeled_2.5p.txt")
    assert (tmp_path / "splits" / "unlabeled_20p.txt").read_text() == "b\nc\n"
    lists = dhc_datalists(tmp_path, 20, num_classes=2)
    assert {r: [c["case"] for c in lists[r]] for r in ROLES} == {
        "labelled": ["a"], "unlabelled": ["b", "c"], "eval": ["d"], "test": ["e"]}
    assert lists["eval"][0] == {"image": str(tmp_path / "npy" / "d_image.npy"),
                                "label": str(tmp_path / "npy" / "d_label.npy"), "case": "d"}
    with pytest.raises(ValueError, match=r"case 'a'.*values \[1\] outside the label map \[0\]"):
        dhc_datalists(tmp_path, 20, num_classes=1)


def test_dhc_split_naming_a_missing_case(tmp_path):
    make_dhc(tmp_path)
    (tmp_path / "splits" / "eval.txt").write_text("d\nzz\n")
    with pytest.raises(FileNotFoundError, match=r"eval\.txt names case 'zz' but .*zz_image\.npy does not exist"):
        dhc_datalists(tmp_path, 20)


def test_dhc_missing_split_file_and_overlaps(tmp_path):
    make_dhc(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"labeled_10p\.txt does not exist \(labelled_percent=10\)"):
        read_dhc_splits(tmp_path, 10)
    (tmp_path / "splits" / "eval.txt").write_text("a\n")
    with pytest.raises(ValueError, match=r"case\(s\) a are in both labelled and eval"):
        read_dhc_splits(tmp_path, 20)


def test_datalists_from_splits_names_unknown_cases():
    cases = [{"image": "a.nii.gz", "label": "la.nii.gz", "case": "a"}]
    with pytest.raises(ValueError, match=r"the eval split names case\(s\) q that are not in the dataset"):
        datalists_from_splits(cases, {"labelled": ["a"], "unlabelled": [], "eval": ["q"], "test": []})


def test_volume_datalists_detects_the_layout(tmp_path):
    make_dhc(tmp_path / "dhc")
    assert [c["case"] for c in volume_datalists(tmp_path / "dhc", 20)["unlabelled"]] == ["b", "c"]
    make_msd(tmp_path / "msd", n=6)
    lists = volume_datalists(tmp_path / "msd", 50, n_eval=1, n_test=1)
    assert [len(lists[r]) for r in ROLES] == [2, 2, 1, 1]  # N_train = 4, floor(0.5 * 4) = 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a DHC npy folder"):
        volume_datalists(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------------- preprocessing


def _npy(tmp_path: Path, name: str, array: np.ndarray) -> str:
    np.save(tmp_path / name, array)
    return str(tmp_path / name)


def test_window_and_min_max_by_hand(tmp_path):
    x = np.array([-1000, -75, 0, 100, 200, 275, 300, 50], np.float32).reshape(2, 2, 2)
    out = dhc_preprocessing(label_key=None, spatial_size=None)({"image": _npy(tmp_path, "ct.npy", x)})["image"]
    # clip to [-75, 275]: [-75, -75, 0, 100, 200, 275, 275, 50]; min -75, max 275 -> (x + 75) / 350
    expected = np.array([0, 0, 75 / 350, 175 / 350, 275 / 350, 1, 1, 125 / 350], np.float32).reshape(1, 2, 2, 2)
    assert out.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    # MR-like: the clipped volume [10, 20, 30, 50, 10, 10, 10, 10] does not span the window -> per-volume min-max
    # with min 10 and max 50: (x - 10) / 40 = [0, .25, .5, 1, 0, 0, 0, 0] (a fixed window would give (x+75)/350)
    mr = np.array([10, 20, 30, 50, 10, 10, 10, 10], np.float32).reshape(2, 2, 2)
    out = dhc_preprocessing(label_key=None, spatial_size=None)({"image": _npy(tmp_path, "mr.npy", mr)})["image"]
    np.testing.assert_allclose(out.numpy().ravel(), [0, 0.25, 0.5, 1, 0, 0, 0, 0], atol=1e-6)
    # a window given as config (8-bit data): clip to [0, 100] -> [0, 0, 0, 100, 100, 100, 100, 50] -> / 100
    out = dhc_preprocessing(label_key=None, spatial_size=None, a_min=0, a_max=100)(
        {"image": _npy(tmp_path, "ct.npy", x)})["image"]
    np.testing.assert_allclose(out.numpy().ravel(), [0, 0, 0, 1, 1, 1, 1, 0.5], atol=1e-6)


def test_resize_trilinear_and_nearest_by_hand(tmp_path):
    image = np.zeros((2, 2, 2), np.float32)
    image[1] = 1.0  # varies along D only
    label = np.zeros((2, 2, 2), np.float32)
    label[:, :, 1] = 3  # varies along W only
    out = dhc_preprocessing(spatial_size=(4, 4, 4), normalise=False)(
        {"image": _npy(tmp_path, "i.npy", image), "label": _npy(tmp_path, "l.npy", label), "case": "toy"})
    # align_corners=False, scale 1/2: source coordinate s = (o + 0.5) / 2 - 0.5 = [-0.25, 0.25, 0.75, 1.25] for
    # o = 0..3, clamped to [0, 1] -> linear weights of x1: [0, 0.25, 0.75, 1]
    assert out["image"].shape == (1, 4, 4, 4) and out["image"].dtype == torch.float32
    np.testing.assert_allclose(out["image"][0, :, 2, 1].numpy(), [0, 0.25, 0.75, 1], atol=1e-6)
    np.testing.assert_allclose(out["image"][0, 1].numpy(), np.full((4, 4), 0.25), atol=1e-6)
    # nearest: source index floor(o * 2 / 4) = [0, 0, 1, 1] -> [0, 0, 3, 3]
    assert out["label"].dtype == torch.int64 and out["case"] == "toy"
    assert out["label"][0, 3, 0].tolist() == [0, 0, 3, 3]
    assert out["label"].shape == (1, 4, 4, 4)
    # the paper-time target size
    big = dhc_preprocessing(label_key=None)({"image": _npy(tmp_path, "i.npy", image)})["image"]
    assert big.shape == (1, 80, 160, 160)


def test_nifti_is_read_in_dhc_axis_order(tmp_path):
    a = np.arange(24, dtype=np.float32).reshape(2, 3, 4)  # NIfTI voxel order (x, y, z)
    write_nifti(tmp_path / "a.nii.gz", a)
    out = dhc_preprocessing(label_key=None, source="nifti", spatial_size=None, normalise=False)(
        {"image": str(tmp_path / "a.nii.gz")})["image"]
    # SimpleITK / DHC order (D, H, W) = (z, y, x): out[0, k, j, i] == a[i, j, k]
    assert out.shape == (1, 4, 3, 2)
    assert out[0, 3, 1, 0].item() == a[0, 1, 3] == 7.0  # 0*12 + 1*4 + 3 = 7
    np.testing.assert_array_equal(out[0].numpy(), a.transpose(2, 1, 0))


def test_preprocessing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="source must be one of"):
        dhc_preprocessing(source="dicom")
    with pytest.raises(ValueError, match="a_min < a_max, got a_min=275, a_max=-75"):
        dhc_preprocessing(a_min=275, a_max=-75)
    with pytest.raises(ValueError, match=r"spatial_size must be three positive ints"):
        dhc_preprocessing(spatial_size=(80, 160))


# ---------------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_btcv_case_read_checked_and_preprocessed():
    root = require_data("btcv_ct")
    assert read_label_map(root)[6] == "liver"
    cases = msd_cases(root, check_labels=False)  # headers of all 12 pairs: files, 3D, shapes, affines
    assert len(cases) == 12 and cases[0]["case"] == "case_0000"
    check_case(cases[0]["image"], cases[0]["label"], "case_0000", range(14))  # decodes one label: values in 0..13
    # the data are 8-bit (README), so the window is 0..255, a config value
    out = dhc_preprocessing(source="nifti", a_min=0, a_max=255)(cases[0])
    image, label = out["image"], out["label"]
    assert image.shape == (1, 80, 160, 160) and label.shape == (1, 80, 160, 160)
    assert image.min().item() == 0.0 and image.max().item() == 1.0
    assert set(torch.unique(label).tolist()) <= set(range(14))
    assert (label == 6).sum() > (label == 13).sum() > 0  # liver is far larger than the left adrenal gland
