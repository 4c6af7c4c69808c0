"""The networks of one semi-supervised method held in one module: ``branch_a`` and an optional ``branch_b``.

Co-training methods (DHC, CPS, DST, ...) train two branches, mean-teacher methods (UA-MT, Basak et al.) keep an EMA
teacher as ``branch_b``, single-network methods (URPC, SS-Net) have ``branch_a`` only (specs/dhc.md §9). Holding
them in one module gives one ``state_dict`` (``branch_a.*``, ``branch_b.*``), so ``models/model.pt``, the sliding
window and MONAI Label serve whatever the method trained. ``forward`` is the prediction used at test time::

    "AB": (z_A(x) + z_B(x)) / 2        "A": z_A(x)        "B": z_B(x)

with ``z`` the branches' logits ``[B, C, D, H, W]``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["BRANCH_OUTPUTS", "Branches"]

BRANCH_OUTPUTS: tuple[str, ...] = ("AB", "A", "B")


class Branches(nn.Module):
    """``branch_a`` and an optional ``branch_b``; ``forward`` returns the logits of ``branches`` (module docstring).

    Args:
        branch_a: the (student / first) network.
        branch_b: the second network or EMA teacher; None for single-network methods.
        branches: which logits ``forward`` returns: ``"AB"`` (mean of both), ``"A"`` or ``"B"``.
    """

    def __init__(self, branch_a: nn.Module, branch_b: nn.Module | None = None, branches: str = "AB") -> None:
        super().__init__()
        if branches not in BRANCH_OUTPUTS:
            raise ValueError(f"{type(self).__name__}: branches must be one of {BRANCH_OUTPUTS}, got {branches!r}")
        if branch_b is None and branches != "A":
            raise ValueError(f"{type(self).__name__}: branches={branches!r} needs a branch_b; a single network "
                             "predicts with branches='A'")
        self.branches = branches
        self.branch_a = branch_a
        if branch_b is not None:
            self.branch_b = branch_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, C, D, H, W]``: the mean of the selected branches' logits."""
        if self.branches == "A":
            return self.branch_a(x)
        if self.branches == "B":
            return self.branch_b(x)
        return (self.branch_a(x) + self.branch_b(x)) / 2.0
