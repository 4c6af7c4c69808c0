"""UNet++ baseline: MONAI's ``BasicUNetPlusPlus`` with a tensor output at inference."""

from __future__ import annotations

import torch
from monai.networks.nets import BasicUNetPlusPlus

__all__ = ["UNetPlusPlus"]


class UNetPlusPlus(BasicUNetPlusPlus):
    """Zhou et al., "UNet++: A Nested U-Net Architecture for Medical Image Segmentation", DLMIA 2018.

    ``BasicUNetPlusPlus`` always returns a list (``[x_0_4]``, or the four nested outputs ``x_0_1 .. x_0_4`` with
    ``deep_supervision``). MONAI's evaluators, metrics, ``Invertd`` and MONAI Label expect one tensor, so this
    subclass returns the list only while training with deep supervision (for ``DeepSupervisionLoss``) and the
    final map ``x_0_4`` ``[B, out_channels, H, W]`` otherwise.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:  # type: ignore[override]
        outputs = super().forward(x)
        return outputs if self.training and self.deep_supervision else outputs[-1]
