"""Chest-radiograph transforms (specs/asg.md §2.1, §2.4–§2.6): loading, resize / pad / crop with boxes, grid
targets, normalisation and the ASG collate (incl. the released caption-sort bug)."""

from __future__ import annotations

import math

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from common.transforms.cxr import (
    IMAGENET_MEAN, IMAGENET_STD, MGCA_MEAN, MGCA_STD, CXRGeometryd, LoadCXRd, NormalizeCXRd, RegionTargetsd,
    asg_collate, load_cxr,
)


def wide_sample(**extra) -> dict:
    """A 100 (W) x 50 (H) image of 200s: longest side 100 -> 256 is a x2.56 scale to 256 x 128."""
    return {"id": "rec7", "image": np.full((50, 100), 200, np.uint8), **extra}


# --- geometry --------------------------------------------------------------------------------------------------

def test_resize_pad_centre_crop_maps_box_by_hand():
    d = CXRGeometryd(random_crop=False)(wide_sample(boxes=[[10, 10, 50, 30]], sent_index=[[0, 1, 2]]))
    # scale 256/100 = 2.56: (10, 10, 50, 30) -> (25.6, 25.6, 128, 76.8); resized 256 x 128 -> pad (256-128)/2 = 64
    # rows on top: y + 64 -> (25.6, 89.6, 128, 140.8); centre crop offset (256-224)/2 = 16 on both axes:
    # -> (9.6, 73.6, 112, 124.8)
    np.testing.assert_allclose(d["boxes"], [[9.6, 73.6, 112.0, 124.8]], atol=1e-4)
    assert d["boxes"].dtype == np.float32 and d["sent_index"] == [[0, 1, 2]]
    image = d["image"]
    assert image.shape == (224, 224) and image.dtype == np.uint8
    # image rows: padded rows 64 .. 191 -> crop rows 48 .. 175; everything else is zero padding
    assert image[:48].max() == 0 and image[176:].max() == 0
    assert image[48].min() == 200 and image[175].min() == 200


def test_boxes_that_leave_the_crop_are_dropped_with_their_sentence_rows():
    boxes = [[10, 10, 50, 30],   # kept (see above)
             [0, 0, 5, 50],      # x: 0..12.8 after scaling, minus the crop offset 16 -> entirely left of the crop
             [95, 0, 100, 50],   # x: 243.2..256 - 16 = 227.2..240 > 224 -> right of the crop
             [0, 0, 10, 5]]      # (0, 0, 25.6, 12.8) -> (-16, 48, 9.6, 60.8): clipped to (0, 48, 9.6, 60.8)
    rows = [[0, 1], [2], [3, 4], [5]]
    d = CXRGeometryd(random_crop=False)(wide_sample(boxes=boxes, sent_index=rows))
    np.testing.assert_allclose(d["boxes"], [[9.6, 73.6, 112, 124.8], [0, 48, 9.6, 60.8]], atol=1e-4)
    assert d["sent_index"] == [[0, 1], [5]]


def test_random_crop_keeps_boxes_on_their_pixels_and_is_seeded():
    image = np.zeros((300, 240), np.uint8)
    image[100:160, 60:120] = 255  # the box (60, 100, 120, 160)
    sample = {"id": "r", "image": image, "boxes": [[60, 100, 120, 160]], "sent_index": [[3]]}
    offsets = set()
    for seed in range(6):
        t = CXRGeometryd(random_crop=True).set_random_state(seed)
        d = t(sample)
        again = CXRGeometryd(random_crop=True).set_random_state(seed)(sample)
        np.testing.assert_array_equal(d["image"], again["image"])  # same seed, same crop
        offsets.add(t._offset)
        x1, y1, x2, y2 = d["boxes"][0]
        # the bright block's pixels after the geometry are exactly inside the mapped box (1 px linear-blur margin)
        ys, xs = np.nonzero(d["image"] > 127)
        assert abs(xs.min() - x1) <= 1 and abs(xs.max() + 1 - x2) <= 1
        assert abs(ys.min() - y1) <= 1 and abs(ys.max() + 1 - y2) <= 1
    assert len(offsets) > 1 and all(0 <= o <= 32 for off in offsets for o in off)


