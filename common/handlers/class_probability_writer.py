"""Per-image class probabilities of an inference run as one CSV (``id, <class names>, predicted``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events

from common.transforms.feature_classifier import read_class_names
from common.utils.files import write_csv

__all__ = ["ClassProbabilityWriter"]


class ClassProbabilityWriter:
    """Write ``<output_dir>/<filename>`` when the run completes, atomically (nothing half-written is left).

    Every batch item needs ``pred`` (probabilities ``[C]``) in the engine output and ``id_key`` (the image id, e.g.
    its file name without extension) in the batch.

    Args:
        output_dir: folder of the CSV (created when missing).
        class_names: column names of the ``C`` probabilities, or the ``classifier.json`` file naming them (read
            when the run starts, so a config can name a file that the evaluation writes later).
        filename: CSV file name.
        id_key: batch key of the image id.
    """

    def __init__(self, output_dir: str | os.PathLike, class_names: Sequence[str] | str | os.PathLike,
                 filename: str = "predictions.csv", id_key: str = "id") -> None:
        self.path = Path(output_dir) / filename
        self.classes = class_names
        self.class_names: list[str] = []
        self.id_key = id_key
        self.rows: list[list[str]] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._start)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.COMPLETED, self._write)

    def _start(self, _: Engine) -> None:
        self.rows.clear()
        if isinstance(self.classes, (str, os.PathLike)):
            self.class_names = read_class_names(self.classes)
        else:
            self.class_names = [str(c) for c in self.classes]

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
        write_csv(self.path, ["id", *self.class_names, "predicted"], sorted(self.rows))
