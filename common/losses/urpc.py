"""Losses of URPC: deep-supervised CE + Dice and the uncertainty-rectified pyramid consistency.

Luo, Liao, Chen, Song, Chen, Zhang, Chen, Wang, Zhang, "Efficient Semi-supervised Gross Target Volume of
Nasopharyngeal Carcinoma Segmentation via Uncertainty Rectified Pyramid Consistency", MICCAI 2021 (arXiv
2012.07042); the DHC baseline "urpc" (Wang & Li, MICCAI 2023, specs/dhc.md §9). The network gives S = 4 head logits
``z_s`` ``[N, C, *spatial]`` at the input resolution (:class:`~common.networks.unet_ds.UNetDS3D`).

Supervised part, on the L labelled patches (:class:`DeepSupervisionLoss`)::

    L_sup = (1/S) Σ_s ½ (L_CE(z_s, y) + L_Dice(z_s, y))

with the unweighted CE (mean over voxels) and the batch-pooled soft Dice ``L_Dice = −(1/(C−1)) Σ_{c≥1} D_c``,
``D_c = (2 Σ p g + s) / (Σ p + Σ g + s + 1e-8)``, ``s = 1e-8``
(:class:`~common.losses.weighted_ce_dice.WeightedCEDiceLoss` with unit weights). The ½ reproduces the implementation
behind DHC's URPC numbers, which divides the sum of the 4 CE and 4 Dice terms by 8; s = 1e-8 is its Dice smoothing
(DHC's other baselines use s = 1).

Consistency, on the U unlabelled patches (:class:`URPCConsistency`), per voxel ``i`` (V voxels per patch)::

    p_s = softmax(z_s),   p̄ = (1/S) Σ_s p_s
    D_s,i = Σ_c p̄_c,i ln(p̄_c,i / p_s,c,i)                          (KL(p̄ ‖ p_s), the "uncertainty" of head s)
    w_s,i = exp(−D_s,i)
    L_s  = [ (1/(U·C·V)) Σ_{i,c} w_s,i (p̄_c,i − p_s,c,i)² ] / [ (1/(U·V)) Σ_i w_s,i + ε ]  +  (1/(U·V)) Σ_i D_s,i
    L_unsup = (1/S) Σ_s L_s,   ε = 1e-8

Shapes: ``p_s``, ``p̄`` ``[U, C, *spatial]``; ``D_s``, ``w_s`` ``[U, 1, *spatial]``. Nothing is detached: the
gradient flows through ``p̄``, the weights ``w`` and the KL term, as in the implementation.

Choices, each checked against the public implementations (SSL4MIS's URPC and DHC's ``train_urpc.py``):

* Direction of the KL: the papers write the divergence as ``Σ_c p_s,c ln(p_s,c / p̄_c)``, i.e. KL(p_s ‖ p̄); the
  implementations compute ``KLDivLoss(ln p_s, p̄) = Σ_c p̄_c ln(p̄_c / p_s,c)``, i.e. KL(p̄ ‖ p_s). The latter
  produced DHC's URPC numbers and is used here.
* Reductions: the weighted squared error is a plain mean over all ``U·C·V`` elements (so it carries a ``1/C``), the
  weight normaliser and the KL term are means over the ``U·V`` voxels, ε = 1e-8 as in the implementation.
* Numerics: the logarithms are ``ln max(p, tiny)`` (tiny = the smallest normal float32, ~1.2e-38). The
  implementation takes ``ln softmax`` directly, which gives −inf (and an infinite loss) once a probability underflows
  to 0; elsewhere the values are bit-identical, and identical heads give exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.losses.weighted_ce_dice import WeightedCEDiceLoss

__all__ = ["DeepSupervisionLoss", "URPCConsistency", "pyramid_divergence", "check_heads"]


def check_heads(heads: Sequence[torch.Tensor], name: str, min_heads: int = 1) -> None:
    """Raise a ``ValueError`` naming ``name`` unless ``heads`` holds at least ``min_heads`` logit maps of one shape
    ``[N, C, *spatial]`` with C >= 2."""
    if isinstance(heads, torch.Tensor) or len(heads) < min_heads:
        raise ValueError(f"{name}: expected a sequence of at least {min_heads} head logit maps [N, C, *spatial], got "
                         f"{type(heads).__name__ if isinstance(heads, torch.Tensor) else len(heads)}")
    shape = tuple(heads[0].shape)
    if len(shape) < 3 or shape[1] < 2:
        raise ValueError(f"{name}: head logits must be [N, C, *spatial] with C >= 2, got shape {shape}")
    for index, head in enumerate(heads):
        if tuple(head.shape) != shape:
            raise ValueError(f"{name}: all heads must share one shape (upsampled to the input size); head 0 is "
                             f"{shape}, head {index} is {tuple(head.shape)}")


def pyramid_divergence(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean prediction and each head's KL divergence from it.

    Args:
        probs: ``[S, N, C, *spatial]`` softmax probabilities of the S heads.

    Returns:
        ``(p̄, D)``: ``p̄ = mean_s p_s`` ``[N, C, *spatial]`` and ``D_s = Σ_c p̄_c ln(p̄_c / p_s,c)``
        ``[S, N, 1, *spatial]`` (module docstring for the direction and the underflow guard).
    """
    tiny = torch.finfo(probs.dtype).tiny
    mean = probs.mean(dim=0)
    log_ratio = torch.log(mean.clamp_min(tiny)).unsqueeze(0) - torch.log(probs.clamp_min(tiny))
    return mean, (mean.unsqueeze(0) * log_ratio).sum(dim=2, keepdim=True)


