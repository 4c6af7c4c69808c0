"""Zero-shot classification from the IRL finding head, scored as MedKLIP does (specs/asg.md §6.3).

ASG releases no zero-shot code; its table compares with BioViL and MedKLIP, whose protocol this follows: the score
of class ``c`` is ``sigmoid(z_t)`` for the IRL decoder logit ``z`` of the finding tag ``t(c)`` (``pneumonia`` for
RSNA), and per class (:func:`common.metrics.cxr.zero_shot_metrics`)::

    AUC = roc_auc_score(y, s);   F1 = max_t 2 P(t) R(t) / (P(t) + R(t));   ACC = accuracy(y, s > t*)

with ``t*`` the max-F1 threshold, chosen on the test set itself as in MedKLIP. Several classes (ChestX-ray14) are
averaged; a class whose test labels are all equal has no AUC and is left out (logged). At completion the handler appends one row per class and their mean to a results CSV
(:func:`common.handlers.results_table.append_result`) and draws the ROC and precision-recall curves to a PNG.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events

from common.handlers.results_table import append_result
from common.metrics.cxr import zero_shot_metrics

__all__ = ["ZeroShotReport"]

logger = logging.getLogger(__name__)


class ZeroShotReport:
    """Collect the tag probabilities of every test image and report the zero-shot metrics (module docstring).

    The evaluator runs with ``decollate=False``: ``output["pred"]`` holds the finding logits ``[B, Q]`` and
    ``output["label"]`` the targets ``[B, C]`` (0 / 1 per class).

    Args:
        tag_ids: the tag scored for each of the C classes.
        class_names: the C class names.
        output_csv: results table (one row per class plus ``mean``); ``columns`` are added to each row.
        figure: PNG of the ROC and precision-recall curves (None: no figure).
        columns: fixed columns (task, checkpoint, ...).
    """

    def __init__(self, tag_ids: Sequence[int], class_names: Sequence[str], output_csv: str | os.PathLike,
                 figure: str | os.PathLike | None = None, columns: Mapping[str, Any] | None = None) -> None:
        if len(tag_ids) != len(class_names) or not tag_ids:
            raise ValueError(f"ZeroShotReport: {len(tag_ids)} tag ids for {len(class_names)} classes")
        self.tag_ids = list(tag_ids)
        self.class_names = list(class_names)
        self.output_csv = Path(output_csv)
        self.figure = None if figure is None else Path(figure)
        self.columns = dict(columns or {})
        self.scores: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.results: dict[str, dict[str, float]] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _start(self, _: Engine) -> None:
        self.scores.clear()
        self.labels.clear()
        self.results = {}

    def _collect(self, engine: Engine) -> None:
        logits = torch.as_tensor(engine.state.output["pred"]).detach().float().cpu()
        labels = torch.as_tensor(engine.state.output["label"]).detach().float().cpu()
        if logits.ndim != 2 or labels.shape != (logits.shape[0], len(self.class_names)):
            raise ValueError(f"ZeroShotReport: expected logits [B, Q] and labels [B, {len(self.class_names)}], got "
                             f"{tuple(logits.shape)} and {tuple(labels.shape)}")
        self.scores.append(torch.sigmoid(logits[:, self.tag_ids]))
        self.labels.append(labels)

    def _report(self, engine: Engine) -> None:
        scores = torch.cat(self.scores).numpy()
        labels = torch.cat(self.labels).numpy()
        for c, name in enumerate(self.class_names):
            if labels[:, c].min() == labels[:, c].max():
                logger.warning("zero-shot: class %r has only label %d in the %d test images: no AUC, left out", name,
                               int(labels[0, c]), len(labels))
                continue
            self.results[name] = zero_shot_metrics(labels[:, c], scores[:, c])
        if not self.results:
            raise ValueError(f"zero-shot: every class of {self.class_names} has a single label value over the "
                             f"{len(labels)} test images; no metric is defined")
        if len(self.results) > 1:
            self.results["mean"] = {k: float(np.mean([r[k] for r in self.results.values()]))
                                    for k in ("auc", "f1", "acc")}
        for name, metrics in self.results.items():
            append_result(self.output_csv, {**self.columns, "class": name, "n": len(labels),
                                            "positives": int(labels[:, self.class_names.index(name)].sum())
                                            if name in self.class_names else int(labels.sum()), **metrics},
                          key=[*self.columns, "class"])
            logger.info("zero-shot %s: %s", name, {k: round(v, 4) for k, v in metrics.items()})
        summary = self.results.get("mean") or next(iter(self.results.values()))
        engine.state.metrics.update({f"zero_shot_{k}": v for k, v in summary.items()})
        if self.figure is not None:
            self._plot(labels, scores)

    def _plot(self, labels: np.ndarray, scores: np.ndarray) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.metrics import precision_recall_curve, roc_curve

        fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(10, 4.5))
        for c, name in enumerate(self.class_names):
            if name not in self.results:
                continue
            fpr, tpr, _ = roc_curve(labels[:, c], scores[:, c])
            precision, recall, _ = precision_recall_curve(labels[:, c], scores[:, c])
            result = self.results[name]
            roc_ax.plot(fpr, tpr, label=f"{name} (AUC {100 * result['auc']:.1f})")
            pr_ax.plot(recall, precision, label=f"{name} (max F1 {100 * result['f1']:.1f})")
        roc_ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="zero-shot ROC")
        pr_ax.set(xlabel="recall", ylabel="precision", title="zero-shot precision-recall")
        for ax in (roc_ax, pr_ax):
            ax.legend(fontsize=8)
        fig.tight_layout()
        self.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(self.figure, dpi=100)
        plt.close(fig)
