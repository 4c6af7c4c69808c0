"""Tests of common/data/fewshot_datasets.py on synthetic layouts (specs/cdtg.md §1.2, §2, §7.3 item 8) and on the
real shared data (wbc, isic, chaos_mr, polyp)."""

from __future__ import annotations

import json
import logging
import pickle

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from common.data.fewshot_datasets import (
    CHAOS_LABELS,
    COCO_CLASSES,
    VOC_CLASSES,
    class_folder_classes,
    coco20i_classes,
    isic2018_classes,
    isic_flat_classes,
    lung_classes,
    pascal5i_classes,
    polyp_classes,
    volume_slice_classes,
    wbc_classes,
)
from common.transforms.fewshot import FewShotPairLoader
from tests.conftest import require_data


def _png(path, array):  # any extension: PIL picks the format
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def _disc_mask(value=255, size=8):
    mask = np.zeros((size, size), np.uint8)
    mask[2:6, 2:6] = value
    return mask


def _rgb(size=8):
    return np.full((size, size, 3), 100, np.uint8)


def _names(classes):
    return {name: [it["name"] for it in items] for name, items in classes.items()}


# ------------------------------------------------------------------------------------------------ ISIC


def _isic2018(tmp_path, empty_stem=None):
    base = tmp_path / "ISIC"
    folders = {"1": ["ISIC_001", "ISIC_002"], "2": ["ISIC_003", "ISIC_004"], "3": ["ISIC_005", "ISIC_006"]}
    for folder, stems in folders.items():
        for stem in stems:
            _png(base / "ISIC2018_Task1-2_Training_Input" / folder / f"{stem}.jpg", _rgb())
            mask = np.zeros((8, 8), np.uint8) if stem == empty_stem else _disc_mask()
            _png(base / "ISIC2018_Task1_Training_GroundTruth" / f"{stem}_segmentation.png", mask)
    return base


def test_isic2018_layout(tmp_path, caplog):
    _isic2018(tmp_path, empty_stem="ISIC_004")
    with caplog.at_level(logging.INFO):
        classes = isic2018_classes(tmp_path)
    assert list(classes) == ["melanoma", "nevus", "seborrheic keratosis"]  # folders 1, 2, 3
    assert _names(classes) == {"melanoma": ["ISIC_001", "ISIC_002"], "nevus": ["ISIC_003"],
                               "seborrheic keratosis": ["ISIC_005", "ISIC_006"]}
    assert "dropped 1 of 2" in caplog.text  # ISIC_004's mask is empty
    item = classes["melanoma"][0]
    assert item["mask"].endswith("ISIC2018_Task1_Training_GroundTruth/ISIC_001_segmentation.png")
    assert item["fg_values"] is None and item["ignore_value"] is None
    # the ISIC folder itself is accepted as root too
    assert _names(isic2018_classes(tmp_path / "ISIC", drop_empty=False))["nevus"] == ["ISIC_003", "ISIC_004"]


def test_isic2018_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task1-2_Training_Input"):
        isic2018_classes(tmp_path)
    base = _isic2018(tmp_path)
    (base / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_003_segmentation.png").unlink()
    with pytest.raises(FileNotFoundError, match="ISIC_003_segmentation.png"):
        isic2018_classes(tmp_path)


def test_isic_flat_layout(tmp_path):
    for stem in ("b", "a"):
        _png(tmp_path / "images" / f"{stem}.jpg", _rgb())
        _png(tmp_path / "masks" / f"{stem}.png", _disc_mask())
    assert _names(isic_flat_classes(tmp_path)) == {"lesion": ["a", "b"]}
    with pytest.raises(FileNotFoundError, match="images"):
        isic_flat_classes(tmp_path / "images")


# ------------------------------------------------------------------------------------------------ lung


def test_lung_layout_tolerates_mask_suffix(tmp_path, caplog):
    base = tmp_path / "LungSegmentation"
    for stem in ("CHNCXR_0001_0", "MCUCXR_0001_0", "CHNCXR_0002_0"):
        _png(base / "CXR_png" / f"{stem}.png", _rgb())
    _png(base / "masks" / "CHNCXR_0001_0_mask.png", _disc_mask())  # Shenzhen: with _mask
    _png(base / "masks" / "MCUCXR_0001_0.png", _disc_mask())  # Montgomery: without
    _png(base / "masks" / "CHNCXR_0009_0_mask.png", _disc_mask())  # no image -> skipped
    with caplog.at_level(logging.INFO):
        classes = lung_classes(tmp_path)
    assert _names(classes) == {"lung": ["CHNCXR_0001_0", "MCUCXR_0001_0"]}
    assert classes["lung"][0]["image"].endswith("CXR_png/CHNCXR_0001_0.png")
    assert "skipped 1 mask" in caplog.text and "CHNCXR_0009_0_mask.png" in caplog.text
    with pytest.raises(FileNotFoundError, match="elsewhere/LungSegmentation"):
        lung_classes(tmp_path / "elsewhere")
    (tmp_path / "other" / "masks").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="other/CXR_png"):
        lung_classes(tmp_path / "other")


