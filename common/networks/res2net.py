"""Res2Net-50 v1b (26w×4s), the ImageNet backbone of the PraNet family of polyp networks (C2FNet, LDNet, ...).

Gao et al., "Res2Net: A New Multi-scale Backbone Architecture", TPAMI 2021. The "v1b" variant that PraNet released
(``res2net50_v1b_26w_4s``) has a deep stem (three 3×3 convolutions 3→32→32→64, stride 2 in the first) and an
average-pooled shortcut in the down-sampling blocks; timm builds the same network as ``res2net50d`` with the same
state-dict key names (``conv1.0``, ``conv1.1``, ..., ``layer1.0.convs.0``, ``layer2.0.downsample.1``, ``fc``), so
the official ImageNet file ``res2net50_v1b_26w_4s-3cf99910.pth`` loads strictly.

Parameter count with the 1000-class ``fc`` (which the PraNet-family networks keep, unused, so it is part of their
official counts): 25,718,352.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from timm.models.res2net import Bottle2neck
from timm.models.resnet import ResNet

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = ["res2net50_v1b", "res2net_stages"]

logger = logging.getLogger(__name__)


def res2net50_v1b(
    pretrained_path: str | os.PathLike | None = None,
    layers: Sequence[int] = (3, 4, 6, 3),
    channels: Sequence[int] = (64, 128, 256, 512),
    stem_width: int = 32,
    base_width: int = 26,
    scale: int = 4,
) -> ResNet:
    """Res2Net-50 v1b 26w×4s (timm ``ResNet`` + ``Bottle2neck``, deep stem, average-pooled shortcut).

    Args:
        pretrained_path: an official ImageNet checkpoint (``res2net50_v1b_26w_4s-3cf99910.pth``), loaded strictly.
        layers, channels, stem_width, base_width, scale: the architecture; the defaults are the published network,
            smaller values give tiny test backbones (stage outputs have ``4 * channels[i]`` channels; each
            block splits ``channels[i] * base_width // 64`` channels ``scale`` ways, so that product must be ≥ 64).

    Every BatchNorm starts at weight 1, as in the official Res2Net (timm's default ``zero_init_last`` would start
    each block's last one at 0, which leaves the residual branches without gradient at the first step).

    Returns:
        the network with its 1000-class ``fc``; :func:`res2net_stages` gives the four stage maps.
    """
    model = ResNet(block=Bottle2neck, layers=tuple(layers), channels=tuple(channels), stem_width=stem_width,
                   stem_type="deep", avg_down=True, base_width=base_width, block_args={"scale": scale},
                   zero_init_last=False)
    if pretrained_path is not None:
        load_state_dict_strict(model, read_state_dict(pretrained_path), pretrained_path)
        logger.info("loaded Res2Net-50 v1b ImageNet weights from '%s'", pretrained_path)
    return model


def res2net_stages(model: ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    """The four stage outputs of a Res2Net/ResNet for ``x`` ``[B, 3, H, W]``.

    Returns:
        ``[x1, x2, x3, x4]`` with ``4·channels[i]`` channels at strides 4, 8, 16 and 32
        (256/512/1024/2048 channels for the published network).
    """
    x = model.maxpool(model.act1(model.bn1(model.conv1(x))))
    x1 = model.layer1(x)
    x2 = model.layer2(x1)
    x3 = model.layer3(x2)
    return [x1, x2, x3, model.layer4(x3)]
