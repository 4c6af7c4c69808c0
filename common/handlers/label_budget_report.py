"""Few-label evaluation of frozen features: the Sparsam protocol as an ignite handler (specs/sparsam.md §6).

An evaluator runs the frozen (teacher) backbone over the labelled training images and the test images; this
handler keeps every feature vector with its label and role, and when the run completes:

1. sweeps the label budgets (``n`` labelled images per class, several seeded draws each) with every classifier
   (PowerTransformer → PCA → SVM / kNN / logistic regression, :mod:`common.metrics.label_budget_sweep`) and
   writes the rows of this source to ``<output_dir>/budget_rows_<source>.csv``;
2. merges the rows of every source found in ``output_dir`` (the supervised baseline writes its own), writes the
   mean ± std table ``budget_summary.csv``, logs it, and plots ``balanced_accuracy.png``;
3. fits the classifier chosen for inference on all labelled training features and saves it next to the
   backbone weights (``<ckpt_dir>/classifier.skops``, loaded without pickle), with ``classifier.json`` naming
   the classes in the order of the probability columns.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.data.label_budget import budgets_for
from common.metrics.label_budget_sweep import (
    ROW_KEYS,
    SUMMARY_KEYS,
    build_classifier,
    format_budget_table,
    plot_budget_curves,
    save_classifier,
    summarise,
    sweep_label_budgets,
)
from common.utils.files import write_csv

__all__ = ["LabelBudgetReport", "report_budget_sweep", "write_budget_rows", "CLASSIFIER_FILE", "CLASSES_FILE"]

logger = logging.getLogger(__name__)

CLASSIFIER_FILE = "classifier.skops"
CLASSES_FILE = "classifier.json"


def write_budget_rows(rows: list[dict[str, Any]], output_dir: str | os.PathLike, source: str) -> Path:
    """Write one source's sweep rows to ``<output_dir>/budget_rows_<source>.csv`` (atomically)."""
    return write_csv(Path(output_dir) / f"budget_rows_{source}.csv", ROW_KEYS, rows)


