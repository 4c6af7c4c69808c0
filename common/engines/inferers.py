"""Inferers for networks with several output heads."""

from __future__ import annotations

from typing import Any

import torch
from monai.inferers import SimpleInferer

__all__ = ["SummedHeadsInferer"]


class SummedHeadsInferer(SimpleInferer):
    """``SimpleInferer`` that sums a tuple or list of head outputs into one map; a tensor passes through.

    Polyp-PVT returns ``(P1, P2)`` in training mode and ``P1 + P2`` in eval mode (the official inference uses
    ``sigmoid(P1 + P2)``). MONAI Label's epistemic scoring runs a bundle's network in training mode to keep dropout
    active, so the inferer adds the heads itself: ``[B, 1, H, W]`` either way.
    """

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = network(inputs, *args, **kwargs)
        return sum(out) if isinstance(out, (tuple, list)) else out
