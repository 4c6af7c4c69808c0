"""generate_pseudo_masks end to end with an oracle map, and read_filtered_list (specs/endoked.md §1, §3.6, §4.4)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.engines.pseudo_masks import generate_pseudo_masks, label_name_of, read_filtered_list
from common.networks.box_refiners import GrabCutBoxRefiner, ThresholdRefiner
from conftest import read_csv, require_data

H, W = 60, 80  # H * W = 4800


def discs(*specs: tuple[int, int, int]) -> np.ndarray:
    """Union of discs ``(cy, cx, r)`` on an (H, W) canvas."""
    yy, xx = np.mgrid[:H, :W]
    out = np.zeros((H, W), bool)
    for cy, cx, r in specs:
        out |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    return out


# Ground truths and why the box filter decides as it does:
CASES = {
    "centre": discs((30, 40, 10)),  # 1 disc, box 21x21 = 441 / 4800 = 0.0919 -> ok
    "border": discs((5, 40, 10)),  # reaches row 0 -> "touches border"
    "empty": np.zeros((H, W), bool),  # -> "no foreground"
    "three": discs((15, 15, 4), (15, 60, 4), (45, 40, 4)),  # 3 blobs -> "3 components (limit: fewer than 3)"
    "big": discs((30, 40, 25)),  # box 51x51 = 2601 / 4800 = 0.5419 -> area rule
}
REASONS = {
    "border": "touches border",
    "empty": "no foreground",
    "three": "3 components (limit: fewer than 3)",
    "big": "box area ratio 0.5419 outside (0.01, 0.35)",
}


def write_case(folder: Path, name: str, gt: np.ndarray) -> tuple[str, str]:
    """Image: dark noise with the ground truth painted bright red; mask: 0/255 PNG. Returns (image, mask) paths."""
    rng = np.random.default_rng(len(name))
    image = rng.integers(0, 60, (H, W, 3)).astype(np.uint8)
    image[gt] = (220, 40, 40)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    image_path, mask_path = folder / "images" / f"{name}.png", folder / "masks" / f"{name}.png"
    Image.fromarray(image).save(image_path)
    Image.fromarray(gt.astype(np.uint8) * 255).save(mask_path)
    return str(image_path), str(mask_path)


def oracle(image: np.ndarray) -> np.ndarray:
    """The painted ground truth back from the image: 1.0 on the red disc, 0.0 elsewhere."""
    return (image[..., 0] > 128).astype(np.float64)


@pytest.fixture
def dataset(tmp_path):
    pairs = [write_case(tmp_path / "data", name, gt) for name, gt in CASES.items()]
    return [p for p, _ in pairs], {p: m for p, m in pairs}


def test_end_to_end_with_oracle_and_threshold_refiner(dataset, tmp_path):
    images, gts = dataset
    out = tmp_path / "round0"
    result = generate_pseudo_masks(images, oracle, ThresholdRefiner(), out, gt_paths=gts, overlay_count=3)
    assert (result.n_images, result.n_accepted, result.n_rejected) == (5, 1, 4)
    assert result.coverage == pytest.approx(1 / 5)
    assert result.mean_dice == pytest.approx(1.0) and result.n_dice == 1  # (2*317 + 1) / (317 + 317 + 1)

    assert sorted(p.name for p in (out / "labels").iterdir()) == ["00000.png"]
    label = np.asarray(Image.open(out / "labels" / "00000.png"))
    assert label.dtype == np.uint8 and label.shape == (H, W)
    assert set(np.unique(label)) == {0, 255}
    np.testing.assert_array_equal(label == 255, CASES["centre"])

    assert read_csv(out / "filtered.csv") == [{"filtered_img_path": images[0], "filtered_label_name": "00000.png"}]
    rejected = read_csv(out / "rejected.csv")
    assert [(r["img_path"], r["label_name"], r["reason"]) for r in rejected] == [
        (images[i], label_name_of(i), REASONS[name]) for i, name in enumerate(CASES) if name != "centre"
    ]
    dice_rows = read_csv(out / "pseudo_mask_dice.csv")
    assert [(r["label_name"], r["accepted"], r["dice"]) for r in dice_rows] == [
        ("00000.png", "1", "1.000000"), ("00001.png", "0", ""), ("00002.png", "0", ""), ("00003.png", "0", ""),
        ("00004.png", "0", ""),
    ]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["00000.png", "00001.png", "00002.png"]
    assert Image.open(out / "overlays" / "00000.png").size == (2 * W, H)  # two panels side by side
    assert result.label_dir == out / "labels" and result.dice_csv == out / "pseudo_mask_dice.csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "round0"]  # no staging folder left


def test_threshold_comparison_strict_or_inclusive(dataset, tmp_path):
    images, _ = dataset

    def at_threshold(image):
        return oracle(image) * 0.65  # the disc is exactly at t = 0.65

    strict = generate_pseudo_masks(images[:1], at_threshold, ThresholdRefiner(), tmp_path / "a", overlay_count=0)
    assert strict.n_accepted == 0  # 0.65 > 0.65 is false: empty map
    assert read_csv(tmp_path / "a" / "rejected.csv")[0]["reason"] == "no foreground"
    inclusive = generate_pseudo_masks(images[:1], at_threshold, ThresholdRefiner(), tmp_path / "b",
                                      threshold_inclusive=True, overlay_count=0)
    assert inclusive.n_accepted == 1 and inclusive.dice_csv is None and inclusive.mean_dice is None


def test_min_max_normalisation_of_predictions(dataset, tmp_path):
    images, gts = dataset

    def weak(image):
        return 0.2 + 0.1 * oracle(image)  # background 0.2, disc 0.3

    # Without normalisation nothing exceeds 0.65. With it: (0.3 - 0.2) / (0.1 + 1e-8) = 0.9999999 >= 0.01 on the
    # disc and (0.2 - 0.2) / ... = 0 elsewhere, so the map is the disc again.
    plain = generate_pseudo_masks(images[:1], weak, ThresholdRefiner(), tmp_path / "a", overlay_count=0)
    assert plain.n_accepted == 0
    normed = generate_pseudo_masks(images[:1], weak, ThresholdRefiner(), tmp_path / "b", threshold=0.01,
                                   threshold_inclusive=True, min_max_normalise=True,
                                   gt_paths={images[0]: gts[images[0]]}, overlay_count=0)
    assert normed.n_accepted == 1 and normed.mean_dice == pytest.approx(1.0)


def test_grabcut_refiner_in_the_loop(dataset, tmp_path):
    images, gts = dataset
    result = generate_pseudo_masks(images[:1], oracle, GrabCutBoxRefiner(), tmp_path / "g", gt_paths={
        images[0]: gts[images[0]]}, overlay_count=0)
    assert result.n_accepted == 1 and result.mean_dice > 0.8  # red disc on dark noise: an easy cut


def test_failure_midway_publishes_nothing(dataset, tmp_path):
    images, _ = dataset
    out = tmp_path / "round1"
    calls = []

    def flaky(image):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("model crashed")
        return oracle(image)

    with pytest.raises(RuntimeError, match="model crashed"):
        generate_pseudo_masks(images, flaky, ThresholdRefiner(), out)
    assert len(calls) == 3 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left behind

    # A previous complete result stays as it was.
    generate_pseudo_masks(images[:1], oracle, ThresholdRefiner(), out, overlay_count=0)
    calls.clear()
    with pytest.raises(RuntimeError):
        generate_pseudo_masks(images, flaky, ThresholdRefiner(), out)
    assert len(read_csv(out / "filtered.csv")) == 1 and read_csv(out / "rejected.csv") == []


def test_bad_inputs_name_the_file(dataset, tmp_path):
    images, gts = dataset
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing.png"):
        generate_pseudo_masks([str(tmp_path / "missing.png")], oracle, ThresholdRefiner(), out)
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="corrupt.jpg cannot be read"):
        generate_pseudo_masks([str(corrupt)], oracle, ThresholdRefiner(), out)
    with pytest.raises(ValueError, match=r"centre.png: prob_fn returned shape \(30, 40\)"):
        generate_pseudo_masks(images[:1], lambda im: oracle(im)[::2, ::2], ThresholdRefiner(), out)
    with pytest.raises(ValueError, match="not in image_paths"):
        generate_pseudo_masks(images[:1], oracle, ThresholdRefiner(), out, gt_paths={images[1]: gts[images[1]]})
    with pytest.raises(ValueError, match="image_paths is empty"):
        generate_pseudo_masks([], oracle, ThresholdRefiner(), out)
    assert not out.exists()


def test_read_filtered_list_round_trip_and_errors(dataset, tmp_path):
    images, _ = dataset
    out = tmp_path / "r"
    generate_pseudo_masks(images, oracle, ThresholdRefiner(), out, overlay_count=0)
    items = read_filtered_list(out / "filtered.csv", out / "labels")
    assert items == [{"image": images[0], "label": str(out / "labels" / "00000.png")}]

    with pytest.raises(FileNotFoundError, match="nothing.csv"):
        read_filtered_list(tmp_path / "nothing.csv", out / "labels")
    bad = tmp_path / "bad.csv"
    bad.write_text("img_path,label_name\na.png,00000.png\n")
    with pytest.raises(ValueError, match="bad.csv lacks the column.*filtered_img_path, filtered_label_name"):
        read_filtered_list(bad, out / "labels")
    with pytest.raises(FileNotFoundError, match="1 listed file.*elsewhere/00000.png"):
        read_filtered_list(out / "filtered.csv", tmp_path / "elsewhere")
    empty = tmp_path / "empty.csv"
    empty.write_text("filtered_img_path,filtered_label_name\n")
    with pytest.raises(ValueError, match="lists no image"):
        read_filtered_list(empty, out / "labels")


def test_real_polyps_with_ground_truth_oracle(tmp_path):
    """Real JPEG frames and masks: the oracle map (normalised GT) at ``>= 0.5`` through the same filter gives Dice 1
    for every accepted image, and every rejection has a reason."""
    root = require_data("polyp")
    pairs = []
    for set_name in ("CVC-ClinicDB", "Kvasir"):
        for image in sorted((root / set_name / "images").iterdir())[:3]:
            masks = list((root / set_name / "masks").glob(image.stem + ".*"))
            assert len(masks) == 1, f"no single mask for {image}"
            pairs.append((str(image), str(masks[0])))
    gt_by_pixels = {}
    for image, mask in pairs:
        g = np.asarray(Image.open(mask).convert("L"), dtype=np.float64)
        gt_by_pixels[np.asarray(Image.open(image).convert("RGB")).tobytes()] = g / max(g.max(), 1e-8)

    result = generate_pseudo_masks([p for p, _ in pairs], lambda im: gt_by_pixels[im.tobytes()], ThresholdRefiner(),
                                   tmp_path / "real", threshold=0.5, threshold_inclusive=True, gt_paths=dict(pairs),
                                   overlay_count=1)
    rows = read_csv(tmp_path / "real" / "pseudo_mask_dice.csv")
    assert len(rows) == 6 and result.n_accepted + result.n_rejected == 6
    # the map is exactly the binarised GT (g >= 0.5), so each accepted pseudo mask has Dice (2n+1)/(2n+1) = 1
    assert all(float(r["dice"]) == pytest.approx(1.0) for r in rows if r["accepted"] == "1")
    assert result.n_accepted == sum(r["accepted"] == "1" for r in rows) >= 1
    assert all(row["reason"] for row in read_csv(result.rejected_csv))
    for item in read_filtered_list(result.filtered_csv, result.label_dir):
        with Image.open(item["label"]) as label, Image.open(item["image"]) as image:
            assert label.size == image.size and label.mode == "L"
