"""Few-shot segmentation mIoU and FB-IoU, accumulated per episode class (the PATNet / HSNet evaluator).

Lei et al., "Cross-Domain Few-Shot Semantic Segmentation" (PATNet), ECCV 2022, which keeps the protocol of Min et
al., "Hypercorrelation Squeeze for Few-Shot Segmentation" (HSNet), ICCV 2021; specs/cdtg.md §3. For every episode
``b`` with binary prediction ``P_b`` and ground truth ``G_b`` (``[H, W]``, values 0 / 1) and its class ``c_b``,
over the pixels that are not ignored (PASCAL's 255 boundary)::

    I_b[k] = #{x : P_b(x) = G_b(x) = k},   U_b[k] = #{P_b = k} + #{G_b = k} - I_b[k]      k = 0 (bg), 1 (fg)
    I[k, c_b] += I_b[k],                   U[k, c_b] += U_b[k]
    IoU[k, c] = I[k, c] / max(U[k, c], 1)
    mIoU   = 100 * mean_{c seen} IoU[1, c]                          (accumulated per class, not per episode)
    FB-IoU = 100 * 1/2 * sum_k ( sum_c I[k, c] / max(sum_c U[k, c], 1) )

A class is *seen* when at least one episode of it was scored. :class:`FewShotIoU` holds the ``[2, n_classes]``
sums as int64 tensors; :class:`FewShotIoUMetric` wraps it as an ignite ``Metric`` for MONAI evaluators (the sums of
every rank are added before the ratios are formed, :func:`all_reduce_fewshot_iou`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ignite.distributed as idist
import torch
from ignite.exceptions import NotComputableError
from ignite.metrics import Metric

__all__ = ["FewShotIoU", "FewShotIoUMetric", "all_reduce_fewshot_iou", "episode_output"]


def _as_maps(x: Any, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach()
    if x.ndim != 3:
        raise ValueError(f"FewShotIoU: {name} must be [B, H, W], got shape {tuple(x.shape)}")
    return x


class FewShotIoU:
    """Per-class sums of the bg / fg intersections and unions of few-shot episodes (module docstring).

    Attributes:
        intersection, union: int64 ``[2, n_classes]``; row 0 background, row 1 foreground.
        episodes: int64 ``[n_classes]``, episodes scored per class.

    Args:
        n_classes: number of episode classes of the dataset (``class_id`` in ``[0, n_classes)``).
    """

    def __init__(self, n_classes: int) -> None:
        if int(n_classes) < 1:
            raise ValueError(f"FewShotIoU: n_classes must be >= 1, got {n_classes}")
        self.n_classes = int(n_classes)
        self.reset()

    def reset(self) -> None:
        """Zero the sums."""
        self.intersection = torch.zeros(2, self.n_classes, dtype=torch.int64)
        self.union = torch.zeros(2, self.n_classes, dtype=torch.int64)
        self.episodes = torch.zeros(self.n_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor, class_id: torch.Tensor | Sequence[int],
               ignore: torch.Tensor | None = None) -> None:
        """Add a batch of episodes.

        Args:
            pred: ``[B, H, W]`` binary prediction (0 / 1, any dtype).
            target: ``[B, H, W]`` binary ground truth.
            class_id: ``[B]`` episode classes.
            ignore: ``[B, H, W]``, non-zero where a pixel is left out of both bins; None keeps every pixel.
        """
        pred, target = _as_maps(pred, "pred"), _as_maps(target, "target").to(pred.device)
        if pred.shape != target.shape:
            raise ValueError(f"FewShotIoU: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        valid = torch.ones_like(pred, dtype=torch.bool)
        if ignore is not None:
            ignore = _as_maps(ignore, "ignore").to(pred.device)
            if ignore.shape != pred.shape:
                raise ValueError(f"FewShotIoU: ignore {tuple(ignore.shape)} does not match pred {tuple(pred.shape)}")
            valid = ignore == 0
        for name, x in (("pred", pred), ("target", target)):
            if bool(((x != 0) & (x != 1) & valid).any()):
                raise ValueError(f"FewShotIoU: {name} holds values other than 0 / 1 outside the ignored pixels: "
                                 f"{torch.unique(x[valid]).tolist()[:8]}")
        ids = torch.as_tensor(class_id).detach().reshape(-1).long().cpu()
        if ids.numel() != pred.shape[0]:
            raise ValueError(f"FewShotIoU: {ids.numel()} class ids for {pred.shape[0]} episodes")
        if bool(((ids < 0) | (ids >= self.n_classes)).any()):
            raise ValueError(f"FewShotIoU: class ids {ids.tolist()} outside [0, {self.n_classes}) (n_classes)")
        fg_p, fg_g = (pred == 1) & valid, (target == 1) & valid
        bg_p, bg_g = (pred == 0) & valid, (target == 0) & valid
        inter = torch.stack([(bg_p & bg_g).flatten(1).sum(1), (fg_p & fg_g).flatten(1).sum(1)])  # [2, B]
        area_p = torch.stack([bg_p.flatten(1).sum(1), fg_p.flatten(1).sum(1)])
        area_g = torch.stack([bg_g.flatten(1).sum(1), fg_g.flatten(1).sum(1)])
        union = area_p + area_g - inter
        self.intersection.index_add_(1, ids, inter.cpu().long())
        self.union.index_add_(1, ids, union.cpu().long())
        self.episodes.index_add_(0, ids, torch.ones_like(ids))

    def seen(self) -> torch.Tensor:
        """Indices of the classes with at least one episode, ``[n_seen]``."""
        return torch.nonzero(self.episodes > 0).reshape(-1)

    def per_class_iou(self) -> dict[int, float]:
        """Foreground IoU ``I[1, c] / max(U[1, c], 1)`` (in [0, 1]) of every seen class ``c``."""
        iou = self.intersection[1].double() / self.union[1].clamp(min=1).double()
        return {int(c): float(iou[c]) for c in self.seen()}

    def _check_seen(self) -> None:
        if not bool((self.episodes > 0).any()):
            raise NotComputableError("FewShotIoU: no episode was scored")

    def miou(self) -> float:
        """``100 * mean`` over the seen classes of the accumulated foreground IoU."""
        self._check_seen()
        values = list(self.per_class_iou().values())
        return 100.0 * sum(values) / len(values)

    def fb_iou(self) -> float:
        """``100 * 1/2 * sum_k (sum_c I[k, c] / max(sum_c U[k, c], 1))`` (bg and fg IoU pooled over classes)."""
        self._check_seen()
        inter, union = self.intersection.sum(1).double(), self.union.sum(1).double().clamp(min=1.0)
        return 100.0 * float((inter / union).mean())


def all_reduce_fewshot_iou(iou: FewShotIoU) -> FewShotIoU:
    """A new :class:`FewShotIoU` holding the sums of ``iou`` over every rank (``idist.all_reduce``); a copy in a
    single process."""
    merged = FewShotIoU(iou.n_classes)
    for name in ("intersection", "union", "episodes"):
        local = getattr(iou, name).clone().to(idist.device())
        setattr(merged, name, idist.all_reduce(local).cpu())
    return merged


def _batch_value(output: Any, key: str) -> Any:
    """``output[key]`` of a batch-first dict, or the ``key`` entries of a decollated list of dicts stacked."""
    if isinstance(output, Mapping):
        return output.get(key)
    if isinstance(output, Sequence) and output and all(isinstance(o, Mapping) for o in output):
        values = [o.get(key) for o in output]
        return None if any(v is None for v in values) else torch.stack([torch.as_tensor(v) for v in values])
    raise ValueError(f"FewShotIoU: the engine output must be a dict (or a list of dicts), got {type(output).__name__}")


def episode_output(output: Any) -> tuple[Any, Any, Any, Any]:
    """``(pred, label, class_id, ignore)`` of an episodic engine's output (the default ``output_transform``)."""
    values = tuple(_batch_value(output, k) for k in ("pred", "label", "class_id", "ignore"))
    missing = [k for k, v in zip(("pred", "label", "class_id"), values) if v is None]
    if missing:
        raise ValueError(f"FewShotIoU: the engine output lacks {missing} (an EpisodicTrainer / EpisodicEvaluator "
                         "output has pred, label, class_id, ignore)")
    return values  # type: ignore[return-value]


