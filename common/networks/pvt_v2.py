"""Pyramid Vision Transformer v2 ("Impr" variant), features-only backbone.

Reference:
    W. Wang, E. Xie, X. Li, D.-P. Fan, K. Song, D. Liang, T. Lu, P. Luo, L. Shao,
    "PVT v2: Improved Baselines with Pyramid Vision Transformer", Computational Visual Media 8, 2022.

The module and attribute names follow the official implementation, so that the authors' ImageNet
checkpoints (``pvt_v2_b*.pth``) load without key remapping (:func:`load_pvt_v2_pretrained`). The
classes are re-implemented from the paper's equations; nothing is registered in timm's model registry
(``timm.create_model("pvt_v2_b2")`` keeps returning timm's own, differently-keyed, model).

Shapes for an input ``[B, 3, H, W]`` (``H, W`` multiples of 32 keep every stage exact):
stage ``i`` returns ``[B, C_i, H / 2^(i+1), W / 2^(i+1)]``, i.e. strides 4, 8, 16, 32.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import nn

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "OverlapPatchEmbed",
    "DWConv",
    "Attention",
    "Mlp",
    "Block",
    "PyramidVisionTransformerV2",
    "pvt_v2_b0",
    "pvt_v2_b1",
    "pvt_v2_b2",
    "pvt_v2_b3",
    "pvt_v2_b4",
    "pvt_v2_b5",
    "build_pvt_v2",
    "PVT_V2_BUILDERS",
    "read_state_dict",
    "load_state_dict_strict",
    "load_pvt_v2_pretrained",
]

logger = logging.getLogger(__name__)


def _tokens_to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``[B, h*w, C]`` token sequence -> ``[B, C, h, w]`` feature map."""
    b, _, c = x.shape
    return x.transpose(1, 2).reshape(b, c, h, w)


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding (PVTv2 §3.2): a strided convolution with ``padding = k // 2`` then LayerNorm.

    ``tokens = LN(flatten(Conv_{k, s}(x)))``; ``[B, C_in, H, W] -> ([B, H'W', C], H', W')`` with
    ``H' = floor((H + 2 * (k // 2) - k) / s) + 1``. Stage 1 uses ``k=7, s=4``, stages 2-4 ``k=3, s=2``.

    Args:
        patch_size: convolution kernel size ``k``.
        stride: convolution stride ``s``.
        in_chans: input channels.
        embed_dim: output token width ``C``.
    """

    def __init__(self, patch_size: int = 7, stride: int = 4, in_chans: int = 3, embed_dim: int = 768) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=stride, padding=patch_size // 2)
        # the official code keeps nn.LayerNorm's default eps (1e-5) here, unlike the blocks (1e-6)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        x = self.norm(x.flatten(2).transpose(1, 2))
        return x, h, w


class DWConv(nn.Module):
    """Depth-wise 3x3 convolution applied to a token sequence laid out on its ``h x w`` grid.

    ``[B, h*w, C] -> [B, C, h, w] -> DWConv3x3 -> [B, h*w, C]``.
    """

    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return self.dwconv(_tokens_to_grid(x, h, w)).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Spatial-reduction multi-head attention (PVT v1 §3.3; v2 keeps the convolutional reduction).

    With tokens ``X`` on an ``h x w`` grid and reduction ratio ``R``:
    ``SR(X) = LN(Conv_{R x R, stride R}(X))`` (identity when ``R = 1``), ``Q = X W_q``,
    ``[K, V] = SR(X) W_kv`` and per head ``Attn = softmax(Q K^T / sqrt(d_head)) V``; the heads are
    concatenated and projected, ``out = Attn W_proj``. ``[B, h*w, C] -> [B, h*w, C]``; the keys and
    values have ``h*w / R^2`` tokens. Implemented with :func:`torch.nn.functional.scaled_dot_product_attention`.

    Args:
        dim: token width ``C`` (divisible by ``num_heads``).
        num_heads: number of heads.
        qkv_bias: bias on the ``q`` and ``kv`` projections.
        attn_drop: dropout probability on the attention weights (training only).
        proj_drop: dropout probability after the output projection.
        sr_ratio: spatial-reduction ratio ``R``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"Attention: dim ({dim}) must be divisible by num_heads ({num_heads}).")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            # default eps (1e-5), as in the official code
            self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        b, n, c = x.shape
        head_dim = c // self.num_heads
        q = self.q(x).reshape(b, n, self.num_heads, head_dim).transpose(1, 2)
        if self.sr_ratio > 1:
            x = self.norm(self.sr(_tokens_to_grid(x, h, w)).flatten(2).transpose(1, 2))
        k, v = self.kv(x).reshape(b, -1, 2, self.num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )
        x = x.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Convolutional feed-forward network of PVTv2 (§3.3): ``fc2(drop(GELU(DWConv(fc1(x)))))`` then dropout.

    ``[B, h*w, C] -> [B, h*w, C]`` through a hidden width ``C * mlp_ratio``.

    Args:
        in_features: token width ``C``.
        hidden_features: hidden width (default ``in_features``).
        out_features: output width (default ``in_features``).
        drop: dropout probability after the activation and after ``fc2``.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: int | None = None,
        out_features: int | None = None,
        drop: float = 0.0,
    ) -> None:
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.dwconv = DWConv(hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x), h, w)))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """Pre-norm transformer block: ``x = x + DP(Attn(LN1(x))); x = x + DP(Mlp(LN2(x)))``.

    ``DP`` is stochastic depth (:class:`timm.layers.DropPath`, identity when ``drop_path == 0``).
    ``[B, h*w, C] -> [B, h*w, C]``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
        sr_ratio: int = 1,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads=num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop, sr_ratio=sr_ratio
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