def test_mask_follows_with_nearest_interpolation():
    image = np.zeros((80, 60), np.uint8)
    mask = np.zeros((80, 60), np.uint8)
    mask[10:30, 5:25] = 255
    image[10:30, 5:25] = 90
    d = CXRGeometryd(mask_key="label", random_crop=True).set_random_state(3)({"image": image, "label": mask})
    assert set(np.unique(d["label"]).tolist()) == {0, 255}  # nearest: still binary
    # same geometry as the image: the image's region of value 90 lies inside the mask, whose area matches the
    # image region above half height (20 x 20 px x 3.2^2 = 4096 px) up to the linear rim
    fg = d["label"] == 255
    assert fg[d["image"] == 90].all() and fg.sum() == 4096
    assert abs((d["image"] >= 45).sum() - fg.sum()) < 0.05 * fg.sum()


def test_area_interpolation_is_used_when_asked():
    stripes = np.zeros((768, 768), np.uint8)
    stripes[:, ::3] = 255  # columns 0, 3, 6, ... bright
    area = CXRGeometryd(random_crop=False, box_key=None, interpolation="area")({"image": stripes})["image"]
    # 768 -> 256 is a factor 3: INTER_AREA averages each 3-column block (255, 0, 0) -> 85
    assert np.all(area == 85)
    linear = CXRGeometryd(random_crop=False, box_key=None)({"image": stripes})["image"]
    # INTER_LINEAR samples source x = 3 (x' + 0.5) - 0.5 = 3 x' + 1, a dark column -> 0
    assert np.all(linear == 0)


@pytest.mark.parametrize("box, problem", [
    ([0, 0, 101, 20], "x2 > W = 100"),
    ([-1, 0, 20, 20], "x1 < 0"),
    ([0, 5, 20, 51], "y2 > H = 50"),
    ([30, 5, 30, 20], "x1 == x2"),
    ([30, 25, 40, 20], "y1 > y2"),
])
def test_boxes_outside_the_image_are_rejected(box, problem):
    with pytest.raises(ValueError, match=r"rec7.*boxes outside the image of size 50x100"):
        CXRGeometryd()(wide_sample(boxes=[[1, 1, 5, 5], box], sent_index=[[0], [1]]))


def test_box_and_sentence_row_counts_must_match():
    with pytest.raises(ValueError, match="rec7'?: 1 boxes but 2 sent_index rows"):
        CXRGeometryd()(wide_sample(boxes=[[1, 1, 5, 5]], sent_index=[[0], [1]]))


# --- region targets (§2.5) ---------------------------------------------------------------------------------------

def targets(n: int, **kw) -> dict:
    boxes = [[8 * r, 0, 8 * r + 8, 224] for r in range(n)]
    return RegionTargetsd(**kw)({"boxes": boxes, "sent_index": [[r] for r in range(n)]})


def test_grid_scaling_and_sentence_padding():
    d = RegionTargetsd()({"boxes": np.array([[0, 0, 224, 112], [16, 32, 48, 64]], np.float32),
                          "sent_index": [[3, 1, 2], list(range(100, 120))]})
    # x 14/224 = 1/16: (0, 0, 224, 112) -> (0, 0, 14, 7); (16, 32, 48, 64) -> (1, 2, 3, 4)
    assert d["rois"].dtype == torch.float32 and d["rois"].shape == (23, 4)
    torch.testing.assert_close(d["rois"][:2], torch.tensor([[0.0, 0, 14, 7], [1, 2, 3, 4]]))
    assert torch.all(d["rois"][2:] == -1) and "boxes" not in d
    s = d["sent_index"]
    assert s.dtype == torch.int64 and s.shape == (23, 110)
    assert s[0, :4].tolist() == [1, 2, 3, -1]  # sorted, padded
    assert s[1, :10].tolist() == list(range(100, 110)) and torch.all(s[1, 10:] == -1)  # positions >= 110 dropped
    assert torch.all(s[2:] == -1)


@pytest.mark.parametrize("n", [0, 1, 3, 23])
def test_count_matrix_and_label(n):
    d = targets(n)
    cm, label = d["count_matrix"], d["count_label"]
    assert cm.shape == (23, 23) and cm.dtype == torch.float32 and label.dtype == torch.int64
    m = max(n, 1)  # n = 0 uses the [0:1, 0:1] / [1:, 1:] blocks
    expected = torch.full((23, 23), -math.inf)
    expected[:m, :m] = 0
    expected[m:, m:] = 0
    torch.testing.assert_close(cm, expected)
    assert label.tolist() == list(range(n)) + [-100] * (23 - n)
    assert not torch.isinf(cm).all(dim=1).any()  # no all -inf row
    assert torch.all(d["rois"][:n, 2] - d["rois"][:n, 0] == 0.5)  # 8 px wide * 14 / 224


