"""Deterministic DHC preprocessing as a MONAI ``Compose``: load, (D, H, W) order, resize, intensity window.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (spec ``dhc.md`` §1.3, §11.3). The paper-time pipeline of the original code:

1. read image and label as arrays in **(D, H, W) = (z, y, x)** order (SimpleITK's order);
2. resize the whole volume to ``R = (80, 160, 160)`` with ``torch.nn.functional.interpolate``: image trilinear,
   label nearest, ``align_corners=False``, no anti-aliasing, spacing ignored (no ``Spacingd``, no reorientation);
3. at load time, per whole volume: ``x <- clip(x, a_min, a_max)``, then ``x <- (x - min x) / (max x - min x)``
   with the min and max of the clipped volume (``a_min, a_max = -75, 275`` HU).

For CT whose clipped volume spans the window, step 3 equals a fixed window ``[a_min, a_max] -> [0, 1]``; for MR
(AMOS ids >= 500, treated with the CT window by DHC, spec §1.2) it does not, which is why it is written as a clip
followed by a per-volume min-max rather than one ``ScaleIntensityRanged``.

The chain, all MONAI transforms (nothing here needed a new one)::

    LoadImaged(reader=NumpyReader | NibabelReader) -> EnsureChannelFirstd -> [Transposed (0, 3, 2, 1), NIfTI only]
    -> Resized(R, ("trilinear", "nearest"), align_corners=(False, None))          [skipped for spatial_size=None]
    -> ScaleIntensityRanged(a_min, a_max, b_min=a_min, b_max=a_max, clip=True)    (clip only)
    -> ScaleIntensityd(minv=0, maxv=1)                                             (per-volume min-max)
    -> CastToTyped(label -> label_dtype)

Shapes: an npy volume ``(D, H, W)`` (the DHC ``npy/`` layout) loads as ``(1, D, H, W)``; a NIfTI volume, which
nibabel reads in voxel-index order ``(i, j, k) = (x, y, z)``, is transposed to ``(1, k, j, i)``, i.e. exactly
SimpleITK's ``GetArrayFromImage`` order used by DHC. The output is ``(1, *spatial_size)`` float32 for the image and
``(1, *spatial_size)`` ``label_dtype`` for the label. ``LoadImaged`` with ``NumpyReader`` is the npy loader
(no ``LoadDHCNpyd`` is needed): a 3D npy array has no channel axis and ``EnsureChannelFirstd`` adds one.

Differences from the original code: resizing an already resized volume is the identity (``F.interpolate`` with
scale 1 and ``align_corners=False`` samples the input grid exactly), so npy files written by
``scripts/prepare_dhc.py`` (resized and normalised) or by DHC (resized only) both come out the same; a constant
volume becomes all zeros (MONAI) rather than NaN (DHC divides by zero). The window also leaves data already in
``[0, 1]`` unchanged whenever ``a_min <= 0`` and ``a_max >= 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    LoadImaged,
    Resized,
    ScaleIntensityd,
    ScaleIntensityRanged,
    Transposed,
)

__all__ = ["DHC_SPATIAL_SIZE", "DHC_WINDOW", "SOURCES", "dhc_preprocessing"]

DHC_SPATIAL_SIZE: tuple[int, int, int] = (80, 160, 160)
"""Paper-time resize target ``(D, H, W)``: the patch (64, 128, 128) plus a quarter (spec §1.3)."""

DHC_WINDOW: tuple[float, float] = (-75.0, 275.0)
"""CT intensity window in HU (spec §1.3)."""

SOURCES: dict[str, str] = {"npy": "NumpyReader", "nifti": "NibabelReader"}
"""File kinds accepted by :py:func:`dhc_preprocessing` and the MONAI reader used for each."""


def dhc_preprocessing(
    image_key: str = "image",
    label_key: str | None = "label",
    source: str = "npy",
    a_min: float = DHC_WINDOW[0],
    a_max: float = DHC_WINDOW[1],
    spatial_size: Sequence[int] | None = DHC_SPATIAL_SIZE,
    normalise: bool = True,
    label_dtype: torch.dtype | np.dtype | type = torch.int64,
    allow_missing_keys: bool = False,
) -> Compose:
    """The deterministic part of DHC's data pipeline (module docstring) as a ``Compose`` of MONAI transforms.

    Args:
        image_key: key of the image path.
        label_key: key of the label path; None for images without labels (inference).
        source: ``"npy"`` (DHC ``npy/`` layout, already ``(D, H, W)``) or ``"nifti"`` (``.nii``/``.nii.gz``,
            transposed to ``(D, H, W)``).
        a_min, a_max: intensity window; default -75..275 HU. The BTCV data in ``shared/data/btcv_ct`` is already
            8-bit (0..255), so its window is a config value (e.g. 0..255).
        spatial_size: resize target ``(D, H, W)``, default (80, 160, 160) (paper-time pipeline); None keeps the
            native grid (DHC HEAD's Synapse variant, spec §0).
        normalise: apply the clip + per-volume min-max; False gives resized raw intensities, as DHC's offline
            ``preprocess.py`` stores them.
        label_dtype: dtype of the output label (int64, as DHC's ``ToTensor``).
        allow_missing_keys: let the label key be absent from a sample.

    Returns:
        a ``Compose`` mapping ``{image_key: path, label_key: path, ...}`` to ``(1, D, H, W)`` MetaTensors; other
        keys (e.g. ``"case"``) pass through.

    Raises:
        ValueError: an unknown ``source``, ``a_min >= a_max``, or a ``spatial_size`` that is not 3 positive ints.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {list(SOURCES)}, got {source!r}.")
    if not a_min < a_max:
        raise ValueError(f"the intensity window needs a_min < a_max, got a_min={a_min}, a_max={a_max}.")
    if spatial_size is not None and (len(spatial_size) != 3 or any(int(s) < 1 for s in spatial_size)):
        raise ValueError(f"spatial_size must be three positive ints (D, H, W) or None, got {spatial_size}.")
    keys = [image_key] if label_key is None else [image_key, label_key]
    transforms: list = [
        LoadImaged(keys, reader=SOURCES[source], image_only=True, allow_missing_keys=allow_missing_keys),
        EnsureChannelFirstd(keys, allow_missing_keys=allow_missing_keys),
    ]
    if source == "nifti":  # (1, x, y, z) -> (1, z, y, x), SimpleITK's array order
        transforms.append(Transposed(keys, indices=(0, 3, 2, 1), allow_missing_keys=allow_missing_keys))
    if spatial_size is not None:
        transforms.append(
            Resized(
                keys,
                spatial_size=tuple(int(s) for s in spatial_size),
                mode=("trilinear", "nearest")[: len(keys)],
                align_corners=(False, None)[: len(keys)],
                anti_aliasing=False,
                allow_missing_keys=allow_missing_keys,
            )
        )
    if normalise:
        transforms += [
            ScaleIntensityRanged(image_key, a_min=a_min, a_max=a_max, b_min=a_min, b_max=a_max, clip=True),
            ScaleIntensityd(image_key, minv=0.0, maxv=1.0),
        ]
    if label_key is not None:
        transforms.append(CastToTyped(label_key, dtype=label_dtype, allow_missing_keys=allow_missing_keys))
    return Compose(transforms)
