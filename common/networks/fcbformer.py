"""FCBFormer: a PVTv2 transformer branch and a full-resolution fully convolutional branch, fused by a head.

Reference:
    E. Sanderson, B. J. Matuszewski, "FCN-Transformer Feature Fusion for Polyp Segmentation", Medical Image
    Understanding and Analysis (MIUA), LNCS 13413, pp. 892-907, 2022 (arXiv:2208.08352; code: ESandML/FCBFormer).

Architecture, for an input ``x [B, 3, H, W]`` (``H, W`` multiples of 32; published at ``352 x 352``):

* **Transformer branch** ``TB``: a PVTv2-b3 encoder gives ``F_1..F_4 [B, C_i, H/2^(i+1), W/2^(i+1)]``
  (``C = 64, 128, 320, 512``); the progressive locality decoder (PLD) brings each level to a common width ``d`` (64)
  at ``H/4`` with a *local emphasis* module and fuses the levels top-down with *stepwise feature aggregation*::

      E_i = Up_nearest(LE_i(F_i), (H/4, W/4))      LE_i = RB(C_i -> d) . RB(d -> d)      # [B, d, H/4, W/4]
      A_4 = E_4;  A_i = SFA_i([E_i, A_{i+1}])      SFA_i = RB(2d -> d) . RB(d -> d)      # i = 3, 2, 1
      T   = Up_nearest(A_1, (H, W))                                                     # [B, d, H, W]

* **Fully convolutional branch** ``FCB``: a UNet-like encoder/decoder of residual blocks at full resolution
  (base width ``c = 32``, width multipliers ``(1, 1, 2, 2, 4, 4)`` per level, 2 RBs per encoder level, 3 per decoder
  level, stride-2 convolutions down, nearest x2 + 3x3 convolution up, every encoder output concatenated to one
  decoder block); ``G = FCB(x) [B, c, H, W]``.
* **Prediction head** ``PH``: ``logits = Conv_1x1(RB(RB([T, G])))``, ``[B, d + c, H, W] -> [B, 1, H, W]``.

The residual block (RB) is ``RB(x) = Conv_3x3(SiLU(GN(Conv_3x3(SiLU(GN(x)))))) + S(x)`` with GroupNorm of 32
groups and ``S`` the identity when the widths agree, else a 1x1 convolution.

Module names follow the official ``Models/models.py`` (``TB.backbone.<0..11>``, ``TB.LE``, ``TB.SFA``,
``FCB.enc_blocks``, ``FCB.middle_block``, ``FCB.dec_blocks``, ``PH``) so that checkpoints of the original
``train.py`` (``{"model_state_dict": ...}``, with numpy scalars beside it) load strictly. The PVTv2 stages are
registered as the official ``nn.Sequential`` of the backbone's children (patch embedding, blocks, norm, x4;
no classifier), which gives the same keys.

Differences from the official code:

* The official ``nn.Upsample(size=88)`` / ``nn.Upsample(size=352)`` fix the input size; here the sizes are taken
  from the input (``H/4`` and ``H``), which is the same computation at 352 px and also serves other sizes.
* The official branch always reads ``pvt_v2_b3.pth`` in its constructor; here ``pretrained_backbone`` is optional.
* Training returns a one-element tuple (the bundle's deep-supervision convention); the official loss
  (soft Dice + BCE on the single map) is replaced by the bundle's structure loss.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

from .pvt_v2 import build_pvt_v2

__all__ = [
    "ResidualBlock",
    "FullyConvolutionalBranch",
    "TransformerBranch",
    "FCBFormer",
    "load_fcbformer_checkpoint",
]

logger = logging.getLogger(__name__)


class ResidualBlock(nn.Module):
    """Pre-activation residual block of FCBFormer ("RB").

    ``RB(x) = out_layers(in_layers(x)) + skip(x)`` where ``in_layers = GN -> SiLU -> Conv_3x3(C_in -> C_out)``,
    ``out_layers = GN -> SiLU -> Conv_3x3(C_out -> C_out)`` and ``skip`` is the identity if ``C_in == C_out``,
    else ``Conv_1x1(C_in -> C_out)``. ``[B, C_in, H, W] -> [B, C_out, H, W]``.

    Args:
        in_channels: ``C_in`` (divisible by ``num_groups``).
        out_channels: ``C_out`` (divisible by ``num_groups``).
        num_groups: GroupNorm groups (32 in the paper).
    """

    def __init__(self, in_channels: int, out_channels: int, num_groups: int = 32) -> None:
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(num_groups, in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.out_layers = nn.Sequential(
            nn.GroupNorm(num_groups, out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layers(self.in_layers(x)) + self.skip(x)


def _rb_stack(in_channels: int, out_channels: int, num_groups: int) -> nn.Sequential:
    """``RB(C_in -> C_out) . RB(C_out -> C_out)``: the two-block unit of LE, SFA and the prediction head."""
    return nn.Sequential(
        ResidualBlock(in_channels, out_channels, num_groups), ResidualBlock(out_channels, out_channels, num_groups)
    )


class FullyConvolutionalBranch(nn.Module):
    """The FCB: a UNet of residual blocks whose output keeps the input resolution.

    With ``L = len(channel_mults)`` levels, level ``l`` has width ``w_l = base_channels * channel_mults[l]``:

    * encoder (``enc_blocks``): ``Conv_3x3(C_in -> w_0)``; per level ``num_res_blocks`` RBs to ``w_l``, then
      (except on the last level) a stride-2 ``Conv_3x3``; every encoder output is kept as a skip feature;
    * ``middle_block``: two RBs at ``w_{L-1}``;
    * decoder (``dec_blocks``): per level from the deepest, ``num_res_blocks + 1`` blocks, each
      ``RB([h, skip] -> w_l)`` with the most recent unused skip; the last block of every level but the final one
      then upsamples ``x2`` (nearest) and applies ``Conv_3x3``.

    ``[B, C_in, H, W] -> [B, w_0, H, W]``; ``H`` and ``W`` must be divisible by ``2^(L-1)``.

    Args:
        in_channels: image channels.
        base_channels: ``w_0`` before multiplication (32 in the paper).
        channel_mults: per-level width multipliers (``(1, 1, 2, 2, 4, 4)`` in the paper).
        num_res_blocks: RBs per encoder level (2 in the paper).
        num_groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mults: Sequence[int] = (1, 1, 2, 2, 4, 4),
        num_res_blocks: int = 2,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        widths = [base_channels * m for m in channel_mults]
        self.enc_blocks = nn.ModuleList([nn.Conv2d(in_channels, base_channels, 3, padding=1)])
        skips = [base_channels]
        ch = base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.enc_blocks.append(nn.Sequential(ResidualBlock(ch, width, num_groups)))
                ch = width
                skips.append(ch)
            if level < len(widths) - 1:
                self.enc_blocks.append(nn.Sequential(nn.Conv2d(ch, ch, 3, padding=1, stride=2)))
                skips.append(ch)
        self.middle_block = _rb_stack(ch, ch, num_groups)
        self.dec_blocks = nn.ModuleList()
        for level, width in enumerate(reversed(widths)):
            for block in range(num_res_blocks + 1):
                layers: list[nn.Module] = [ResidualBlock(ch + skips.pop(), width, num_groups)]
                ch = width
                if block == num_res_blocks and level < len(widths) - 1:
                    layers.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                                nn.Conv2d(ch, ch, 3, padding=1)))
                self.dec_blocks.append(nn.Sequential(*layers))
        self.out_channels = ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc_blocks:
            x = block(x)
            skips.append(x)
        x = self.middle_block(x)
        for block in self.dec_blocks:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return x