def test_count_matrix_blocks_for_one_region_spelled_out():
    cm = targets(1)["count_matrix"]
    assert cm[0, 0] == 0 and torch.all(cm[0, 1:] == -math.inf) and torch.all(cm[1:, 0] == -math.inf)
    assert torch.all(cm[1:, 1:] == 0)


def test_more_boxes_than_regions_is_an_error():
    with pytest.raises(ValueError, match="24 region boxes, more than num_region=23"):
        targets(24)


def test_small_grid_configuration():
    d = RegionTargetsd(num_region=4, grid=4, crop=64, max_sent_words=8)(
        {"boxes": [[16, 0, 64, 32]], "sent_index": [[0, 9, 7]]})
    # x 4/64: (16, 0, 64, 32) -> (1, 0, 4, 2); position 9 >= 8 dropped
    assert d["rois"].tolist() == [[1, 0, 4, 2]] + [[-1] * 4] * 3
    assert d["sent_index"].shape == (4, 8) and d["sent_index"][0, :3].tolist() == [0, 7, -1]


# --- normalisation -------------------------------------------------------------------------------------------

def test_normalize_imagenet_and_mgca():
    image = np.array([[0, 255]], np.uint8)
    x = NormalizeCXRd()({"image": image})["image"]
    assert x.shape == (3, 1, 2) and x.dtype == torch.float32
    for c in range(3):  # (0 - m) / s and (1 - m) / s per channel
        torch.testing.assert_close(x[c, 0], torch.tensor([-IMAGENET_MEAN[c] / IMAGENET_STD[c],
                                                          (1 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]]))
    y = NormalizeCXRd(mean=MGCA_MEAN, std=MGCA_STD)({"image": image})["image"]
    torch.testing.assert_close(y, torch.tensor([[[-1.0, 1.0]]] * 3))  # (0 - .5) / .5, (1 - .5) / .5


# --- loading -------------------------------------------------------------------------------------------------

def test_load_grey_and_colour_png(tmp_path):
    grey = (np.arange(30 * 20) % 256).astype(np.uint8).reshape(30, 20)
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    d = LoadCXRd()({"image": str(tmp_path / "g.png")})
    np.testing.assert_array_equal(d["image"], grey)
    assert d["image_size"] == (30, 20) and d["image_path"] == str(tmp_path / "g.png")
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (30, 20, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "c.png"), colour)
    loaded = load_cxr(tmp_path / "c.png")
    assert loaded.dtype == np.uint8 and loaded.shape == (30, 20)
    reference = cv2.imread(str(tmp_path / "c.png"), 0)  # ASG's reader
    assert np.abs(loaded.astype(int) - reference).max() <= 1
    # luminance 0.299 R + 0.587 G + 0.114 B of pixel (0, 0) (OpenCV stores BGR)
    b, g, r = colour[0, 0].astype(float)
    assert abs(loaded[0, 0] - (0.299 * r + 0.587 * g + 0.114 * b)) <= 1


def test_wrong_channel_counts_and_depth_are_rejected(tmp_path):
    cv2.imwrite(str(tmp_path / "rgba.png"), np.zeros((8, 8, 4), np.uint8))
    with pytest.raises(ValueError, match=r"rgba\.png has 4 channels"):
        load_cxr(tmp_path / "rgba.png")
    Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA").save(tmp_path / "la.png")  # grey + alpha
    with pytest.raises(ValueError, match=r"la\.png has \d channels"):
        LoadCXRd()({"image": str(tmp_path / "la.png")})
    cv2.imwrite(str(tmp_path / "deep.png"), np.full((8, 8), 4000, np.uint16))
    with pytest.raises(ValueError, match=r"deep\.png has pixel type uint16"):
        load_cxr(tmp_path / "deep.png")


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.png does not exist"):
        LoadCXRd()({"image": str(tmp_path / "nope.png")})
    (tmp_path / "bad.png").write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"bad\.png"):
        load_cxr(tmp_path / "bad.png")
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file")
    with pytest.raises(ValueError, match=r"bad\.dcm"):
        load_cxr(tmp_path / "bad.dcm")


def write_dicom(path, array: np.ndarray, photometric: str) -> None:
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta, ds.is_little_endian, ds.is_implicit_VR = meta, True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns, ds.SamplesPerPixel = "CR", *array.shape, 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = array.astype(np.uint16).tobytes()
    pydicom.dcmwrite(str(path), ds, write_like_original=False)


