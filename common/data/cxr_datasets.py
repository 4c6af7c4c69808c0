"""Chest X-ray dataset readers for ASG pre-training and its downstream protocols (spec ``asg.md`` §2.1, §2.3, §6).

ASG, Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training", MICCAI 2024, pre-trains on
MIMIC-CXR-JPG and evaluates with MGCA's downstream protocols (Wang et al., NeurIPS 2022). Every function here
takes plain paths and numbers and returns plain, JSON-serialisable datalists, ``{"train": [...], "valid": [...],
"test": [...]}``, so that a bundle config can call it directly, e.g.
``"$common.data.cxr_datasets.rsna_pneumonia_datalist(@dataset_dir, fraction=0.01)['train']"``.

* :func:`read_region_annotation`: the per-image annotation ASG consumes (``labels.pickle``, §2.3; or the same
  schema as JSON), converted to the shared pre-training record format (``sentences``, ``labels``, ``boxes``,
  ``sent_index``; padding removed).
* :func:`mimic_cxr_datalist`: MIMIC-CXR-JPG 2.0.0 image-report pairs (§2.1): frontal views, official split with
  ``validate`` and ``test`` merged into ``"valid"``, reports cleaned by :mod:`common.data.cxr_reports`.
* Downstream (§6.1), entries ``{"id": str, "image": str, "label": ...}``: :func:`chexpert_datalist`,
  :func:`rsna_pneumonia_datalist`, :func:`rsna_segmentation_datalist` (+ ``"boxes"``; mask: :func:`boxes_to_mask`),
  :func:`covidx_datalist`, :func:`siim_datalist` (+ ``"rle"``; mask: :func:`rle_decode`), :func:`nih_datalist`.
  ``fraction`` (1 / 10 / 100 % label budgets) subsamples the TRAIN split only (:func:`sample_fraction`).

Randomness follows MGCA where its code fixes it: 70/15/15 splits are scikit-learn ``train_test_split`` with
``random_state=0`` (first the 30 % hold-out, then halved: the first half is test, the second valid), over the
same row order as MGCA's (RSNA: patient ids sorted), so they reproduce MGCA's RSNA split; label fractions draw
``round(fraction * n)`` rows with ``numpy.random.RandomState(42).choice`` without replacement, which is what
``pandas.DataFrame.sample(frac=fraction, random_state=42)`` draws. Deliberate deviations are named in each
function's docstring.

Checks fail early, with the file, its line and the image in the message: a missing table is a
FileNotFoundError naming the expected path, a row naming a missing image is a FileNotFoundError naming both, a
bad value a ValueError naming the file and line.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import math
import os
import pickle
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sklearn.model_selection import train_test_split

from common.data.cxr_reports import MIN_REPORT_TOKENS, read_mimic_report, report_sentences

__all__ = [
    "NUM_TAGS",
    "NUM_REGIONS",
    "CHEXPERT_TASKS",
    "CHEXPERT_UNCERTAIN_MAPPINGS",
    "COVIDX_CLASSES",
    "NIH_CLASSES",
    "read_region_annotation",
    "mimic_cxr_datalist",
    "sample_fraction",
    "chexpert_datalist",
    "rsna_pneumonia_datalist",
    "rsna_segmentation_datalist",
    "boxes_to_mask",
    "covidx_datalist",
    "siim_datalist",
    "rle_decode",
    "nih_datalist",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
Datalist = dict[str, list[dict[str, Any]]]

NUM_TAGS = 40
"""Length of the finding-tag vector of a record (``len(common.data.cxr_findings.TAGS)``, §3.5)."""
NUM_REGIONS = 23
"""Rows of the ``region`` / ``sent_index`` arrays of ``labels.pickle`` (ASG ``num_region``, §2.3)."""

CHEXPERT_TASKS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The 5 CheXpert competition labels, in MGCA's order (the ``label`` vector of :func:`chexpert_datalist`)."""
CHEXPERT_UNCERTAIN_MAPPINGS: dict[str, float] = {
    "Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0, "Edema": 1.0, "Pleural Effusion": 1.0,
}
"""Value given to an uncertain (-1) CheXpert label: U-Ones for Atelectasis/Edema/Effusion, U-Zeros otherwise."""
COVIDX_CLASSES: tuple[str, ...] = ("normal", "pneumonia", "COVID-19")
"""COVIDx class names; the ``label`` of :func:`covidx_datalist` is the index in this tuple (MGCA's 0 / 1 / 2)."""
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
"""The 14 ChestX-ray14 findings as spelled in ``Data_Entry_2017.csv``, in the order of Wang et al. (CVPR 2017)."""

_FRONTAL_VIEWS = frozenset({"PA", "AP"})
_MIMIC_SPLITS = {"train": "train", "validate": "valid", "test": "test"}
_NIH_NO_FINDING = "No Finding"
_SIIM_NEGATIVE = "-1"


