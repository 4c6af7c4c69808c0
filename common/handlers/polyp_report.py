"""Per-image and per-set polyp metrics of an evaluation run, written as CSV and logged as a table.

Protocols (b) and (c) of specs/endoked.md §5.1 (see :mod:`common.metrics.polyp`): every image is scored at its
native size, and each set's row is the arithmetic mean over its images (HD95: over the images where prediction
and ground truth are both non-empty).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from common.metrics.polyp import polyp_measures, prepare_probability
from common.utils.figures import save_overlay
from common.utils.files import write_csv

__all__ = ["PolypEvaluationReport", "format_table"]

logger = logging.getLogger(__name__)

SUMMARY_COLUMNS = ("dice", "iou", "f1", "jaccard", "precision", "recall", "hd95",
                   "s_measure", "weighted_f", "mean_e", "mae", "soft_dice")


def format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A plain-text table with one line per row, numbers to 4 decimals."""
    cells = [[f"{r[c]:.4f}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    line = lambda values: "  ".join(v.rjust(w) for v, w in zip(values, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


class PolypEvaluationReport:
    """Score every image of an evaluator run and summarise per set.

    Each batch item needs ``pred`` (logits at network size, ``[1, h, w]``) and ``label`` (mask at native size,
    ``[1, H, W]``) in the engine output, and ``set``/``name`` in the batch (the datalists of
    :mod:`common.data.polyp_folders` carry them). At the end of the run it writes ``metrics_per_image.csv`` and
    ``metrics_per_set.csv`` to ``output_dir``, logs the per-set table, and keeps the rows in ``self.summary``.

    Args:
        output_dir: folder of the CSV files (created when missing).
        threshold: binarisation threshold of protocols (b) and (c).
        saliency: also compute S-measure, weighted F, mean E-measure and MAE.
        overlays_per_set: save this many overlay PNGs per set (ground truth green, prediction red) in
            ``output_dir/overlays``.
    """

    def __init__(
        self, output_dir: str | Path, threshold: float = 0.5, saliency: bool = True, overlays_per_set: int = 0
    ) -> None:
        self.output_dir = Path(output_dir)
        self.threshold = threshold
        self.saliency = saliency
        self.overlays_per_set = overlays_per_set
        self.rows: list[dict[str, Any]] = []
        self.summary: list[dict[str, Any]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.rows, self.summary = [], []

    def _score(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if not isinstance(outputs, list):
            raise ValueError("PolypEvaluationReport needs a decollated engine output (decollate=True)")
        for out, item in zip(outputs, batch):
            label = out["label"]
            prob = prepare_probability(out["pred"].detach().cpu(), tuple(label.shape[-2:]))
            row = {"set": str(item.get("set", "all")), "name": str(item.get("name", len(self.rows)))}
            row.update(polyp_measures(prob, label, self.threshold, self.saliency))
            self.rows.append(row)
            n_in_set = sum(r["set"] == row["set"] for r in self.rows)
            source = getattr(item.get("image"), "meta", {}).get("filename_or_obj")
            if n_in_set <= self.overlays_per_set and isinstance(source, str):
                save_overlay(source, label, prob.numpy() >= self.threshold,
                             self.output_dir / "overlays" / f"{row['set']}_{row['name']}.png")

    def _summarise(self, rows: list[dict[str, Any]], name: str) -> dict[str, Any]:
        summary: dict[str, Any] = {"set": name, "images": len(rows)}
        for column in SUMMARY_COLUMNS:
            values = [r[column] for r in rows if column in r and not math.isnan(r[column])]
            summary[column] = sum(values) / len(values) if values else math.nan
        return summary

    def _report(self, engine: Engine) -> None:
        if not self.rows:
            raise ValueError("PolypEvaluationReport: the evaluation saw no image")
        by_set: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.rows:
            by_set[row["set"]].append(row)
        self.summary = [self._summarise(rows, name) for name, rows in by_set.items()]
        if len(by_set) > 1:
            self.summary.append(self._summarise(self.rows, "all images"))
        columns = ["set", "images", *(c for c in SUMMARY_COLUMNS if c in self.rows[0])]
        self.output_dir.mkdir(parents=True, exist_ok=True)
        write_csv(self.output_dir / "metrics_per_image.csv", ["set", "name", *columns[2:]], self.rows)
        write_csv(self.output_dir / "metrics_per_set.csv", columns, self.summary)
        for row in self.summary:
            engine.state.metrics[f"{row['set']}/dice"] = row["dice"]
        logger.info("per-set metrics (protocols (b) and (c), specs/endoked.md §5.1):\n"
                    + format_table(self.summary, columns))
