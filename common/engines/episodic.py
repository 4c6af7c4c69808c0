"""Episodic few-shot segmentation training and K-shot evaluation as MONAI engines.

Lei et al., "Cross-Domain Few-Shot Semantic Segmentation" (PATNet), ECCV 2022, with the CD-TG text plug-in of
"Leveraging Language to Generalize Natural Images to Few-shot Medical Image Segmentation" (specs/cdtg.md §1, §3,
§4.7). A batch is a collated episode dict (contract §1): ``query_image [B, 3, H, W]``, ``query_mask [B, H, W]``,
``query_ignore [B, H, W]`` (optional), ``support_images [B, K, 3, H, W]``, ``support_masks [B, K, H, W]``,
``class_id [B]``, and, when the dataset has a text table, ``class_text`` / ``background_text [B, d]``. The network
is any module called as ``logits = network(q, s, m, class_text=..., background_text=...)`` with
``q, s [B, 3, H, W]``, ``m [B, H, W]`` and 2-class logits ``[B, 2, H, W]``; the text tensors are passed only when
the batch has them.

* :class:`EpisodicTrainer` — one iteration = one batch of 1-shot episodes (the first support of each):
  ``L = CE(network(q, s_1, m_1), M_q)`` over every pixel (§4.7; the query ignore map is not used by the loss), or,
  for a host whose paper trains with more terms (Q-Net's prototype alignment, DMTNet's background and coarse
  terms, IFA's bi-directional terms), its own objective ``(L, logits) = network.episode_loss(q, s_1, m_1, M_q,
  class_text=..., background_text=...)``; backward (``GradScaler`` under AMP), gradients averaged over the ranks of
  a multi-process run, optimiser step.
* :class:`EpisodicEvaluator` — K forward passes per episode, one per support, ``P_k = argmax logits_k``, merged by
  :func:`vote_shots` (§3, HSNet's ``predict_mask_nshot``)::

      V(x) = sum_k P_k(x),   P(x) = 1[ V(x) / max(max_x' V(x'), 1) >= 0.5 ]      (K > 1; P = P_1 for K = 1)

  normalised by the episode's own maximum vote, not by K. A host with its own K-shot rule (``kshot_forward``, IFA's
  prototype mean) is called once with the K supports ``[B, K, 3, H, W]`` instead. With ``finetune_steps > 0`` the
  host first adapts on the batch's supports (test-time fine-tuning: DMTNet's TSF, IFA's fine-tuning, PATNet's TFI;
  ``network.finetune(q, S [B, K, 3, H, W], M [B, K, H, W], ..., steps=finetune_steps)``, the K shots handled as its
  paper does), predicts, and gets its fine-tuned parameters back
  (:func:`common.networks.fewshot_host.finetuned`), so every batch of episodes starts from the trained weights;
  with the default ``batch_size`` 1, every episode. Fine-tuning runs in eval mode, in float32.

Both engines output (``decollate`` is False: a batch-first dict) ``pred [B, H, W]`` long, ``label [B, H, W]``
long (the query mask), ``class_id [B]``, ``ignore [B, H, W]`` (None when the batch has no ``query_ignore``), read
by :class:`common.metrics.fewshot.FewShotIoUMetric`; the trainer adds ``loss``, the evaluator ``image`` (query),
``support_images`` and ``support_masks`` for :class:`common.handlers.fewshot_report.FewShotExamples`.

Multi-process training keeps the network unwrapped, as :mod:`common.engines.toco_trainer` does: every rank starts
from rank 0's parameters and buffers, and every step uses the gradients averaged over the ranks.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.utils import convert_to_tensor
from monai.utils.enums import CommonKeys as Keys
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from common.engines.optimiser_step import backward_and_step
from common.networks.fewshot_host import finetuned, supports_finetuning
from common.networks.shot_vote import vote_shots
from common.utils.distributed import broadcast_from_rank0

__all__ = ["EpisodicEvaluator", "EpisodicTrainer", "episode_batch", "vote_shots"]

TEXT_KEYS = ("class_text", "background_text")


def _tensor(batchdata: Mapping[str, Any], key: str, ndim: int, device: torch.device, non_blocking: bool
            ) -> torch.Tensor:
    if key not in batchdata or batchdata[key] is None:
        raise ValueError(f"episode batch has no {key!r} (keys: {sorted(batchdata)}); expected a collated few-shot "
                         "episode (contract §1)")
    value = convert_to_tensor(batchdata[key], track_meta=False).to(device, non_blocking=non_blocking)
    if value.ndim != ndim:
        raise ValueError(f"episode batch: {key!r} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def episode_batch(batchdata: Mapping[str, Any], device: torch.device | str, non_blocking: bool = False
                  ) -> dict[str, Any]:
    """Check a collated episode batch and move it to ``device``.

    Returns ``{"query_image" [B, 3, H, W] float, "query_mask" [B, H, W] long, "query_ignore" [B, H, W] | None,
    "support_images" [B, K, 3, H, W] float, "support_masks" [B, K, H, W] float, "class_id" [B] long,
    "text": {"class_text", "background_text"} (empty when the batch has no text)}``.

    Raises:
        ValueError: a missing key, a wrong number of dimensions, inconsistent B / K / H / W, or only one of the two
            text tensors.
    """
    if not isinstance(batchdata, Mapping):
        raise ValueError(f"episode batch must be a dict (collated contract §1 episodes), got "
                         f"{type(batchdata).__name__}")
    device = torch.device(device)
    query = _tensor(batchdata, "query_image", 4, device, non_blocking).float()
    mask = _tensor(batchdata, "query_mask", 3, device, non_blocking)
    supports = _tensor(batchdata, "support_images", 5, device, non_blocking).float()
    support_masks = _tensor(batchdata, "support_masks", 4, device, non_blocking).float()
    class_id = _tensor(batchdata, "class_id", 1, device, non_blocking).long()
    ignore = None
    if batchdata.get("query_ignore") is not None:
        ignore = _tensor(batchdata, "query_ignore", 3, device, non_blocking)
    b, _, h, w = query.shape
    k = supports.shape[1]
    expected = {"query_mask": (b, h, w), "support_images": (b, k, 3, h, w), "support_masks": (b, k, h, w),
                "class_id": (b,), "query_ignore": (b, h, w)}
    for key, value in (("query_mask", mask), ("support_images", supports), ("support_masks", support_masks),
                       ("class_id", class_id), ("query_ignore", ignore)):
        if value is not None and tuple(value.shape) != expected[key]:
            raise ValueError(f"episode batch: {key!r} has shape {tuple(value.shape)}, expected {expected[key]} "
                             f"(query_image {tuple(query.shape)}, {k} shot(s))")
    if k < 1:
        raise ValueError("episode batch: 'support_images' holds no support (K = 0)")
    present = [key for key in TEXT_KEYS if batchdata.get(key) is not None]
    if len(present) == 1:
        raise ValueError(f"episode batch has {present[0]!r} but not the other of {TEXT_KEYS}; the text guide needs "
                         "both")
    text = {key: _tensor(batchdata, key, 2, device, non_blocking).float() for key in present}
    for key, value in text.items():
        if value.shape[0] != b:
            raise ValueError(f"episode batch: {key!r} has {value.shape[0]} rows for {b} episodes")
    return {"query_image": query, "query_mask": mask.long(), "query_ignore": ignore, "support_images": supports,
            "support_masks": support_masks, "class_id": class_id, "text": text}


def _check_logits(logits: torch.Tensor, mask: torch.Tensor, where: str) -> None:
    if logits.ndim != 4 or logits.shape[1] != 2 or logits.shape[2:] != mask.shape[1:]:
        raise ValueError(f"{where}: the network must return 2-class logits [B, 2, H, W] = [{mask.shape[0]}, 2, "
                         f"{mask.shape[1]}, {mask.shape[2]}], got {tuple(logits.shape)}")


class EpisodicTrainer(SupervisedTrainer):
    """One-shot episodic training (module docstring).

    Args:
        device: torch device.
        max_epochs: training epochs.
        train_data_loader: loader of collated episodes.
        network: the few-shot network (contract §2 call signature).
        optimizer: its optimiser (Adam, lr 1e-3 in PATNet).
        loss_function: ``loss(logits [B, 2, H, W], query_mask [B, H, W] long)``; default ``nn.CrossEntropyLoss()``,
            or the network's own ``episode_loss`` when it has one (module docstring). An explicit ``loss_function``
            is used for every network.
        kwargs: the other arguments of ``monai.engines.SupervisedTrainer`` (``key_train_metric``, ``train_handlers``,
            ``amp``, ...); ``decollate`` defaults to False. The ``inferer`` and ``prepare_batch`` are not used.
    """

    def __init__(self, device: str | torch.device, max_epochs: int, train_data_loader: Iterable | DataLoader,
                 network: nn.Module, optimizer: Optimizer, loss_function: nn.Module | None = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, max_epochs=max_epochs, train_data_loader=train_data_loader, network=network,
                         optimizer=optimizer, loss_function=loss_function or nn.CrossEntropyLoss(), **kwargs)
        self.uses_episode_loss = loss_function is None and callable(getattr(network, "episode_loss", None))
        self.add_event_handler(Events.STARTED, self._broadcast_parameters)

    def _broadcast_parameters(self, engine: EpisodicTrainer) -> None:
        """Multi-process runs: every rank starts from rank 0's parameters and buffers (a no-op in one process)."""
        broadcast_from_rank0([*engine.network.parameters(), *engine.network.buffers()])

    def _iteration(self, engine: EpisodicTrainer, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """One step on the first support of each episode; returns ``{"image", "label", "pred", "class_id",
        "ignore", "loss"}`` (``pred`` the arg-max mask)."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        ep = episode_batch(batchdata, engine.state.device, engine.non_blocking)
        label = ep["query_mask"]
        network = engine.network
        network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        use_scaler = engine.amp and engine.scaler is not None
        engine.state.output = {Keys.IMAGE: ep["query_image"], Keys.LABEL: label, "class_id": ep["class_id"],
                               "ignore": ep["query_ignore"]}
        episode = (ep["query_image"], ep["support_images"][:, 0], ep["support_masks"][:, 0])
        with torch.autocast("cuda", enabled=use_scaler, **engine.amp_kwargs):
            if engine.uses_episode_loss:  # the host's own objective, computed in the same pass as its logits
                loss, logits = network.episode_loss(*episode, label, **ep["text"])
            else:
                logits = network(*episode, **ep["text"])
            _check_logits(logits, label, "EpisodicTrainer")
            engine.state.output[Keys.PRED] = logits
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            if not engine.uses_episode_loss:
                loss = engine.loss_function(logits.float(), label)
            loss = loss.float().mean()
            engine.state.output[Keys.LOSS] = loss
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"EpisodicTrainer: loss is {loss.item()} at iteration {engine.state.iteration}; "
                                     "lower the learning rate or check the episodes")
        backward_and_step(engine, loss, network.parameters(), use_scaler)
        engine.state.output.update({Keys.PRED: logits.detach().argmax(dim=1), Keys.LOSS: loss.detach()})
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class EpisodicEvaluator(SupervisedEvaluator):
    """K-shot evaluation by one forward pass per support and the vote of :func:`vote_shots`, after optional
    test-time fine-tuning (module docstring).

    Forward passes run under ``torch.no_grad()`` in the evaluator's ``mode`` (eval by default) and, with ``amp``,
    under CUDA autocast.

    Args:
        device: torch device.
        val_data_loader: loader of collated episodes (K supports each).
        network: the few-shot network (contract §2 call signature); moved to ``device``.
        finetune_steps: test-time fine-tuning steps per batch of episodes (0: off); needs a network with
            ``finetune`` and ``finetune_parameters`` (:mod:`common.networks.fewshot_host`).
        kwargs: the other arguments of ``monai.engines.SupervisedEvaluator`` (``key_val_metric``,
            ``additional_metrics``, ``val_handlers``, ``amp``, ``mode``, ...); ``decollate`` defaults to False.
            The ``inferer`` and ``prepare_batch`` are not used.
    """

    def __init__(self, device: str | torch.device, val_data_loader: Iterable | DataLoader, network: nn.Module,
                 finetune_steps: int = 0, **kwargs: Any) -> None:
        if int(finetune_steps) != finetune_steps or finetune_steps < 0:
            raise ValueError(f"EpisodicEvaluator: finetune_steps must be an integer >= 0, got {finetune_steps!r}")
        if finetune_steps > 0 and not supports_finetuning(network):
            raise ValueError(f"EpisodicEvaluator: finetune_steps={finetune_steps}, but {type(network).__name__} has no "
                             "test-time fine-tuning (finetune and finetune_parameters); use finetune_steps=0")
        kwargs.setdefault("decollate", False)
        super().__init__(device=device, val_data_loader=val_data_loader, network=network, **kwargs)
        self.network = network.to(self.state.device)
        self.finetune_steps = int(finetune_steps)

    def _iteration(self, engine: EpisodicEvaluator, batchdata: dict[str, Any]) -> dict:  # type: ignore[override]
        """Returns ``{"image", "support_images", "support_masks", "label", "pred", "class_id", "ignore"}``."""
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        ep = episode_batch(batchdata, engine.state.device, engine.non_blocking)
        query, supports, masks = ep["query_image"], ep["support_images"], ep["support_masks"]
        network = engine.network
        with engine.mode(network), finetuned(network, engine.finetune_steps, query, supports, masks, **ep["text"]), \
                torch.no_grad(), torch.autocast("cuda", enabled=engine.amp, **engine.amp_kwargs):
            if getattr(network, "kshot_forward", False):  # the host merges the K shots itself, in one call
                calls = [(supports, masks)]
            else:
                calls = [(supports[:, k], masks[:, k]) for k in range(supports.shape[1])]
            shots = []
            for support, mask in calls:
                logits = network(query, support, mask, **ep["text"])
                _check_logits(logits, ep["query_mask"], "EpisodicEvaluator")
                shots.append(logits.argmax(dim=1))
            pred = vote_shots(torch.stack(shots))
        engine.state.output = {
            Keys.IMAGE: query, "support_images": supports, "support_masks": masks, Keys.LABEL: ep["query_mask"],
            Keys.PRED: pred, "class_id": ep["class_id"], "ignore": ep["query_ignore"],
        }
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
