"""C2FNet: context-aware cross-level fusion on a Res2Net-50 v1b encoder (an EndoKED polyp-segmentation baseline).

Reference:
    Y. Sun, G. Chen, T. Zhou, Y. Zhang, N. Liu, "Context-aware Cross-level Fusion Network for Camouflaged Object
    Detection", IJCAI 2021, pp. 1025-1031; arXiv:2105.12555. Official code: thograce/C2FNet (the EndoKED
    baseline, ``EndoKED_SEG_Baselines/C2FNet``, uses the same network unchanged).

Architecture (``c`` decoder width, 64 in the paper; strides in brackets)::

    x2, x3, x4 = Res2Net-50 v1b stages 2..4                       [8, 16, 32]   (512 / 1024 / 2048 channels)
    f_k        = RFB_k(x_k)                                        [B, c, ...]   (receptive-field blocks)
    x43        = ACFM(f3, f4);     o43  = upconv3(DGCM(x43) + x43)             [16]
    x432       = ACFM(f2, o43);    o432 = upconv2(DGCM(x432) + x432)           [8]
    S          = Up_8(classifier(o432))                            [B, 1, H, W]  (bilinear, align_corners=False)

RFB (``RFB_modified``): four branches, a 1x1 conv and, for k = 3, 5, 7, a 1x1 conv, a 1xk and a kx1 conv and a 3x3
conv of dilation k; ``RFB(x) = ReLU(conv_cat([b0, b1, b2, b3]) + conv_res(x))``, every conv bias-free and followed
by BatchNorm (no ReLU inside the branches).

Multi-scale channel attention (MSCA, reduction ``r = 4``), on ``z [B, c, h, w]``::

    L(z) = BN(W2 ReLU(BN(W1 z)))                    [B, c, h, w]   (point-wise, W1: c -> c/r, W2: c/r -> c, biased)
    G(z) = BN(W2' ReLU(BN(W1' GAP(z))))             [B, c, 1, 1]
    MSCA(z) = sigmoid(L(z) + G(z))                  [B, c, h, w]   (G broadcast over h, w)

Attention-induced cross-level fusion (ACFM), low-level ``x [B, c, 2h, 2w]``, high-level ``y [B, c, h, w]``::

    y' = Up_2(y);   w = MSCA(x + y');   ACFM(x, y) = CBR_3x3(w * x + (1 - w) * y')      [B, c, 2h, 2w]

Dual-branch global context module (DGCM), on ``x [B, c, h, w]`` (``CBR`` = conv 3x3, BN, ReLU)::

    a = CBR_h2h(x);            a' = a * MSCA_h(a)                [B, c, h, w]
    b = CBR_h2l(AvgPool_2(x));  b' = b * MSCA_l(b)               [B, c, h/2, w/2]
    DGCM(x) = CBR(a' + Up(b'))                                   [B, c, h, w]

All upsamplings are bilinear with ``align_corners=False``, as in the official code.

Outputs: the official network returns the single map ``S``; its training loss is the structure loss of ``S`` and its
test thresholds ``sigmoid(S)``. Here training mode returns the one-element tuple ``(S,)`` (the bundle's deep
supervision over one map is that same loss) and eval mode returns ``S`` ``[B, 1, H, W]``.

What differs from the official code, and why:
    * The backbone is :func:`~common.networks.res2net.res2net50_v1b` without its 1000-class ``fc``. The official
      network keeps ``resnet.fc`` although ``forward`` never uses it (its 2,049,000 parameters are in the official
      count, 28,411,217 with ``fc``; 26,362,217 here), which is why the official EndoKED training wraps it in
      ``DistributedDataParallel(find_unused_parameters=True)``. Dropping it lets every parameter get a gradient.
      :func:`load_c2fnet_checkpoint` therefore ignores ``resnet.fc.weight`` / ``resnet.fc.bias`` in official
      checkpoints (outputs are unchanged) and loads every other key strictly.
    * The decoder width ``c`` reaches every decoder module (the official constructor passes ``channel`` to the RFBs
      only and hard-codes 64 elsewhere, so any other value fails there); the default 64 is the published network.

Module attribute names follow the official code (``resnet.*``, ``rfb2_1``, ``acfm3.msca.local_att.0``,
``dgcm2.mscah.global_att.1``, ``upconv3``, ``classifier``, ...) so that its checkpoints load.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.res2net import res2net50_v1b, res2net_stages
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = ["ConvBN", "RFBModified", "MSCA", "ACFM", "DGCM", "C2FNet", "load_c2fnet_checkpoint"]

logger = logging.getLogger(__name__)

# keys of the official state dict that this network does not hold: the backbone's unused ImageNet classifier
UNUSED_OFFICIAL_KEYS = ("resnet.fc.weight", "resnet.fc.bias")


def _upsample_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``x`` resized bilinearly (``align_corners=False``) to the spatial size of ``ref``."""
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


