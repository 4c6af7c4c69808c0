"""Synthetic few-shot episodes shared by the host tests (tests/test_networks_{qnet,pmm,dmtnet,ifa,fewshot_hosts}.py).

Imported by the test files as ``from fewshot_host_checks import ...`` (``tests/`` is on ``sys.path``, as for
``conftest``).
"""

from __future__ import annotations

import torch

__all__ = ["synthetic_episode"]


def synthetic_episode(size: int = 64, batch: int = 1, seed: int = 1, support: str = "corner"
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(query [B, 3, S, S], support [B, 3, S, S], support_mask [B, S, S], query_mask [B, S, S])``: normal noise
    images from ``seed``; the support mask is the square ``[S/4, S)^2`` (``support="corner"``: it reaches the
    corner, so even a 2 x 2 feature grid sees foreground) or ``[S/4, 3S/4)^2`` (``"centre"``); the query mask the
    rectangle rows ``[S/8, 5S/8)`` x columns ``[S/4, 3S/4)``."""
    if support not in ("corner", "centre"):
        raise ValueError(f"synthetic_episode: support must be 'corner' or 'centre', got {support!r}")
    g = torch.Generator().manual_seed(seed)
    q, s = torch.randn(batch, 3, size, size, generator=g), torch.randn(batch, 3, size, size, generator=g)
    sm, qm = torch.zeros(batch, size, size), torch.zeros(batch, size, size)
    end = size if support == "corner" else 3 * size // 4
    sm[:, size // 4:end, size // 4:end] = 1
    qm[:, size // 8:5 * size // 8, size // 4:3 * size // 4] = 1
    return q, s, sm, qm
