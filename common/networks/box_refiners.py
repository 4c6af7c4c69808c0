"""Box-prompted mask refiners: image + box (+ the thresholded map) -> pseudo mask.

EndoKED (Wang et al., arXiv 2310.11173; specs/endoked.md §3.6 step 4, §4.4) turns the box chosen by
:func:`common.transforms.box_prompts.mask_to_box` into a pseudo mask with Segment Anything (Kirillov et al.,
"Segment Anything", ICCV 2023): ViT-H, one box prompt, ``multimask_output=False``, mask = ``masks[0]`` (logits > 0
at native size); no point prompts, no IoU check. Its "without SAM" variant keeps the thresholded map itself.

Every refiner follows :class:`BoxRefiner`: it is called with the raw image, the box and the binary map the box
came from, and each uses what it needs:

* :class:`SamBoxRefiner` - Segment Anything with the box prompt (image and box);
* :class:`GrabCutBoxRefiner` - OpenCV GrabCut (Rother et al., "GrabCut", SIGGRAPH 2004) initialised with the box
  rectangle, an offline stand-in when no SAM checkpoint is available (image and box);
* :class:`ThresholdRefiner` - no refinement: the binary map itself (the map only).

Configs build them with :func:`make_box_refiner`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch

__all__ = [
    "BoxRefiner",
    "SamBoxRefiner",
    "GrabCutBoxRefiner",
    "ThresholdRefiner",
    "make_box_refiner",
    "sam_variant_of_state_dict",
    "SAM_VARIANTS",
]

logger = logging.getLogger(__name__)

SAM_VARIANTS: dict[str, tuple[int, int]] = {"vit_b": (12, 768), "vit_l": (24, 1024), "vit_h": (32, 1280)}
"""SAM image-encoder size per registry name: ``(number of transformer blocks, embedding width)``."""

_SAM_ALIASES = {"default": "vit_h"}
_BLOCK_KEY = re.compile(r"^image_encoder\.blocks\.(\d+)\.")


class BoxRefiner(Protocol):
    """``refiner(image, box, binary_map) -> mask``.

    Args:
        image: ``(H, W, 3)`` uint8 RGB image at native size.
        box: ``(4,)`` ``(x0, y0, x1, y1)`` pixel box with exclusive ends (``x1 = x + w``).
        binary_map: ``(H, W)`` bool thresholded map the box was drawn from.

    Returns:
        ``(H, W)`` bool pseudo mask.
    """

    def __call__(self, image: np.ndarray, box: Sequence[int] | np.ndarray, binary_map: np.ndarray) -> np.ndarray:
        ...


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"refiner: image must be an (H, W, 3) uint8 RGB array, got shape {image.shape} "
                         f"dtype {image.dtype}")
    return image


def _check_box(box: Sequence[int] | np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    values = np.asarray(box).reshape(-1)
    if values.shape != (4,):
        raise ValueError(f"refiner: box must hold 4 values (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in values)
    height, width = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"refiner: box {(x0, y0, x1, y1)} is empty or outside the {width}x{height} image")
    return x0, y0, x1, y1


def sam_variant_of_state_dict(state_dict: dict[str, torch.Tensor]) -> tuple[str | None, int, int]:
    """Which SAM variant a state dict holds, from its image encoder.

    Args:
        state_dict: a SAM state dict (keys ``image_encoder.pos_embed`` of shape ``(1, 64, 64, C)`` and
            ``image_encoder.blocks.<i>....``).

    Returns:
        ``(name, blocks, width)``; ``name`` is a key of :data:`SAM_VARIANTS` or None when no variant matches.

    Raises:
        ValueError: the state dict has no ``image_encoder.pos_embed`` (not a SAM checkpoint).
    """
    pos_embed = state_dict.get("image_encoder.pos_embed")
    if pos_embed is None:
        raise ValueError("no 'image_encoder.pos_embed' entry: not a Segment Anything state dict")
    blocks = len({int(m.group(1)) for m in map(_BLOCK_KEY.match, state_dict) if m})
    width = int(pos_embed.shape[-1])
    name = next((n for n, size in SAM_VARIANTS.items() if size == (blocks, width)), None)
    return name, blocks, width


def _load_state_dict(path: Path) -> object:
    """``torch.load`` of a checkpoint without reading its tensors into memory when possible (memory map of the
    zip format; files in the legacy format are read whole)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle/zip errors of a corrupt or non-torch file
        raise ValueError(f"SAM checkpoint {path} cannot be read by torch.load: {type(err).__name__}: {err}") from err


