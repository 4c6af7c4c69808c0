"""Embedded demo classification dataset (common/data/demo_classification.py) and its once-only, atomic writer
(common/data/generated.py): layout, determinism, idempotence, regeneration, refusal, interruption, arguments."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import common.data.demo_classification as demo
from common.data.classification_folders import classification_datalist
from common.data.demo_classification import (
    DEMO_CLASSES,
    ensure_demo_classification_dataset,
    make_demo_classification_dataset,
)
from common.data.generated import MARKER, ensure_generated

SMALL = {"n_per_class": 2, "n_unlabelled": 1, "size": 16}  # 4 x 2 + 1 = 9 images of 16 x 16


def digests(root: Path) -> dict[str, str]:
    """SHA-256 of every file under ``root`` (relative path -> hex digest)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def mtimes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_demo(tmp_path_factory) -> Path:
    return make_demo_classification_dataset(tmp_path_factory.mktemp("demo") / "data")


def test_default_layout(default_demo):
    images = sorted(p.name for p in (default_demo / "images").iterdir())
    # 16 labelled images x 4 classes + 8 unlabelled = 72, ids 0000 .. 0071
    assert images == [f"{i:04d}.png" for i in range(72)]
    with Image.open(default_demo / "images" / "0000.png") as img:
        assert img.mode == "RGB" and img.size == (64, 64)
    with open(default_demo / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["id", "class_id", "class_name"]
    assert [r["id"] for r in rows] == [f"{i:04d}" for i in range(64)]  # the last 8 ids are unlabelled
    assert Counter(r["class_name"] for r in rows) == {name: 16 for name in DEMO_CLASSES}
    # class_id is 1-based: round 1, bilobed 2, multilobed 3, kidney 4
    assert {(r["class_id"], r["class_name"]) for r in rows} == {("1", "round"), ("2", "bilobed"),
                                                               ("3", "multilobed"), ("4", "kidney")}
    marker = json.loads((default_demo / MARKER).read_text())
    assert marker["n_per_class"] == 16 and marker["n_unlabelled"] == 8 and marker["size"] == 64
    assert marker["seed"] == 0 and marker["generator"] == "common.data.demo_classification"
    assert len(marker["files"]) == 72 + 1  # every image and labels.csv


def test_readable_by_the_classification_reader(default_demo):
    train = classification_datalist(default_demo, "train")
    test = classification_datalist(default_demo, "test")
    ssl = classification_datalist(default_demo, "ssl")
    # default test_fraction 0.3: n_test = floor(16 * 0.3 + 0.5) = floor(5.3) = 5 per class -> 20 test, 44 train
    assert len(test) == 20 and len(train) == 44
    assert Counter(e["label"] for e in test) == {0: 5, 1: 5, 2: 5, 3: 5}
    # ssl: the 44 training images and the 8 unlabelled ones (label -1), never a test image
    assert len(ssl) == 52 and sum(e["label"] == -1 for e in ssl) == 8
    assert {e["id"] for e in ssl}.isdisjoint({e["id"] for e in test})
    assert {e["id"] for e in ssl if e["label"] == -1} == {f"{i:04d}" for i in range(64, 72)}


def test_deterministic_bytes_for_a_seed(tmp_path):
    a = make_demo_classification_dataset(tmp_path / "a", **SMALL, seed=7)
    b = make_demo_classification_dataset(tmp_path / "b", **SMALL, seed=7)
    c = make_demo_classification_dataset(tmp_path / "c", **SMALL, seed=8)
    assert digests(a) == digests(b)
    da, dc = digests(a), digests(c)
    assert da.keys() == dc.keys()
    assert da["images/0000.png"] != dc["images/0000.png"]


def test_second_call_rewrites_nothing(tmp_path, monkeypatch):
    root = make_demo_classification_dataset(tmp_path / "demo", **SMALL)
    before = mtimes(root)

    def no_render(*args, **kwargs):
        raise AssertionError("the dataset was rendered again")

    monkeypatch.setattr(demo, "_render", no_render)
    assert ensure_demo_classification_dataset(tmp_path / "demo", **SMALL) == str(root)
    assert mtimes(root) == before


def test_changed_parameters_or_missing_file_regenerate(tmp_path):
    root = make_demo_classification_dataset(tmp_path / "demo", **SMALL)
    make_demo_classification_dataset(root, **dict(SMALL, size=24, n_unlabelled=0))
    # 4 x 2 labelled images, no unlabelled one: 0000 .. 0007 only, now 24 x 24
    assert sorted(p.name for p in (root / "images").iterdir()) == [f"{i:04d}.png" for i in range(8)]
    with Image.open(root / "images" / "0000.png") as img:
        assert img.size == (24, 24)
    assert json.loads((root / MARKER).read_text())["size"] == 24
    (root / "images" / "0003.png").unlink()
    make_demo_classification_dataset(root, **dict(SMALL, size=24, n_unlabelled=0))
    assert (root / "images" / "0003.png").is_file()
    # nothing but the dataset and its lock file beside it
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


def test_foreign_folders_are_refused_and_left_alone(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"mine exists and was not made by common\.data\.demo_classification"):
        make_demo_classification_dataset(foreign, **SMALL)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    # a folder made by another generator is foreign too
    other = tmp_path / "other"
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"generator": "someone.else", "files": []}))
    with pytest.raises(FileExistsError, match="other exists and was not made by"):
        make_demo_classification_dataset(other, **SMALL)
    # a file in place of the folder
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileExistsError, match="afile exists"):
        make_demo_classification_dataset(tmp_path / "afile", **SMALL)
    # an empty folder is filled
    (tmp_path / "empty").mkdir()
    assert len(list((make_demo_classification_dataset(tmp_path / "empty", **SMALL) / "images").iterdir())) == 9


