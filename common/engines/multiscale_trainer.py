"""Multi-scale supervised training of PraNet / Polyp-PVT, as a MONAI ``SupervisedTrainer``.

Polyp-PVT (and EndoKED-SEG, specs/endoked.md §4.3) trains every batch at several scales: for each rate in
(0.75, 1, 1.25) the images and masks are resized bilinearly (``align_corners=True``) to
``round(size * rate / 32) * 32`` (256, 352, 448 for 352 inputs), and each scale takes its own forward, loss,
backward, element-wise gradient clamp to ``[-0.5, 0.5]`` and optimiser step: three optimiser steps per batch.
``SupervisedTrainer`` does one step per iteration, so ``_iteration`` is written again here; everything else
(handlers, metrics, ``prepare_batch``, AMP, events) is MONAI's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys

__all__ = ["MultiScaleTrainer", "rescaled_size"]


def rescaled_size(size: Sequence[int], rate: float, divisor: int = 32) -> tuple[int, ...]:
    """``round(s * rate / divisor) * divisor`` for every spatial size ``s`` (352 → 256, 352, 448 for 0.75, 1, 1.25)."""
    return tuple(int(round(s * rate / divisor) * divisor) for s in size)


class MultiScaleTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` taking one optimiser step per scale of every batch.

    Args:
        scales: resize rates applied to each batch in turn; the rate-1 pass is the one reported in
            ``engine.state.output`` (as the original logs the loss at rate 1).
        size_divisor: the resized side is rounded to a multiple of it.
        grad_clip_value: clamp every gradient element to ``[-v, v]`` before each step (``None``: no clipping).
        channels_last: feed inputs in channels-last memory format (faster convolutions on CPU and GPU).
        args, kwargs: those of ``monai.engines.SupervisedTrainer``.
    """

    def __init__(
        self,
        *args: Any,
        scales: Sequence[float] = (0.75, 1.0, 1.25),
        size_divisor: int = 32,
        grad_clip_value: float | None = 0.5,
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not scales:
            raise ValueError("MultiScaleTrainer: 'scales' must name at least one rate")
        self.scales = tuple(float(s) for s in scales)
        self.size_divisor = size_divisor
        self.grad_clip_value = grad_clip_value
        self.channels_last = channels_last

    def _resize(self, inputs: torch.Tensor, targets: torch.Tensor, rate: float) -> tuple[torch.Tensor, torch.Tensor]:
        if rate == 1.0:
            return inputs, targets
        size = rescaled_size(inputs.shape[2:], rate, self.size_divisor)
        inputs = F.interpolate(inputs, size=size, mode="bilinear", align_corners=True)
        targets = F.interpolate(targets.float(), size=size, mode="bilinear", align_corners=True)
        return inputs, targets

    def _step(self, engine: MultiScaleTrainer, inputs: torch.Tensor, targets: torch.Tensor) -> dict:
        """Forward, loss, backward, gradient clamp and optimiser step at one scale."""
        if self.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        output: dict = {Keys.IMAGE: inputs, Keys.LABEL: targets}
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            output[Keys.PRED] = engine.inferer(inputs, engine.network)
            engine.state.output = output
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            output[Keys.LOSS] = engine.loss_function(output[Keys.PRED], targets).mean()
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if use_scaler:
            engine.scaler.scale(output[Keys.LOSS]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip_value is not None:
                engine.scaler.unscale_(engine.optimizer)
                torch.nn.utils.clip_grad_value_(engine.network.parameters(), self.grad_clip_value)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            output[Keys.LOSS].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            if self.grad_clip_value is not None:
                torch.nn.utils.clip_grad_value_(engine.network.parameters(), self.grad_clip_value)
            engine.optimizer.step()
        output[Keys.LOSS] = output[Keys.LOSS].detach()
        return output

    def _iteration(self, engine: MultiScaleTrainer, batchdata: dict[str, torch.Tensor]) -> dict:  # type: ignore[override]
        """One batch: ``len(scales)`` optimiser steps; returns the outputs of the rate-1 pass (or the last one)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        # plain tensors: a MetaTensor would send every operation of the three passes through its Python-level
        # ``__torch_function__`` (the training step needs no metadata)
        inputs, targets = convert_to_tensor(batch[0], track_meta=False), convert_to_tensor(batch[1], track_meta=False)
        engine.network.train()
        reported: dict = {}
        for rate in self.scales:
            output = self._step(engine, *self._resize(inputs, targets, rate))
            if rate == 1.0 or not reported:
                reported = output
        engine.state.output = reported
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return reported