class SamBoxRefiner:
    """Segment Anything prompted with one box, as in EndoKED's pseudo-mask scripts.

    ``SamPredictor.set_image`` on the raw RGB uint8 image, then
    ``predict(point_coords=None, point_labels=None, box=box, multimask_output=False)``; the mask is ``masks[0]``
    (``(H, W)`` bool at native size). The predictor's ``ResizeLongestSide`` uses ``sam.image_encoder.img_size``
    (1024 for the released models), so boxes are mapped to the model's input frame by SAM itself.

    Args:
        checkpoint: SAM checkpoint file (a plain state dict, e.g. ``sam_vit_h_4b8939.pth``); ignored when ``sam``
            is given.
        model_type: ``segment_anything.sam_model_registry`` key: ``"vit_h"`` (= ``"default"``), ``"vit_l"``,
            ``"vit_b"``.
        device: torch device for the model.
        sam: a ready ``segment_anything.Sam`` (e.g. a tiny one in tests); no file is read.

    Raises:
        FileNotFoundError: ``checkpoint`` does not exist.
        ValueError: neither ``checkpoint`` nor ``sam`` is given, ``model_type`` is unknown, or the checkpoint is
            not a SAM state dict or holds another variant than ``model_type`` (checked on the file's tensors,
            memory-mapped, before any model is built).
    """

    def __init__(self, checkpoint: str | os.PathLike | None = None, model_type: str = "vit_h",
                 device: str | torch.device = "cpu", sam: torch.nn.Module | None = None) -> None:
        from segment_anything import SamPredictor

        if sam is None:
            sam = self._build(checkpoint, model_type)
        self.sam = sam.to(device).eval()
        self.predictor = SamPredictor(self.sam)

    @staticmethod
    def _build(checkpoint: str | os.PathLike | None, model_type: str) -> torch.nn.Module:
        from segment_anything import sam_model_registry

        if checkpoint is None:
            raise ValueError("SamBoxRefiner: give a SAM checkpoint file (checkpoint=...) or a built model (sam=...)")
        if model_type not in sam_model_registry:
            raise ValueError(f"SamBoxRefiner: unknown model_type {model_type!r}; "
                             f"expected one of {sorted(sam_model_registry)}")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"SAM checkpoint file {path} does not exist")
        state_dict = _load_state_dict(path)
        if not isinstance(state_dict, dict):
            raise ValueError(f"SAM checkpoint {path} holds a {type(state_dict).__name__}, not a state dict")
        try:
            found, blocks, width = sam_variant_of_state_dict(state_dict)
        except ValueError as err:
            raise ValueError(f"SAM checkpoint {path}: {err}") from err
        wanted = _SAM_ALIASES.get(model_type, model_type)
        if found != wanted:
            looks_like = found if found is not None else "no known SAM variant"
            raise ValueError(
                f"SAM checkpoint {path} does not match model_type {model_type!r} "
                f"({SAM_VARIANTS[wanted][0]} blocks x {SAM_VARIANTS[wanted][1]}): its image encoder has "
                f"{blocks} blocks x {width}, which looks like {looks_like}"
            )
        sam = sam_model_registry[model_type](checkpoint=None)
        sam.load_state_dict(state_dict)
        logger.info("loaded SAM %s from %s", model_type, path)
        return sam

    def __call__(self, image: np.ndarray, box: Sequence[int] | np.ndarray,
                 binary_map: np.ndarray | None = None) -> np.ndarray:
        """Mask ``(H, W)`` bool of the box prompt on ``image``; ``binary_map`` is not used."""
        image = _check_image(image)
        x0, y0, x1, y1 = _check_box(box, image.shape[:2])
        self.predictor.set_image(image)
        masks, _, _ = self.predictor.predict(point_coords=None, point_labels=None,
                                             box=np.array([x0, y0, x1, y1]), multimask_output=False)
        return np.asarray(masks[0], dtype=bool)

    def union_of_boxes(self, image: np.ndarray, boxes: Sequence[Sequence[int]] | np.ndarray) -> np.ndarray:
        """Union of the single-output masks of several box prompts, ``(B, 4)`` -> ``(H, W)`` bool.

        The released multi-box branch (unreachable there) mapped the boxes with a wrong original size; here they
        go through ``transform.apply_boxes_torch(boxes, (H, W))`` with the image's own size (specs/endoked.md §7
        row 13) and one ``predict_torch`` call.
        """
        image = _check_image(image)
        size = image.shape[:2]
        checked = [_check_box(b, size) for b in np.asarray(boxes).reshape(-1, 4)]
        if not checked:
            raise ValueError("union_of_boxes: no box given")
        self.predictor.set_image(image)
        boxes_t = torch.as_tensor(checked, dtype=torch.float32, device=self.predictor.device)
        masks, _, _ = self.predictor.predict_torch(
            point_coords=None, point_labels=None,
            boxes=self.predictor.transform.apply_boxes_torch(boxes_t, size), multimask_output=False,
        )
        return masks[:, 0].any(dim=0).cpu().numpy()


