"""Exam (bag) datasets for EndoKED-MIL (common/data/exam_bags.py), the demo exam generator
(common/data/demo_exams.py) and the builder of exams from real polyp frames (scripts/make_polyp_exams.py)."""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.transforms import Compose, LoadImaged, RandFlipd
from PIL import Image

from common.data.demo_exams import ensure_demo_exam_dataset, make_demo_exam_dataset
from common.data.exam_bags import (
    BagDataset,
    exam_bag_datalist,
    exam_report,
    instance_datalist,
    make_exams_from_polyp_sets,
    mil_frame_transforms,
    polyp_free_window,
    split_bags,
)
from conftest import load_script, read_csv, require_data

# ---------------------------------------------------------------------------------------------------- helpers


def write_frame(path: Path, value=(200, 80, 70), size: tuple[int, int] = (16, 12), mode: str = "RGB") -> Path:
    """A constant PIL image of ``size`` (width, height)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)
    return path


def write_table(path: Path, header: list[str], rows: list[tuple]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_exams(root: Path, frames: dict[str, list[str]], labels: dict[str, int] | None) -> Path:
    """``root/exams/<id>/<name>`` frames, and ``exam_labels.csv`` from ``labels`` (None: no CSV)."""
    for exam_id, names in frames.items():
        (root / "exams" / exam_id).mkdir(parents=True, exist_ok=True)
        for name in names:
            write_frame(root / "exams" / exam_id / name)
    if labels is not None:
        write_table(root / "exam_labels.csv", ["exam_id", "label"], list(labels.items()))
    return root


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mask_max(path: Path) -> int:
    with Image.open(path) as img:
        return int(np.asarray(img).max())


# ---------------------------------------------------------------------------------------------------- datalist


def test_layout_parsing(tmp_path, caplog):
    root = make_exams(tmp_path, {"b": ["2.png", "10.png", "1.jpg"], "a": ["x.png", "y.png"], "c": ["z.png"]},
                      {"b": 1, "a": 0})
    (root / "exams" / "b" / "notes.txt").write_text("not a frame")
    write_table(root / "instance_labels.csv", ["image", "label"], [("exams/b/10.png", 1), ("exams/a/y.png", 0)])
    with caplog.at_level(logging.WARNING):
        bags = exam_bag_datalist(root)
    assert "['c']" in caplog.text  # folder without a label: skipped with a warning naming it
    assert [b["exam_id"] for b in bags] == ["a", "b"]
    exams = (root / "exams").absolute()
    # name order (strings): "1.jpg" < "10.png" < "2.png"; notes.txt is not a frame
    assert bags[1]["image"] == [str(exams / "b" / n) for n in ("1.jpg", "10.png", "2.png")]
    assert [b["label"] for b in bags] == [0, 1]
    assert bags[0]["instance_label"] == [-1, 0]  # x.png not listed -> -1, y.png -> 0
    assert bags[1]["instance_label"] == [-1, 1, -1]


def test_max_instances_keeps_the_first_frames(tmp_path):
    root = make_exams(tmp_path, {"e": [f"{i}.png" for i in range(5)]}, {"e": 1})
    assert [Path(p).name for p in exam_bag_datalist(root, max_instances=3)[0]["image"]] == ["0.png", "1.png", "2.png"]
    assert len(exam_bag_datalist(root, max_instances=None)[0]["image"]) == 5
    with pytest.raises(ValueError, match="max_instances"):
        exam_bag_datalist(root, max_instances=0)


def test_labels_csv_argument(tmp_path):
    root = make_exams(tmp_path, {"e": ["0.png"]}, None)
    other = write_table(tmp_path / "elsewhere.csv", ["exam_id", "label", "report"], [("e", 1, "polyp")])
    assert exam_bag_datalist(root, labels_csv=other)[0]["label"] == 1


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("no_exams_folder", FileNotFoundError, r"no exams/ folder"),
        ("no_labels_csv", FileNotFoundError, r"exam_labels\.csv does not exist"),
        ("missing_column", ValueError, r"exam_labels\.csv lacks the column\(s\) \['label'\]"),
        ("duplicate_id", ValueError, r"exam id 'e1' appears more than once"),
        ("bad_label", ValueError, r"exam 'e1': label '2' is not 0 or 1"),
        ("no_folder", FileNotFoundError, r"labels exam\(s\) \['ghost'\] that have no folder"),
        ("empty_folder", ValueError, r"exam folder .*e1 holds no frame"),
        ("empty_dataset", ValueError, r"no labelled exam"),
        ("bad_instance_label", ValueError, r"instance_labels\.csv, frame 'exams/e1/0\.png': label 'yes'"),
        ("unknown_instance_frame", ValueError, r"frame 'exams/e1/9\.png' does not exist"),
    ],
)
def test_bad_datasets_name_the_problem(tmp_path, case, error, pattern):
    root = tmp_path / "data"
    frames = {"e1": ["0.png"]}
    labels_header, label_rows = ["exam_id", "label"], [("e1", 1)]
    if case == "no_exams_folder":
        frames = {}
    elif case == "missing_column":
        labels_header, label_rows = ["exam_id", "lbl"], [("e1", 1)]
    elif case == "duplicate_id":
        label_rows = [("e1", 1), ("e1", 0)]
    elif case == "bad_label":
        label_rows = [("e1", 2)]
    elif case == "no_folder":
        label_rows = [("e1", 1), ("ghost", 0)]
    elif case == "empty_folder":
        frames = {"e1": []}
    elif case == "empty_dataset":
        label_rows = []
    make_exams(root, frames, None)
    root.mkdir(exist_ok=True)
    if case != "no_labels_csv":
        write_table(root / "exam_labels.csv", labels_header, label_rows)
    if case == "bad_instance_label":
        write_table(root / "instance_labels.csv", ["image", "label"], [("exams/e1/0.png", "yes")])
    if case == "unknown_instance_frame":
        write_table(root / "instance_labels.csv", ["image", "label"], [("exams/e1/9.png", 1)])
    with pytest.raises(error, match=pattern):
        exam_bag_datalist(root)


def test_split_is_seeded_at_exam_level():
    bags = [{"exam_id": f"e{i}", "label": i % 2} for i in range(10)]
    train, val = split_bags(bags)
    assert (len(train), len(val)) == (7, 3)  # round(0.7 * 10) = 7 exams for training, 10 - 7 = 3 for validation
    ids = lambda part: [b["exam_id"] for b in part]  # noqa: E731
    assert sorted(ids(train) + ids(val), key=lambda s: int(s[1:])) == ids(bags)  # every exam once
    assert ids(train) == [i for i in ids(bags) if i in ids(train)]  # input order kept
    assert split_bags(bags, seed=42) == (train, val)  # the default seed is 42, and it is deterministic
    assert len({tuple(ids(split_bags(bags, seed=s)[1])) for s in range(5)}) > 1  # the seed matters
    assert [len(p) for p in split_bags(bags, train_fraction=0.5, seed=1)] == [5, 5]


def test_split_errors():
    bags = [{"exam_id": "a", "label": 0}, {"exam_id": "b", "label": 1}]
    with pytest.raises(ValueError, match="leaves validation empty"):
        split_bags(bags, train_fraction=0.9)  # round(0.9 * 2) = 2 = all exams
    with pytest.raises(ValueError, match="leaves training empty"):
        split_bags(bags, train_fraction=0.2)  # round(0.2 * 2) = 0
    with pytest.raises(ValueError, match="train_fraction"):
        split_bags(bags, train_fraction=1.0)


def test_instance_datalist_flattens_bags():
    bags = [{"exam_id": "a", "image": ["a0", "a1"], "label": 1, "instance_label": [0, 1]},
            {"exam_id": "b", "image": ["b0"], "label": 0, "instance_label": [-1]}]
    assert instance_datalist(bags) == [
        {"image": "a0", "label": 1, "instance_label": 0, "exam_id": "a", "bag_index": 0},
        {"image": "a1", "label": 1, "instance_label": 1, "exam_id": "a", "bag_index": 0},
        {"image": "b0", "label": 0, "instance_label": -1, "exam_id": "b", "bag_index": 1},
    ]


# ---------------------------------------------------------------------------------------------------- tensors


def test_bag_dataset_shapes_and_dtypes(tmp_path):
    root = make_exams(tmp_path, {"a": ["0.png", "1.jpg", "2.png"], "b": ["0.png"]}, {"a": 1, "b": 0})
    write_frame(root / "exams" / "a" / "1.jpg", size=(30, 20))  # frames of different sizes are resized alike
    bags = exam_bag_datalist(root)
    dataset = BagDataset(bags, mil_frame_transforms(image_size=8))
    item = dataset[0]
    assert item["image"].shape == (3, 3, 8, 8) and item["image"].dtype == torch.float32
    assert type(item["image"]) is torch.Tensor  # no MetaTensor: collates to a plain (1, N, 3, H, W) batch
    assert item["label"].dtype == torch.long and item["label"].shape == () and int(item["label"]) == 1
    assert item["instance_label"].tolist() == [-1, -1, -1] and item["instance_label"].dtype == torch.long
    assert item["exam_id"] == "a" and item["image_paths"] == bags[0]["image"]
    assert dataset[0] is item  # cached
    batch = next(iter(DataLoader(dataset, batch_size=1, shuffle=False)))
    assert batch["image"].shape == (1, 3, 3, 8, 8) and batch["label"].tolist() == [1]
    assert batch["exam_id"] == ["a"]


def test_normalisation_of_a_constant_frame(tmp_path):
    path = write_frame(tmp_path / "f.png", value=(128, 128, 128), size=(10, 6))
    image = mil_frame_transforms(image_size=4)({"image": str(path)})["image"]
    # x = 128 / 255 = 0.50196078, then (x - mean_c) / std_c:
    #   R: (0.50196078 - 0.31512642) / 0.30684662 = 0.18683436 / 0.30684662 = 0.6088852
    #   G: (0.50196078 - 0.20470396) / 0.21589851 = 0.29725682 / 0.21589851 = 1.3768359
    #   B: (0.50196078 - 0.13602576) / 0.15230405 = 0.36593502 / 0.15230405 = 2.4026612
    expected = torch.tensor([0.6088852, 1.3768359, 2.4026612]).view(3, 1, 1).expand(3, 4, 4)
    assert torch.allclose(image, expected, atol=1e-5)


def test_frames_keep_numpy_row_order(tmp_path):
    array = np.zeros((8, 16, 3), np.uint8)  # 8 rows x 16 columns: top half black, bottom half white
    array[4:] = 255
    path = tmp_path / "f.png"
    Image.fromarray(array).save(path)
    image = mil_frame_transforms(image_size=8, mean=(0, 0, 0), std=(1, 1, 1))({"image": str(path)})["image"]
    # rows (axis 1) go from 0 to 1, every row is constant along the columns (axis 2)
    assert image[:, 0].max() == 0.0 and image[:, -1].min() == 1.0
    assert torch.equal(image.amax(dim=2), image.amin(dim=2))


def test_bad_frames_are_named(tmp_path):
    root = make_exams(tmp_path, {"a": ["0.png", "1.png"]}, {"a": 1})
    bad = root / "exams" / "a" / "1.png"
    bad.write_bytes(b"this is not a png")
    dataset = BagDataset(exam_bag_datalist(root), mil_frame_transforms(image_size=8), cache=False)
    with pytest.raises(ValueError, match=re.escape(f"cannot load image file {bad.absolute()}")):
        dataset[0]
    write_frame(bad, value=100, mode="L")  # one channel
    with pytest.raises(ValueError, match=re.escape(str(bad.absolute())) + r".*3 channels"):
        dataset[0]


def test_bag_dataset_needs_same_shapes_and_deterministic_cache(tmp_path):
    root = make_exams(tmp_path, {"a": ["0.png", "1.png"]}, {"a": 1})
    write_frame(root / "exams" / "a" / "1.png", size=(20, 12))
    load = Compose([LoadImaged(keys="image", reader="PILReader", ensure_channel_first=True)])  # no resizing
    with pytest.raises(ValueError, match=r"1\.png of exam 'a' has shape \(3, 20, 12\).*0\.png has \(3, 16, 12\)"):
        BagDataset(exam_bag_datalist(root), load)[0]
    with pytest.raises(ValueError, match="deterministic"):
        BagDataset(exam_bag_datalist(root), Compose([load, RandFlipd(keys="image", prob=0.5)]), cache=True)


# ---------------------------------------------------------------------------------------------------- reports


def test_exam_report_matches_its_label():
    rng = np.random.default_rng(0)
    for _ in range(5):
        assert re.fullmatch(r"Colonoscopy to the caecum\. An? \d+ mm [a-z-]+ polyp in the [a-z ]+, [a-z ]+\.",
                            exam_report(1, rng, "en"))
        assert exam_report(0, rng, "en").endswith("No polyps were seen.")
        assert exam_report(0, rng, "zh").endswith("全结肠未见息肉。")
        assert re.search(r"见一枚\d\.\dcm息肉", exam_report(1, rng, "zh"))
        assert "Possible" in exam_report(None, rng, "en") and "可疑息肉" in exam_report(None, rng, "zh")
    with pytest.raises(ValueError, match="language"):
        exam_report(1, rng, "fr")


# ---------------------------------------------------------------------------------------------------- crops


def test_polyp_free_window_by_hand():
    mask = np.zeros((20, 40), np.uint8)
    mask[:, :4] = 255  # polyp in columns 0..3
    # dilation radius max(2, round(0.02 * 20)) = 2 -> columns 0..5 taken, 6..39 free (34 wide, 20 high);
    # aspect 40/20 = 2: height h needs width round(2h) <= 34 -> h = 17, w = 34; x0 = 6, y0 in 0..3;
    # centre of the placements ((20-17)/2, (40-34)/2) = (1.5, 3): y0 = 1 and 2 tie at 0.5, row-major first -> 1
    assert polyp_free_window(mask, crop_fraction=0.35) == (1, 6, 18, 40)
    assert polyp_free_window(np.zeros((20, 40), np.uint8)) == (0, 0, 20, 40)  # no polyp: the whole frame
    mask[:, :20] = 255  # columns 0..21 taken, 18 free -> h <= 9 < ceil(0.5 * 20) = 10
    assert polyp_free_window(mask, crop_fraction=0.5) is None
    # crop_fraction 0.4: h from ceil(0.4 * 20) = 8 up; the largest is h = 9, w = 18, x0 = 22, y0 in 0..11;
    # centre ((20-9)/2, (40-18)/2) = (5.5, 11): y0 = 5 and 6 tie, first -> 5
    assert polyp_free_window(mask, crop_fraction=0.4) == (5, 22, 14, 40)


def _check_built_exams(out: Path, source_root: Path) -> None:
    """Properties every built exam dataset must have (shared by the real-data and the synthetic test)."""
    bags = exam_bag_datalist(out)
    assert {b["label"] for b in bags} == {0, 1}
    sources = {row["image"]: row for row in read_csv(out / "sources.csv")}
    reports = {row["exam_id"]: row["report"] for row in read_csv(out / "reports.csv")}
    exam_of_source: dict[str, str] = {}
    for bag in bags:
        assert bag["label"] == max(bag["instance_label"])  # positive exams hold a polyp frame, negatives none
        negation = "No polyps were seen" in reports[bag["exam_id"]] or "未见息肉" in reports[bag["exam_id"]]
        assert negation == (bag["label"] == 0)
        for image, inst in zip(bag["image"], bag["instance_label"]):
            rel = Path(image).relative_to(out.absolute()).as_posix()
            row = sources[rel]
            assert Path(row["source_image"]).is_relative_to(source_root)
            # a source frame and its crop stay in one exam
            assert exam_of_source.setdefault(row["source_image"], bag["exam_id"]) == bag["exam_id"]
            mask_path = out / "masks" / bag["exam_id"] / f"{Path(image).stem}.png"
            if inst == 1:
                assert "_crop" not in rel and mask_max(mask_path) == 255
            else:
                y0, x0, y1, x1 = (int(row[k]) for k in ("y0", "x0", "y1", "x1"))
                with Image.open(row["source_mask"]) as source_mask:
                    window = np.asarray(source_mask.convert("L"))[y0:y1, x0:x1]
                assert window.size and window.max() == 0  # the crop holds no mask pixel of its source
                assert mask_max(mask_path) == 0


@pytest.mark.realdata
def test_make_exams_from_polyp_sets_on_real_frames(tmp_path):
    polyp_root = require_data("polyp")
    out = make_exams_from_polyp_sets(polyp_root, tmp_path / "exams", frames_per_exam=(2, 3), size=(32, 32))
    _check_built_exams(out, polyp_root)
    with Image.open(next((out / "exams").rglob("*.jpg"))) as img:
        assert img.size == (32, 32)


def test_make_exams_is_deterministic_and_refuses_non_empty_output(tmp_path):
    root = tmp_path / "polyps" / "SetA"
    for i in range(8):  # 40 x 30 frames, a 10 x 10 polyp in the top-left corner: the crops lie right/below it
        array = np.full((30, 40, 3), 40 * (i % 4) + 60, np.uint8)
        mask = np.zeros((30, 40), np.uint8)
        mask[:10, :10] = 255
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(exist_ok=True)
        Image.fromarray(array).save(root / "images" / f"f{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"f{i}.png")
    first = make_exams_from_polyp_sets(tmp_path / "polyps", tmp_path / "one", frames_per_exam=(2, 4), size=(24, 24))
    _check_built_exams(first, tmp_path / "polyps")
    script = load_script("make_polyp_exams")
    second = script.make_polyp_exams(str(tmp_path / "polyps"), str(tmp_path / "two"), frames_per_exam=(2, 4),
                                     size=(24, 24))
    assert digests(first) == digests(Path(second))
    with pytest.raises(FileExistsError, match="not empty"):
        make_exams_from_polyp_sets(tmp_path / "polyps", first)


# ---------------------------------------------------------------------------------------------------- demo


DEMO = {"n_exams": 4, "frames": (2, 4), "size": (32, 48), "n_uncertain": 2}


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_exam_dataset(tmp_path_factory.mktemp("demo") / "data", **DEMO)


def test_demo_layout_and_balance(demo):
    assert not (demo / "exam_labels.csv").exists()  # the report labeller writes it
    reports = {row["exam_id"]: row["report"] for row in read_csv(demo / "reports.csv")}
    exam_ids = sorted(p.name for p in (demo / "exams").iterdir())
    assert sorted(reports) == exam_ids and len(exam_ids) == 6  # 4 definite + 2 uncertain exams
    frame_labels = {row["image"]: int(row["label"]) for row in read_csv(demo / "instance_labels.csv")}
    kinds = []
    for exam_id in exam_ids:
        frames = sorted((demo / "exams" / exam_id).iterdir())
        assert 2 <= len(frames) <= 4
        labels = [frame_labels[f"exams/{exam_id}/{f.name}"] for f in frames]
        for frame, label in zip(frames, labels):
            with Image.open(frame) as img:
                assert img.size == (48, 32) and img.mode == "RGB"
            assert mask_max(demo / "masks" / exam_id / f"{frame.stem}.png") == 255 * label
        if any(labels):
            assert 0.3 <= sum(labels) / len(labels) <= 0.6  # 30-60 % polyp frames: n=2 -> 1, n=3 -> 1, n=4 -> 2
        report = reports[exam_id]
        kind = "uncertain" if ("Possible" in report or "可疑" in report) else (
            "negative" if ("No polyps" in report or "未见息肉" in report) else "positive")
        assert kind == "uncertain" or (kind == "positive") == any(labels)
        kinds.append(kind)
    assert sorted(kinds) == ["negative"] * 2 + ["positive"] * 2 + ["uncertain"] * 2  # balanced: 4 // 2 = 2 each
    text = "".join(reports.values())
    assert re.search("[a-z]", text) and re.search("[\u4e00-\u9fff]", text)  # English and Chinese reports


def test_demo_is_idempotent_and_deterministic(demo, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()}
    assert ensure_demo_exam_dataset(demo, **DEMO) == str(demo)
    assert {p: p.stat().st_mtime_ns for p in demo.rglob("*") if p.is_file()} == before  # nothing rewritten
    again = make_demo_exam_dataset(tmp_path / "again", **DEMO)
    assert digests(again) == digests(demo)


def test_demo_feeds_the_bag_reader(demo, tmp_path):
    labels = tmp_path / "labels.csv"  # what a report labeller writes: the definite exams only
    reports = read_csv(demo / "reports.csv")
    definite = [(r["exam_id"], int("No polyps" not in r["report"] and "未见" not in r["report"])) for r in reports
                if "Possible" not in r["report"] and "可疑" not in r["report"]]
    write_table(labels, ["exam_id", "label"], definite)
    bags = exam_bag_datalist(demo, labels_csv=labels)
    assert len(bags) == 4 and all(-1 not in b["instance_label"] for b in bags)
    item = BagDataset(bags[:1], mil_frame_transforms(image_size=16))[0]
    assert item["image"].shape == (len(bags[0]["image"]), 3, 16, 16)


def test_demo_arguments(tmp_path):
    with pytest.raises(ValueError, match="frames"):
        make_demo_exam_dataset(tmp_path / "a", frames=(1, 3))
    with pytest.raises(ValueError, match="n_exams"):
        make_demo_exam_dataset(tmp_path / "b", n_exams=1)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("real data")
    with pytest.raises(FileExistsError):
        make_demo_exam_dataset(tmp_path / "c", **DEMO)


def test_frame_datalist_ids_keep_the_exam_folder(tmp_path):
    from common.data.exam_bags import frame_datalist

    for exam in ("a", "b"):
        (tmp_path / exam).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / exam / "f0.png")
    (tmp_path / "a" / "notes.txt").write_text("x")
    # two frames named f0 in two exams: the ids stay distinct; the text file is not an image
    assert [d["id"] for d in frame_datalist(tmp_path)] == ["a/f0", "b/f0"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image file"):
        frame_datalist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing"):
        frame_datalist(tmp_path / "missing")
