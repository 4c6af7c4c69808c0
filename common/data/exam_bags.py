"""Exam (bag) datasets for multiple-instance learning on colonoscopy frames: EndoKED-MIL's data side.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging
Large Language and Vision Models", arXiv:2310.11173 (2023), stage 2 (specs/endoked.md §1, §2.2): every exam
(one colonoscopy, one report) is a *bag* ``X_b = {x_1, ..., x_N}`` of frames with one label ``Y_b in {0, 1}``
read from its report, ``Y_b = max_i y_i`` over the unknown frame labels ``y_i`` (standard MIL assumption, Ilse
et al., ICML 2018).

Layout of an exam dataset (``dataset_dir``)::

    <dataset_dir>/exams/<exam_id>/*.png|jpg          frames of one exam (a bag), sorted by file name
    <dataset_dir>/reports.csv                         exam_id,report   free text, UTF-8 (optional here)
    <dataset_dir>/exam_labels.csv                     exam_id,label    0/1, written by the report labeller
    <dataset_dir>/instance_labels.csv                 image,label      optional; image = frame path relative
                                                                       to dataset_dir (exams/<id>/<file>), 0/1
    <dataset_dir>/masks/<exam_id>/<frame stem>.png    optional ground-truth masks, 0/255 (to measure pseudo masks)

A bag keeps the first ``max_instances`` frames in name order (the original loader keeps the first 100 of its
glob order, ``dataset_Endo.py:143-145``). Exams are split 70/30 at exam level by a seeded random permutation
(§2.2). Two views feed the MIL trainer: the bag view (:class:`BagDataset`, one item = one exam, image tensor
``(N, 3, H, W)``; a DataLoader with batch size 1 gives ``(1, N, 3, H, W)``) and the instance view
(:func:`instance_datalist`, one item = one frame carrying its bag's label and index).

:func:`make_exams_from_polyp_sets` builds such a dataset from public polyp frames with masks, for
experiments with real frames: every frame is a positive instance, polyp-free crops of the same frames are the
negative ones, and reports are written to match the exam labels.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from monai.data import Dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    NormalizeIntensityd,
    Randomizable,
    Resized,
    ScaleIntensityRanged,
)
from PIL import Image

from common.transforms.io import CheckPolypPaird, LoadPolypImaged
from common.utils.files import staged_folder

from .polyp_folders import IMAGE_EXTENSIONS, polyp_datalist

__all__ = [
    "EXAMS_DIR",
    "MASKS_DIR",
    "REPORTS_CSV",
    "EXAM_LABELS_CSV",
    "INSTANCE_LABELS_CSV",
    "MIL_MEAN",
    "MIL_STD",
    "exam_frames",
    "read_csv_table",
    "read_instance_labels",
    "exam_bag_datalist",
    "split_bags",
    "instance_datalist",
    "mil_frame_transforms",
    "BagDataset",
    "exam_report",
    "polyp_free_window",
    "make_exams_from_polyp_sets",
    "frame_datalist",
]

logger = logging.getLogger(__name__)

EXAMS_DIR = "exams"
MASKS_DIR = "masks"
REPORTS_CSV = "reports.csv"
EXAM_LABELS_CSV = "exam_labels.csv"
INSTANCE_LABELS_CSV = "instance_labels.csv"

MIL_MEAN: tuple[float, float, float] = (0.31512642, 0.20470396, 0.13602576)
"""Per-channel mean of the EndoKED-MIL frames after scaling to [0, 1] (``dataset_Endo.py:78-83``, spec §2.2)."""
MIL_STD: tuple[float, float, float] = (0.30684662, 0.21589851, 0.15230405)
"""Per-channel standard deviation matching :data:`MIL_MEAN`."""

NO_INSTANCE_LABEL = -1
"""``instance_label`` of a frame that has no row in ``instance_labels.csv``."""

# ---------------------------------------------------------------------------------------------------- reading


def exam_frames(exam_dir: str | os.PathLike) -> list[Path]:
    """Image files (:data:`~common.data.polyp_folders.IMAGE_EXTENSIONS`, any case) of one exam folder, sorted
    by name; hidden files are ignored. ValueError naming the folder when it holds none."""
    exam_dir = Path(exam_dir)
    frames = sorted(p for p in exam_dir.iterdir()
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not frames:
        raise ValueError(f"exam folder {exam_dir} holds no frame ({', '.join(IMAGE_EXTENSIONS)}); "
                         "remove it or add its images.")
    return frames


def read_csv_table(path: str | os.PathLike, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows of a UTF-8 CSV with a header (a BOM is accepted) that must contain ``columns``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a column is missing; the message names the file, the missing and the present columns.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CSV file {path} does not exist.")
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise ValueError(f"CSV file {path} lacks the column(s) {missing}; its header is {header}, "
                             f"expected at least {list(columns)}.")
        return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]


def _binary(value: str, where: str) -> int:
    if value not in ("0", "1"):
        raise ValueError(f"{where}: label {value!r} is not 0 or 1.")
    return int(value)


def read_instance_labels(dataset_dir: str | os.PathLike) -> dict[str, int]:
    """Frame labels from ``<dataset_dir>/instance_labels.csv`` (``image,label``), keyed by the frame path
    relative to ``dataset_dir`` in POSIX form; ``{}`` when the file does not exist.

    Raises:
        ValueError: missing columns, a label that is not 0/1, a frame listed twice, or a listed frame that does
            not exist; the message names the CSV and the frame.
    """
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / INSTANCE_LABELS_CSV
    if not path.is_file():
        return {}
    labels: dict[str, int] = {}
    for row in read_csv_table(path, ("image", "label")):
        image = Path(row["image"]).as_posix()
        if image in labels:
            raise ValueError(f"{path}: frame {image!r} is listed twice.")
        if not (dataset_dir / image).is_file():
            raise ValueError(f"{path}: frame {image!r} does not exist under {dataset_dir} "
                             "(paths are relative to the dataset folder, e.g. exams/<exam_id>/<file>).")
        labels[image] = _binary(row["label"], f"{path}, frame {image!r}")
    return labels


def exam_bag_datalist(
    dataset_dir: str | os.PathLike,
    labels_csv: str | os.PathLike | None = None,
    max_instances: int | None = 100,
) -> list[dict[str, Any]]:
    """One dict per labelled exam of ``dataset_dir`` (layout in the module docstring), sorted by exam id.

    Exam folders without a row in the labels CSV (uncertain reports the labeller left out) are skipped with a
    logged warning.

    Args:
        dataset_dir: the exam dataset folder.
        labels_csv: table ``exam_id,label``; default ``<dataset_dir>/exam_labels.csv``.
        max_instances: keep the first ``max_instances`` frames (name order) of each exam; None keeps all.

    Returns:
        ``[{"exam_id": str, "image": [absolute frame paths], "label": 0 | 1, "instance_label": [0 | 1 | -1]}]``
        with one ``instance_label`` per kept frame (-1: not in ``instance_labels.csv``).

    Raises:
        FileNotFoundError: no ``exams/`` folder, no labels CSV, or a labelled exam without a folder.
        ValueError: bad ``max_instances``, missing columns, a duplicate exam id, a label that is not 0/1, an exam
            folder without frames, or no labelled exam at all; the message names the file or exam.
    """
    if max_instances is not None and int(max_instances) < 1:
        raise ValueError(f"max_instances must be >= 1 or None, got {max_instances}.")
    dataset_dir = Path(dataset_dir).expanduser().absolute()
    exams_dir = dataset_dir / EXAMS_DIR
    if not exams_dir.is_dir():
        raise FileNotFoundError(f"exam dataset {dataset_dir} has no {EXAMS_DIR}/ folder (one sub-folder of "
                                "frames per exam expected).")
    labels_path = Path(labels_csv) if labels_csv is not None else dataset_dir / EXAM_LABELS_CSV
    labels: dict[str, int] = {}
    for row in read_csv_table(labels_path, ("exam_id", "label")):
        exam_id = row["exam_id"]
        if exam_id in labels:
            raise ValueError(f"{labels_path}: exam id {exam_id!r} appears more than once.")
        labels[exam_id] = _binary(row["label"], f"{labels_path}, exam {exam_id!r}")
    folders = {p.name for p in exams_dir.iterdir() if p.is_dir() and not p.name.startswith(".")}
    no_folder = sorted(labels.keys() - folders)
    if no_folder:
        raise FileNotFoundError(f"{labels_path} labels exam(s) {no_folder[:5]} that have no folder in {exams_dir}"
                                + (f" (and {len(no_folder) - 5} more)" if len(no_folder) > 5 else "") + ".")
    unlabelled = sorted(folders - labels.keys())
    if unlabelled:
        logger.warning("skipping %d exam folder(s) of %s without a label in %s: %s", len(unlabelled), exams_dir,
                       labels_path, unlabelled[:10])
    if not labels:
        raise ValueError(f"no labelled exam in {dataset_dir}: {labels_path} has no rows.")
    instance_labels = read_instance_labels(dataset_dir)
    bags = []
    for exam_id in sorted(labels):
        frames = exam_frames(exams_dir / exam_id)[: None if max_instances is None else int(max_instances)]
        bags.append({
            "exam_id": exam_id,
            "image": [str(f) for f in frames],
            "label": labels[exam_id],
            "instance_label": [instance_labels.get(f.relative_to(dataset_dir).as_posix(), NO_INSTANCE_LABEL)
                               for f in frames],
        })
    return bags


def split_bags(bags: Sequence[Mapping[str, Any]], train_fraction: float = 0.7,
               seed: int = 42) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Split bags at exam level: a seeded random permutation, the first ``round(train_fraction * n)`` exams for
    training, the rest for validation (EndoKED ``dataset_Endo.py:62-65``, seed 42). Both parts keep the input
    order. Both classes are not forced into validation; a validation part without one of them is logged.

    Raises:
        ValueError: ``train_fraction`` outside ``(0, 1)``, or a split that leaves training or validation empty.
    """
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"train_fraction must be in (0, 1), got {train_fraction}.")
    n = len(bags)
    n_train = int(round(train_fraction * n))
    if n_train == 0 or n_train == n:
        raise ValueError(f"splitting {n} exam(s) with train_fraction={train_fraction} leaves "
                         f"{'training' if n_train == 0 else 'validation'} empty; more exams are needed.")
    train_idx = set(np.random.default_rng(seed).permutation(n)[:n_train].tolist())
    train = [b for i, b in enumerate(bags) if i in train_idx]
    val = [b for i, b in enumerate(bags) if i not in train_idx]
    missing = {0, 1} - {int(b["label"]) for b in val}
    if missing:
        logger.warning("the validation split (%d exams) has no exam of class(es) %s; bag AUC is undefined",
                       len(val), sorted(missing))
    return train, val


