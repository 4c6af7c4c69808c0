"""Mixed focal / log-Dice loss of the MGCA segmentation protocol used by ASG's SIIM and RSNA fine-tuning.

Li et al., "Anatomical Structure-Guided Medical Vision-Language Pre-training" (ASG), MICCAI 2024, which follows
the segmentation protocol of MGCA (Wang et al., NeurIPS 2022); specs/asg.md §6.4. With logits ``x``, a binary
mask ``y`` (``[B, 1, H, W]``) and ``p = sigmoid(x)``::

    L = focal_weight · mean_pixels(FL_γ) - log(Dice_soft)
    FL_γ = -(1 - p_t)^γ log(p_t),      p_t = p where y = 1, 1 - p where y = 0
    Dice_soft = (2 Σ p y + 1) / (Σ p + Σ y + 1)      sums over the WHOLE batch (not per image)

The focal term is ``monai.losses.FocalLoss(gamma=γ, use_softmax=False, alpha=None)`` with its default mean
reduction, which computes exactly ``mean((1 - p_t)^γ · BCE-with-logits)``.
"""

from __future__ import annotations

import torch
from monai.losses import FocalLoss
from torch import nn

__all__ = ["MixedFocalDiceLoss", "soft_dice"]

DICE_SMOOTH = 1.0


def soft_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = DICE_SMOOTH) -> torch.Tensor:
    """``(2 Σ p y + s) / (Σ p + Σ y + s)`` over every element of the batch, ``p = sigmoid(logits)``."""
    prob = torch.sigmoid(logits)
    return (2.0 * (prob * target).sum() + smooth) / (prob.sum() + target.sum() + smooth)


class MixedFocalDiceLoss(nn.Module):
    """``focal_weight · Focal_γ(logits, y) - log(Dice_soft)`` (module docstring).

    Args:
        focal_weight: weight of the focal term (10).
        gamma: focusing exponent γ (2).
    """

    def __init__(self, focal_weight: float = 10.0, gamma: float = 2.0) -> None:
        super().__init__()
        if focal_weight < 0 or gamma < 0:
            raise ValueError(f"MixedFocalDiceLoss: focal_weight and gamma must be >= 0, got {focal_weight}, {gamma}")
        self.focal_weight = float(focal_weight)
        self.focal = FocalLoss(gamma=gamma, use_softmax=False, alpha=None, reduction="mean")

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: ``[B, 1, H, W]`` raw outputs.
            target: ``[B, 1, H, W]`` binary mask (0 / 1, any dtype).

        Returns:
            scalar tensor.
        """
        if logits.ndim < 3 or logits.shape[1] != 1 or logits.shape != target.shape:
            raise ValueError(f"MixedFocalDiceLoss: logits and target must both be [B, 1, *spatial] of the same "
                             f"shape, got {tuple(logits.shape)} and {tuple(target.shape)}")
        target = target.to(logits.dtype)
        return self.focal_weight * self.focal(logits, target) - torch.log(soft_dice(logits, target))