def _read_rows(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = set(ROW_KEYS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: budget rows lack the columns {sorted(missing)}")
        rows = list(reader)
    return [{"classifier": r["classifier"], "n_per_class": int(r["n_per_class"]), "n_train": int(r["n_train"]),
             "draw": int(r["draw"]), "seed": int(r["seed"]), "balanced_accuracy": float(r["balanced_accuracy"])}
            for r in rows]


def report_budget_sweep(output_dir: str | os.PathLike, title: str = "") -> list[dict[str, Any]]:
    """Merge every ``budget_rows_*.csv`` of ``output_dir``; write ``budget_summary.csv`` and ``balanced_accuracy.png``.

    Returns the summary rows (mean ± std of the balanced accuracy per classifier and budget), also logged.
    """
    output_dir = Path(output_dir)
    files = sorted(output_dir.glob("budget_rows_*.csv"))
    if not files:
        raise FileNotFoundError(f"no budget_rows_*.csv in {output_dir}: run an evaluation first")
    rows = [row for path in files for row in _read_rows(path)]
    summary = summarise(rows)
    if not summary:
        raise ValueError(f"{output_dir}: the budget rows are empty")
    write_csv(output_dir / "budget_summary.csv", SUMMARY_KEYS, summary)
    plot_budget_curves(summary, output_dir / "balanced_accuracy.png", title)
    logger.info("balanced accuracy vs labelled images per class (mean ± std over draws; %s):\n%s",
                ", ".join(p.name for p in files), format_budget_table(summary))
    return summary


class LabelBudgetReport:
    """Collect features of an evaluator run and run the few-label protocol on them (module docstring).

    Every batch item needs the feature vector ``pred`` (``[D]``) in the engine output and ``label`` (class index)
    and ``role`` (``"train"`` or ``"test"``) in the batch.

    Args:
        output_dir: folder of the CSV tables and the figure.
        ckpt_dir: folder where the inference classifier is saved (None: not saved).
        class_names: names of the class indices ``0..C-1``.
        budgets: requested labelled images per class; those above the largest class are dropped, and the
            "every image" budget is added (:func:`common.data.label_budget.budgets_for`).
        n_draws: seeded draws per budget.
        classifiers: classifier names (``svm``, ``knn``, ``logreg``).
        seed: seed of the first draw (draw ``d`` uses ``seed + d``).
        inference_classifier: the classifier fitted on every labelled training feature and saved for inference.
        source: name of these rows' file, ``budget_rows_<source>.csv``, in the merged table (e.g. ``ssl``).
        classifier_prefix: prepended to the classifier names of these rows, so that two sources with the same
            classifiers stay apart in the merged table (e.g. ``"random-init "`` for features of an untrained
            backbone).
        title: figure title.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        ckpt_dir: str | os.PathLike | None,
        class_names: Sequence[str],
        budgets: Sequence[int] = (1, 5, 10, 25, 50, 100, 250, 500, 1000),
        n_draws: int = 5,
        classifiers: Sequence[str] = ("svm", "knn", "logreg"),
        seed: int = 0,
        inference_classifier: str | None = "svm",
        source: str = "ssl",
        classifier_prefix: str = "",
        title: str = "",
    ) -> None:
        self.output_dir = Path(output_dir)
        self.ckpt_dir = None if ckpt_dir is None else Path(ckpt_dir)
        self.class_names = list(class_names)
        self.budgets = list(budgets)
        self.n_draws = n_draws
        self.classifiers = list(classifiers)
        self.seed = seed
        self.inference_classifier = inference_classifier
        self.source = source
        self.classifier_prefix = classifier_prefix
        self.title = title
        self.features: list[np.ndarray] = []
        self.labels: list[int] = []
        self.roles: list[str] = []
        self.summary: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, _: Engine) -> None:
        self.features, self.labels, self.roles = [], [], []

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            self.features.append(torch.as_tensor(out["pred"]).detach().float().cpu().reshape(-1).numpy())
            self.labels.append(int(item["label"]))
            self.roles.append(str(item["role"]))

    def _split(self, role: str) -> tuple[np.ndarray, np.ndarray]:
        keep = [i for i, r in enumerate(self.roles) if r == role]
        if not keep:
            raise ValueError(f"LabelBudgetReport: the evaluation saw no '{role}' image")
        return np.stack([self.features[i] for i in keep]), np.asarray([self.labels[i] for i in keep])

    def _report(self, _: Engine) -> None:
        train_x, train_y = self._split("train")
        test_x, test_y = self._split("test")
        budgets = budgets_for(train_y, self.budgets)
        logger.info("few-label sweep: %d train / %d test features of dimension %d, budgets %s, %d draws, %s",
                    len(train_y), len(test_y), train_x.shape[1], budgets, self.n_draws, self.classifiers)
        rows = sweep_label_budgets(train_x, train_y, test_x, test_y, budgets, self.n_draws, self.classifiers,
                                   seed=self.seed)
        rows = [{**row, "classifier": self.classifier_prefix + row["classifier"]} for row in rows]
        write_budget_rows(rows, self.output_dir, self.source)
        self.summary = report_budget_sweep(self.output_dir, self.title)
        if self.ckpt_dir is not None and self.inference_classifier is not None:
            self._save_inference_classifier(train_x, train_y)

    def _save_inference_classifier(self, train_x: np.ndarray, train_y: np.ndarray) -> None:
        pipeline = build_classifier(self.inference_classifier, len(self.class_names), len(train_y), self.seed)
        pipeline.fit(train_x, train_y)
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        save_classifier(pipeline, self.ckpt_dir / CLASSIFIER_FILE)
        info = {"classifier": self.inference_classifier, "class_names": self.class_names,
                "n_train": int(len(train_y)), "feature_dim": int(train_x.shape[1])}
        (self.ckpt_dir / CLASSES_FILE).write_text(json.dumps(info, indent=1))
        logger.info("inference classifier (%s, %d labelled images) saved to %s", self.inference_classifier,
                    len(train_y), self.ckpt_dir / CLASSIFIER_FILE)
