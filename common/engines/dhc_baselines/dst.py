"""DST as a co-training baseline of DHC: two decoupled VNets, cross pseudo supervision and worst-case estimation.

Chen, Jiang, Wang, Wan, Wang & Long, "Debiased Self-Training for Semi-Supervised Learning", NeurIPS 2022
(arXiv 2202.07136), in the two-branch form of the "dst" baseline of Wang & Li, "DHC: Dual-debiased Heterogeneous
Co-training Framework for Class-imbalanced Semi-supervised Medical Image Segmentation", MICCAI 2023 (specs/dhc.md
§9, the DHC repository's train_dst.py). Both branches are a :class:`~common.networks.vnet_decoupled.DecoupledVNet`
(A kaiming-, B xavier-initialised: :class:`~common.networks.vnet_decoupled.DualDecoupledVNet`), both trained.
Per branch ``k ∈ {A, B}`` (other branch ``k̄``) on the batch ``[x_l; x_u]`` (``L`` labelled patches first)::

    (m^k, q^k, w^k) = forward_heads_k(x)                main, pseudo-label and worst-case logits [L+U, C, d, h, w]
    L_sup^k   = CE(m^k_l, y_l) + Dice(m^k_l, y_l)       unweighted CE + batch Dice without background (§4.1, w ≡ 1)
    L_cps^k   = CE_τ(student^k, teacher^k̄)              all L+U patches, τ = 0.95, divided by all voxels
    L_worst^k = 2 CE(w^k_l, argmax m^k_l) + NLL(log(1 − softmax(w^k_u)), argmax m^k_u)   (:mod:`common.losses.dst`)

    L = Σ_k L_sup^k + λ(e) Σ_k (L_cps^k + L_worst^k)

``CE_τ(s, t)`` is the CE of the logits ``s`` on ``argmax softmax(t)`` (detached) over the voxels where
``max softmax(t) > τ``. Which heads are teacher and student — "the other branch's pseudo head" — is the
``cross_supervision`` switch:

* ``"pseudo_to_main"`` (default; DHC's train_dst.py, which produced the paper's DST rows): the labels come from the
  other branch's **pseudo head** (``teacher^k̄ = q^k̄``) and this branch's **main head** learns (``student^k = m^k``).
  No loss is differentiable in ``q`` (the arg-max and the mask carry no gradient), so the pseudo decoders are never
  trained and stay at their initialisation (only their BatchNorm statistics move): the teacher is a randomly
  initialised decoder on the shared, trained encoder.
* ``"main_to_pseudo"`` (DST's decoupling of pseudo-label generation and use): the other branch's **main head** makes
  the labels (``teacher^k̄ = m^k̄``) and this branch's **pseudo head** learns (``student^k = q^k``); the main head
  is then trained by the labelled loss only and the pseudo labels reach it through the shared encoder.

The worst-case decoders read the encoder through the warm-start gradient reversal (λ_GRL from 0 towards 0.1,
N = 500); each branch's reversal counts one step per :meth:`DST.forward` (its ``num_steps`` buffer lives in the
network, so the network checkpoint restores it). ``pred`` is the mean of the two main heads (what validation sees).

Deviations: the original splits the batch at half its size (``tmp_bs``) and so assumes ``L = U`` (2 + 2); here the
labelled part is the first ``label.shape[0]`` patches. DST's weak/strong augmentation pair is absent in DHC (one
view of every patch), as here.
"""

from __future__ import annotations

import torch
from torch import nn

from common.engines.co_training import CPS
from common.losses.dst import confidence_masked_cross_entropy, worst_case_estimation_loss

__all__ = ["CROSS_SUPERVISION", "DST"]

CROSS_SUPERVISION = ("pseudo_to_main", "main_to_pseudo")
"""``teacher_to_student`` head pairs of :class:`DST` (module docstring)."""


