"""EndoKED-MIL "bag distillation" training, bag/instance evaluation and the per-bag score export.

Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports Leveraging Large
Language and Vision Models" (EndoKED), arXiv 2310.11173, specs/endoked.md §2.4, §2.5, §2.7 and §7 rows 1-5.
The network is :class:`common.networks.mil.EndoKEDMIL` (``encoder``, ``teacher1`` ABMIL, ``teacher2`` DSMIL,
``student``). One epoch of :class:`BagDistillationTrainer` (0-based epoch ``e``):

1. **teacher phase** (the ignite iterations; one iteration = one bag ``{"image": [1, N, 3, H, W], "label": [1]}``):
   ``L_T = λ_1 L_T1 + λ_2 L_T2`` (:mod:`common.losses.mil_distillation`), encoder + both teachers stepped; the
   minimum and maximum instance score of each teacher over the epoch's bags are recorded. With ``smooth_epochs``
   set, positive bags are skipped when ``e > smooth_epochs`` (official ``--smoothE``);
2. **student phase** at ``EPOCH_COMPLETED`` when ``e % student_period == 0``: an inner ignite ``Engine`` over the
   instance loader ``{"image": [B, 3, H, W], "label": [B]}`` (bag label of each image). For every batch the encoder
   features ``h`` are computed once; under ``no_grad`` the teacher heads score ``h`` and the scores are merged into
   pseudo labels ``ỹ`` with the recorded ranges; encoder + student are stepped with ``L_S``. Its mean loss (over the
   batches) is stored in ``engine.state.metrics["student_loss"]``.

Four plain SGD optimisers (lr 1e-3, no momentum or weight decay; :func:`build_optimizers`) as in the original.
The student phase runs before any handler given in ``train_handlers`` (validation, checkpoints) sees the epoch end.

Multi-process runs (``torch.distributed`` initialised; each rank its own share of the bags and of the instances, e.g.
through ``DistributedSampler`` with ``even_divisible=True`` so that every rank runs as many steps): the network is
not wrapped in DDP (its ``state_dict`` keys stay ``encoder.*``, ``teacher1.*``, ...); instead every rank starts from
rank 0's parameters and buffers (broadcast at ``STARTED``), the gradients of both phases are averaged over the ranks
between backward and step (a parameter without a gradient gets a zero one first, so that every rank reduces the same
tensors), the buffers (BatchNorm statistics) are taken from rank 0 after every teacher and student iteration, and the
per-teacher score range ``(min_t, max_t)`` is reduced to its extremes over all ranks before the student phase, so
that the pseudo labels of every rank use the range over all training instances of the epoch, as one process would.
A rank that skips a positive bag (``smooth_epochs``) still joins the step with zero gradients.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, EventEnum, Events
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric
from monai.engines import Evaluator, Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.handlers.utils import from_engine
from monai.metrics import compute_roc_auc
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.utils.data import DataLoader

from common.losses.mil_distillation import (
    abmil_bag_loss,
    dsmil_bag_loss,
    merge_pseudo_labels,
    student_distillation_loss,
)
from common.utils.distributed import all_reduce_extreme, average_gradients, broadcast_from_rank0, world_size
from common.utils.files import write_csv

__all__ = [
    "PARTS",
    "BagDistillationEvents",
    "build_optimizers",
    "BagDistillationTrainer",
    "BagEvaluator",
    "InstanceAUC",
    "write_bag_scores",
    "BagScoreWriter",
]

logger = logging.getLogger(__name__)

PARTS = ("encoder", "teacher1", "teacher2", "student")
"""Children of the network, each with its own optimiser."""


class BagDistillationEvents(EventEnum):
    """Events of the student phase, fired on the trainer (``engine.state.metrics["student_loss"]`` is set when
    ``STUDENT_COMPLETED`` fires)."""

    STUDENT_STARTED = "student_phase_started"
    STUDENT_COMPLETED = "student_phase_completed"


def _check_network(name: str, network: nn.Module) -> None:
    missing = [p for p in PARTS if not isinstance(getattr(network, p, None), nn.Module)]
    if missing:
        raise ValueError(f"{name}: the network must hold the modules {list(PARTS)} (an EndoKEDMIL); "
                         f"{type(network).__name__} lacks {missing}")


def build_optimizers(network: nn.Module, lr: float = 1e-3) -> dict[str, torch.optim.Optimizer]:
    """One plain SGD (``lr``, no momentum, no weight decay) per part of ``network`` (specs/endoked.md §2.5)."""
    _check_network("build_optimizers", network)
    return {p: torch.optim.SGD(getattr(network, p).parameters(), lr=lr) for p in PARTS}


def _strings(value: Any) -> list[str]:
    """Strings of a collated batch entry, flattened (``"a"``, ``["a"]``, ``[["a"], ["b"]]``, ``[("a",)]``)."""
    if isinstance(value, (str, os.PathLike)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    raise ValueError(f"expected strings (exam id, image paths), got {type(value).__name__}")


def _exam_id(batchdata: Mapping[str, Any], key: str) -> str | None:
    """The one exam id of a bag batch, None when the batch has none."""
    if not isinstance(batchdata, Mapping) or batchdata.get(key) is None:
        return None
    ids = _strings(batchdata[key])
    if len(ids) != 1:
        raise ValueError(f"batch['{key}'] must hold one exam id (one bag per batch), got {ids}")
    return ids[0]


def _bag(image: torch.Tensor, label: torch.Tensor | None, exam: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[1, N, 3, H, W]`` and ``[1]`` -> the bag ``[N, 3, H, W]`` and its float label ``[1]``."""
    if label is None:
        raise ValueError(f"bag '{exam}': the batch has no 'label' (the bag label, 0 or 1)")
    image = convert_to_tensor(image, track_meta=False)
    if image.ndim != 5 or image.shape[0] != 1 or image.shape[2] != 3:
        raise ValueError(f"bag '{exam}': batch['image'] must be [1, N, 3, H, W] (batch size 1 bag), got "
                         f"{tuple(image.shape)}")
    if image.shape[1] == 0:
        raise ValueError(f"bag '{exam}': the bag has no image")
    label = convert_to_tensor(label, track_meta=False).reshape(-1).float()
    if label.numel() != 1 or label.item() not in (0.0, 1.0):
        raise ValueError(f"bag '{exam}': batch['label'] must be one bag label 0 or 1, got {label.tolist()}")
    return image[0], label