class TransformerBranch(nn.Module):
    """The TB: PVTv2 encoder + progressive locality decoder (local emphasis ``LE``, stepwise aggregation ``SFA``).

    ``E_i = Up_nearest(LE[i](F_i), size(F_1))``; ``A = E_4``; ``A = SFA[i]([E_i, A])`` for ``i = 3, 2, 1``
    (0-based ``2, 1, 0``). ``[B, C_in, H, W] -> [B, d, H/4, W/4]``.

    Args:
        in_channels: image channels.
        backbone: PVTv2 builder name (``"pvt_v2_b3"`` in the paper).
        embed_dims, depths: optional overrides of the builder's stage widths and depths (small test instances).
        channels: decoder width ``d`` (64 in the paper).
        num_groups: GroupNorm groups.
        drop_path_rate: backbone stochastic depth (0 in the official code).
        pretrained_backbone: official ImageNet PVTv2 checkpoint, see
            :func:`~common.networks.pvt_v2.load_pvt_v2_pretrained`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        backbone: str = "pvt_v2_b3",
        embed_dims: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        channels: int = 64,
        num_groups: int = 32,
        drop_path_rate: float = 0.0,
        pretrained_backbone: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        pvt = build_pvt_v2(backbone, "FCBFormer", pretrained_backbone, embed_dims, depths, in_chans=in_channels,
                           drop_path_rate=drop_path_rate)
        # official layout: Sequential(patch_embed1, block1, norm1, ..., patch_embed4, block4, norm4)
        self.backbone = nn.Sequential(*pvt.children())
        self.LE = nn.ModuleList(_rb_stack(c, channels, num_groups) for c in pvt.embed_dims)
        self.SFA = nn.ModuleList(_rb_stack(2 * channels, channels, num_groups) for _ in range(3))

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four PVTv2 stage maps ``[B, C_i, H / 2^(i+1), W / 2^(i+1)]``, ``i = 1..4``."""
        levels = []
        for stage in range(4):
            patch_embed, blocks, norm = self.backbone[3 * stage: 3 * stage + 3]
            tokens, h, w = patch_embed(x)
            for block in blocks:
                tokens = block(tokens, h, w)
            x = norm(tokens).reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2).contiguous()
            levels.append(x)
        return levels

    def decode(self, levels: Sequence[torch.Tensor]) -> torch.Tensor:
        """Progressive locality decoder: four maps (finest first) -> ``[B, d, h_1, w_1]`` at the finest size."""
        size = levels[0].shape[-2:]
        emphasised = [F.interpolate(le(f), size=size, mode="nearest") for le, f in zip(self.LE, levels)]
        fused = emphasised[-1]
        for i in (2, 1, 0):
            fused = self.SFA[i](torch.cat([emphasised[i], fused], dim=1))
        return fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.pyramid(x))


