"""ImageLevelLabeld: numbers pass through as [1] floats, masks give 1 when any pixel is foreground."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from common.transforms.image_labels import ImageLevelLabeld, image_level_label


def test_numbers_and_masks(tmp_path):
    empty, one_pixel = tmp_path / "empty.png", tmp_path / "dot.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(empty)
    dot = np.zeros((4, 5), np.uint8)
    dot[2, 3] = 255  # a single foreground pixel is enough: max > 0
    Image.fromarray(dot).save(one_pixel)
    assert image_level_label(1) == 1.0 and image_level_label(0.0) == 0.0 and image_level_label(True) == 1.0
    assert image_level_label(str(empty)) == 0.0 and image_level_label(one_pixel) == 1.0
    out = ImageLevelLabeld("label")({"image": "x", "label": str(one_pixel)})
    assert torch.equal(out["label"], torch.tensor([1.0])) and out["image"] == "x"
    assert torch.equal(ImageLevelLabeld("label")({"label": torch.tensor(0.0)})["label"], torch.tensor([0.0]))


def test_bad_labels_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="0 or 1"):
        image_level_label(2)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        image_level_label(str(tmp_path / "missing.png"))
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="text.png"):
        image_level_label(str(tmp_path / "text.png"))


def test_mask_of_another_size_than_the_image_is_named(tmp_path):
    mask = tmp_path / "m.png"
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(mask)  # H 4, W 5
    image = torch.zeros(3, 4, 5)
    assert ImageLevelLabeld("label", image_key="image")({"image": image, "label": str(mask)})["label"].item() == 0.0
    with pytest.raises(ValueError, match=r"m\.png is 4x5 \(HxW\) but the image is 5x4"):
        ImageLevelLabeld("label", image_key="image")({"image": torch.zeros(3, 5, 4), "label": str(mask)})
