"""Reader for image-classification folders: ``images/`` + ``labels.csv`` (+ optional split CSVs).

The classification bundles (first: Sparsam, specs/sparsam.md §2) read one folder layout (DESIGN.md, "Data layouts")::

    <dataset_dir>/images/<id>.<ext>     one image per id; <ext> in IMAGE_EXTENSIONS, any case
    <dataset_dir>/labels.csv            columns id,class_id,class_name (further columns are ignored)
    <dataset_dir>/splits/train.csv      optional: column id, the labelled training images
    <dataset_dir>/splits/test.csv       optional: column id, the labelled test images

Rules:

* ``id`` is the image's file name without extension, read as text: ``"001"`` stays ``"001"``.
* ``class_id`` is an integer and ``class_name`` its name; one name per class id and one class id per name.
  The class *index* (the ``"label"`` of a datalist entry, ``0..C-1``) is the rank of ``class_id`` among the sorted
  class ids of the classes kept (after :py:func:`filter_min_class_size`).
* Images in ``images/`` without a ``labels.csv`` row are **unlabelled**; they are used for self-supervised
  pre-training only (role ``"ssl"``).
* Splits: with both split files, train and test are as listed (labelled images in neither are unused); with one
  file, the other split is every other labelled image; with none, :py:func:`split_train_test` makes a stratified,
  seeded split. Test images are never used for self-supervision (spec §2.4).

:py:func:`classification_datalist` turns this into MONAI datalists of ``{"image": path, "label": index, "id": id}``.
Errors are raised early, naming the file, line, id or class at fault, and saying what to change.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common.data.polyp_folders import IMAGE_EXTENSIONS  # read as images, case-insensitively; others ignored

__all__ = [
    "IMAGE_EXTENSIONS",
    "LABEL_COLUMNS",
    "ROLES",
    "ClassifiedImage",
    "list_images",
    "read_labels",
    "unlabeled_images",
    "class_index",
    "class_names",
    "filter_min_class_size",
    "split_train_test",
    "read_split_ids",
    "dataset_splits",
    "check_images",
    "classification_datalist",
]

logger = logging.getLogger(__name__)


LABEL_COLUMNS: tuple[str, ...] = ("id", "class_id", "class_name")
"""Columns ``labels.csv`` must have."""

ROLES: tuple[str, ...] = ("ssl", "train", "test")
"""Datalist roles of :py:func:`classification_datalist`."""

IMAGES, LABELS, SPLITS = "images", "labels.csv", "splits"
UNLABELED = -1
"""``"label"`` of an unlabelled image in the ``"ssl"`` datalist."""


@dataclass(frozen=True)
class ClassifiedImage:
    """One labelled image: its id (file stem), file path, integer class id and class name."""

    id: str
    path: str
    class_id: int
    class_name: str


def _some(values: Sequence[object], limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def _dataset_dir(dataset_dir: str | os.PathLike) -> Path:
    root = Path(dataset_dir).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"classification dataset folder {root} does not exist (or is not a folder).")
    return root


def list_images(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """Image files of ``<dataset_dir>/images``, keyed by id (file stem), sorted by id.

    Raises:
        FileNotFoundError: ``dataset_dir`` or its ``images/`` folder does not exist.
        ValueError: ``images/`` holds no image, or two files share an id (``a.png`` and ``a.jpg``).
    """
    folder = _dataset_dir(dataset_dir) / IMAGES
    if not folder.is_dir():
        raise FileNotFoundError(
            f"classification dataset {folder.parent} has no {IMAGES}/ folder; expected {IMAGES}/<id>.<ext> "
            f"and {LABELS} (id,class_id,class_name)."
        )
    by_id: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if path.stem in by_id:
            raise ValueError(
                f"two files in {folder} share the id {path.stem!r}: {by_id[path.stem].name} and {path.name}."
            )
        by_id[path.stem] = path
    if not by_id:
        raise ValueError(f"{folder} holds no image ({', '.join(IMAGE_EXTENSIONS)}): the dataset is empty.")
    return dict(sorted(by_id.items()))


def _read_csv(path: Path, columns: Sequence[str]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a CSV file as ``(line number, {column: stripped text})``; ValueError when a column is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [(name or "").strip() for name in reader.fieldnames or []]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(
                f"{path} is missing the column(s) {missing}; its header is {header}, expected {','.join(columns)}."
            )
        reader.fieldnames = header
        rows = []
        for row in reader:
            rows.append((reader.line_num, {k: (v or "").strip() for k, v in row.items() if k is not None}))
    return rows


def read_labels(dataset_dir: str | os.PathLike) -> list[ClassifiedImage]:
    """The labelled images of a dataset: the rows of ``labels.csv`` joined with ``images/``, sorted by id.

    Raises:
        FileNotFoundError: ``dataset_dir``, ``images/`` or ``labels.csv`` does not exist.
        ValueError: a column is missing; ``labels.csv`` has no row; a row has an empty id or class name, a
            ``class_id`` that is not an integer, or an id that is repeated or has no image in ``images/``; a
            ``class_id`` has two names or a name two class ids. The message names the file, line and value.
    """
    root = _dataset_dir(dataset_dir)
    images = list_images(root)
    labels_csv = root / LABELS
    if not labels_csv.is_file():
        raise FileNotFoundError(f"classification dataset {root} has no {LABELS} (columns {','.join(LABEL_COLUMNS)}).")
    rows = _read_csv(labels_csv, LABEL_COLUMNS)
    if not rows:
        raise ValueError(f"{labels_csv} has a header but no row: the dataset has no labelled image.")
    items: dict[str, ClassifiedImage] = {}
    line_of: dict[str, int] = {}
    name_of: dict[int, tuple[str, int]] = {}
    id_of: dict[str, tuple[int, int]] = {}
    no_image: list[str] = []
    for line, row in rows:
        image_id, raw_class, name = row["id"], row["class_id"], row["class_name"]
        where = f"{labels_csv} line {line}"
        if not image_id:
            raise ValueError(f"{where}: empty id.")
        if image_id in items:
            raise ValueError(f"{where}: id {image_id!r} is listed again (first on line {line_of[image_id]}).")
        try:
            class_id = int(raw_class)
        except ValueError:
            raise ValueError(f"{where}: class_id {raw_class!r} of id {image_id!r} is not an integer.") from None
        if not name:
            raise ValueError(f"{where}: empty class_name for class_id {class_id}.")
        if name_of.setdefault(class_id, (name, line))[0] != name:
            first, first_line = name_of[class_id]
            raise ValueError(
                f"{where}: class_id {class_id} is named {name!r}, but {first!r} on line {first_line}; "
                "a class_id has one name."
            )
        if id_of.setdefault(name, (class_id, line))[0] != class_id:
            first_id, first_line = id_of[name]
            raise ValueError(
                f"{where}: class_name {name!r} has class_id {class_id}, but {first_id} on line {first_line}; "
                "a class name has one class_id."
            )
        if image_id not in images:
            no_image.append(f"{image_id!r} (line {line})")
            continue
        items[image_id] = ClassifiedImage(image_id, str(images[image_id]), class_id, name)
        line_of[image_id] = line
    if no_image:
        raise ValueError(
            f"{len(no_image)} id(s) of {labels_csv} have no image <id>.<ext> in {root / IMAGES}: {_some(no_image)}."
        )
    return [items[i] for i in sorted(items)]


def unlabeled_images(dataset_dir: str | os.PathLike) -> dict[str, Path]:
    """Images of ``images/`` without a row in ``labels.csv`` (id -> path, sorted by id); see :py:func:`read_labels`."""
    labelled = {item.id for item in read_labels(dataset_dir)}
    return {i: p for i, p in list_images(dataset_dir).items() if i not in labelled}


def _class_ids(items: Iterable[ClassifiedImage]) -> list[int]:
    return sorted({item.class_id for item in items})


def class_index(items: Iterable[ClassifiedImage]) -> dict[int, int]:
    """``class_id -> class index`` (0..C-1, in sorted ``class_id`` order) of the classes present in ``items``."""
    return {class_id: index for index, class_id in enumerate(_class_ids(items))}


def class_names(items: Iterable[ClassifiedImage]) -> list[str]:
    """Class names in class-index order (sorted ``class_id``) of the classes present in ``items``."""
    names = {item.class_id: item.class_name for item in items}
    return [names[class_id] for class_id in sorted(names)]


def _describe_classes(counts: Counter, names: dict[int, str]) -> str:
    return ", ".join(f"{names[c]!r} (class_id {c}): {counts[c]}" for c in sorted(counts))


def filter_min_class_size(
    items: Sequence[ClassifiedImage], min_class_size: int, counted: Sequence[ClassifiedImage] | None = None
) -> list[ClassifiedImage]:
    """Keep the images of the classes with at least ``min_class_size`` images, logging the classes dropped.

    Args:
        items: labelled images.
        min_class_size: minimum number of images of a kept class; 1 keeps every class of ``items`` (even one
            absent from ``counted``).
        counted: the images whose per-class counts decide (default: ``items``). The "250+" experiments of
            spec §2.1 count the *training* images and apply the same class filter to the test images.

    Raises:
        ValueError: ``min_class_size < 1``, or no class is left (the message lists the class sizes).
    """
    if isinstance(min_class_size, bool) or not isinstance(min_class_size, int) or min_class_size < 1:
        raise ValueError(f"min_class_size must be an integer >= 1, got {min_class_size!r}.")
    if min_class_size == 1:
        return list(items)
    counted = items if counted is None else counted
    counts = Counter(item.class_id for item in counted)
    names = {item.class_id: item.class_name for item in [*counted, *items]}
    kept = {c for c, n in counts.items() if n >= min_class_size}
    dropped = Counter({c: counts.get(c, 0) for c in {item.class_id for item in items} - kept})
    if dropped:
        logger.info(
            "min_class_size=%d drops %d class(es): %s", min_class_size, len(dropped), _describe_classes(dropped, names)
        )
    result = [item for item in items if item.class_id in kept]
    if items and not result:
        raise ValueError(
            f"min_class_size={min_class_size} leaves no class; class sizes: {_describe_classes(counts, names)}."
        )
    return result


def split_train_test(
    items: Sequence[ClassifiedImage], test_fraction: float = 0.3, seed: int = 0, min_class_size: int = 1
) -> tuple[list[ClassifiedImage], list[ClassifiedImage]]:
    """Stratified, seeded train/test split of labelled images.

    Classes with fewer than ``min_class_size`` images are dropped first (:py:func:`filter_min_class_size`). Then,
    with one ``numpy.random.default_rng(seed)`` drawn in class-id order, each class's images (sorted by id) are
    permuted and the first ``n_test`` go to test, where ``n_test = floor(n * test_fraction + 0.5)`` clipped to
    ``[1, n - 1]``: every class has at least one image on each side.

    Args:
        items: labelled images.
        test_fraction: fraction of each class for testing, in ``(0, 1)``.
        seed: seed of the permutations.
        min_class_size: drop classes with fewer images (default 1: keep all).

    Returns:
        ``(train, test)``, each sorted by id.

    Raises:
        ValueError: ``test_fraction`` outside ``(0, 1)``; no image; a kept class has a single image (the message
            names it and says to pass ``min_class_size=2`` to drop such classes).
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    if not items:
        raise ValueError("split_train_test got no labelled image: the dataset is empty.")
    items = filter_min_class_size(items, min_class_size)
    by_class: dict[int, list[ClassifiedImage]] = {}
    for item in sorted(items, key=lambda it: it.id):
        by_class.setdefault(item.class_id, []).append(item)
    single = [members[0] for members in by_class.values() if len(members) < 2]
    if single:
        detail = ", ".join(f"{it.class_name!r} (class_id {it.class_id}, image {it.id!r})" for it in single)
        raise ValueError(
            f"a stratified train/test split needs at least 2 images per class, but {len(single)} class(es) have 1: "
            f"{detail}. Pass min_class_size=2 to drop such classes, or provide {SPLITS}/train.csv and "
            f"{SPLITS}/test.csv."
        )
    rng = np.random.default_rng(seed)
    train: list[ClassifiedImage] = []
    test: list[ClassifiedImage] = []
    for class_id in sorted(by_class):
        members = by_class[class_id]
        n = len(members)
        n_test = min(max(math.floor(n * test_fraction + 0.5), 1), n - 1)
        order = rng.permutation(n)
        test += [members[i] for i in order[:n_test]]
        train += [members[i] for i in order[n_test:]]
    return sorted(train, key=lambda it: it.id), sorted(test, key=lambda it: it.id)


