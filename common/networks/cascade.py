"""PVT-CASCADE ("Polyp-CASCADE"): a PVTv2 encoder with the CASCaded Attention DEcoder.

Reference:
    M. M. Rahman, R. Marculescu, "Medical Image Segmentation via Cascaded Attention Decoding",
    IEEE/CVF Winter Conference on Applications of Computer Vision (WACV), 2023, pp. 6222-6231.
    Official code: SLDGroup/CASCADE (``lib/networks.py: PVT_CASCADE``, ``lib/decoders.py: CASCADE``).

Architecture. A PVTv2-b2 backbone gives ``x1..x4`` with ``C = (64, 128, 320, 512)`` channels at strides
4, 8, 16, 32. The decoder runs from the deepest map up with the reversed widths ``c4..c1 = (512, 320, 128, 64)``::

    d4 = CAM4(Conv_1x1(x4))                                        # [B, c4, H/32, W/32]
    for i = 3, 2, 1 (skip s = x_i, [B, c_i, H/2^(i+1), W/2^(i+1)]):
        u     = UCB_i(d_{i+1})                                    # [B, c_i, 2h, 2w]
        d_i   = CAM_i(cat[AG_i(g=u, x=s), u])                      # [B, 2 c_i, .] -> [B, c_i, .]
    P_k = Up(out_head_k(d_k))                                      # four [B, out, H, W] logit maps

Distinctive modules (``h, w`` the map size, ``U_2`` nearest x2 upsampling, ``BN`` batch norm)::

    UCB(d)      = ReLU(BN(Conv3x3(U_2 d)))                         # [B, C, h, w] -> [B, C', 2h, 2w]
    AG(g, x)    = x * sigmoid(BN(Conv1x1(ReLU(BN(W_g g) + BN(W_x x)))))   # g, x [B, F, h, w] -> [B, F, h, w]
                  with W_g, W_x 1x1 convolutions F -> F_int; the gate is one map [B, 1, h, w]
    CAM(d)      = ConvBlock(SA(d') * d'),  d' = CA(d) * d          # [B, C, h, w] -> [B, C', h, w]
    CA(d)       = sigmoid(fc2(ReLU(fc1(AvgPool d))) + fc2(ReLU(fc1(MaxPool d))))   # [B, C, 1, 1], fc1: C -> C/16
    SA(d)       = sigmoid(Conv7x7([mean_c d, max_c d]))            # [B, 1, h, w]; ONE SA shared by all four CAMs
    ConvBlock   = (Conv3x3 -> BN -> ReLU) x 2

``F_int`` is ``c_{i-1}`` for AG3 and AG2 and 32 for AG1, as in the official decoder.

Outputs. The official polyp training (``train_polyp.py``) supervises all four heads with the same structure
loss, equal weights; the official test (``test_polyp.py``) thresholds ``sigmoid(P1 + P2 + P3 + P4)``. Here,
**training** mode returns ``(P1, P2, P3, P4)`` (deepest first) and **eval** mode returns ``P1 + P2 + P3 + P4``.
Each head is upsampled bilinearly (``align_corners=False``) by its stride (32, 16, 8, 4).

Difference from the original: ``PVT_CASCADE`` builds a 1 -> 3 channel adapter ``conv`` (1x1 convolution, BN,
ReLU) applied only to grayscale inputs. Polyp images are RGB, so the adapter never runs; under
DistributedDataParallel its 12 parameters would get no gradient. It is left out, and
:func:`load_pvt_cascade_checkpoint` drops the ``conv.*`` entries of official checkpoints (as the backbone loader
drops the ImageNet ``head.*``). Every other state-dict key is the official one (``backbone.*``,
``decoder.Conv_1x1``, ``decoder.ConvBlock4``, ``decoder.Up3``, ``decoder.AG3``, ..., ``decoder.CA4``,
``decoder.SA``, ``out_head1`` .. ``out_head4``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .polyp_pvt import ChannelAttention, SpatialAttention
from .pvt_v2 import build_pvt_v2, load_state_dict_strict, read_state_dict

__all__ = [
    "ConvBlock",
    "UpConvBlock",
    "AttentionGate",
    "convolutional_attention",
    "CascadeDecoder",
    "PVTCascade",
    "load_pvt_cascade_checkpoint",
]

logger = logging.getLogger(__name__)

# width F_int of the first-stage (highest-resolution) attention gate, fixed in the official decoder
_AG1_INTER_CHANNELS = 32
# key prefix of the official grayscale -> RGB adapter, absent here (see the module docstring)
_GRAYSCALE_ADAPTER_PREFIX = "conv."


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    """``[Conv (with bias, 'same' padding), BN]``, the unit every CASCADE block is built from."""
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=True),
        nn.BatchNorm2d(out_channels),
    ]


class ConvBlock(nn.Module):
    """Two ``Conv3x3 -> BN -> ReLU`` layers: ``[B, C_in, h, w] -> [B, C_out, h, w]``.

    Official name ``conv_block``; the layers sit in ``conv`` at indices 0, 1 (first conv, BN) and 3, 4 (second).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3), nn.ReLU(inplace=True),
            *_conv_bn(out_channels, out_channels, 3), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpConvBlock(nn.Module):
    """Up-convolution block (UCB): ``ReLU(BN(Conv3x3(U_2 x)))`` with nearest-neighbour x2 upsampling ``U_2``.

    ``[B, C_in, h, w] -> [B, C_out, 2h, 2w]``. Official name ``up_conv``; layers in ``up`` (0: upsample, 1: conv,
    2: BN, 3: ReLU).
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="nearest"), *_conv_bn(in_channels, out_channels, 3), nn.ReLU(inplace=True)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class AttentionGate(nn.Module):
    """Additive attention gate (AG, Oktay et al., "Attention U-Net", 2018) on a skip connection.

    ``q = ReLU(BN(W_g g) + BN(W_x x))``, ``alpha = sigmoid(BN(psi q))``, output ``x * alpha``, with 1x1
    convolutions ``W_g: F_g -> F_int``, ``W_x: F_l -> F_int``, ``psi: F_int -> 1``.
    ``g [B, F_g, h, w]`` (the upsampled decoder feature), ``x [B, F_l, h, w]`` (the skip) ``-> [B, F_l, h, w]``.

    Args:
        gate_channels: ``F_g``.
        skip_channels: ``F_l``.
        inter_channels: ``F_int``.
    """

    def __init__(self, gate_channels: int, skip_channels: int, inter_channels: int) -> None:
        super().__init__()
        self.W_g = nn.Sequential(*_conv_bn(gate_channels, inter_channels, 1))
        self.W_x = nn.Sequential(*_conv_bn(skip_channels, inter_channels, 1))
        self.psi = nn.Sequential(*_conv_bn(inter_channels, 1, 1), nn.Sigmoid())
        self.relu = nn.ReLU()

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return x * self.psi(self.relu(self.W_g(g) + self.W_x(x)))


def convolutional_attention(
    x: torch.Tensor, channel_attention: nn.Module, spatial_attention: nn.Module, block: nn.Module
) -> torch.Tensor:
    """Convolutional attention module (CAM): ``block(SA(x') * x')`` with ``x' = CA(x) * x``.

    ``x [B, C, h, w]``; ``CA(x) [B, C, 1, 1]``, ``SA(x') [B, 1, h, w]``; returns ``block``'s output
    ``[B, C', h, w]``. A function rather than a module: the official decoder keeps ``CA*``, one shared ``SA`` and
    ``ConvBlock*`` as separate attributes, and their state-dict keys are kept.
    """
    x = channel_attention(x) * x
    return block(spatial_attention(x) * x)


class CascadeDecoder(nn.Module):
    """The CASCADE decoder over four encoder maps (official ``CASCADE``), see the module docstring.

    Args:
        channels: decoder widths from the deepest stage up, ``(c4, c3, c2, c1)``, equal to the encoder widths
            reversed (``(512, 320, 128, 64)`` for PVTv2-b2). ``c4`` and ``2 * c_i`` must be >= 16 (CA ratio).

    ``forward(x4, skips=(x3, x2, x1))`` with ``x4 [B, c4, h, w]`` and ``x_i [B, c_i, h * 2^(4-i), w * 2^(4-i)]``
    returns ``(d4, d3, d2, d1)``, ``d_i [B, c_i, ...]`` at the resolution of ``x_i``.
    """

    def __init__(self, channels: Sequence[int] = (512, 320, 128, 64)) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError(f"CascadeDecoder: channels must have 4 entries (deepest first), got {channels}.")
        c4, c3, c2, c1 = (int(c) for c in channels)
        self.Conv_1x1 = nn.Conv2d(c4, c4, kernel_size=1)
        self.ConvBlock4 = ConvBlock(c4, c4)
        self.Up3 = UpConvBlock(c4, c3)
        self.AG3 = AttentionGate(c3, c3, c2)
        self.ConvBlock3 = ConvBlock(2 * c3, c3)
        self.Up2 = UpConvBlock(c3, c2)
        self.AG2 = AttentionGate(c2, c2, c1)
        self.ConvBlock2 = ConvBlock(2 * c2, c2)
        self.Up1 = UpConvBlock(c2, c1)
        self.AG1 = AttentionGate(c1, c1, _AG1_INTER_CHANNELS)
        self.ConvBlock1 = ConvBlock(2 * c1, c1)
        self.CA4 = ChannelAttention(c4)
        self.CA3 = ChannelAttention(2 * c3)
        self.CA2 = ChannelAttention(2 * c2)
        self.CA1 = ChannelAttention(2 * c1)
        self.SA = SpatialAttention()

    def _stage(self, d: torch.Tensor, skip: torch.Tensor, i: int) -> torch.Tensor:
        """UCB_i, AG_i on the skip, concatenation ``[gated skip, upsampled]`` and CAM_i."""
        up = getattr(self, f"Up{i}")(d)
        gated = getattr(self, f"AG{i}")(g=up, x=skip)
        return convolutional_attention(
            torch.cat([gated, up], dim=1), getattr(self, f"CA{i}"), self.SA, getattr(self, f"ConvBlock{i}")
        )

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        d4 = convolutional_attention(self.Conv_1x1(x), self.CA4, self.SA, self.ConvBlock4)
        d3 = self._stage(d4, skips[0], 3)
        d2 = self._stage(d3, skips[1], 2)
        d1 = self._stage(d2, skips[2], 1)
        return d4, d3, d2, d1


class PVTCascade(nn.Module):
    """PVT-CASCADE (Rahman & Marculescu, WACV 2023) for polyp segmentation: PVTv2 encoder, CASCADE decoder,
    four prediction heads (see the module docstring for the equations).

    Input ``[B, 3, H, W]`` (ImageNet-normalised, ``H`` and ``W`` multiples of 32). Training mode returns the tuple
    ``(P1, P2, P3, P4)`` of logit maps ``[B, out_channels, H, W]`` from the stride-32, 16, 8 and 4 heads; eval
    mode returns their sum ``P1 + P2 + P3 + P4`` (what the official test thresholds after a sigmoid).

    Args:
        out_channels: logit channels (1 for binary polyp segmentation).
        backbone: PVTv2 builder name, ``"pvt_v2_b0"`` ... ``"pvt_v2_b5"``.
        embed_dims: override of the backbone stage widths (divisible by the heads ``(1, 2, 5, 8)``); the decoder
            takes them reversed. ``None``: the builder's (``(64, 128, 320, 512)`` for b2).
        depths: override of the backbone blocks per stage; ``None``: the builder's (``(3, 4, 6, 3)`` for b2).
        drop_path_rate: backbone stochastic-depth rate (0.1 in the official ``pvt_v2_b2``).
        pretrained_backbone: path of an official ImageNet PVTv2 checkpoint (``head.*`` dropped, the rest
            loaded strictly), see :func:`~common.networks.pvt_v2.load_pvt_v2_pretrained`.
        checkpoint: path of a full PVT-CASCADE checkpoint in the official key format, loaded strictly after
            ``pretrained_backbone``, see :func:`load_pvt_cascade_checkpoint`.
    """

    def __init__(
        self,
        out_channels: int = 1,
        backbone: str = "pvt_v2_b2",
        embed_dims: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        drop_path_rate: float = 0.1,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        self.backbone = build_pvt_v2(backbone, "PVTCascade", pretrained_backbone, embed_dims, depths,
                                     drop_path_rate=drop_path_rate)
        widths = tuple(reversed(self.backbone.embed_dims))  # (c4, c3, c2, c1)
        self.decoder = CascadeDecoder(widths)
        for k, width in enumerate(widths, start=1):
            setattr(self, f"out_head{k}", nn.Conv2d(width, out_channels, kernel_size=1))
        if checkpoint is not None:
            load_pvt_cascade_checkpoint(self, checkpoint)

    def side_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The four head logits ``(P1, P2, P3, P4)``, each ``[B, out_channels, H, W]``, deepest first."""
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(
                f"PVTCascade: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}."
            )
        x1, x2, x3, x4 = self.backbone(x)
        decoded = self.decoder(x4, (x3, x2, x1))
        return tuple(
            F.interpolate(getattr(self, f"out_head{k}")(d), scale_factor=stride, mode="bilinear")
            for k, (d, stride) in enumerate(zip(decoded, (32, 16, 8, 4)), start=1)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        p1, p2, p3, p4 = self.side_outputs(x)
        if self.training:
            return p1, p2, p3, p4
        return p1 + p2 + p3 + p4


def load_pvt_cascade_checkpoint(model: PVTCascade, path: str | os.PathLike) -> None:
    """Strictly load a full PVT-CASCADE state dict (official keys; ``{"model"|"state_dict": sd}`` wrappers and
    ``module.`` prefixes accepted) into ``model`` in place.

    The official grayscale adapter's entries (``conv.0.*``, ``conv.1.*``) are dropped first: that layer only
    runs on 1-channel inputs and is not part of this network. Every other key must match exactly.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    adapter = [k for k in state_dict if k.startswith(_GRAYSCALE_ADAPTER_PREFIX)]
    for key in adapter:
        del state_dict[key]
    load_state_dict_strict(model, state_dict, path)
    logger.info(
        "loaded PVT-CASCADE weights from '%s' (%d tensors; %d grayscale-adapter entries dropped)",
        path, len(state_dict), len(adapter),
    )
