"""Readers of few-shot segmentation datasets (specs/cdtg.md §1.2, §2): each returns a *class list*.

A class list is an ordered ``dict[str, list[dict]]``, class name -> items, whose order defines ``class_id``
(0-based). An item (see :py:mod:`common.transforms.fewshot`) is::

    {"image": path | uint8 [H, W, 3], "mask": path | uint8 [H, W], "name": str,
     "fg_values": list[int] | None, "ignore_value": int | None, "label_values": list[int] (label maps only),
     "volume": str, "slice": int (volume slices only)}

``fg_values=None`` means foreground ``= mask >= 128`` (PATNet's binary targets, Lei et al., ECCV 2022).

Layouts (``<root>`` is the dataset folder; each reader also accepts the parent folder named in the spec):

* ISIC 2018 (§2.1): ``ISIC/ISIC2018_Task1-2_Training_Input/{1,2,3}/*.jpg`` +
  ``ISIC/ISIC2018_Task1_Training_GroundTruth/<stem>_segmentation.png``; the flat subset ``images/*.jpg`` +
  ``masks/*.png`` as one class "lesion".
* Chest X-ray (§2.2): ``LungSegmentation/CXR_png/<name>.png`` + ``LungSegmentation/masks/<name>[_mask].png``.
* WBC (§2.3): ``images/*.png`` + ``masks/*.png`` (shared subset), ``Dataset 1/*.bmp`` + ``*.png`` (upstream), or
  ``<class>/<stem>.<ext>`` + ``<stem>_mask.png`` (CD-TG prepared); nucleus = 255, cytoplasm = 128, cell >= 128.
* Volumes (§2.4): Medical Segmentation Decathlon (``dataset.json``) or the ADNet / SSL-ALPNet CHAOS folder
  ``chaos_MR_T2_normalized/{image,label}_<k>.nii.gz``; every axial slice containing an organ is an item.
* Polyps: the PraNet layout of :py:mod:`common.data.polyp_folders`, one class "polyp".
* PASCAL-5i (§1.2) and COCO-20i (HSNet split files), the source domains.

Items whose foreground is empty are dropped (an empty support mask is meaningless), with a logged count; this
decodes every mask once (``drop_empty=False`` skips it).
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from common.data.polyp_folders import list_pairs, polyp_datalist
from common.data.volume_folders import msd_cases, read_label_map
from common.transforms.fewshot import FewShotPairLoader, foreground_and_ignore

__all__ = [
    "ISIC_CLASSES",
    "WBC_CLASSES",
    "CHAOS_LABELS",
    "VOC_CLASSES",
    "COCO_CLASSES",
    "isic2018_classes",
    "isic_flat_classes",
    "lung_classes",
    "wbc_classes",
    "class_folder_classes",
    "volume_slice_classes",
    "polyp_classes",
    "pascal5i_classes",
    "coco20i_classes",
    "drop_empty_items",
]

logger = logging.getLogger(__name__)

ISIC_CLASSES: dict[str, str] = {"1": "melanoma", "2": "nevus", "3": "seborrheic keratosis"}
"""ISIC 2018 class folder -> class name (CD_TG ``ISIC_Split.py`` mapping)."""

WBC_CLASSES: dict[str, list[int]] = {"cytoplasm": [128], "nucleus": [255], "cell": [128, 255]}
"""WBC class -> foreground values of the 0 / 128 / 255 masks (Zheng et al., Micron 2018)."""

CHAOS_LABELS: dict[int, str] = {1: "liver", 2: "right kidney", 3: "left kidney", 4: "spleen"}
"""Label values of the ADNet / SSL-ALPNet CHAOS-MRI T2-SPIR volumes."""

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "dining table", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv monitor",
)
"""The 20 PASCAL VOC classes; mask value ``c + 1`` for ``VOC_CLASSES[c]``."""

COCO_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)
"""The 80 COCO classes in HSNet's index order; mask value ``k + 1`` for ``COCO_CLASSES[k]``."""

_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ------------------------------------------------------------------------------------------------ helpers


