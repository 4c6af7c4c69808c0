"""PNG figures for people: segmentation overlays and training curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from scipy import ndimage

__all__ = ["save_overlay", "outline"]

GT_COLOUR = (0, 255, 0)
PRED_COLOUR = (255, 0, 0)


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Boundary band of a boolean ``[H, W]`` mask, ``width`` pixels wide (mask minus its erosion)."""
    mask = np.asarray(mask, dtype=bool)
    return mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)


def save_overlay(image_path: str | Path, gt: np.ndarray | torch.Tensor | None, pred: np.ndarray,
                 out_path: str | Path) -> Path:
    """Write the RGB image with the ground-truth outline in green and the predicted outline in red.

    Args:
        image_path: the original image file (read at native size).
        gt: ``[H, W]`` (or ``[1, H, W]``) ground truth, any scale, or None.
        pred: ``[H, W]`` boolean prediction at the same size.
        out_path: PNG file to write (parent folders are created).
    """
    image = np.asarray(Image.open(image_path).convert("RGB")).copy()
    pred = np.asarray(pred, dtype=bool).squeeze()
    if pred.shape != image.shape[:2]:
        raise ValueError(f"{image_path}: prediction {pred.shape} does not match the image size {image.shape[:2]}")
    if gt is not None:
        g = np.asarray(torch.as_tensor(gt).detach().cpu(), dtype=np.float32).squeeze()
        image[outline(g >= 0.5 * max(float(g.max()), 1e-8))] = GT_COLOUR
    image[outline(pred)] = PRED_COLOUR
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(out_path)
    return out_path
