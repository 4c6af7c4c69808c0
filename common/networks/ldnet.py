"""LDNet: polyp segmentation with a lesion-aware dynamic kernel.

Reference:
    R. Zhang, P. Lai, X. Wan, D.-J. Fan, F. Gao, X.-J. Wu, G. Li, "Lesion-Aware Dynamic Kernel for Polyp
    Segmentation", MICCAI 2022 (LNCS 13433, pp. 99-109); arXiv:2301.04904. Official code: ReaFly/LDNet.

Architecture (``B`` batch, ``N`` output channels, ``U`` unified width, ``K`` kernel size, strides in brackets)::

    Res2Net-50 v1b:  e1 [2] (stem, 64 ch), e2..e5 [4, 8, 16, 32] reduced by 1x1 convs to 64/128/256/512 ch
    d5   = Decoder5(e5)                                                     [16]
    W_0  = generate_head(AvgPool(ReLU(GN(e5))))   -> [B, N, U, K, K]       (kernel from the global context)
    P_0  = W_0 * unify5(d5)                                                 [16]   (per-image dynamic conv)
    for t = 1..4 with skip s_t = e4, e3, e2, e1:
        d_t = Decoder_t([LCA(d_{t-1}, P_{t-1}), ESA(s_t)])                  [8, 4, 2, 1]
        F_t = unify_t(d_t)                                                  [B, U, h_t, w_t]
        W_t = KernelUpdate(F_t, W_{t-1}, P_{t-1});   P_t = W_t * F_t
    Decoder block: ConvBNReLU(C -> C/4), ConvBNReLU(C/4 -> C_out), bilinear x2 (align_corners=True).

Dynamic-kernel update (``HeadUpdator`` in the official code), with ``sigma`` the sigmoid, ``LN`` LayerNorm over
the ``U`` features and the linear layers split their ``2U`` outputs into an ``in`` and an ``out`` half::

    M     = sigma(Up_2(P_{t-1}))                           [B, N, h, w]   (bilinear, align_corners=False)
    f     = sum_{h,w} M F_t                                [B*N, U]       (lesion feature, a masked sum)
    p_in, p_out = pred_transform_layer(f)                  [B*N, U] each
    k_in, k_out = head_transform_layer(W_{t-1})            [B*N, K*K, U] each
    g     = k_in * p_in
    W_t   = ReLU(LN(fc(sigma(LN(pred_gate(g))) * LN(p_out) + sigma(LN(head_gate(g))) * LN(k_out))))

Efficient self-attention (ESA) and lesion-aware cross-attention (LCA), ``h`` heads of width ``d`` (inner width
``I = h d``), on ``x [B, C, H, W]`` with tokens ``X [B, HW, C]``::

    Q, K, V = split(Conv1x1(x))                                 [B, I, H, W] each
    ESA: K, V <- [AvgPool_1(.), AvgPool_3(.), AvgPool_5(.)]    [B, I, 35]   (pyramid pooling keys)
    LCA: K, V <- sum_{hw} sigma(P) K / (sum_{hw} sigma(P) + 5e-4)   [B, I, 1] (lesion-masked average)
    A   = softmax(Q K^T / sqrt(d)) V -> to_out (Linear I -> C)  [B, HW, C]
    Y   = X + A;   out = Y + MLP(LN(Y))                          (MLP: C -> 512 -> C, GELU)

With a single pooled key, the LCA softmax is identically 1, so every pixel receives ``to_out`` of the lesion-averaged
value; the query/key projections are kept (and get zero gradients) exactly as in the official code.

Outputs: the official network returns ``sigmoid`` of the five predictions ``(P_4, P_3, P_2, P_1, P_0)`` at strides
1, 2, 4, 8, 16; its loss is BCE + Dice of each against the mask downsampled (bilinear, ``align_corners=True``) to
that size, summed with equal weights, and its test thresholds ``sigmoid(P_4) >= 0.5``. Here ``forward`` returns
**logits**: in training mode the five maps ``(P_4, Up(P_3), Up(P_2), Up(P_1), Up(P_0))``, the coarse ones
upsampled bilinearly (``align_corners=False``) to the input size so that the bundle supervises every one at full
resolution (instead of downsampling the mask) with the bundle's structure loss (instead of BCE + Dice); in eval
mode the single map ``P_4`` ``[B, N, H, W]``.

Differences from the official code, none of which changes the state dict or the thresholded eval mask:
    * the per-image kernel is applied as one batched ``unfold`` + ``einsum`` instead of a Python loop of
      ``conv2d`` over the batch (same result, traceable for any batch size);
    * the logits are returned instead of their sigmoid (the bundle's structure loss and evaluators take logits);
    * built without ImageNet weights, the backbone is initialised as the official Res2Net (last BatchNorm of each
      block at weight 1, where timm's builder puts 0);
    * the size arguments (decoder widths, attention heads, backbone depth) exist so that a tiny instance runs in
      tests; the defaults are the published network (33,375,608 parameters: Res2Net-50 v1b without its ``fc``,
      23,669,352, plus 9,706,256 for the decoder, attention blocks and dynamic heads).

Module names follow the official code so that its checkpoints load strictly, including the aliases
``decoderList``, ``unifyList``, ``esaList`` and ``lcaList`` (the same modules registered a second time, so their
weights appear twice in the state dict) and the spelling ``gobal_average_pool``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.res2net import res2net50_v1b
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "ConvBlock",
    "DecoderBlock",
    "PyramidPooling",
    "PreNormMLP",
    "EfficientSelfAttention",
    "EfficientSelfAttentionBlock",
    "lesion_masked_average",
    "LesionCrossAttention",
    "LesionCrossAttentionBlock",
    "KernelUpdater",
    "dynamic_kernel_conv",
    "LDNet",
    "load_ldnet_checkpoint",
]

logger = logging.getLogger(__name__)

MASK_POOL_EPS = 5e-4  # added to the lesion area in the masked average (official value)


class ConvBlock(nn.Module):
    """``ReLU(BN(Conv(x)))`` with a biased convolution. ``[B, C_in, H, W] -> [B, C_out, H', W']``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self.bn = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class DecoderBlock(nn.Module):
    """Two 3x3 :class:`ConvBlock` (``C -> C/4 -> C_out``) and a x2 bilinear upsampling (``align_corners=True``).

    ``[B, C, H, W] -> [B, C_out, 2H, 2W]``.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if in_channels < 4:
            raise ValueError(f"DecoderBlock: in_channels must be >= 4 (it is divided by 4), got {in_channels}.")
        self.conv1 = ConvBlock(in_channels, in_channels // 4)
        self.conv2 = ConvBlock(in_channels // 4, out_channels)
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.conv2(self.conv1(x)))


class PyramidPooling(nn.Module):
    """Adaptive average pooling to ``s x s`` for each ``s`` of ``sizes``, flattened and concatenated.

    ``[B, C, H, W] -> [B, C, sum(s^2)]`` (35 positions for the default sizes 1, 3, 5).
    """

    def __init__(self, sizes: Sequence[int] = (1, 3, 5)) -> None:
        super().__init__()
        self.layer = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in sizes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool(x).flatten(2) for pool in self.layer], dim=-1)


class _FeedForward(nn.Module):
    """``Linear(C, hidden) -> GELU -> Dropout -> Linear(hidden, C) -> Dropout`` on tokens ``[B, L, C]``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden_dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PreNormMLP(nn.Module):
    """``MLP(LN(x))`` on tokens ``[B, L, C]`` (official ``PreNorm(dim, FeedForward(dim, hidden))``)."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fn = _FeedForward(dim, hidden_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(self.norm(x))


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, h*d, L] -> [B, h, L, d]`` (channel ``c = head * d + j``)."""
    b, inner, length = t.shape
    return t.reshape(b, heads, inner // heads, length).transpose(-1, -2)


class _PooledKeyAttention(nn.Module):
    """Multi-head attention of every pixel's query over keys/values pooled from the same map.

    Subclasses define ``_pool(k_or_v, *context) -> [B, I, L]``. ``[B, C, H, W] -> [B, HW, C]``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.attend = nn.Softmax(dim=-1)
        self.to_qkv = nn.Conv2d(dim, 3 * inner, kernel_size=1, bias=False)
        project_out = not (heads == 1 and dim_head == dim)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(dropout)) if project_out else nn.Identity()

    def _attend(self, x: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=1)
        q = _split_heads(q.flatten(2), self.heads)  # [B, h, HW, d]
        k = _split_heads(self._pool(k, *context), self.heads)  # [B, h, L, d]
        v = _split_heads(self._pool(v, *context), self.heads)
        attn = self.attend(q @ k.transpose(-1, -2) * self.scale)  # [B, h, HW, L]
        out = (attn @ v).transpose(1, 2).flatten(2)  # [B, HW, h*d]
        return self.to_out(out)

    def _pool(self, t: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class EfficientSelfAttention(_PooledKeyAttention):
    """ESA: queries at every pixel, keys and values pyramid-pooled to 1x1, 3x3 and 5x5 (35 tokens).

    ``x [B, C, H, W] -> [B, HW, C]``.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, dropout: float = 0.0) -> None:
        super().__init__(dim, heads, dim_head, dropout)
        self.ppm = PyramidPooling((1, 3, 5))

    def _pool(self, t: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return self.ppm(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._attend(x)


def lesion_masked_average(x: torch.Tensor, mask_logits: torch.Tensor, eps: float = MASK_POOL_EPS) -> torch.Tensor:
    """Average of ``x [B, C, H, W]`` weighted by ``m = sigmoid(mask_logits) [B, 1, H, W]``.

    ``sum_hw(m x) / (sum_hw(m) + eps)`` as ``[B, C, 1]``.
    """
    m = torch.sigmoid(mask_logits)
    area = m.sum(dim=(2, 3)) + eps  # [B, 1]
    return ((x * m).sum(dim=(2, 3)) / area).unsqueeze(-1)


class LesionCrossAttention(_PooledKeyAttention):
    """LCA: queries at every pixel, one key/value token: the lesion-masked average of the key/value maps.

    ``x [B, C, H, W]``, ``mask_logits [B, 1, H, W]`` (the current prediction) ``-> [B, HW, C]``.
    """

    def _pool(self, t: torch.Tensor, *context: torch.Tensor) -> torch.Tensor:
        return lesion_masked_average(t, context[0])

    def forward(self, x: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        return self._attend(x, mask_logits)


def _tokens(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W] -> [B, HW, C]``."""
    return x.flatten(2).transpose(1, 2)


def _to_map(tokens: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``[B, HW, C] -> [B, C, H, W]`` with the spatial size of ``like``."""
    return tokens.transpose(1, 2).reshape(like.shape)


class EfficientSelfAttentionBlock(nn.Module):
    """``Y = X + ESA(x)``, ``out = Y + MLP(LN(Y))``; ``[B, C, H, W] -> [B, C, H, W]``.

    Args:
        dim: channels ``C``.
        heads, dim_head: attention heads and their width.
        mlp_dim: hidden width of the MLP.
        dropout: dropout after the attention projection and in the MLP.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, mlp_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.ESAlayer = EfficientSelfAttention(dim, heads, dim_head, dropout)
        self.ff = PreNormMLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _tokens(x) + self.ESAlayer(x)
        return _to_map(y + self.ff(y), x)


class LesionCrossAttentionBlock(nn.Module):
    """``Y = X + LCA(x, P)``, ``out = Y + MLP(LN(Y))``; ``[B, C, H, W], [B, 1, H, W] -> [B, C, H, W]``.

    Args: as :class:`EfficientSelfAttentionBlock`.
    """

    def __init__(self, dim: int, heads: int = 8, dim_head: int = 64, mlp_dim: int = 512,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.LCAlayer = LesionCrossAttention(dim, heads, dim_head, dropout)
        self.ff = PreNormMLP(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        y = _tokens(x) + self.LCAlayer(x, mask_logits)
        return _to_map(y + self.ff(y), x)


class KernelUpdater(nn.Module):
    """Update of the dynamic segmentation kernel from the lesion feature of the previous prediction.

    See the module docstring for the equations. Inputs: ``feat [B, U, h, w]``, ``kernel [B, N, U, K, K]``,
    ``pred [B, N, h/2, w/2]`` (logits of the previous stage); output: the new kernel ``[B, N, U, K, K]``.

    Args:
        channels: the unified feature width ``U`` (the kernel's input channels).
        kernel_size: ``K``.
    """

    def __init__(self, channels: int = 64, kernel_size: int = 1) -> None:
        super().__init__()
        self.channels = channels
        self.kernel_size = kernel_size
        self.upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.pred_transform_layer = nn.Linear(channels, 2 * channels)
        self.head_transform_layer = nn.Linear(channels, 2 * channels)
        self.pred_gate = nn.Linear(channels, channels)
        self.head_gate = nn.Linear(channels, channels)
        self.pred_norm_in = nn.LayerNorm(channels)
        self.head_norm_in = nn.LayerNorm(channels)
        self.pred_norm_out = nn.LayerNorm(channels)
        self.head_norm_out = nn.LayerNorm(channels)
        self.fc_layer = nn.Linear(channels, channels)
        self.fc_norm = nn.LayerNorm(channels)
        self.activation = nn.ReLU(inplace=True)

    def forward(self, feat: torch.Tensor, kernel: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        u, kk = self.channels, self.kernel_size * self.kernel_size
        mask = torch.sigmoid(self.upsample(pred))  # [B, N, h, w]
        lesion = torch.einsum("bnhw,bchw->bnc", mask, feat).reshape(-1, u)  # [B*N, U]
        head = kernel.flatten(3).transpose(-1, -2).reshape(-1, kk, u)  # [B*N, K*K, U]
        pred_feat = self.pred_transform_layer(lesion)
        pred_in, pred_out = pred_feat[:, :u], pred_feat[:, u:]
        head_feat = self.head_transform_layer(head)
        head_in, head_out = head_feat[..., :u], head_feat[..., u:]
        gate = head_in * pred_in.unsqueeze(1)  # [B*N, K*K, U]
        pred_gate = torch.sigmoid(self.pred_norm_in(self.pred_gate(gate)))
        head_gate = torch.sigmoid(self.head_norm_in(self.head_gate(gate)))
        update = pred_gate * self.pred_norm_out(pred_out).unsqueeze(1) + head_gate * self.head_norm_out(head_out)
        update = self.activation(self.fc_norm(self.fc_layer(update)))  # [B*N, K*K, U]
        return update.transpose(-1, -2).reshape(kernel.shape)


def dynamic_kernel_conv(feat: torch.Tensor, kernel: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Convolve each image with its own kernel (zero padding ``K // 2``, stride 1, no bias).

    ``feat [B, C, H, W]``, ``kernel [B, N, C, K, K]`` with ``K = kernel_size`` (odd, an ``int`` so that the
    function traces) ``-> [B, N, H, W]``; the same as ``conv2d(feat[b:b+1], kernel[b])`` for every ``b``.
    """
    cols = F.unfold(feat, kernel_size=kernel_size, padding=kernel_size // 2)  # [B, C*K*K, H*W]
    out = torch.einsum("bnl,blp->bnp", kernel.flatten(2), cols)  # [B, N, H*W]
    return out.unflatten(-1, feat.shape[-2:])


class LDNet(nn.Module):
    """LDNet (Zhang et al., MICCAI 2022): Res2Net-50 v1b U-Net with ESA/LCA skips and a dynamic-kernel head.

    Return convention (as MONAI's ``DynUNet`` with deep supervision): in **training** mode ``forward`` returns the
    tuple of the five prediction logits, finest first, each ``[B, N, H, W]`` (the four coarse ones upsampled
    bilinearly); in **eval** mode the single full-resolution logit map ``[B, N, H, W]`` that the official test
    thresholds after the sigmoid. ``H`` and ``W`` must be multiples of 32.

    Args:
        out_channels: ``N``, the output logit channels (official ``num_classes``; 1 for polyps).
        unified_channels: ``U``, the width the decoder features are projected to before the dynamic kernel.
        conv_kernel_size: ``K``, the spatial size of the dynamic kernel (odd).
        decoder_channels: output widths of decoder blocks 1..5; entries 2..5 are also the widths the four
            backbone stages are reduced to (official 64, 64, 128, 256, 512).
        heads, dim_head, mlp_dim: ESA/LCA heads, head width and MLP hidden width (official 8, 64, 512).
        gn_groups: groups of the GroupNorm before the global pooling (must divide ``decoder_channels[4]``).
        backbone_layers, backbone_channels, stem_width: the Res2Net-50 v1b architecture, see
            :func:`~common.networks.res2net.res2net50_v1b` (defaults: the published backbone).
        pretrained_backbone: official ImageNet file ``res2net50_v1b_26w_4s-3cf99910.pth``, loaded strictly into
            the full Res2Net whose ``fc`` is then dropped, as the official code does.
        checkpoint: a full LDNet state dict (official keys), loaded strictly after ``pretrained_backbone``,
            see :func:`load_ldnet_checkpoint`.
    """

    def __init__(
        self,
        out_channels: int = 1,
        unified_channels: int = 64,
        conv_kernel_size: int = 1,
        decoder_channels: Sequence[int] = (64, 64, 128, 256, 512),
        heads: int = 8,
        dim_head: int = 64,
        mlp_dim: int = 512,
        gn_groups: int = 16,
        backbone_layers: Sequence[int] = (3, 4, 6, 3),
        backbone_channels: Sequence[int] = (64, 128, 256, 512),
        stem_width: int = 32,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if len(decoder_channels) != 5:
            raise ValueError(f"LDNet: decoder_channels needs 5 widths, got {list(decoder_channels)}.")
        if conv_kernel_size % 2 != 1:
            raise ValueError(f"LDNet: conv_kernel_size must be odd, got {conv_kernel_size}.")
        self.num_classes = out_channels
        self.unified_channels = unified_channels
        self.conv_kernel_size = conv_kernel_size
        self._build_encoder(backbone_layers, backbone_channels, stem_width, pretrained_backbone)
        stem_ch = self.encoder1_bn.num_features
        stage_ch = [layer[-1].bn3.num_features for layer in (self.encoder2, self.encoder3, self.encoder4,
                                                               self.encoder5)]
        c1, c2, c3, c4, c5 = decoder_channels
        self.reduce2 = nn.Conv2d(stage_ch[0], c2, 1)
        self.reduce3 = nn.Conv2d(stage_ch[1], c3, 1)
        self.reduce4 = nn.Conv2d(stage_ch[2], c4, 1)
        self.reduce5 = nn.Conv2d(stage_ch[3], c5, 1)
        self.decoder5 = DecoderBlock(c5, c5)
        self.decoder4 = DecoderBlock(c5 + c4, c4)
        self.decoder3 = DecoderBlock(c4 + c3, c3)
        self.decoder2 = DecoderBlock(c3 + c2, c2)
        self.decoder1 = DecoderBlock(c2 + stem_ch, c1)
        self.gobal_average_pool = nn.Sequential(nn.GroupNorm(gn_groups, c5), nn.ReLU(inplace=True),
                                                nn.AdaptiveAvgPool2d(1))
        self.generate_head = nn.Linear(c5, out_channels * unified_channels * conv_kernel_size ** 2)
        self.headUpdators = nn.ModuleList(KernelUpdater(unified_channels, conv_kernel_size) for _ in range(4))
        self.unify1 = nn.Conv2d(c1, unified_channels, 1)
        self.unify2 = nn.Conv2d(c2, unified_channels, 1)
        self.unify3 = nn.Conv2d(c3, unified_channels, 1)
        self.unify4 = nn.Conv2d(c4, unified_channels, 1)
        self.unify5 = nn.Conv2d(c5, unified_channels, 1)
        attn = {"heads": heads, "dim_head": dim_head, "mlp_dim": mlp_dim}
        self.esa1 = EfficientSelfAttentionBlock(stem_ch, **attn)
        self.esa2 = EfficientSelfAttentionBlock(c2, **attn)
        self.esa3 = EfficientSelfAttentionBlock(c3, **attn)
        self.esa4 = EfficientSelfAttentionBlock(c4, **attn)
        self.lca1 = LesionCrossAttentionBlock(c2, **attn)
        self.lca2 = LesionCrossAttentionBlock(c3, **attn)
        self.lca3 = LesionCrossAttentionBlock(c4, **attn)
        self.lca4 = LesionCrossAttentionBlock(c5, **attn)
        # the official network registers its per-stage modules a second time, coarse to fine
        self.decoderList = nn.ModuleList([self.decoder4, self.decoder3, self.decoder2, self.decoder1])
        self.unifyList = nn.ModuleList([self.unify4, self.unify3, self.unify2, self.unify1])
        self.esaList = nn.ModuleList([self.esa4, self.esa3, self.esa2, self.esa1])
        self.lcaList = nn.ModuleList([self.lca4, self.lca3, self.lca2, self.lca1])
        if checkpoint is not None:
            load_ldnet_checkpoint(self, checkpoint)

    def _build_encoder(self, layers: Sequence[int], channels: Sequence[int], stem_width: int,
                       pretrained: str | os.PathLike | None) -> None:
        """Take the stem and the four stages of a Res2Net-50 v1b (its ImageNet ``fc`` is discarded)."""
        res2net = res2net50_v1b(pretrained_path=pretrained, layers=layers, channels=channels, stem_width=stem_width)
        self.encoder1_conv = res2net.conv1
        self.encoder1_bn = res2net.bn1
        self.encoder1_relu = res2net.act1
        self.maxpool = res2net.maxpool
        self.encoder2 = res2net.layer1
        self.encoder3 = res2net.layer2
        self.encoder4 = res2net.layer3
        self.encoder5 = res2net.layer4

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Skips ``[e4, e3, e2, e1]`` (reduced, coarse to fine) and the reduced deepest map ``e5``."""
        e1 = self.encoder1_relu(self.encoder1_bn(self.encoder1_conv(x)))  # stride 2
        e2 = self.encoder2(self.maxpool(e1))
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        e5 = self.encoder5(e4)
        return [self.reduce4(e4), self.reduce3(e3), self.reduce2(e2), e1], self.reduce5(e5)

    def _initial_kernel(self, e5: torch.Tensor) -> torch.Tensor:
        """``W_0 = generate_head(global context)`` as ``[B, N, U, K, K]``."""
        context = self.gobal_average_pool(e5).flatten(1)
        k = self.conv_kernel_size
        return self.generate_head(context).reshape(-1, self.num_classes, self.unified_channels, k, k)

    def _predictions(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five prediction logits, finest first: strides 1, 2, 4, 8, 16."""
        skips, e5 = self._encode(x)
        d = self.decoder5(e5)
        kernel = self._initial_kernel(e5)
        pred = dynamic_kernel_conv(self.unify5(d), kernel, self.conv_kernel_size)
        preds = [pred]
        for skip, esa, lca, decoder, unify, updater in zip(skips, self.esaList, self.lcaList, self.decoderList,
                                                           self.unifyList, self.headUpdators):
            d = decoder(torch.cat([lca(d, pred), esa(skip)], dim=1))
            feat = unify(d)
            kernel = updater(feat, kernel, pred)
            pred = dynamic_kernel_conv(feat, kernel, self.conv_kernel_size)
            preds.append(pred)
        return preds[::-1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"LDNet: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}.")
        preds = self._predictions(x)
        if not self.training:
            return preds[0]
        size = x.shape[-2:]
        return (preds[0], *(F.interpolate(p, size=size, mode="bilinear", align_corners=False) for p in preds[1:]))


def load_ldnet_checkpoint(model: LDNet, path: str | os.PathLike) -> None:
    """Strictly load a full LDNet state dict (official keys; ``{"model"|"state_dict": sd}`` and ``module.``-prefixed
    keys accepted) into ``model`` in place.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded LDNet weights from '%s' (%d tensors)", path, len(state_dict))
