"""Linear-probe metrics of the MGCA protocol that ASG follows (specs/asg.md §6.2): macro AUROC over the classes and
top-1 accuracy for exclusive classes (COVIDx), from the probe's logits.

Class probabilities are ``sigmoid(z)`` for independent (multi-label) classes and ``softmax(z)`` over the classes
otherwise; the AUROC of class ``c`` compares its probability with the one-hot (or multi-hot) target, and the macro
average is the mean over classes (MONAI :class:`~monai.handlers.ROCAUC`, ``average="macro"``). The engines run with
``decollate=False``, so each output holds batch tensors ``pred [B, C]`` and ``label [B, C]`` (multi-hot) or ``[B]``
(class indices).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from ignite.metrics import Accuracy, Metric
from monai.handlers import ROCAUC

__all__ = ["class_probabilities", "probe_metrics", "probe_output"]


def class_probabilities(logits: torch.Tensor, multi_label: bool) -> torch.Tensor:
    """``[B, C]`` logits -> probabilities: ``sigmoid`` per class (multi-label) or ``softmax`` over classes."""
    return torch.sigmoid(logits.float()) if multi_label else torch.softmax(logits.float(), dim=1)


def probe_output(multi_label: bool, num_classes: int) -> Callable[[Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor]]:
    """Output transform ``output -> (probabilities [B, C], target [B, C] float)`` (one-hot for class indices)."""

    def transform(output: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        probs = class_probabilities(output["pred"].detach(), multi_label)
        label = torch.as_tensor(output["label"]).to(probs.device)
        if multi_label:
            target = label.float().reshape(probs.shape)
        else:
            target = F.one_hot(label.long().reshape(-1), num_classes).float()
        return probs, target

    return transform


def probe_metrics(multi_label: bool, num_classes: int, prefix: str = "test_") -> dict[str, Metric]:
    """``{prefix + "auc": macro AUROC}``, plus ``{prefix + "acc": top-1 accuracy}`` for exclusive classes."""
    to_probs = probe_output(multi_label, num_classes)
    metrics: dict[str, Metric] = {f"{prefix}auc": ROCAUC(average="macro", output_transform=to_probs)}
    if not multi_label:
        metrics[f"{prefix}acc"] = Accuracy(
            output_transform=lambda o: (o["pred"].detach(), torch.as_tensor(o["label"]).long().reshape(-1)))
    return metrics