def interrupting_render(monkeypatch, at_call: int) -> None:
    original, calls = demo._render, []

    def render(*args, **kwargs):
        calls.append(1)
        if len(calls) == at_call:
            raise KeyboardInterrupt("interrupted")
        return original(*args, **kwargs)

    monkeypatch.setattr(demo, "_render", render)


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    interrupting_render(monkeypatch, at_call=3)
    with pytest.raises(KeyboardInterrupt):
        make_demo_classification_dataset(tmp_path / "demo", **SMALL)
    assert not (tmp_path / "demo").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock"]  # no temporary folder either


def test_interrupted_regeneration_keeps_the_previous_dataset(tmp_path, monkeypatch):
    root = make_demo_classification_dataset(tmp_path / "demo", **SMALL)
    before = digests(root)
    interrupting_render(monkeypatch, at_call=3)
    with pytest.raises(KeyboardInterrupt):
        make_demo_classification_dataset(root, **dict(SMALL, seed=1))
    assert digests(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".demo.lock", "demo"]


@pytest.mark.parametrize("kwargs, named", [
    ({"n_per_class": 1}, "n_per_class=1"),
    ({"n_unlabelled": -1}, "n_unlabelled=-1"),
    ({"size": 8}, "size=8"),
])
def test_bad_arguments(tmp_path, kwargs, named):
    with pytest.raises(ValueError, match=named):
        make_demo_classification_dataset(tmp_path / "demo", **dict(SMALL, **kwargs))
    assert not (tmp_path / "demo").exists()


def test_ensure_generated_marker_lists_the_files(tmp_path):
    params = {"generator": "tests.toy", "n": 2}

    def write(folder: Path) -> list[str]:
        for i in range(params["n"]):
            (folder / f"{i}.txt").write_text(str(i))
        return [f"{i}.txt" for i in range(params["n"])]

    root = ensure_generated(tmp_path / "toy", params, write, "toy set")
    assert root == (tmp_path / "toy").absolute()
    assert json.loads((root / MARKER).read_text()) == {"generator": "tests.toy", "n": 2, "files": ["0.txt", "1.txt"]}
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "0.txt", "1.txt"]


def test_nucleus_area_follows_the_class_geometry(default_demo):
    # Nucleus / cell area ratios from the shapes of the module docstring (cell disc radius r, area pi r^2):
    #   round: (0.55)^2 = 0.3025;  bilobed: 2 discs of 0.35 r that touch, 2 (0.35)^2 = 0.245;
    #   multilobed: 4 discs of 0.24 r, neighbours 2 (0.45) sin(0.4) = 0.3505 r apart, each lens
    #     2 a^2 acos(d / 2a) - (d / 2) sqrt(4 a^2 - d^2) = 0.1152 * 0.7516 - 0.17525 * 0.32795 = 0.02911 r^2,
    #     union 4 pi (0.24)^2 - 3 * 0.02911 = 0.72384 - 0.08733 = 0.6365 r^2 -> 0.6365 / pi = 0.2026;
    #   kidney: pi (0.6)^2 minus the lens of radii 0.6 / 0.45 at distance 0.45:
    #     0.36 acos(0.6667) + 0.2025 acos(0.1111) - 0.5 sqrt(0.6 * 0.6 * 0.3 * 1.5) = 0.3028 + 0.2956 - 0.2012
    #     = 0.3971 r^2 -> (1.1310 - 0.3971) / pi = 0.2336.
    # Nucleus pixels: red < 0.6 (nucleus R <= 0.5 * 1.05, cytoplasm 0.80, background 0.93); cell pixels: green
    # < 0.76 (cytoplasm 0.70, nucleus <= 0.30 * 1.05, background 0.82). The class means match within 0.025.
    expected = {"round": 0.3025, "bilobed": 0.245, "multilobed": 0.2026, "kidney": 0.2336}
    ratios: dict[str, list[float]] = {name: [] for name in expected}
    with open(default_demo / "labels.csv", newline="") as f:
        for row in csv.DictReader(f):
            with Image.open(default_demo / "images" / f"{row['id']}.png") as img:
                rgb = np.asarray(img, dtype=np.float32) / 255.0
            ratios[row["class_name"]].append((rgb[..., 0] < 0.6).sum() / (rgb[..., 1] < 0.76).sum())
    for name, value in expected.items():
        assert np.mean(ratios[name]) == pytest.approx(value, abs=0.025), name