def test_dicom_scaling_and_monochrome1(tmp_path):
    raw = np.array([[0, 100], [200, 400]], np.uint16)
    write_dicom(tmp_path / "m2.dcm", raw, "MONOCHROME2")
    write_dicom(tmp_path / "m1.dcm", raw, "MONOCHROME1")
    # MONOCHROME2: x * 255 / 400 = 0, 63.75, 127.5, 255 -> rounded (half to even) 0, 64, 128, 255
    assert load_cxr(tmp_path / "m2.dcm").tolist() == [[0, 64], [128, 255]]
    # MONOCHROME1: inverted 400 - x = 400, 300, 200, 0 -> * 255 / 400 = 255, 191.25, 127.5, 0
    d = LoadCXRd()({"image": str(tmp_path / "m1.dcm")})
    assert d["image"].tolist() == [[255, 191], [128, 0]] and d["image"].dtype == np.uint8
    assert d["image_size"] == (2, 2)


# --- collate (§2.6) ------------------------------------------------------------------------------------------

def batch_items() -> list[dict]:
    items = []
    for i, cap_len in enumerate([5, 9, 7]):
        rois = torch.full((23, 4), -1.0)
        rois[0] = torch.tensor([float(i), 0, 1, 1])  # column 1 of row 0 marks the image the row belongs to
        items.append({"id": "abc"[i], "image": torch.full((3, 4, 4), float(i)), "rois": rois,
                      "cap_len": torch.tensor(cap_len), "count_label": torch.arange(23),
                      "sentences": ["x"] * (i + 1)})
    return items


def test_collate_writes_the_own_batch_index():
    out = asg_collate(batch_items())
    assert out["rois"].shape == (3, 23, 5) and out["rois"].dtype == torch.float32
    assert torch.equal(out["rois"][:, :, 0], torch.arange(3.0).view(3, 1).expand(3, 23))
    assert out["rois"][:, 0, 1].tolist() == [0, 1, 2]  # each row's own image
    assert out["id"] == ["a", "b", "c"] and out["image"].shape == (3, 3, 4, 4)
    assert out["cap_len"].tolist() == [5, 9, 7] and out["sentences"][2] == ["x", "x", "x"]


def test_collate_caption_sort_reproduces_the_released_bug():
    out = asg_collate(batch_items(), sort_by_caption_len=True)
    # cap_len 5, 9, 7 sorted descending -> order 1, 2, 0
    assert out["cap_len"].tolist() == [9, 7, 5] and out["id"] == ["b", "c", "a"]
    owner = out["rois"][:, 0, 1]  # the image each row really belongs to: 1, 2, 0
    assert owner.tolist() == [1, 2, 0] and torch.equal(out["image"][:, 0, 0, 0], owner)
    batch_index = out["rois"][:, 0, 0]  # written before sorting: 1, 2, 0 -> points at the wrong images
    assert batch_index.tolist() == [1, 2, 0]
    assert not torch.equal(batch_index, torch.arange(3.0))  # row j's index no longer names image j


def test_collate_without_cap_len_cannot_sort():
    items = [{"rois": torch.zeros(23, 4)}]
    with pytest.raises(ValueError, match="cap_len"):
        asg_collate(items, sort_by_caption_len=True)


# --- whole pipeline on the demo --------------------------------------------------------------------------------

def test_pipeline_on_demo_records(tmp_path):
    import json

    from common.data.demo_cxr import ensure_demo_cxr_dataset

    root = ensure_demo_cxr_dataset(tmp_path / "demo", n_train=4, n_valid=1, n_test=1)
    records = json.loads((root / "pretrain.json").read_text())["train"]
    geometry = CXRGeometryd(random_crop=True).set_random_state(0)
    load, norm, targ = LoadCXRd(), NormalizeCXRd(), RegionTargetsd()
    items = [targ(norm(geometry(load({**r, "image": str(root / r["image"])})))) for r in records]
    batch = asg_collate(items)
    assert batch["id"] == [r["id"] for r in records] and len(batch["image_size"]) == 4  # non-tensors as lists
    assert batch["image"].shape == (4, 3, 224, 224) and batch["image"].dtype == torch.float32
    assert batch["rois"].shape == (4, 23, 5) and batch["sent_index"].shape == (4, 23, 110)
    assert batch["count_matrix"].shape == (4, 23, 23) and batch["count_label"].shape == (4, 23)
    n = (batch["count_label"] >= 0).sum(1)
    assert torch.all(n > 0)  # every demo report aligns some region whose box survives the crop
    valid = batch["rois"][:, :, 1:][batch["count_label"] >= 0]
    assert torch.all(valid >= 0) and torch.all(valid <= 14)