# ------------------------------------------------------------------------------------------------ WBC


def _wbc_mask():
    mask = np.zeros((8, 8), np.uint8)
    mask[1:7, 1:7] = 128  # cytoplasm
    mask[3:5, 3:5] = 255  # nucleus
    return mask


def test_wbc_upstream_layout_pools_subsets(tmp_path):
    for subset, stems in {"Dataset 1": ["001", "002"], "Dataset 2": ["001"]}.items():
        for stem in stems:
            _png(tmp_path / subset / f"{stem}.bmp", _rgb())
            _png(tmp_path / subset / f"{stem}.png", _wbc_mask())
    classes = wbc_classes(tmp_path, classes=("cytoplasm", "nucleus", "cell"))
    assert list(classes) == ["cytoplasm", "nucleus", "cell"]
    assert _names(classes)["nucleus"] == ["Dataset_1_001", "Dataset_1_002", "Dataset_2_001"]
    loader = FewShotPairLoader(image_size=8)
    # cytoplasm = 128 ring: 6*6 - 2*2 = 32 pixels; nucleus = 255: 2*2 = 4; cell >= 128: 6*6 = 36
    areas = {c: loader(items[0])[1].sum().item() for c, items in classes.items()}
    assert areas == {"cytoplasm": 32.0, "nucleus": 4.0, "cell": 36.0}


def test_wbc_shared_and_prepared_layouts(tmp_path):
    shared = tmp_path / "shared"
    for stem in ("001", "002"):
        _png(shared / "images" / f"{stem}.png", _rgb())
        _png(shared / "masks" / f"{stem}.png", _wbc_mask())
    assert _names(wbc_classes(shared)) == {"cytoplasm": ["001", "002"], "nucleus": ["001", "002"]}
    prepared = tmp_path / "prepared"
    for folder in ("Cytoplasm", "Nucleus"):
        for stem in ("a", "b"):
            _png(prepared / folder / f"{stem}.png", _rgb())
            _png(prepared / folder / f"{stem}_mask.png", _disc_mask())
    classes = wbc_classes(prepared)
    assert _names(classes) == {"cytoplasm": ["a", "b"], "nucleus": ["a", "b"]}
    assert classes["nucleus"][0]["image"].endswith("Nucleus/a.png") and classes["nucleus"][0]["fg_values"] is None
    with pytest.raises(ValueError, match="WBC classes must be among"):
        wbc_classes(shared, classes=("platelet",))
    with pytest.raises(FileNotFoundError, match="Dataset 1"):
        wbc_classes(tmp_path / "nothing")


def test_class_folder_layout(tmp_path):
    for cls in ("zebra", "ant"):
        for stem in ("1", "2"):
            _png(tmp_path / cls / f"{stem}.jpg", _rgb())
            _png(tmp_path / cls / f"{stem}_mask.png", _disc_mask())
    assert _names(class_folder_classes(tmp_path)) == {"ant": ["1", "2"], "zebra": ["1", "2"]}  # sorted
    _png(tmp_path / "ant" / "3.bmp", _rgb())
    with pytest.raises(ValueError, match="3_mask.png"):
        class_folder_classes(tmp_path)


