"""DHC's per-organ Dice / directed ASD protocol (specs/dhc.md §7, §10) against hand-computed values and medpy."""

import csv
import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from common.metrics.organ_overlap import (
    ONE_EMPTY_ASD,
    aggregate,
    case_metrics,
    dice_coefficient,
    directed_asd,
    format_metrics_table,
    save_slice_figure,
    surface_voxels,
    write_metrics_csv,
)


def cube(size: int, lo: int, hi: int) -> np.ndarray:
    """Boolean ``size**3`` volume with the cube ``[lo, hi)**3`` set."""
    m = np.zeros((size,) * 3, dtype=bool)
    m[lo:hi, lo:hi, lo:hi] = True
    return m


def random_blob(rng: np.random.Generator, shape: tuple[int, ...], threshold: float) -> np.ndarray:
    """Smoothed noise above a threshold: irregular, possibly several components, touching the edges at times."""
    return ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) > threshold


def test_border_is_mask_xor_cross_erosion():
    # 3D plus sign (centre + its 6 face neighbours): the cross erosion keeps the centre (all 6 face neighbours set),
    # so the border is the 6 arms; a full 3x3x3 erosion would have removed the centre too (border 7)
    plus = np.zeros((5, 5, 5), dtype=bool)
    plus[2, 2, 2] = True
    for axis in range(3):
        for step in (-1, 1):
            idx = [2, 2, 2]
            idx[axis] += step
            plus[tuple(idx)] = True
    border = surface_voxels(plus)
    assert border.sum() == 6 and not border[2, 2, 2]
    # a mask filling the volume: outside counts as background, so the outer shell 3^3 - 1^3 = 26 is border
    assert surface_voxels(np.ones((3, 3, 3), dtype=bool)).sum() == 26


def test_concentric_cubes_by_hand():
    gt, pred = cube(12, 2, 10), cube(12, 4, 8)  # G = [2, 9]^3 (8^3 = 512 voxels), P = [4, 7]^3 (4^3 = 64)
    assert dice_coefficient(pred, gt) == pytest.approx(2 * 64 / (512 + 64))  # |P ∩ G| = 64 -> 128/576 = 0.2222
    # P's border voxels (4^3 - 2^3 = 56) all have a coordinate in {4, 7}, 2 voxels from the nearest face of G,
    # and no coordinate closer: directed ASD(P -> G) = 2 exactly
    assert directed_asd(pred, gt) == pytest.approx(2.0, abs=1e-12)
    # G -> P: G's border (8^3 - 6^3 = 296 voxels) to the solid cube [4,7]^3, per-axis gap 2 for x in {2,9},
    # 1 for {3,8}, 0 for [4,7]; counts by (#axes at gap 2, #gap 1, #gap 0) = multinomial * 2^a * 2^b * 4^c:
    # (1,0,2): 96 at 2, (1,1,1): 96 at sqrt5, (1,2,0): 24 at sqrt6, (2,0,1): 48 at sqrt8, (2,1,0): 24 at 3,
    # (3,0,0): 8 at sqrt12; 96+96+24+48+24+8 = 296
    total = 96 * 2 + 96 * math.sqrt(5) + 24 * math.sqrt(6) + 48 * math.sqrt(8) + 24 * 3 + 8 * math.sqrt(12)
    assert directed_asd(gt, pred) == pytest.approx(total / 296, abs=1e-12)  # = 700.9276 / 296 = 2.3680
    # spacing (2, 1, 1): a P border voxel's distance is min over axes of gap * spacing; the 2*2*2 = 8 voxels with
    # x in {4,7} and y, z in {5,6} are at min(2*2, 3, 3) = 3, the other 48 at 2 -> (48*2 + 8*3) / 56 = 120/56
    assert directed_asd(pred, gt, spacing=(2.0, 1.0, 1.0)) == pytest.approx(120 / 56, abs=1e-12)
    assert directed_asd(pred, gt, spacing=0.5) == pytest.approx(1.0, abs=1e-12)  # isotropic: 2 voxels * 0.5


def test_single_voxel_in_a_cube():
    gt = np.zeros((5, 5, 5), dtype=bool)
    gt[1:4, 1:4, 1:4] = True  # 27 voxels, border 26 (the centre is interior)
    pred = np.zeros_like(gt)
    pred[2, 2, 2] = True  # the centre: its own border; 1 voxel from the 6 face-centre voxels of G's border
    assert directed_asd(pred, gt) == 1.0
    assert dice_coefficient(pred, gt) == pytest.approx(2 / 28)  # 2*1 / (1 + 27)


