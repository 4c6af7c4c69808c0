"""Readers for polyp segmentation folders: PraNet, flat set-per-folder and Kvasir-SEG layouts.

The polyp bundles build their datalists from JSON configs, e.g.
``"train_datalist": "$common.data.polyp_folders.polyp_datalist(@dataset_dir, @train_sets)"``, so every
function here takes plain paths, set names and numbers, and returns plain lists of dicts
(``{"image": str, "label": str, "name": str, "set": str}``) ready for :py:class:`monai.data.Dataset`.

Layouts recognised under a root folder (they may be mixed; set names must be unique):

* **PraNet** (Fan et al., "PraNet: Parallel Reverse Attention Network for Polyp Segmentation", MICCAI 2020):
  ``<root>/TrainDataset/{images,masks}`` gives the set ``"TrainDataset"`` and
  ``<root>/TestDataset/<SetName>/{images,masks}`` one set per test folder (either part may be absent).
* **Flat root of sets** (as ``../shared/data/polyp``): ``<root>/<SetName>/{images,masks}``, one set per folder.
* **Kvasir-SEG** (Jha et al., MMM 2020): ``<root>/images`` + ``<root>/masks``, one set named after the root folder.

Images and masks are paired by base name (file stem), whatever their extensions. The checks are strict and
fail early with the offending file in the message: a training run should never die in epoch 7 on a mask
that was missing from the start.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_polyp_sets",
    "list_pairs",
    "check_pair",
    "polyp_datalist",
    "split_train_val",
    "resolve_roles",
    "require_role",
    "find_images",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
"""File extensions (compared case-insensitively) read as images or masks; other files are ignored."""

TRAIN_SET = "TrainDataset"
TEST_FOLDER = "TestDataset"
IMAGES, MASKS = "images", "masks"

_IMAGE_MODES = ("RGB",)
_MASK_MODES = ("L", "1", "P", "I", "I;16", "I;16L", "I;16B", "RGB")


def _is_set_dir(folder: Path) -> bool:
    """True when ``folder`` holds both ``images/`` and ``masks/``; ValueError when it holds only one of them."""
    has_images, has_masks = (folder / IMAGES).is_dir(), (folder / MASKS).is_dir()
    if has_images != has_masks:
        present, absent = (IMAGES, MASKS) if has_images else (MASKS, IMAGES)
        raise ValueError(f"polyp set folder {folder} has {present}/ but no {absent}/ beside it.")
    return has_images


def _child_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that are not hidden, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def find_polyp_sets(root: str | os.PathLike) -> dict[str, Path]:
    """Find the polyp sets under ``root``.

    Args:
        root: dataset folder in the PraNet, flat set-per-folder or Kvasir-SEG layout (module docstring).

    Returns:
        set name -> folder that holds ``images/`` and ``masks/``, sorted by set name.

    Raises:
        FileNotFoundError: ``root`` does not exist or is not a folder.
        ValueError: no set was found, two sets share a name, or a folder has ``images/`` without ``masks/``
            (or the reverse).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"polyp dataset folder {root} does not exist (or is not a folder).")
    found: dict[str, list[Path]] = {}
    if _is_set_dir(root):  # Kvasir-SEG: <root>/images + <root>/masks
        found.setdefault(root.resolve().name, []).append(root)
    for child in _child_dirs(root):  # flat sets, PraNet TrainDataset included
        if child.name in (IMAGES, MASKS):
            continue
        if _is_set_dir(child):
            found.setdefault(child.name, []).append(child)
    test_dir = root / TEST_FOLDER
    if test_dir.is_dir() and not _is_set_dir(test_dir):  # PraNet: <root>/TestDataset/<SetName>
        for child in _child_dirs(test_dir):
            if _is_set_dir(child):
                found.setdefault(child.name, []).append(child)
    if not found:
        raise ValueError(
            f"no polyp set found under {root}: looked for the PraNet layout (<root>/{TRAIN_SET}/{{images,masks}}, "
            f"<root>/{TEST_FOLDER}/<SetName>/{{images,masks}}), a flat root of sets "
            "(<root>/<SetName>/{images,masks}) "
            "and the Kvasir-SEG layout (<root>/images + <root>/masks)."
        )
    clashes = {name: dirs for name, dirs in found.items() if len(dirs) > 1}
    if clashes:
        detail = "; ".join(f"{name!r}: {', '.join(map(str, dirs))}" for name, dirs in clashes.items())
        raise ValueError(f"polyp dataset {root} has several sets with the same name: {detail}.")
    return {name: found[name][0] for name in sorted(found)}


