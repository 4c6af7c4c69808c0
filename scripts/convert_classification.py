"""Convert public image-classification datasets into the collection's ``images/`` + ``labels.csv`` layout.

Usage::

    python scripts/convert_classification.py matek --src BM_cytomorphology_data --out data/bone_marrow
    python scripts/convert_classification.py hyperkvasir --src hyper-kvasir/labeled-images --out data/endo \\
        [--unlabeled hyper-kvasir/unlabeled-images/images] [--splits sparsam/splits/endo]
    python scripts/convert_classification.py isic2019 --src ISIC_2019_Training_Input --out data/isic \\
        [--ground_truth ISIC_2019_Training_GroundTruth.csv] [--splits sparsam/splits/isic]
    (add --symlink to link the images instead of copying them)

Input layouts (the datasets of Sparsam, specs/sparsam.md §2.1):

* ``matek`` — bone-marrow cytology (Matek et al., Blood 2021; TCIA ``BM_cytomorphology_data``): one folder per
  class abbreviation (``ART``, ``BAS``, ...), images anywhere below it (``ART/0001-1000/ART_00001.jpg``).
* ``hyperkvasir`` — HyperKvasir labelled images (Borgli et al., Sci. Data 2020):
  ``labeled-images/<region>/<category>/<finding>/*.jpg``; the class is the finding folder (``polyps``, ``z-line``,
  ...). ``--src`` may be ``labeled-images`` or the folder holding it.
* ``isic2019`` — ISIC 2019 training set: ``ISIC_2019_Training_Input/*.jpg`` and
  ``ISIC_2019_Training_GroundTruth.csv`` (``image`` + one-hot columns ``MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK``; found
  in ``--src`` or beside it unless given). ``UNK`` is not a class: the column is ignored, and a row marked ``UNK``
  is refused.

Output (read by :py:mod:`common.data.classification_folders`)::

    <out>/images/<id>.<ext>     id = the source file name without extension (must be unique)
    <out>/labels.csv            id,class_id,class_name; class_id = 0..C-1 in sorted class-name order
                                (ISIC: the ground-truth column order)
    <out>/splits/train.csv      with --splits: column id, from the Sparsam labeled_train.csv
    <out>/splits/test.csv       with --splits: column id, from the Sparsam test.csv

``--unlabeled`` adds the images of a folder (searched recursively) to ``images/`` without a label: they are used
for self-supervision only. ``--splits`` is a folder with Sparsam's split files (columns ``,image,label``;
``image`` a relative path whose file name identifies the image, ``label`` its class name, checked against the
source); ``unlabeled_train.csv`` there is not read (pass the images with ``--unlabeled``).

The conversion is atomic: everything is written to a hidden temporary folder beside ``<out>``, which is renamed to
``<out>`` at the end (and removed on failure). ``<out>`` must not exist or be an empty folder.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import fire

from common.data.classification_folders import IMAGE_EXTENSIONS
from common.utils.files import staged_folder, write_csv

logger = logging.getLogger("convert_classification")

ISIC_UNKNOWN = "UNK"
SPARSAM_SPLITS = {"train": "labeled_train.csv", "test": "test.csv"}


@dataclass(frozen=True)
class Source:
    """One image to convert: its file, its id, and its class name (None: unlabelled)."""

    path: Path
    id: str
    class_name: str | None


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _folder(path: str | os.PathLike, what: str) -> Path:
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist (or is not a folder).")
    return folder


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*")
                  if _is_image(p) and not any(q.startswith(".") for q in p.relative_to(folder).parts))


def _unlabeled_sources(folder: str | os.PathLike | None) -> list[Source]:
    if folder is None:
        return []
    root = _folder(folder, "unlabelled image")
    images = _images_below(root)
    if not images:
        raise ValueError(f"unlabelled image folder {root} holds no image ({', '.join(IMAGE_EXTENSIONS)}).")
    return [Source(p, p.stem, None) for p in images]


def _check_out(out: str | os.PathLike) -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} exists and is not empty; refusing to write into it.")
    return out


def _check_ids(sources: Sequence[Source]) -> None:
    first: dict[str, Path] = {}
    for source in sources:
        if source.id in first:
            raise ValueError(
                f"two source images have the id (file name without extension) {source.id!r}: "
                f"{first[source.id]} and {source.path}; ids must be unique."
            )
        first[source.id] = source.path


def read_sparsam_splits(splits: str | os.PathLike, sources: Sequence[Source]) -> dict[str, list[str]]:
    """Ids of Sparsam's split files (``labeled_train.csv`` -> ``"train"``, ``test.csv`` -> ``"test"``).

    Each row's ``image`` is matched to a labelled source by file name without extension and its ``label`` must
    equal that source's class name.

    Raises:
        FileNotFoundError: ``splits`` is not a folder, or has neither file.
        ValueError: a file without ``image``/``label`` columns; a row whose image is not among the labelled
            source images, whose label differs from the source's class, or that repeats an image; an image in both
            files. The message names the file and line.
    """
    folder = _folder(splits, "Sparsam split")
    labelled = {s.id: s for s in sources if s.class_name is not None}
    result: dict[str, list[str]] = {}
    for role, name in SPARSAM_SPLITS.items():
        path = folder / name
        if not path.is_file():
            continue
        ids: dict[str, int] = {}
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("image", "label") if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path} is missing the column(s) {missing}; expected the columns ,image,label.")
            for row in reader:
                where = f"{path} line {reader.line_num}"
                image_id = Path((row["image"] or "").strip().replace("\\", "/")).stem
                label = (row["label"] or "").strip()
                if image_id not in labelled:
                    raise ValueError(f"{where}: image {row['image']!r} is not among the labelled source images.")
                if label != labelled[image_id].class_name:
                    raise ValueError(
                        f"{where}: image {image_id!r} has label {label!r} here but class "
                        f"{labelled[image_id].class_name!r} in the source ({labelled[image_id].path})."
                    )
                if image_id in ids:
                    raise ValueError(f"{where}: image {image_id!r} is listed again (first on line {ids[image_id]}).")
                ids[image_id] = reader.line_num
        result[role] = list(ids)
    if not result:
        raise FileNotFoundError(f"Sparsam split folder {folder} has neither {' nor '.join(SPARSAM_SPLITS.values())}.")
    if "unlabeled_train.csv" in os.listdir(folder):
        logger.info("%s: unlabeled_train.csv is not read; pass the unlabelled images with --unlabeled.", folder)
    both = sorted(set(result.get("train", [])) & set(result.get("test", [])))
    if both:
        raise ValueError(f"{len(both)} image(s) are in both split files of {folder}: {', '.join(both[:5])}.")
    return result


def _place(src: Path, dst: Path, symlink: bool) -> None:
    if symlink:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


def write_dataset(
    out: str | os.PathLike,
    sources: Sequence[Source],
    classes: Sequence[str],
    splits: str | os.PathLike | None = None,
    symlink: bool = False,
) -> Path:
    """Write ``sources`` as ``<out>/images`` + ``labels.csv`` (+ ``splits/``), atomically (module docstring).

    Args:
        out: output folder; must not exist or be empty.
        sources: images to write; ``class_name`` None for unlabelled ones.
        classes: class names in class-id order (class_id = position).
        splits: folder of Sparsam split files (:py:func:`read_sparsam_splits`), or None.
        symlink: link the images (absolute targets) instead of copying them.

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` is not empty, no labelled image, duplicate ids, a class name not in ``classes``, and
            the errors of :py:func:`read_sparsam_splits`.
    """
    out = _check_out(out)
    if not any(s.class_name is not None for s in sources):
        raise ValueError("no labelled source image found: nothing to convert.")
    _check_ids(sources)
    class_id = {name: i for i, name in enumerate(classes)}
    unknown = sorted({s.class_name for s in sources if s.class_name is not None} - class_id.keys())
    if unknown:
        raise ValueError(f"class name(s) {unknown} are not among the classes {list(classes)}.")
    split_ids = read_sparsam_splits(splits, sources) if splits is not None else {}
    with staged_folder(out) as tmp:  # published only when complete
        (tmp / "images").mkdir()
        for source in sources:
            _place(source.path, tmp / "images" / f"{source.id}{source.path.suffix}", symlink)
        labelled = sorted((s for s in sources if s.class_name is not None), key=lambda s: s.id)
        write_csv(tmp / "labels.csv", ("id", "class_id", "class_name"),
                   ((s.id, class_id[s.class_name], s.class_name) for s in labelled))
        if split_ids:
            (tmp / "splits").mkdir()
            for role, ids in split_ids.items():
                write_csv(tmp / "splits" / f"{role}.csv", ("id",), ([i] for i in ids))
    counts = Counter(s.class_name for s in labelled)
    logger.info("%s: %d labelled image(s) in %d class(es) (%s), %d unlabelled%s", out, len(labelled), len(counts),
                ", ".join(f"{c} {counts[c]}" for c in classes if counts[c]), len(sources) - len(labelled),
                f", splits {', '.join(f'{r} {len(i)}' for r, i in split_ids.items())}" if split_ids else "")
    return out


def matek_sources(src: str | os.PathLike) -> tuple[list[Source], list[str]]:
    """Labelled images of the Matek bone-marrow layout: ``<src>/<class>/**/<image>``; classes sorted by name."""
    root = _folder(src, "Matek bone-marrow")
    sources: list[Source] = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        images = _images_below(class_dir)
        if not images:
            logger.warning("%s holds no image; class %r skipped.", class_dir, class_dir.name)
        sources += [Source(p, p.stem, class_dir.name) for p in images]
    if not sources:
        raise ValueError(f"no image found in the class folders of {root}; expected <src>/<CLASS>/**/*.jpg.")
    return sources, sorted({s.class_name for s in sources})


def hyperkvasir_sources(src: str | os.PathLike) -> tuple[list[Source], list[str]]:
    """Labelled HyperKvasir images: ``labeled-images/<region>/<category>/<finding>/<image>``; class = finding."""
    root = _folder(src, "HyperKvasir")
    if (root / "labeled-images").is_dir():
        root = root / "labeled-images"
    images = sorted(p for p in root.glob("*/*/*/*") if _is_image(p) and not any(
        q.startswith(".") for q in p.relative_to(root).parts))
    if not images:
        raise ValueError(
            f"no image found in {root}; expected labeled-images/<region>/<category>/<finding>/*.jpg "
            "(e.g. lower-gi-tract/pathological-findings/polyps/<uuid>.jpg)."
        )
    sources = [Source(p, p.stem, p.parent.name) for p in images]
    return sources, sorted({s.class_name for s in sources})


def isic2019_sources(src: str | os.PathLike, ground_truth: str | os.PathLike | None = None) -> tuple[
        list[Source], list[str]]:
    """Labelled ISIC 2019 images from the one-hot ground-truth CSV; classes in column order, ``UNK`` excluded."""
    root = _folder(src, "ISIC 2019 image")
    name = "ISIC_2019_Training_GroundTruth.csv"
    if ground_truth is None:
        candidates = [root / name, root.parent / name]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise FileNotFoundError(f"no {name} in {root} or {root.parent}; pass --ground_truth.")
        gt = found[0]
    else:
        gt = Path(ground_truth).expanduser()
        if not gt.is_file():
            raise FileNotFoundError(f"ISIC ground-truth file {gt} does not exist.")
    images = {p.stem: p for p in root.iterdir() if _is_image(p)}
    sources: list[Source] = []
    with open(gt, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in reader.fieldnames or []]
        reader.fieldnames = header
        classes = [c for c in header if c not in ("image", ISIC_UNKNOWN)]
        if "image" not in header or len(classes) < 2:
            raise ValueError(f"{gt} must have an 'image' column and one-hot class columns; its header is {header}.")
        for row in reader:
            where = f"{gt} line {reader.line_num}"
            image_id = (row["image"] or "").strip()
            try:
                values = {c: float(row[c]) for c in [*classes, *([ISIC_UNKNOWN] if ISIC_UNKNOWN in header else [])]}
            except (TypeError, ValueError):
                raise ValueError(f"{where}: image {image_id!r} has a non-numeric class value: {row}.") from None
            if values.get(ISIC_UNKNOWN, 0.0) != 0.0:
                raise ValueError(f"{where}: image {image_id!r} is labelled {ISIC_UNKNOWN}, which is not a class; "
                                 "remove the row to convert the other images.")
            positive = [c for c in classes if values[c] == 1.0]
            if len(positive) != 1 or any(values[c] not in (0.0, 1.0) for c in classes):
                raise ValueError(f"{where}: image {image_id!r} must have exactly one class column equal to 1 and "
                                 f"the others 0, got {({c: row[c] for c in classes})}.")
            if image_id not in images:
                raise ValueError(f"{where}: image {image_id!r} has no image file {image_id}.<ext> in {root}.")
            sources.append(Source(images.pop(image_id), image_id, positive[0]))
    if images:
        extra = sorted(images)
        raise ValueError(f"{len(extra)} image(s) of {root} have no row in {gt}: {', '.join(extra[:5])}.")
    return sources, classes


def _configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


def matek(src: str, out: str, splits: str | None = None, unlabeled: str | None = None,
          symlink: bool = False) -> str:
    """Convert the Matek bone-marrow folders ``<src>/<CLASS>/**/*.jpg`` (module docstring); returns ``out``."""
    _configure_logging()
    _check_out(out)
    sources, classes = matek_sources(src)
    return str(write_dataset(out, sources + _unlabeled_sources(unlabeled), classes, splits, symlink))


def hyperkvasir(src: str, out: str, splits: str | None = None, unlabeled: str | None = None,
                symlink: bool = False) -> str:
    """Convert HyperKvasir ``labeled-images/<region>/<category>/<finding>/*.jpg`` (module docstring); returns out."""
    _configure_logging()
    _check_out(out)
    sources, classes = hyperkvasir_sources(src)
    return str(write_dataset(out, sources + _unlabeled_sources(unlabeled), classes, splits, symlink))


def isic2019(src: str, out: str, ground_truth: str | None = None, splits: str | None = None,
             unlabeled: str | None = None, symlink: bool = False) -> str:
    """Convert ISIC 2019 ``ISIC_2019_Training_Input`` + its ground-truth CSV (module docstring); returns ``out``."""
    _configure_logging()
    _check_out(out)
    sources, classes = isic2019_sources(src, ground_truth)
    return str(write_dataset(out, sources + _unlabeled_sources(unlabeled), classes, splits, symlink))


if __name__ == "__main__":
    fire.Fire({"matek": matek, "hyperkvasir": hyperkvasir, "isic2019": isic2019})