def instance_datalist(bags: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The instance view: one dict per frame, ``{"image": path, "label": bag label, "instance_label": 0|1|-1,
    "exam_id": str, "bag_index": index of the bag in ``bags``}``, bags in order, frames in bag order."""
    return [
        {"image": image, "label": int(bag["label"]), "instance_label": int(inst), "exam_id": bag["exam_id"],
         "bag_index": index}
        for index, bag in enumerate(bags)
        for image, inst in zip(bag["image"], bag["instance_label"])
    ]


# ---------------------------------------------------------------------------------------------------- tensors


def mil_frame_transforms(
    image_size: int = 512,
    mean: Sequence[float] = MIL_MEAN,
    std: Sequence[float] = MIL_STD,
) -> Compose:
    """Per-frame preprocessing of EndoKED-MIL (spec §2.2, no augmentation), key ``"image"``::

        load RGB (numpy (H, W) order) -> (3, H, W) -> bilinear resize to (S, S) -> x / 255 -> (x - mean_c) / std_c

    The multi-centre loader of the paper uses ``image_size=224`` with mean (0.4738405, 0.30310306, 0.20231445)
    and std (0.2768913, 0.2088029, 0.16106644). The output is a float32 tensor ``(3, S, S)`` without metadata.
    """
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got mean={mean}, std={std}.")
    return Compose([
        LoadPolypImaged(keys="image", reverse_indexing=False),
        EnsureChannelFirstd(keys="image"),
        CheckPolypPaird(image_key="image", label_key="mask"),  # "label" is the bag label here, not a mask
        Resized(keys="image", spatial_size=(int(image_size), int(image_size)), mode="bilinear"),
        ScaleIntensityRanged(keys="image", a_min=0.0, a_max=255.0, b_min=0.0, b_max=1.0),
        NormalizeIntensityd(keys="image", subtrahend=list(mean), divisor=list(std), channel_wise=True),
        EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
    ])


def _is_random(transform: Callable) -> bool:
    parts = transform.flatten().transforms if isinstance(transform, Compose) else (transform,)
    return any(isinstance(t, Randomizable) for t in parts)


class BagDataset(Dataset):
    """A dataset of exams: item ``i`` stacks the per-frame ``transform`` of every frame of ``bags[i]``.

    Item::

        {"image": float tensor (N, 3, H, W), "label": long tensor (), "instance_label": long tensor (N,),
         "exam_id": str, "image_paths": [N str]}

    ``transform`` maps ``{"image": path}`` to ``{"image": (3, H, W)}``, e.g. :func:`mil_frame_transforms`;
    all frames of a bag must come out with one shape. A DataLoader with batch size 1 (EndoKED's bag loader)
    gives ``image`` ``(1, N, 3, H, W)``, ``label`` ``(1,)``, ``instance_label`` ``(1, N)``, ``exam_id`` ``[str]``
    and, by the default collation of lists, ``image_paths`` as ``N`` one-element tuples.

    Args:
        bags: from :func:`exam_bag_datalist`.
        transform: per-frame dictionary transform on the key ``"image"``.
        cache: keep each stacked bag in memory after its first load (``N * 3 * H * W * 4`` bytes per bag); only
            for a deterministic ``transform``.

    Raises:
        ValueError: ``cache`` with a random transform; when loading, a frame that the transform rejects (e.g.
            undecodable or not 3-channel; the transform's own message is kept), that does not come out as
            ``(3, H, W)``, or whose shape differs from the bag's first frame (the message names the file).
        FileNotFoundError: when loading, a frame that does not exist.
    """

    def __init__(self, bags: Sequence[Mapping[str, Any]], transform: Callable, cache: bool = True) -> None:
        if cache and _is_random(transform):
            raise ValueError("BagDataset(cache=True) needs a deterministic transform; the given one is random "
                             "(set cache=False).")
        super().__init__(data=bags, transform=transform)
        self.cache = cache
        self._cached: dict[int, dict[str, Any]] = {}

    def _load(self, bag: Mapping[str, Any]) -> dict[str, Any]:
        frames = []
        for path in bag["image"]:
            try:
                image = torch.as_tensor(self.transform({"image": path})["image"])
            except Exception as err:
                cause = err  # unwrap MONAI's "applying transform ..." RuntimeErrors down to the transform's own error
                while isinstance(cause, RuntimeError) and str(cause).startswith("applying transform") \
                        and cause.__cause__ is not None:
                    cause = cause.__cause__
                kind = FileNotFoundError if isinstance(cause, FileNotFoundError) else ValueError
                raise kind(f"frame {path} of exam {bag['exam_id']!r}: {type(cause).__name__}: {cause}") from err
            if image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(f"frame {path} of exam {bag['exam_id']!r} gives an image of shape "
                                 f"{tuple(image.shape)} after the transform; expected (3, H, W).")
            if frames and image.shape != frames[0].shape:
                raise ValueError(f"frame {path} of exam {bag['exam_id']!r} has shape {tuple(image.shape)} after the "
                                 f"transform but {bag['image'][0]} has {tuple(frames[0].shape)}; resize the frames.")
            frames.append(image.float())
        return {
            "image": torch.stack(frames),
            "label": torch.tensor(int(bag["label"]), dtype=torch.long),
            "instance_label": torch.tensor([int(v) for v in bag["instance_label"]], dtype=torch.long),
            "exam_id": str(bag["exam_id"]),
            "image_paths": [str(p) for p in bag["image"]],
        }

    def _transform(self, index: int) -> dict[str, Any]:
        if index in self._cached:
            return self._cached[index]
        item = self._load(self.data[index])
        if self.cache:
            self._cached[index] = item
        return item


# ---------------------------------------------------------------------------------------------------- reports

_EN_PLACES = ("caecum", "ascending colon", "hepatic flexure", "transverse colon", "descending colon",
              "sigmoid colon", "rectum")
_ZH_PLACES = ("回盲部", "升结肠", "肝曲", "横结肠", "降结肠", "乙状结肠", "直肠")
_EN_SHAPES = ("sessile", "pedunculated", "flat", "semi-pedunculated")
_EN_REMOVAL = ("removed by cold snare", "removed by hot snare", "removed with biopsy forceps",
               "retrieved for histology")


def exam_report(label: int | None, rng: np.random.Generator, language: str = "en") -> str:
    """A short colonoscopy report consistent with the exam label, for synthetic and rebuilt exams.

    ``label=1``: one polyp with size, shape and place ("A 6 mm sessile polyp in the sigmoid colon, removed by cold
    snare." / "乙状结肠见一枚0.6cm息肉"); ``label=0``: no polyp ("No polyps were seen." / "全结肠未见息肉");
    ``label=None``: a hedged finding that a report labeller should leave out ("possible polyp" / "可疑息肉").

    Args:
        label: 1, 0 or None.
        rng: random generator (choices of size, place and wording).
        language: ``"en"`` or ``"zh"``.
    """
    if language not in ("en", "zh") or label not in (0, 1, None):
        raise ValueError(f"language must be 'en' or 'zh' and label 0, 1 or None; got {language!r}, {label!r}.")
    place = int(rng.integers(len(_EN_PLACES)))
    size_mm = int(rng.integers(3, 16))
    if language == "en":
        if label == 1:
            article = "An" if size_mm in (8, 11) else "A"
            shape = _EN_SHAPES[int(rng.integers(len(_EN_SHAPES)))]
            removal = _EN_REMOVAL[int(rng.integers(len(_EN_REMOVAL)))]
            return (f"Colonoscopy to the caecum. {article} {size_mm} mm {shape} polyp in the {_EN_PLACES[place]}, "
                    f"{removal}.")
        if label == 0:
            return ("Colonoscopy to the caecum, good bowel preparation. " if rng.uniform() < 0.5 else "") + \
                "No polyps were seen."
        return f"Possible small polyp in the {_EN_PLACES[place]}, not confirmed; poor bowel preparation."
    if label == 1:
        return f"进镜至回盲部。{_ZH_PLACES[place]}见一枚{size_mm / 10:.1f}cm息肉，予以圈套切除。"
    if label == 0:
        return ("进镜至回盲部，肠道准备良好。" if rng.uniform() < 0.5 else "") + "全结肠未见息肉。"
    return f"{_ZH_PLACES[place]}可疑息肉样隆起，肠道准备欠佳，性质待定。"


# ---------------------------------------------------------------------------------------------------- polyp sets


def polyp_free_window(mask: np.ndarray, crop_fraction: float = 0.35,
                      margin_fraction: float = 0.02) -> tuple[int, int, int, int] | None:
    """The largest axis-aligned window with the frame's aspect ratio that holds no pixel of the dilated mask.

    The mask ``m`` (``(H, W)``, nonzero = polyp) is dilated by a disc of radius ``r = max(2, margin_fraction *
    min(H, W))`` pixels. A window of height ``h`` has width ``w = round(h W / H)``; it is free when the integral
    image ``S`` of the dilated mask gives ``S[y+h, x+w] - S[y, x+w] - S[y+h, x] + S[y, x] = 0``. Freedom is
    monotone in ``h`` (a free window contains smaller free windows), so the largest ``h`` is found by bisection over
    ``[ceil(crop_fraction H), H]``; of the free placements of that size the one whose centre is nearest to the
    frame centre is returned (first in row-major order on ties).

    Returns:
        ``(y0, x0, y1, x1)`` (end-exclusive), or None when even a window of ``crop_fraction`` of the side is
        not free.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"crop_fraction must be in (0, 1], got {crop_fraction}.")
    height, width = mask.shape
    radius = max(2, int(round(margin_fraction * min(height, width))))
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))
    dilated = cv2.dilate((mask > 0).astype(np.uint8), kernel)
    integral = np.pad(dilated.astype(np.int64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))

    def free_placements(h: int) -> tuple[int, np.ndarray]:
        w = min(width, max(1, int(round(h * width / height))))
        sums = integral[h:, w:] - integral[:-h, w:] - integral[h:, :-w] + integral[:-h, :-w]
        return w, np.argwhere(sums == 0)

    low, high = max(1, math.ceil(crop_fraction * height - 1e-9)), height  # 1e-9: 0.35 * 20 is 7.000000000000001
    if not len(free_placements(low)[1]):
        return None
    while low < high:  # invariant: height `low` has a free placement
        mid = (low + high + 1) // 2
        low, high = (mid, high) if len(free_placements(mid)[1]) else (low, mid - 1)
    w, placements = free_placements(low)
    centre = np.array([(height - low) / 2.0, (width - w) / 2.0])
    y0, x0 = placements[int(np.argmin(((placements - centre) ** 2).sum(1)))]
    return int(y0), int(x0), int(y0) + low, int(x0) + w


def _frame_arrays(pair: Mapping[str, str]) -> tuple[np.ndarray, np.ndarray]:
    try:
        with Image.open(pair["image"]) as img:
            rgb = np.asarray(img.convert("RGB"))
        with Image.open(pair["label"]) as img:
            mask = np.asarray(img.convert("L"))
    except OSError as err:
        raise ValueError(f"cannot read the polyp frame {pair['image']} or its mask {pair['label']}: {err}") from err
    return rgb, mask


def make_exams_from_polyp_sets(
    polyp_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    frames_per_exam: Sequence[int] = (3, 6),
    positive_fraction: float = 0.5,
    crop_fraction: float = 0.35,
    size: Sequence[int] = (352, 352),
    seed: int = 0,
) -> Path:
    """Turn polyp frames with masks (PraNet or flat ``<Set>/images|masks`` layout) into an exam dataset.

    * every source frame with its mask is a positive frame; its negative crop is :func:`polyp_free_window` of
      its mask (a source without a free window of ``crop_fraction`` of the side has none); all frames are resized
      to ``size`` (image bilinear, mask nearest; a crop of side fraction ``s`` is thus magnified ``1 / s`` times
      more than its full frame);
    * the sources are shuffled (``seed``) and dealt out to exams; exam ``k`` gets ``n_k`` frames drawn uniformly
      from ``frames_per_exam[0]..frames_per_exam[1]`` and is positive when ``floor((k + 1) p) > floor(k p)`` with
      ``p = positive_fraction`` (a fraction ``p`` of the exams, evenly spread);
    * a positive exam holds ``ceil(n_k / 2)`` full frames and the negative crops of ``floor(n_k / 2)`` of these
      same sources (sources without a crop are used here first, as full frames); a negative exam holds the crops
      of ``n_k`` croppable sources and none of their full frames. A source and its crop therefore always fall in
      one exam, so no source frame leaks across an exam-level split. When the sources run out the last exams are
      smaller; when no croppable source is left, the remaining exams are positive;
    * written: ``exams/<exam_id>/<NN>_<set>_<stem>[_crop].jpg`` (JPEG quality 95, order shuffled within the
      exam), ``masks/<exam_id>/<same stem>.png`` (0/255; empty for crops), ``instance_labels.csv``,
      ``exam_labels.csv``, ``reports.csv`` (text from :func:`exam_report`, English and Chinese alternating) and
      ``sources.csv`` (``image,source_image,source_mask,y0,x0,y1,x1``: the source and the crop window, the whole
      frame for positives).

    The output is written into a staging folder and renamed to ``out_dir`` when complete. Deterministic.

    Raises:
        FileExistsError: ``out_dir`` exists and is not empty.
        ValueError: bad arguments, no polyp set or pair under ``polyp_root`` (from
            :func:`~common.data.polyp_folders.polyp_datalist`), or an unreadable frame.
    """
    lo, hi = (int(v) for v in frames_per_exam)
    height, width = (int(v) for v in size)
    if not 1 <= lo <= hi or not 0.0 <= positive_fraction <= 1.0 or min(height, width) < 16:
        raise ValueError(f"need 1 <= frames_per_exam[0] <= frames_per_exam[1], positive_fraction in [0, 1] and "
                         f"size >= 16; got frames_per_exam={frames_per_exam}, positive_fraction={positive_fraction}, "
                         f"size={size}.")
    out_dir = Path(out_dir).expanduser().absolute()
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"output folder {out_dir} exists and is not empty; pass a new folder.")
    pairs = polyp_datalist(polyp_root)
    rng = np.random.default_rng(seed)
    croppable, whole_only = [], []  # (pair, window) in shuffled order
    for i in rng.permutation(len(pairs)):
        window = polyp_free_window(_frame_arrays(pairs[i])[1], crop_fraction)
        (croppable if window is not None else whole_only).append((pairs[i], window))
    logger.info("%d of %d source frames have a polyp-free crop of at least %.0f %% of the side", len(croppable),
                len(pairs), 100 * crop_fraction)

    with staged_folder(out_dir) as tmp:
        instance_rows, exam_rows, report_rows, source_rows = [], [], [], []
        k = 0
        while croppable or whole_only:
            n_frames = int(rng.integers(lo, hi + 1))
            positive = not croppable or math.floor((k + 1) * positive_fraction) > math.floor(k * positive_fraction)
            frames = []  # (pair, window); window None = the full frame
            if positive:
                n_crops = min(n_frames // 2, len(croppable))
                cropped, croppable = croppable[:n_crops], croppable[n_crops:]
                n_whole = n_frames - n_frames // 2 - n_crops
                whole, whole_only = whole_only[:n_whole], whole_only[n_whole:]
                if len(whole) < n_whole:
                    more = n_whole - len(whole)
                    whole, croppable = whole + [(p, None) for p, _ in croppable[:more]], croppable[more:]
                frames = [(p, None) for p, _ in cropped + whole] + cropped
            else:
                frames, croppable = croppable[:n_frames], croppable[n_frames:]
            exam_id = f"exam_{k:04d}"
            (tmp / EXAMS_DIR / exam_id).mkdir(parents=True)
            (tmp / MASKS_DIR / exam_id).mkdir(parents=True)
            for n, f in enumerate(rng.permutation(len(frames))):
                pair, window = frames[f]
                rgb, mask = _frame_arrays(pair)
                y0, x0, y1, x1 = window if window is not None else (0, 0, rgb.shape[0], rgb.shape[1])
                image = Image.fromarray(rgb[y0:y1, x0:x1]).resize((width, height), Image.Resampling.BILINEAR)
                label_mask = (mask >= 128).astype(np.uint8) * 255 if window is None else np.zeros_like(mask)
                label_mask = Image.fromarray(label_mask).resize((width, height), Image.Resampling.NEAREST)
                stem = f"{n:02d}_{pair['set']}_{pair['name']}" + ("_crop" if window is not None else "")
                image_rel = f"{EXAMS_DIR}/{exam_id}/{stem}.jpg"
                image.save(tmp / image_rel, quality=95)
                label_mask.save(tmp / MASKS_DIR / exam_id / f"{stem}.png")
                instance_rows.append((image_rel, int(window is None)))
                source_rows.append((image_rel, pair["image"], pair["label"], y0, x0, y1, x1))
            exam_rows.append((exam_id, int(positive)))
            report_rows.append((exam_id, exam_report(int(positive), rng, ("en", "zh")[k % 2])))
            k += 1
        for name, header, rows in ((INSTANCE_LABELS_CSV, ("image", "label"), instance_rows),
                                   (EXAM_LABELS_CSV, ("exam_id", "label"), exam_rows),
                                   (REPORTS_CSV, ("exam_id", "report"), report_rows),
                                   ("sources.csv", ("image", "source_image", "source_mask", "y0", "x0", "y1", "x1"),
                                    source_rows)):
            with open(tmp / name, "w", newline="", encoding="utf-8") as f:
                writer = csv.writer(f)
                writer.writerow(header)
                writer.writerows(rows)
    n_pos = sum(label for _, label in exam_rows)
    logger.info("wrote %d exams (%d positive, %d negative) with %d frames (%d with a polyp) to %s", len(exam_rows),
                n_pos, len(exam_rows) - n_pos, len(instance_rows), sum(v for _, v in instance_rows), out_dir)
    return out_dir


def frame_datalist(folder: str | os.PathLike) -> list[dict[str, str]]:
    """Every image file below ``folder`` (sorted), as ``{"image": path, "id": path relative to folder, without its
    extension}`` (frame names repeat across exams, so the id keeps the exam folder: ``exam_000/frame_00``).

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: no image file below it.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.rglob("*")
                    if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise ValueError(f"no image file ({', '.join(IMAGE_EXTENSIONS)}) in {folder} or below it")
    return [{"image": str(p), "id": p.relative_to(folder).with_suffix("").as_posix()} for p in images]