def _init_pvt_weights(m: nn.Module) -> None:
    """Official PVTv2 initialisation.

    Linear: ``W ~ TruncNormal(0, 0.02)``, ``b = 0``; LayerNorm: ``gamma = 1``, ``beta = 0``;
    Conv2d: ``W ~ N(0, sqrt(2 / fan_out))`` with ``fan_out = k_h * k_w * C_out // groups``, ``b = 0``.
    """
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class PyramidVisionTransformerV2(nn.Module):
    """PVTv2 backbone ("Impr" variant used by Polyp-PVT), returning the four stage feature maps.

    Stage ``i`` (1..4): ``tokens, h, w = patch_embed{i}(x)``; ``tokens = block{i}[*](tokens, h, w)``;
    ``x = norm{i}(tokens)`` reshaped to ``[B, C_i, h, w]``. Stochastic depth grows linearly over all
    blocks, ``dpr = linspace(0, drop_path_rate, sum(depths))``. No classification head.

    Input ``[B, in_chans, H, W]``; output a list of 4 tensors
    ``[B, C_1, H/4, W/4], [B, C_2, H/8, W/8], [B, C_3, H/16, W/16], [B, C_4, H/32, W/32]``
    (exact when ``H, W`` are multiples of 32).

    Args:
        in_chans: input image channels.
        embed_dims: stage widths ``C_1..C_4``.
        num_heads: attention heads per stage.
        mlp_ratios: MLP hidden-width ratios per stage.
        qkv_bias: bias on the query/key/value projections.
        drop_rate: dropout after the attention projection and in the MLP.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic depth rate of the last block.
        depths: number of blocks per stage.
        sr_ratios: spatial-reduction ratios per stage.
        norm_eps: eps of the block and stage LayerNorms (the patch-embedding and spatial-reduction
            LayerNorms keep PyTorch's default 1e-5, as in the official code).
    """

    def __init__(
        self,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 256, 512),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        mlp_ratios: Sequence[float] = (4, 4, 4, 4),
        qkv_bias: bool = False,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        depths: Sequence[int] = (3, 4, 6, 3),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        norm_eps: float = 1e-6,
    ) -> None:
        super().__init__()
        stage_args = {
            "embed_dims": embed_dims, "num_heads": num_heads, "mlp_ratios": mlp_ratios, "depths": depths,
            "sr_ratios": sr_ratios,
        }
        for name, value in stage_args.items():
            if len(value) != 4:
                raise ValueError(f"PyramidVisionTransformerV2: {name} must have 4 entries (one per stage), got {value}")
        self.embed_dims = tuple(int(d) for d in embed_dims)
        self.depths = tuple(int(d) for d in depths)
        norm_layer = partial(nn.LayerNorm, eps=norm_eps)
        dpr = torch.linspace(0, drop_path_rate, sum(self.depths), device="cpu").tolist()  # cpu: also under meta
        cur = 0
        for i in range(4):
            patch_embed = OverlapPatchEmbed(
                patch_size=7 if i == 0 else 3,
                stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else self.embed_dims[i - 1],
                embed_dim=self.embed_dims[i],
            )
            blocks = nn.ModuleList(
                Block(
                    dim=self.embed_dims[i],
                    num_heads=num_heads[i],
                    mlp_ratio=mlp_ratios[i],
                    qkv_bias=qkv_bias,
                    drop=drop_rate,
                    attn_drop=attn_drop_rate,
                    drop_path=dpr[cur + j],
                    norm_layer=norm_layer,
                    sr_ratio=sr_ratios[i],
                )
                for j in range(self.depths[i])
            )
            cur += self.depths[i]
            setattr(self, f"patch_embed{i + 1}", patch_embed)
            setattr(self, f"block{i + 1}", blocks)
            setattr(self, f"norm{i + 1}", norm_layer(self.embed_dims[i]))
        self.apply(_init_pvt_weights)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for i in range(1, 5):
            tokens, h, w = getattr(self, f"patch_embed{i}")(x)
            for blk in getattr(self, f"block{i}"):
                tokens = blk(tokens, h, w)
            tokens = getattr(self, f"norm{i}")(tokens)
            x = tokens.reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            outs.append(x)
        return outs