class FewShotIoUMetric(Metric):
    """:class:`FewShotIoU` as an ignite ``Metric`` (e.g. a MONAI evaluator's ``key_val_metric``).

    ``compute()`` adds the sums of every rank, then returns the mIoU (``kind="miou"``) or the FB-IoU
    (``kind="fbiou"``), in percent. :meth:`accumulated` gives the merged sums (per-class IoUs).

    Args:
        n_classes: number of episode classes.
        kind: ``"miou"`` or ``"fbiou"``.
        output_transform: engine output -> ``(pred [B, H, W], label [B, H, W], class_id [B], ignore [B, H, W] |
            None)``; default :func:`episode_output`.
        device: where the sums are kept (they are on the CPU whatever it is; kept for ignite's signature).
    """

    def __init__(self, n_classes: int, kind: str = "miou", output_transform: Callable = episode_output,
                 device: str | torch.device = "cpu") -> None:
        if kind not in ("miou", "fbiou"):
            raise ValueError(f"FewShotIoUMetric: kind must be 'miou' or 'fbiou', got {kind!r}")
        self.kind = kind
        self.iou = FewShotIoU(n_classes)
        super().__init__(output_transform=output_transform, device=device)

    def reset(self) -> None:
        self.iou.reset()

    def update(self, output: Sequence[Any]) -> None:
        pred, label, class_id, ignore = output
        self.iou.update(pred, label, class_id, ignore)

    def accumulated(self) -> FewShotIoU:
        """The sums of every rank (:func:`all_reduce_fewshot_iou`)."""
        return all_reduce_fewshot_iou(self.iou)

    def compute(self) -> float:
        merged = self.accumulated()
        return merged.miou() if self.kind == "miou" else merged.fb_iou()