def read_split_ids(csv_path: str | os.PathLike) -> list[str]:
    """Ids listed in a split CSV (column ``id``; further columns ignored), in file order.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: no ``id`` column, an empty id, or an id listed twice (the message names the lines).
    """
    path = Path(csv_path)
    seen: dict[str, int] = {}
    for line, row in _read_csv(path, ("id",)):
        image_id = row["id"]
        if not image_id:
            raise ValueError(f"{path} line {line}: empty id.")
        if image_id in seen:
            raise ValueError(f"{path} line {line}: id {image_id!r} is listed again (first on line {seen[image_id]}).")
        seen[image_id] = line
    return list(seen)


def _split_items(
    path: Path, labelled: dict[str, ClassifiedImage], images: dict[str, Path]
) -> list[ClassifiedImage]:
    ids = read_split_ids(path)
    for image_id in ids:
        if image_id not in labelled:
            problem = "has no row in labels.csv (it is unlabelled)" if image_id in images else "has no image in images/"
            raise ValueError(f"{path} names the id {image_id!r}, which {problem}; split files list labelled ids only.")
    return sorted((labelled[i] for i in ids), key=lambda it: it.id)


def dataset_splits(
    dataset_dir: str | os.PathLike, test_fraction: float = 0.3, seed: int = 0, min_class_size: int = 1
) -> dict[str, list[ClassifiedImage]]:
    """Labelled train and test images of a dataset (split rules in the module docstring).

    ``min_class_size`` keeps the classes with at least that many labelled images: counted over all labelled
    images before a generated split, over the training images of given split files (spec §2.1, "250+"); the test
    images are filtered to the same classes (so with ``min_class_size > 1`` a class without training images is
    dropped from test too).

    Returns:
        ``{"train": [...], "test": [...]}``, each sorted by id.

    Raises:
        FileNotFoundError / ValueError: from :py:func:`read_labels`, :py:func:`read_split_ids`,
            :py:func:`split_train_test`; also a split file naming an id that is unlabelled or has no image, or
            an id in both split files.
    """
    root = _dataset_dir(dataset_dir)
    items = read_labels(root)
    train_csv, test_csv = root / SPLITS / "train.csv", root / SPLITS / "test.csv"
    if not (train_csv.is_file() or test_csv.is_file()):
        train, test = split_train_test(items, test_fraction, seed, min_class_size)
        return {"train": train, "test": test}
    labelled, images = {item.id: item for item in items}, list_images(root)
    train = _split_items(train_csv, labelled, images) if train_csv.is_file() else None
    test = _split_items(test_csv, labelled, images) if test_csv.is_file() else None
    if train is None:
        taken = {item.id for item in test}
        train = [item for item in items if item.id not in taken]
    elif test is None:
        taken = {item.id for item in train}
        test = [item for item in items if item.id not in taken]
    both = sorted({item.id for item in train} & {item.id for item in test})
    if both:
        raise ValueError(f"{len(both)} id(s) are in both {train_csv} and {test_csv}: {_some(both)}.")
    unused = len(items) - len(train) - len(test)
    if unused:
        logger.info("%d labelled image(s) of %s are in neither split file and are not used.", unused, root)
    if not train:
        raise ValueError(f"the training split of {root} is empty ({train_csv}).")
    train_kept = filter_min_class_size(train, min_class_size)
    test_kept = filter_min_class_size(test, min_class_size, counted=train) if test else []
    return {"train": train_kept, "test": test_kept}


