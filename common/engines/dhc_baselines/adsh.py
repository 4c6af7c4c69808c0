"""Adsh baseline of DHC: cross pseudo supervision with class-adaptive thresholds as logit masks.

Guo & Li, "Class-Imbalanced Semi-Supervised Learning with Adaptive Thresholding" (Adsh), ICML 2022, as adapted to
3D segmentation by Wang & Li, "DHC", MICCAI 2023 (specs/dhc.md §9 row "adsh"). Two VNets A and B, both trained::

    L = L_sup(z^A_l, y_l) + L_sup(z^B_l, y_l) + λ(e) (CE_m(z^A, ŷ^B; m^B) + CE_m(z^B, ŷ^A; m^A))

with ``L_sup`` the unweighted CE + batch Dice (``w ≡ 1``), ``ŷ = argmax z`` of the other branch on all ``L + U``
patches, ``m^X_{i,c} = [p^X_{i,c} > τ^X_c]`` the per-class mask of the branch that provides the pseudo label
(``p = softmax z``, ``τ^X`` its Adsh thresholds, re-estimated every ``period`` iterations from its unlabelled
softmax maps) and ``CE_m(z, y; m) = mean_i CE(m_i ⊙ z_i, y_i)`` (the masks multiply the logits).
The thresholds, the rule and every deviation from the Adsh paper are in
:mod:`common.losses.adaptive_thresholds`; each branch's thresholds are updated before its masks are made, so the
estimating iteration already uses the new thresholds (as DHC).
"""

from __future__ import annotations

import torch
from torch import nn

from common.engines.co_training import CPS
from common.losses.adaptive_thresholds import AdaptiveThresholds, logit_masked_cross_entropy

__all__ = ["Adsh"]


class Adsh(CPS):
    """CPS with Adsh class-adaptive logit masks (module docstring).

    Outputs, besides CPS's: ``thresholds_a``/``thresholds_b`` ``[C]`` (the ``τ`` used in this iteration).

    Args:
        num_classes: C, including background.
        period: iterations between threshold estimates (DHC: ``adsh_period(#U) = max(#U // 4, 1)``; the default 4
            is Synapse 20 %, ``#U = 16``).
        major_threshold: confidence ``t`` defining ``ρ`` (0.9).
        bins: histogram bins of the threshold estimate (1e-4 resolution with 10⁴).
    """

    def __init__(self, num_classes: int, period: int = 4, major_threshold: float = 0.9, bins: int = 10000) -> None:
        super().__init__(num_classes)
        self.thresholds_a = AdaptiveThresholds(num_classes, period, major_threshold, bins)
        self.thresholds_b = AdaptiveThresholds(num_classes, period, major_threshold, bins)

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        z_a, z_b, pseudo_a, pseudo_b = self.cross_predictions(net_a, net_b, image)
        probs_a, probs_b = torch.softmax(z_a.detach().float(), dim=1), torch.softmax(z_b.detach().float(), dim=1)
        if z_a.shape[0] > n:
            self.thresholds_a.update(probs_a[n:])
            self.thresholds_b.update(probs_b[n:])
        ones = torch.ones(self.num_classes, device=z_a.device)
        sup = self.supervised(z_a[:n], label, ones) + self.supervised(z_b[:n], label, ones)
        cps = (logit_masked_cross_entropy(z_a, pseudo_b, self.thresholds_b.mask(probs_b))
               + logit_masked_cross_entropy(z_b, pseudo_a, self.thresholds_a.mask(probs_a)))
        return {**self.outputs(sup, cps, consistency, z_a, z_b, pseudo_a, pseudo_b, ones, ones),
                "thresholds_a": self.thresholds_a.get_thresholds(), "thresholds_b": self.thresholds_b.get_thresholds()}
