"""K-shot few-shot segmentation by voting over K one-shot predictions (HSNet/PATNet ``predict_mask_nshot``).

Min et al., HSNet (ICCV 2021), and Lei et al., PATNet (ECCV 2022), run the 1-shot network once per support and
merge the K binary predictions ``P_k`` (specs/cdtg.md §3)::

    V(x) = sum_k P_k(x),   P(x) = 1[ V(x) / max(max_x' V(x'), 1) >= 0.5 ]      (K > 1; P = P_1 for K = 1)

normalised by the episode's own maximum vote, not by K.
"""

from __future__ import annotations

import torch

__all__ = ["vote_shots"]


def vote_shots(masks: torch.Tensor) -> torch.Tensor:
    """Merge the K one-shot predictions of each episode by the max-normalised vote (module docstring).

    Args:
        masks: ``[K, B, H, W]`` binary predictions (0 / 1), one per support.

    Returns:
        ``[B, H, W]`` long: ``masks[0]`` when K = 1, else ``1[V / max(max_x V, 1) >= 0.5]`` per episode.
    """
    masks = torch.as_tensor(masks)
    if masks.ndim != 4 or masks.shape[0] < 1:
        raise ValueError(f"vote_shots: masks must be [K, B, H, W] with K >= 1, got {tuple(masks.shape)}")
    if masks.shape[0] == 1:
        return masks[0].long()
    votes = masks.long().sum(dim=0)  # [B, H, W]
    top = votes.flatten(1).max(dim=1).values.clamp(min=1).view(-1, 1, 1)
    return (votes.double() / top >= 0.5).long()
