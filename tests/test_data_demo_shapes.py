"""Tests of common/data/demo_shapes.py: the embedded two-domain few-shot demo."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from common.data.demo_shapes import SOURCE_CLASSES, TARGET_CLASSES, draw_shape_mask, ensure_demo_shapes
from common.data.fewshot_datasets import class_folder_classes


@pytest.mark.parametrize(
    "shape, area, boundary",
    [
        # circumradius r = 20 px. area A and boundary length P (outer minus hole) by hand:
        ("disc", np.pi * 20**2, 2 * np.pi * 20),  # A = pi r^2 = 1256.6, P = 125.7
        ("square", 2 * 20**2, 4 * 20 * np.sqrt(2)),  # side r sqrt 2 = 28.28: A = 2 r^2 = 800, P = 113.1
        ("triangle", 3 * np.sqrt(3) / 4 * 20**2, 3 * 20 * np.sqrt(3)),  # side r sqrt 3: A = 519.6, P = 103.9
        # 10 triangles of sides r, 0.45 r = 9 at 36 deg: A = 10 * 0.5 * 20 * 9 sin 36 = 529.0,
        # edge sqrt(20^2 + 9^2 - 2 * 20 * 9 cos 36) = 13.74, P = 137.4
        ("star", 10 * 0.5 * 20 * 9 * np.sin(np.pi / 5), 10 * np.sqrt(20**2 + 9**2 - 2 * 20 * 9 * np.cos(np.pi / 5))),
        ("ring", np.pi * (20**2 - 11**2), 2 * np.pi * (20 - 11)),  # hole 0.55 r = 11: A = 876.5, P = 56.5
        ("cross", 8 * 20 * 6 - 4 * 6**2, 8 * (20 - 6) + 4 * 12),  # arm half-width w = 6: A = 8rw - 4w^2 = 816, P = 160
    ],
)
def test_shape_areas_by_hand(shape, area, boundary):
    # filled shapes count their boundary pixels: about A + P / 2 pixels (Pick's theorem, boundary counted in full)
    for angle in (0.0, 0.3, 1.0):
        mask = draw_shape_mask(shape, 64, (32.0, 32.0), 20.0, angle)
        assert set(np.unique(mask).tolist()) == {0, 255}
        expected = area + boundary / 2
        assert abs((mask > 0).sum() - expected) / expected < 0.04, (shape, angle)


def test_unknown_shape():
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        draw_shape_mask("hexagon", 32, (16, 16), 8, 0)


def test_demo_layout_style_and_idempotence(tmp_path):
    start = time.perf_counter()
    root = ensure_demo_shapes(tmp_path / "demo")
    assert time.perf_counter() - start < 5.0  # ~0.2 s on a 2-core machine; generous bound for a loaded one
    source = class_folder_classes(f"{root}/source", drop_empty=False)
    target = class_folder_classes(f"{root}/target", drop_empty=False)
    assert list(source) == sorted(SOURCE_CLASSES) and list(target) == sorted(TARGET_CLASSES)
    assert all(len(items) == 12 for items in [*source.values(), *target.values()])
    item = source["star"][0]
    image, mask = np.asarray(Image.open(item["image"])), np.asarray(Image.open(item["mask"]))
    assert image.shape == (128, 128, 3) and mask.shape == (128, 128) and set(np.unique(mask).tolist()) == {0, 255}
    # domain shift: the source background is light (mean grey level > 140), the target one dark (< 80)
    bg = lambda it: np.asarray(Image.open(it["image"]))[np.asarray(Image.open(it["mask"])) == 0].mean()  # noqa: E731
    assert min(bg(it) for items in source.values() for it in items) > 140
    assert max(bg(it) for items in target.values() for it in items) < 80
    # idempotent: a second call rewrites nothing; no temporary folder is left beside it
    stamp = (tmp_path / "demo" / "source" / "star" / "star_000.png").stat().st_mtime_ns
    assert ensure_demo_shapes(tmp_path / "demo") == root
    assert (tmp_path / "demo" / "source" / "star" / "star_000.png").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["demo"]


def test_demo_is_seeded(tmp_path):
    a = ensure_demo_shapes(tmp_path / "a", n_per_class=2, size=48, seed=3)
    b = ensure_demo_shapes(tmp_path / "b", n_per_class=2, size=48, seed=3)
    c = ensure_demo_shapes(tmp_path / "c", n_per_class=2, size=48, seed=4)
    rel = "target/cross/cross_001.png"
    assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert (tmp_path / "a" / rel).read_bytes() != (tmp_path / "c" / rel).read_bytes()
    assert a.endswith("a") and b.endswith("b") and c.endswith("c")


def test_demo_refuses_foreign_folder_and_bad_sizes(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        ensure_demo_shapes(tmp_path / "data")
    with pytest.raises(ValueError, match="n_per_class >= 2"):
        ensure_demo_shapes(tmp_path / "x", n_per_class=1)
