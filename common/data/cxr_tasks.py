"""The datasets of ASG's pre-training and three downstream evaluations, by task name (specs/asg.md §2, §6).

Each evaluation config of the ASG bundle names a task and a dataset folder; this module turns them into datalists
(``{"train" | "valid" | "test": [entries]}``) of the readers in :mod:`common.data.cxr_datasets`, or of the synthetic
demo written by :func:`common.data.demo_cxr.ensure_demo_cxr_dataset`:

* **pre-training**: the demo's ``pretrain.json`` or MIMIC-CXR-JPG (:func:`pretraining_datalists`);
* **linear probe** (§6.2): :func:`classification_task` — ``demo`` (single-label, 3 classes from the demo's finding
  tags: the softmax head MONAI Label serves), ``demo_chexpert`` (the demo's CheXpert-like 5 labels), ``chexpert``,
  ``rsna``, ``covidx``, ``nih``;
* **zero-shot** (§6.3): :func:`zero_shot_task` — ``demo`` and ``rsna`` (pneumonia), ``nih`` (the classes that have a
  finding tag);
* **segmentation** (§6.4): :func:`segmentation_task` — ``demo`` (mask files), ``siim`` (RLE), ``rsna`` (boxes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.data import cxr_datasets
from common.data.cxr_findings import TAG_INDEX, TAGS

__all__ = ["CLASSIFICATION_TASKS", "ClassificationTask", "DEMO_CLASSES", "DEMO_ZERO_SHOT_TAGS", "NIH_TAGS", "SEGMENTATION_TASKS",
           "ZERO_SHOT_TASKS", "ZeroShotTask", "classification_task", "pretraining_datalists", "segmentation_task",
           "zero_shot_task"]

Datalist = dict[str, list[dict[str, Any]]]
SPLITS = ("train", "valid", "test")

DEMO_CLASSES: tuple[str, ...] = ("no finding", "airspace disease", "other finding")
"""Single-label demo classes: ``airspace disease`` when any of :data:`AIRSPACE_TAGS` is positive, else ``other
finding`` when any tag is positive, else ``no finding`` (uncertain tags count as absent)."""
AIRSPACE_TAGS: tuple[str, ...] = ("opacity", "consolidation", "pneumonia", "infiltration", "atelectasis", "edema")

NIH_TAGS: dict[str, str | None] = {
    "Atelectasis": "atelectasis", "Cardiomegaly": "cardiomegaly", "Effusion": "pleural effusion",
    "Infiltration": "infiltration", "Mass": "mass", "Nodule": "nodule", "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax", "Consolidation": "consolidation", "Edema": "edema", "Emphysema": "emphysema",
    "Fibrosis": None, "Pleural_Thickening": "pleural thicken", "Hernia": "hernia"}
"""ChestX-ray14 class -> the IRL finding tag scored for it in zero-shot (§6.3); Fibrosis has none and is left out."""

DEMO_ZERO_SHOT_TAGS: tuple[str, ...] = ("pneumonia", "pleural effusion", "cardiomegaly", "opacity", "atelectasis",
                                        "edema", "consolidation", "pneumothorax")
"""Findings the demo's zero-shot task scores, each by its own tag (real IU X-ray reports mention pneumonia too rarely
for a pneumonia-only test: 2 of the 382 R2Gen test reports)."""

CLASSIFICATION_TASKS = ("demo", "demo_chexpert", "chexpert", "rsna", "covidx", "nih")
ZERO_SHOT_TASKS = ("demo", "rsna", "nih")
SEGMENTATION_TASKS = ("demo", "siim", "rsna")


@dataclass(frozen=True)
class ClassificationTask:
    """A linear-probe dataset: datalists of ``{"image", "label"}`` (multi-hot floats when ``multi_label``, else a
    class index), the class names, and whether the classes are independent (BCE, AUC) or exclusive (CE, ACC)."""

    name: str
    datalists: Datalist
    classes: tuple[str, ...]
    multi_label: bool


@dataclass(frozen=True)
class ZeroShotTask:
    """A zero-shot test set: ``{"image", "label": [0/1 per class]}`` entries, the class names and the index of the
    finding tag scored for each class."""

    name: str
    data: list[dict[str, Any]]
    classes: tuple[str, ...]
    tag_ids: tuple[int, ...]


def _check_task(task: str, valid: tuple[str, ...], what: str) -> None:
    if task not in valid:
        raise ValueError(f"unknown {what} task {task!r}; expected one of {list(valid)}")


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (expected the demo written by "
                                "common.data.demo_cxr.ensure_demo_cxr_dataset)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def _absolute(entries: list[dict[str, Any]], root: Path, keys: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{**e, **{k: str(root / e[k]) for k in keys if k in e}} for e in entries]


def _demo_split(root: Path, name: str, keys: tuple[str, ...] = ("image",)) -> Datalist:
    content = _read_json(root / name)
    missing = [s for s in SPLITS if s not in content]
    if missing:
        raise ValueError(f"{root / name} has no {missing} split(s)")
    return {s: _absolute(content[s], root, keys) for s in SPLITS}


def pretraining_datalists(root: str | os.PathLike, mimic: bool = False,
                          annotation: str | os.PathLike | Mapping[str, dict] | None = None) -> Datalist:
    """Pre-training records (record format of :mod:`common.data.demo_cxr`) with absolute image paths.

    Args:
        root: the demo folder (``pretrain.json``), or the MIMIC-CXR-JPG root when ``mimic``.
        mimic: read :func:`common.data.cxr_datasets.mimic_cxr_datalist` (frontal views; validate + test = valid).
        annotation: MIMIC only: the region/tag annotation (``labels.pickle`` schema or JSON, §2.3).

    Raises:
        ValueError: the train or valid split is empty.
    """
    root = Path(root)
    datalists = cxr_datasets.mimic_cxr_datalist(root, annotation=annotation) if mimic else _demo_split(
        root, "pretrain.json")
    for split in ("train", "valid"):
        if not datalists.get(split):
            raise ValueError(f"{root}: the pre-training {split!r} split is empty")
    return datalists


def demo_class(labels: list[int]) -> int:
    """The single-label demo class index of a record's 40 finding tags (:data:`DEMO_CLASSES`)."""
    tags = np.asarray(labels)
    if any(tags[TAG_INDEX[t]] == 1 for t in AIRSPACE_TAGS):
        return 1
    return 2 if (tags == 1).any() else 0