# --------------------------------------------------------------------------------------------- small helpers
def _open_text(path: Path):
    """Text handle of a plain or gzip-compressed (``.gz``) file."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", newline="", encoding="utf-8-sig")
    return open(path, newline="", encoding="utf-8-sig")


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    return path


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """``(line number, row)`` of a CSV file with a header; names and values stripped of surrounding spaces.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a required column is missing, or a row has fewer fields than the header.
    """
    _require_file(path, "table")
    with _open_text(path) as handle:
        reader = csv.reader(handle)
        header = [name.strip() for name in next(reader, [])]
        missing = [name for name in required if name not in header]
        if missing:
            raise ValueError(f"{path} has no column(s) {missing}; its header is {header}.")
        for fields in reader:
            if not fields:
                continue
            if len(fields) < len(header):
                raise ValueError(f"{path} line {reader.line_num}: {len(fields)} fields, the header has {len(header)}.")
            yield reader.line_num, {name: value.strip() for name, value in zip(header, fields)}


def _find_table(root: Path, name: str) -> Path:
    """``root/name`` or ``root/name.gz``; FileNotFoundError naming both when neither exists."""
    for candidate in (root / name, root / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"expected {root / name} (or {root / name}.gz); neither exists.")


def _check_image(image: Path, source: Path, line: int, check_files: bool) -> str:
    if check_files and not image.is_file():
        raise FileNotFoundError(f"{source} line {line} names the image {image}, which does not exist.")
    return str(image)


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")


def _check_valid_fraction(valid_fraction: float) -> None:
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}.")


def _legacy_choice(n: int, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``numpy.random.RandomState(seed).choice(n, k, replace=False)``."""
    return np.sort(np.random.RandomState(seed).choice(n, size=k, replace=False))


def sample_fraction(records: Sequence[T], fraction: float, seed: int = 42) -> list[T]:
    """A deterministic random subset of ``round(fraction * n)`` records (at least 1), in their original order.

    ``k = max(1, round(fraction * n))`` (Python ``round``, as ``pandas.DataFrame.sample(frac=...)``); the kept
    indices are ``numpy.random.RandomState(seed).choice(n, k, replace=False)``, the rows
    ``DataFrame.sample(frac=fraction, random_state=seed)`` keeps, so MGCA's 1 % / 10 % subsets of a datalist in
    the same row order are reproduced. ``fraction = 1`` returns every record.

    Args:
        records: the training datalist (only training data is ever subsampled, §6.1).
        fraction: label fraction in ``(0, 1]`` (1.0 / 0.1 / 0.01 in the paper).
        seed: seed of the draw (MGCA: 42).

    Raises:
        ValueError: ``fraction`` outside ``(0, 1]`` or no records.
    """
    _check_fraction(fraction)
    if not records:
        raise ValueError("cannot sample a fraction of an empty datalist.")
    n = len(records)
    if fraction == 1.0:
        return list(records)
    k = max(1, round(fraction * n))
    return [records[i] for i in _legacy_choice(n, k, seed).tolist()]


def _with_fraction(datalist: Datalist, fraction: float, seed: int) -> Datalist:
    """``datalist`` with its ``"train"`` list subsampled by :func:`sample_fraction`; the other splits untouched."""
    return {**datalist, "train": sample_fraction(datalist["train"], fraction, seed)}


def _split_off(items: Sequence[T], size: float | int, seed: int, source: Path, what: str) -> tuple[list[T], list[T]]:
    """``sklearn.model_selection.train_test_split(items, test_size=size, random_state=seed)``, clear errors."""
    try:
        kept, held = train_test_split(list(items), test_size=size, random_state=seed)
    except ValueError as err:
        raise ValueError(f"{source}: {len(items)} {what} are too few to hold out {size} of them ({err}).") from err
    return kept, held


def _split_70_15_15(items: Sequence[T], seed: int, source: Path, what: str, holdout: float | int = 0.3
                    ) -> Datalist:
    """MGCA's split: ``holdout`` of the items held out (``train_test_split``), then halved into test and valid."""
    train, held = _split_off(items, holdout, seed, source, what)
    test, valid = _split_off(held, 0.5, seed, source, what)
    return {"train": train, "valid": valid, "test": test}


# ------------------------------------------------------------------------------------- region annotation (§2.3)
def _as_array(value: Any, dtype: type, source: Path, key: str, field: str) -> np.ndarray:
    try:
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source} record {key!r}: {field} is not a numeric array ({err}).") from err


def _convert_labels(value: Any, source: Path, key: str) -> list[int]:
    labels = _as_array(value, float, source, key, "labels")
    if labels.size == 0:
        raise ValueError(f"{source} record {key!r}: empty tag list (labels), expected {NUM_TAGS} values in 1/0/-1.")
    if labels.shape != (NUM_TAGS,):
        raise ValueError(f"{source} record {key!r}: labels has shape {labels.shape}, expected ({NUM_TAGS},).")
    if not np.isin(labels, (1.0, 0.0, -1.0)).all():
        bad = sorted(set(labels[~np.isin(labels, (1.0, 0.0, -1.0))].tolist()))
        raise ValueError(f"{source} record {key!r}: labels hold {bad}; only 1, 0 and -1 are allowed.")
    return labels.astype(int).tolist()


def _convert_boxes(value: Any, source: Path, key: str) -> np.ndarray:
    """Valid rows of ``region`` (x1 >= 0), which must come before the padding rows (x1 = -1)."""
    region = _as_array(value, float, source, key, "region")
    if region.size == 0:
        return np.zeros((0, 4))
    if region.ndim != 2 or region.shape[1] != 4 or region.shape[0] > NUM_REGIONS:
        raise ValueError(f"{source} record {key!r}: region has shape {region.shape}, expected (<= {NUM_REGIONS}, 4).")
    valid = region[:, 0] >= 0
    n_valid = int(valid.sum())
    if not valid[:n_valid].all():
        raise ValueError(f"{source} record {key!r}: a region row with x1 >= 0 follows a padding row (x1 = -1); "
                         "valid rows must come first.")
    if not (region[n_valid:, 0] == -1).all():
        raise ValueError(f"{source} record {key!r}: padding rows of region must have x1 = -1.")
    boxes = region[:n_valid]
    if not np.isfinite(boxes).all() or (boxes[:, 1] < 0).any() or (boxes[:, 2] <= boxes[:, 0]).any() \
            or (boxes[:, 3] <= boxes[:, 1]).any():
        raise ValueError(f"{source} record {key!r}: region boxes must be finite pascal_voc [x1, y1, x2, y2] with "
                         f"0 <= x1 < x2 and 0 <= y1 < y2; got {boxes.tolist()}.")
    return boxes


