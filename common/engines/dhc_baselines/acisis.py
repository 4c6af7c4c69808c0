"""The "Basak et al." (acisis) baseline of DHC: mean teacher with fuzzy-rank class-wise sampling of pseudo labels.

Basak, Ghosal & Sarkar, "Addressing Class Imbalance in Semi-supervised Image Segmentation: A Study on Cardiac MRI",
MICCAI 2022 (arXiv 2209.00123), as run by Wang & Li, "DHC: Dual-debiased Heterogeneous Co-training Framework for
Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md §9, row "acisis").
Student = branch A (trained), teacher = branch B (an EMA of A, never stepped by an optimiser). With ``n``
labelled and ``U`` unlabelled patches, ``z = A(x)`` ``[n + U, C, d, h, w]`` on the whole batch::

    L = L_CE(z_l, y_l) + L_Dice(z_l, y_l) + λ(e) · (1/|Ω_u|) Σ_{i∈Ω_u} m_i · CE(z_i, ŷ^T_i)

* ``L_CE + L_Dice``: unweighted CE and batch soft Dice without background (smooth 1; negative Dice as in DHC),
  no ½ factor (unlike UA-MT) (:class:`~common.losses.weighted_ce_dice.WeightedCEDiceLoss` with ``w = 1``);
* ``ŷ^T = argmax_c B(x_u)``: hard pseudo labels of the teacher on the unlabelled patches (no gradient; the teacher
  runs in the engine's ``train()`` mode, dropout active, as in the baseline);
* ``m_i = [u_i > 1 − s_{ŷ_i}] · (max_c p_{i,c})^{1.5}`` (``u_i ~ U[0, 1)``) with ``ŷ``, ``p`` the *student's* own
  arg-max and softmax on the unlabelled patches and ``s`` the class-wise sampling rates of the confidence array,
  refreshed every ``refresh_iters`` iterations from the student's scores on the labelled patches
  (:class:`~common.losses.fuzzy_rank_sampling.ConfidenceArray`: entropy / confidence / variance scores, Gompertz
  fuzzy rank fusion with top 12 and penalty 0.632, ``s = ((1 − CC)/max)^{2.5}``, ``CC`` an EMA 0.99 starting at 0);
* the CE is summed over the kept voxels and divided by *all* ``|Ω_u|`` unlabelled voxels (the baseline's
  weight-map CE; :func:`~common.losses.debiased_pseudo_labels.masked_cross_entropy` with ``normalise="all"``).

Order within an iteration (as in the baseline): losses from the current networks, then the confidence array
records the labelled scores (and refreshes at the end of a window), then the mask is drawn with the current
rates; after the optimiser step ``θ_B ← α θ_B + (1 − α) θ_A`` with ``α = min(1 − 1/(e + 1), 0.99)``, ``e`` the
0-based epoch (the baseline passes the epoch index to its EMA: α = 0 in epoch 0, so the teacher is then a copy of
the student after every step). Inference uses the student alone.

Choices recorded for the model card: the refresh window is one epoch (``refresh_iters`` = iterations per epoch,
which the bundle passes); the score pairing and ``top_k >= C`` corrections of
:mod:`common.losses.fuzzy_rank_sampling`; the sampling mask follows the student's prediction, the pseudo labels
the teacher's, as in the baseline.
"""

from __future__ import annotations

import torch
from torch import nn

from common.engines.co_training import CoTrainingMethod
from common.losses.debiased_pseudo_labels import masked_cross_entropy
from common.losses.fuzzy_rank_sampling import ConfidenceArray
from common.losses.weighted_ce_dice import WeightedCEDiceLoss
from common.utils.schedules import ema_update

__all__ = ["ACISIS"]


class ACISIS(CoTrainingMethod):
    """Mean teacher with class-wise fuzzy-rank sampling (module docstring): student = A, EMA teacher = B.

    Args:
        num_classes: C, including background.
        refresh_iters: iterations between two refreshes of the sampling rates (one epoch: ``⌈#U / batch⌉``).
        momentum: EMA momentum of the class confidence ``CC`` (0.99).
        top_k: classes kept per score in the fuzzy rank fusion (12).
        penalty: rank penalty of the other classes (0.632).
        rate_exponent: ``γ`` of the sampling rates (2.5).
        confidence_exponent: ``β`` of the confidence weight ``(max p)^β`` (1.5).
        ema_max: cap of the teacher's EMA momentum ``α`` (0.99).
    """

    trains_b = False

    def __init__(self, num_classes: int, refresh_iters: int, momentum: float = 0.99, top_k: int = 12,
                 penalty: float = 0.632, rate_exponent: float = 2.5, confidence_exponent: float = 1.5,
                 ema_max: float = 0.99) -> None:
        super().__init__()
        if not 0.0 <= ema_max <= 1.0:
            raise ValueError(f"ACISIS: ema_max must lie in [0, 1], got {ema_max}")
        self.num_classes, self.ema_max = num_classes, float(ema_max)
        self.confidence = ConfidenceArray(num_classes, refresh_iters, momentum, top_k, penalty, rate_exponent,
                                          confidence_exponent)
        self.supervised = WeightedCEDiceLoss(1.0, 1.0, smooth=1.0)

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        if image.shape[0] < n:
            raise ValueError(f"ACISIS: image holds {image.shape[0]} patches but label {n}; image must be "
                             f"[L + U, 1, d, h, w] with the L labelled patches first")
        z = net_a(image)
        if z.shape[1] != self.num_classes:
            raise ValueError(f"ACISIS: the network returns {z.shape[1]} channels, the method expects "
                             f"num_classes={self.num_classes}")
        sup = self.supervised(z[:n], label, torch.ones(self.num_classes, device=z.device))
        rates = self.confidence.update(z[:n].detach(), label)
        if image.shape[0] == n:
            return {"loss": sup, "loss_sup": sup.detach(), "loss_unsup": sup.new_zeros(()), "pred": z.detach(),
                    "sampling_rates": rates}
        with torch.no_grad():
            pseudo = net_b(image[n:]).argmax(dim=1)
        mask = self.confidence.sampling_mask(z[n:].detach())
        unsup = masked_cross_entropy(z[n:], pseudo, mask, normalise="all")
        return {"loss": sup + consistency * unsup, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pred": z.detach(), "pseudo": pseudo, "mask": mask, "sampling_rates": rates}

    def momentum(self, epoch: int) -> float:
        """Teacher EMA momentum ``α = min(1 − 1/(e + 1), ema_max)`` for the 0-based epoch ``e``."""
        if epoch < 0:
            raise ValueError(f"ACISIS: epoch must be >= 0, got {epoch}")
        return min(1.0 - 1.0 / (epoch + 1), self.ema_max)

    @torch.no_grad()
    def after_step(self, net_a: nn.Module, net_b: nn.Module, epoch: int) -> None:
        ema_update(net_b, net_a, self.momentum(epoch))
