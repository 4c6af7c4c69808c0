"""Polyp-PVT: polyp segmentation with a PVTv2 encoder, CFM, CIM and SAM.

Reference:
    B. Dong, W. Wang, D.-P. Fan, J. Li, H. Fu, L. Shao,
    "Polyp-PVT: Polyp Segmentation with Pyramid Vision Transformers", CAAI Artificial Intelligence
    Research 2, 2023.

Module names and shapes follow the official implementation so that its checkpoints load strictly
(``backbone.*``, ``Translayer2_0.*``, ``CFM.*``, ``ca.*``, ``sa.*``, ``SAM.*``, ``out_SAM.*``,
``out_CFM.*``). With the default ``channel=32`` and a PVTv2-b2 backbone the network has 25,107,604
parameters.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from .pvt_v2 import build_pvt_v2, load_state_dict_strict, read_state_dict

__all__ = [
    "BasicConv2d",
    "ChannelAttention",
    "SpatialAttention",
    "CFM",
    "GCN",
    "SimilarityAggregation",
    "PolypPVT",
    "load_polyp_pvt_checkpoint",
]

logger = logging.getLogger(__name__)


class BasicConv2d(nn.Module):
    """``y = BN(Conv(x))`` with a bias-free convolution.

    Faithful to the official code, a ``relu`` module is constructed but **not applied** in ``forward``
    (the released weights were trained this way; see the EndoKED spec §7 row 17).

    Args:
        in_planes: input channels.
        out_planes: output channels.
        kernel_size, stride, padding, dilation: convolution geometry.
    """

    def __init__(
        self, in_planes: int, out_planes: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_planes, out_planes, kernel_size, stride=stride, padding=padding, dilation=dilation, bias=False
        )
        self.bn = nn.BatchNorm2d(out_planes)
        self.relu = nn.ReLU(inplace=True)  # constructed, unused: official quirk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class ChannelAttention(nn.Module):
    """CBAM channel attention (Woo et al., ECCV 2018), part of Polyp-PVT's CIM.

    ``a = sigmoid(fc2(ReLU(fc1(AvgPool(x)))) + fc2(ReLU(fc1(MaxPool(x)))))``, with shared 1x1 convolutions
    ``fc1: C -> C // ratio``, ``fc2: C // ratio -> C`` (no bias). ``[B, C, H, W] -> [B, C, 1, 1]``.
    """

    def __init__(self, in_planes: int, ratio: int = 16) -> None:
        super().__init__()
        if in_planes // ratio < 1:
            raise ValueError(f"ChannelAttention: in_planes ({in_planes}) must be >= ratio ({ratio}).")
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.max_pool = nn.AdaptiveMaxPool2d(1)
        self.fc1 = nn.Conv2d(in_planes, in_planes // ratio, 1, bias=False)
        self.relu1 = nn.ReLU()
        self.fc2 = nn.Conv2d(in_planes // ratio, in_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        avg_out = self.fc2(self.relu1(self.fc1(self.avg_pool(x))))
        max_out = self.fc2(self.relu1(self.fc1(self.max_pool(x))))
        return torch.sigmoid(avg_out + max_out)


class SpatialAttention(nn.Module):
    """CBAM spatial attention, part of Polyp-PVT's CIM.

    ``a = sigmoid(Conv_{7x7}([mean_c(x), max_c(x)]))`` with a 2 -> 1 bias-free convolution.
    ``[B, C, H, W] -> [B, 1, H, W]``.
    """

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        if kernel_size not in (3, 7):
            raise ValueError(f"SpatialAttention: kernel_size must be 3 or 7, got {kernel_size}.")
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(pooled))


class CFM(nn.Module):
    """Cascaded fusion module (Polyp-PVT §3.2) on the three high-level features.

    With ``U`` the x2 bilinear upsampling (``align_corners=True``) and all ``conv*`` 3x3 :class:`BasicConv2d`::

        x2_1 = conv_upsample1(U x1) * x2
        x3_1 = conv_upsample2(U U x1) * conv_upsample3(U x2) * x3
        x2_2 = conv_concat2([x2_1, conv_upsample4(U x1)])
        x3_2 = conv_concat3([x3_1, conv_upsample5(U x2_2)])
        out  = conv4(x3_2)

    Inputs ``x1 [B, c, h, w]`` (stride 32), ``x2 [B, c, 2h, 2w]`` (stride 16), ``x3 [B, c, 4h, 4w]``
    (stride 8); output ``[B, c, 4h, 4w]``.
    """

    def __init__(self, channel: int) -> None:
        super().__init__()
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
        self.conv_upsample1 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample2 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample3 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample4 = BasicConv2d(channel, channel, 3, padding=1)
        self.conv_upsample5 = BasicConv2d(2 * channel, 2 * channel, 3, padding=1)
        self.conv_concat2 = BasicConv2d(2 * channel, 2 * channel, 3, padding=1)
        self.conv_concat3 = BasicConv2d(3 * channel, 3 * channel, 3, padding=1)
        self.conv4 = BasicConv2d(3 * channel, channel, 3, padding=1)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor, x3: torch.Tensor) -> torch.Tensor:
        up = self.upsample
        x2_1 = self.conv_upsample1(up(x1)) * x2
        x3_1 = self.conv_upsample2(up(up(x1))) * self.conv_upsample3(up(x2)) * x3
        x2_2 = self.conv_concat2(torch.cat([x2_1, self.conv_upsample4(up(x1))], dim=1))
        x3_2 = self.conv_concat3(torch.cat([x3_1, self.conv_upsample5(up(x2_2))], dim=1))
        return self.conv4(x3_2)


class GCN(nn.Module):
    """Graph convolution over node states ``N [B, num_state, num_node]`` (Chen et al., GloRe, CVPR 2019).

    ``N' = ReLU(W_s (A N - N))`` where ``A N`` is a 1x1 Conv1d across nodes (``conv1``, with bias) and
    ``W_s`` a 1x1 Conv1d across states (``conv2``, no bias). ``[B, S, K] -> [B, S, K]``.
    """

    def __init__(self, num_state: int, num_node: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(num_node, num_node, kernel_size=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv1d(num_state, num_state, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(x.permute(0, 2, 1)).permute(0, 2, 1)
        return self.relu(self.conv2(h - x))


class SimilarityAggregation(nn.Module):
    """Similarity aggregation module ("SAM" in Polyp-PVT §3.4; unrelated to Segment Anything).

    Graph reasoning on the CFM feature ``x [B, C, h, w]`` guided by the low-level CIM feature
    ``edge [B, C', h', w']`` (``C' >= 2``); ``S = num_s = plane_mid``, ``K = mids^2`` nodes::

        e       = softmax_c(resize_nearest(edge, (h, w)))[:, 1:2]              # [B, 1, h, w]
        S_x     = conv_state(x) -> [B, S, hw];  P = conv_proj(x)               # [B, S, h, w]
        anchors = AvgPool_{(mids+2)^2}(P * e)[:, :, 1:-1, 1:-1] -> [B, S, K]
        R       = softmax_nodes(anchors^T P)                                    # [B, K, hw]
        N       = S_x R^T                                                       # [B, S, K]
        N'      = GCN(N)
        out     = x + conv_extend((N' R) -> [B, S, h, w])                      # [B, C, h, w]

    Args:
        num_in: channels ``C`` of ``x``.
        plane_mid: node-state width ``S``.
        mids: the anchors are the inner ``mids x mids`` cells of a ``(mids+2) x (mids+2)`` average pooling.
    """

    def __init__(self, num_in: int = 32, plane_mid: int = 16, mids: int = 4) -> None:
        super().__init__()
        self.num_s = int(plane_mid)
        self.num_n = mids * mids
        self.priors = nn.AdaptiveAvgPool2d((mids + 2, mids + 2))
        self.conv_state = nn.Conv2d(num_in, self.num_s, kernel_size=1)
        self.conv_proj = nn.Conv2d(num_in, self.num_s, kernel_size=1)
        self.gcn = GCN(num_state=self.num_s, num_node=self.num_n)
        self.conv_extend = nn.Conv2d(self.num_s, num_in, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor, edge: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        edge = F.interpolate(edge, size=(h, w), mode="nearest")
        edge = torch.softmax(edge, dim=1)[:, 1:2]
        state = self.conv_state(x).reshape(b, self.num_s, h * w)
        proj = self.conv_proj(x)
        anchors = self.priors(proj * edge)[:, :, 1:-1, 1:-1].reshape(b, self.num_s, self.num_n)
        assign = torch.softmax(anchors.transpose(1, 2) @ proj.reshape(b, self.num_s, h * w), dim=1)
        nodes = self.gcn(state @ assign.transpose(1, 2))
        return x + self.conv_extend((nodes @ assign).reshape(b, self.num_s, h, w))


class PolypPVT(nn.Module):
    """Polyp-PVT (Dong et al., 2023): PVTv2 encoder, CFM + CIM + SAM decoder, two deep-supervised heads.

    With backbone features ``x1..x4`` (strides 4..32)::

        cim = sa(x1') * x1',  x1' = ca(x1) * x1                         # CIM, [B, C_1, H/4, W/4]
        cfm = CFM(Translayer4_1(x4), Translayer3_1(x3), Translayer2_1(x2))   # [B, c, H/8, W/8]
        sam = SAM(cfm, down05(Translayer2_0(cim)))                       # [B, c, H/8, W/8]
        P1  = Up_8(out_CFM(cfm)),  P2 = Up_8(out_SAM(sam))               # [B, out_channels, H, W]

    Return convention (as MONAI's ``DynUNet`` with deep supervision): in **training** mode ``forward``
    returns the tuple ``(P1, P2)`` of logits, one per supervised head (the official loss is
    ``structure_loss(P1, y) + structure_loss(P2, y)``); in **eval** mode it returns the single logit map
    ``P1 + P2`` (the official inference thresholds ``sigmoid(P1 + P2)``).

    ``H`` and ``W`` must be multiples of 32.

    Args:
        in_channels: image channels.
        out_channels: output logit channels (1 for binary polyp segmentation).
        channel: decoder width ``c``.
        backbone: PVTv2 builder name, ``"pvt_v2_b0"`` ... ``"pvt_v2_b5"``.
        dropout: backbone ``drop_rate`` (after attention projections and in the MLPs).
        drop_path_rate: backbone stochastic-depth rate.
        pretrained_backbone: path of an official ImageNet PVTv2 checkpoint, see
            :func:`~common.networks.pvt_v2.load_pvt_v2_pretrained`.
        checkpoint: path of a full Polyp-PVT checkpoint (official keys), loaded strictly after
            ``pretrained_backbone``, see :func:`load_polyp_pvt_checkpoint`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        channel: int = 32,
        backbone: str = "pvt_v2_b2",
        dropout: float = 0.0,
        drop_path_rate: float = 0.1,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_pvt_v2(backbone, "PolypPVT", pretrained_backbone, in_chans=in_channels,
                                     drop_rate=dropout, drop_path_rate=drop_path_rate)
        c1, c2, c3, c4 = self.backbone.embed_dims
        self.Translayer2_0 = BasicConv2d(c1, channel, 1)
        self.Translayer2_1 = BasicConv2d(c2, channel, 1)
        self.Translayer3_1 = BasicConv2d(c3, channel, 1)
        self.Translayer4_1 = BasicConv2d(c4, channel, 1)
        self.CFM = CFM(channel)
        self.ca = ChannelAttention(c1)
        self.sa = SpatialAttention()
        self.SAM = SimilarityAggregation(num_in=channel)
        self.down05 = nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=True)
        self.out_SAM = nn.Conv2d(channel, out_channels, 1)
        self.out_CFM = nn.Conv2d(channel, out_channels, 1)
        if checkpoint is not None:
            load_polyp_pvt_checkpoint(self, checkpoint)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"PolypPVT: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}.")
        x1, x2, x3, x4 = self.backbone(x)
        x1 = self.ca(x1) * x1
        cim_feature = self.sa(x1) * x1
        cfm_feature = self.CFM(self.Translayer4_1(x4), self.Translayer3_1(x3), self.Translayer2_1(x2))
        t2 = self.down05(self.Translayer2_0(cim_feature))
        sam_feature = self.SAM(cfm_feature, t2)
        p1 = F.interpolate(self.out_CFM(cfm_feature), scale_factor=8, mode="bilinear")
        p2 = F.interpolate(self.out_SAM(sam_feature), scale_factor=8, mode="bilinear")
        if self.training:
            return p1, p2
        return p1 + p2


def load_polyp_pvt_checkpoint(model: PolypPVT, path: str | os.PathLike) -> None:
    """Strictly load a full Polyp-PVT state dict (official keys; ``{"model"|"state_dict": sd}`` and
    ``module.``-prefixed keys accepted) into ``model`` in place.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded Polyp-PVT weights from '%s' (%d tensors)", path, len(state_dict))
