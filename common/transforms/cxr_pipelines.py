"""The transform pipelines of ASG's pre-training and downstream evaluations (specs/asg.md §2.4, §6.2-§6.4).

* :func:`pretraining_transforms` — ``LoadCXRd -> CXRGeometryd (256, crop 224, random for training) -> NormalizeCXRd
  (ImageNet) -> RegionTargetsd -> TokenizeReportd -> labels as float32``, then only the batch keys are kept
  (strings and ragged lists cannot be collated).
* :func:`classification_transforms` — MGCA's loader: longest side 256 (``INTER_AREA``), centred zero padding, a
  random (train) or centre 224 crop, normalisation 0.5 / 0.5 (§6.2; the CheXpert colour augmentation of MGCA's
  ``Moco2Transform`` is not applied).
* :func:`segmentation_transforms` — the image and its mask (:class:`CXRMaskd`) through the same geometry to 224
  without a crop, the training augmentation of §6.4 (shift 0, scale +-10 %, rotation +-10 degrees, p 0.5) and
  normalisation 0.5 / 0.5; the mask becomes ``float32 [1, H, W]`` in {0, 1}.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import EnsureTyped, Lambdad, MapTransform, RandAffined, SelectItemsd, Transform
from transformers import PreTrainedTokenizerBase

from common.data.cxr_datasets import boxes_to_mask, rle_decode
from common.transforms.cxr import (IMAGENET_MEAN, IMAGENET_STD, MGCA_MEAN, MGCA_STD, CXRGeometryd, LoadCXRd,
                                   NormalizeCXRd, RegionTargetsd, load_cxr)
from common.transforms.cxr_text import TokenizeReportd

__all__ = ["CXRMaskd", "classification_transforms", "pretraining_transforms", "segmentation_transforms"]


class CXRMaskd(MapTransform):
    """The binary mask of a segmentation entry as ``uint8 [H, W]`` in {0, 255}, written under ``mask_key``.

    Its source is the first present of: ``mask`` (a mask file, any value > 0 is foreground), ``rle`` (SIIM
    run-length strings, united; :func:`common.data.cxr_datasets.rle_decode`) or ``mask_boxes`` (RSNA rectangles,
    united; :func:`common.data.cxr_datasets.boxes_to_mask`). The mask takes the size of the loaded image
    (``image_key``); a mask file of another size is an error.
    """

    def __init__(self, image_key: str = "image", mask_key: str = "label") -> None:
        super().__init__([image_key])
        self.image_key, self.mask_key = image_key, mask_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = np.asarray(d[self.image_key])
        height, width = image.shape[:2]
        name = d.get("id", d.get(f"{self.image_key}_path", "<entry>"))
        if "mask" in d:
            mask = load_cxr(d["mask"]) > 0
            if mask.shape != (height, width):
                raise ValueError(f"mask {d['mask']} is {mask.shape[1]}x{mask.shape[0]} but its image {name} is "
                                 f"{width}x{height}")
        elif "rle" in d:
            mask = np.zeros((height, width), bool)
            for rle in d["rle"]:
                mask |= rle_decode(rle, height, width) > 0
        elif "mask_boxes" in d:
            mask = boxes_to_mask(d["mask_boxes"], height, width) > 0
        else:
            raise ValueError(f"segmentation entry {name} has no mask source ('mask', 'rle' or 'mask_boxes'); keys: "
                             f"{sorted(map(str, d))}")
        d[self.mask_key] = mask.astype(np.uint8) * 255
        return d


def _float_labels(key: str) -> EnsureTyped:
    return EnsureTyped(key, dtype=torch.float32, track_meta=False)


def pretraining_transforms(tokenizer: PreTrainedTokenizerBase | str | Path, random_crop: bool, resize: int = 256,
                           crop: int = 224, grid: int = 14, num_region: int = 23, max_sent_words: int = 110,
                           max_words: int = 112, keys: Sequence[str] | None = None,
                           mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
                           ) -> list[Transform]:
    """Record (``image``, ``sentences``, ``labels``, ``boxes``, ``sent_index``) -> one pre-training item (§2.4-§2.5).

    Args:
        tokenizer: the text encoder's tokenizer (or its folder).
        random_crop: random 224 crop (training) or centre crop (validation).
        resize, crop: longest side after resizing, and the crop size (256, 224).
        grid: patch grid of the image encoder (14 for ViT-B/16 at 224).
        num_region, max_sent_words, max_words: R = 23 region rows, S = 110 word positions, L = 112 tokens.
        keys: the keys kept (default: everything).
        mean, std: normalisation (ImageNet in pre-training, §8.8).
    """
    transforms: list[Transform] = [
        LoadCXRd("image"),
        CXRGeometryd("image", box_key="boxes", index_key="sent_index", resize=resize, crop=crop,
                     random_crop=random_crop),
        NormalizeCXRd("image", mean=mean, std=std),
        RegionTargetsd(num_region=num_region, grid=grid, crop=crop, max_sent_words=max_sent_words),
        TokenizeReportd("sentences", tokenizer, max_length=max_words),
        _float_labels("labels"),
    ]
    if keys is not None:
        transforms.append(SelectItemsd(keys=list(keys)))
    return transforms


def classification_transforms(train: bool, resize: int = 256, crop: int = 224, mean: Sequence[float] = MGCA_MEAN,
                              std: Sequence[float] = MGCA_STD, label_key: str | None = "label",
                              multi_label: bool = True) -> list[Transform]:
    """Entry ``{"image", "label"}`` -> ``image float32 [3, crop, crop]``, ``label`` float32 multi-hot (multi-label)
    or an int64 class index (§6.2)."""
    transforms: list[Transform] = [
        LoadCXRd("image"),
        CXRGeometryd("image", box_key=None, index_key=None, resize=resize, crop=crop, random_crop=train,
                     interpolation="area"),
        NormalizeCXRd("image", mean=mean, std=std),
    ]
    if label_key is not None:
        dtype = torch.float32 if multi_label else torch.int64
        transforms.append(EnsureTyped(label_key, dtype=dtype, track_meta=False))
    return transforms


def segmentation_transforms(train: bool, size: int = 224, mean: Sequence[float] = MGCA_MEAN,
                            std: Sequence[float] = MGCA_STD, augment_prob: float = 0.5) -> list[Transform]:
    """Entry (``image`` + a mask source) -> ``image float32 [3, size, size]``, ``label float32 [1, size, size]``
    (§6.4: longest side to ``size``, centred padding, ShiftScaleRotate-like ``RandAffined`` when training)."""
    transforms: list[Transform] = [
        LoadCXRd("image"),
        CXRMaskd("image", "label"),
        CXRGeometryd("image", box_key=None, index_key=None, mask_key="label", resize=size, crop=size,
                     random_crop=False, interpolation="area"),
        NormalizeCXRd("image", mean=mean, std=std),
        Lambdad("label", lambda m: torch.as_tensor(np.asarray(m) > 0, dtype=torch.float32)[None]),
    ]
    if train:
        transforms.append(RandAffined(["image", "label"], prob=augment_prob, rotate_range=math.radians(10),
                                      scale_range=0.1, mode=("bilinear", "nearest"), padding_mode="zeros"))
    return transforms
