"""Chest-radiograph image / box transforms and the ASG collate (specs/asg.md §2.1, §2.4–§2.6).

ASG (Li et al., MICCAI 2024) reads each image as 8-bit grey (``cv2.imread(path, 0)``), resizes its longest side to
256, zero-pads it (centred) to 256 x 256, crops 224 x 224 (random for training, centre for evaluation), replicates
grey to RGB and normalises (ImageNet statistics for pre-training, 0.5 / 0.5 downstream). Anatomical-region boxes
(pascal_voc, original pixels) follow the geometry; boxes that leave the crop are dropped with their sentence
rows; the survivors are scaled to the ViT patch grid and padded to 23 rows, with the ARSA masks of §2.5. The
released collate prepends the in-batch index to every box and then sorts the batch by caption length without
remapping it (§2.6): :func:`asg_collate` writes the index after any re-ordering unless asked to reproduce that.

Pipeline (MONAI dictionary transforms on numpy, one sample)::

    LoadCXRd("image") -> CXRGeometryd("image", random_crop=True) -> NormalizeCXRd("image")
        -> TokenizeReportd("sentences", tokenizer)  (common.transforms.cxr_text) -> RegionTargetsd()
    DataLoader(..., collate_fn=asg_collate)
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from numbers import Number
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["LoadCXRd", "CXRGeometryd", "NormalizeCXRd", "RegionTargetsd", "asg_collate", "load_cxr",
           "IMAGENET_MEAN", "IMAGENET_STD", "MGCA_MEAN", "MGCA_STD"]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
MGCA_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
MGCA_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

_INTERPOLATION = {"linear": cv2.INTER_LINEAR, "area": cv2.INTER_AREA}


def _read_dicom(path: Path) -> np.ndarray:
    """A single-frame grey DICOM as ``uint8 [H, W]``, as MGCA's RSNA preprocessing: MONOCHROME1 inverted
    (``x -> max x - x``), then scaled by ``255 / max`` with saturation and ``|.|`` (``cv2.convertScaleAbs``).

    SimpleITK's GDCM reader already returns MONOCHROME1 pixels inverted over the stored bit range
    (``y = 2^bits - 1 - x``, checked with SimpleITK 2.5.7); ``y - min y = max x - x`` is MGCA's inversion.
    """
    import SimpleITK as sitk

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise ValueError(f"cannot read DICOM file {path}: {str(err).strip().splitlines()[0]}") from err
    array = sitk.GetArrayFromImage(image)
    if image.GetNumberOfComponentsPerPixel() != 1 or array.squeeze().ndim != 2:
        raise ValueError(f"DICOM file {path} holds an image of shape {array.shape} with "
                         f"{image.GetNumberOfComponentsPerPixel()} component(s); expected one grey 2D frame.")
    array = array.squeeze().astype(np.float32)
    key = "0028|0004"
    if image.HasMetaDataKey(key) and image.GetMetaData(key).strip().upper() == "MONOCHROME1":
        array = array - array.min()
    peak = float(array.max())
    return cv2.convertScaleAbs(array, alpha=255.0 / peak if peak > 0 else 0.0)


def load_cxr(path: str | Path) -> np.ndarray:
    """Read a chest radiograph as ``uint8 [H, W]``.

    PNG / JPEG / ... via ``cv2.imread(IMREAD_UNCHANGED)``: 8-bit grey as is, 8-bit BGR to grey with OpenCV's
    luminance (``0.299 R + 0.587 G + 0.114 B``, as ``cv2.imread(path, 0)``); ``.dcm`` via SimpleITK
    (:func:`_read_dicom`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable / corrupt file, 2- or 4-channel image (grey + alpha, RGBA), or not 8-bit (e.g. a
            16-bit PNG); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} does not exist.")
    if path.suffix.lower() == ".dcm":
        return _read_dicom(path)
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"cannot read image file {path}: not a readable image (corrupt or unsupported format).")
    channels = 1 if image.ndim == 2 else image.shape[2]
    if channels not in (1, 3):
        raise ValueError(f"image file {path} has {channels} channels; expected 1 (grey) or 3 (colour) — images of "
                         "the wrong channel count (e.g. with an alpha channel) are not accepted.")
    if image.dtype != np.uint8:
        raise ValueError(f"image file {path} has pixel type {image.dtype}; expected 8-bit (uint8) images.")
    return image if channels == 1 else cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