def _images_by_stem(folder: Path) -> dict[str, Path]:
    """Image files of ``folder`` keyed by stem; ValueError when two files share a stem."""
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist.")
    by_stem: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            logger.debug("ignoring %s: not one of %s", path, IMAGE_EXTENSIONS)
            continue
        if path.stem in by_stem:
            raise ValueError(
                f"two files in {folder} share the base name {path.stem!r}: {by_stem[path.stem]} and {path}."
            )
        by_stem[path.stem] = path
    return by_stem


def _some(paths: Sequence[Path], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def list_pairs(set_dir: str | os.PathLike, set_name: str | None = None) -> list[dict[str, str]]:
    """Pair the images and masks of one set by base name.

    Args:
        set_dir: folder holding ``images/`` and ``masks/``; files with an extension in
            :py:data:`IMAGE_EXTENSIONS` (any case) are used, others are ignored.
        set_name: value of the ``"set"`` field; default: the folder's name.

    Returns:
        ``[{"image": str, "label": str, "name": stem, "set": set_name}, ...]`` sorted by name.

    Raises:
        FileNotFoundError: ``images/`` or ``masks/`` is missing.
        ValueError: ``images/`` holds no image, an image has no mask, a mask has no image, or two files of
            one folder share a base name; the message names the files.
    """
    set_dir = Path(set_dir).expanduser()
    set_name = set_name if set_name is not None else set_dir.resolve().name
    images_dir, masks_dir = set_dir / IMAGES, set_dir / MASKS
    images, masks = _images_by_stem(images_dir), _images_by_stem(masks_dir)
    if not images:
        raise ValueError(f"images folder {images_dir} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    no_mask = [images[s] for s in sorted(images.keys() - masks.keys())]
    if no_mask:
        raise ValueError(
            f"{len(no_mask)} image(s) have no mask with the same base name in {masks_dir}: {_some(no_mask)}."
        )
    no_image = [masks[s] for s in sorted(masks.keys() - images.keys())]
    if no_image:
        raise ValueError(
            f"{len(no_image)} mask(s) have no image with the same base name in {images_dir}: {_some(no_image)}."
        )
    return [
        {"image": str(images[stem]), "label": str(masks[stem]), "name": stem, "set": set_name}
        for stem in sorted(images)
    ]


def _open_header(path: Path, role: str) -> tuple[str, tuple[int, int]]:
    """``(mode, (width, height))`` of an image file, read from its header only."""
    if not path.is_file():
        raise FileNotFoundError(f"{role} file {path} does not exist.")
    try:
        with Image.open(path) as img:  # lazy: parses the header, decodes no pixels
            return img.mode, img.size
    except Exception as err:  # UnidentifiedImageError, SyntaxError, DecompressionBombError, ...
        raise ValueError(f"{role} file {path} cannot be read as an image: {type(err).__name__}: {err}") from err


def check_pair(image_path: str | os.PathLike, mask_path: str | os.PathLike) -> None:
    """Check an image/mask pair from the file headers (PIL ``Image.open``; no pixel is decoded, so it is fast).

    Rules:

    * the image is an RGB image with 3 channels (PIL mode ``"RGB"``). Every other mode is rejected, including
      grey ``"L"``, ``"LA"``, ``"RGBA"``, ``"CMYK"`` and palette ``"P"`` images: a palette image would load
      as one channel of palette indices, not as colours. JPEG colonoscopy frames are ``"RGB"``.
    * the mask has one channel (``"L"``, ``"1"``, ``"P"``, ``"I"``, ``"I;16"``) or is ``"RGB"``: public polyp
      masks are often RGB files with three equal channels (Kvasir-SEG ships its masks as RGB JPEGs).
      :py:class:`common.transforms.io.CheckPolypPaird` reduces such masks to grey after loading.
    * image and mask have the same size.

    A file whose header is fine but whose pixel data is cut short (a truncated JPEG) passes here; it is
    caught when the pixels are decoded, by :py:class:`common.transforms.io.LoadPolypImaged`.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a header cannot be parsed, a mode is not allowed, or the sizes differ; the message names
            the file(s).
    """
    image_path, mask_path = Path(image_path), Path(mask_path)
    image_mode, image_size = _open_header(image_path, "image")
    mask_mode, mask_size = _open_header(mask_path, "mask")
    if image_mode not in _IMAGE_MODES:
        raise ValueError(f"image {image_path} has PIL mode {image_mode!r}; expected an RGB image with 3 channels.")
    if mask_mode not in _MASK_MODES:
        raise ValueError(
            f"mask {mask_path} has PIL mode {mask_mode!r}; expected a single-channel mask "
            f"({', '.join(m for m in _MASK_MODES if m != 'RGB')}) or an RGB mask with three equal channels."
        )
    if image_size != mask_size:
        raise ValueError(
            f"image {image_path} is {image_size[0]}x{image_size[1]} (width x height) but its mask {mask_path} is "
            f"{mask_size[0]}x{mask_size[1]}; they must have the same size."
        )


def _as_names(sets: Sequence[str] | str | None, argument: str) -> list[str] | None:
    if sets is None:
        return None
    names = [sets] if isinstance(sets, str) else list(sets)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"{argument} names the set(s) {duplicates} more than once: {names}.")
    return names


def polyp_datalist(
    root: str | os.PathLike, sets: Sequence[str] | str | None = None, check: bool = True
) -> list[dict[str, str]]:
    """Image/mask pairs of the named sets under ``root``.

    Args:
        root: dataset folder (see :py:func:`find_polyp_sets`).
        sets: a set name, a list of set names, or None for all sets.
        check: run :py:func:`check_pair` on every pair (header reads only; ~0.1 ms a pair).

    Returns:
        pairs of the sets in the order given, each set sorted by name (see :py:func:`list_pairs`).

    Raises:
        ValueError: a set name is unknown (the message lists the available sets), a name is repeated,
            the result is empty, or pairs fail :py:func:`check_pair` (all failures are listed).
    """
    available = find_polyp_sets(root)
    names = _as_names(sets, "sets")
    names = list(available) if names is None else names
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"polyp set(s) {unknown} not found under {root}; available sets: {list(available)}.")
    pairs = [pair for name in names for pair in list_pairs(available[name], set_name=name)]
    if not pairs:
        raise ValueError(f"no image/mask pair in the sets {names} of {root}.")
    if check:
        errors = []
        for pair in pairs:
            try:
                check_pair(pair["image"], pair["label"])
            except (ValueError, FileNotFoundError) as err:
                errors.append(str(err))
        if errors:
            raise ValueError(f"{len(errors)} bad image/mask pair(s) under {root}:\n" + "\n".join(errors))
    return pairs


