"""Training views of the EndoKED-WSSS (ToCo) class-activation network.

ToCo (Ru et al., "Token Contrast for Weakly-Supervised Semantic Segmentation", CVPR 2023) trains on a main crop
plus DINO-style global and local views (Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
ICCV 2021, multi-crop augmentation); EndoKED's released loader (specs/endoked.md §3.1) builds them from an RGB image
``x`` (values 0..255, ``[3, H, W]``) as follows, all images in [0, 1] until the final ImageNet normalisation
``n(v) = (v - mean) / std``, mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225):

* ``image`` = ``n(raw)`` with ``raw`` = Resize(568 x 568, bilinear) -> RandomCrop(448) -> RandomVerticalFlip(0.5);
  ``image_raw`` = ``raw`` itself (the de-normalised crop PAR needs, spec §7 row 8, intended behaviour);
* ``global_view`` = ``n(Solarize_{0.2}(Blur_{0.1}(J(RandomResizedCrop(448, scale 0.4-1, bicubic)(x)))))``,
  cut from the image at its native size;
* ``local_image`` = ``n(Blur_{0.5}(J(raw)))``, from which the trainer later cuts the local 112 x 112 crops;

where ``J`` = HFlip(0.5) -> ColorJitter(brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1, in random order)
applied with p 0.8 -> Grayscale(0.2), ``Blur_p`` = Gaussian blur with sigma ~ U(0.1, 2) applied with p, and
``Solarize_p`` inverts values >= 128/255 with p. Each view draws its own ``J``.

Faithful mode (``faithful_local_view=True``, spec §7 row 7): the released code feeds ``J`` with the *normalised*
main crop cast to uint8, which numpy does by truncation toward zero and wrapping modulo 256 on x86-64 (e.g.
-2.1 -> 254); this is emulated as ``(trunc(n(raw)) mod 256) / 255``.

Implementation notes: the operations are :py:mod:`torchvision.transforms.v2.functional` ops on float tensors
(the reference uses PIL, so pixels are not re-quantised to uint8 between steps); the blur kernel spans
``2 * ceil(3 sigma) + 1`` pixels (PIL's radius is the sigma), limited to the image size. Every random number comes
from the transform's ``numpy.random.RandomState`` ``R`` (MONAI's :py:class:`~monai.transforms.Randomizable`), so
``set_random_state(seed)`` makes the views reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable
from monai.utils import ImageMetaKey, convert_to_tensor
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

__all__ = ["ToCoViewsd"]



@dataclass
class _Photometric:
    """Drawn parameters of ``J`` -> blur -> solarise for one view."""

    hflip: bool
    jitter: bool
    jitter_order: Sequence[int]
    jitter_factors: Sequence[float]  # brightness, contrast, saturation, hue
    grayscale: bool
    blur: bool
    sigma: float
    solarize: bool


def _check_prob(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"ToCoViewsd: {name} must be a probability in [0, 1], got {p!r}")
    return float(p)


class ToCoViewsd(MapTransform, Randomizable):
    """EndoKED-WSSS training views of one RGB image (module docstring; specs/endoked.md §3.1).

    Args:
        keys: the key of the image, float ``[3, H, W]`` with values in [0, 255] in ``(C, H, W)`` order (e.g.
            ``LoadPolypImaged(reverse_indexing=False)`` -> ``EnsureChannelFirstd``), or uint8. Exactly one key.
        crop_size: side of the main crop and of the global view (448).
        resize: side the image is resized to before the main crop (568).
        global_scale: area range of the global view's RandomResizedCrop (0.4, 1.0); aspect ratio in (3/4, 4/3).
        vflip_prob: vertical flip of the main crop (0.5).
        hflip_prob: horizontal flip in ``J`` (0.5).
        jitter_prob: colour jitter in ``J`` (0.8).
        jitter: brightness, contrast, saturation and hue strengths (0.4, 0.4, 0.2, 0.1).
        grayscale_prob: grey conversion in ``J`` (0.2).
        global_blur_prob: blur of the global view (0.1).
        local_blur_prob: blur of the local image (0.5).
        blur_sigma: range of the blur's sigma (0.1, 2.0).
        solarize_prob: solarisation of the global view (0.2).
        mean: normalisation mean (ImageNet).
        std: normalisation standard deviation (ImageNet).
        faithful_local_view: build the local image from the uint8 cast of the normalised crop, as released.
        raw_key: output key of the un-normalised main crop.
        global_key: output key of the global view.
        local_key: output key of the local image.
        allow_missing_keys: do nothing when the key is absent.

    Returns a copy of the data with ``d[key]`` = the normalised main crop and ``d[raw_key]``, ``d[global_key]``,
    ``d[local_key]`` added, each float32 ``[3, crop_size, crop_size]`` (plain tensors: the crops no longer match
    the input's affine).

    Raises:
        ValueError: invalid arguments, or an image that is not ``[3, H, W]`` with values in [0, 255] (the message
            names the key and the file).
    """

    def __init__(
        self,
        keys: KeysCollection = "image",
        crop_size: int = 448,
        resize: int = 568,
        global_scale: Sequence[float] = (0.4, 1.0),
        vflip_prob: float = 0.5,
        hflip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        jitter: Sequence[float] = (0.4, 0.4, 0.2, 0.1),
        grayscale_prob: float = 0.2,
        global_blur_prob: float = 0.1,
        local_blur_prob: float = 0.5,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        faithful_local_view: bool = False,
        raw_key: str = "image_raw",
        global_key: str = "global_view",
        local_key: str = "local_image",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"ToCoViewsd: takes exactly one image key, got {list(self.keys)}")
        if not 0 < crop_size <= resize:
            raise ValueError(f"ToCoViewsd: need 0 < crop_size <= resize, got crop_size={crop_size}, resize={resize}")
        if len(global_scale) != 2 or not 0 < global_scale[0] <= global_scale[1] <= 1:
            raise ValueError(f"ToCoViewsd: global_scale must be (low, high) in (0, 1], got {tuple(global_scale)}")
        if len(jitter) != 4 or any(j < 0 for j in jitter) or jitter[3] > 0.5:
            raise ValueError(f"ToCoViewsd: jitter must be 4 strengths >= 0 (hue <= 0.5), got {tuple(jitter)}")
        if len(blur_sigma) != 2 or not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"ToCoViewsd: blur_sigma must be (low, high) with 0 < low <= high, got {blur_sigma}")
        if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
            raise ValueError(f"ToCoViewsd: mean and std need 3 values (std > 0), got {tuple(mean)}, {tuple(std)}")
        self.crop_size, self.resize = int(crop_size), int(resize)
        self.global_scale = (float(global_scale[0]), float(global_scale[1]))
        self.vflip_prob = _check_prob("vflip_prob", vflip_prob)
        self.hflip_prob = _check_prob("hflip_prob", hflip_prob)
        self.jitter_prob = _check_prob("jitter_prob", jitter_prob)
        self.grayscale_prob = _check_prob("grayscale_prob", grayscale_prob)
        self.global_blur_prob = _check_prob("global_blur_prob", global_blur_prob)
        self.local_blur_prob = _check_prob("local_blur_prob", local_blur_prob)
        self.solarize_prob = _check_prob("solarize_prob", solarize_prob)
        self.jitter = tuple(float(j) for j in jitter)
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
        self.faithful_local_view = faithful_local_view
        self.raw_key, self.global_key, self.local_key = raw_key, global_key, local_key
        self._crop: tuple[int, int] = (0, 0)
        self._vflip = False
        self._global_box: tuple[int, int, int, int] = (0, 0, 1, 1)
        self._global: _Photometric | None = None
        self._local: _Photometric | None = None

    # ---- random parameters -------------------------------------------------------------------------------------
    def _draw_photometric(self, blur_prob: float, solarize_prob: float) -> _Photometric:
        b, c, s, h = self.jitter
        return _Photometric(
            hflip=self.R.rand() < self.hflip_prob,
            jitter=self.R.rand() < self.jitter_prob,
            jitter_order=self.R.permutation(4).tolist(),
            jitter_factors=(
                self.R.uniform(max(0.0, 1 - b), 1 + b),
                self.R.uniform(max(0.0, 1 - c), 1 + c),
                self.R.uniform(max(0.0, 1 - s), 1 + s),
                self.R.uniform(-h, h),
            ),
            grayscale=self.R.rand() < self.grayscale_prob,
            blur=self.R.rand() < blur_prob,
            sigma=self.R.uniform(*self.blur_sigma),
            solarize=self.R.rand() < solarize_prob,
        )

    def _draw_resized_crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """``(top, left, h, w)`` of a RandomResizedCrop (torchvision's sampling rule: 10 tries of a random area
        fraction in ``global_scale`` and log-uniform aspect ratio in (3/4, 4/3), else the central crop)."""
        area, log_ratio = height * width, (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * self.R.uniform(*self.global_scale)
            aspect = math.exp(self.R.uniform(*log_ratio))
            w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return int(self.R.randint(0, height - h + 1)), int(self.R.randint(0, width - w + 1)), h, w
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif ratio > 4 / 3:
            w, h = int(round(height * (4 / 3))), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def randomize(self, data: tuple[int, int]) -> None:
        """Draw all parameters for an image of spatial size ``data = (H, W)``."""
        top_max = self.resize - self.crop_size
        self._crop = (int(self.R.randint(0, top_max + 1)), int(self.R.randint(0, top_max + 1)))
        self._vflip = self.R.rand() < self.vflip_prob
        self._global_box = self._draw_resized_crop_box(*data)
        self._global = self._draw_photometric(self.global_blur_prob, self.solarize_prob)
        self._local = self._draw_photometric(self.local_blur_prob, 0.0)

    # ---- deterministic parts -----------------------------------------------------------------------------------
    @staticmethod
    def _photometric(img: torch.Tensor, p: _Photometric) -> torch.Tensor:
        """``J`` -> blur -> solarise of a ``[3, H, W]`` image in [0, 1]."""
        if p.hflip:
            img = TF.hflip(img)
        if p.jitter:
            ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
            for i in p.jitter_order:
                img = ops[i](img, p.jitter_factors[i])
        if p.grayscale:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if p.blur:
            radius = min(math.ceil(3 * p.sigma), (min(img.shape[-2:]) - 1) // 2)
            img = TF.gaussian_blur(img, kernel_size=[2 * radius + 1] * 2, sigma=[p.sigma] * 2)
        if p.solarize:
            img = TF.solarize(img, threshold=128 / 255)
        return img

    def _normalize(self, img: torch.Tensor) -> torch.Tensor:
        return (img - self.mean) / self.std

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key].meta.get(ImageMetaKey.FILENAME_OR_OBJ, "?") if isinstance(d[key], MetaTensor) else "?"
            img = convert_to_tensor(d[key], dtype=torch.float32, track_meta=False)
            if img.ndim != 3 or img.shape[0] != 3:
                raise ValueError(
                    f"ToCoViewsd: key {key!r} (file {source}) must be an RGB image [3, H, W], got {tuple(img.shape)}"
                )
            if img.numel() and (img.min() < 0 or img.max() > 255):
                raise ValueError(
                    f"ToCoViewsd: key {key!r} (file {source}) must hold values in [0, 255], got "
                    f"[{img.min().item():.3g}, {img.max().item():.3g}]"
                )
            img = img / 255.0
            self.randomize(tuple(img.shape[1:]))

            size = [self.resize, self.resize]
            resized = TF.resize(img, size, interpolation=InterpolationMode.BILINEAR, antialias=True).clamp(0, 1)
            top, left = self._crop
            raw = TF.crop(resized, top, left, self.crop_size, self.crop_size)
            if self._vflip:
                raw = TF.vflip(raw)
            main = self._normalize(raw)

            i, j, h, w = self._global_box
            crop = TF.resized_crop(
                img, i, j, h, w, [self.crop_size, self.crop_size],
                interpolation=InterpolationMode.BICUBIC, antialias=True,
            ).clamp(0, 1)
            global_view = self._normalize(self._photometric(crop, self._global))

            local_source = raw
            if self.faithful_local_view:
                local_source = torch.trunc(main).to(torch.int64).remainder(256).float() / 255.0
            local_image = self._normalize(self._photometric(local_source, self._local))

            d[key], d[self.raw_key], d[self.global_key], d[self.local_key] = main, raw, global_view, local_image
        return d

