"""Student–teacher self-distillation (DINO) as a MONAI ``SupervisedTrainer``.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021, Algorithm 1, as used by
Sparsam (specs/sparsam.md §3.3–§5). Every iteration, with global step ``k``:

1. the per-iteration schedules set ``lr(k)`` on every parameter group and ``wd(k)`` on the decayed group (0);
2. the teacher ``g_t`` sees the first ``n_teacher_views`` (global) views, the student ``g_s`` sees all of them;
   the loss receives extra per-step arguments (DINO's teacher temperature ``τ_t(k)``);
3. backward (AMP on CUDA), an optional gradient clip on the unscaled gradients (Sparsam: adaptive gradient
   clipping), and, while ``k < freeze_until_iteration``, the gradients of parameters whose name contains one
   of ``frozen_names`` are dropped (DINO's frozen last layer during the first epoch);
4. optimiser step, then the teacher follows the student by EMA: ``θ_t ← λ(k) θ_t + (1 − λ(k)) θ_s`` over
   ``parameters()`` only (buffers such as BatchNorm statistics stay the teacher's own).

Both networks run in ``train()`` mode, as in the original. A batch is ``{"image": [V tensors [B, 3, h_v, w_v]]}``
(MONAI's default collation of per-sample view lists).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils.enums import CommonKeys as Keys
from torch import nn

from common.utils.distributed import broadcast_from_rank0
from common.utils.schedules import ema_update

__all__ = ["StudentTeacherTrainer", "prepare_views"]

Schedule = Sequence[float] | float


def prepare_views(
    batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **kwargs: Any
) -> tuple[list[torch.Tensor], None]:
    """Move the views of ``batchdata["image"]`` (a list of ``[B, 3, h, w]`` tensors) to ``device``; no label."""
    views = batchdata[Keys.IMAGE]
    if isinstance(views, torch.Tensor):
        views = [views]
    if not isinstance(views, (list, tuple)) or not views:
        raise ValueError(f"prepare_views: batch['image'] must be a non-empty list of view tensors, got {type(views)}")
    return [torch.as_tensor(v).to(device=device, non_blocking=non_blocking, **kwargs) for v in views], None


def _at(schedule: Schedule, step: int) -> float:
    """Value of a per-iteration schedule at ``step`` (a constant stays constant; past the end, the last value)."""
    if isinstance(schedule, (int, float)):
        return float(schedule)
    return float(schedule[min(step, len(schedule) - 1)])


class StudentTeacherTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` whose ``network`` is the student and whose teacher is an EMA of it.

    Args:
        teacher: the teacher network (same architecture as the student; never receives gradients).
        n_teacher_views: the teacher sees ``views[:n_teacher_views]``.
        momentum: EMA momentum ``λ``, a constant or one value per iteration.
        lr_schedule: learning rate per iteration for every parameter group (None: leave the optimiser's).
        weight_decay_schedule: weight decay per iteration for parameter group 0 (None: leave it).
        loss_schedules: extra keyword arguments of the loss, each one value per iteration
            (``{"teacher_temp": τ_t}`` for DINO).
        grad_clip: called with the student's parameters after backward (and AMP unscaling), e.g.
            ``functools.partial(timm.utils.adaptive_clip_grad, clip_factor=0.32)``.
        freeze_until_iteration: drop the gradients of the ``frozen_names`` parameters while ``k`` is below it.
        frozen_names: substrings of parameter names frozen in that period.
        channels_last: feed views in channels-last memory format.
        args, kwargs: those of ``monai.engines.SupervisedTrainer`` (``network`` = student); ``prepare_batch``
            defaults to :func:`prepare_views`.
    """

    def __init__(
        self,
        *args: Any,
        teacher: nn.Module,
        n_teacher_views: int = 2,
        momentum: Schedule = 0.9995,
        lr_schedule: Sequence[float] | None = None,
        weight_decay_schedule: Sequence[float] | None = None,
        loss_schedules: Mapping[str, Schedule] | None = None,
        grad_clip: Callable[[Iterable[nn.Parameter]], Any] | None = None,
        freeze_until_iteration: int = 0,
        frozen_names: Sequence[str] = ("last_layer",),
        channels_last: bool = False,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("prepare_batch", prepare_views)
        super().__init__(*args, **kwargs)
        if n_teacher_views < 1:
            raise ValueError(f"StudentTeacherTrainer: n_teacher_views must be >= 1, got {n_teacher_views}")
        self.teacher = teacher
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.n_teacher_views = n_teacher_views
        self.momentum = momentum
        self.lr_schedule = lr_schedule
        self.weight_decay_schedule = weight_decay_schedule
        self.loss_schedules = dict(loss_schedules or {})
        self.grad_clip = grad_clip
        self.freeze_until_iteration = freeze_until_iteration
        self.frozen_names = tuple(frozen_names)
        self.channels_last = channels_last
        # several processes: every rank starts from rank 0's teacher and, after each step, takes rank 0's BatchNorm
        # statistics of student and teacher (DDP syncs the student's gradients, not the teacher's forward statistics)
        self.add_event_handler(Events.STARTED, lambda _: broadcast_from_rank0(self.teacher.state_dict().values()))
        self.add_event_handler(Events.ITERATION_COMPLETED, lambda _: broadcast_from_rank0(
            [*self.network.buffers(), *self.teacher.buffers()]))

    def _apply_schedules(self, step: int) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            if self.lr_schedule is not None:
                group["lr"] = _at(self.lr_schedule, step)
            if i == 0 and self.weight_decay_schedule is not None:
                group["weight_decay"] = _at(self.weight_decay_schedule, step)

    def _drop_frozen_gradients(self, step: int) -> None:
        if step >= self.freeze_until_iteration:
            return
        for name, param in self.network.named_parameters():
            if any(part in name for part in self.frozen_names):
                param.grad = None

    def _iteration(self, engine: StudentTeacherTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One DINO step (module docstring); returns ``{"loss", "lr", "momentum", <loss schedules>}``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        step = engine.state.iteration - 1
        self._apply_schedules(step)
        views, _ = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        if len(views) < self.n_teacher_views:
            raise ValueError(f"StudentTeacherTrainer: {len(views)} views in the batch, the teacher needs "
                             f"{self.n_teacher_views}")
        if self.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        loss_kwargs = {name: _at(schedule, step) for name, schedule in self.loss_schedules.items()}
        engine.network.train()
        self.teacher.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        output: dict = {Keys.IMAGE: views}
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            with torch.no_grad():
                teacher_out = self.teacher(views[: self.n_teacher_views])
            output[Keys.PRED] = engine.inferer(views, engine.network)
            engine.state.output = output
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            output[Keys.LOSS] = engine.loss_function(output[Keys.PRED], teacher_out, **loss_kwargs)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(output[Keys.LOSS]):
            raise FloatingPointError(f"StudentTeacherTrainer: loss is {output[Keys.LOSS].item()} at iteration "
                                     f"{engine.state.iteration} (epoch {engine.state.epoch}); lower the learning rate or check the input views")
        if use_scaler:
            engine.scaler.scale(output[Keys.LOSS]).backward()
            engine.scaler.unscale_(engine.optimizer)
        else:
            output[Keys.LOSS].backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip is not None:
            self.grad_clip(engine.network.parameters())
        self._drop_frozen_gradients(step)
        if use_scaler:
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            engine.optimizer.step()
        momentum = _at(self.momentum, step)
        ema_update(self.teacher, engine.network, momentum)
        output = {Keys.LOSS: output[Keys.LOSS].detach(), "lr": engine.optimizer.param_groups[0]["lr"],
                  "momentum": momentum, **loss_kwargs}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output
