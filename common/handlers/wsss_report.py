"""Per-frame quality of an EndoKED-WSSS network on masked validation frames: decoder Dice and CAM Dice.

EndoKED-WSSS (Wang et al., arXiv 2310.11173; specs/endoked.md §3.4, §3.6) has two outputs worth scoring against
ground truth: the ASPP decoder's segmentation (``argmax`` of ``seg``) and the class activation map that the
pseudo-mask stage thresholds (``CAM > 0.65``). For a frame with ground truth ``G`` (``gt / max(gt) >= 0.5``) at
native size ``H x W``::

    P_dec = resize_nearest(argmax_c pred, (H, W))        pred: [K, h, w] decoder logits or one-hot classes
    P_cam = cam_predictor(network)(image) > t             multi-scale flipped CAM at native size, t = 0.65
    Dice(P, G) = (2 |P ∩ G| + 1) / (|P| + |G| + 1)        protocol (b) of §5.1 (an empty P on an empty G is 1)

:class:`WSSSEvaluationReport` computes both per frame during an evaluator run, writes them to a CSV and logs the
means over all frames and over the frames that show a polyp (``|G| > 0``; on polyp-free frames the CAM, normalised
per image, always has pixels above ``t``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.utils import ImageMetaKey
from PIL import Image
from torch import nn

from common.engines.toco_trainer import PSEUDO_LABEL_CAM_SCALES, cam_predictor
from common.metrics.polyp import normalise_ground_truth, smoothed_dice
from common.utils.files import write_csv

__all__ = ["WSSSEvaluationReport", "decoder_mask", "WSSS_METRIC_COLUMNS", "cam_dice_inputs", "decoder_dice_inputs"]

logger = logging.getLogger(__name__)

WSSS_METRIC_COLUMNS: tuple[str, ...] = ("image", "mask", "polyp", "decoder_dice", "cam_dice")
"""Columns of the per-frame CSV."""


def decoder_mask(pred: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Foreground of the decoder's class map at ``size``: ``resize_nearest(argmax_c pred, size) > 0``.

    Args:
        pred: ``[K, h, w]`` decoder logits or one-hot classes (``K >= 2``, class 0 background).
        size: ``(H, W)`` of the ground truth.

    Returns:
        ``(H, W)`` bool mask.
    """
    pred = torch.as_tensor(pred).detach().cpu().float()
    if pred.ndim != 3 or pred.shape[0] < 2:
        raise ValueError(f"decoder_mask: pred must be [K, h, w] with K >= 2 classes, got shape {tuple(pred.shape)}")
    classes = pred.argmax(0)[None, None].float()
    return F.interpolate(classes, size=tuple(size), mode="nearest")[0, 0].numpy() > 0


def _read(path: str, mode: str, role: str) -> np.ndarray:
    if not Path(path).is_file():
        raise FileNotFoundError(f"WSSSEvaluationReport: {role} file {path} does not exist")
    with Image.open(path) as img:
        return np.array(img.convert(mode))