def _convert_sent_index(value: Any, n_boxes: int, n_words: int, source: Path, key: str) -> list[list[int]]:
    """Ragged rows of ``sent_index`` (trailing -1 padding removed), one per valid box, each non-empty."""
    index = _as_array(value, float, source, key, "sent_index")
    if index.size == 0:
        index = np.zeros((0, 0))
    if index.ndim != 2:
        raise ValueError(f"{source} record {key!r}: sent_index has shape {index.shape}, expected 2 dimensions.")
    if index.shape[0] < n_boxes:
        raise ValueError(f"{source} record {key!r}: sent_index has {index.shape[0]} rows for {n_boxes} valid boxes.")
    if (index != np.round(index)).any() or (index < -1).any():
        raise ValueError(f"{source} record {key!r}: sent_index holds values that are not integers >= -1.")
    is_word = index >= 0
    if is_word[n_boxes:].any():
        row = n_boxes + int(np.argmax(is_word[n_boxes:].any(axis=1)))
        raise ValueError(f"{source} record {key!r}: sent_index row {row} has word positions but region has only "
                         f"{n_boxes} valid boxes (sent_index rows must match the box rows).")
    if (is_word[:, 1:] > is_word[:, :-1]).any():
        raise ValueError(f"{source} record {key!r}: sent_index rows must be word positions followed by -1 padding.")
    counts = is_word[:n_boxes].sum(axis=1)
    if n_boxes and (counts == 0).any():
        raise ValueError(f"{source} record {key!r}: box row {int(np.argmin(counts))} has no sentence position in "
                         "sent_index (every box needs its aligned sentence words).")
    if is_word.any() and index[is_word].max() >= n_words:
        raise ValueError(f"{source} record {key!r}: sent_index position {int(index[is_word].max())} is past the "
                         f"{n_words} words of its sentences.")
    return [row[row >= 0].astype(int).tolist() for row in index[:n_boxes]]


def _convert_record(key: str, raw: Any, source: Path) -> dict[str, list]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source} record {key!r} is a {type(raw).__name__}, expected a dict.")
    missing = [f for f in ("path2sent", "labels", "region", "sent_index") if f not in raw]
    if missing:
        raise ValueError(f"{source} record {key!r} has no field(s) {missing}.")
    sentences = raw["path2sent"]
    if isinstance(sentences, str) or not all(isinstance(s, str) for s in sentences):
        raise ValueError(f"{source} record {key!r}: path2sent must be a list of sentences (str).")
    sentences = [s for s in sentences if s.strip()]
    labels = _convert_labels(raw["labels"], source, key)
    boxes = _convert_boxes(raw["region"], source, key)
    n_words = len(" ".join(sentences).split())
    sent_index = _convert_sent_index(raw["sent_index"], len(boxes), n_words, source, key)
    return {"sentences": sentences, "labels": labels, "boxes": boxes.tolist(), "sent_index": sent_index}


def read_region_annotation(path: str | os.PathLike) -> dict[str, dict[str, list]]:
    """Read ASG's per-image annotation (``labels.pickle``, §2.3) and convert it to the shared record format.

    Input schema (``.pickle``/``.pkl``, or the same structure as ``.json``): ``{key: {"path2sent": [str, ...],
    "labels": [40] in {1, 0, -1}, "region": [23, 4] pascal_voc boxes in original image pixels, valid rows first,
    padding rows x1 = -1 (or empty), "sent_index": [23, 110] word positions, -1 padded}}``; numpy arrays are
    accepted wherever lists are.

    Output per key: ``{"sentences": [str, ...] (empty ones dropped), "labels": [int] * 40,
    "boxes": [[x1, y1, x2, y2], ...] (the n valid rows), "sent_index": [[int, ...], ...] (n ragged rows)}``.

    Security: unpickling runs code named in the file; only read ``.pickle`` files you trust (prefer JSON).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown extension, not a dict of records, or a record that breaks the schema (empty tag
            list, tag values outside {1, 0, -1}, valid box rows after padding, inverted boxes, sent_index rows
            not matching the box rows, positions past the sentences' words); the message names file and key.
    """
    source = _require_file(Path(path).expanduser(), "region annotation file")
    suffix = source.suffix.lower()
    if suffix == ".json":
        with open(source, encoding="utf-8") as handle:
            data = json.load(handle)
    elif suffix in (".pickle", ".pkl"):
        with open(source, "rb") as handle:
            data = pickle.load(handle)  # noqa: S301 - documented: trusted files only
    else:
        raise ValueError(f"region annotation file {source} must be .pickle, .pkl or .json.")
    if not isinstance(data, Mapping) or not data:
        raise ValueError(f"region annotation file {source} must hold a non-empty dict of key -> record.")
    return {str(key): _convert_record(str(key), raw, source) for key, raw in data.items()}


# ----------------------------------------------------------------------------------------- MIMIC-CXR (§2.1)
def _mimic_metadata(root: Path) -> tuple[Path, dict[str, dict[str, str]]]:
    table = _find_table(root, "mimic-cxr-2.0.0-metadata.csv")
    rows = {}
    for _, row in _read_csv(table, ("dicom_id", "subject_id", "study_id", "ViewPosition")):
        rows[row["dicom_id"]] = row
    return table, rows


def _mimic_folder(subject: str, study: str, source: Path, line: int) -> str:
    """``files/p<2 digits>/p<subject>/s<study>`` of a MIMIC study."""
    if not (subject.isdigit() and len(subject) >= 2 and study.isdigit()):
        raise ValueError(f"{source} line {line}: subject_id {subject!r} / study_id {study!r} are not MIMIC ids.")
    return f"files/p{subject[:2]}/p{subject}/s{study}"