def _channels(mode: str) -> int:
    """Channels an image of PIL ``mode`` has after loading; palette images ("P") hold RGB colours."""
    return 3 if mode == "P" else Image.getmodebands(mode)


def check_images(paths: Iterable[str | os.PathLike], decode: bool = True) -> dict[str, int]:
    """Check that every image can be read and that all have the same number of channels.

    Args:
        paths: image files.
        decode: decode all pixels (catches truncated files; ~1 ms for a small PNG), not only the header.

    Returns:
        PIL mode -> number of images, e.g. ``{"RGB": 300}``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: no path; a file that cannot be read or decoded (named); images of different channel counts
            (PIL modes "L" and "RGB", say): the message names the first image, in the given order, whose channel
            count differs from that of the most common mode, and that mode.
    """
    modes: list[tuple[Path, str]] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist.")
        try:
            with Image.open(path) as img:
                if decode:
                    img.load()
                modes.append((path, img.mode))
        except Exception as err:  # UnidentifiedImageError, OSError("image file is truncated"), ...
            raise ValueError(f"image file {path} is corrupt or not an image: {type(err).__name__}: {err}") from err
    if not modes:
        raise ValueError("check_images got no image file.")
    counts = Counter(mode for _, mode in modes)
    majority = counts.most_common(1)[0][0]
    odd = next(((p, m) for p, m in modes if _channels(m) != _channels(majority)), None)
    if odd is not None:
        raise ValueError(
            f"images have mixed channel counts: {odd[0]} has PIL mode {odd[1]!r} ({_channels(odd[1])} channel(s)) "
            f"but most images are {majority!r} ({_channels(majority)} channel(s)); mode counts: {dict(counts)}."
        )
    return dict(counts)


