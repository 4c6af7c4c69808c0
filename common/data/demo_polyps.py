"""Embedded default polyp dataset: synthetic colonoscopy frames with polyp masks, generated on demand.

A bundle run without ``dataset_dir`` trains on this dataset, so that it works offline and out of the box
(nothing is ever downloaded)::

    "dataset_dir": "$common.data.demo_polyps.ensure_demo_polyp_dataset(@bundle_root + '/data/demo')"

Layout (PraNet, see :py:mod:`common.data.polyp_folders`)::

    <root>/TrainDataset/{images/*.jpg, masks/*.png}
    <root>/TestDataset/SynthA/{images,masks}    same polyp shapes as training, warmer and brighter light
    <root>/TestDataset/SynthB/{images,masks}    smaller, flatter, lower-contrast (sessile-like) polyps, cooler light
    <root>/.complete                            JSON marker with the generator's parameters, written last

Images are RGB JPEGs (quality 90), masks 0/255 single-channel PNGs; every frame holds one polyp.

How a frame is drawn (all arrays ``(H, W)`` or ``(H, W, 3)``, values in ``[0, 1]``, vectorised numpy; ``X, Y`` are
pixel coordinates divided by the width ``W``):

* mucosa: a pinkish-red base colour ``c0`` modulated by multi-octave value noise ``n(X, Y)`` (random grids
  upsampled bicubically) and a colour-balance noise ``n_h``, ``c = c0 (1 + 0.12 n)(1 + 0.05 n_h (1, -1, -0.5))``,
  with vessels where a second noise field crosses a level,
  ``v = exp(-((n_v - t) / 0.035)^2)``, darkening green and blue more than red;
* illumination: the endoscope light falls off towards the lumen, a dark blob at ``(l_x, l_y)``,
  ``L = (1 - 0.8 exp(-d_l^2 / 2 s^2)) (1 - k_v r^2)`` with ``r`` the distance to the frame centre, times
  haustral fold bands ``1 + 0.06 sin(2 pi d_l / p + 2.5 n_h + 1.5 n)``;
* polyp: an ellipse with semi-axes ``(a, b)``, rotation ``theta`` and a wavy outline,
  ``rho = sqrt((u/a)^2 + (v/b)^2) / (1 + sum_k e_k cos(k phi + phi_k))``; mask ``= rho < 1``; a dome of height
  ``h = H0 sqrt(1 - rho^2)`` is Lambert-shaded with a light near the camera axis, its colour is the mucosa's
  shifted towards a random tint (paler or redder), blended in with a soft edge ``smoothstep(rho in [1, 1 - w])``
  and a thin shadow outside the rim;
* specular highlights: thresholded high-frequency noise on the whole frame plus a highlight on the dome,
  added to all channels (so the brightest pixels are not all polyp);
* sensor noise, gamma, and, in half of the frames, the black corners of an endoscope's field of view.

The polyp differs from the mucosa by shading, rim and a colour shift that varies per frame, but overlaps it in
every single channel, so no global colour threshold segments it; a small network learns it in a few epochs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .generated import ensure_generated

__all__ = ["make_demo_polyp_dataset", "ensure_demo_polyp_dataset", "DEMO_TEST_SETS", "FrameStyle", "render_frame",
           "JPEG_QUALITY"]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DEMO_TEST_SETS: tuple[str, str] = ("SynthA", "SynthB")
JPEG_QUALITY = 90


@dataclass(frozen=True)
class FrameStyle:
    """Appearance of one set: polyp size/height ranges (fractions of the width) and lighting."""

    semi_axis: tuple[float, float]  # range of the major semi-axis a / W
    height: tuple[float, float]  # range of the dome height H0 (shading strength)
    tint: float  # strength of the polyp's colour shift
    light: tuple[float, float, float]  # RGB gain of the light source
    vignette: float  # k_v
    gain: float  # overall brightness


_STYLES: dict[str, FrameStyle] = {
    "TrainDataset": FrameStyle((0.07, 0.17), (0.6, 1.0), 1.0, (1.0, 1.0, 1.0), 0.35, 1.0),
    "SynthA": FrameStyle((0.07, 0.17), (0.6, 1.0), 1.0, (1.06, 0.97, 0.9), 0.5, 1.1),
    "SynthB": FrameStyle((0.04, 0.10), (0.25, 0.5), 0.6, (0.94, 1.0, 1.08), 0.3, 0.95),
}


def _value_noise(rng: np.random.Generator, h: int, w: int, cells: Sequence[int]) -> np.ndarray:
    """Multi-octave value noise: random grids of ``c x c*w/h`` cells upsampled bicubically, summed with weights 1/c.

    Returns ``(h, w)`` float32, normalised to zero mean and unit standard deviation.
    """
    out = np.zeros((h, w), np.float32)
    for c in cells:
        grid = rng.standard_normal((c, max(2, round(c * w / h)))).astype(np.float32)
        out += np.asarray(Image.fromarray(grid).resize((w, h), Image.Resampling.BICUBIC)) / c
    return (out - out.mean()) / (out.std() + 1e-6)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def render_frame(rng: np.random.Generator, h: int, w: int, style: FrameStyle) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic frame: ``(rgb uint8 (h, w, 3), mask uint8 (h, w) in {0, 255})`` (module docstring)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / w  # isotropic coordinates, x in [0, 1)
    cx_frame, cy_frame = 0.5, 0.5 * h / w

    # mucosa colour and texture
    base = np.array([rng.uniform(0.72, 0.88), rng.uniform(0.34, 0.48), rng.uniform(0.28, 0.40)], np.float32)
    tex = _value_noise(rng, h, w, (3, 6, 12, 24))
    hue = _value_noise(rng, h, w, (2, 4))
    rgb = base * (1.0 + 0.12 * tex[..., None]) * (1.0 + 0.05 * hue[..., None] * np.array([1.0, -1.0, -0.5]))
    vessels = np.exp(-(((_value_noise(rng, h, w, (8, 16)) - rng.uniform(-0.5, 0.5)) / 0.035) ** 2))
    rgb *= 1.0 - rng.uniform(0.15, 0.35) * vessels[..., None] * np.array([0.35, 1.0, 0.8], np.float32)

    # illumination: dark lumen, fold bands around it, vignette
    lx, ly = rng.uniform(0.15, 0.85), rng.uniform(0.1, 0.9) * h / w
    d_lumen = np.sqrt((xx - lx) ** 2 + (yy - ly) ** 2)
    s = rng.uniform(0.08, 0.16)
    light = 1.0 - 0.8 * np.exp(-(d_lumen**2) / (2 * s * s))
    light *= 1.0 + 0.06 * np.sin(2 * np.pi * d_lumen / rng.uniform(0.08, 0.14) + 2.5 * hue + 1.5 * tex)
    light *= 1.0 - style.vignette * ((xx - cx_frame) ** 2 + (yy - cy_frame) ** 2) / (cx_frame**2 + cy_frame**2)

    # polyp: wavy rotated ellipse, Lambert-shaded dome
    a = max(rng.uniform(*style.semi_axis), 3.0 / w)
    b = max(a * rng.uniform(0.6, 1.0), 3.0 / w)
    px = rng.uniform(0.15 + a, 0.85 - a) if a < 0.35 else 0.5
    py = rng.uniform(0.15 * h / w + a, (0.85 * h / w) - a) if 2 * a < 0.7 * h / w else cy_frame
    theta = rng.uniform(0.0, np.pi)
    u = (xx - px) * np.cos(theta) + (yy - py) * np.sin(theta)
    v = -(xx - px) * np.sin(theta) + (yy - py) * np.cos(theta)
    phi = np.arctan2(v / b, u / a)
    wobble = 1.0 + sum(rng.uniform(0.0, 0.07) * np.cos(k * phi + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    rho = np.sqrt((u / a) ** 2 + (v / b) ** 2) / wobble
    mask = rho < 1.0
    height = rng.uniform(*style.height) * np.sqrt(np.clip(1.0 - rho**2, 0.0, None))
    gy, gx = np.gradient(height * a * w)  # dome height in pixels, so the normals do not depend on the size
    light_dir = np.array([rng.uniform(-0.4, 0.4), rng.uniform(-0.4, 0.4), 1.0], np.float32)
    light_dir /= np.linalg.norm(light_dir)
    shading = (-gx * light_dir[0] - gy * light_dir[1] + light_dir[2]) / np.sqrt(gx**2 + gy**2 + 1.0)
    tint = np.array([rng.uniform(1.0, 1.12), rng.uniform(0.8, 1.1), rng.uniform(0.85, 1.15)], np.float32)
    tint = 1.0 + style.tint * (tint - 1.0)
    polyp_tex = 1.0 + 0.08 * _value_noise(rng, h, w, (24, 48))[..., None]
    polyp_rgb = rgb * tint * polyp_tex * (0.75 + 0.35 * shading[..., None])
    alpha = _smoothstep((1.0 - rho) / rng.uniform(0.08, 0.2))[..., None]
    rim = np.exp(-(((rho - 1.05) / 0.06) ** 2)) * (rho > 1.0)
    rgb = (rgb * (1.0 - 0.25 * rim[..., None])) * (1.0 - alpha) + polyp_rgb * alpha

    # specular highlights: scattered on the mucosa, one on the dome
    spots = np.clip((_value_noise(rng, h, w, (24, 48)) - rng.uniform(2.4, 3.0)) * 3.0, 0.0, 1.0)
    hx, hy = px + 0.4 * a * light_dir[0], py + 0.4 * b * light_dir[1]
    r_spot = rng.uniform(0.12, 0.3) * b
    dome_spot = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * r_spot * r_spot)) * (rng.uniform() < 0.7)
    specular = np.clip(spots * light + 0.9 * np.clip(dome_spot * 1.6 - 0.5, 0.0, 1.0) * mask, 0.0, 1.0)

    rgb = rgb * (light * style.gain)[..., None] * np.array(style.light, np.float32)
    rgb = rgb + specular[..., None] * (1.0 - rgb)
    rgb += rng.normal(0.0, 0.012, rgb.shape).astype(np.float32)
    rgb = np.clip(rgb, 0.0, 1.0) ** (1.0 / 1.1)

    if rng.uniform() < 0.5:  # black corners of the endoscope's field of view
        corner = rng.uniform(0.12, 0.22)
        border = np.minimum.reduce([xx, 1.0 - xx, yy, h / w - yy])
        octagon = np.minimum(xx, 1.0 - xx) + np.minimum(yy, h / w - yy)
        fov = _smoothstep(np.minimum((octagon - corner) * w / 2.0, border * w / 2.0))
        rgb *= fov[..., None]
        mask &= fov > 0.5
    return (rgb * 255.0 + 0.5).astype(np.uint8), mask.astype(np.uint8) * 255


def _write_set(folder: Path, rng: np.random.Generator, n: int, size: tuple[int, int], style: FrameStyle) -> list[str]:
    """Write ``n`` frames into ``folder/{images,masks}``; returns the written paths relative to ``folder``."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    written = []
    for i in range(n):
        rgb, mask = render_frame(rng, size[0], size[1], style)
        name = f"{i:04d}"
        Image.fromarray(rgb).save(folder / "images" / f"{name}.jpg", quality=JPEG_QUALITY)
        Image.fromarray(mask).save(folder / "masks" / f"{name}.png")
        written += [f"images/{name}.jpg", f"masks/{name}.png"]
    return written