def _report_sentences(report: Path, image: str) -> list[str] | None:
    """Cleaned sentences of a MIMIC report; None when it has neither findings nor impression."""
    if not report.is_file():
        raise FileNotFoundError(f"report {report} of the image {image} does not exist.")
    parsed = read_mimic_report(report)  # an unreadable file is an error, not a report without text
    try:
        return report_sentences(parsed)
    except ValueError as err:
        logger.debug("dropping the study of %s: %s", report, err)
        return None


def _annotation_record(annotation: Mapping[str, dict], keys: Sequence[str]) -> dict | None:
    return next((annotation[k] for k in keys if k in annotation), None)


def mimic_cxr_datalist(
    root: str | os.PathLike,
    annotation: str | os.PathLike | Mapping[str, dict] | None = None,
    reports_dir: str | os.PathLike | None = None,
    merge_test: bool = True,
    check_files: bool = True,
) -> Datalist:
    """MIMIC-CXR-JPG 2.0.0 image-report records (shared pre-training record format), spec §2.1.

    Layout: ``root/mimic-cxr-2.0.0-metadata.csv[.gz]`` (dicom_id, subject_id, study_id, ViewPosition),
    ``root/mimic-cxr-2.0.0-split.csv[.gz]`` (dicom_id, study_id, subject_id, split in train/validate/test),
    images ``root/files/p<first 2 digits of subject>/p<subject_id>/s<study_id>/<dicom_id>.jpg`` and reports
    ``reports_dir/files/p../p<subject_id>/s<study_id>.txt`` (``reports_dir`` default ``root``).

    MGCA's recipe: frontal views only (ViewPosition PA or AP); official ``validate`` and ``test`` merged into
    ``"valid"`` (``merge_test=False`` keeps ``test`` apart); a study whose report has neither findings nor
    impression is dropped, as are reports with fewer than ``MIN_REPORT_TOKENS`` kept words.

    Without ``annotation`` the sentences come from the report (:func:`common.data.cxr_reports.read_mimic_report`
    + ``report_sentences``), ``labels`` are all 0 and there are no boxes. With ``annotation``
    (:func:`read_region_annotation` output, or its path) an image's record is looked up by its path relative to
    ``root`` (``files/p10/...jpg``, ASG's CSV key), relative to ``root/files``, or by dicom_id; its sentences,
    labels, boxes and sent_index are taken from there (sent_index positions refer to those sentences), the
    report is not read, and images without an annotation record are dropped (counted in the log).

    Returns:
        ``{"train": [...], "valid": [...], "test": [...]}`` of ``{"id": dicom_id, "image": str, "sentences",
        "labels", "boxes", "sent_index"}``, in split-file order (``"test"`` empty when merged).

    Raises:
        FileNotFoundError: a table, an image or a needed report is missing (named).
        ValueError: unknown split value, a dicom missing from the metadata, inconsistent ids, or no record kept.
    """
    root = Path(root).expanduser()
    reports = Path(reports_dir).expanduser() if reports_dir is not None else root
    if annotation is not None and not isinstance(annotation, Mapping):
        annotation = read_region_annotation(annotation)
    meta_table, metadata = _mimic_metadata(root)
    split_table = _find_table(root, "mimic-cxr-2.0.0-split.csv")
    out: Datalist = {"train": [], "valid": [], "test": []}
    dropped = {"lateral": 0, "no findings/impression": 0, f"< {MIN_REPORT_TOKENS} words": 0, "not annotated": 0}
    sentences_of_study: dict[str, list[str] | None] = {}
    for line, row in _read_csv(split_table, ("dicom_id", "study_id", "subject_id", "split")):
        dicom, split = row["dicom_id"], _MIMIC_SPLITS.get(row["split"])
        if split is None:
            raise ValueError(f"{split_table} line {line}: split {row['split']!r} is not one of {list(_MIMIC_SPLITS)}.")
        meta = metadata.get(dicom)
        if meta is None:
            raise ValueError(f"{split_table} line {line}: dicom_id {dicom} is not in {meta_table}.")
        if (meta["subject_id"], meta["study_id"]) != (row["subject_id"], row["study_id"]):
            raise ValueError(f"{split_table} line {line}: subject/study ids of {dicom} differ from {meta_table}.")
        if meta["ViewPosition"] not in _FRONTAL_VIEWS:
            dropped["lateral"] += 1
            continue
        folder = _mimic_folder(row["subject_id"], row["study_id"], split_table, line)
        relative = f"{folder}/{dicom}.jpg"
        if annotation is not None:
            record = _annotation_record(annotation, (relative, relative[len("files/"):], dicom))
            if record is None:
                dropped["not annotated"] += 1
                continue
            sentences = list(record["sentences"])
        else:
            record = None
            if folder not in sentences_of_study:
                sentences_of_study[folder] = _report_sentences(reports / f"{folder}.txt", relative)
            sentences = sentences_of_study[folder]
            if sentences is None:
                dropped["no findings/impression"] += 1
                continue
        if sum(len(s.split()) for s in sentences) < MIN_REPORT_TOKENS:
            dropped[f"< {MIN_REPORT_TOKENS} words"] += 1
            continue
        image = _check_image(root / relative, split_table, line, check_files)
        out["valid" if split == "test" and merge_test else split].append({
            "id": dicom, "image": image, "sentences": sentences,
            "labels": list(record["labels"]) if record is not None else [0] * NUM_TAGS,
            "boxes": [list(b) for b in record["boxes"]] if record is not None else [],
            "sent_index": [list(r) for r in record["sent_index"]] if record is not None else [],
        })
    if not any(out.values()):
        raise ValueError(f"no MIMIC-CXR image kept from {split_table} (dropped: {dropped}).")
    logger.info("MIMIC-CXR %s: %s images kept; dropped %s", root,
                {k: len(v) for k, v in out.items()}, dropped)
    return out


