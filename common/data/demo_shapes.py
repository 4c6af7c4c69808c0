"""Embedded demo of cross-domain few-shot segmentation: synthetic shapes in two visibly different domains.

The CD-TG bundle (specs/cdtg.md) trains on a source domain and tests on target domains whose classes and image
style both differ (CD-FSS, Lei et al., ECCV 2022). Without PASCAL or the medical targets, this demo reproduces
that set-up in miniature, generated on demand (never downloaded)::

    <root>/source/{disc,square,triangle,star}/<stem>.png + <stem>_mask.png    the "natural" source domain
    <root>/target/{ring,cross}/<stem>.png + <stem>_mask.png                   the shifted target domain
    <root>/.complete                                                          marker (common.data.generated)

in the layout of :py:func:`common.data.fewshot_datasets.class_folder_classes`: 12 images per class, 128 x 128
RGB PNG, masks 0 / 255. Every image holds one shape of its class (random centre, radius ``r``, rotation).

* source style: flat, saturated shape colour on a light background with Gaussian pixel noise (sigma 12 grey
  levels) and a smooth brightness gradient;
* target style (the domain shift): dark background with low-frequency blotches, the shape filled with a stripe
  texture ``0.5 + 0.5 sin(2 pi (x cos t + y sin t) / period)`` in a muted blue-green palette, the whole image
  blurred (Gaussian, sigma 1.2) with weaker noise, like a stained microscopy slide.

Shapes are drawn with OpenCV polygons on whole arrays (no Python loop over pixels); the whole demo is written in a
fraction of a second, atomically (temporary folder then rename, :py:func:`common.data.generated.ensure_generated`).
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from common.data.generated import ensure_generated

__all__ = ["ensure_demo_shapes", "SOURCE_CLASSES", "TARGET_CLASSES", "draw_shape_mask"]

GENERATOR_VERSION = 1
SOURCE_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "star")
TARGET_CLASSES: tuple[str, ...] = ("ring", "cross")


def _polygon(center: np.ndarray, radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """Integer polygon vertices ``[N, 1, 2]`` at ``center + r_k (cos a_k, sin a_k)``, fixed point with 4 fractional
    bits (OpenCV ``shift=4``)."""
    pts = center + radii[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
    return np.round(pts * 16).astype(np.int32)[:, None, :]


def draw_shape_mask(shape: str, size: int, center: tuple[float, float], radius: float, angle: float) -> np.ndarray:
    """Binary ``uint8 [size, size]`` mask (0 / 255) of ``shape`` with circumradius ``radius`` (pixels), rotation
    ``angle`` (radians) and centre ``(x, y)``.

    Raises:
        ValueError: an unknown shape.
    """
    mask = np.zeros((size, size), np.uint8)
    c = np.asarray(center, np.float64)
    fill = lambda pts: cv2.fillPoly(mask, [pts], 255, lineType=cv2.LINE_8, shift=4)  # noqa: E731
    if shape == "disc":
        cv2.circle(mask, tuple(np.round(c * 16).astype(int)), int(round(radius * 16)), 255, -1, cv2.LINE_8, 4)
    elif shape == "ring":
        cv2.circle(mask, tuple(np.round(c * 16).astype(int)), int(round(radius * 16)), 255, -1, cv2.LINE_8, 4)
        cv2.circle(mask, tuple(np.round(c * 16).astype(int)), int(round(0.55 * radius * 16)), 0, -1, cv2.LINE_8, 4)
    elif shape == "square":
        fill(_polygon(c, np.full(4, radius), angle + np.pi / 4 + np.arange(4) * np.pi / 2))
    elif shape == "triangle":
        fill(_polygon(c, np.full(3, radius), angle + np.arange(3) * 2 * np.pi / 3))
    elif shape == "star":
        fill(_polygon(c, np.tile([radius, 0.45 * radius], 5), angle + np.arange(10) * np.pi / 5))
    elif shape == "cross":
        # 12-gon of a plus sign with arm half-width w = 0.3 r: corners at (±w, ±r), (±r, ±w), (±w, ±w)
        w = 0.3 * radius
        xy = np.array([(w, -radius), (w, -w), (radius, -w), (radius, w), (w, w), (w, radius),
                       (-w, radius), (-w, w), (-radius, w), (-radius, -w), (-w, -w), (-w, -radius)])
        rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        fill(np.round((c + xy @ rot.T) * 16).astype(np.int32)[:, None, :])
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SOURCE_CLASSES + TARGET_CLASSES}.")
    return mask


def _geometry(rng: np.random.Generator, size: int) -> tuple[tuple[float, float], float, float]:
    radius = rng.uniform(0.18, 0.32) * size
    margin = radius + 2
    return (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin)), radius, rng.uniform(0, 2 * np.pi)


def _source_image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    size = mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(170, 220) + rng.uniform(-25, 25) * (xx - 0.5) + rng.uniform(-25, 25) * (yy - 0.5)
    rgb = base[..., None] * rng.uniform(0.9, 1.0, 3).astype(np.float32)
    colour = rng.permutation(np.array([rng.uniform(180, 240), rng.uniform(20, 80), rng.uniform(20, 120)], np.float32))
    rgb = np.where(mask[..., None] > 0, colour, rgb)
    rgb += rng.normal(0.0, 12.0, rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _target_image(rng: np.random.Generator, mask: np.ndarray) -> np.ndarray:
    size = mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    blotches = cv2.resize(rng.normal(0.0, 1.0, (6, 6)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    rgb = (rng.uniform(30, 55) + 10.0 * blotches)[..., None] * np.array([0.8, 0.9, 1.1], np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(5, 9)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    palette = np.array([rng.uniform(40, 90), rng.uniform(120, 180), rng.uniform(130, 200)], np.float32)
    shape_rgb = palette * (0.55 + 0.45 * stripes[..., None])
    rgb = np.where(mask[..., None] > 0, shape_rgb, rgb)
    rgb = cv2.GaussianBlur(rgb, (0, 0), 1.2)
    rgb += rng.normal(0.0, 4.0, rgb.shape).astype(np.float32)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def _write(folder: Path, n_per_class: int, size: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    files = []
    domains = (("source", SOURCE_CLASSES, _source_image), ("target", TARGET_CLASSES, _target_image))
    for domain, classes, style in domains:
        for shape in classes:
            class_dir = folder / domain / shape
            class_dir.mkdir(parents=True)
            for k in range(n_per_class):
                center, radius, angle = _geometry(rng, size)
                mask = draw_shape_mask(shape, size, center, radius, angle)
                image = style(rng, mask)
                stem = f"{shape}_{k:03d}"
                cv2.imwrite(str(class_dir / f"{stem}.png"), image[..., ::-1])  # OpenCV writes BGR
                cv2.imwrite(str(class_dir / f"{stem}_mask.png"), mask)
                files += [f"{domain}/{shape}/{stem}.png", f"{domain}/{shape}/{stem}_mask.png"]
    return files


def ensure_demo_shapes(root: str | os.PathLike, n_per_class: int = 12, size: int = 128, seed: int = 0) -> str:
    """Write the demo (module docstring) at ``root`` unless it is already there; returns ``str(root)``.

    Idempotent: a second call with the same parameters rewrites nothing; other parameters regenerate it. Nothing
    half-written is left behind (temporary folder, then rename).

    Args:
        root: dataset folder (``<root>/source``, ``<root>/target``).
        n_per_class: images per class (at least 2, an episode needs a query and a support).
        size: image side in pixels (at least 32).
        seed: seed of the generator.

    Raises:
        ValueError: ``n_per_class < 2`` or ``size < 32``.
        FileExistsError: ``root`` holds something else (see :py:func:`common.data.generated.ensure_generated`).
    """
    if n_per_class < 2 or size < 32:
        raise ValueError(f"ensure_demo_shapes needs n_per_class >= 2 and size >= 32, got {n_per_class}, {size}.")
    params = {"generator": __name__, "version": GENERATOR_VERSION, "n_per_class": int(n_per_class),
              "size": int(size), "seed": int(seed)}
    return str(ensure_generated(root, params, lambda folder: _write(folder, n_per_class, size, seed),
                                "demo few-shot shapes"))