def _entries(items: Iterable[ClassifiedImage], index: dict[int, int]) -> list[dict]:
    return [{"image": item.path, "label": index[item.class_id], "id": item.id} for item in items]


def classification_datalist(
    dataset_dir: str | os.PathLike,
    role: str,
    test_fraction: float = 0.3,
    seed: int = 0,
    min_class_size: int = 1,
    duplicate_labeled_bug: bool = False,
    check: bool = True,
) -> list[dict]:
    """MONAI datalist of one role: ``[{"image": path, "label": class index, "id": id}, ...]``.

    Roles:

    * ``"train"`` / ``"test"``: the labelled images of :py:func:`dataset_splits`, sorted by id.
    * ``"ssl"``: the images for self-supervised pre-training: the labelled training images and the unlabelled
      images (``"label"`` = -1), sorted by id; never a test image (spec §2.4). Classes dropped by
      ``min_class_size`` are not used. With ``duplicate_labeled_bug=True`` it reproduces the reference code
      (reproduce_results.py): when unlabelled images exist they are *not* used and the labelled training images
      appear twice instead (the labelled csv is read a second time); without unlabelled images nothing changes.

    The class index is the same in every role: the rank of ``class_id`` among the sorted class ids of train ∪ test.

    Args:
        dataset_dir: dataset folder (module docstring).
        role: one of :py:data:`ROLES`.
        test_fraction, seed: the generated split when the dataset has no split files (:py:func:`split_train_test`).
        min_class_size: keep classes with at least this many labelled images (:py:func:`dataset_splits`).
        duplicate_labeled_bug: reproduce the reference code's choice of SSL images (above).
        check: run :py:func:`check_images` (full decode) on the role's images.

    Raises:
        ValueError: unknown role, and every error of :py:func:`dataset_splits` and :py:func:`check_images`.
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}.")
    splits = dataset_splits(dataset_dir, test_fraction, seed, min_class_size)
    index = class_index([*splits["train"], *splits["test"]])
    if role == "ssl":
        labelled = _entries(splits["train"], index)
        unlabelled = [
            {"image": str(path), "label": UNLABELED, "id": image_id}
            for image_id, path in unlabeled_images(dataset_dir).items()
        ]
        if duplicate_labeled_bug and unlabelled:
            logger.warning("duplicate_labeled_bug: %d unlabelled image(s) unused, labelled training images twice "
                           "(reference code behaviour).", len(unlabelled))
            entries = labelled + labelled
        else:
            entries = sorted(labelled + unlabelled, key=lambda e: e["id"])
    else:
        entries = _entries(splits[role], index)
    if not entries:
        raise ValueError(f"the {role!r} datalist of {dataset_dir} is empty.")
    if check:
        check_images(dict.fromkeys(e["image"] for e in entries))
    return entries
