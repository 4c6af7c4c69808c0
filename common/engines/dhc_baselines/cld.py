"""CLD baseline of DHC: cross pseudo supervision with confidence-driven random sampling of pseudo-labelled voxels.

Lin, Yao, Li, Zheng & Li, "Calibrating Label Distribution for Class-Imbalanced Barely-Supervised Knee
Segmentation" (CLD), MICCAI 2022, as run by Wang & Li, "DHC", MICCAI 2023 (specs/dhc.md §9 row "cld"). Two VNets A
and B, both trained, with a static class weight ``w`` (default ``w ≡ 1``)::

    L = L_sup(z^A_l, y_l; w) + L_sup(z^B_l, y_l; w) + λ(e) (L_s(z^A, ŷ^B; k^A) + L_s(z^B, ŷ^A; k^B))

``L_sup`` is the weighted CE + batch Dice of DHC (:class:`~common.losses.weighted_ce_dice.WeightedCEDiceLoss`),
``ŷ = argmax z`` of the other branch on all ``L + U`` patches, ``k^X`` branch X's random voxel mask (its own
arg-max, its own confidence bank's sampling rates) and ``L_s(z, y; k) = (1/V) Σ_i k_i w_{y_i} CE(z_i, y_i)``.
Per iteration and branch: the bank takes the softmax on the labelled patches (and refreshes every ``period``
iterations), then the rates and the mask are made from the bank as it stands (the refreshed one on a refresh
iteration, as the original). The rules, the bank's quirks and what of the CLD paper DHC leaves out are in
:mod:`common.losses.cld_sampling`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.engines.co_training import CPS
from common.losses.cld_sampling import (ConfidenceBank, label_quantity_weights, sampled_cross_entropy, sampling_mask,
                                        sampling_rates)

__all__ = ["CLD"]


class CLD(CPS):
    """CPS with CLD's confidence bank and sampled pseudo-label CE (module docstring).

    Outputs, besides CPS's: ``keep_a``/``keep_b`` (bool voxel masks ``[N, *spatial]`` of each branch's pseudo-label
    loss) and ``sampling_rates_a``/``sampling_rates_b`` ``[C]``.

    Args:
        num_classes: C, including background.
        labelled_counts: labelled ground-truth class histogram; when given, ``w = label_quantity_weights(counts)``
            (``(max N / N_c)^{1/3}``, what DHC's ``train_cld.py`` computes).
        class_weight: an explicit ``[C]`` weight instead (not together with ``labelled_counts``); neither: ``w ≡ 1``.
        momentum: bank EMA momentum (0.999).
        period: iterations per bank refresh (DHC 8).
        gamma: sampling-rate exponent γ (0.5).
    """

    def __init__(self, num_classes: int, labelled_counts: torch.Tensor | Sequence[float] | None = None,
                 class_weight: torch.Tensor | Sequence[float] | None = None, momentum: float = 0.999,
                 period: int = 8, gamma: float = 0.5) -> None:
        super().__init__(num_classes)
        if labelled_counts is not None and class_weight is not None:
            raise ValueError("CLD: give labelled_counts (CLD's label-quantity weights) or class_weight, not both")
        if gamma < 0:
            raise ValueError(f"CLD: gamma must be >= 0, got {gamma}")
        if labelled_counts is not None:
            weight = label_quantity_weights(labelled_counts)
        elif class_weight is not None:
            weight = torch.as_tensor(class_weight, dtype=torch.float32).flatten()
        else:
            weight = torch.ones(num_classes)
        if weight.numel() != num_classes or not bool((torch.isfinite(weight) & (weight >= 0)).all()):
            raise ValueError(f"CLD: the class weight must hold {num_classes} finite values >= 0, "
                             f"got {weight.tolist()}")
        self.gamma = gamma
        self.register_buffer("class_weight", weight.float())
        self.bank_a = ConfidenceBank(num_classes, momentum, period)
        self.bank_b = ConfidenceBank(num_classes, momentum, period)

    def weights(self, z_a: torch.Tensor, z_b: torch.Tensor, label: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The static class weight, for both branches."""
        return self.class_weight, self.class_weight

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        z_a, z_b, pseudo_a, pseudo_b = self.cross_predictions(net_a, net_b, image)
        rates_a = sampling_rates(self.bank_a.update(torch.softmax(z_a[:n].detach().float(), dim=1), label), self.gamma)
        rates_b = sampling_rates(self.bank_b.update(torch.softmax(z_b[:n].detach().float(), dim=1), label), self.gamma)
        keep_a, keep_b = sampling_mask(z_a, rates_a), sampling_mask(z_b, rates_b)
        w_a, w_b = self.weights(z_a, z_b, label)
        sup = self.supervised(z_a[:n], label, w_a) + self.supervised(z_b[:n], label, w_b)
        cps = sampled_cross_entropy(z_a, pseudo_b, keep_a, w_a) + sampled_cross_entropy(z_b, pseudo_a, keep_b, w_b)
        return {**self.outputs(sup, cps, consistency, z_a, z_b, pseudo_a, pseudo_b, w_a, w_b),
                "keep_a": keep_a, "keep_b": keep_b, "sampling_rates_a": rates_a, "sampling_rates_b": rates_b}
