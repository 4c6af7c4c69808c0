"""Per-epoch schedules of DHC: sigmoid ramp-up of the unsupervised weight and poly learning rate.

Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for Class-imbalanced Semi-supervised Medical
Image Segmentation", MICCAI 2023 (arXiv 2307.11960), specs/dhc.md §4.5; the sigmoid ramp-up is the one of
Laine & Aila, "Temporal Ensembling for Semi-Supervised Learning", ICLR 2017.

DHC sets both values *after* epoch ``e`` (0-based) with that epoch's index, so the values in force during epoch
``e`` are those of index ``max(e - 1, 0)``: epochs 0 and 1 both run at the base lr and at ``w e^-5``
(:func:`lr_in_epoch`, :func:`consistency_weight_in_epoch`). ``torch.optim.lr_scheduler.PolynomialLR`` stepped after
each epoch is one epoch ahead of this (it gives ``(1 - (e + 1) / E) ** 0.9`` during epoch ``e + 1``). The values
change once per epoch, whatever the number of iterations per epoch.
"""

from __future__ import annotations

import math

__all__ = ["consistency_weight", "consistency_weight_in_epoch", "lr_in_epoch", "poly_lr", "sigmoid_rampup"]


def _check_epoch(epoch: int, name: str) -> None:
    if epoch < 0:
        raise ValueError(f"{name}: epoch must be >= 0, got {epoch}")


def sigmoid_rampup(epoch: int, rampup_length: int) -> float:
    """``exp(-5 (1 - min(e, E_r) / E_r) ** 2)``, in ``[e^-5, 1]``; 1 when ``rampup_length`` is 0."""
    _check_epoch(epoch, "sigmoid_rampup")
    if rampup_length < 0:
        raise ValueError(f"sigmoid_rampup: rampup_length must be >= 0, got {rampup_length}")
    if rampup_length == 0:
        return 1.0
    phase = 1.0 - min(epoch, rampup_length) / rampup_length
    return math.exp(-5.0 * phase * phase)


def consistency_weight(epoch: int, max_weight: float, rampup_length: int) -> float:
    """``lambda(e) = w exp(-5 (1 - min(e, E_r) / E_r) ** 2)``, the value DHC assigns after epoch ``e``.

    DHC uses ``w = 0.1`` and ``E_r`` = the number of epochs: ``lambda(0) = 0.1 e^-5 ~ 6.7e-4``, ``lambda(E_r) = 0.1``.
    """
    return max_weight * sigmoid_rampup(epoch, rampup_length)


def poly_lr(epoch: int, base_lr: float, max_epochs: int, power: float = 0.9) -> float:
    """``base_lr (1 - e / E) ** power``, the learning rate DHC assigns after epoch ``e`` (0 for ``e = E``)."""
    _check_epoch(epoch, "poly_lr")
    if max_epochs <= 0 or epoch > max_epochs:
        raise ValueError(f"poly_lr: need 0 <= epoch <= max_epochs with max_epochs > 0, got epoch {epoch}, "
                         f"max_epochs {max_epochs}")
    return base_lr * (1.0 - epoch / max_epochs) ** power


def consistency_weight_in_epoch(epoch: int, max_weight: float, rampup_length: int) -> float:
    """The unsupervised weight in force during epoch ``e``: ``consistency_weight(max(e - 1, 0), ...)``."""
    _check_epoch(epoch, "consistency_weight_in_epoch")
    return consistency_weight(max(epoch - 1, 0), max_weight, rampup_length)


def lr_in_epoch(epoch: int, base_lr: float, max_epochs: int, power: float = 0.9) -> float:
    """The learning rate in force during epoch ``e``: ``poly_lr(max(e - 1, 0), ...)``."""
    _check_epoch(epoch, "lr_in_epoch")
    return poly_lr(max(epoch - 1, 0), base_lr, max_epochs, power)