def test_empty_class_is_an_error(tmp_path):
    for stem in ("1", "2"):
        _png(tmp_path / "blank" / f"{stem}.png", _rgb())
        _png(tmp_path / "blank" / f"{stem}_mask.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"\['blank'\] have no item with a non-empty foreground"):
        class_folder_classes(tmp_path)


# ------------------------------------------------------------------------------------------------ volumes


def _volume_pair(image_path, label_path, image, label):
    image_path.parent.mkdir(parents=True, exist_ok=True)
    label_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.eye(4)), str(image_path))
    nib.save(nib.Nifti1Image(label, np.eye(4)), str(label_path))


def _toy_label(depth=6):
    # (x, y, z) = (4, 5, depth); organ 1 on slices 1..3 at x=1, y=3; organ 2 on slice 4 at x=2, y=0..1
    label = np.zeros((4, 5, depth), np.uint8)
    label[1, 3, 1:4] = 1
    label[2, 0:2, 4] = 2
    return label


def test_volume_slices_msd_layout(tmp_path):
    image = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6) * 1e-4  # tiny floats: a direct uint8 cast is 0
    for case in ("case_a", "case_b"):
        _volume_pair(tmp_path / "imagesTr" / f"{case}.nii.gz", tmp_path / "labelsTr" / f"{case}.nii.gz", image,
                     _toy_label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver", "2": "right kidney"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"}
                     for c in ("case_a", "case_b")],
    }))
    classes = volume_slice_classes(tmp_path)
    assert list(classes) == ["liver", "right kidney"]
    assert _names(classes)["liver"] == ["case_a:z1", "case_a:z2", "case_a:z3", "case_b:z1", "case_b:z2", "case_b:z3"]
    assert _names(classes)["right kidney"] == ["case_a:z4", "case_b:z4"]
    item = classes["liver"][0]
    assert (item["volume"], item["slice"], item["fg_values"], item["label_values"]) == ("case_a", 1, [1], [0, 1, 2])
    # slice transposed to [rows = y, cols = x]: the organ voxel (x=1, y=3) is at row 3, column 1
    assert item["image"].shape == (5, 4, 3) and item["image"].dtype == np.uint8
    assert item["mask"].shape == (5, 4) and item["mask"][3, 1] == 1 and item["mask"].sum() == 1
    # intensities: voxel (x, y, z) holds v = (30x + 6y + z) 1e-4; percentiles over the 120 values 0..119 (x1e-4):
    # p0.5 = 0.005 * 119 = 0.595, p99.5 = 0.995 * 119 = 118.405 (x1e-4). Voxel (1, 3, 1) = 49e-4:
    # (49 - 0.595) / 117.81 * 255 = 104.77 -> 105; (0, 0, 1) = 1e-4 -> (1 - 0.595) / 117.81 * 255 = 0.88 -> 1
    assert item["image"][3, 1, 0] == 105 and item["image"][0, 0, 0] == 1
    assert np.array_equal(item["image"][..., 0], item["image"][..., 2])
    # a chosen subset (names matched case-insensitively, '_' as space) and an exclusion
    assert list(volume_slice_classes(tmp_path, classes=["Right_Kidney"])) == ["right kidney"]
    assert list(volume_slice_classes(tmp_path, exclude=["liver"], cases=["case_b"])) == ["right kidney"]
    with pytest.raises(ValueError, match="unknown organ"):
        volume_slice_classes(tmp_path, classes=["heart"])


def test_volume_shape_mismatch_names_both_files(tmp_path):
    _volume_pair(tmp_path / "imagesTr" / "c.nii.gz", tmp_path / "labelsTr" / "c.nii.gz",
                 np.zeros((4, 5, 7), np.float32), _toy_label())
    (tmp_path / "dataset.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "liver"},
        "training": [{"image": "./imagesTr/c.nii.gz", "label": "./labelsTr/c.nii.gz"}]}))
    with pytest.raises(ValueError, match=r"imagesTr/c\.nii\.gz.*\(4, 5, 7\).*labelsTr/c\.nii\.gz.*\(4, 5, 6\)"):
        volume_slice_classes(tmp_path)