class FCBFormer(nn.Module):
    """FCBFormer (Sanderson & Matuszewski, MIUA 2022): ``PH([Up(TB(x)), FCB(x)])``.

    Returns logits ``[B, out_channels, H, W]``: in **training** mode as the one-element tuple ``(logits,)``
    (the bundle supervises every map of the tuple), in **eval** mode as the tensor the official ``predict.py``
    thresholds after a sigmoid. ``H`` and ``W`` must be multiples of 32.

    Args:
        in_channels: image channels.
        out_channels: logit channels (1 for binary polyp segmentation).
        backbone: PVTv2 builder of the transformer branch (``"pvt_v2_b3"`` as published).
        embed_dims, depths: optional overrides of the backbone's stage widths / depths (for small instances).
        decoder_channels: width ``d`` of the progressive locality decoder and of the head (64).
        fcb_channels: base width of the fully convolutional branch (32).
        fcb_channel_mults: FCB per-level width multipliers (``(1, 1, 2, 2, 4, 4)``; at most 6 levels).
        fcb_num_res_blocks: RBs per FCB encoder level (2).
        num_groups: GroupNorm groups of every RB (32).
        drop_path_rate: backbone stochastic depth (0, as in the official code).
        pretrained_backbone: official ImageNet PVTv2 file (e.g. ``pvt_v2_b3.pth``), classifier head dropped.
        checkpoint: a full FCBFormer state dict in the official key format, loaded strictly after
            ``pretrained_backbone``, see :func:`load_fcbformer_checkpoint`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        backbone: str = "pvt_v2_b3",
        embed_dims: Sequence[int] | None = None,
        depths: Sequence[int] | None = None,
        decoder_channels: int = 64,
        fcb_channels: int = 32,
        fcb_channel_mults: Sequence[int] = (1, 1, 2, 2, 4, 4),
        fcb_num_res_blocks: int = 2,
        num_groups: int = 32,
        drop_path_rate: float = 0.0,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= len(fcb_channel_mults) <= 6:
            raise ValueError(f"FCBFormer: fcb_channel_mults needs 1 to 6 levels, got {list(fcb_channel_mults)}.")
        self.TB = TransformerBranch(
            in_channels, backbone, embed_dims, depths, decoder_channels, num_groups, drop_path_rate,
            pretrained_backbone,
        )
        self.FCB = FullyConvolutionalBranch(
            in_channels, fcb_channels, fcb_channel_mults, fcb_num_res_blocks, num_groups
        )
        self.PH = nn.Sequential(
            ResidualBlock(decoder_channels + self.FCB.out_channels, decoder_channels, num_groups),
            ResidualBlock(decoder_channels, decoder_channels, num_groups),
            nn.Conv2d(decoder_channels, out_channels, 1),
        )
        if checkpoint is not None:
            load_fcbformer_checkpoint(self, checkpoint)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor] | torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"FCBFormer: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}.")
        transformer = F.interpolate(self.TB(x), size=x.shape[-2:], mode="nearest")
        logits = self.PH(torch.cat([transformer, self.FCB(x)], dim=1))
        return (logits,) if self.training else logits


def load_fcbformer_checkpoint(model: FCBFormer, path: str | os.PathLike) -> None:
    """Strictly load a full FCBFormer checkpoint with the official keys.

    The file is read by :func:`~common.utils.checkpoints.read_state_dict`: the official ``train.py`` file
    (``{"epoch", "model_state_dict", "optimizer_state_dict", "loss", ...}`` with numpy scalars),
    ``{"model": sd}`` / ``{"state_dict": sd}`` wrappers, or a plain state dict; DataParallel's ``module.`` prefixes
    are removed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded FCBFormer weights from '%s' (%d tensors)", path, len(state_dict))