def make_demo_polyp_dataset(
    root: str | os.PathLike,
    n_train: int = 24,
    n_test: Sequence[int] = (8, 8),
    size: Sequence[int] = (288, 384),
    seed: int = 0,
) -> Path:
    """Generate the synthetic polyp dataset at ``root`` (PraNet layout; module docstring), unless it is there.

    The whole dataset is written into a temporary sibling folder, the marker ``<root>/.complete`` (JSON with
    the parameters and the file list) last, and then moved into place with ``os.replace``, so an interrupted
    run leaves nothing half-written at ``root``. A second call with the same parameters finds the marker and
    every listed file and returns at once, rewriting nothing. A folder made by this generator with other
    parameters, or with files missing, is regenerated; an empty folder is filled. Any other existing folder is
    left alone (FileExistsError), so that a mistyped ``root`` never deletes real data.

    Deterministic: the same arguments give the same bytes (same numpy, Pillow and libjpeg).
    The default size takes about a second on one CPU core.

    Args:
        root: dataset folder to create.
        n_train: number of training frames (``TrainDataset``), at least 1.
        n_test: number of frames of the test sets ``SynthA`` and ``SynthB``; a set with 0 frames is not written.
        size: frame size ``(height, width)`` in pixels, each at least 32.
        seed: random seed.

    Returns:
        ``root`` as a Path.

    Raises:
        ValueError: bad counts or size.
        FileExistsError: ``root`` exists, is not empty and was not made by this generator.
    """
    n_test = tuple(int(n) for n in n_test)
    size = tuple(int(s) for s in size)
    if int(n_train) < 1 or len(n_test) != len(DEMO_TEST_SETS) or min(n_test) < 0:
        raise ValueError(
            f"n_train must be >= 1 and n_test {len(DEMO_TEST_SETS)} counts >= 0, "
            f"got n_train={n_train}, n_test={n_test}."
        )
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f"size must be (height, width) with both >= 32 pixels, got {size}.")
    params = {
        "generator": __name__,
        "version": GENERATOR_VERSION,
        "n_train": int(n_train),
        "n_test": list(n_test),
        "size": list(size),
        "seed": int(seed),
    }

    def write(tmp: Path) -> list[str]:
        files = []
        sets = [("TrainDataset", tmp / "TrainDataset", int(n_train))]
        sets += [(name, tmp / "TestDataset" / name, n) for name, n in zip(DEMO_TEST_SETS, n_test)]
        for index, (name, folder, n) in enumerate(sets):  # one random stream per set: (seed, set index)
            if n == 0:
                continue
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), index]))
            prefix = folder.relative_to(tmp).as_posix()
            files += [f"{prefix}/{f}" for f in _write_set(folder, rng, n, size, _STYLES[name])]
        return files

    return ensure_generated(root, params, write, "demo polyp dataset")


def ensure_demo_polyp_dataset(
    root: str | os.PathLike,
    n_train: int = 24,
    n_test: Sequence[int] = (8, 8),
    size: Sequence[int] = (288, 384),
    seed: int = 0,
) -> str:
    """:py:func:`make_demo_polyp_dataset` returning ``str(root)``, for config expressions such as
    ``"dataset_dir": "$common.data.demo_polyps.ensure_demo_polyp_dataset(@bundle_root + '/data/demo')"``.
    """
    return str(make_demo_polyp_dataset(root, n_train, n_test, size, seed))