class ConvBN(nn.Module):
    """``y = [ReLU](BN(Conv(x)))`` with a bias-free convolution (the official ``BasicConv2d``; keys ``conv``, ``bn``).

    Args:
        in_channels, out_channels: channels of ``x [B, C_in, H, W]`` and ``y [B, C_out, H', W']``.
        kernel_size, padding, dilation: convolution geometry (ints or ``(h, w)`` pairs), stride 1.
        relu: apply a ReLU after the BatchNorm.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 padding: int | tuple[int, int] = 0, dilation: int = 1, relu: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.use_relu = relu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return F.relu(y) if self.use_relu else y


def _rfb_branch(in_channels: int, out_channels: int, k: int) -> nn.Sequential:
    """1x1 reduction, then (for ``k > 1``) 1xk, kx1 and a 3x3 conv of dilation ``k``; all keep the spatial size."""
    layers = [ConvBN(in_channels, out_channels, 1)]
    if k > 1:
        layers += [ConvBN(out_channels, out_channels, (1, k), padding=(0, k // 2)),
                   ConvBN(out_channels, out_channels, (k, 1), padding=(k // 2, 0)),
                   ConvBN(out_channels, out_channels, 3, padding=k, dilation=k)]
    return nn.Sequential(*layers)


class RFBModified(nn.Module):
    """Receptive-field block ``ReLU(conv_cat([b0, b3, b5, b7](x)) + conv_res(x))``: ``[B, C_in, H, W] -> [B, C, H, W]``.

    ``b0`` is a 1x1 conv, ``b_k`` (k = 3, 5, 7) a 1x1 conv, 1xk and kx1 convs and a 3x3 conv of dilation k
    (see :func:`_rfb_branch`); ``conv_cat`` is 3x3 (4C -> C), ``conv_res`` 1x1 (C_in -> C).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.branch0 = _rfb_branch(in_channels, out_channels, 1)
        self.branch1 = _rfb_branch(in_channels, out_channels, 3)
        self.branch2 = _rfb_branch(in_channels, out_channels, 5)
        self.branch3 = _rfb_branch(in_channels, out_channels, 7)
        self.conv_cat = ConvBN(4 * out_channels, out_channels, 3, padding=1)
        self.conv_res = ConvBN(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = [self.branch0(x), self.branch1(x), self.branch2(x), self.branch3(x)]
        return F.relu(self.conv_cat(torch.cat(branches, dim=1)) + self.conv_res(x))


def _pointwise_bottleneck(channels: int, hidden: int) -> list[nn.Module]:
    """``BN(W2 ReLU(BN(W1 z)))`` as layers: 1x1 conv (biased) c -> hidden, BN, ReLU, 1x1 conv hidden -> c, BN."""
    return [nn.Conv2d(channels, hidden, 1), nn.BatchNorm2d(hidden), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.BatchNorm2d(channels)]


class MSCA(nn.Module):
    """Multi-scale channel attention: ``sigmoid(L(z) + G(z))``, ``[B, C, H, W] -> [B, C, H, W]`` weights in (0, 1).

    ``L`` is the point-wise bottleneck on every pixel (``local_att``), ``G`` the same on the global average
    (``global_att``, index 0 is the pooling), broadcast over the pixels.

    Args:
        channels: ``C``.
        reduction: bottleneck ratio ``r``; the hidden width is ``C // r`` (at least 1).
    """

    def __init__(self, channels: int = 64, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.local_att = nn.Sequential(*_pointwise_bottleneck(channels, hidden))
        self.global_att = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_pointwise_bottleneck(channels, hidden))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.local_att(z) + self.global_att(z))


class ACFM(nn.Module):
    """Attention-induced cross-level fusion: ``conv(w x + (1 - w) Up(y))`` with ``w = MSCA(x + Up(y))``.

    ``x [B, C, 2h, 2w]`` (finer level), ``y [B, C, h, w]`` (coarser level) -> ``[B, C, 2h, 2w]``.
    """

    def __init__(self, channels: int = 64, reduction: int = 4) -> None:
        super().__init__()
        self.msca = MSCA(channels, reduction)
        self.conv = ConvBN(channels, channels, 3, padding=1, relu=True)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        y = _upsample_to(y, x)
        weight = self.msca(x + y)
        return self.conv(weight * x + (1 - weight) * y)