class BagDistillationTrainer(Trainer):
    """EndoKED-MIL training: teacher phase over bags, student phase over instances (module docstring).

    Args:
        device: torch device.
        max_epochs: number of epochs (official 1000).
        train_data_loader: the **bag loader**, batch size 1: ``{"image": [1, N, 3, H, W], "label": [1],
            "exam_id": optional, "instance_label": optional (ignored in training)}``.
        network: an :class:`~common.networks.mil.EndoKEDMIL`.
        instance_loader: the **instance loader** of the same training images: ``{"image": [B, 3, H, W],
            "label": [B]}`` with the bag label of each image (official batch 128).
        optimizers: ``{"encoder", "teacher1", "teacher2", "student"}`` optimisers; None: :func:`build_optimizers`
            with ``lr``. The teacher phase steps encoder, teacher1, teacher2; the student phase encoder, student.
        lr: learning rate of the optimisers built when ``optimizers`` is None.
        teacher_loss_weights: ``(λ_1, λ_2)`` (``--TeacherLossWeight``).
        pl_merge_weights: ``(μ_1, μ_2)`` (``--PLMergeWeight``).
        student_neg_weight: ``w_n`` (0.1 intended; 1.0 = the script default, §7 row 2).
        student_period: run the student phase when the 0-based epoch ``e`` is a multiple of it (``--stuOptPeriod``).
        smooth_epochs: skip positive bags in the teacher phase when ``e > smooth_epochs`` (``--smoothE``);
            None (default) never skips (§7 row 3).
        dsmil_softmax_twice: faithful DSMIL CE on softmaxed outputs (§7 row 4), see
            :func:`~common.losses.mil_distillation.dsmil_bag_loss`.
        teachers_train_mode_for_labels: score the pseudo labels with the teacher heads in ``train()`` mode (dropout
            and batch-statistics BatchNorm active, BatchNorm running statistics updated), as the original (§7 row 5);
            every instance batch then needs >= 2 images (``drop_last``). False (default) uses ``eval()`` mode.
        epoch_length, non_blocking, prepare_batch, iteration_update, postprocessing, key_train_metric,
        additional_metrics, metric_cmp_fn, train_handlers, amp, event_names, event_to_attr, decollate, to_kwargs,
        amp_kwargs: as in ``monai.engines.SupervisedTrainer`` (``decollate`` defaults to False: the outputs are not
            batch-first). ``prepare_batch`` is used for both loaders.

    Each teacher iteration's output: ``{"loss": L_T, "loss_teacher1", "loss_teacher2", "teacher1_scores" [1, N],
    "teacher2_scores" [1, N], "label" [1], "exam_id", "skipped": False}``; a skipped positive bag gives
    ``{"loss": 0, "label", "exam_id", "skipped": True}`` (nothing was optimised). The student engine
    (``self.student_engine``, handlers may be attached to it) outputs ``{"loss": L_S, "pseudo_label" [B],
    "label" [B]}``.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        instance_loader: Iterable | DataLoader,
        optimizers: Mapping[str, torch.optim.Optimizer] | None = None,
        lr: float = 1e-3,
        teacher_loss_weights: Sequence[float] = (1.0, 1.0),
        pl_merge_weights: Sequence[float] = (0.5, 0.5),
        student_neg_weight: float = 0.1,
        student_period: int = 1,
        smooth_epochs: int | None = None,
        dsmil_softmax_twice: bool = True,
        teachers_train_mode_for_labels: bool = False,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable[[Engine, Any], Any] | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict[str, Metric] | None = None,
        additional_metrics: dict[str, Metric] | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        amp: bool = False,
        event_names: list | None = None,
        event_to_attr: dict | None = None,
        decollate: bool = False,
        to_kwargs: dict | None = None,
        amp_kwargs: dict | None = None,
    ) -> None:
        _check_network("BagDistillationTrainer", network)
        if len(teacher_loss_weights) != 2 or len(pl_merge_weights) != 2:
            raise ValueError(f"BagDistillationTrainer: teacher_loss_weights and pl_merge_weights need one value per "
                             f"teacher (2), got {list(teacher_loss_weights)} and {list(pl_merge_weights)}")
        if student_period < 1:
            raise ValueError(f"BagDistillationTrainer: student_period must be >= 1, got {student_period}")
        if not 0.0 <= student_neg_weight <= 1.0:
            raise ValueError(f"BagDistillationTrainer: student_neg_weight must be in [0, 1], got {student_neg_weight}")
        if isinstance(instance_loader, DataLoader) and len(instance_loader) == 0:
            raise ValueError("BagDistillationTrainer: the instance loader is empty")
        super().__init__(
            device=device, max_epochs=max_epochs, data_loader=train_data_loader, epoch_length=epoch_length,
            non_blocking=non_blocking, prepare_batch=prepare_batch, iteration_update=iteration_update,
            postprocessing=postprocessing, key_metric=key_train_metric, additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn, handlers=None, amp=amp,
            event_names=[*(event_names or []), BagDistillationEvents], event_to_attr=event_to_attr,
            decollate=decollate, to_kwargs=to_kwargs, amp_kwargs=amp_kwargs,
        )
        self.network = network.to(self.state.device)
        self.optimizers = dict(optimizers) if optimizers is not None else build_optimizers(self.network, lr)
        if set(self.optimizers) != set(PARTS):
            raise ValueError(f"BagDistillationTrainer: optimizers must have the keys {list(PARTS)}, got "
                             f"{sorted(self.optimizers)}")
        self.instance_loader = instance_loader
        self.teacher_loss_weights = tuple(float(w) for w in teacher_loss_weights)
        self.pl_merge_weights = tuple(float(w) for w in pl_merge_weights)
        self.student_neg_weight = float(student_neg_weight)
        self.student_period = int(student_period)
        self.smooth_epochs = smooth_epochs
        self.dsmil_softmax_twice = dsmil_softmax_twice
        self.teachers_train_mode_for_labels = teachers_train_mode_for_labels
        self.score_ranges: list[tuple[float, float]] = []
        self._student_losses: list[float] = []
        self.student_engine = Engine(self._student_iteration)
        self.add_event_handler(Events.STARTED, self._broadcast_parameters)
        self.add_event_handler(Events.ITERATION_COMPLETED, self._broadcast_buffers)
        self.student_engine.add_event_handler(Events.ITERATION_COMPLETED, self._broadcast_buffers)
        self.add_event_handler(Events.EPOCH_STARTED, self._reset_ranges)
        self.add_event_handler(Events.EPOCH_COMPLETED, self._student_phase)
        if train_handlers is not None:  # after the student phase: validation and checkpoints see the whole epoch
            self._register_handlers(train_handlers)

    def _broadcast_parameters(self, _: Engine) -> None:
        """Multi-process runs: every rank starts from rank 0's parameters and buffers."""
        broadcast_from_rank0([*self.network.parameters(), *self.network.buffers()])

    def _broadcast_buffers(self, _: Engine) -> None:
        """Multi-process runs: after every teacher or student step all ranks take rank 0's buffers (BatchNorm running
        statistics), as DDP does with ``broadcast_buffers=True``, so that every rank validates and saves one network."""
        broadcast_from_rank0(self.network.buffers())

    def _average_gradients(self, parts: Sequence[str]) -> None:
        """Multi-process runs: replace the gradients of ``parts`` by their mean over the ranks (zero-filled first)."""
        if world_size() == 1:
            return
        params = [p for part in parts for p in getattr(self.network, part).parameters() if p.requires_grad]
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
        average_gradients(params)

    def _global_score_ranges(self) -> None:
        """Multi-process runs: each teacher's ``(min, max)`` over the instances of every rank."""
        if world_size() == 1:
            return
        device = self.state.device
        lows = all_reduce_extreme(torch.tensor([lo for lo, _ in self.score_ranges], dtype=torch.float64,
                                               device=device), largest=False)
        highs = all_reduce_extreme(torch.tensor([hi for _, hi in self.score_ranges], dtype=torch.float64,
                                                device=device), largest=True)
        self.score_ranges = [(float(lo), float(hi)) for lo, hi in zip(lows.tolist(), highs.tolist())]

    def _reset_ranges(self, _: Engine) -> None:
        self.score_ranges = [(math.inf, -math.inf), (math.inf, -math.inf)]

    def _record(self, *scores: torch.Tensor) -> None:
        """Widen each teacher's ``(min, max)`` by this bag's instance scores."""
        self.score_ranges = [(min(lo, float(s.min())), max(hi, float(s.max())))
                             for (lo, hi), s in zip(self.score_ranges, scores)]

    def _step(self, loss: torch.Tensor | None, parts: Sequence[str]) -> None:
        """Backward (scaled under AMP; none when ``loss`` is None: a skipped bag of a multi-process run), gradients
        averaged over the ranks, and one step of the optimisers of ``parts``."""
        use_scaler = self.amp and self.scaler is not None
        if loss is not None and use_scaler:
            self.scaler.scale(loss).backward()
        elif loss is not None:
            loss.backward()
        self._average_gradients(parts)
        for part in parts:
            if use_scaler:
                self.scaler.step(self.optimizers[part])
            else:
                self.optimizers[part].step()
        if use_scaler:
            self.scaler.update()

    def _zero_grad(self, parts: Sequence[str]) -> None:
        for part in parts:
            self.optimizers[part].zero_grad(set_to_none=True)

    def _check_finite(self, loss: torch.Tensor, what: str) -> None:
        if not torch.isfinite(loss):
            raise FloatingPointError(f"BagDistillationTrainer: {what} loss is {loss.item()} in epoch "
                                     f"{self.state.epoch}; lower the learning rate or check the data")

    def _iteration(self, engine: BagDistillationTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One teacher step on one bag (module docstring, step 1)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        exam = _exam_id(batchdata, "exam_id") or f"iteration {engine.state.iteration}"
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        bag, bag_label = _bag(image, label, exam)
        epoch = engine.state.epoch - 1
        if self.smooth_epochs is not None and epoch > self.smooth_epochs and bag_label.item() == 1.0:
            if world_size() > 1:  # the other ranks may step on their bags: join their average with zero gradients
                self._zero_grad(PARTS[:3])
                self._step(None, PARTS[:3])
            output = {Keys.LOSS: torch.zeros((), device=bag.device), Keys.LABEL: bag_label, "exam_id": exam,
                      "skipped": True}
            engine.state.output = output
            engine.fire_event(IterationEvents.MODEL_COMPLETED)
            return output
        net = engine.network
        for part in PARTS[:3]:
            getattr(net, part).train()
        self._zero_grad(PARTS[:3])
        use_scaler = engine.amp and engine.scaler is not None
        engine.state.output = {Keys.IMAGE: bag, Keys.LABEL: bag_label}
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            features = net.encoder(bag)
            logits1, scores1 = net.teacher1(features)
            logits2, scores2 = net.teacher2(features)
            engine.state.output[Keys.PRED] = (logits1, logits2)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            loss1 = abmil_bag_loss(torch.softmax(logits1.float(), dim=1), bag_label)
            loss2 = dsmil_bag_loss(torch.softmax(logits2.float(), dim=1), scores2.float(), bag_label,
                                   softmax_twice=self.dsmil_softmax_twice)
            loss = self.teacher_loss_weights[0] * loss1 + self.teacher_loss_weights[1] * loss2
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        self._check_finite(loss, f"teacher (bag '{exam}')")
        self._step(loss, PARTS[:3])
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        scores1, scores2 = scores1.detach().float(), scores2.detach().float()
        self._record(scores1, scores2)
        output = {Keys.LOSS: loss.detach(), "loss_teacher1": loss1.detach(), "loss_teacher2": loss2.detach(),
                  "teacher1_scores": scores1, "teacher2_scores": scores2, Keys.LABEL: bag_label, "exam_id": exam,
                  "skipped": False}
        engine.state.output = output
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return output

    def _student_phase(self, engine: BagDistillationTrainer) -> None:
        """Module docstring, step 2: one pass over the instance loader when ``e % student_period == 0``."""
        epoch = engine.state.epoch - 1
        if epoch % self.student_period:
            return
        self._global_score_ranges()
        if not self.score_ranges or any(not hi > lo for lo, hi in self.score_ranges):
            raise ValueError(f"BagDistillationTrainer: epoch {engine.state.epoch} recorded no usable teacher score "
                             f"range {self.score_ranges} (every bag skipped, or all scores equal); the student "
                             "phase needs min < max for each teacher")
        engine.fire_event(BagDistillationEvents.STUDENT_STARTED)
        sampler = getattr(self.instance_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self._student_losses = []
        self.student_engine.run(self.instance_loader, max_epochs=1)
        if not self._student_losses:
            raise ValueError("BagDistillationTrainer: the instance loader gave no batch")
        engine.state.metrics["student_loss"] = sum(self._student_losses) / len(self._student_losses)
        logger.info("epoch %d: student phase over %d batches, mean loss %.4f, teacher score ranges %s",
                    engine.state.epoch, len(self._student_losses), engine.state.metrics["student_loss"],
                    self.score_ranges)
        engine.fire_event(BagDistillationEvents.STUDENT_COMPLETED)

    def _student_iteration(self, student_engine: Engine, batchdata: dict[str, Any]) -> dict:
        """One student step on an instance batch (module docstring, step 2)."""
        image, label = self.prepare_batch(batchdata, self.state.device, self.non_blocking, **self.to_kwargs)
        image = convert_to_tensor(image, track_meta=False)
        if label is None or image.ndim != 4:
            raise ValueError(f"student phase: an instance batch must be {{'image': [B, 3, H, W], 'label': [B]}}, got "
                             f"image {tuple(image.shape)} and label {None if label is None else tuple(label.shape)}")
        label = convert_to_tensor(label, track_meta=False).reshape(-1)
        net = self.network
        net.encoder.train()
        net.student.train()
        net.teacher1.train(self.teachers_train_mode_for_labels)
        net.teacher2.train(self.teachers_train_mode_for_labels)
        self._zero_grad(("encoder", "student"))
        use_scaler = self.amp and self.scaler is not None
        with torch.autocast("cuda", enabled=use_scaler, **self.amp_kwargs):
            features = net.encoder(image)
            with torch.no_grad():
                scores = [net.teacher1(features.detach())[1].float(), net.teacher2(features.detach())[1].float()]
                targets = merge_pseudo_labels(scores, self.score_ranges, self.pl_merge_weights, label)
            loss = student_distillation_loss(net.student(features), targets, self.student_neg_weight)
        self._check_finite(loss, "student")
        self._step(loss, ("encoder", "student"))
        self._student_losses.append(loss.item())
        return {Keys.LOSS: loss.detach(), "pseudo_label": targets, Keys.LABEL: label}


class BagEvaluator(Evaluator):
    """Per-bag evaluation of an :class:`~common.networks.mil.EndoKEDMIL`: teacher bag scores, student instance
    scores and the student bag score ``max_i p_{i,1}`` (specs/endoked.md §2.5 step 4).

    A batch is one bag ``{"image": [1, N, 3, H, W], "label": [1], "instance_label": [1, N] optional (-1 =
    unknown), "exam_id": optional, "image_paths": optional (the N file names, for :class:`BagScoreWriter`)}``.
    The output of every iteration (``decollate`` is always False)::

        teacher1_prob, teacher2_prob  [1]  softmax(bag logits)[1] of each teacher
        student_prob                  [1]  max_i softmax(student(h_i))[1]
        instance_prob                 [N]  softmax(student(h_i))[1]
        instance_label                [N]  the given instance labels, -1 when absent
        label                         [1]  bag label
        exam_id, image_paths               str / list[str] (None when absent)

    so ``monai.handlers.ROCAUC(output_transform=from_engine(["student_prob", "label"]))`` is the bag AUC (likewise
    per teacher) and :class:`InstanceAUC` the instance AUC.

    Args:
        device: torch device.
        val_data_loader: bag loader (batch size 1).
        network: an :class:`~common.networks.mil.EndoKEDMIL` (or any module with the four parts).
        exam_id_key, paths_key, instance_label_key: batch keys of the exam id, the image paths and the instance
            labels.
        kwargs: those of ``monai.engines.Evaluator`` (``key_val_metric``, ``additional_metrics``, ``val_handlers``,
            ``amp``, ``mode``, ...).
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable | DataLoader, network: nn.Module,
                 exam_id_key: str = "exam_id", paths_key: str = "image_paths",
                 instance_label_key: str = "instance_label", **kwargs: Any) -> None:
        _check_network("BagEvaluator", network)
        kwargs["decollate"] = False
        super().__init__(device=device, val_data_loader=val_data_loader, **kwargs)
        self.network = network.to(self.state.device)
        self.exam_id_key, self.paths_key, self.instance_label_key = exam_id_key, paths_key, instance_label_key

    def _iteration(self, engine: BagEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        exam_id = _exam_id(batchdata, self.exam_id_key)
        exam = exam_id or f"iteration {engine.state.iteration}"
        image, label = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        bag, bag_label = _bag(image, label, exam)
        n = bag.shape[0]
        instance_label = torch.full((n,), -1, dtype=torch.long)
        if batchdata.get(self.instance_label_key) is not None:
            given = torch.as_tensor(batchdata[self.instance_label_key]).reshape(-1)
            if given.numel() != n:
                raise ValueError(f"bag '{exam}': {given.numel()} instance labels for {n} images")
            instance_label = given.long()
        paths = None
        if batchdata.get(self.paths_key) is not None:
            paths = _strings(batchdata[self.paths_key])
            if len(paths) != n:
                raise ValueError(f"bag '{exam}': {len(paths)} image paths for {n} images")
        net = engine.network
        with engine.mode(net), torch.autocast("cuda", enabled=engine.amp, **engine.amp_kwargs):
            features = net.encoder(bag)
            logits1, _ = net.teacher1(features)
            logits2, _ = net.teacher2(features)
            instance_prob = torch.softmax(net.student(features).float(), dim=1)[:, 1]
        engine.state.output = {
            "teacher1_prob": torch.softmax(logits1.float(), dim=1)[:, 1],
            "teacher2_prob": torch.softmax(logits2.float(), dim=1)[:, 1],
            "student_prob": instance_prob.max().reshape(1),
            "instance_prob": instance_prob,
            "instance_label": instance_label.to(instance_prob.device),
            Keys.LABEL: bag_label,
            "exam_id": exam_id,
            "image_paths": paths,
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class InstanceAUC(Metric):
    """ROC AUC of the instance scores over every instance with a known label (``>= 0``), pooled over the bags.

    MONAI's ``ROCAUC`` handler cannot take a bag whose instances are all unknown (an empty batch), hence this
    metric. The value is ``monai.metrics.compute_roc_auc`` of the pooled scores (NaN, with MONAI's warning, when only
    one class is present).

    Args:
        output_transform: engine output -> ``(scores [N], labels [N])``; default reads ``instance_prob`` and
            ``instance_label`` of :class:`BagEvaluator`.
        device: where the pooled tensors are kept.
    """

    def __init__(self, output_transform: Callable | None = None, device: str | torch.device = "cpu") -> None:
        self._scores: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []
        super().__init__(output_transform=output_transform or from_engine(["instance_prob", "instance_label"]),
                         device=device)

    def reset(self) -> None:
        self._scores, self._labels = [], []

    def update(self, output: Sequence[torch.Tensor]) -> None:
        scores, labels = (torch.as_tensor(x).detach().reshape(-1) for x in output)
        if scores.numel() != labels.numel():
            raise ValueError(f"InstanceAUC: {scores.numel()} scores for {labels.numel()} labels")
        known = labels >= 0
        self._scores.append(scores[known].float().to(self._device))
        self._labels.append(labels[known].to(self._device))

    def compute(self) -> float:
        labels = torch.cat(self._labels) if self._labels else torch.zeros(0)
        if labels.numel() == 0:
            raise NotComputableError("InstanceAUC: no instance with a known label (>= 0) was seen")
        return float(compute_roc_auc(torch.cat(self._scores), labels))


def write_bag_scores(exam_id: str, image_paths: Sequence[str], scores: Sequence[float] | torch.Tensor,
                     bag_label: int | float | torch.Tensor, out_dir: str | os.PathLike) -> Path:
    """Write one bag's student scores as ``<out_dir>/<exam_id>_gt<bag_label>.csv`` (specs/endoked.md §2.7).

    Columns ``'0'`` = image path and ``'1'`` = student positive probability ``p_{i,1}``, one row per image in the
    bag's order; the ``gt1`` / ``gt0`` suffix is what the WSSS list builders select on. Written atomically.

    Raises:
        ValueError: an empty or path-like ``exam_id``, a label other than 0/1, or paths and scores of different
            lengths (the message names the exam).
    """
    exam = str(exam_id)
    if not exam or exam in (".", "..") or "/" in exam or "\\" in exam:
        raise ValueError(f"write_bag_scores: exam id {exam!r} cannot name a file (empty or containing a path "
                         "separator)")
    label = float(torch.as_tensor(bag_label).reshape(-1)[0])
    if label not in (0.0, 1.0):
        raise ValueError(f"write_bag_scores: bag '{exam}' has label {label}; expected 0 or 1")
    values = torch.as_tensor(scores).detach().float().reshape(-1).tolist()
    paths = [str(p) for p in image_paths]
    if len(paths) != len(values):
        raise ValueError(f"write_bag_scores: bag '{exam}' has {len(paths)} image paths and {len(values)} scores")
    return write_csv(Path(out_dir) / f"{exam}_gt{int(label)}.csv", ["0", "1"], zip(paths, values))


class BagScoreWriter:
    """Ignite handler writing one :func:`write_bag_scores` CSV per bag from a :class:`BagEvaluator`'s output.

    Args:
        out_dir: folder of the CSV files (created when missing).
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        output = engine.state.output
        if not isinstance(output, Mapping) or "instance_prob" not in output:
            raise ValueError("BagScoreWriter: the engine output must be a BagEvaluator output (a dict with "
                             "'instance_prob', 'image_paths', 'exam_id', 'label')")
        if output.get("image_paths") is None:
            raise ValueError(f"BagScoreWriter: bag '{output.get('exam_id')}' has no image paths (batch key "
                             "'image_paths' of the BagEvaluator)")
        if output.get("exam_id") is None:
            raise ValueError("BagScoreWriter: a bag has no exam id (batch key 'exam_id' of the BagEvaluator)")
        write_bag_scores(output["exam_id"], output["image_paths"], output["instance_prob"], output[Keys.LABEL],
                         self.out_dir)
