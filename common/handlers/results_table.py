"""One CSV row of an evaluator's metrics per run, appended to a results table (linear probe, zero-shot, Dice).

The ASG evaluations are run once per label fraction or task (specs/asg.md §6: 1 %, 10 %, 100 %); each run adds its
row ``{**fixed columns, **engine.state.metrics}`` to the same file, so that the model card's table is the file. A
row with the same key columns replaces the earlier one (a re-run updates its row). The file is rewritten atomically
(:func:`common.utils.files.write_csv`); the row is also logged.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from common.utils.files import write_csv

__all__ = ["ResultsTable", "append_result"]

logger = logging.getLogger(__name__)


def _format(value: Any) -> Any:
    return f"{value:.4f}" if isinstance(value, float) else value


def append_result(path: str | os.PathLike, row: Mapping[str, Any], key: Sequence[str]) -> Path:
    """Add ``row`` to the CSV at ``path`` (created if absent), replacing a row with the same ``key`` values; the
    columns are the union of the old header and the row's keys, in first-seen order."""
    path = Path(path)
    rows: list[dict[str, Any]] = []
    columns: list[str] = []
    if path.is_file():
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            rows = [r for r in reader if any(str(r.get(k, "")) != str(row.get(k, "")) for k in key)]
    columns += [c for c in row if c not in columns]
    rows.append({c: _format(v) for c, v in row.items()})
    return write_csv(path, columns, rows)


class ResultsTable:
    """At ``COMPLETED``, appends ``{**columns, **engine.state.metrics}`` to ``path`` (module docstring).

    Args:
        path: the CSV file.
        columns: fixed columns of this run (task, fraction, checkpoint, ...); all of them form the row key.
        metric_names: the metrics written (default: every metric of the engine).
    """

    def __init__(self, path: str | os.PathLike, columns: Mapping[str, Any],
                 metric_names: Sequence[str] | None = None) -> None:
        self.path = Path(path)
        self.columns = dict(columns)
        self.metric_names = None if metric_names is None else list(metric_names)

    def attach(self, engine: Engine) -> None:
        """Write the row when ``engine`` completes."""
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        names = self.metric_names if self.metric_names is not None else list(engine.state.metrics)
        missing = [n for n in names if n not in engine.state.metrics]
        if missing:
            raise KeyError(f"ResultsTable: the engine has no metric {missing} (it has {list(engine.state.metrics)})")
        row = {**self.columns, **{n: float(engine.state.metrics[n]) for n in names}}
        append_result(self.path, row, key=list(self.columns))
        logger.info("results %s -> %s", row, self.path)
