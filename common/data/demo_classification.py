"""Embedded default classification dataset: synthetic blood-cell-like images, generated on demand.

A classification bundle run without ``dataset_dir`` uses this dataset, so that it works offline and out of the
box (nothing is ever downloaded)::

    "dataset_dir": "$common.data.demo_classification.ensure_demo_classification_dataset(@bundle_root + '/data/demo')"

Layout (:py:mod:`common.data.classification_folders`)::

    <root>/images/<id>.png     RGB, ``size x size``
    <root>/labels.csv          id,class_id,class_name for the labelled images (the unlabelled ones have no row)
    <root>/.complete           JSON marker with the generator's parameters, written last

Each image shows one cell on a pale background (arrays ``(S, S)`` or ``(S, S, 3)`` in ``[0, 1]``, vectorised
numpy; ``X, Y`` pixel coordinates over ``S``): a cytoplasm disc of radius ``r`` around ``(c_x, c_y)`` and a
nucleus whose *shape* is the class, at a random rotation ``theta``:

* ``round``: one disc of radius ``0.55 r``;
* ``bilobed``: two discs of radius ``0.35 r`` at ``±0.35 r`` along ``theta``;
* ``multilobed``: four discs of radius ``0.24 r`` on an arc of radius ``0.45 r``;
* ``kidney``: a disc of radius ``0.6 r`` minus a disc of radius ``0.45 r`` shifted by ``0.45 r`` (a crescent).

Colours (stain hue and intensity), sizes and positions vary per image, with smooth background noise and pixel
noise, so colour alone does not give the class; shape does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .generated import ensure_generated

__all__ = ["DEMO_CLASSES", "make_demo_classification_dataset", "ensure_demo_classification_dataset"]

GENERATOR_VERSION = 1
DEMO_CLASSES: tuple[str, ...] = ("round", "bilobed", "multilobed", "kidney")


def _discs(xx: np.ndarray, yy: np.ndarray, centres: Sequence[tuple[float, float]], radius: float) -> np.ndarray:
    """Union of discs of one ``radius`` around ``centres``, as a boolean ``(S, S)`` array."""
    return np.any([(xx - cx) ** 2 + (yy - cy) ** 2 < radius**2 for cx, cy in centres], axis=0)


def _nucleus(kind: int, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, r: float, theta: float) -> np.ndarray:
    """Boolean nucleus mask of class ``kind`` (module docstring)."""
    ux, uy = np.cos(theta), np.sin(theta)
    if kind == 0:
        return _discs(xx, yy, [(cx, cy)], 0.55 * r)
    if kind == 1:
        return _discs(xx, yy, [(cx + s * 0.35 * r * ux, cy + s * 0.35 * r * uy) for s in (-1, 1)], 0.35 * r)
    if kind == 2:
        angles = theta + np.linspace(-1.2, 1.2, 4)
        return _discs(xx, yy, [(cx + 0.45 * r * np.cos(a), cy + 0.45 * r * np.sin(a)) for a in angles], 0.24 * r)
    outer = _discs(xx, yy, [(cx, cy)], 0.6 * r)
    return outer & ~_discs(xx, yy, [(cx + 0.45 * r * ux, cy + 0.45 * r * uy)], 0.45 * r)


def _render(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 image of a cell of class ``kind``."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    smooth = np.asarray(Image.fromarray(rng.standard_normal((4, 4)).astype(np.float32)).resize(
        (size, size), Image.Resampling.BICUBIC))
    background = np.array([0.93, 0.82, 0.80], np.float32) * (1.0 + 0.03 * smooth[..., None])
    r = rng.uniform(0.28, 0.38)
    cx, cy = rng.uniform(0.5 - 0.08, 0.5 + 0.08, size=2)
    cell = _discs(xx, yy, [(cx, cy)], r)
    nucleus = _nucleus(kind, xx, yy, cx, cy, r, rng.uniform(0.0, 2.0 * np.pi))
    cytoplasm_colour = np.array([0.80, 0.70, rng.uniform(0.82, 0.92)], np.float32)
    nucleus_colour = np.array([rng.uniform(0.30, 0.50), rng.uniform(0.15, 0.30), rng.uniform(0.45, 0.65)], np.float32)
    rgb = np.where(cell[..., None], cytoplasm_colour, background)
    rgb = np.where(nucleus[..., None], nucleus_colour * (1.0 + 0.05 * smooth[..., None]), rgb)
    rgb = rgb + rng.normal(0.0, 0.02, rgb.shape).astype(np.float32)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def make_demo_classification_dataset(
    root: str | os.PathLike, n_per_class: int = 16, n_unlabelled: int = 8, size: int = 64, seed: int = 0
) -> Path:
    """Generate the synthetic cell dataset at ``root`` (module docstring), unless it is there.

    Written atomically and once (:py:func:`common.data.generated.ensure_generated`); deterministic for the same
    arguments. Ids are ``0000``, ``0001``, ... in a seeded shuffled class order; the last ``n_unlabelled`` ids
    have no ``labels.csv`` row.

    Args:
        root: dataset folder to create.
        n_per_class: labelled images per class (at least 2, so a class can be split into train and test).
        n_unlabelled: extra images without a label (used by self-supervised pre-training only).
        size: image side in pixels (at least 16).
        seed: random seed.

    Raises:
        ValueError: bad counts or size.
        FileExistsError: ``root`` exists, is not empty and was not made by this generator.
    """
    if int(n_per_class) < 2 or int(n_unlabelled) < 0 or int(size) < 16:
        raise ValueError(f"n_per_class must be >= 2, n_unlabelled >= 0 and size >= 16, got n_per_class="
                         f"{n_per_class}, n_unlabelled={n_unlabelled}, size={size}.")
    params = {"generator": __name__, "version": GENERATOR_VERSION, "n_per_class": int(n_per_class),
              "n_unlabelled": int(n_unlabelled), "size": int(size), "seed": int(seed)}

    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(int(seed))
        kinds = rng.permutation(np.repeat(np.arange(len(DEMO_CLASSES)), int(n_per_class)))
        kinds = np.concatenate([kinds, rng.integers(0, len(DEMO_CLASSES), int(n_unlabelled))])
        (tmp / "images").mkdir()
        rows, files = ["id,class_id,class_name"], []
        for i, kind in enumerate(kinds):
            name = f"{i:04d}"
            Image.fromarray(_render(rng, int(kind), int(size))).save(tmp / "images" / f"{name}.png")
            files.append(f"images/{name}.png")
            if i < len(kinds) - int(n_unlabelled):
                rows.append(f"{name},{int(kind) + 1},{DEMO_CLASSES[kind]}")
        (tmp / "labels.csv").write_text("\n".join(rows) + "\n")
        return files + ["labels.csv"]

    return ensure_generated(root, params, write, "demo classification dataset")


def ensure_demo_classification_dataset(
    root: str | os.PathLike, n_per_class: int = 16, n_unlabelled: int = 8, size: int = 64, seed: int = 0
) -> str:
    """:py:func:`make_demo_classification_dataset` returning ``str(root)``, for config expressions."""
    return str(make_demo_classification_dataset(root, n_per_class, n_unlabelled, size, seed))