# ------------------------------------------------------------------------------------------- CheXpert (§6.1)
def _chexpert_label(value: str, task: str, source: Path, line: int) -> float:
    """NaN (empty) -> 0, 1 -> 1, 0 -> 0, -1 -> :data:`CHEXPERT_UNCERTAIN_MAPPINGS` of ``task``."""
    if value == "":
        return 0.0
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number not in (1.0, 0.0, -1.0):
        raise ValueError(f"{source} line {line}: {task} = {value!r}; expected 1, 0, -1 or empty.")
    return CHEXPERT_UNCERTAIN_MAPPINGS[task] if number == -1.0 else number


def _chexpert_rows(root: Path, name: str, check_files: bool) -> list[dict[str, Any]]:
    source = root / name
    entries = []
    for line, row in _read_csv(source, ("Path", "Frontal/Lateral", *CHEXPERT_TASKS)):
        if row["Frontal/Lateral"] != "Frontal":
            continue
        parts = Path(row["Path"]).parts
        relative = Path(*parts[1:]) if len(parts) > 1 and parts[0].startswith("CheXpert") else Path(row["Path"])
        entries.append({
            "id": relative.as_posix(),
            "image": _check_image(root / relative, source, line, check_files),
            "label": [_chexpert_label(row[t], t, source, line) for t in CHEXPERT_TASKS],
        })
    if not entries:
        raise ValueError(f"{source} has no frontal image.")
    return entries


