"""Per-image class probabilities of an inference run as one CSV (``id, <class names>, predicted``)."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

__all__ = ["ClassProbabilityWriter"]


class ClassProbabilityWriter:
    """Write ``<output_dir>/<filename>`` when the run completes, atomically (nothing half-written is left).

    Every batch item needs ``pred`` (probabilities ``[C]``) in the engine output and ``id_key`` (the image id, e.g.
    its file name without extension) in the batch.

    Args:
        output_dir: folder of the CSV (created when missing).
        class_names: column names of the ``C`` probabilities.
        filename: CSV file name.
        id_key: batch key of the image id.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str],
                 filename: str = "predictions.csv", id_key: str = "id") -> None:
        self.path = Path(output_dir) / filename
        self.class_names = list(class_names)
        self.id_key = id_key
        self.rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, lambda _: self.rows.clear())
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _collect(self, engine: Engine) -> None:
        for item, out in zip(engine.state.batch, engine.state.output):
            probs = torch.as_tensor(out["pred"]).detach().float().cpu().reshape(-1)
            if probs.numel() != len(self.class_names):
                raise ValueError(f"ClassProbabilityWriter: {probs.numel()} probabilities for "
                                 f"{len(self.class_names)} classes ({item[self.id_key]})")
            self.rows.append([str(item[self.id_key]), *(f"{p:.6f}" for p in probs.tolist()),
                              self.class_names[int(probs.argmax())]])

    def _write(self, _: Engine) -> None:
        if not self.rows:
            raise ValueError("ClassProbabilityWriter: the inference saw no image")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["id", *self.class_names, "predicted"])
            writer.writerows(sorted(self.rows))
        os.replace(tmp, self.path)
