"""DINO multi-crop augmentation and the evaluation transform of Sparsam.

Sparsam (Nielsen et al., "Self-Supervision for Medical Image Classification: State-of-the-Art Performance with
~100 Labeled Training Samples per Class", Bioengineering 10(8):895, 2023; arXiv 2304.05163) trains DINO (Caron et
al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021) on 2 global and ``n_local`` local
views of every image (specs/sparsam.md §2.2-2.3). Each image is

1. read as RGB (PIL ``convert("RGB")``) and resized to ``image_resolution x image_resolution`` with nearest
   neighbour interpolation (aspect ratio not kept);
2. for each view, independently: RandomPerspective(0.5, p) -> RandomRotation(±180°) -> RandomResizedCrop(size,
   scale) -> horizontal and vertical flips (p 0.5 each) -> ColorJitter(0.4, 0.4, 0.2, 0.1) with p 0.8 ->
   RandomGrayscale(0.2) -> GaussianBlur(kernel 11, sigma ~ U(0.1, 5)) with p_blur -> RandomSolarize(128) with
   p_solarize, where

   ========  =====  ====  ==========  =============  ======  ==========
   view      count  size  scale       p_perspective  p_blur  p_solarize
   ========  =====  ====  ==========  =============  ======  ==========
   global 1  1      256   (0.5, 1.0)  0.75           1.0     0
   global 2  1      256   (0.5, 1.0)  0.5            0.1     0.2
   local     5      96    (0.1, 0.5)  0.5            0.5     0
   ========  =====  ====  ==========  =============  ======  ==========

   (counts, sizes and scales are the defaults; the probabilities are fixed.)

3. scaled to ``[-1, 1]``: ``x = 2 * clamp(x / 255, 0, 1) - 1`` (not ImageNet mean/std, spec §2.2 and §9.9).

Views come back in the order ``[global 1, global 2, local 1, ..., local n_local]``, each a float32 tensor
``[3, size, size]``. The evaluation transform (spec §6.1) is steps 1 and 3 only.

Implementation notes. The views are built with :py:mod:`torchvision.transforms.v2`: MONAI has no hue/saturation
jitter or solarisation for RGB images (spec §8). As in the reference code, the geometric and colour steps run on
PIL images (a tensor input is converted to PIL first), so their interpolation is PIL's. The blur and the
solarisation run on the ``uint8`` tensor, which is what torchvision's blur does internally for a PIL image too
(solarisation gives the same pixels either way). Randomness comes from torch's global generator: seed it with
``torch.manual_seed`` (or :py:func:`monai.utils.set_determinism`); DataLoader workers get distinct torch seeds.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTrait, Transform
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

__all__ = [
    "ImageInput",
    "load_rgb",
    "as_rgb_pil",
    "as_uint8_rgb",
    "to_minus_one_one",
    "MultiCropAugmentation",
    "EvalTransform",
    "MultiCropd",
    "EvalTransformd",
]

ImageInput = Union[str, os.PathLike, Image.Image, torch.Tensor]
"""An image file path, a PIL image (any mode, converted to RGB) or a ``uint8`` tensor ``[3, H, W]``."""


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Read an image file as an RGB PIL image (``Image.open(path).convert("RGB")``, as the reference code does).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file cannot be decoded as an image (unknown format, truncated data); the message names it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist.")
    try:
        with Image.open(path) as img:
            return img.convert("RGB")  # decodes all pixels, so a truncated file fails here
    except Exception as err:  # UnidentifiedImageError, OSError("image file is truncated"), ...
        raise ValueError(f"cannot decode image file {path}: {type(err).__name__}: {err}") from err


def _check_uint8_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image tensor must be uint8 of shape [3, H, W], got dtype {image.dtype} and shape {list(image.shape)}."
        )
    return torch.as_tensor(image)


def as_rgb_pil(image: ImageInput) -> Image.Image:
    """An image as an RGB PIL image.

    Args:
        image: a path (read with :py:func:`load_rgb`), a PIL image (converted to RGB) or a ``uint8`` tensor
            ``[3, H, W]``.

    Raises:
        ValueError: a tensor that is not ``uint8`` or not of shape ``[3, H, W]``.
        TypeError: any other input type.
    """
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(image)
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        return F.to_pil_image(_check_uint8_rgb(image), mode="RGB")
    raise TypeError(f"image must be a path, a PIL image or a uint8 tensor [3, H, W], got {type(image).__name__}.")


def as_uint8_rgb(image: ImageInput) -> torch.Tensor:
    """An image as a ``uint8`` tensor ``[3, H, W]`` (RGB), e.g. to decode each file once in the cached part of a
    MONAI pipeline (``Lambdad(keys="image", func=as_uint8_rgb)`` before :py:class:`MultiCropd` in a
    :py:class:`monai.data.CacheDataset`). Accepts what :py:func:`as_rgb_pil` accepts; a tensor is checked and
    returned as is."""
    if isinstance(image, torch.Tensor):
        return _check_uint8_rgb(image)
    return F.pil_to_tensor(as_rgb_pil(image))


def to_minus_one_one(image: torch.Tensor) -> torch.Tensor:
    """``uint8`` ``[3, H, W]`` in ``[0, 255]`` -> float32 in ``[-1, 1]``: ``2 * clamp(x / 255, 0, 1) - 1``."""
    return F.to_dtype(image, torch.float32, scale=True).clamp_(0.0, 1.0).mul_(2.0).sub_(1.0)


def _resize(image: Image.Image, resolution: int | None) -> Image.Image:
    """PIL nearest-neighbour resize to ``resolution x resolution`` (spec §2.2); None returns ``image``."""
    if resolution is None or image.size == (resolution, resolution):
        return image
    return image.resize((resolution, resolution), Image.NEAREST)


def _check_size(name: str, value: int | None, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {tuple(scale)}.")
    return float(scale[0]), float(scale[1])


def _view_pipeline(
    size: int, scale: tuple[float, float], p_perspective: float, p_blur: float, p_solarize: float
) -> v2.Compose:
    """One view of spec §2.3: RGB PIL image -> ``uint8`` tensor ``[3, size, size]``."""
    steps: list[torch.nn.Module] = [
        v2.RandomPerspective(distortion_scale=0.5, p=p_perspective),
        v2.RandomRotation(180),
        v2.RandomResizedCrop(size, scale=scale),
        v2.RandomHorizontalFlip(0.5),
        v2.RandomVerticalFlip(0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(0.2),
        v2.PILToTensor(),
        v2.RandomApply([v2.GaussianBlur(kernel_size=11, sigma=(0.1, 5.0))], p=p_blur),
    ]
    if p_solarize > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=p_solarize))
    return v2.Compose(steps)


class MultiCropAugmentation(Transform, RandomizableTrait):
    """DINO multi-crop views of one image, with Sparsam's settings (module docstring; spec §2.3).

    Args:
        global_size: side of the 2 global views (spec: 256 = ``image_resolution``).
        local_size: side of the local views (spec: 96).
        global_scale: RandomResizedCrop area range of the global views (spec: (0.5, 1.0)).
        local_scale: RandomResizedCrop area range of the local views (spec: (0.1, 0.5)).
        n_local: number of local views (spec: 5); 0 gives the 2 global views only.
        image_resolution: side the image is first resized to with nearest neighbour (spec: 256); None skips it.

    Call with a path, a PIL image or a ``uint8`` tensor ``[3, H, W]``; returns ``2 + n_local`` float32 tensors in
    ``[-1, 1]``: two ``[3, global_size, global_size]`` then ``n_local`` ``[3, local_size, local_size]``.
    """

    def __init__(
        self,
        global_size: int = 256,
        local_size: int = 96,
        global_scale: Sequence[float] = (0.5, 1.0),
        local_scale: Sequence[float] = (0.1, 0.5),
        n_local: int = 5,
        image_resolution: int | None = 256,
    ) -> None:
        _check_size("global_size", global_size)
        _check_size("local_size", local_size)
        _check_size("image_resolution", image_resolution, allow_none=True)
        if isinstance(n_local, bool) or not isinstance(n_local, int) or n_local < 0:
            raise ValueError(f"n_local must be a non-negative integer, got {n_local!r}.")
        g_scale, l_scale = _check_scale("global_scale", global_scale), _check_scale("local_scale", local_scale)
        self.image_resolution = image_resolution
        self.n_local = n_local
        self.global1 = _view_pipeline(global_size, g_scale, p_perspective=0.75, p_blur=1.0, p_solarize=0.0)
        self.global2 = _view_pipeline(global_size, g_scale, p_perspective=0.5, p_blur=0.1, p_solarize=0.2)
        self.local = _view_pipeline(local_size, l_scale, p_perspective=0.5, p_blur=0.5, p_solarize=0.0)

    def __call__(self, image: ImageInput) -> list[torch.Tensor]:
        image = _resize(as_rgb_pil(image), self.image_resolution)
        views = [self.global1(image), self.global2(image)] + [self.local(image) for _ in range(self.n_local)]
        return [to_minus_one_one(v) for v in views]


class EvalTransform(Transform):
    """Evaluation / feature-extraction input (spec §6.1): nearest resize to ``image_resolution²``, then ``[-1, 1]``.

    Args:
        image_resolution: output side (spec: 256); the aspect ratio is not kept. None keeps the input size.

    Call with a path, a PIL image or a ``uint8`` tensor ``[3, H, W]``; returns float32
    ``[3, image_resolution, image_resolution]``.
    """

    def __init__(self, image_resolution: int | None = 256) -> None:
        _check_size("image_resolution", image_resolution, allow_none=True)
        self.image_resolution = image_resolution

    def __call__(self, image: ImageInput) -> torch.Tensor:
        return to_minus_one_one(F.pil_to_tensor(_resize(as_rgb_pil(image), self.image_resolution)))


class _ImageMapTransform(MapTransform):
    """Applies ``self.transform`` to each key, naming the key (and the file, if the value is a path) on failure."""

    transform: MultiCropAugmentation | EvalTransform

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            try:
                d[key] = self.transform(d[key])
            except (ValueError, TypeError) as err:
                raise (TypeError if isinstance(err, TypeError) else ValueError)(f"key {key!r}: {err}") from err
        return d


class MultiCropd(_ImageMapTransform, RandomizableTrait):
    """Dictionary version of :py:class:`MultiCropAugmentation`: ``d[key]`` becomes the list of ``2 + n_local`` views.

    ``d[key]`` may be a file path (e.g. from :py:func:`common.data.classification_folders.classification_datalist`),
    a PIL image or a ``uint8`` tensor ``[3, H, W]``. With a DataLoader's default collation (torch's, or MONAI's
    ``list_data_collate``) a batch of ``B`` samples gives ``batch[key]`` = a list of ``2 + n_local`` tensors
    ``[B, 3, size, size]``, in view order. The transform is marked random (:py:class:`monai.transforms.
    RandomizableTrait`), so :py:class:`monai.data.CacheDataset` caches up to it and re-draws the views every epoch.

    Args:
        keys: keys of the images to augment.
        allow_missing_keys: skip absent keys instead of raising KeyError.
        kwargs: the arguments of :py:class:`MultiCropAugmentation`.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False, **kwargs: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = MultiCropAugmentation(**kwargs)


class EvalTransformd(_ImageMapTransform):
    """Dictionary version of :py:class:`EvalTransform`: ``d[key]`` becomes float32 ``[3, R, R]`` in ``[-1, 1]``.

    Args:
        keys: keys of the images.
        image_resolution: output side ``R`` (spec: 256).
        allow_missing_keys: skip absent keys instead of raising KeyError.
    """

    def __init__(
        self, keys: KeysCollection, image_resolution: int | None = 256, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EvalTransform(image_resolution)
