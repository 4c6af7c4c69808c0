"""Per-organ validation Dice (model selection) and the per-organ Dice/ASD evaluation report of DHC.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (specs/dhc.md §4.6, §7).

* :class:`CentreCropDiceMetric` — validation during training (§4.6): for every eval volume (one centred crop), the
  hard Dice of ``argmax_c`` of the prediction per foreground class, ``d_c = (2TP + 1e-8) / (2TP + FP + FN + 2e-8)``
  (a class absent from both gives 0.5), then the mean over volumes and over the ``C - 1`` classes.
* :class:`OrganEvaluationReport` — test evaluation (§7): every case's label map is scored with
  :func:`common.metrics.organ_overlap.case_metrics` (Dice × 100, directed ASD in voxels, DHC's empty-class
  policies) on the evaluation grid, and the run writes ``metrics.csv`` (one row per case and a ``mean`` row),
  ``metrics_table.txt`` (the logged ``class | Dice | ASD`` table) and ``slices/<case>.png`` contour figures.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.metrics import CumulativeIterationMetric

from common.losses.weighted_ce_dice import hard_batch_dice
from common.metrics.organ_overlap import (
    aggregate,
    case_metrics,
    format_metrics_table,
    save_slice_figure,
    write_metrics_csv,
)

__all__ = ["CentreCropDiceMetric", "OrganEvaluationReport", "label_map"]

logger = logging.getLogger(__name__)


def label_map(pred: torch.Tensor) -> torch.Tensor:
    """``[C, *spatial]`` scores (C > 1; arg-max over C) or ``[1, *spatial]`` / ``[*spatial]`` labels -> long labels."""
    pred = torch.as_tensor(pred).detach()
    if pred.ndim >= 4 and pred.shape[0] > 1:
        return pred.argmax(dim=0).long()
    return (pred[0] if pred.ndim >= 4 else pred).round().long()


class CentreCropDiceMetric(CumulativeIterationMetric):
    """DHC's validation Dice (module docstring) as a MONAI metric for ``IgniteMetricHandler``.

    ``y_pred``: logits or probabilities ``[B, C, d, h, w]``; ``y``: labels ``[B, 1, d, h, w]``. ``aggregate()``
    returns the mean over volumes and classes (a scalar tensor); ``per_class()`` the ``[C - 1]`` means over volumes.
    """

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None
    ) -> torch.Tensor:
        if y is None:
            raise ValueError("CentreCropDiceMetric needs the ground truth y")
        if y_pred.ndim != 5 or y_pred.shape[1] < 2:
            raise ValueError(f"CentreCropDiceMetric: y_pred must be [B, C, d, h, w] with C >= 2, got "
                             f"{tuple(y_pred.shape)}")
        return torch.stack([hard_batch_dice(y_pred[b: b + 1].float(), y[b: b + 1])[1:]
                            for b in range(y_pred.shape[0])])

    def per_class(self) -> torch.Tensor:
        """Mean Dice per foreground class over the volumes seen, ``[C - 1]``."""
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor) or data.numel() == 0:
            raise ValueError("CentreCropDiceMetric: no volume was scored")
        return data.float().mean(dim=0)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        return self.per_class().mean()


class OrganEvaluationReport:
    """Score every case of an evaluator run with DHC's protocol and write the report (module docstring).

    Each decollated output item needs ``pred`` (probabilities/logits ``[C, D, H, W]`` or a label map
    ``[1, D, H, W]``) and ``label`` (``[1, D, H, W]`` on the same grid); the batch item's ``case`` names the row
    (else the image file name). At the end it keeps the :func:`~common.metrics.organ_overlap.aggregate` summary in
    ``self.summary`` and puts ``avg_dice``/``avg_asd`` into ``engine.state.metrics``.

    Args:
        output_dir: folder of ``metrics.csv``, ``metrics_table.txt`` and ``slices/``.
        class_names: the ``C - 1`` foreground class names, in label order.
        n_figures: save contour figures of the first ``n_figures`` cases (0: none).
        fix_empty_dice_scale: score a class absent from both maps 100 instead of DHC's 1.
    """

    def __init__(self, output_dir: str | Path, class_names: Sequence[str], n_figures: int = 3,
                 fix_empty_dice_scale: bool = False) -> None:
        if not class_names:
            raise ValueError("OrganEvaluationReport: class_names is empty")
        self.output_dir = Path(output_dir)
        self.class_names = [str(n) for n in class_names]
        self.n_figures = n_figures
        self.fix_empty_dice_scale = fix_empty_dice_scale
        self.per_case: dict[str, dict[str, np.ndarray]] = {}
        self.summary: dict[str, Any] = {}

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._score)
        engine.add_event_handler(Events.COMPLETED, self._report)

    def _reset(self, engine: Engine) -> None:
        self.per_case, self.summary = {}, {}

    def _score(self, engine: Engine) -> None:
        outputs, batch = engine.state.output, engine.state.batch
        if not isinstance(outputs, list):
            raise ValueError("OrganEvaluationReport needs a decollated engine output (decollate=True)")
        for out, item in zip(outputs, batch):
            image = item.get("image")
            source = getattr(image, "meta", {}).get("filename_or_obj", f"case_{len(self.per_case)}")
            name = str(item.get("case") or Path(str(source)).name)
            pred, gt = label_map(out["pred"]).cpu(), label_map(out["label"]).cpu()
            self.per_case[name] = case_metrics(pred, gt, len(self.class_names) + 1,
                                               fix_empty_dice_scale=self.fix_empty_dice_scale, case=name)
            if len(self.per_case) <= self.n_figures and image is not None:
                save_slice_figure(torch.as_tensor(image)[0].cpu(), gt, pred, self.output_dir / "slices" / f"{name}.png")

    def _report(self, engine: Engine) -> None:
        if not self.per_case:
            raise ValueError("OrganEvaluationReport: the evaluation saw no case")
        self.summary = aggregate(self.per_case)
        write_metrics_csv(self.output_dir / "metrics.csv", self.per_case, self.class_names)
        table = format_metrics_table(self.class_names, self.summary)
        (self.output_dir / "metrics_table.txt").write_text(table + "\n")
        engine.state.metrics["avg_dice"] = self.summary["avg_dice"]
        engine.state.metrics["avg_asd"] = self.summary["avg_asd"]
        logger.info("per-organ Dice (%%) and directed ASD (voxels) over %d cases (specs/dhc.md §7):\n%s",
                    len(self.per_case), table)
