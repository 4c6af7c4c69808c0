"""Masked average pooling (MAP): class prototypes of a support image, as few-shot segmentation hosts compute them.

Zhang et al., "SG-One" (2020) and PANet (Wang et al., ICCV 2019); PATNet (Lei et al., ECCV 2022) and the CD-TG
plug-in (specs/cdtg.md §4.2, §5.4) use it at every feature level ``l``. With the support mask resized bilinearly
(``align_corners=True``) to the level's grid, ``m_l = bilinear(M_s, (h_l, w_l))``::

    p^f_l = sum_x f_l(x) m_l(x)       / (sum_x m_l(x)       + eps)
    p^b_l = sum_x f_l(x) (1 - m_l(x)) / (sum_x (1 - m_l(x)) + eps)        eps = 1e-6

An empty mask therefore gives a zero foreground prototype, not a division by zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["resize_mask", "masked_average_pool", "foreground_background_prototypes"]


def resize_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Soft mask ``[B, 1, h, w]`` of a mask ``[B, H, W]`` or ``[B, 1, H, W]``, resized bilinearly with
    ``align_corners=True`` as PATNet/HSNet do."""
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be [B, H, W] or [B, 1, H, W], got shape {tuple(mask.shape)}")
    return F.interpolate(mask.float(), size=size, mode="bilinear", align_corners=True)


def masked_average_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``sum_x f(x) m(x) / (sum_x m(x) + eps)``: features ``[B, C, h, w]``, mask ``[B, 1, h, w]`` (same grid, soft
    values allowed) -> prototype ``[B, C]``."""
    if mask.shape[-2:] != features.shape[-2:] or mask.shape[0] != features.shape[0] or mask.shape[1] != 1:
        raise ValueError(f"mask {tuple(mask.shape)} does not match features {tuple(features.shape)}: "
                         "expected [B, 1, h, w] on the features' grid")
    mask = mask.to(features.dtype)
    return (features * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + eps)


def foreground_background_prototypes(features: torch.Tensor, mask: torch.Tensor,
                                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p^f, p^b)``, each ``[B, C]``, of features ``[B, C, h, w]`` under a support mask ``[B, H, W]`` or
    ``[B, 1, H, W]`` at any resolution (resized to ``(h, w)`` first)."""
    m = resize_mask(mask, tuple(features.shape[-2:]))
    return masked_average_pool(features, m, eps), masked_average_pool(features, 1.0 - m, eps)