class URPCConsistency(nn.Module):
    """Uncertainty-rectified pyramid consistency ``L_unsup = (1/S) Σ_s L_s`` (module docstring).

    Args:
        eps: ε added to the mean weight of every head (1e-8).
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"URPCConsistency: eps must be > 0 (it keeps the weight normaliser positive), got {eps}")
        self.eps = eps

    def forward(self, heads: Sequence[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            heads: S >= 2 logit maps ``[U, C, *spatial]`` of the unlabelled patches, one shape.

        Returns:
            scalar (float32).
        """
        check_heads(heads, "URPCConsistency", min_heads=2)
        probs = torch.stack([torch.softmax(head.float(), dim=1) for head in heads])
        mean, divergence = pyramid_divergence(probs)
        weight = torch.exp(-divergence)
        spatial = tuple(range(1, probs.ndim))  # everything but the head axis
        squared = weight * (mean.unsqueeze(0) - probs) ** 2
        per_head = (squared.mean(dim=spatial) / (weight.mean(dim=spatial) + self.eps)
                    + divergence.mean(dim=spatial))
        return per_head.mean()


class DeepSupervisionLoss(nn.Module):
    """``L_sup = (1/S) Σ_s (λ_CE L_CE(z_s, y) + λ_Dice L_Dice(z_s, y))`` with unit class weights (module docstring).

    Args:
        lambda_ce, lambda_dice: weights of the two terms (0.5, 0.5: the original's sum of 8 terms divided by 8).
        smooth: Dice smoothing ``s`` (1e-8 in URPC).
    """

    def __init__(self, lambda_ce: float = 0.5, lambda_dice: float = 0.5, smooth: float = 1e-8) -> None:
        super().__init__()
        self.loss = WeightedCEDiceLoss(lambda_ce, lambda_dice, smooth=smooth)

    def forward(self, heads: Sequence[torch.Tensor], label: torch.Tensor) -> torch.Tensor:
        """
        Args:
            heads: S >= 1 logit maps ``[L, C, *spatial]`` of the labelled patches.
            label: class indices ``[L, 1, *spatial]`` or ``[L, *spatial]``.

        Returns:
            scalar (float32).
        """
        check_heads(heads, "DeepSupervisionLoss")
        ones = torch.ones(heads[0].shape[1], device=heads[0].device)
        return torch.stack([self.loss(head, label, ones) for head in heads]).mean()