def _item(image, mask, name: str, fg_values: Sequence[int] | None = None, ignore_value: int | None = None,
          label_values: Sequence[int] | None = None, **extra) -> dict:
    item = {"image": image if isinstance(image, np.ndarray) else str(image),
            "mask": mask if isinstance(mask, np.ndarray) else str(mask), "name": name,
            "fg_values": None if fg_values is None else [int(v) for v in fg_values],
            "ignore_value": None if ignore_value is None else int(ignore_value)}
    if label_values is not None:
        item["label_values"] = [int(v) for v in label_values]
    item.update(extra)
    return item


def _some(values: Sequence, limit: int = 5) -> str:
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (and {len(values) - limit} more)" if len(values) > limit else "")


def _first_dir(candidates: Iterable[Path], what: str) -> Path:
    candidates = list(candidates)
    for path in candidates:
        if path.is_dir():
            return path
    raise FileNotFoundError(f"{what} not found: looked for {' or '.join(str(p) for p in candidates)}.")


def _norm(name: str) -> str:
    """Matching key of a class name: lower case, without ``_``, ``-`` or whitespace (as the text tables match)."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def drop_empty_items(classes: dict[str, list[dict]], dataset: str) -> dict[str, list[dict]]:
    """``classes`` without the items whose foreground is empty (each mask decoded once; the count is logged).

    Raises:
        ValueError: the class list is empty, or a class is left without items; the message names the class.
    """
    if not classes:
        raise ValueError(f"{dataset}: the dataset has no class.")
    reader = FewShotPairLoader(cache_size=0)
    kept: dict[str, list[dict]] = {}
    for name, items in classes.items():
        keep = []
        for item in items:
            label = reader.read_mask(item["mask"], item["name"])
            fg, _ = foreground_and_ignore(label, item["fg_values"], item["ignore_value"], item.get("label_values"),
                                          str(item["mask"]))
            if fg.any():
                keep.append(item)
        if len(keep) < len(items):
            logger.info("%s: dropped %d of %d items of class %r whose foreground is empty",
                        dataset, len(items) - len(keep), len(items), name)
        kept[name] = keep
    return _check_classes(kept, dataset)


def _check_classes(classes: dict[str, list[dict]], dataset: str) -> dict[str, list[dict]]:
    if not classes:
        raise ValueError(f"{dataset}: the dataset has no class.")
    empty = [name for name, items in classes.items() if not items]
    if empty:
        raise ValueError(f"{dataset}: class(es) {empty} have no item with a non-empty foreground.")
    return classes


def _finish(classes: dict[str, list[dict]], dataset: str, drop_empty: bool) -> dict[str, list[dict]]:
    return drop_empty_items(classes, dataset) if drop_empty else _check_classes(classes, dataset)


def _files(folder: Path, extensions: Sequence[str]) -> list[Path]:
    exts = tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in exts)


# ------------------------------------------------------------------------------------------------ ISIC


def isic2018_classes(root: str | os.PathLike, drop_empty: bool = True) -> dict[str, list[dict]]:
    """ISIC 2018 in the PATNet / CD-TG layout (§2.1): class folders ``1, 2, 3`` of
    ``ISIC2018_Task1-2_Training_Input`` -> melanoma, nevus, seborrheic keratosis; GT
    ``ISIC2018_Task1_Training_GroundTruth/<stem>_segmentation.png``; foreground ``>= 128``.

    Args:
        root: the folder holding ``ISIC/`` (PATNet's ``--datapath``) or the ``ISIC`` folder itself.
        drop_empty: drop items with an empty mask (decodes every mask).

    Raises:
        FileNotFoundError: a class folder, the GT folder or an image's GT file is missing (named).
        ValueError: a class folder holds no ``.jpg``.
    """
    root = Path(root).expanduser()
    base = _first_dir([root / "ISIC", root], "ISIC 2018 folder")
    inputs = _first_dir([base / "ISIC2018_Task1-2_Training_Input"], "ISIC 2018 input folder")
    gt = _first_dir([base / "ISIC2018_Task1_Training_GroundTruth"], "ISIC 2018 ground-truth folder")
    classes: dict[str, list[dict]] = {}
    for folder, name in ISIC_CLASSES.items():
        class_dir = _first_dir([inputs / folder], f"ISIC 2018 class folder {folder!r} ({name})")
        images = sorted(class_dir.glob("*.jpg"))
        if not images:
            raise ValueError(f"ISIC 2018 class folder {class_dir} ({name}) holds no .jpg image.")
        items = []
        for image in images:
            mask = gt / f"{image.stem}_segmentation.png"
            if not mask.is_file():
                raise FileNotFoundError(f"ISIC 2018 image {image} has no ground truth {mask}.")
            items.append(_item(image, mask, image.stem))
        classes[name] = items
    return _finish(classes, f"ISIC 2018 ({root})", drop_empty)


def isic_flat_classes(root: str | os.PathLike, drop_empty: bool = True) -> dict[str, list[dict]]:
    """A flat ISIC subset ``<root>/images/*.jpg`` + ``<root>/masks/*.png`` (paired by base name) as one class
    ``"lesion"``, foreground ``>= 128``."""
    root = Path(root).expanduser()
    if not (root / "images").is_dir() or not (root / "masks").is_dir():
        raise FileNotFoundError(f"ISIC folder {root} must hold images/ and masks/ ({root / 'images'}).")
    pairs = list_pairs(root)
    return _finish({"lesion": [_item(p["image"], p["label"], p["name"]) for p in pairs]},
                   f"ISIC ({root})", drop_empty)


# ------------------------------------------------------------------------------------------------ Chest X-ray


def lung_classes(root: str | os.PathLike, drop_empty: bool = True) -> dict[str, list[dict]]:
    """Chest X-ray lungs (§2.2): ``masks/*.png`` enumerated; the image is ``CXR_png/<name>.png`` with a trailing
    ``_mask`` of the mask's name removed when present; masks without an image are skipped (count logged).
    One class ``"lung"``, foreground ``>= 128``.

    Args:
        root: the folder holding ``LungSegmentation/`` (or ``Lung Segmentation/``), or that folder itself.

    Raises:
        FileNotFoundError: ``CXR_png/`` or ``masks/`` is missing.
        ValueError: no mask has an image.
    """
    root = Path(root).expanduser()
    base = _first_dir([root / "LungSegmentation", root / "Lung Segmentation", root], "chest X-ray folder")
    images_dir = _first_dir([base / "CXR_png"], "chest X-ray image folder")
    masks_dir = _first_dir([base / "masks"], "chest X-ray mask folder")
    items, orphans = [], []
    for mask in _files(masks_dir, (".png",)):
        stem = mask.stem[: -len("_mask")] if mask.stem.endswith("_mask") else mask.stem
        image = images_dir / f"{stem}.png"
        if image.is_file():
            items.append(_item(image, mask, stem))
        else:
            orphans.append(mask.name)
    if orphans:
        logger.info("chest X-ray: skipped %d mask(s) without an image in %s: %s", len(orphans), images_dir,
                    _some(orphans))
    if not items:
        raise ValueError(f"chest X-ray: no mask of {masks_dir} has an image in {images_dir}.")
    return _finish({"lung": items}, f"chest X-ray ({root})", drop_empty)


# ------------------------------------------------------------------------------------------------ class folders


def class_folder_classes(root: str | os.PathLike, image_ext: Sequence[str] = ("png", "jpg", "bmp"),
                         drop_empty: bool = True) -> dict[str, list[dict]]:
    """Generic layout ``<root>/<class>/<stem>.<ext>`` + ``<root>/<class>/<stem>_mask.png`` (CD-TG's WBC reader,
    the demo shapes): one class per sub-folder, sorted by name; foreground ``>= 128``.

    Raises:
        FileNotFoundError: ``root`` is missing or has no class folder.
        ValueError: an image has no ``_mask.png`` beside it, or a class folder holds no image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"class-folder dataset {root} does not exist (or is not a folder).")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise FileNotFoundError(f"class-folder dataset {root} has no class folder (<root>/<class>/<stem>.<ext>).")
    return _finish({folder.name: _class_folder_items(folder, image_ext) for folder in folders},
                   f"class folders ({root})", drop_empty)


def _class_folder_items(folder: Path, image_ext: Sequence[str], fg_values: Sequence[int] | None = None,
                        label_values: Sequence[int] | None = None) -> list[dict]:
    images = [p for p in _files(folder, image_ext) if not p.stem.endswith("_mask")]
    if not images:
        raise ValueError(f"class folder {folder} holds no image ({', '.join(image_ext)}).")
    missing = [str(folder / f"{p.stem}_mask.png") for p in images if not (folder / f"{p.stem}_mask.png").is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of {folder} have no mask: {_some(missing)} not found.")
    return [_item(p, folder / f"{p.stem}_mask.png", p.stem, fg_values, None, label_values) for p in images]


# ------------------------------------------------------------------------------------------------ WBC


def wbc_classes(root: str | os.PathLike, classes: Sequence[str] = ("cytoplasm", "nucleus"),
                drop_empty: bool = True) -> dict[str, list[dict]]:
    """White blood cells (§2.3) as classes ``classes`` (of ``cytoplasm`` = 128, ``nucleus`` = 255, ``cell`` >= 128).

    Layouts, tried in this order:

    * shared subset: ``<root>/images/*.png`` + ``<root>/masks/*.png`` (0 / 128 / 255 masks);
    * upstream (zxaoyou/segmentation_WBC): ``<root>/Dataset 1/*.bmp`` + same-stem ``.png``, ``Dataset 2/...``;
      the subsets are pooled, item names ``Dataset_1_<stem>``;
    * CD-TG prepared: ``<root>/<class>/<stem>.<ext>`` + ``<stem>_mask.png`` (binary, ``>= 128``), one folder per
      class (folder names matched case-insensitively).

    Raises:
        FileNotFoundError: no layout found (the message lists the paths tried).
        ValueError: an unknown class, an image without mask, an empty class.
    """
    root = Path(root).expanduser()
    unknown = [c for c in classes if c.lower() not in WBC_CLASSES]
    if unknown or not classes:
        raise ValueError(f"WBC classes must be among {list(WBC_CLASSES)}, got {list(classes)}.")
    label_values = [0, 128, 255]
    subsets = sorted(p for p in root.glob("Dataset *") if p.is_dir()) if root.is_dir() else []
    if (root / "images").is_dir() and (root / "masks").is_dir():
        pairs = [(p["image"], p["label"], p["name"]) for p in list_pairs(root)]
    elif subsets:
        pairs = []
        for subset in subsets:
            for image in _files(subset, (".bmp",)):
                mask = image.with_suffix(".png")
                if not mask.is_file():
                    raise ValueError(f"WBC image {image} has no mask {mask}.")
                pairs.append((image, mask, f"{subset.name.replace(' ', '_')}_{image.stem}"))
    else:
        folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
        missing = [c for c in classes if c.lower() not in folders]
        if missing:
            raise FileNotFoundError(
                f"WBC dataset not found under {root}: looked for {root / 'images'} + {root / 'masks'}, "
                f"{root / 'Dataset 1'} (upstream layout) and the class folders {[str(root / c) for c in missing]}."
            )
        found = {c: _class_folder_items(folders[c.lower()], ("png", "jpg", "bmp")) for c in classes}
        return _finish(found, f"WBC ({root})", drop_empty)
    found = {c: [_item(i, m, n, WBC_CLASSES[c.lower()], None, label_values) for i, m, n in pairs] for c in classes}
    return _finish(found, f"WBC ({root})", drop_empty)


# ------------------------------------------------------------------------------------------------ volumes


def _volume_cases(root: Path) -> tuple[list[dict[str, str]], dict[int, str]]:
    """``([{"image", "label", "case"}], label map without background)`` of a Decathlon or ADNet CHAOS folder."""
    if (root / "dataset.json").is_file():
        labels = {v: n for v, n in read_label_map(root).items() if v != 0}
        return msd_cases(root, check=False), labels
    folder = _first_dir(
        [root / "CHAOST2" / "chaos_MR_T2_normalized", root / "chaos_MR_T2_normalized", root],
        f"volume dataset (a Decathlon {root / 'dataset.json'} or the ADNet CHAOS folder)",
    )
    cases = []
    for image in sorted(folder.glob("image_*.nii.gz")):
        k = image.name[len("image_"): -len(".nii.gz")]
        label = folder / f"label_{k}.nii.gz"
        if not label.is_file():
            raise FileNotFoundError(f"CHAOS volume {image} has no label volume {label}.")
        cases.append({"image": str(image), "label": str(label), "case": f"image_{k}"})
    if not cases:
        raise FileNotFoundError(
            f"volume dataset not found under {root}: no {root / 'dataset.json'} and no image_<k>.nii.gz in {folder}."
        )
    key = lambda c: (0, int(c["case"][6:]), "") if c["case"][6:].isdigit() else (1, 0, c["case"])  # noqa: E731
    return sorted(cases, key=key), dict(CHAOS_LABELS)


def _to_uint8(volume: np.ndarray) -> np.ndarray:
    """Per-volume rescale to [0, 255] between the 0.5 and 99.5 percentiles, then ``uint8`` (spec's bug to avoid:
    casting the float intensities directly)."""
    volume = volume.astype(np.float32)
    lo, hi = np.percentile(volume, (0.5, 99.5))
    if hi <= lo:
        return np.zeros(volume.shape, np.uint8)
    return np.round(np.clip((volume - lo) / (hi - lo), 0.0, 1.0) * 255.0).astype(np.uint8)


def volume_slice_classes(root: str | os.PathLike, classes: Sequence[str] | None = None,
                         exclude: Sequence[str] = (), cases: Sequence[str] | None = None) -> dict[str, list[dict]]:
    """Axial slices of labelled volumes as few-shot items (§2.4), one class per organ.

    Every slice ``z`` (last array axis) of a volume whose label contains organ value ``v`` becomes an item of that
    organ: ``image`` = the slice transposed to ``[rows = y, cols = x]`` (the SimpleITK view of the ADNet reader),
    intensities rescaled per volume to [0, 255] (0.5 / 99.5 percentiles) and repeated to 3 channels (a read-only
    view, no copy), ``mask`` = the label slice (uint8), ``fg_values=[v]``, ``label_values`` = the label map,
    ``name = "<case>:z<z>"``, ``"volume"`` = the case, ``"slice"`` = ``z``. Slices with none of the selected
    organs are not kept, and the organs of one slice share its arrays.

    Args:
        root: a Medical Segmentation Decathlon folder (``dataset.json`` ``"labels"`` / ``"training"``), or the
            ADNet / SSL-ALPNet CHAOS folder ``chaos_MR_T2_normalized`` (or a parent holding it, or ``CHAOST2/``);
            labels 1 liver, 2 right kidney, 3 left kidney, 4 spleen.
        classes: organ names to keep (case-insensitive, ``_``, ``-`` and spaces ignored), in label order; None: all.
        exclude: organ names to leave out.
        cases: case ids to read (e.g. ``["case_0001"]``, ``["image_1"]``); None: all volumes.

    Raises:
        FileNotFoundError: no layout found, or a listed volume is missing.
        ValueError: an unknown organ or case, image and label shapes differ (both files named), or an organ has
            no slice.
    """
    root = Path(root).expanduser()
    all_cases, label_map = _volume_cases(root)
    by_name = {_norm(n): v for v, n in label_map.items()}
    for names, arg in ((classes or (), "classes"), (exclude, "exclude")):
        unknown = [n for n in names if _norm(n) not in by_name]
        if unknown:
            raise ValueError(f"{arg}: unknown organ(s) {unknown} in {root}; available: {list(label_map.values())}.")
    wanted = [by_name[_norm(n)] for n in classes] if classes is not None else list(label_map)
    dropped = {by_name[_norm(n)] for n in exclude}
    values = [v for v in sorted(set(wanted)) if v not in dropped]
    if not values:
        raise ValueError(f"no organ left to read in {root} (classes={classes}, exclude={list(exclude)}).")
    if cases is not None:
        known = {c["case"] for c in all_cases}
        unknown = [c for c in cases if c not in known]
        if unknown:
            raise ValueError(f"unknown case(s) {unknown} in {root}; available: {_some(sorted(known), 20)}.")
        all_cases = [c for c in all_cases if c["case"] in set(cases)]
    label_values = [0, *label_map]
    found: dict[str, list[dict]] = {label_map[v]: [] for v in values}
    for case in all_cases:
        for role in ("image", "label"):
            if not Path(case[role]).is_file():
                raise FileNotFoundError(f"{role} volume {case[role]} of case {case['case']} does not exist.")
        image = np.asarray(nib.load(case["image"]).dataobj)
        label = np.asarray(nib.load(case["label"]).dataobj)
        if image.ndim == 4 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.shape != label.shape or image.ndim != 3:
            raise ValueError(
                f"image {case['image']} has shape {image.shape} but its label {case['label']} has shape "
                f"{label.shape}; both must be the same 3D shape."
            )
        if label.dtype.kind == "f":
            label = np.rint(label)
        label = label.astype(np.int64)
        if label.min() < 0 or label.max() > 255:
            raise ValueError(f"label volume {case['label']} holds values outside 0..255: {label.min()}..{label.max()}.")
        grey = _to_uint8(image)
        present = {v: set(np.flatnonzero((label == v).any(axis=(0, 1))).tolist()) for v in values}
        for z in sorted(set().union(*present.values())):
            grey_slice = np.ascontiguousarray(grey[:, :, z].T)
            rgb = np.broadcast_to(grey_slice[..., None], (*grey_slice.shape, 3))
            mask = np.ascontiguousarray(label[:, :, z].T.astype(np.uint8))
            mask.setflags(write=False)
            for v in values:
                if z in present[v]:
                    found[label_map[v]].append(_item(rgb, mask, f"{case['case']}:z{z}", [v], None, label_values,
                                                     volume=case["case"], slice=int(z)))
    absent = [name for name, items in found.items() if not items]
    if absent:
        raise ValueError(f"volumes ({root}): organ(s) {absent} have no slice in the volumes read; leave them out "
                         "with exclude=[...].")
    return found


# ------------------------------------------------------------------------------------------------ polyps


def polyp_classes(root: str | os.PathLike, sets: Sequence[str] | str | None = None,
                  drop_empty: bool = True) -> dict[str, list[dict]]:
    """Polyp sets (PraNet layout, :py:func:`common.data.polyp_folders.polyp_datalist`) pooled into one class
    ``"polyp"``; item names ``<set>_<stem>``; foreground ``>= 128``."""
    pairs = polyp_datalist(root, sets, check=True)
    items = [_item(p["image"], p["label"], f"{p['set']}_{p['name']}") for p in pairs]
    return _finish({"polyp": items}, f"polyps ({root})", drop_empty)


# ------------------------------------------------------------------------------------------------ PASCAL-5i


def pascal5i_classes(root: str | os.PathLike, split_dir: str | os.PathLike, split: str = "trn",
                     folds: Sequence[int] | int = (0, 1, 2, 3), drop_empty: bool = False) -> dict[str, list[dict]]:
    """PASCAL-5i pairs (§1.2) from the HSNet / PATNet split files ``<split_dir>/<split>/fold<f>.txt``.

    Each line ``<VOC id>__<class 1..20>`` is an item of class ``VOC_CLASSES[class - 1]``: image
    ``<root>/VOCdevkit/VOC2012/JPEGImages/<id>.jpg``, mask ``.../SegmentationClassAug/<id>.png``,
    ``fg_values=[class]``, ``ignore_value=255``. Fold 4 (CD-FSS source training) means all four ``trn`` files.
    Classes come in VOC order; classes without a line are absent.

    Args:
        root: folder holding ``VOCdevkit/`` (or ``VOCdevkit`` itself, or ``VOC2012``).
        split_dir: folder holding ``trn/`` and ``val/`` (HSNet's ``data/splits/pascal``).
        split: ``"trn"`` or ``"val"``.
        folds: fold numbers 0..3, or 4 for all of them.
        drop_empty: decode every mask and drop empty pairs (the split files list only pairs whose class is
            present, so off by default).

    Raises:
        FileNotFoundError: a split file, the image / mask folder or a listed file is missing.
        ValueError: a malformed line, a class outside 1..20, no pair at all.
    """
    root, split_dir = Path(root).expanduser(), Path(split_dir).expanduser()
    folds = [folds] if isinstance(folds, int) else list(folds)
    folds = [0, 1, 2, 3] if folds == [4] else folds
    if any(f not in (0, 1, 2, 3) for f in folds):
        raise ValueError(f"PASCAL-5i folds must be in 0..3 (or 4 for all), got {folds}.")
    voc = _first_dir([root / "VOCdevkit" / "VOC2012", root / "VOC2012", root], "PASCAL VOC 2012 folder")
    images_dir = _first_dir([voc / "JPEGImages"], "PASCAL JPEGImages folder")
    masks_dir = _first_dir([voc / "SegmentationClassAug"], "PASCAL SegmentationClassAug folder (SBD masks)")
    found: dict[int, list[dict]] = {}
    missing: list[str] = []
    for fold in folds:
        split_file = split_dir / split / f"fold{fold}.txt"
        if not split_file.is_file():
            raise FileNotFoundError(f"PASCAL-5i split file {split_file} does not exist.")
        for n, line in enumerate(split_file.read_text().split(), start=1):
            image_id, sep, cls = line.partition("__")
            if not sep or not cls.isdigit() or not 1 <= int(cls) <= 20:
                raise ValueError(f"{split_file} line {n}: expected '<VOC id>__<class 1..20>', got {line!r}.")
            image, mask = images_dir / f"{image_id}.jpg", masks_dir / f"{image_id}.png"
            missing += [str(p) for p in (image, mask) if not p.is_file()]
            found.setdefault(int(cls), []).append(
                _item(image, mask, image_id, [int(cls)], 255, range(21)))
    if missing:
        raise FileNotFoundError(f"{len(missing)} PASCAL file(s) listed in {split_dir / split} are missing: "
                                f"{_some(missing)}.")
    classes = {VOC_CLASSES[c - 1]: found[c] for c in sorted(found)}
    return _finish(classes, f"PASCAL-5i {split} folds {folds} ({split_dir / split})", drop_empty)


# ------------------------------------------------------------------------------------------------ COCO-20i


class _PlainUnpickler(pickle.Unpickler):
    """Unpickler of plain containers only (dict, list, str, int): a split file never needs a class."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"split files hold plain dicts and lists; refusing to load {module}.{name}")


def coco20i_classes(root: str | os.PathLike, split_dir: str | os.PathLike, split: str = "trn", fold: int = 0,
                    drop_empty: bool = False) -> dict[str, list[dict]]:
    """COCO-20i (HSNet layout): ``<split_dir>/<split>/fold<fold>.pkl`` maps a class index 0..79 to image names.

    The classes of ``split="val"`` are ``{fold + 4 v, v = 0..19}`` (interleaved folds), those of ``"trn"`` the
    other 60. Image ``<root>/COCO2014/<name>`` when the name holds its folder (HSNet: ``train2014/COCO_...jpg``),
    else ``<root>/COCO2014/{train2014 | val2014}/<name>.jpg``; mask ``<root>/COCO2014/annotations/<same>.png``
    holding class values 1..80; ``fg_values=[k + 1]``.

    Raises:
        FileNotFoundError: the split file, ``COCO2014/`` or a listed file is missing.
        ValueError: a malformed split file, a class of the split with no image.
    """
    root, split_dir = Path(root).expanduser(), Path(split_dir).expanduser()
    if split not in ("trn", "val") or fold not in (0, 1, 2, 3):
        raise ValueError(f"COCO-20i: split must be 'trn' or 'val' and fold 0..3, got split={split!r}, fold={fold!r}.")
    split_file = split_dir / split / f"fold{fold}.pkl"
    if not split_file.is_file():
        raise FileNotFoundError(f"COCO-20i split file {split_file} does not exist.")
    with open(split_file, "rb") as f:
        try:
            table = _PlainUnpickler(f).load()
        except Exception as err:
            raise ValueError(f"COCO-20i split file {split_file} cannot be read: {err}") from err
    if not isinstance(table, dict):
        raise ValueError(f"COCO-20i split file {split_file} must hold a dict class index -> image names.")
    base = _first_dir([root / "COCO2014", root], "COCO2014 folder")
    val_ids = {fold + 4 * v for v in range(20)}
    class_ids = sorted(val_ids) if split == "val" else [k for k in range(80) if k not in val_ids]
    subdir = "train2014" if split == "trn" else "val2014"
    classes: dict[str, list[dict]] = {}
    missing: list[str] = []
    for k in class_ids:
        items = []
        for name in table.get(k, []):
            rel = name if "/" in name else f"{subdir}/{name}"
            rel = rel if rel.endswith(".jpg") else rel + ".jpg"
            image, mask = base / rel, (base / "annotations" / rel).with_suffix(".png")
            missing += [str(p) for p in (image, mask) if not p.is_file()]
            items.append(_item(image, mask, Path(rel).stem, [k + 1], None, range(81)))
        classes[COCO_CLASSES[k]] = items
    if missing:
        raise FileNotFoundError(f"{len(missing)} COCO file(s) listed in {split_file} are missing: {_some(missing)}.")
    return _finish(classes, f"COCO-20i {split} fold {fold} ({split_file})", drop_empty)