class GrabCutBoxRefiner:
    """OpenCV GrabCut initialised with the box rectangle: the offline stand-in for SAM.

    ``cv2.grabCut(image, mask, rect=(x0, y0, x1 - x0, y1 - y0), iterations, cv2.GC_INIT_WITH_RECT)`` fits colour
    GMMs to the pixels inside (probably foreground) and outside (background) the rectangle and labels the pixels by
    graph cut; the mask is ``GC_FGD | GC_PR_FGD`` restricted to the box (outside it is background by construction).
    The box must leave some background outside it.

    Args:
        iterations: GrabCut iterations.
        seed: seed of OpenCV's global random generator, set before every call (GrabCut's k-means initialisation is
            random) so that results repeat; None leaves the generator alone.
    """

    def __init__(self, iterations: int = 5, seed: int | None = 0) -> None:
        if iterations < 1:
            raise ValueError(f"GrabCutBoxRefiner: iterations must be >= 1, got {iterations}")
        self.iterations = iterations
        self.seed = seed

    def __call__(self, image: np.ndarray, box: Sequence[int] | np.ndarray,
                 binary_map: np.ndarray | None = None) -> np.ndarray:
        """Mask ``(H, W)`` bool of GrabCut inside ``box``; ``binary_map`` is not used."""
        image = np.ascontiguousarray(_check_image(image))
        x0, y0, x1, y1 = _check_box(box, image.shape[:2])
        labels = np.zeros(image.shape[:2], np.uint8)
        bgd_model, fgd_model = np.zeros((1, 65), np.float64), np.zeros((1, 65), np.float64)
        if self.seed is not None:
            cv2.setRNGSeed(self.seed)
        try:
            cv2.grabCut(image, labels, (x0, y0, x1 - x0, y1 - y0), bgd_model, fgd_model, self.iterations,
                        cv2.GC_INIT_WITH_RECT)
        except cv2.error as err:
            raise ValueError(f"GrabCut failed for box {(x0, y0, x1, y1)} on a {image.shape[1]}x{image.shape[0]} "
                             f"image (a box covering the whole image leaves no background): {err}") from err
        mask = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
        inside = np.zeros_like(mask)
        inside[y0:y1, x0:x1] = True
        return mask & inside


class ThresholdRefiner:
    """No refinement: the pseudo mask is the thresholded map itself (the whole map, not only the box).

    EndoKED's "without SAM" variants save ``M * 255`` directly: ``a3_generate_pseulabel_from_CAM.py`` and the
    released default of the prediction round (``predictor = None``, specs/endoked.md §3.6, §4.4).
    """

    def __call__(self, image: np.ndarray, box: Sequence[int] | np.ndarray, binary_map: np.ndarray) -> np.ndarray:
        """``binary_map`` as ``(H, W)`` bool; ``image`` only fixes the expected size, ``box`` is not used."""
        binary_map = np.asarray(binary_map)
        if binary_map.shape != np.shape(image)[:2]:
            raise ValueError(f"ThresholdRefiner: binary map {binary_map.shape} does not match the image size "
                             f"{np.shape(image)[:2]}")
        return binary_map != 0


def make_box_refiner(kind: str = "grabcut", sam_checkpoint: str | os.PathLike | None = None,
                     sam_model_type: str = "vit_h", device: str | torch.device = "cpu") -> BoxRefiner:
    """Build the refiner a config names.

    Args:
        kind: ``"sam"`` (:class:`SamBoxRefiner`), ``"grabcut"`` (:class:`GrabCutBoxRefiner`) or ``"threshold"``
            (:class:`ThresholdRefiner`).
        sam_checkpoint: SAM checkpoint file, required for ``"sam"``.
        sam_model_type: registry name of the SAM variant.
        device: torch device for SAM.

    Raises:
        ValueError: unknown ``kind``, or ``"sam"`` without a checkpoint.
    """
    if kind == "sam":
        if sam_checkpoint is None:
            raise ValueError('make_box_refiner: kind "sam" needs sam_checkpoint (e.g. sam_vit_h_4b8939.pth); '
                             'use kind "grabcut" or "threshold" to run without one')
        return SamBoxRefiner(sam_checkpoint, model_type=sam_model_type, device=device)
    if kind == "grabcut":
        return GrabCutBoxRefiner()
    if kind == "threshold":
        return ThresholdRefiner()
    raise ValueError(f'make_box_refiner: unknown kind {kind!r}; expected "sam", "grabcut" or "threshold"')