def test_volume_slices_adnet_chaos_layout(tmp_path):
    folder = tmp_path / "CHAOST2" / "chaos_MR_T2_normalized"
    rng = np.random.default_rng(0)
    for k in (10, 2):
        label = _toy_label()
        label[0, 0, 5] = 4  # spleen on slice 5
        label[3, 4, 0] = 3  # left kidney on slice 0
        _volume_pair(folder / f"image_{k}.nii.gz", folder / f"label_{k}.nii.gz",
                     rng.normal(size=(4, 5, 6)).astype(np.float64), label.astype(np.float64))
    classes = volume_slice_classes(tmp_path)
    assert list(classes) == list(CHAOS_LABELS.values()) == ["liver", "right kidney", "left kidney", "spleen"]
    assert [it["volume"] for it in classes["spleen"]] == ["image_2", "image_10"]  # numeric order of k
    label = _toy_label()  # volume 2 without left kidney and spleen: no slice of them when only volume 2 is read
    nib.save(nib.Nifti1Image(label.astype(np.float64), np.eye(4)), str(folder / "label_2.nii.gz"))
    with pytest.raises(ValueError, match=r"\['left kidney', 'spleen'\] have no slice.*exclude"):
        volume_slice_classes(tmp_path, cases=["image_2"])
    assert list(volume_slice_classes(tmp_path, exclude=["left kidney", "spleen"], cases=["image_2"])) == [
        "liver", "right kidney"]
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        volume_slice_classes(tmp_path / "CHAOST2" / "nothing")


# ------------------------------------------------------------------------------------------------ polyps


def test_polyp_layout(tmp_path):
    for subset in ("SetA", "SetB"):
        for stem in ("1", "2"):
            _png(tmp_path / subset / "images" / f"{stem}.png", _rgb())
            _png(tmp_path / subset / "masks" / f"{stem}.png", _disc_mask())
    assert _names(polyp_classes(tmp_path)) == {"polyp": ["SetA_1", "SetA_2", "SetB_1", "SetB_2"]}
    assert _names(polyp_classes(tmp_path, sets=["SetB"])) == {"polyp": ["SetB_1", "SetB_2"]}


# ------------------------------------------------------------------------------------------------ PASCAL / COCO