def chexpert_datalist(
    root: str | os.PathLike, fraction: float = 1.0, seed: int = 42, valid_size: int = 5000, split_seed: int = 0,
    check_files: bool = True,
) -> Datalist:
    """CheXpert v1.0 (or -small) 5-label classification datalist (MGCA protocol, §6.1).

    ``root/train.csv`` and ``root/valid.csv`` (columns Path, Frontal/Lateral and the :data:`CHEXPERT_TASKS`);
    ``Path`` starts with the dataset folder name (``CheXpert-v1.0-small/train/...``), which is replaced by
    ``root``. Frontal images only. Labels: empty (NaN) -> 0, uncertain -1 -> 1 for Atelectasis, Edema and
    Pleural Effusion (U-Ones) and -> 0 for Cardiomegaly and Consolidation (U-Zeros).

    Splits: test = the official ``valid.csv``; valid = ``min(valid_size, max(1, n // 5))`` frontal training
    images drawn with ``RandomState(split_seed).choice`` (5,000 for the real data, the ``n // 5`` cap only
    matters for small copies); train = the rest, then subsampled by ``fraction`` (:func:`sample_fraction`).
    Deviation from MGCA: its valid set is drawn before the frontal filter and after removing the CheXpert 5x200
    zero-shot set; we draw 5,000 frontal images from the whole frontal training set.

    Returns:
        ``{"train", "valid", "test"}`` lists of ``{"id": relative path, "image": str, "label": [5 floats]}``.
    """
    root = Path(root).expanduser()
    train = _chexpert_rows(root, "train.csv", check_files)
    test = _chexpert_rows(root, "valid.csv", check_files)
    if len(train) < 2:
        raise ValueError(f"{root / 'train.csv'} has {len(train)} frontal image(s); at least 2 are needed.")
    n_valid = min(valid_size, max(1, len(train) // 5))
    held = set(_legacy_choice(len(train), n_valid, split_seed).tolist())
    datalist = {"train": [e for i, e in enumerate(train) if i not in held],
                "valid": [e for i, e in enumerate(train) if i in held], "test": test}
    return _with_fraction(datalist, fraction, seed)


# ----------------------------------------------------------------------------------------------- RSNA (§6.1)
def _rsna_patients(root: Path, check_files: bool) -> tuple[Path, list[dict[str, Any]]]:
    """One entry per patient (sorted by patientId): Target and the union of its boxes [x1, y1, x2, y2]."""
    source = root / "stage_2_train_labels.csv"
    patients: dict[str, dict[str, Any]] = {}
    for line, row in _read_csv(source, ("patientId", "x", "y", "width", "height", "Target")):
        pid, target = row["patientId"], row["Target"]
        if target not in ("0", "1"):
            raise ValueError(f"{source} line {line}: Target {target!r} is not 0 or 1.")
        box_fields = [row[k] for k in ("x", "y", "width", "height")]
        if target == "0":
            if any(box_fields):
                raise ValueError(f"{source} line {line}: Target 0 but a box {box_fields} is given.")
            box = None
        else:
            try:
                x, y, w, h = map(float, box_fields)
            except ValueError:
                raise ValueError(f"{source} line {line}: Target 1 needs numeric x, y, width, height; got "
                                 f"{box_fields}.") from None
            if not (np.isfinite([x, y, w, h]).all() and w > 0 and h > 0):
                raise ValueError(f"{source} line {line}: bad box x, y, width, height = {box_fields}.")
            box = [x, y, x + w, y + h]
        if pid not in patients:
            image = root / "stage_2_train_images" / f"{pid}.dcm"
            patients[pid] = {"id": pid, "image": _check_image(image, source, line, check_files),
                             "label": [float(target)], "boxes": []}
        elif patients[pid]["label"] != [float(target)]:
            raise ValueError(f"{source} line {line}: patient {pid} has rows with both Target 0 and 1.")
        if box is not None:
            patients[pid]["boxes"].append(box)
    if not patients:
        raise ValueError(f"{source} has no row.")
    return source, [patients[pid] for pid in sorted(patients)]


def rsna_pneumonia_datalist(
    root: str | os.PathLike, fraction: float = 1.0, seed: int = 42, split_seed: int = 0, check_files: bool = True,
) -> Datalist:
    """RSNA Pneumonia (stage 2) binary classification datalist (MGCA ``preprocess_rsna_data``, §6.1).

    ``root/stage_2_train_labels.csv`` (patientId, x, y, width, height, Target; one row per box), images
    ``root/stage_2_train_images/<patientId>.dcm``. One entry per patient, sorted by patientId (pandas
    ``groupby`` order). Split 70/15/15: ``train_test_split(test_size=0.3, random_state=split_seed)``, the
    hold-out halved by ``train_test_split(test_size=0.5)`` into (test, valid), as MGCA. ``fraction``
    subsamples train.

    Returns:
        ``{"train", "valid", "test"}`` lists of ``{"id": patientId, "image": str, "label": [Target as float]}``.
    """
    source, patients = _rsna_patients(Path(root).expanduser(), check_files)
    entries = [{k: p[k] for k in ("id", "image", "label")} for p in patients]
    return _with_fraction(_split_70_15_15(entries, split_seed, source, "patients"), fraction, seed)


def rsna_segmentation_datalist(
    root: str | os.PathLike, fraction: float = 1.0, seed: int = 42, split_seed: int = 0, holdout: int = 5337,
    check_files: bool = True,
) -> Datalist:
    """RSNA Pneumonia box-mask segmentation datalist (MGCA ``prepare_detection_data``, §6.1 / §6.4).

    Same table and images as :func:`rsna_pneumonia_datalist`; every patient is kept (negatives have no box,
    i.e. an empty mask). Each entry carries ``"boxes"``: the patient's rectangles ``[x1, y1, x2, y2]`` in the
    1024 x 1024 DICOM pixels, whose union is the mask (:func:`boxes_to_mask`, made at load time).

    Split: valid and test get ``h = min(holdout, max(1, n // 4))`` patients each (MGCA: 5,337; the ``n // 4``
    cap only matters for small copies): ``train_test_split(test_size=2 h, random_state=split_seed)``, then the
    hold-out halved into (test, valid). ``fraction`` subsamples train.

    Returns:
        lists of ``{"id": patientId, "image": str, "label": [Target as float], "boxes": [[x1, y1, x2, y2], ...]}``.
    """
    source, patients = _rsna_patients(Path(root).expanduser(), check_files)
    h = min(holdout, max(1, len(patients) // 4))
    return _with_fraction(_split_70_15_15(patients, split_seed, source, "patients", holdout=2 * h), fraction, seed)


def boxes_to_mask(boxes: Sequence[Sequence[float]] | np.ndarray, height: int, width: int) -> np.ndarray:
    """Binary mask of the union of filled rectangles.

    Pixel ``(r, c)`` is inside box ``[x1, y1, x2, y2]`` (pascal_voc, pixel units) when its centre lies in the
    half-open box: ``x1 <= c + 0.5 < x2`` and ``y1 <= r + 0.5 < y2``; for integer boxes that is
    ``mask[y1:y2, x1:x2] = 1`` (MGCA). Parts outside the image are clipped.

    Args:
        boxes: ``[n, 4]`` boxes (n may be 0).
        height, width: mask size (RSNA: 1024 x 1024).

    Returns:
        uint8 ``[height, width]`` with values 0 / 1.

    Raises:
        ValueError: boxes not ``[n, 4]``, not finite, or with ``x2 < x1`` / ``y2 < y1``.
    """
    array = np.asarray(boxes, dtype=np.float64)
    array = np.zeros((0, 4)) if array.size == 0 else array
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"boxes must have shape [n, 4], got {np.shape(boxes)}.")
    if not np.isfinite(array).all() or (array[:, 2] < array[:, 0]).any() or (array[:, 3] < array[:, 1]).any():
        raise ValueError(f"boxes must be finite [x1, y1, x2, y2] with x1 <= x2 and y1 <= y2, got {array.tolist()}.")
    cols, rows = np.arange(width) + 0.5, np.arange(height) + 0.5
    in_x = (cols >= array[:, :1]) & (cols < array[:, 2:3])  # [n, W]
    in_y = (rows >= array[:, 1:2]) & (rows < array[:, 3:4])  # [n, H]
    return ((in_y.T.astype(np.float32) @ in_x.astype(np.float32)) > 0).astype(np.uint8)


# --------------------------------------------------------------------------------------------- COVIDx (§6.1)
def _covidx_rows(root: Path, name: str, folder: str, check_files: bool) -> list[dict[str, Any]]:
    """Entries of a COVIDx list file (``patient_id filename label source``; filenames may contain spaces)."""
    source = _require_file(root / name, "COVIDx list file")
    entries = []
    with open(source, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            fields = text.split()
            if not fields:
                continue
            if len(fields) < 4:
                raise ValueError(f"{source} line {line}: expected 'patient_id filename label source', got {text!r}.")
            filename, label = " ".join(fields[1:-2]), fields[-2]
            if label not in COVIDX_CLASSES:
                raise ValueError(f"{source} line {line}: unknown label {label!r}; expected one of {COVIDX_CLASSES}.")
            entries.append({"id": filename, "label": COVIDX_CLASSES.index(label),
                            "image": _check_image(root / folder / filename, source, line, check_files)})
    if not entries:
        raise ValueError(f"{source} has no entry.")
    return entries


def covidx_datalist(
    root: str | os.PathLike, train_file: str = "train_COVIDx9A.txt", test_file: str = "test_COVIDx9A.txt",
    valid_fraction: float = 0.1, fraction: float = 1.0, seed: int = 42, split_seed: int = 0,
    check_files: bool = True,
) -> Datalist:
    """COVIDx (CXR-2) 3-class datalist (§6.1): normal / pneumonia / COVID-19 -> 0 / 1 / 2.

    ``root/<train_file>`` and ``root/<test_file>`` hold lines ``patient_id filename label source``; images
    ``root/train/<filename>`` and ``root/test/<filename>``. test = the official test list; valid =
    ``valid_fraction`` of the training list (``train_test_split(test_size=valid_fraction,
    random_state=split_seed)``; ASG's README says 10 %, MGCA's code uses 20 %); ``fraction`` subsamples train.

    Returns:
        lists of ``{"id": filename, "image": str, "label": int}``.
    """
    root = Path(root).expanduser()
    _check_valid_fraction(valid_fraction)
    train = _covidx_rows(root, train_file, "train", check_files)
    test = _covidx_rows(root, test_file, "test", check_files)
    train, valid = _split_off(train, valid_fraction, split_seed, root / train_file, "images")
    return _with_fraction({"train": train, "valid": valid, "test": test}, fraction, seed)


# ----------------------------------------------------------------------------------------------- SIIM (§6.1)
def _rle_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """Absolute ``(starts, ends)`` of the runs of a relative-offset RLE string; ValueError when malformed."""
    try:
        values = np.array(rle.split(), dtype=np.int64)
    except ValueError:
        raise ValueError(f"RLE {rle[:40]!r} holds something other than integers.") from None
    if values.size % 2 or (values < 0).any():
        raise ValueError(f"RLE {rle[:40]!r} must be an even number of non-negative integers (offset, length).")
    offsets, lengths = values[0::2], values[1::2]
    ends = np.cumsum(offsets + lengths)
    return ends - lengths, ends


def rle_decode(rle: str, height: int = 1024, width: int = 1024) -> np.ndarray:
    """Decode a SIIM-ACR pneumothorax RLE string into a binary mask.

    The string is pairs ``offset length``; each run starts ``offset`` pixels after the end of the previous run
    (the first after pixel 0): ``start_i = sum_{j<=i} offset_j + sum_{j<i} length_j``, covering
    ``[start_i, start_i + length_i)`` of the image flattened column by column (flat index ``i = c * height + r``,
    the challenge's ``rle2mask(...).T``). ``"-1"`` (no pneumothorax) or an empty string gives an empty mask.

    Returns:
        uint8 ``[height, width]`` with values 0 / 1.

    Raises:
        ValueError: not integer pairs, a negative value, or a run past the ``height * width`` pixels.
    """
    size = height * width
    if rle.strip() in ("", _SIIM_NEGATIVE):
        return np.zeros((height, width), dtype=np.uint8)
    starts, ends = _rle_runs(rle)
    if ends.size and ends[-1] > size:
        raise ValueError(f"RLE runs end at pixel {int(ends[-1])}, past the {height} x {width} = {size} pixels.")
    edges = np.zeros(size + 1, dtype=np.int64)
    np.add.at(edges, starts, 1)
    np.add.at(edges, ends, -1)
    flat = (np.cumsum(edges[:-1]) > 0).astype(np.uint8)
    return flat.reshape(width, height).T.copy()


def _siim_images(root: Path) -> dict[str, Path]:
    folder = root / "dicom-images-train"
    if not folder.is_dir():
        raise FileNotFoundError(f"SIIM image folder {folder} does not exist.")
    images: dict[str, Path] = {}
    for path in sorted(folder.rglob("*.dcm")):
        if path.stem in images:
            raise ValueError(f"two SIIM images share the ImageId {path.stem}: {images[path.stem]} and {path}.")
        images[path.stem] = path
    return images


def siim_datalist(
    root: str | os.PathLike, fraction: float = 1.0, seed: int = 42, split_seed: int = 0, balance: bool = True,
    height: int = 1024, width: int = 1024, check_files: bool = True,
) -> Datalist:
    """SIIM-ACR Pneumothorax (stage 1) segmentation datalist (MGCA protocol, §6.1 / §6.4).

    ``root/train-rle.csv`` (ImageId, EncodedPixels; ``-1`` = no pneumothorax; several rows of one image are
    united), images ``root/dicom-images-train/**/<ImageId>.dcm``. Entries carry ``"rle"``, the image's RLE
    strings (empty list for a negative image); the mask is made at load time (:func:`rle_decode`, union).

    Split 70/15/15 as RSNA (``train_test_split`` 0.3 then 0.5 into (test, valid), ``random_state=split_seed``)
    over the image ids in order of first appearance; deviation: MGCA splits CSV rows, which can put the rows
    of one image into different splits. ``balance``: train keeps all positive images plus as many negatives
    (``RandomState(seed).choice`` without replacement), then ``fraction`` subsamples it.

    Returns:
        lists of ``{"id": ImageId, "image": str, "label": [1.0 if pneumothorax else 0.0], "rle": [str, ...]}``.

    Raises:
        ValueError: an RLE that is malformed or runs past ``height * width`` pixels, or an image with both
            ``-1`` and RLE rows (file and line named).
    """
    root = Path(root).expanduser()
    source = _require_file(root / "train-rle.csv", "SIIM table")
    images = _siim_images(root) if check_files else {}
    entries: dict[str, dict[str, Any]] = {}
    for line, row in _read_csv(source, ("ImageId", "EncodedPixels")):
        image_id, rle = row["ImageId"], row["EncodedPixels"]
        if image_id not in entries:
            if check_files and image_id not in images:
                raise FileNotFoundError(f"{source} line {line} names the image {image_id}, but no "
                                        f"{image_id}.dcm exists under {root / 'dicom-images-train'}.")
            path = images.get(image_id, root / "dicom-images-train" / f"{image_id}.dcm")
            entries[image_id] = {"id": image_id, "image": str(path), "label": [0.0], "rle": [], "negative": False}
        entry = entries[image_id]
        if rle == _SIIM_NEGATIVE:
            entry["negative"] = True
        else:
            try:
                _, ends = _rle_runs(rle)
            except ValueError as err:
                raise ValueError(f"{source} line {line}: {err}") from None
            if ends.size == 0 or ends[-1] > height * width:
                raise ValueError(f"{source} line {line}: RLE is empty or runs past {height} x {width} pixels.")
            entry["rle"].append(rle)
            entry["label"] = [1.0]
        if entry["negative"] and entry["rle"]:
            raise ValueError(f"{source} line {line}: image {image_id} has both '-1' and RLE rows.")
    if not entries:
        raise ValueError(f"{source} has no row.")
    items = [{k: v for k, v in e.items() if k != "negative"} for e in entries.values()]
    datalist = _split_70_15_15(items, split_seed, source, "images")
    if balance:
        datalist["train"] = _balance(datalist["train"], seed, source)
    return _with_fraction(datalist, fraction, seed)


def _balance(train: list[dict[str, Any]], seed: int, source: Path) -> list[dict[str, Any]]:
    """All positive entries plus ``min(n_pos, n_neg)`` random negatives, in their original order."""
    positive = [i for i, e in enumerate(train) if e["label"] == [1.0]]
    negative = [i for i, e in enumerate(train) if e["label"] == [0.0]]
    if not positive:
        raise ValueError(f"{source}: the SIIM training split has no positive image to balance against.")
    chosen = {negative[i] for i in _legacy_choice(len(negative), min(len(positive), len(negative)), seed)}
    return [e for i, e in enumerate(train) if i in chosen or e["label"] == [1.0]]


# ------------------------------------------------------------------------------------ NIH ChestX-ray14 (§6.1)
def _nih_labels(findings: str, source: Path, line: int) -> list[float]:
    names = findings.split("|")
    if names == [_NIH_NO_FINDING]:
        return [0.0] * len(NIH_CLASSES)
    unknown = [n for n in names if n not in NIH_CLASSES]
    if unknown:
        raise ValueError(f"{source} line {line}: unknown finding(s) {unknown}; expected 'No Finding' or "
                         f"'|'-joined names from {NIH_CLASSES}.")
    return [float(c in names) for c in NIH_CLASSES]


def nih_datalist(
    root: str | os.PathLike, fraction: float = 1.0, seed: int = 42, valid_fraction: float = 0.1,
    split_seed: int = 0, check_files: bool = True,
) -> Datalist:
    """NIH ChestX-ray14 14-label datalist (official split, §6.1).

    ``root/Data_Entry_2017.csv`` (Image Index, Finding Labels ``"A|B"`` or ``"No Finding"``),
    ``root/train_val_list.txt`` and ``root/test_list.txt`` (one image name a line), images anywhere under the
    ``root/images*/`` folders (``images/`` or the Kaggle ``images_001/images/`` ...). test = ``test_list``;
    valid = ``valid_fraction`` of ``train_val_list`` (``train_test_split(random_state=split_seed)``, image
    level: KAD's split files were not available); ``fraction`` subsamples train.

    Returns:
        lists of ``{"id": image name, "image": str, "label": [14 floats in NIH_CLASSES order]}``.
    """
    root = Path(root).expanduser()
    _check_valid_fraction(valid_fraction)
    table = root / "Data_Entry_2017.csv"
    labels: dict[str, tuple[int, list[float]]] = {}
    for line, row in _read_csv(table, ("Image Index", "Finding Labels")):
        name = row["Image Index"]
        if name in labels:
            raise ValueError(f"{table} line {line}: image {name} already appears on line {labels[name][0]}.")
        labels[name] = (line, _nih_labels(row["Finding Labels"], table, line))
    images = _nih_images(root) if check_files else {}
    lists = {name: _nih_entries(root / f"{name}_list.txt", table, labels, images, check_files)
             for name in ("train_val", "test")}
    train, valid = _split_off(lists["train_val"], valid_fraction, split_seed, root / "train_val_list.txt", "images")
    return _with_fraction({"train": train, "valid": valid, "test": lists["test"]}, fraction, seed)


def _nih_images(root: Path) -> dict[str, Path]:
    """PNG files under ``root/images*/`` keyed by file name; ValueError when two share a name."""
    images: dict[str, Path] = {}
    for folder in sorted(p for p in root.glob("images*") if p.is_dir()):
        for path in sorted(folder.rglob("*.png")):
            if path.name in images:
                raise ValueError(f"two NIH images share the name {path.name}: {images[path.name]} and {path}.")
            images[path.name] = path
    return images


def _nih_entries(list_file: Path, table: Path, labels: Mapping[str, tuple[int, list[float]]],
                 images: Mapping[str, Path], check_files: bool) -> list[dict[str, Any]]:
    """Entries of the images named in ``list_file`` (labels from ``table``: name -> (line, label vector))."""
    _require_file(list_file, "NIH split list")
    with open(list_file, encoding="utf-8") as handle:
        names = [name.strip() for name in handle if name.strip()]
    entries = []
    for name in names:
        if name not in labels:
            raise ValueError(f"{list_file} names the image {name}, which is not in {table}.")
        line, label = labels[name]
        if check_files and name not in images:
            raise FileNotFoundError(f"{table} line {line} / {list_file} name the image {name}, which is not "
                                    f"under {list_file.parent}/images*/.")
        entries.append({"id": name, "image": str(images.get(name, list_file.parent / "images" / name)),
                        "label": label})
    if not entries:
        raise ValueError(f"{list_file} names no image.")
    return entries
