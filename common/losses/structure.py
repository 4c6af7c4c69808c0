"""Structure loss of PraNet / Polyp-PVT: boundary-weighted BCE plus boundary-weighted IoU.

Fan et al., "PraNet: Parallel Reverse Attention Network for Polyp Segmentation", MICCAI 2020, Eq. (4);
used unchanged by Polyp-PVT and EndoKED-SEG (specs/endoked.md §4.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.loss import _Loss

__all__ = ["StructureLoss", "boundary_weights"]


def boundary_weights(mask: torch.Tensor, kernel_size: int = 31, gain: float = 5.0) -> torch.Tensor:
    """Pixel weights that grow near the mask boundary.

    ``w = 1 + gain * |avgpool_k(G) - G|`` with a ``k x k`` mean filter of stride 1 and zero padding ``k // 2``
    (padding counted in the mean, as ``F.avg_pool2d`` does by default and as the original code does).

    Args:
        mask: ground truth ``G`` in [0, 1], shape ``[B, 1, H, W]``.
        kernel_size: odd size ``k`` of the mean filter (31 in PraNet).
        gain: weight added at the boundary (5 in PraNet).

    Returns:
        weights ``[B, 1, H, W]``, each in ``[1, 1 + gain]``.
    """
    local_mean = F.avg_pool2d(mask, kernel_size=kernel_size, stride=1, padding=kernel_size // 2)
    return 1.0 + gain * torch.abs(local_mean - mask)


class StructureLoss(_Loss):
    """Weighted BCE + weighted IoU on logits, averaged over the batch.

    With logits ``P``, probabilities ``p = sigmoid(P)``, ground truth ``G`` and weights ``w`` from
    :func:`boundary_weights`, per image (sums over pixels)::

        wBCE = sum(w * BCE(P, G)) / sum(w)
        wIoU = 1 - (sum(w p G) + 1) / (sum(w (p + G)) - sum(w p G) + 1)
        L    = mean_over_batch(wBCE + wIoU)

    The original code passes the legacy argument ``reduce='none'`` to ``binary_cross_entropy_with_logits``;
    that truthy string makes torch return the *scalar mean* BCE, so the released models were trained with a plain,
    unweighted mean BCE term (specs/endoked.md §7 row 11). ``weighted_bce=False`` (default) reproduces that
    behaviour; ``weighted_bce=True`` gives the weighted BCE the paper describes.

    A deeply supervised network (Polyp-PVT returns ``(P1, P2)`` in training) is trained with
    ``monai.losses.DeepSupervisionLoss(StructureLoss(), weight_mode="same")``, i.e. ``L(P1) + L(P2)``.

    Args:
        weighted_bce: use the boundary-weighted BCE instead of the official mean-reduced BCE.
        kernel_size: mean-filter size of :func:`boundary_weights`.
        gain: boundary gain of :func:`boundary_weights`.
    """

    def __init__(self, weighted_bce: bool = False, kernel_size: int = 31, gain: float = 5.0) -> None:
        super().__init__()
        self.weighted_bce = weighted_bce
        self.kernel_size = kernel_size
        self.gain = gain

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: ``[B, 1, H, W]`` raw network outputs.
            target: ``[B, 1, H, W]`` ground truth in [0, 1] (soft values from resizing are allowed).

        Returns:
            scalar loss.
        """
        if logits.shape != target.shape:
            raise ValueError(f"StructureLoss: logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        logits, target = logits.float(), target.float()
        weights = boundary_weights(target, self.kernel_size, self.gain)
        if self.weighted_bce:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            bce = (weights * bce).sum(dim=(2, 3)) / weights.sum(dim=(2, 3))
        else:
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
        prob = torch.sigmoid(logits)
        inter = (weights * prob * target).sum(dim=(2, 3))
        union = (weights * (prob + target)).sum(dim=(2, 3))
        wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
        return (bce + wiou).mean()