_COMMON = {"num_heads": (1, 2, 5, 8), "qkv_bias": True, "sr_ratios": (8, 4, 2, 1), "norm_eps": 1e-6}
_CONFIGS: dict[str, dict] = {
    "pvt_v2_b0": {"embed_dims": (32, 64, 160, 256), "depths": (2, 2, 2, 2), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b1": {"embed_dims": (64, 128, 320, 512), "depths": (2, 2, 2, 2), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b2": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 6, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b3": {"embed_dims": (64, 128, 320, 512), "depths": (3, 4, 18, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b4": {"embed_dims": (64, 128, 320, 512), "depths": (3, 8, 27, 3), "mlp_ratios": (8, 8, 4, 4)},
    "pvt_v2_b5": {"embed_dims": (64, 128, 320, 512), "depths": (3, 6, 40, 3), "mlp_ratios": (4, 4, 4, 4)},
}


def _build(name: str, **kwargs) -> PyramidVisionTransformerV2:
    """Official configuration ``name`` with ``drop_rate=0``, ``drop_path_rate=0.1``; ``kwargs`` override."""
    cfg = {**_COMMON, **_CONFIGS[name], "drop_rate": 0.0, "drop_path_rate": 0.1, **kwargs}
    return PyramidVisionTransformerV2(**cfg)


def pvt_v2_b0(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b0: dims (32, 64, 160, 256), depths (2, 2, 2, 2), MLP ratios (8, 8, 4, 4)."""
    return _build("pvt_v2_b0", **kwargs)


def pvt_v2_b1(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b1: dims (64, 128, 320, 512), depths (2, 2, 2, 2), MLP ratios (8, 8, 4, 4)."""
    return _build("pvt_v2_b1", **kwargs)


def pvt_v2_b2(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b2: dims (64, 128, 320, 512), depths (3, 4, 6, 3), MLP ratios (8, 8, 4, 4); 24,849,856 parameters."""
    return _build("pvt_v2_b2", **kwargs)


def pvt_v2_b3(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b3: dims (64, 128, 320, 512), depths (3, 4, 18, 3), MLP ratios (8, 8, 4, 4)."""
    return _build("pvt_v2_b3", **kwargs)


def pvt_v2_b4(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b4: dims (64, 128, 320, 512), depths (3, 8, 27, 3), MLP ratios (8, 8, 4, 4)."""
    return _build("pvt_v2_b4", **kwargs)


def pvt_v2_b5(**kwargs) -> PyramidVisionTransformerV2:
    """PVTv2-b5: dims (64, 128, 320, 512), depths (3, 6, 40, 3), MLP ratios (4, 4, 4, 4)."""
    return _build("pvt_v2_b5", **kwargs)


PVT_V2_BUILDERS: dict[str, Callable[..., PyramidVisionTransformerV2]] = {
    "pvt_v2_b0": pvt_v2_b0,
    "pvt_v2_b1": pvt_v2_b1,
    "pvt_v2_b2": pvt_v2_b2,
    "pvt_v2_b3": pvt_v2_b3,
    "pvt_v2_b4": pvt_v2_b4,
    "pvt_v2_b5": pvt_v2_b5,
}


def load_pvt_v2_pretrained(model: PyramidVisionTransformerV2, path: str | os.PathLike) -> None:
    """Load an official ImageNet PVTv2 checkpoint (e.g. ``pvt_v2_b2.pth``) into ``model`` in place.

    The classification head (``head.weight``, ``head.bias``) is dropped; every backbone key must then be
    present with the right shape and no other key may remain.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = {k: v for k, v in read_state_dict(path).items() if not k.startswith("head.")}
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded PVTv2 ImageNet weights from '%s' (%d tensors)", path, len(state_dict))


def build_pvt_v2(
    name: str,
    owner: str,
    pretrained: str | os.PathLike | None = None,
    embed_dims: Sequence[int] | None = None,
    depths: Sequence[int] | None = None,
    **kwargs,
) -> PyramidVisionTransformerV2:
    """The PVTv2 backbone ``name`` of a segmentation network, with its official ImageNet file when given.

    Args:
        name: a key of ``PVT_V2_BUILDERS`` (``pvt_v2_b0`` .. ``pvt_v2_b5``).
        owner: the network asking (named in the error).
        pretrained: official ImageNet checkpoint, see :func:`load_pvt_v2_pretrained`.
        embed_dims, depths: sizes replacing the variant's (tiny test backbones); None keeps the published ones.
        kwargs: other arguments of :class:`PyramidVisionTransformerV2` (``in_chans``, ``drop_path_rate``, ...).

    Raises:
        ValueError: unknown ``name``.
    """
    if name not in PVT_V2_BUILDERS:
        raise ValueError(f"{owner}: unknown backbone '{name}', expected one of {sorted(PVT_V2_BUILDERS)}.")
    sizes = {k: tuple(v) for k, v in (("embed_dims", embed_dims), ("depths", depths)) if v is not None}
    model = PVT_V2_BUILDERS[name](**sizes, **kwargs)
    if pretrained is not None:
        load_pvt_v2_pretrained(model, pretrained)
    return model