class DGCM(nn.Module):
    """Dual-branch global context: a full-resolution and a half-resolution branch, each reweighted by its own MSCA,
    summed (the coarse one upsampled) and fused by a 3x3 conv. ``[B, C, H, W] -> [B, C, H, W]`` (H, W even).
    """

    def __init__(self, channels: int = 64, reduction: int = 4) -> None:
        super().__init__()
        self.h2l_pool = nn.AvgPool2d(2, stride=2)
        self.h2l = ConvBN(channels, channels, 3, padding=1, relu=True)
        self.h2h = ConvBN(channels, channels, 3, padding=1, relu=True)
        self.mscah = MSCA(channels, reduction)
        self.mscal = MSCA(channels, reduction)
        self.conv = ConvBN(channels, channels, 3, padding=1, relu=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high = self.h2h(x)
        low = self.h2l(self.h2l_pool(x))
        high = high * self.mscah(high)
        low = low * self.mscal(low)
        return self.conv(high + _upsample_to(low, high))


class C2FNet(nn.Module):
    """C2FNet (Sun et al., IJCAI 2021): Res2Net-50 v1b, three RFBs, two ACFM + DGCM stages, one prediction.

    Return convention (as MONAI's ``DynUNet`` with deep supervision): in **training** mode ``forward`` returns the
    one-element tuple ``(S,)`` of logits ``[B, N, H, W]`` (the official network has one supervised output); in
    **eval** mode the map ``S`` itself, which the official test thresholds after the sigmoid. ``H`` and ``W`` must
    be multiples of 32.

    Args:
        out_channels: ``N``, output logit channels (1 for polyps).
        channel: decoder width ``c`` (official 64).
        reduction: MSCA bottleneck ratio (official 4).
        backbone_layers, backbone_channels, stem_width: the Res2Net-50 v1b architecture, see
            :func:`~common.networks.res2net.res2net50_v1b` (defaults: the published backbone).
        pretrained_backbone: official ImageNet file ``res2net50_v1b_26w_4s-3cf99910.pth``, loaded strictly into the
            full Res2Net (``fc`` included) whose ``fc`` is then dropped (never used by the official forward).
        checkpoint: a full C2FNet state dict in the official key format, loaded strictly after
            ``pretrained_backbone``, see :func:`load_c2fnet_checkpoint`.
    """

    def __init__(
        self,
        out_channels: int = 1,
        channel: int = 64,
        reduction: int = 4,
        backbone_layers: Sequence[int] = (3, 4, 6, 3),
        backbone_channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 32,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.resnet = res2net50_v1b(pretrained_path=pretrained_backbone, layers=backbone_layers,
                                    channels=backbone_channels, stem_width=stem_width)
        self.resnet.reset_classifier(0)  # fc -> Identity: the official forward never uses the ImageNet classifier
        stage_channels = [layer[-1].bn3.num_features for layer in (self.resnet.layer2, self.resnet.layer3,
                                                                      self.resnet.layer4)]
        self.rfb2_1 = RFBModified(stage_channels[0], channel)
        self.rfb3_1 = RFBModified(stage_channels[1], channel)
        self.rfb4_1 = RFBModified(stage_channels[2], channel)
        self.acfm3 = ACFM(channel, reduction)
        self.acfm2 = ACFM(channel, reduction)
        self.dgcm3 = DGCM(channel, reduction)
        self.dgcm2 = DGCM(channel, reduction)
        self.upconv3 = ConvBN(channel, channel, 3, padding=1, relu=True)
        self.upconv2 = ConvBN(channel, channel, 3, padding=1, relu=True)
        self.classifier = nn.Conv2d(channel, out_channels, 1)
        if checkpoint is not None:
            load_c2fnet_checkpoint(self, checkpoint)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor] | torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"C2FNet: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}.")
        _, x2, x3, x4 = res2net_stages(self.resnet, x)
        feat = self.rfb4_1(x4)  # [B, c, H/32, W/32]
        # two cascaded stages, coarse to fine: fuse with the next finer level, then add the global context
        for finer, fuse, context, refine in ((self.rfb3_1(x3), self.acfm3, self.dgcm3, self.upconv3),
                                             (self.rfb2_1(x2), self.acfm2, self.dgcm2, self.upconv2)):
            fused = fuse(finer, feat)
            feat = refine(context(fused) + fused)
        logits = _upsample_to(self.classifier(feat), x)  # [B, N, H, W]
        return (logits,) if self.training else logits


def load_c2fnet_checkpoint(model: C2FNet, path: str | os.PathLike) -> None:
    """Strictly load a full C2FNet state dict (official keys; ``{"model"|"state_dict": sd}`` wrappers and
    ``module.``-prefixed keys accepted) into ``model`` in place.

    The official ``resnet.fc.weight`` / ``resnet.fc.bias`` (the Res2Net ImageNet classifier, unused by the
    official forward) are ignored when present; every other key must match in name and shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    ignored = [k for k in UNUSED_OFFICIAL_KEYS if state_dict.pop(k, None) is not None]
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded C2FNet weights from '%s' (%d tensors, ignored %s)", path, len(state_dict), ignored or "none")