def _pascal(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    splits = tmp_path / "splits"
    mask = np.zeros((8, 8), np.uint8)
    mask[1:4, 1:4], mask[5:7, 5:7], mask[0, :] = 1, 15, 255
    for image_id in ("2007_000032", "2007_000039", "2008_000001"):
        _png(voc / "JPEGImages" / f"{image_id}.jpg", _rgb())
        _png(voc / "SegmentationClassAug" / f"{image_id}.png", mask)
    (splits / "trn").mkdir(parents=True)
    (splits / "trn" / "fold0.txt").write_text("2007_000032__01\n2007_000039__01\n")
    (splits / "trn" / "fold1.txt").write_text("")
    (splits / "trn" / "fold2.txt").write_text("2007_000032__15\n2008_000001__15\n")
    (splits / "trn" / "fold3.txt").write_text("")
    return splits


def test_pascal5i_split_lines_and_fold4(tmp_path):
    splits = _pascal(tmp_path)
    classes = pascal5i_classes(tmp_path, splits, folds=4)  # fold 4 = all four trn files
    assert list(classes) == ["aeroplane", "person"]  # classes 1 and 15 in VOC order
    assert VOC_CLASSES[14] == "person"
    assert _names(classes) == {"aeroplane": ["2007_000032", "2007_000039"], "person": ["2007_000032", "2008_000001"]}
    item = classes["person"][0]
    assert (item["fg_values"], item["ignore_value"]) == ([15], 255)
    _, m, ignore = FewShotPairLoader(image_size=8)(item)
    assert m.sum().item() == 4 and ignore.sum().item() == 8  # the 2x2 person block; the 255 top row
    assert list(pascal5i_classes(tmp_path, splits, folds=(0,))) == ["aeroplane"]
    (splits / "trn" / "fold1.txt").write_text("2007_000032_01\n")
    with pytest.raises(ValueError, match=r"fold1\.txt line 1"):
        pascal5i_classes(tmp_path, splits, folds=4)
    (splits / "trn" / "fold1.txt").write_text("2099_000000__02\n")
    with pytest.raises(FileNotFoundError, match="2099_000000.jpg"):
        pascal5i_classes(tmp_path, splits, folds=(1,))


def test_coco20i_interleaved_folds(tmp_path):
    base = tmp_path / "COCO2014"
    mask = np.zeros((8, 8), np.uint8)
    mask[2:5, 2:5] = 2  # bicycle (k = 1)
    mask[6:8, 6:8] = 1  # person (k = 0)
    names = {"trn": "train2014/COCO_train2014_000000000009.jpg", "val": "COCO_val2014_000000000042"}
    for sub, name in (("train2014", "COCO_train2014_000000000009"), ("val2014", "COCO_val2014_000000000042")):
        _png(base / sub / f"{name}.jpg", _rgb())
        _png(base / "annotations" / sub / f"{name}.png", mask)
    for split, fold in (("trn", 0), ("val", 1)):
        (tmp_path / "splits" / split).mkdir(parents=True, exist_ok=True)
        # fold 0: val classes {0, 4, ..., 76}, so trn holds k = 1 (bicycle); fold 1: val classes {1, 5, ...}
        table = {k: [names[split]] for k in range(80)}
        with open(tmp_path / "splits" / split / f"fold{fold}.pkl", "wb") as f:
            pickle.dump(table, f)
    trn = coco20i_classes(tmp_path, tmp_path / "splits", "trn", fold=0)
    assert len(trn) == 60 and "person" not in trn and list(trn)[:2] == ["bicycle", "car"]
    item = trn["bicycle"][0]
    assert item["fg_values"] == [2] and item["mask"].endswith("annotations/train2014/COCO_train2014_000000000009.png")
    assert FewShotPairLoader(image_size=8)(item)[1].sum().item() == 9
    val = coco20i_classes(tmp_path, tmp_path / "splits", "val", fold=1)
    assert list(val) == [COCO_CLASSES[1 + 4 * v] for v in range(20)]
    assert val["bicycle"][0]["image"].endswith("val2014/COCO_val2014_000000000042.jpg")
    with pytest.raises(FileNotFoundError, match="fold2.pkl"):
        coco20i_classes(tmp_path, tmp_path / "splits", "trn", fold=2)


def test_coco_split_file_with_objects_is_refused(tmp_path):
    (tmp_path / "splits" / "trn").mkdir(parents=True)
    (tmp_path / "COCO2014").mkdir()
    with open(tmp_path / "splits" / "trn" / "fold0.pkl", "wb") as f:
        pickle.dump({1: [logging.getLogger("x")]}, f)  # a pickle that needs a class to load
    with pytest.raises(ValueError, match="refusing to load"):
        coco20i_classes(tmp_path, tmp_path / "splits", "trn", fold=0)


# ------------------------------------------------------------------------------------------------ real data


@pytest.mark.realdata
def test_real_wbc():
    classes = wbc_classes(require_data("wbc"))
    assert list(classes) == ["cytoplasm", "nucleus"]
    assert len(classes["cytoplasm"]) == len(classes["nucleus"]) == 300
    loader = FewShotPairLoader(image_size=32, cache_size=0)
    for item in classes["nucleus"]:
        assert set(np.unique(loader.read_mask(item["mask"])).tolist()) <= {0, 128, 255}, item["mask"]
    _, m, _ = loader(classes["cytoplasm"][0])
    assert 0 < m.mean() < 1


@pytest.mark.realdata
def test_real_isic():
    classes = isic_flat_classes(require_data("isic"))
    assert list(classes) == ["lesion"] and len(classes["lesion"]) == 9


@pytest.mark.realdata
def test_real_chaos_mr():
    root = require_data("chaos_mr")
    cases = ["case_0001", "case_0002"]
    classes = volume_slice_classes(root, cases=cases)
    assert list(classes) == ["liver", "right kidney", "left kidney", "spleen"]
    for organ, items in classes.items():
        assert {it["volume"] for it in items} == set(cases), organ  # every organ in every volume
    item = classes["liver"][0]
    assert item["image"].shape == (256, 256, 3) and item["image"].max() > 100  # rescaled, not a raw uint8 cast
    assert (item["mask"] == 1).any()


@pytest.mark.realdata
def test_real_polyp():
    classes = polyp_classes(require_data("polyp"), sets=["Kvasir-Sessile"])
    assert len(classes["polyp"]) == 6
