"""The two debiased class weightings of DHC: distribution-aware (DistDW) and difficulty-aware (DiffDW).

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (arXiv 2307.11960), specs/dhc.md §4.3-4.4. Each branch of the co-training pair
gets its own weight vector ``w`` in ``[0, C]^C`` (C classes incl. background), recomputed once per iteration and
used for that branch's weighted CE, Dice and pseudo-label CE
(:class:`common.losses.weighted_ce_dice.WeightedCEDiceLoss`).

Both are ``nn.Module`` s whose whole state lives in buffers, so ``state_dict``/``load_state_dict`` (and a training
state checkpoint) restore them exactly; ``.to(device)`` moves them with the networks. An engine calls ``update`` once
per iteration and reads the result (or ``get_weights()``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from common.losses.weighted_ce_dice import hard_batch_dice
from common.utils.distributed import all_reduce_sum

__all__ = ["DiffDW", "DistDW", "argmax_counts", "class_counts", "distribution_weights"]

logger = logging.getLogger(__name__)

EPS = 1e-8


def class_counts(labels: torch.Tensor | np.ndarray, num_classes: int) -> torch.Tensor:
    """Voxel histogram ``N_c`` of a label map of any shape (e.g. a labelled GT volume), float64 ``[C]``."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"class_counts: labels must lie in [0, {num_classes}), got range [{int(labels.min())}, {int(labels.max())}]"
        )
    return torch.bincount(labels, minlength=num_classes).double()


def argmax_counts(logits: torch.Tensor, num_classes: int, owner: str) -> torch.Tensor:
    """Histogram ``N_c`` of the arg-max classes of ``logits [B, C, *spatial]``, summed over the ranks of a
    distributed run (the counts of the global batch); int64 ``[C]``.

    Raises:
        ValueError: (naming ``owner``) ``logits`` not ``[B, num_classes, *spatial]``, or holding no voxel.
    """
    if logits.ndim < 3 or logits.shape[1] != num_classes:
        raise ValueError(f"{owner}: logits must be [B, {num_classes}, *spatial], got {tuple(logits.shape)}")
    if logits.numel() == 0:
        raise ValueError(f"{owner}: logits hold no voxels, got {tuple(logits.shape)}")
    return all_reduce_sum(torch.bincount(logits.detach().argmax(dim=1).reshape(-1), minlength=num_classes))


