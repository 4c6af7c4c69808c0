"""ASG pre-training as MONAI engines: one optimisation step on the four objectives, and the validation loss.

Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training", MICCAI 2024 (specs/asg.md §4-§5).
A batch is a collated pre-training batch (:func:`common.transforms.cxr.asg_collate`)::

    image [B, 3, H, W]   input_ids / attention_mask / token_type_ids [B, L]   labels [B, 40] (1 / 0 / -1)
    rois [B, R, 5] (batch index, x1, y1, x2, y2 in grid units)   sent_index [B, R, S]
    count_matrix [B, R, R]   count_label [B, R]

The network is a :class:`common.networks.asg.ASGModel` (``pretrain_outputs``) and the loss an
:class:`common.losses.asg.ASGLoss`::

    L = L_IRA + L_ARSA + 5 L_IRL + L_ERL                                             (§4, main.py:180)

* :class:`ASGTrainer` — backward (``GradScaler`` under AMP), gradients averaged over the ranks of a multi-process run
  (each rank's losses use its own batch as negatives, as DDP does in the original), optimiser step; the buffers
  (BatchNorm statistics of the projection heads) then follow rank 0, as DDP's buffer broadcast makes them.
* :class:`ASGEvaluator` — the same loss under ``no_grad`` (the released ``val_loss`` drives checkpointing), and
  top-1 / top-5 image-to-report retrieval accuracy of the batch similarity matrix.

Both engines output (``decollate`` False) ``{"loss", "ira", "arsa", "irl", "erl", "acc1", "acc5"}`` as floats
(tensors for ``loss``), which :func:`loss_metrics` averages over an epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Events
from ignite.metrics import Average
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.engines.optimiser_step import backward_and_step
from common.losses.asg import retrieval_accuracy
from common.utils.distributed import broadcast_from_rank0

__all__ = ["ASGEvaluator", "ASGTrainer", "BATCH_KEYS", "LOSS_TERMS", "asg_batch", "loss_metrics"]

BATCH_KEYS: dict[str, int] = {"image": 4, "input_ids": 2, "attention_mask": 2, "token_type_ids": 2, "labels": 2,
                              "rois": 3, "sent_index": 3, "count_matrix": 3, "count_label": 2}
"""Keys of a collated pre-training batch and their number of dimensions."""
LOSS_TERMS = ("loss", "ira", "arsa", "irl", "erl")


def asg_batch(batchdata: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False
              ) -> dict[str, torch.Tensor]:
    """Check a collated pre-training batch (module docstring) and move it to ``device``.

    Raises:
        ValueError: not a dict, a missing key, a wrong number of dimensions or a batch size that differs between keys.
    """
    if not isinstance(batchdata, Mapping):
        raise ValueError(f"ASG batch must be a dict collated by common.transforms.cxr.asg_collate, got "
                         f"{type(batchdata).__name__}")
    batch: dict[str, torch.Tensor] = {}
    for key, ndim in BATCH_KEYS.items():
        if batchdata.get(key) is None:
            raise ValueError(f"ASG batch has no {key!r} (keys: {sorted(batchdata)}); the pre-training transforms "
                             "must produce every key of common.engines.asg_pretraining.BATCH_KEYS")
        value = convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=non_blocking)
        if value.ndim != ndim:
            raise ValueError(f"ASG batch: {key!r} must have {ndim} dimensions, got shape {tuple(value.shape)}")
        batch[key] = value
    sizes = {key: int(value.shape[0]) for key, value in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"ASG batch: batch sizes differ between keys: {sizes}")
    batch["image"] = batch["image"].float()
    return batch


def _forward(engine: SupervisedTrainer | SupervisedEvaluator, batch: dict[str, torch.Tensor], use_amp: bool
             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    with torch.autocast("cuda", enabled=use_amp, **engine.amp_kwargs):
        outputs = engine.network.pretrain_outputs(batch["image"], batch["input_ids"], batch["attention_mask"],
                                                  batch["token_type_ids"], batch["rois"], batch["sent_index"])
    outputs = {key: value.float() for key, value in outputs.items()}  # the losses run in float32
    engine.fire_event(IterationEvents.FORWARD_COMPLETED)
    terms = engine.loss_function(outputs, batch)
    engine.fire_event(IterationEvents.LOSS_COMPLETED)
    if not torch.isfinite(terms["loss"]):
        raise FloatingPointError(f"{type(engine).__name__}: loss is {terms['loss'].item()} at iteration "
                                 f"{engine.state.iteration} ({ {k: float(v) for k, v in terms.items()} }); lower the "
                                 "learning rate or check the batch")
    return outputs, terms


def _output(outputs: dict[str, torch.Tensor], terms: dict[str, torch.Tensor]) -> dict[str, Any]:
    scores = retrieval_accuracy(outputs["image_emb"].detach(), outputs["report_emb"].detach())
    return {Keys.LOSS: terms["loss"].detach(), **{k: float(terms[k].detach()) for k in LOSS_TERMS[1:]}, **scores}


def _lower(current: float, best: float) -> bool:
    return current < best


class ASGTrainer(SupervisedTrainer):
    """ASG pre-training (module docstring).

    Args:
        device: torch device.
        max_epochs: training epochs (50 in the paper, with early stopping on the validation loss).
        train_data_loader: loader of collated pre-training batches (``drop_last=True`` as released).
        network: an :class:`~common.networks.asg.ASGModel`.
        optimizer: AdamW (lr 4e-5, weight decay 0.05 on every parameter, §5).
        loss_function: an :class:`~common.losses.asg.ASGLoss`.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (``train_handlers``, ``amp``,
            ``additional_metrics``, ...); ``decollate`` defaults to False. ``inferer`` and ``prepare_batch`` are
            not used.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable | DataLoader,
                 network: nn.Module, optimizer: Optimizer, loss_function: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=loss_function, **kwargs)
        self.add_event_handler(Events.STARTED, self._broadcast_parameters)

    def _broadcast_parameters(self, engine: ASGTrainer) -> None:
        """Multi-process runs: every rank starts from rank 0's parameters and buffers (a no-op in one process)."""
        broadcast_from_rank0([*engine.network.parameters(), *engine.network.buffers()])

    def _iteration(self, engine: ASGTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One optimisation step; returns the loss terms and the batch retrieval accuracy."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = asg_batch(batchdata, engine.state.device, engine.non_blocking)
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        outputs, terms = _forward(engine, batch, use_scaler)
        trainable = [p for p in engine.network.parameters() if p.requires_grad]
        backward_and_step(engine, terms["loss"], trainable, use_scaler)
        # BatchNorm statistics of the projection heads follow rank 0, as DDP's buffer broadcast does (no-op in one
        # process)
        broadcast_from_rank0(list(engine.network.buffers()))
        engine.state.output = _output(outputs, terms)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ASGEvaluator(SupervisedEvaluator):
    """The pre-training loss on a validation loader, under ``no_grad`` in the evaluator's ``mode`` (eval).

    Args:
        device: torch device.
        val_data_loader: loader of collated pre-training batches.
        network: an :class:`~common.networks.asg.ASGModel`.
        loss_function: an :class:`~common.losses.asg.ASGLoss`.
        kwargs: the other arguments of ``monai.engines.SupervisedEvaluator`` (``key_val_metric``, ``val_handlers``,
            ``amp``, ...); ``decollate`` defaults to False. The key metric is a loss: lower is better, and the best
            value starts at +inf (MONAI's default comparison keeps the highest, from -1).
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable | DataLoader, network: nn.Module,
                 loss_function: nn.Module, **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        kwargs.setdefault("metric_cmp_fn", _lower)
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.state.best_metric = float("inf")
        self.loss_function = loss_function

    def _iteration(self, engine: ASGEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """The loss terms and the retrieval accuracy of one validation batch."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = asg_batch(batchdata, engine.state.device, engine.non_blocking)
        with engine.mode(engine.network), torch.no_grad():
            outputs, terms = _forward(engine, batch, engine.amp)
        engine.state.output = _output(outputs, terms)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


def loss_metrics(prefix: str = "", names: Iterable[str] = (*LOSS_TERMS, "acc1", "acc5")) -> dict[str, Average]:
    """Epoch averages of the engines' outputs, ``{prefix + name: ignite Average}``, for ``key_val_metric`` /
    ``additional_metrics`` (e.g. ``val_loss``, the released checkpointing criterion)."""

    def take(name: str):
        return lambda output: float(output[name])

    return {f"{prefix}{name}": Average(output_transform=take(name)) for name in names}
