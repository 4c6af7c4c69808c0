"""The backward pass and optimiser step shared by the custom MONAI trainers (ToCo, episodic few-shot).

``loss.backward()`` (scaled by the engine's ``GradScaler`` under AMP), the gradients averaged over the ranks of a
multi-process run (``g <- (1 / R) sum_r g_r``, :func:`common.utils.distributed.average_gradients`; a no-op in one
process), MONAI's ``BACKWARD_COMPLETED`` event, then the optimiser step (``scaler.step`` + ``scaler.update`` under
AMP).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from common.utils.distributed import average_gradients

__all__ = ["backward_and_step"]


def backward_and_step(engine: SupervisedTrainer, loss: torch.Tensor, parameters: Iterable[torch.nn.Parameter],
                      use_scaler: bool) -> None:
    """Backward ``loss``, average the gradients of ``parameters`` over the ranks, fire ``BACKWARD_COMPLETED`` and
    step ``engine.optimizer`` (through ``engine.scaler`` when ``use_scaler``)."""
    if use_scaler:
        engine.scaler.scale(loss).backward()
    else:
        loss.backward()
    average_gradients(parameters)  # (scaled) gradients averaged over the ranks; no-op in one process
    engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
    if use_scaler:
        engine.scaler.step(engine.optimizer)
        engine.scaler.update()
    else:
        engine.optimizer.step()
