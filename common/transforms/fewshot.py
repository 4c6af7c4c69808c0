"""Image/mask loading of few-shot segmentation episodes, as PATNet / HSNet readers do it (specs/cdtg.md §1).

PATNet (Lei et al., "Cross-Domain Few-Shot Semantic Segmentation", ECCV 2022) and HSNet (Min et al., ICCV 2021)
prepare every query and support pair the same way, with ``S`` the image size (400; 321 for the CD-TG WBC reader):

* image: PIL ``convert("RGB")`` -> ``resize((S, S), BILINEAR)`` -> ``x / 255`` -> ``(x - mean) / std`` with the
  ImageNet statistics ``mean = (0.485, 0.456, 0.406)``, ``std = (0.229, 0.224, 0.225)``; tensor ``[3, S, S]``;
* mask: the 8-bit label image ``M`` at its original size gives the foreground ``m = [M >= 128]`` (binary targets)
  or ``m = [M in fg_values]`` (label maps: PASCAL ``M == c + 1``, CHAOS organ value, WBC 128 / 255) and the
  ignore map ``i = [M == ignore_value]`` (PASCAL boundary 255); both are resized to
  ``[S, S]`` exactly as ``F.interpolate(mode="nearest")`` does and returned as float32 ``{0, 1}`` tensors.

An *item* (what the readers of :py:mod:`common.data.fewshot_datasets` return) is a dict::

    {"image": path | uint8 [H, W, 3] (or [H, W]), "mask": path | uint8 [H, W], "name": str,
     "fg_values": list[int] | None, "ignore_value": int | None,
     "label_values": list[int] (optional), "volume": str, "slice": int (optional, volume slices)}

``label_values`` lists every value of the dataset's label map. When ``fg_values`` are given, a mask value outside
``label_values`` (default: ``fg_values``) ``∪ {0, ignore_value}`` is an error: a label outside the label map.

Decoded arrays are cached per file (least recently used first out, ``cache_size`` files), so that the 600
episodes of a small target dataset do not decode the same files again and again.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["FewShotPairLoader", "IMAGENET_MEAN", "IMAGENET_STD", "foreground_and_ignore", "item_source"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def item_source(value: object, name: str) -> str:
    """How an item's image or mask is named in messages: its path, or ``"<in-memory array of NAME>"``."""
    return str(value) if isinstance(value, (str, os.PathLike)) else f"<in-memory array of {name}>"


