"""Embedded default 3D dataset: synthetic, class-imbalanced abdominal-CT-like volumes, generated on demand.

A volume-segmentation bundle run without ``dataset_dir`` uses this dataset, so that it works offline and out of the
box (nothing is downloaded)::

    "dataset_dir": "$common.data.demo_volumes.ensure_demo_volume_dataset(@bundle_root + '/data/demo')"

Layout: Medical Segmentation Decathlon (:py:mod:`common.data.volume_folders`)::

    <root>/imagesTr/case_<XXXX>.nii.gz   int16 "HU", shape (X, Y, Z)
    <root>/labelsTr/case_<XXXX>.nii.gz   uint8, 0 .. 13, same shape and affine
    <root>/dataset.json                  "labels" (the 13 BTCV organ names) and "training"
    <root>/.complete                     JSON marker with the generator's parameters, written last

Each volume (voxel coordinates normalised to ``u = (i + 0.5) / X - 0.5`` etc.) holds a body ellipsoid of soft
tissue (40 HU) in air (-1000 HU) and 13 "organs", organ ``k`` an ellipsoid centred at ``c_k + δ`` with semi-axes
``1.3 s · r_k`` (``δ`` a random shift up to 0.03, ``s`` a random scale in [0.85, 1.15], both per case) and its own
mean intensity, painted from the largest to the smallest (a smaller organ overwrites a larger one). The radii ``r_k``
span a factor of about 8, so the voxel counts span about 400:1, as in BTCV (liver vs. adrenal glands): the demo
exercises DHC's class-imbalance machinery (spec ``dhc.md`` §11.2). Gaussian noise (σ = 20 HU) is added; the affine
has spacing ``(1.5, 1.5, 3.0)`` mm and a non-zero origin, so that affine handling is exercised too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np

from .generated import ensure_generated

__all__ = ["DEMO_ORGANS", "make_demo_volume_dataset", "ensure_demo_volume_dataset"]

GENERATOR_VERSION = 1
DEMO_ORGANS: tuple[str, ...] = (
    "spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland",
)
"""The 13 BTCV organ names, labels 1 .. 13 (spec ``dhc.md`` §1.1)."""

_RADIUS_SCALE = 1.3
# organ k + 1: centre (u, v, w), semi-axes (a, b, c) in normalised coordinates, mean intensity (HU)
_ORGANS: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((0.22, 0.12, 0.05), (0.07, 0.07, 0.12), 110.0),    # spleen
    ((-0.15, 0.15, -0.10), (0.05, 0.05, 0.10), 160.0),  # right kidney
    ((0.15, 0.15, -0.10), (0.05, 0.05, 0.10), 165.0),   # left kidney
    ((-0.12, -0.08, 0.0), (0.03, 0.03, 0.05), 10.0),    # gallbladder
    ((0.02, 0.08, 0.25), (0.02, 0.02, 0.12), 60.0),     # esophagus
    ((-0.18, -0.02, 0.08), (0.14, 0.13, 0.18), 90.0),   # liver
    ((0.12, -0.05, 0.10), (0.08, 0.06, 0.09), 30.0),    # stomach
    ((0.03, 0.16, 0.0), (0.025, 0.025, 0.30), 200.0),   # aorta
    ((-0.05, 0.14, 0.0), (0.025, 0.025, 0.25), 140.0),  # inferior vena cava
    ((0.0, 0.03, 0.02), (0.08, 0.015, 0.02), 180.0),    # portal and splenic vein
    ((0.05, 0.05, -0.02), (0.09, 0.025, 0.03), 70.0),   # pancreas
    ((-0.10, 0.12, 0.10), (0.015, 0.015, 0.03), 50.0),  # right adrenal gland
    ((0.10, 0.12, 0.10), (0.015, 0.015, 0.03), 55.0),   # left adrenal gland
)


def _volume(rng: np.random.Generator, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image int16, label uint8)`` pair of ``shape`` (module docstring)."""
    u, v, w = (((np.arange(n) + 0.5) / n - 0.5).astype(np.float32) for n in shape)
    u, v, w = u[:, None, None], v[None, :, None], w[None, None, :]
    body = (u / 0.42) ** 2 + (v / 0.32) ** 2 + (w / 0.6) ** 2 < 1.0
    image = np.where(body, 40.0, -1000.0).astype(np.float32)
    label = np.zeros(shape, dtype=np.uint8)
    for k in sorted(range(1, len(_ORGANS) + 1), key=lambda k: -float(np.prod(_ORGANS[k - 1][1]))):
        centre, axes, hu = _ORGANS[k - 1]
        shift = rng.uniform(-0.03, 0.03, size=3)
        scale = rng.uniform(0.85, 1.15)
        terms = (((x - c - d) / (_RADIUS_SCALE * scale * a)) ** 2 for x, c, d, a in zip((u, v, w), centre, shift, axes))
        inside = sum(terms) < 1.0
        label[inside] = k
        image[inside] = hu + rng.normal(0.0, 5.0)
    image += rng.normal(0.0, 20.0, size=shape).astype(np.float32)
    return np.clip(image, -1024, 3071).astype(np.int16), label