def distribution_weights(counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
    """DistDW weights from class counts (specs/dhc.md §4.3).

    ``P_c = (max_k N_k + eps) / (N_c + eps)``,  ``w_c = C ln P_c / max_k ln P_k``,  ``eps = 1e-8``.

    The most frequent class gets exactly 0 and the rarest C; an absent class (``N_c = 0``) has ``P_c ~ N_max 1e8``,
    takes C and squashes the others (counts ``[1000, 100, 10, 0]`` -> ``[0, 0.36, 0.73, 4]``).

    Args:
        counts: ``[C]`` non-negative class counts ``N``.

    Returns:
        ``[C]`` float64 weights in ``[0, C]``.

    Raises:
        ValueError: counts not 1-D with C >= 2, negative, or all equal (then every ``ln P_c = 0`` and the weights
            are 0/0).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() < 2 or bool((counts < 0).any()):
        raise ValueError(f"distribution_weights: counts must be a 1-D vector of >= 2 counts >= 0, "
                         f"got {counts.tolist()}")
    log_ratio = torch.log((counts.max() + EPS) / (counts + EPS))
    if log_ratio.max() <= 0:
        raise ValueError(f"distribution_weights: all class counts are equal ({counts.tolist()}); weights undefined")
    return counts.numel() * log_ratio / log_ratio.max()


class DistDW(nn.Module):
    """Distribution-aware debiased weighting (branch B of DHC, specs/dhc.md §4.3).

    * ``init_weights(N)``: ``w = distribution_weights(N)`` with ``N`` the voxel histogram of all labelled training
      volumes (whole stored GT, not crops; see :func:`class_counts`). This is the EMA's starting point.
    * ``update(z_u)`` each iteration: ``N`` = histogram of ``argmax_c`` of the branch's own logits on the unlabelled
      patches, ``w_cur = distribution_weights(N)``, ``w <- m w + (1 - m) w_cur`` (``m = 0.99`` in DHC).

    The most frequent class (background) gets weight exactly 0, so the branch never gets a direct background CE and
    a batch whose targets are all background gives a 0/0 CE; that case is guarded in
    :func:`common.losses.weighted_ce_dice.weighted_cross_entropy`. If all counts of an update are equal the
    weights are undefined (0/0, which would make ``w`` NaN for good): that update is skipped and a warning logged.

    Args:
        num_classes: C, including background.
        momentum: EMA momentum ``m``.
    """

    def __init__(self, num_classes: int, momentum: float = 0.99) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DistDW: num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"DistDW: momentum must lie in [0, 1], got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.register_buffer("weights", torch.full((num_classes,), float(num_classes)))
        self.register_buffer("initialised", torch.tensor(False))

    def _counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
        if counts.shape != (self.num_classes,) or bool((counts < 0).any()):
            raise ValueError(f"DistDW: counts must be {self.num_classes} values >= 0, got {counts.tolist()}")
        return counts

    def init_weights(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Set ``w = distribution_weights(counts)`` (labelled GT histogram); returns a copy ``[C]``."""
        self.weights.copy_(distribution_weights(self._counts(counts)))
        self.initialised.fill_(True)
        return self.get_weights()

    @torch.no_grad()
    def update_counts(self, counts: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """One EMA step ``w <- m w + (1 - m) distribution_weights(counts)``; returns a copy of the new ``w`` ``[C]``."""
        if not bool(self.initialised):
            raise RuntimeError("DistDW: call init_weights(labelled class counts) before the first update")
        counts = self._counts(counts)
        if counts.max() == counts.min():
            logger.warning("DistDW: all class counts equal (%s); weights left unchanged", counts.tolist())
            return self.get_weights()
        current = distribution_weights(counts).to(self.weights)
        self.weights.mul_(self.momentum).add_((1.0 - self.momentum) * current)
        return self.get_weights()

    @torch.no_grad()
    def update(self, logits: torch.Tensor) -> torch.Tensor:
        """EMA step from the branch's logits on the unlabelled patches.

        Args:
            logits: ``[B, C, *spatial]``; ``N_c`` = number of voxels whose arg-max class is ``c``.

        Returns:
            copy of the new weights ``[C]``.
        """
        return self.update_counts(argmax_counts(logits, self.num_classes, "DistDW"))

    def get_weights(self) -> torch.Tensor:
        """Current weights ``[C]`` (a detached copy)."""
        return self.weights.detach().clone()


class DiffDW(nn.Module):
    """Difficulty-aware debiased weighting (branch A of DHC, specs/dhc.md §4.4).

    State per class c: last Dice ``d_{t-1}`` (init 1e-8), learn ``L`` (init 0), unlearn ``U`` (init 0), not-yet-learnt
    ``V`` (init 1); ``EMA(x_new; x) = beta x + (1 - beta) x_new`` with ``beta = (K - 1) / K`` (K = 50 -> 0.98).
    At each iteration t, from the hard Dice ``d_t`` of the branch's arg-max on the labelled patches (pooled over the
    batch, background included, smooth 1e-8; :func:`common.losses.weighted_ce_dice.hard_batch_dice`):

    1. ``Delta = d_t - d_{t-1}``,  ``r = ln(d_t / d_{t-1})``;
       ``learn_t = Delta r`` where ``Delta > 0`` else 0,  ``unlearn_t = Delta r`` where ``Delta <= 0`` else 0
       (both >= 0);
    2. ``L <- EMA(learn_t; L)``,  ``U <- EMA(unlearn_t; U)``,  ``d_{t-1} <- d_t``;
    3. difficulty ``D = ((U + 1e-8) / (L + 1e-8)) ** power`` (power 1/5);
    4. ``V <- EMA(1 - d_t; V)``;
    5. ``w~ = D * V``,  ``w = C w~ / max_c w~``.

    As in DHC the first update divides by ``d_0 = 1e-8``: its huge "learn" value dominates ``L`` for about K
    iterations (specs/dhc.md §10 item 7). Before the first update ``w = C 1`` (only a placeholder; the first update
    overwrites it, it is not an EMA starting point).

    Worked example (C = 3, K = 50): ``d_1 = [.9, .5, .1]`` -> ``w = [1.854, 2.116, 3.0]``; then
    ``d_2 = [.95, .4, .2]`` -> ``w = [0.305, 3.0, 0.497]``.

    Args:
        num_classes: C, including background.
        accumulate_iters: K of ``beta = (K - 1) / K``.
        power: exponent of the difficulty ratio.
    """

    def __init__(self, num_classes: int, accumulate_iters: int = 50, power: float = 0.2) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"DiffDW: num_classes must be >= 2, got {num_classes}")
        if accumulate_iters < 1:
            raise ValueError(f"DiffDW: accumulate_iters must be >= 1, got {accumulate_iters}")
        self.num_classes = num_classes
        self.beta = (accumulate_iters - 1) / accumulate_iters
        self.power = power
        self.register_buffer("last_dice", torch.full((num_classes,), EPS))
        self.register_buffer("learn", torch.zeros(num_classes))
        self.register_buffer("unlearn", torch.zeros(num_classes))
        self.register_buffer("not_learnt", torch.ones(num_classes))
        self.register_buffer("weights", torch.full((num_classes,), float(num_classes)))

    def _ema(self, state: torch.Tensor, new: torch.Tensor) -> None:
        state.mul_(self.beta).add_((1.0 - self.beta) * new)

    @torch.no_grad()
    def update_dice(self, dice: torch.Tensor | Sequence[float]) -> torch.Tensor:
        """Steps 1-5 from this iteration's per-class Dice ``d_t`` ``[C]`` (values in (0, 1]); returns a copy of w."""
        dice = torch.as_tensor(dice, dtype=self.weights.dtype).to(self.weights.device)
        if dice.shape != (self.num_classes,) or not bool(((dice > 0) & (dice <= 1)).all()):
            raise ValueError(f"DiffDW: dice must be {self.num_classes} values in (0, 1], got {dice.tolist()}")
        delta = dice - self.last_dice
        trend = delta * torch.log(dice / self.last_dice)
        zero = torch.zeros_like(trend)
        self._ema(self.learn, torch.where(delta > 0, trend, zero))
        self._ema(self.unlearn, torch.where(delta <= 0, trend, zero))
        self.last_dice.copy_(dice)
        difficulty = ((self.unlearn + EPS) / (self.learn + EPS)) ** self.power
        self._ema(self.not_learnt, 1.0 - dice)
        raw = difficulty * self.not_learnt
        self.weights.copy_(self.num_classes * raw / raw.max())
        return self.get_weights()

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Update from the branch's logits ``[B, C, *spatial]`` on the labelled patches and their labels
        (``[B, 1, *spatial]`` or ``[B, *spatial]``); returns a copy of the new weights ``[C]``."""
        if logits.ndim < 3 or logits.shape[1] != self.num_classes:
            raise ValueError(f"DiffDW: logits must be [B, {self.num_classes}, *spatial], got {tuple(logits.shape)}")
        return self.update_dice(hard_batch_dice(logits, target, over_ranks=True))

    def get_weights(self) -> torch.Tensor:
        """Current weights ``[C]`` (a detached copy)."""
        return self.weights.detach().clone()