def _source(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    source = getattr(value, "meta", {}).get(ImageMetaKey.FILENAME_OR_OBJ)
    if not isinstance(source, str):
        raise ValueError(f"WSSSEvaluationReport: batch[{key!r}] carries no file name (load it with LoadPolypImaged, "
                         "which keeps filename_or_obj in the MetaTensor)")
    return source


class WSSSEvaluationReport:
    """Score every frame of an evaluator run: decoder Dice and CAM Dice against the ground truth (module docstring).

    The evaluator must decollate its output (MONAI's default); each item needs ``pred`` (decoder logits or one-hot
    classes ``[K, h, w]``) in the output and ``image`` / ``label`` MetaTensors whose ``filename_or_obj`` name the
    frame and its mask in the batch. The frame and the mask are read again from those files at native size. At the
    end of the run ``output_dir/filename`` holds one row per frame (:data:`WSSS_METRIC_COLUMNS`), the means are
    logged and stored in ``engine.state.metrics`` as ``decoder_dice``, ``cam_dice``, ``polyp_decoder_dice`` and
    ``polyp_cam_dice`` (the last two NaN without polyp frames), and ``self.rows`` keeps the rows.

    Args:
        network: the ToCo network (``cam_only`` forward) whose CAMs are scored.
        output_dir: folder of the CSV (created when missing).
        cam_threshold: ``t``; ``P_cam = CAM > t`` (0.65, the pseudo-mask threshold).
        cam_scales: CAM scales of :func:`~common.engines.toco_trainer.cam_predictor` (the pseudo-mask stage's six).
        size: network input side of the CAM predictor.
        filename: CSV file name.
        num_classes: the decoder's ``K`` channels at the head of ``pred`` (a
            :class:`~common.engines.inferers.DecoderAndCAMInferer` appends the CAM after them).
    """

    def __init__(self, network: nn.Module, output_dir: str | os.PathLike, cam_threshold: float = 0.65,
                 cam_scales: Sequence[float] = PSEUDO_LABEL_CAM_SCALES, size: int = 448,
                 filename: str = "metrics.csv", num_classes: int = 2) -> None:
        if not 0.0 <= cam_threshold <= 1.0:
            raise ValueError(f"WSSSEvaluationReport: cam_threshold must be in [0, 1], got {cam_threshold}")
        self.cam_fn = cam_predictor(network, scales=cam_scales, size=size)
        self.output_dir = Path(output_dir)
        self.cam_threshold = cam_threshold
        self.filename = filename
        self.num_classes = num_classes
        self.rows: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.rows = []

    def _score(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if not isinstance(outputs, list) or not isinstance(batch, list):
            raise ValueError("WSSSEvaluationReport needs a decollated engine output and batch (decollate=True)")
        for out, item in zip(outputs, batch):
            image_path, mask_path = _source(item, "image"), _source(item, "label")
            image = _read(image_path, "RGB", "image")
            gt = normalise_ground_truth(_read(mask_path, "L", "mask")) >= 0.5
            if gt.shape != image.shape[:2]:
                raise ValueError(f"WSSSEvaluationReport: mask {mask_path} is {gt.shape}, its image {image_path} is "
                                 f"{image.shape[:2]}")
            cam = self.cam_fn(image) > self.cam_threshold
            self.rows.append({
                "image": image_path, "mask": mask_path, "polyp": int(gt.any()),
                "decoder_dice": smoothed_dice(decoder_mask(out["pred"][: self.num_classes], gt.shape), gt),
                "cam_dice": smoothed_dice(cam, gt),
            })

    def _report(self, engine: Engine) -> None:
        if not self.rows:
            raise ValueError("WSSSEvaluationReport: the evaluation saw no frame")
        write_csv(self.output_dir / self.filename, WSSS_METRIC_COLUMNS,
                  [{**r, "decoder_dice": f"{r['decoder_dice']:.6f}", "cam_dice": f"{r['cam_dice']:.6f}"}
                   for r in self.rows])
        polyp = [r for r in self.rows if r["polyp"]]
        means = {}
        for prefix, rows in (("", self.rows), ("polyp_", polyp)):
            for column in ("decoder_dice", "cam_dice"):
                means[prefix + column] = float(np.mean([r[column] for r in rows])) if rows else float("nan")
        engine.state.metrics.update(means)
        logger.info("WSSS evaluation of %d frames (%d with a polyp) -> %s: mean decoder Dice %.4f, mean CAM Dice "
                    "(CAM > %g) %.4f; on polyp frames: decoder %.4f, CAM %.4f", len(self.rows), len(polyp),
                    self.output_dir / self.filename, means["decoder_dice"], self.cam_threshold, means["cam_dice"],
                    means["polyp_decoder_dice"], means["polyp_cam_dice"])


def _items(output: Any) -> list[dict[str, Any]]:
    if not isinstance(output, list):
        raise ValueError("WSSS validation metrics need a decollated engine output (decollate=True)")
    return output


def cam_dice_inputs(threshold: float = 0.65, num_classes: int = 2):
    """``output_transform`` of a Dice metric on the CAM channel of a
    :class:`~common.engines.inferers.DecoderAndCAMInferer` prediction: ``([CAM > t] [1, H, W], label [1, H, W])`` per
    frame (the checkpoint selection of the WSSS stage; frames without a polyp give NaN and are skipped by MONAI)."""

    def transform(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        items = _items(output)
        return ([(item["pred"][num_classes:num_classes + 1] > threshold).float() for item in items],
                [item["label"] for item in items])

    return transform


def decoder_dice_inputs(num_classes: int = 2):
    """``output_transform`` of a Dice metric on the decoder channels: ``([argmax_c pred > 0] [1, H, W], label)``."""

    def transform(output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        items = _items(output)
        return ([(item["pred"][:num_classes].argmax(0, keepdim=True) > 0).float() for item in items],
                [item["label"] for item in items])

    return transform