class DST(CPS):
    """DST co-training (module docstring).

    Args:
        num_classes: C, including background.
        threshold: confidence τ in [0, 1) of the cross pseudo labels (0.95).
        eta_prime: η' >= 0, the labelled weight of the worst-case loss (2).
        cross_supervision: one of :data:`CROSS_SUPERVISION` (``"pseudo_to_main"``, the original).
        normalise: the masked CE's divisor, ``"all"`` voxels (original) or the kept ``"mask"`` voxels.
    """

    def __init__(self, num_classes: int, threshold: float = 0.95, eta_prime: float = 2.0,
                 cross_supervision: str = "pseudo_to_main", normalise: str = "all") -> None:
        super().__init__(num_classes)
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"DST: threshold must lie in [0, 1), got {threshold}")
        if eta_prime < 0:
            raise ValueError(f"DST: eta_prime must be >= 0, got {eta_prime}")
        if cross_supervision not in CROSS_SUPERVISION:
            raise ValueError(f"DST: cross_supervision must be one of {CROSS_SUPERVISION}, got {cross_supervision!r}")
        if normalise not in ("all", "mask"):
            raise ValueError(f"DST: normalise must be 'all' or 'mask', got {normalise!r}")
        self.threshold, self.eta_prime = threshold, eta_prime
        self.cross_supervision, self.normalise = cross_supervision, normalise

    @staticmethod
    def check_branch(net: nn.Module) -> None:
        """A branch must have ``forward_heads`` and a ``grl`` (a :class:`DecoupledVNet`)."""
        if not callable(getattr(net, "forward_heads", None)) or not isinstance(getattr(net, "grl", None), nn.Module):
            raise ValueError(f"DST: the branches must be DecoupledVNet-like (forward_heads and grl); got "
                             f"{type(net).__name__}")

    def heads(self, net: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(main, pseudo, worst)`` logits of one branch, then one step of its gradient-reversal warm start."""
        self.check_branch(net)
        outputs = net.forward_heads(image)
        if any(z.shape[1] != self.num_classes for z in outputs):
            raise ValueError(f"DST: the heads return {[z.shape[1] for z in outputs]} channels, the method expects "
                             f"num_classes={self.num_classes}")
        net.grl.step()
        return outputs

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        if not 0 < n < image.shape[0]:
            raise ValueError(f"DST: the batch needs labelled and unlabelled patches; got {n} labels for "
                             f"{image.shape[0]} patches")
        self.check_branch(net_a)
        coefficient = torch.tensor(net_a.grl.coefficient())
        main_a, pseudo_a, worst_a = self.heads(net_a, image)
        main_b, pseudo_b, worst_b = self.heads(net_b, image)
        ones = torch.ones(self.num_classes, device=main_a.device)
        sup = self.supervised(main_a[:n], label, ones) + self.supervised(main_b[:n], label, ones)
        if self.cross_supervision == "pseudo_to_main":
            (student_a, teacher_a), (student_b, teacher_b) = (main_a, pseudo_a), (main_b, pseudo_b)
        else:
            (student_a, teacher_a), (student_b, teacher_b) = (pseudo_a, main_a), (pseudo_b, main_b)
        cps_a, labels_b, mask_b = confidence_masked_cross_entropy(student_a, teacher_b, self.threshold,
                                                                  self.normalise)
        cps_b, labels_a, mask_a = confidence_masked_cross_entropy(student_b, teacher_a, self.threshold,
                                                                  self.normalise)
        worst = (worst_case_estimation_loss(main_a[:n], worst_a[:n], main_a[n:], worst_a[n:], self.eta_prime)
                 + worst_case_estimation_loss(main_b[:n], worst_b[:n], main_b[n:], worst_b[n:], self.eta_prime))
        cps = cps_a + cps_b
        result = self.outputs(sup, cps + worst, consistency, main_a, main_b, labels_a, labels_b, ones, ones)
        result.update({"loss_cps": cps.detach(), "loss_worst": worst.detach(), "mask_a": mask_a, "mask_b": mask_b,
                       "grl_coefficient": coefficient})
        return result
