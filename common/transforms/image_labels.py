"""Image-level class labels for weakly supervised training, given as a number or derived from a mask file.

The EndoKED-WSSS stage learns from one label per frame (1: a polyp is visible, 0: none; specs/endoked.md §3.1).
Its own datalists carry that number; MONAI Label's ``BundleTrainTask`` hands a bundle ``{"image", "label"}`` pairs
whose label is a mask file. :class:`ImageLevelLabeld` accepts both, so the same ``train.json`` trains from the
MIL stage's selection and from an annotated datastore: a mask becomes ``y = 1`` when any pixel is foreground
(``y = [max_p g_p > 0]``), which is the weakest label the mask implies.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from PIL import Image, UnidentifiedImageError

__all__ = ["ImageLevelLabeld", "image_level_label"]


def image_level_label(value: Any, image_size: tuple[int, int] | None = None, image_name: str = "the image") -> float:
    """``value`` as a 0/1 float: a number (0/1, True/False) as is, a mask file as ``1.0`` when any pixel is > 0.

    Args:
        value: the label, or the path of a mask.
        image_size: ``(H, W)`` the mask must have (its image's size), checked when given.
        image_name: the image, for the error message.

    Raises:
        FileNotFoundError: a mask path that does not exist (named).
        ValueError: a number other than 0/1, a file that is not an image, or a mask whose size is not the image's
            (named).
    """
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"label mask {path} does not exist")
        try:
            with Image.open(path) as mask:
                grey = np.asarray(mask.convert("L"))
        except (UnidentifiedImageError, OSError) as err:
            raise ValueError(f"label mask {path} is not a readable image: {err}") from err
        if image_size is not None and tuple(grey.shape) != tuple(image_size):
            raise ValueError(f"label mask {path} is {grey.shape[0]}x{grey.shape[1]} (HxW) but {image_name} is "
                             f"{image_size[0]}x{image_size[1]}")
        return float(grey.max() > 0)
    label = float(torch.as_tensor(value).reshape(-1)[0]) if not isinstance(value, (int, float)) else float(value)
    if label not in (0.0, 1.0):
        raise ValueError(f"image-level label must be 0 or 1 (or a mask file), got {value!r}")
    return label


class ImageLevelLabeld(MapTransform):
    """Replace ``d[key]`` by a float tensor ``[1]`` holding the image-level class (:func:`image_level_label`).

    Args:
        keys: label keys.
        image_key: a loaded channel-first image ``(C, H, W)`` (numpy order, ``LoadPolypImaged(reverse_indexing=
            False)``) whose size a mask label must match; None skips the check.
        allow_missing_keys: MONAI's.
    """

    def __init__(self, keys: KeysCollection = "label", image_key: str | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d.get(self.image_key) if self.image_key is not None else None
        size = tuple(image.shape[-2:]) if image is not None else None
        name = str(getattr(image, "meta", {}).get("filename_or_obj", "the image")) if image is not None else "the image"
        for key in self.key_iterator(d):
            d[key] = torch.tensor([image_level_label(d[key], size, name)], dtype=torch.float32)
        return d