class LoadCXRd(MapTransform):
    """Load each ``key``'s path with :func:`load_cxr` into ``uint8 [H, W]``; ``<key>_size`` = ``(H, W)`` (original
    size) and ``<key>_path`` = the path (for error messages downstream)."""

    def __init__(self, keys: KeysCollection = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            path = d[key]
            d[key] = load_cxr(path)
            d[f"{key}_size"] = tuple(int(s) for s in d[key].shape)
            d[f"{key}_path"] = str(path)
        return d


def _describe(d: Mapping[Hashable, Any], key: Hashable) -> str:
    parts = [f"record {d['id']!r}"] if "id" in d else []
    if f"{key}_path" in d:
        parts.append(f"image {d[f'{key}_path']}")
    return ", ".join(parts) or "sample"


class CXRGeometryd(MapTransform, Randomizable):
    """Longest side → ``resize``, centred zero padding to ``resize x resize``, ``crop x crop`` crop (spec §2.4).

    With ``s = resize / max(H, W)``, the image is resized to ``(h', w') = (round(H s), round(W s))``
    (``interpolation`` "linear" as albumentations' default, or "area" as MGCA's downstream loader), padded by
    ``top = (resize - h') // 2``, ``left = (resize - w') // 2`` (rest at the bottom / right), then cropped at
    ``(oy, ox)``: uniform in ``[0, resize - crop]`` when ``random_crop`` (the transform's ``R``, seeded with
    ``set_random_state``), else ``(resize - crop) // 2``. All ``keys`` get the same geometry; the mask
    (``mask_key``) too, with nearest interpolation.

    Boxes (``box_key``, ``[n, 4]`` pascal_voc in original pixels) are first validated (``0 <= x1 < x2 <= W``,
    ``0 <= y1 < y2 <= H``), then mapped ``x -> x w'/W + left - ox``, ``y -> y h'/H + top - oy``, clipped to
    ``[0, crop]``; boxes left with zero area are dropped together with their ``index_key`` row (``sent_index``).
    Output boxes are ``float32 [n', 4]``; absent box / index / mask keys are skipped.

    Raises:
        ValueError: (at call) a non-2D image, masks of another size, a box outside the image or with
            ``x1 >= x2`` / ``y1 >= y2``, box and sentence-row counts that differ; the message names the record.
    """

    def __init__(self, keys: KeysCollection = "image", box_key: str | None = "boxes",
                 index_key: str | None = "sent_index", mask_key: str | None = None, resize: int = 256,
                 crop: int = 224, random_crop: bool = True, interpolation: str = "linear",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0 < crop <= resize:
            raise ValueError(f"CXRGeometryd needs 0 < crop <= resize, got crop={crop}, resize={resize}.")
        if interpolation not in _INTERPOLATION:
            raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATION)}, got {interpolation!r}.")
        self.box_key, self.index_key, self.mask_key = box_key, index_key, mask_key
        self.resize, self.crop, self.random_crop = int(resize), int(crop), bool(random_crop)
        self.interpolation = _INTERPOLATION[interpolation]
        self._offset = ((self.resize - self.crop) // 2,) * 2

    def randomize(self, data: Any = None) -> None:
        """Draw the crop offset ``(oy, ox)``."""
        span = self.resize - self.crop
        self._offset = ((int(self.R.randint(0, span + 1)), int(self.R.randint(0, span + 1))) if self.random_crop
                        else (span // 2, span // 2))

    def _apply(self, image: np.ndarray, size: tuple[int, int], pad: tuple[int, int], interpolation: int
               ) -> np.ndarray:
        resized = cv2.resize(image, (size[1], size[0]), interpolation=interpolation)
        (top, left), r, (oy, ox) = pad, self.resize, self._offset
        padded = cv2.copyMakeBorder(resized, top, r - size[0] - top, left, r - size[1] - left, cv2.BORDER_CONSTANT,
                                    value=0)
        return np.ascontiguousarray(padded[oy:oy + self.crop, ox:ox + self.crop])

    def _boxes(self, d: dict, name: str, shape: tuple[int, int], size: tuple[int, int], pad: tuple[int, int]
               ) -> None:
        h, w = shape
        boxes = np.asarray(d[self.box_key], np.float64).reshape(-1, 4) if len(d[self.box_key]) else np.zeros((0, 4))
        x1, y1, x2, y2 = boxes.T
        bad = ~((0 <= x1) & (x1 < x2) & (x2 <= w) & (0 <= y1) & (y1 < y2) & (y2 <= h))
        if bad.any():
            raise ValueError(f"{name}: boxes outside the image of size {h}x{w} (H x W) or with x1 >= x2 / y1 >= y2: "
                             f"{boxes[bad].tolist()} (pascal_voc x1, y1, x2, y2 in original pixels).")
        rows = d.get(self.index_key) if self.index_key else None
        if rows is not None and len(rows) != len(boxes):
            raise ValueError(f"{name}: {len(boxes)} boxes but {len(rows)} {self.index_key} rows.")
        scale = np.array([size[1] / w, size[0] / h] * 2)
        shift = np.array([pad[1] - self._offset[1], pad[0] - self._offset[0]] * 2)
        mapped = np.clip(boxes * scale + shift, 0, self.crop)
        keep = (mapped[:, 2] > mapped[:, 0]) & (mapped[:, 3] > mapped[:, 1])
        d[self.box_key] = mapped[keep].astype(np.float32)
        if rows is not None:
            d[self.index_key] = [list(rows[i]) for i in np.flatnonzero(keep)]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        name = _describe(d, keys[0])
        shape = np.asarray(d[keys[0]]).shape
        if len(shape) != 2:
            raise ValueError(f"{name}: CXRGeometryd expects a grey image [H, W], got shape {shape}.")
        scale = self.resize / max(shape)
        size = (max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale)))
        pad = ((self.resize - size[0]) // 2, (self.resize - size[1]) // 2)
        for key in keys:
            if np.asarray(d[key]).shape != shape:
                raise ValueError(f"{name}: {key} has shape {np.asarray(d[key]).shape}, expected {shape}.")
            d[key] = self._apply(np.asarray(d[key]), size, pad, self.interpolation)
        if self.mask_key is not None and self.mask_key in d:
            mask = np.asarray(d[self.mask_key])
            if mask.shape != shape:
                raise ValueError(f"{name}: mask {self.mask_key} has shape {mask.shape}, image {shape}.")
            d[self.mask_key] = self._apply(mask, size, pad, cv2.INTER_NEAREST)
        if self.box_key is not None and self.box_key in d:
            self._boxes(d, name, shape, size, pad)
        return d


class NormalizeCXRd(MapTransform):
    """Grey ``uint8 [H, W]`` → ``float32 [3, H, W]`` tensor ``(x / 255 - mean_c) / std_c`` (grey replicated to the
    3 channels; a ``[3, H, W]`` input is normalised per channel)."""

    def __init__(self, keys: KeysCollection = "image", mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"NormalizeCXRd needs 3 means and 3 positive stds, got {mean}, {std}.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            x = torch.as_tensor(np.asarray(d[key]), dtype=torch.float32) / 255.0
            if x.ndim == 2:
                x = x.unsqueeze(0).expand(3, -1, -1)
            if x.ndim != 3 or x.shape[0] != 3:
                raise ValueError(f"{_describe(d, key)}: NormalizeCXRd expects [H, W] or [3, H, W], got "
                                 f"{tuple(x.shape)}.")
            d[key] = ((x - self.mean) / self.std).contiguous()
        return d


class RegionTargetsd(MapTransform):
    """Boxes (crop pixels) and sentence rows → the ARSA inputs of spec §2.5.

    With ``n`` boxes (``n <= num_region``, else ValueError), ``R = num_region``, ``S = max_sent_words``:

    * ``rois`` float32 ``[R, 4]`` = ``box * grid / crop`` for rows ``< n``, ``-1`` below (``box_key`` is removed);
    * ``sent_index`` (``index_key``) int64 ``[R, S]``: row ``r < n`` holds its word positions (ascending, those
      ``>= S`` dropped), ``-1`` padding;
    * ``count_matrix`` float32 ``[R, R]``: 0 on ``[0:m, 0:m]`` and ``[m:, m:]``, ``-inf`` elsewhere, with
      ``m = max(n, 1)`` (so that no row is all ``-inf`` when ``n = 0``);
    * ``count_label`` int64 ``[R]``: ``r`` for ``r < n``, ``-100`` (ignored by cross-entropy) otherwise.
    """

    def __init__(self, box_key: str = "boxes", index_key: str = "sent_index", num_region: int = 23, grid: int = 14,
                 crop: int = 224, max_sent_words: int = 110) -> None:
        super().__init__([box_key])
        self.box_key, self.index_key = box_key, index_key
        self.num_region, self.grid, self.crop, self.max_sent_words = num_region, grid, crop, max_sent_words

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        name = _describe(d, "image")
        raw = d.pop(self.box_key)
        boxes = np.asarray(raw, np.float32).reshape(-1, 4) if len(raw) else np.zeros((0, 4), np.float32)
        rows = d.get(self.index_key, [])
        n, r_max, s_max = len(boxes), self.num_region, self.max_sent_words
        if n > r_max:
            raise ValueError(f"{name}: {n} region boxes, more than num_region={r_max}.")
        if len(rows) != n:
            raise ValueError(f"{name}: {n} boxes but {len(rows)} {self.index_key} rows.")
        rois = np.full((r_max, 4), -1.0, np.float32)
        rois[:n] = boxes * (self.grid / self.crop)
        sent_index = np.full((r_max, s_max), -1, np.int64)
        for r, row in enumerate(rows):
            positions = np.unique(np.asarray(row, np.int64))
            if positions.size and positions[0] < 0:
                raise ValueError(f"{name}: negative word position in {self.index_key} row {r}: {list(row)}.")
            positions = positions[positions < s_max]
            sent_index[r, :positions.size] = positions
        m = max(n, 1)
        count_matrix = np.full((r_max, r_max), -np.inf, np.float32)
        count_matrix[:m, :m] = 0.0
        count_matrix[m:, m:] = 0.0
        arange = np.arange(r_max)
        d["rois"] = torch.from_numpy(rois)
        d[self.index_key] = torch.from_numpy(sent_index)
        d["count_matrix"] = torch.from_numpy(count_matrix)
        d["count_label"] = torch.from_numpy(np.where(arange < n, arange, -100).astype(np.int64))
        return d


def _stack(values: list[Any]) -> Any:
    """Tensors / arrays / numbers stacked on a new dim 0; anything else (strings, ragged lists) as a list."""
    if all(isinstance(v, torch.Tensor) for v in values):
        return torch.stack(values)
    if all(isinstance(v, np.ndarray) for v in values):
        return torch.as_tensor(np.stack(values))
    if all(isinstance(v, Number) and not isinstance(v, bool) for v in values):
        return torch.as_tensor(values)
    return list(values)


def asg_collate(batch: list[dict], sort_by_caption_len: bool = False) -> dict:
    """Collate ASG training items (spec §2.6).

    Every key is stacked on dim 0 (tensors, arrays, numbers; other values become lists). ``rois [R, 4]`` become
    ``[B, R, 5]`` with column 0 the batch index of the row's own image, written after any re-ordering, so that
    ``torchvision.ops.roi_align`` pools each box from its own image.

    ``sort_by_caption_len=True`` reproduces the released code (flag ``asg.compat.sort_by_caption_len``): the batch
    index is written in the original order, then the whole batch is re-ordered by descending ``cap_len`` (stable)
    without remapping it, so after a non-identity permutation row ``j`` points at image ``perm[j]`` — a bug.

    Raises:
        ValueError: an empty batch, or ``sort_by_caption_len`` without ``cap_len``.
    """
    if not batch:
        raise ValueError("asg_collate got an empty batch.")
    out = {key: _stack([item[key] for item in batch]) for key in batch[0]}
    index = torch.arange(len(batch), dtype=torch.float32)
    if "rois" in out:
        rois = out["rois"].float()
        out["rois"] = torch.cat([index.view(-1, 1, 1).expand(-1, rois.shape[1], 1), rois], dim=2)
    if sort_by_caption_len:
        if "cap_len" not in out:
            raise ValueError("asg_collate(sort_by_caption_len=True) needs 'cap_len' in every item.")
        order = torch.argsort(torch.as_tensor(out["cap_len"]), descending=True, stable=True)
        out = {key: value[order] if isinstance(value, torch.Tensor) else [value[i] for i in order.tolist()]
               for key, value in out.items()}
    return out