def classification_task(task: str, root: str | os.PathLike, fraction: float = 1.0, seed: int = 42
                        ) -> ClassificationTask:
    """The linear-probe dataset of ``task`` (module docstring) at ``root``; ``fraction`` of train kept (§6.1:
    1 %, 10 % or 100 %, drawn with ``seed``).

    Raises:
        ValueError: an unknown task.
    """
    _check_task(task, CLASSIFICATION_TASKS, "classification")
    root = Path(root)
    if task == "demo":
        records = _demo_split(root, "pretrain.json")
        datalists = {s: [{"id": r["id"], "image": r["image"], "label": demo_class(r["labels"])} for r in records[s]]
                     for s in SPLITS}
        datalists["train"] = cxr_datasets.sample_fraction(datalists["train"], fraction, seed)
        return ClassificationTask(task, datalists, DEMO_CLASSES, multi_label=False)
    if task == "demo_chexpert":
        datalists = _demo_split(root, "classification.json")
        datalists["train"] = cxr_datasets.sample_fraction(datalists["train"], fraction, seed)
        classes = tuple(_read_json(root / "classification.json")["classes"])
        return ClassificationTask(task, datalists, classes, multi_label=True)
    if task == "chexpert":
        return ClassificationTask(task, cxr_datasets.chexpert_datalist(root, fraction, seed),
                                  cxr_datasets.CHEXPERT_TASKS, multi_label=True)
    if task == "rsna":
        return ClassificationTask(task, cxr_datasets.rsna_pneumonia_datalist(root, fraction, seed), ("pneumonia",),
                                  multi_label=True)
    if task == "covidx":
        datalists = cxr_datasets.covidx_datalist(root, fraction=fraction, seed=seed)
        return ClassificationTask(task, datalists, cxr_datasets.COVIDX_CLASSES, multi_label=False)
    return ClassificationTask(task, cxr_datasets.nih_datalist(root, fraction, seed), cxr_datasets.NIH_CLASSES,
                              multi_label=True)


def zero_shot_task(task: str, root: str | os.PathLike) -> ZeroShotTask:
    """The zero-shot test set of ``task`` (§6.3): the IRL decoder's logit of the tag ``pneumonia`` (index 9) scores
    pneumonia (RSNA); each ChestX-ray14 class is scored by its tag in :data:`NIH_TAGS`; the demo scores each finding
    of :data:`DEMO_ZERO_SHOT_TAGS` by its tag (label 1 where the report states it, uncertain counting as absent).

    Raises:
        ValueError: an unknown task.
    """
    _check_task(task, ZERO_SHOT_TASKS, "zero-shot")
    root = Path(root)
    pneumonia = (TAG_INDEX["pneumonia"],)
    if task == "demo":
        test = _demo_split(root, "pretrain.json")["test"]
        tag_ids = tuple(TAG_INDEX[t] for t in DEMO_ZERO_SHOT_TAGS)
        data = [{"id": r["id"], "image": r["image"], "label": [float(r["labels"][t] == 1) for t in tag_ids]}
                for r in test]
        return ZeroShotTask(task, data, DEMO_ZERO_SHOT_TAGS, tag_ids)
    if task == "rsna":
        return ZeroShotTask(task, cxr_datasets.rsna_pneumonia_datalist(root)["test"], ("pneumonia",), pneumonia)
    kept = [i for i, c in enumerate(cxr_datasets.NIH_CLASSES) if NIH_TAGS[c] is not None]
    test = cxr_datasets.nih_datalist(root)["test"]
    data = [{**e, "label": [e["label"][i] for i in kept]} for e in test]
    return ZeroShotTask(task, data, tuple(cxr_datasets.NIH_CLASSES[i] for i in kept),
                        tuple(TAGS.index(NIH_TAGS[cxr_datasets.NIH_CLASSES[i]]) for i in kept))


def segmentation_task(task: str, root: str | os.PathLike, fraction: float = 1.0, seed: int = 42) -> Datalist:
    """The segmentation datalists of ``task`` (§6.4); entries hold ``image`` and one mask source for
    :class:`common.transforms.cxr_pipelines.CXRMaskd`: ``mask`` (a mask file: demo), ``rle`` (SIIM) or
    ``mask_boxes`` (RSNA rectangles, 1024 x 1024 pixels).

    Raises:
        ValueError: an unknown task.
    """
    _check_task(task, SEGMENTATION_TASKS, "segmentation")
    root = Path(root)
    if task == "demo":
        datalists = {s: [{"image": e["image"], "mask": e["label"]} for e in entries]
                     for s, entries in _demo_split(root, "segmentation.json", ("image", "label")).items()}
        datalists["train"] = cxr_datasets.sample_fraction(datalists["train"], fraction, seed)
        return datalists
    if task == "siim":
        return cxr_datasets.siim_datalist(root, fraction, seed)
    datalists = cxr_datasets.rsna_segmentation_datalist(root, fraction, seed)
    return {s: [{**{k: v for k, v in e.items() if k != "boxes"}, "mask_boxes": e["boxes"]} for e in entries]
            for s, entries in datalists.items()}