def test_case_metrics_empty_policies_and_scale():
    gt = np.zeros((6, 6, 6), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[1:4, 1:4, 1:4] = 1
    pred[1:4, 1:4, 2:5] = 1  # class 1 in both: 3x3x3 cubes shifted by 1 along W, overlap 3x3x2 = 18
    pred[5, 5, 5] = 2  # class 2 only predicted
    gt[0, 5, 5] = 3  # class 3 only in the ground truth; class 4 in neither
    m = case_metrics(pred, gt, n_classes=5)
    # Dice: 100 * 2*18 / (27 + 27) = 66.667; one present -> 0; both absent -> 1 (DHC's missing x100)
    np.testing.assert_allclose(m["dice"], [100 * 36 / 54, 0.0, 0.0, 1.0])
    # ASD class 1: P's border = 26 voxels (its centre (2,2,3) is interior): the 9 of P's face w=4 are 1 voxel from
    # G's face w=3; (2,2,2) is G's interior centre, 1 voxel from G's border; the other 16 lie on G's border -> 10/26
    np.testing.assert_allclose(m["asd"], [10 / 26, ONE_EMPTY_ASD, 128.0, 0.0])
    fixed = case_metrics(torch.as_tensor(pred), torch.as_tensor(gt).float(), n_classes=5, fix_empty_dice_scale=True)
    np.testing.assert_allclose(fixed["dice"], [100 * 36 / 54, 0.0, 0.0, 100.0])
    np.testing.assert_allclose(fixed["asd"], m["asd"])


def test_case_metrics_rejects_bad_input():
    a = np.zeros((4, 4, 4), dtype=np.int64)
    with pytest.raises(ValueError, match="case_7.*differ in shape"):
        case_metrics(a, np.zeros((4, 4, 5), dtype=np.int64), 3, case="case_7")
    with pytest.raises(ValueError, match="ground truth.*outside"):
        case_metrics(a, a + 3, 3)
    with pytest.raises(ValueError, match="non-integer"):
        case_metrics(a + 0.5, a, 3)
    with pytest.raises(ValueError, match="n_classes"):
        case_metrics(a, a, 1)
    with pytest.raises(ValueError, match="non-empty"):
        directed_asd(a.astype(bool), a.astype(bool))
    with pytest.raises(ValueError, match="spacing"):
        directed_asd(cube(4, 1, 3), cube(4, 1, 3), spacing=(1.0, 1.0))


def test_aggregate_by_hand():
    per_case = {
        "a": {"dice": np.array([80.0, 0.0]), "asd": np.array([2.0, 128.0])},
        "b": {"dice": np.array([60.0, 50.0]), "asd": np.array([4.0, 6.0])},
    }
    s = aggregate(per_case)
    np.testing.assert_allclose(s["dice"], [70.0, 25.0])  # (80+60)/2, (0+50)/2
    np.testing.assert_allclose(s["asd"], [3.0, 67.0])  # (2+4)/2, (128+6)/2
    assert s["avg_dice"] == pytest.approx(47.5) and s["avg_asd"] == pytest.approx(35.0)  # (70+25)/2, (3+67)/2
    assert aggregate(list(per_case.values()))["avg_dice"] == pytest.approx(47.5)
    with pytest.raises(ValueError, match="no case"):
        aggregate([])


def test_csv_table_and_figure_written(tmp_path):
    per_case = {
        "case01": {"dice": np.array([80.0, 0.0]), "asd": np.array([2.0, 128.0])},
        "case02": {"dice": np.array([60.0, 50.0]), "asd": np.array([4.0, 6.0])},
    }
    path = write_metrics_csv(tmp_path / "out" / "metrics.csv", per_case, ["liver", "spleen"])
    rows = list(csv.reader(path.open()))
    assert rows[0] == ["case", "dice_liver", "dice_spleen", "avg_dice", "asd_liver", "asd_spleen", "avg_asd"]
    assert rows[1][0] == "case01" and float(rows[1][3]) == 40.0 and float(rows[1][6]) == 65.0  # (80+0)/2, (2+128)/2
    assert rows[3][0] == "mean" and [float(v) for v in rows[3][1:]] == [70.0, 25.0, 47.5, 3.0, 67.0, 35.0]
    with pytest.raises(ValueError, match="3 class names for 2"):
        write_metrics_csv(tmp_path / "x.csv", per_case, ["a", "b", "c"])

    table = format_metrics_table(["liver", "spleen"], aggregate(per_case)).splitlines()
    assert table[0].split() == ["class", "Dice", "ASD"]
    assert table[1].split() == ["liver", "70.00", "3.00"] and table[3].split() == ["Avg", "47.50", "35.00"]

    image = np.random.default_rng(0).random((10, 16, 16)).astype(np.float32)
    gt = np.zeros((10, 16, 16), dtype=np.int64)
    gt[3:7, 4:12, 4:12] = 1
    gt[5:7, 6:9, 6:9] = 2
    pred = np.roll(gt, 1, axis=2)
    png = save_slice_figure(image, gt, pred, tmp_path / "fig" / "case01.png", n_slices=3)
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (900, 340)  # 3 panels x 3.0 in, 3.4 in at 100 dpi
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    # tab20 colour 0 (class 1) is RGB (31, 119, 180): its contours are drawn
    assert (np.abs(pixels.astype(int) - [31, 119, 180]).sum(axis=1) < 10).any()
    with pytest.raises(ValueError, match="must be equal"):
        save_slice_figure(image, gt[:5], pred, tmp_path / "bad.png")


def test_against_medpy_on_random_blobs():
    binary = pytest.importorskip("medpy.metric.binary")  # reference only; not a project requirement
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(6):
        a, b = random_blob(rng, (18, 20, 22), 0.2), random_blob(rng, (18, 20, 22), 0.3)
        if not a.any() or not b.any():
            continue
        assert dice_coefficient(a, b) == pytest.approx(binary.dc(a, b), rel=1e-12)
        assert directed_asd(a, b) == pytest.approx(binary.asd(a, b), rel=1e-12)
        assert directed_asd(b, a) == pytest.approx(binary.asd(b, a), rel=1e-12)
        assert directed_asd(a, b, (2.0, 1.0, 0.5)) == pytest.approx(binary.asd(a, b, (2.0, 1.0, 0.5)), rel=1e-12)
        checked += 1
    assert checked >= 4