def make_demo_volume_dataset(
    root: str | os.PathLike, n_cases: int = 12, shape: tuple[int, int, int] = (64, 64, 40), seed: int = 0
) -> Path:
    """Generate the synthetic 13-organ CT dataset at ``root`` (module docstring), unless it is there.

    Written atomically and once (:py:func:`common.data.generated.ensure_generated`); deterministic for the same
    arguments.

    Args:
        root: dataset folder to create.
        n_cases: number of labelled volumes (at least 2).
        shape: ``(X, Y, Z)`` voxels of each volume, each at least 16.
        seed: random seed.

    Raises:
        ValueError: bad count or shape.
        FileExistsError: ``root`` exists, is not empty and was not made by this generator.
    """
    shape = tuple(int(s) for s in shape)
    if int(n_cases) < 2 or len(shape) != 3 or min(shape) < 16:
        raise ValueError(f"n_cases must be >= 2 and shape three sizes >= 16, got n_cases={n_cases}, shape={shape}.")
    params = {"generator": __name__, "version": GENERATOR_VERSION, "n_cases": int(n_cases), "shape": list(shape),
              "seed": int(seed)}

    def write(tmp: Path) -> list[str]:
        rng = np.random.default_rng(int(seed))
        affine = np.diag([1.5, 1.5, 3.0, 1.0])
        affine[:3, 3] = (-48.0, -48.0, -60.0)
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        files, training = [], []
        for i in range(int(n_cases)):
            image, label = _volume(rng, shape)
            name = f"case_{i:04d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), tmp / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), tmp / "labelsTr" / name)
            files += [f"imagesTr/{name}", f"labelsTr/{name}"]
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        meta = {"name": "FrugalZoo synthetic abdomen", "description": "synthetic class-imbalanced 13-organ CT demo",
                "tensorImageSize": "3D", "modality": {"0": "CT"},
                "labels": {"0": "background", **{str(k): n for k, n in enumerate(DEMO_ORGANS, start=1)}},
                "numTraining": int(n_cases), "numTest": 0, "training": training, "test": []}
        (tmp / "dataset.json").write_text(json.dumps(meta, indent=1))
        return files + ["dataset.json"]

    return ensure_generated(root, params, write, "demo volume dataset")


def ensure_demo_volume_dataset(
    root: str | os.PathLike, n_cases: int = 12, shape: tuple[int, int, int] = (64, 64, 40), seed: int = 0
) -> str:
    """:py:func:`make_demo_volume_dataset` returning ``str(root)``, for config expressions."""
    return str(make_demo_volume_dataset(root, n_cases, tuple(shape), seed))