def split_train_val(
    pairs: Sequence[dict], val_fraction: float, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Split pairs into training and validation parts, deterministically.

    The pairs are sorted by ``(set, name)``, permuted with ``numpy.random.default_rng(seed)``, and the first
    ``n_val`` of the permutation go to validation, where ``n_val = floor(n * val_fraction + 0.5)``
    (rounding half up), raised to 1 when ``val_fraction > 0`` and ``n >= 2``, and capped at ``n - 1`` so that
    training keeps at least one pair. Both parts come back sorted by ``(set, name)``.

    Args:
        pairs: datalist entries with ``"set"`` and ``"name"`` keys.
        val_fraction: fraction in ``[0, 1)``; 0 returns ``(pairs, [])``.
        seed: seed of the permutation.

    Raises:
        ValueError: ``val_fraction`` outside ``[0, 1)``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    ordered = sorted(pairs, key=lambda p: (p["set"], p["name"]))
    n = len(ordered)
    if val_fraction == 0.0 or n == 0:
        return ordered, []
    n_val = math.floor(n * val_fraction + 0.5)
    n_val = min(max(n_val, 1 if n >= 2 else 0), n - 1)
    val_idx = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    train = [p for i, p in enumerate(ordered) if i not in val_idx]
    val = [p for i, p in enumerate(ordered) if i in val_idx]
    return train, val


def resolve_roles(
    root: str | os.PathLike,
    train_sets: Sequence[str] | str | None = None,
    val_sets: Sequence[str] | str | None = None,
    test_sets: Sequence[str] | str | None = None,
    val_fraction: float = 0.2,
    seed: int = 0,
    check: bool = True,
) -> dict[str, list[dict[str, str]]]:
    """Assign the sets under ``root`` to training, validation and testing.

    Defaults:

    * ``train_sets=None``: ``["TrainDataset"]`` (PraNet layout), or the only set when ``root`` holds exactly
      one (Kvasir-SEG layout); otherwise ValueError asking to name the training sets.
    * ``val_sets=None``: ``val_fraction`` of the training pairs are split off as validation
      (:py:func:`split_train_val` with ``seed``); with named ``val_sets`` all training pairs are kept.
    * ``test_sets=None``: every set used neither for training nor for validation (possibly none).

    Args:
        root: dataset folder (see :py:func:`find_polyp_sets`).
        train_sets, val_sets, test_sets: a set name, a list of set names, or None for the default above;
            an empty list gives an empty role.
        val_fraction: fraction of the training pairs split off when ``val_sets`` is None, in ``[0, 1)``.
        seed: seed of that split.
        check: run :py:func:`check_pair` on every pair.

    Returns:
        ``{"train": [...], "val": [...], "test": [...]}`` datalists (see :py:func:`polyp_datalist`).

    Raises:
        ValueError: no default training set, a set named in two roles, an unknown set, or bad pairs.
    """
    available = find_polyp_sets(root)
    train_names = _as_names(train_sets, "train_sets")
    if train_names is None:
        if TRAIN_SET in available:
            train_names = [TRAIN_SET]
        elif len(available) == 1:
            train_names = list(available)
        else:
            raise ValueError(
                f"{root} has no {TRAIN_SET!r} set; name the training sets with train_sets, "
                f"chosen from the available sets {list(available)}."
            )
    val_names = _as_names(val_sets, "val_sets")
    test_names = _as_names(test_sets, "test_sets")
    roles = {"train_sets": train_names, "val_sets": val_names or [], "test_sets": test_names or []}
    seen: dict[str, str] = {}
    for role, names in roles.items():
        for name in names:
            if name in seen:
                raise ValueError(f"set {name!r} is named in both {seen[name]} and {role}; a set has one role.")
            seen[name] = role
    train = polyp_datalist(root, train_names, check=check)
    if val_names is None:
        train, val = split_train_val(train, val_fraction, seed)
    else:
        val = polyp_datalist(root, val_names, check=check) if val_names else []
    if test_names is None:
        test_names = [name for name in available if name not in seen]
    test = polyp_datalist(root, test_names, check=check) if test_names else []
    return {"train": train, "val": val, "test": test}


def require_role(roles: dict[str, list[dict[str, str]]], role: str, root: str | os.PathLike) -> list[dict[str, str]]:
    """The datalist of ``role`` from :py:func:`resolve_roles`, or a ValueError saying how to get one.

    Used by configs where an empty role would otherwise fail deep inside a data loader (no validation pairs
    with ``val_fraction=0``, no test set left over after training).
    """
    pairs = roles.get(role, [])
    if not pairs:
        hint = {"val": "set val_fraction > 0 or name val_sets", "test": "name test_sets, or keep a set out of train_sets"}
        raise ValueError(f"no {role} images under {root} (sets: {sorted(find_polyp_sets(root))}): "
                         f"{hint.get(role, 'check the set names')}")
    return pairs


def find_images(folder: str | os.PathLike) -> list[str]:
    """Image files to predict on: ``folder/images/*`` when that exists, else the images directly in ``folder``,
    else every ``**/images/*`` below it (a PraNet ``TestDataset``). Sorted; ValueError naming ``folder`` when none.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    is_image = lambda p: p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS  # noqa: E731
    for candidates in (lambda: (folder / IMAGES).glob("*"), lambda: folder.glob("*"),
                       lambda: folder.glob(f"**/{IMAGES}/*")):
        images = sorted(str(p) for p in candidates() if is_image(p))
        if images:
            return images
    raise ValueError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {folder}, {folder / IMAGES} or below it")
