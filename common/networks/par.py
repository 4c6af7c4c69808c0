"""Pixel-adaptive refinement (PAR) of class activation maps, as used by ToCo and EndoKED-WSSS.

Introduced by Ru et al., "Learning Affinity from Attention: End-to-End Weakly-Supervised Semantic Segmentation
with Transformers" (AFA), CVPR 2022; used unchanged by ToCo (CVPR 2023) and EndoKED-WSSS (specs/endoked.md §3.5,
with the reference code's details: unbiased std, replicate padding, ``w1`` in both kernels).

For every pixel ``i`` of an image ``I [B, 3, H, W]``, the neighbours ``j`` are the 8 pixels at offsets
``d * (dy, dx)``, ``dy, dx in {-1, 0, 1}``, ``(dy, dx) != (0, 0)``, for each dilation ``d`` (48 neighbours for
``d in (1, 2, 4, 8, 12, 24)``); outside the image the border pixel is repeated (replicate padding). With
``sigma_i`` the per-channel standard deviation of the 48 neighbour intensities (unbiased, as ``torch.std``)
and ``delta_j = d * sqrt(2)`` for diagonal and ``d`` for axial neighbours, ``sigma_delta`` their standard
deviation::

    a_ij = - mean_rgb( (|I_i - I_j| / (sigma_i + 1e-8) / w1)^2 )      appearance affinity
    p_ij = - (delta_j / (sigma_delta + 1e-8) / w1)^2                   position affinity
    A_ij = softmax_j(a_ij) + w2 * softmax_j(p_ij)
    M_i <- sum_j A_ij M_j     (num_iter times, each channel of the masks M independently)

Each row of ``A`` sums to ``1 + w2``, so the maps grow by that factor per iteration; callers take an argmax over
channels afterwards, which this does not affect. The image should be in [0, 1] (EndoKED's released ALL variant
feeds a broken uint8 cast of it, spec §7 row 8; the intended input is the de-normalised crop).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PAR", "dilated_neighbours"]

_OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
"""The 8 neighbour directions ``(dy, dx)``, row-major (the order of the reference's 3x3 kernels)."""


def dilated_neighbours(x: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The 8 neighbours of every pixel at each dilation, with replicate padding.

    Args:
        x: ``[B, C, H, W]``.
        dilations: ``n_d`` positive integers.

    Returns:
        ``[B, C, 8 * n_d, H, W]``; entry ``k = 8 * t + o`` holds ``x[..., y + d_t * dy_o, x + d_t * dx_o]`` with the
        coordinates clamped to the image, ``(dy_o, dx_o)`` the ``o``-th of the row-major 3x3 offsets without the
        centre.
    """
    pad = max(dilations)
    h, w = x.shape[-2:]
    padded = F.pad(x, [pad] * 4, mode="replicate")
    views = [
        padded[..., pad + d * dy: pad + d * dy + h, pad + d * dx: pad + d * dx + w]
        for d in dilations
        for dy, dx in _OFFSETS
    ]
    return torch.stack(views, dim=2)


class PAR(nn.Module):
    """Pixel-adaptive refinement of (soft) label maps by image-appearance affinity (module docstring).

    Args:
        dilations: neighbourhood dilations (ToCo / EndoKED: 1, 2, 4, 8, 12, 24).
        num_iter: propagation steps (10).
        w1: temperature of both affinity kernels (0.3).
        w2: weight of the position term (0.01).

    Call ``par(imgs, masks)`` with ``imgs [B, 3, H, W]`` in [0, 1] and ``masks [B, C, h, w]``; masks of another
    spatial size are first resized to ``H x W`` (bilinear, ``align_corners=True``, as in the reference). Returns the
    refined masks ``[B, C, H, W]`` in float32. No parameters; computed in float32 on the inputs' device (the module
    need not be moved there).
    """

    def __init__(
        self, dilations: Sequence[int] = (1, 2, 4, 8, 12, 24), num_iter: int = 10, w1: float = 0.3, w2: float = 0.01
    ) -> None:
        super().__init__()
        if not dilations or any(isinstance(d, bool) or int(d) != d or d < 1 for d in dilations):
            raise ValueError(f"PAR: dilations must be a non-empty sequence of positive integers, got {dilations!r}")
        if num_iter < 0:
            raise ValueError(f"PAR: num_iter must be >= 0, got {num_iter}")
        if w1 <= 0 or w2 < 0:
            raise ValueError(f"PAR: need w1 > 0 and w2 >= 0, got w1={w1}, w2={w2}")
        self.dilations = tuple(int(d) for d in dilations)
        self.num_iter = num_iter
        self.w1 = w1
        self.w2 = w2
        distance = torch.tensor(
            [d * (math.sqrt(2.0) if dy and dx else 1.0) for d in self.dilations for dy, dx in _OFFSETS]
        )
        pos_aff = -((distance / (distance.std() + 1e-8) / w1) ** 2)
        # w2 * softmax_j(p_ij), the same for every pixel: [1, 1, K, 1, 1]
        self.register_buffer("pos_term", (w2 * torch.softmax(pos_aff, dim=0)).view(1, 1, -1, 1, 1), persistent=False)

    def affinity(self, imgs: torch.Tensor) -> torch.Tensor:
        """``A [B, 1, K, H, W]`` of ``imgs [B, C, H, W]`` (``K = 8 * len(dilations)``, neighbour order of
        :func:`dilated_neighbours`)."""
        imgs = imgs.float()
        neighbours = dilated_neighbours(imgs, self.dilations)
        sigma = neighbours.std(dim=2, keepdim=True)
        aff = -(((neighbours - imgs.unsqueeze(2)).abs() / (sigma + 1e-8) / self.w1) ** 2).mean(dim=1, keepdim=True)
        return torch.softmax(aff, dim=2) + self.pos_term.to(aff.device)

    def forward(self, imgs: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """``imgs [B, 3, H, W]`` in [0, 1], ``masks [B, C, h, w]`` -> refined masks ``[B, C, H, W]``."""
        if imgs.ndim != 4 or masks.ndim != 4 or imgs.shape[0] != masks.shape[0]:
            raise ValueError(
                f"PAR: expected imgs [B, 3, H, W] and masks [B, C, h, w] with the same B, got imgs "
                f"{tuple(imgs.shape)} and masks {tuple(masks.shape)}"
            )
        masks = masks.float()
        if masks.shape[-2:] != imgs.shape[-2:]:
            masks = F.interpolate(masks, size=imgs.shape[-2:], mode="bilinear", align_corners=True)
        aff = self.affinity(imgs)
        for _ in range(self.num_iter):
            masks = (dilated_neighbours(masks, self.dilations) * aff).sum(dim=2)
        return masks
