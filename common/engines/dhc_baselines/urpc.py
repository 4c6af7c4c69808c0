"""URPC as a DHC baseline: one deep-supervised 3D U-Net, no teacher, no second branch.

Luo et al., "Efficient Semi-supervised Gross Target Volume of Nasopharyngeal Carcinoma Segmentation via Uncertainty
Rectified Pyramid Consistency", MICCAI 2021; specs/dhc.md §9 row "urpc". With the S = 4 head logits
``z_s = net_a.forward_heads(x)`` ``[L + U, C, d, h, w]`` (:class:`~common.networks.unet_ds.UNetDS3D`)::

    L = L_sup(z_{1..S}[:L], y) + λ(e) · L_unsup(z_{1..S}[L:])

``L_sup`` = mean over the heads of ½ (CE + Dice) on the labelled patches
(:class:`~common.losses.urpc.DeepSupervisionLoss`), ``L_unsup`` the uncertainty-rectified pyramid consistency on the
unlabelled patches (:class:`~common.losses.urpc.URPCConsistency`), λ(e) the trainer's sigmoid ramp. The monitored
prediction is the finest head (what ``net_a(x)`` returns and what validation and inference use). The method has no
state: nothing depends on the iteration, so its ``state_dict`` is empty.
"""

from __future__ import annotations

import torch
from torch import nn

from common.engines.co_training import CoTrainingMethod
from common.losses.urpc import DeepSupervisionLoss, URPCConsistency

__all__ = ["URPC"]


class URPC(CoTrainingMethod):
    """Deep-supervised CE + Dice plus λ(e) times the uncertainty-rectified pyramid consistency (module docstring).

    Args:
        num_classes: C, including background.
        lambda_ce, lambda_dice: weights of the per-head CE and Dice (0.5, 0.5 as the original).
        smooth: Dice smoothing (1e-8 as the original).
        eps: ε of the consistency's weight normaliser (1e-8).
    """

    trains_b = False
    uses_b = False

    def __init__(self, num_classes: int, lambda_ce: float = 0.5, lambda_dice: float = 0.5, smooth: float = 1e-8,
                 eps: float = 1e-8) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"URPC: num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.supervised = DeepSupervisionLoss(lambda_ce, lambda_dice, smooth)
        self.unsupervised = URPCConsistency(eps)

    def heads(self, net_a: nn.Module, image: torch.Tensor) -> list[torch.Tensor]:
        """The network's head logits ``[N, C, d, h, w]``, finest first; a network without ``forward_heads`` or with
        another channel count than C is named."""
        forward_heads = getattr(net_a, "forward_heads", None)
        if not callable(forward_heads):
            raise ValueError(f"URPC: the network {type(net_a).__name__} has no forward_heads(x) returning the "
                             "deep-supervision logits; use common.networks.unet_ds.UNetDS3D")
        heads = list(forward_heads(image))
        if heads[0].shape[1] != self.num_classes:
            raise ValueError(f"URPC: the network returns {heads[0].shape[1]} channels, the method expects "
                             f"num_classes={self.num_classes}")
        return heads

    def forward(  # type: ignore[override]
        self, net_a: nn.Module, net_b: nn.Module | None, image: torch.Tensor, label: torch.Tensor, consistency: float,
        epoch: int,
    ) -> dict[str, torch.Tensor]:
        n = label.shape[0]
        if not 0 < n <= image.shape[0]:
            raise ValueError(f"URPC: need 1 to {image.shape[0]} labelled patches first in the batch, got label shape "
                             f"{tuple(label.shape)} for image shape {tuple(image.shape)}")
        heads = self.heads(net_a, image)
        sup = self.supervised([head[:n] for head in heads], label)
        if image.shape[0] > n:
            unsup = self.unsupervised([head[n:] for head in heads])
        else:
            unsup = sup.new_zeros(())
        return {"loss": sup + consistency * unsup, "loss_sup": sup.detach(), "loss_unsup": unsup.detach(),
                "pred": heads[0].detach()}
