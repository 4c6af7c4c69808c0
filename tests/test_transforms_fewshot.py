"""Tests of common/transforms/fewshot.py: PATNet's image/mask preparation of few-shot episodes (specs/cdtg.md §1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.transforms.fewshot import FewShotPairLoader, foreground_and_ignore


def _save(path, array, mode=None):
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)
    return str(path)


def _item(image, mask, **kw):
    return {"image": image, "mask": mask, "name": "x", "fg_values": None, "ignore_value": None, **kw}


def test_image_is_imagenet_normalised(tmp_path):
    rgb = np.zeros((5, 7, 3), np.uint8)
    rgb[...] = (255, 0, 128)
    mask = np.full((5, 7), 255, np.uint8)
    item = _item(_save(tmp_path / "a.png", rgb), _save(tmp_path / "m.png", mask))
    image, m, ignore = FewShotPairLoader(image_size=6)(item)
    assert image.shape == (3, 6, 6) and image.dtype == torch.float32
    # a constant image stays constant under bilinear resizing:
    # R (255/255 - 0.485)/0.229 = 2.24891, G (0 - 0.456)/0.224 = -2.03571, B (128/255 - 0.406)/0.225 = 0.42658
    expected = torch.tensor([2.24891, -2.03571, 0.42658]).view(3, 1, 1).expand(3, 6, 6)
    assert torch.allclose(image, expected, atol=1e-4)
    assert m.shape == (6, 6) and m.dtype == torch.float32 and m.eq(1).all() and ignore.eq(0).all()


def test_grey_palette_and_rgba_images_become_rgb(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    mask = np.full((3, 4), 255, np.uint8)
    m = _save(tmp_path / "m.png", mask)
    loader = FewShotPairLoader(image_size=4)
    for name, img in {"grey": Image.fromarray(grey), "palette": Image.fromarray(grey).convert("P"),
                      "rgba": Image.fromarray(np.stack([grey] * 4, -1), "RGBA")}.items():
        img.save(tmp_path / f"{name}.png")
        rgb = loader.read_image(str(tmp_path / f"{name}.png"))
        assert rgb.shape == (3, 4, 3), name
        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2]), name
        image, _, _ = loader(_item(str(tmp_path / f"{name}.png"), m))
        assert image.shape == (3, 4, 4)


def test_binary_rule_threshold_128_at_original_size(tmp_path):
    # one row per value: 0, 127 -> background; 128, 255 -> foreground (PATNet: >= 128)
    mask = np.repeat(np.array([0, 127, 128, 255], np.uint8)[:, None], 4, axis=1)
    rgb = np.zeros((4, 4, 3), np.uint8)
    _, m, _ = FewShotPairLoader(image_size=4)(_item(rgb, _save(tmp_path / "m.png", mask)))
    assert m[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_nearest_resize_of_masks():
    # 2x2 -> 4x4 with F.interpolate(nearest): source index floor(i * 2 / 4) -> rows/cols 0,0,1,1
    mask = np.array([[0, 255], [255, 0]], np.uint8)
    _, m, _ = FewShotPairLoader(image_size=4)(_item(np.zeros((2, 2, 3), np.uint8), mask))
    expected = [[0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]
    assert m.tolist() == expected


@pytest.mark.parametrize("h, w, size",
                         [(120, 120, 321), (681, 1024, 400), (7, 13, 400), (500, 333, 321), (3, 1000, 17)])
def test_nearest_resize_matches_torch_interpolate(h, w, size):
    binary = np.random.default_rng(h).random((h, w)) > 0.5
    expected = F.interpolate(torch.from_numpy(binary.astype(np.float32))[None, None], size=(size, size),
                             mode="nearest")[0, 0]
    assert torch.equal(FewShotPairLoader(image_size=size).resize_binary(binary), expected)


def test_label_map_foreground_and_ignore(tmp_path):
    # PASCAL-style: class 3 of a label map 0..20 with boundary 255
    mask = np.array([[0, 3, 3, 255], [5, 3, 0, 255], [0, 0, 5, 0], [20, 0, 0, 0]], np.uint8)
    item = _item(np.zeros((4, 4, 3), np.uint8), _save(tmp_path / "m.png", mask), fg_values=[3], ignore_value=255,
                 label_values=list(range(21)))
    _, m, ignore = FewShotPairLoader(image_size=4)(item)
    assert m.tolist() == (mask == 3).astype(float).tolist()
    assert ignore.tolist() == (mask == 255).astype(float).tolist()
    # the ignore value never counts as foreground, even with the >= 128 rule
    fg, ign = foreground_and_ignore(np.array([[255, 200]], np.uint8), None, 255)
    assert fg.tolist() == [[False, True]] and ign.tolist() == [[True, False]]


def test_label_outside_the_label_map(tmp_path):
    mask = np.array([[0, 128], [255, 7]], np.uint8)
    path = _save(tmp_path / "wbc.png", mask)
    loader = FewShotPairLoader(image_size=2)
    with pytest.raises(ValueError, match=r"wbc\.png.*\[7\].*label outside the label map"):
        loader(_item(np.zeros((2, 2, 3), np.uint8), path, fg_values=[255], label_values=[0, 128, 255]))
    # without label_values only fg_values, 0 and the ignore value are allowed: 128 is outside
    mask[1, 1] = 0
    with pytest.raises(ValueError, match="label outside"):
        loader(_item(np.zeros((2, 2, 3), np.uint8), mask, fg_values=[255]))
    _, m, _ = loader(_item(np.zeros((2, 2, 3), np.uint8), mask, fg_values=[255], label_values=[0, 128, 255]))
    assert m.tolist() == [[0, 0], [1, 0]]


def test_missing_corrupt_and_mismatched_files(tmp_path):
    loader = FewShotPairLoader(image_size=4)
    image = _save(tmp_path / "img.png", np.zeros((4, 5, 3), np.uint8))
    mask = _save(tmp_path / "mask.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(FileNotFoundError, match="nothere.png"):
        loader(_item(str(tmp_path / "nothere.png"), mask))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(ValueError, match="broken.png.*cannot be read"):
        loader(_item(str(tmp_path / "broken.png"), mask))
    with pytest.raises(ValueError, match=r"img\.png is 5x4.*mask\.png is 4x4"):
        loader(_item(image, mask))


def test_colour_mask_is_rejected_grey_rgb_mask_accepted(tmp_path):
    loader = FewShotPairLoader(image_size=2)
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    with pytest.raises(ValueError, match=r"colour\.png has 3 channels that are not equal"):
        loader(_item(np.zeros((2, 2, 3), np.uint8), _save(tmp_path / "colour.png", colour)))
    grey_rgb = np.zeros((2, 2, 3), np.uint8)
    grey_rgb[0, 0] = 255
    _, m, _ = loader(_item(np.zeros((2, 2, 3), np.uint8), _save(tmp_path / "grey_rgb.png", grey_rgb)))
    assert m.tolist() == [[1, 0], [0, 0]]


def test_sixteen_bit_mask_beyond_255_is_rejected(tmp_path):
    path = tmp_path / "m16.png"
    Image.fromarray(np.array([[0, 300]], np.uint16)).save(path)
    with pytest.raises(ValueError, match="m16.png is not an 8-bit label image"):
        FewShotPairLoader(image_size=2).read_mask(str(path))


def test_decoded_files_are_cached_lru(tmp_path):
    a = _save(tmp_path / "a.png", np.full((2, 2), 255, np.uint8))
    b = _save(tmp_path / "b.png", np.zeros((2, 2), np.uint8))
    loader = FewShotPairLoader(image_size=2, cache_size=1)
    loader.read_mask(a)
    (tmp_path / "a.png").unlink()
    assert loader.read_mask(a).max() == 255  # served from the cache, the file is gone
    loader.read_mask(b)  # evicts a (cache of one file)
    with pytest.raises(FileNotFoundError, match="a.png"):
        loader.read_mask(a)
    no_cache = FewShotPairLoader(image_size=2, cache_size=0)
    no_cache.read_mask(b)
    (tmp_path / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match="b.png"):
        no_cache.read_mask(b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="image_size"):
        FewShotPairLoader(image_size=0)
    with pytest.raises(ValueError, match="in-memory image of z"):
        FewShotPairLoader(image_size=2).read_image(np.zeros((2, 2, 3), np.float32), "z")