def foreground_and_ignore(
    mask: np.ndarray,
    fg_values: Sequence[int] | None = None,
    ignore_value: int | None = None,
    label_values: Sequence[int] | None = None,
    source: str = "mask",
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean foreground and ignore maps ``[H, W]`` of an 8-bit label image ``mask [H, W]``.

    ``fg_values=None``: foreground ``mask >= 128`` (PATNet's binary rule). Otherwise foreground ``mask in fg_values``
    and every value must lie in ``label_values`` (default ``fg_values``) ``∪ {0, ignore_value}``.

    Raises:
        ValueError: ``mask`` is not uint8, or holds a value outside the label map; the message names ``source``.
    """
    if mask.dtype != np.uint8:
        raise ValueError(f"mask {source} must be a uint8 label image, got dtype {mask.dtype}.")
    ignore = mask == ignore_value if ignore_value is not None else np.zeros(mask.shape, bool)
    if fg_values is None:
        return (mask >= 128) & ~ignore, ignore
    allowed = set(int(v) for v in (label_values if label_values is not None else fg_values)) | {0}
    if ignore_value is not None:
        allowed.add(int(ignore_value))
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))  # uint8 values present, sorted
    outside = [int(v) for v in present if int(v) not in allowed]
    if outside:
        raise ValueError(
            f"mask {source} holds the value(s) {outside}, a label outside the label map {sorted(allowed)} "
            f"(foreground values {list(fg_values)}, ignore value {ignore_value})."
        )
    return np.isin(mask, np.asarray(list(fg_values))), ignore


def _nearest_index(size_in: int, size_out: int) -> np.ndarray:
    """Source indices of torch's ``nearest`` resize from ``size_in`` to ``size_out`` samples."""
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


class FewShotPairLoader:
    """Turn an item into ``(image [3, S, S] float32 normalised, mask [S, S] {0, 1}, ignore [S, S] {0, 1})``.

    Args:
        image_size: ``S``, the square size of images and masks (PATNet: 400).
        cache_size: number of decoded files kept in memory (least recently used dropped first); 0 disables it.

    Raises (on call):
        FileNotFoundError: an image or mask file does not exist.
        ValueError: a file cannot be decoded, image and mask differ in size, a mask has 3 unequal channels
            (a colour image given as mask) or values beyond 8 bits, or a label lies outside the label map.
    """

    def __init__(self, image_size: int = 400, cache_size: int = 512) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size!r}")
        self.image_size = image_size
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._mean = np.asarray(IMAGENET_MEAN, np.float32)
        self._std = np.asarray(IMAGENET_STD, np.float32)

    # ------------------------------------------------------------------------------------------------ decoding
    def _cached(self, role: str, path: str | os.PathLike, decode) -> np.ndarray:
        key = (role, os.fspath(path))
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        array = decode(Path(path))
        array.setflags(write=False)
        if self.cache_size:
            self._cache[key] = array
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return array

    @staticmethod
    def _decode(path: Path, role: str, mode: str | None) -> np.ndarray:
        """Pixels of the file at ``path`` (converted to PIL ``mode`` unless None), with errors naming the file."""
        if not path.is_file():
            raise FileNotFoundError(f"{role} file {path} does not exist.")
        try:
            with Image.open(path) as img:
                img.load()
                return np.array(img.convert(mode) if mode is not None and img.mode != mode else img)
        except Exception as err:  # UnidentifiedImageError, truncated data, DecompressionBombError, ...
            raise ValueError(f"{role} file {path} cannot be read as an image: {type(err).__name__}: {err}") from err

    @classmethod
    def _decode_image(cls, path: Path) -> np.ndarray:
        return cls._decode(path, "image", "RGB")

    @classmethod
    def _decode_mask(cls, path: Path) -> np.ndarray:
        return cls._mask_array(cls._decode(path, "mask", None), str(path))

    @staticmethod
    def _mask_array(array: np.ndarray, source: str) -> np.ndarray:
        """8-bit ``[H, W]`` from a mask array ``[H, W]`` or ``[H, W, C]`` (alpha dropped, equal channels)."""
        if array.ndim == 3:
            colour = array[..., :3] if array.shape[-1] in (3, 4) else array[..., :1]
            if colour.shape[-1] == 3 and not (
                np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2])
            ):
                raise ValueError(
                    f"mask {source} has 3 channels that are not equal: a colour image given as mask? "
                    "Expected a single-channel label image."
                )
            array = colour[..., 0]
        if array.ndim != 2:
            raise ValueError(f"mask {source} must be 2D [H, W], got shape {tuple(array.shape)}.")
        if array.dtype != np.uint8:
            if array.dtype == bool:
                return array.astype(np.uint8) * 255
            if not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
                raise ValueError(
                    f"mask {source} is not an 8-bit label image (dtype {array.dtype}, values "
                    f"{array.min()}..{array.max()})."
                )
            array = array.astype(np.uint8)
        return np.ascontiguousarray(array)

    def read_image(self, image: str | os.PathLike | np.ndarray, name: str = "item") -> np.ndarray:
        """RGB ``uint8 [H, W, 3]`` of a path (decoded and cached) or an in-memory ``[H, W]`` / ``[H, W, 3]`` array."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] != 3):
                raise ValueError(
                    f"in-memory image of {name} must be uint8 [H, W, 3] or [H, W], got {image.dtype} "
                    f"{tuple(image.shape)}."
                )
            return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image
        return self._cached("image", image, self._decode_image)

    def read_mask(self, mask: str | os.PathLike | np.ndarray, name: str = "item") -> np.ndarray:
        """8-bit ``[H, W]`` label image of a path (decoded and cached) or an in-memory array."""
        if isinstance(mask, np.ndarray):
            return self._mask_array(mask, item_source(mask, name))
        return self._cached("mask", mask, self._decode_mask)

    # ------------------------------------------------------------------------------------------------ tensors
    def image_tensor(self, rgb: np.ndarray) -> torch.Tensor:
        """``[3, S, S]`` float32: PIL bilinear resize, ``/ 255``, ImageNet normalisation (numpy: tiny torch ops
        are slow in data-loader workers that share the cores with the network)."""
        size = self.image_size
        resized = np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB").resize((size, size), Image.BILINEAR))
        x = (resized.astype(np.float32) * np.float32(1.0 / 255.0) - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

    def resize_binary(self, binary: np.ndarray) -> torch.Tensor:
        """``[S, S]`` float32 {0, 1} of a boolean ``[H, W]`` map, resized as ``F.interpolate(mode="nearest")``:
        output pixel ``i`` reads input ``min(floor(i * H / S), H - 1)`` (scale in float32, as torch computes it)."""
        rows = _nearest_index(binary.shape[0], self.image_size)
        cols = _nearest_index(binary.shape[1], self.image_size)
        return torch.from_numpy(binary[rows[:, None], cols[None, :]].astype(np.float32))

    def __call__(self, item: Mapping) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        name = str(item.get("name", "item"))
        rgb = self.read_image(item["image"], name)
        label = self.read_mask(item["mask"], name)
        if rgb.shape[:2] != label.shape:
            raise ValueError(
                f"image {item_source(item['image'], name)} is {rgb.shape[1]}x{rgb.shape[0]} (width x height) but "
                f"its mask {item_source(item['mask'], name)} is {label.shape[1]}x{label.shape[0]}; "
                "they must have the same size."
            )
        fg, ignore = foreground_and_ignore(
            label, item.get("fg_values"), item.get("ignore_value"), item.get("label_values"),
            item_source(item["mask"], name),
        )
        return self.image_tensor(rgb), self.resize_binary(fg), self.resize_binary(ignore)
