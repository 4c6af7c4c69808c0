"""EndoKED-WSSS class-activation network: a ToCo ViT-B/16 with an ASPP decoder.

References:
    L. Ru, H. Zheng, Y. Zhan, B. Du, "Token Contrast for Weakly-Supervised Semantic Segmentation" (ToCo),
    CVPR 2023 -- the network, its forward modes, the CTC projection heads and the optimiser groups.
    S. Wang et al., "Knowledge Extraction and Distillation from Large-Scale Image-Text Colonoscopy Reports
    Leveraging Large Language and Vision Models" (EndoKED), arXiv 2310.11173 -- replaces ToCo's LargeFOV decoder
    by a 4-branch ASPP and uses one foreground class (specs/endoked.md §3.2).

With ``D`` the embedding size, ``p`` the patch size (16), an input ``x [B, 3, H, W]`` (``H, W`` multiples of
``p``) and ``h, w = H / p, W / p``, the encoder gives the class token ``c [B, D]``, the final-norm patch tokens
``F [B, D, h, w]`` and the (un-normalised) patch tokens of block ``aux_layer`` ``F_aux [B, D, h, w]``. With the
bias-free 1x1 classifiers ``W_cls``, ``W_aux`` (``D -> K - 1``, ``K = num_classes``) and global max pooling::

    cam     = W_cls * F                   [B, K-1, h, w]   (cam_only mode, detached)
    cam_aux = W_aux * F_aux               [B, K-1, h, w]
    cls     = W_cls . maxpool_hw(F)       [B, K-1]
    cls_aux = W_aux . maxpool_hw(F_aux)   [B, K-1]
    seg     = sum_r conv3x3_dil=r(F)      [B, K, h, w]     r in (6, 12, 18, 24)  (ASPP)

and, given views ``crops`` (2 global + k local), the CTC projections ``out_t = g_t(c_global)`` (EMA teacher head,
``[2B, out]``) and ``out_s = g_s(c_global, c_local)`` (student head, ``[(2 + k) B, out]``).

State-dict keys follow the official checkpoints: ``encoder.*`` (timm ViT names, so timm's / the official
``jx_vit_base_p16_224-80ecf9dd.pth`` ImageNet weights load strictly), ``proj_head.*``, ``proj_head_t.*``,
``decoder.c0..c3.*``, ``classifier.weight``, ``aux_classifier.weight``. The heads' last layer uses torch's
weight-norm parametrisation (``last_layer.parametrizations.weight.original0/1``); torch converts the official
``last_layer.weight_g`` / ``weight_v`` keys when such a checkpoint is loaded. The default configuration has
99,742,448 parameters, 93,031,152 of them trainable (specs/official_figures.md §4a).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from common.networks.dino_head import DINOHead
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = ["ASPP", "ToCoViT"]

logger = logging.getLogger(__name__)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling head of DeepLab-v2 (Chen et al., TPAMI 2018), as EndoKED's decoder.

    ``y = sum_r Conv3x3_{dilation=r, padding=r}(x)``: parallel 3x3 convolutions with bias whose outputs are
    summed; weights drawn from N(0, 0.01), biases 0. Children are named ``c0, c1, ...`` (official key names).

    Args:
        in_channels: ``D`` of the input ``[B, D, h, w]``.
        out_channels: output channels (``num_classes``); the output is ``[B, out_channels, h, w]``.
        dilations: one branch per rate (EndoKED: 6, 12, 18, 24).
    """

    def __init__(self, in_channels: int, out_channels: int, dilations: Sequence[int] = (6, 12, 18, 24)) -> None:
        super().__init__()
        if not dilations or any(int(r) < 1 for r in dilations):
            raise ValueError(f"ASPP: dilations must be a non-empty sequence of positive integers, got {dilations!r}")
        for i, rate in enumerate(dilations):
            conv = nn.Conv2d(in_channels, out_channels, 3, padding=int(rate), dilation=int(rate), bias=True)
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
            self.add_module(f"c{i}", conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, D, h, w] -> [B, out_channels, h, w]``."""
        return sum(branch(x) for branch in self.children())


class ToCoViT(nn.Module):
    """ToCo network with EndoKED's ASPP decoder (module docstring; specs/endoked.md §3.2).

    Args:
        num_classes: ``K`` segmentation classes including background (EndoKED: 2); the classifiers have ``K - 1``
            outputs.
        embed_dim: ViT width ``D`` (ViT-B: 768).
        depth: number of transformer blocks (12).
        num_heads: attention heads (12).
        mlp_ratio: MLP hidden width / ``D`` (4).
        patch_size: patch side ``p`` (16); inputs must be multiples of it.
        img_size: image side the stored position embedding belongs to (224 -> a 14 x 14 grid); it is resized
            bicubically to the token grid of every input.
        aux_layer: index into the blocks of the auxiliary tokens (-2: the second-to-last block, before the final
            norm; -1 gives the final-norm tokens, as in the reference encoder).
        init_momentum: EMA momentum ``m`` of the teacher head, ``theta_t <- m theta_t + (1 - m) theta_s`` (0.99).
        proj_hidden_dim: hidden width of the CTC heads' MLP (2048).
        proj_bottleneck_dim: output width of that MLP, before L2 normalisation (256).
        proj_out_dim: output size of the CTC heads (1024).
        aspp_dilations: dilation rates of the ASPP decoder.
        drop_path_rate: stochastic depth of the encoder (0 in ToCo / EndoKED).
        dropout: dropout of the encoder's token, attention-projection and MLP outputs (timm's ``drop_rate`` and
            ``proj_drop_rate``; 0 in ToCo / EndoKED). MONAI Label sets it for epistemic scoring
            (``network_def#dropout``), which runs the network several times in training mode.
        seg_only: ``forward(x)`` returns the decoder's ``seg [B, K, h, w]`` only, as the released EndoKED forward
            does (``model_seg_neg.py``): what inference, MONAI Label and TorchScript export use. The other modes
            (``cam_only``, ``crops``) are unchanged; the state dict is the same either way.
        pretrained_path: optional local ImageNet checkpoint of the encoder in timm's format (e.g.
            ``jx_vit_base_p16_224-80ecf9dd.pth``), loaded strictly (a ``{"model"|"state_dict": ...}`` wrapper and
            DDP's ``module.`` prefix are accepted). Nothing is downloaded.

    Raises:
        ValueError: invalid sizes, or a checkpoint that does not fit (the message names the file and the keys).
        FileNotFoundError: ``pretrained_path`` does not exist.
    """

    def __init__(
        self,
        num_classes: int = 2,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        patch_size: int = 16,
        img_size: int = 224,
        aux_layer: int = -2,
        init_momentum: float = 0.99,
        proj_hidden_dim: int = 2048,
        proj_bottleneck_dim: int = 256,
        proj_out_dim: int = 1024,
        aspp_dilations: Sequence[int] = (6, 12, 18, 24),
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        seg_only: bool = False,
        pretrained_path: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"ToCoViT: num_classes must be >= 2 (background + foreground), got {num_classes}")
        if not -depth <= aux_layer < depth:
            raise ValueError(f"ToCoViT: aux_layer {aux_layer} is not a block index of a depth-{depth} encoder")
        if not 0.0 <= init_momentum <= 1.0:
            raise ValueError(f"ToCoViT: init_momentum must be in [0, 1], got {init_momentum}")
        if img_size % patch_size:
            raise ValueError(f"ToCoViT: img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.aux_layer = aux_layer
        self.init_momentum = init_momentum
        self.seg_only = seg_only

        # timm's ViT (vit_base_patch16_224 by default) incl. its unused ImageNet head, as in the official encoder;
        # dynamic_img_size lets the patch embedding accept any input size (tokens come out as [B, h, w, D])
        self.encoder = VisionTransformer(
            img_size=img_size,
            patch_size=patch_size,
            num_classes=1000,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            drop_path_rate=drop_path_rate,
            drop_rate=dropout,
            proj_drop_rate=dropout,
            dynamic_img_size=True,
        )
        self.encoder.pos_embed.requires_grad_(False)
        if pretrained_path is not None:
            load_state_dict_strict(self.encoder, read_state_dict(pretrained_path), pretrained_path)
            logger.info("loaded ViT encoder weights from '%s'", pretrained_path)

        head = partial(
            DINOHead, in_dim=embed_dim, out_dim=proj_out_dim, hidden_dim=proj_hidden_dim,
            bottleneck_dim=proj_bottleneck_dim, n_layers=3, norm_last_layer=True,
        )
        self.proj_head = head()
        self.proj_head_t = head()
        self.proj_head_t.load_state_dict(self.proj_head.state_dict())
        self.proj_head_t.requires_grad_(False)

        self.decoder = ASPP(embed_dim, num_classes, aspp_dilations)
        self.classifier = nn.Conv2d(embed_dim, num_classes - 1, kernel_size=1, bias=False)
        self.aux_classifier = nn.Conv2d(embed_dim, num_classes - 1, kernel_size=1, bias=False)

    def _position_embedding(self, h: int, w: int) -> torch.Tensor:
        """The stored ``[1, 1 + g*g, D]`` embedding with its patch part resized bicubically to ``h x w``."""
        pos = self.encoder.pos_embed
        grid = int(round(int(pos.shape[1] - 1) ** 0.5))  # int(): a traced shape is a tensor
        if (h, w) == (grid, grid):
            return pos
        patch_pos = pos[:, 1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
        patch_pos = F.interpolate(patch_pos, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([pos[:, :1], patch_pos.flatten(2).transpose(1, 2)], dim=1)

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder tokens of ``x [B, 3, H, W]``.

        Returns:
            ``(cls [B, D], tokens [B, h*w, D], aux_tokens [B, h*w, D])``: the class token and the patch tokens
            after the final LayerNorm, and the patch tokens output by block ``aux_layer`` (before the final norm;
            for ``aux_layer = -1`` the final-norm tokens). Tokens are in row-major ``(h, w)`` order.
        """
        if x.ndim != 4 or x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"ToCoViT: input must be [B, C, H, W] with H and W multiples of {self.patch_size}, "
                f"got shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        # the reference casts to torch.cuda.FloatTensor (spec §7 row 16); here: the encoder's dtype, any device
        x = x.to(self.encoder.patch_embed.proj.weight.dtype)
        tokens = self.encoder.patch_embed(x).flatten(1, 2)
        tokens = torch.cat([self.encoder.cls_token.expand(x.shape[0], -1, -1), tokens], dim=1)
        tokens = self.encoder.pos_drop(tokens + self._position_embedding(h, w))
        outputs = []
        for block in self.encoder.blocks:
            tokens = block(tokens)
            outputs.append(tokens)
        tokens = self.encoder.norm(tokens)
        outputs[-1] = tokens
        return tokens[:, 0], tokens[:, 1:], outputs[self.aux_layer][:, 1:]

    @staticmethod
    def _to_2d(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``[B, h*w, D] -> [B, D, h, w]``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)

    @torch.no_grad()
    def update_teacher(self) -> None:
        """EMA step of the teacher head: ``theta_t <- m theta_t + (1 - m) theta_s`` with ``m = init_momentum``."""
        m = self.init_momentum
        for p_s, p_t in zip(self.proj_head.parameters(), self.proj_head_t.parameters()):
            p_t.mul_(m).add_(p_s.detach(), alpha=1.0 - m)

    def forward_proj(
        self, crops: Sequence[torch.Tensor], n_iter: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """CTC projections of ``crops = [global_1, global_2, local_1, ..., local_k]``.

        Updates the teacher head by EMA first (every call, constant momentum; ``n_iter`` is accepted for the ToCo
        trainer's call signature and does not change it), then::

            out_t = g_t(c(global_1, global_2)).detach()   [2B, out]
            out_s = g_s(c(global_1, global_2, locals))    [(2 + k) B, out]

        where ``c`` is the class token of the shared encoder. The reference encodes the global views twice (once
        detached for the teacher); they are encoded once here and detached for the teacher, which is identical
        without stochastic layers (drop path 0).

        Args:
            crops: the 2 global views ``[B, 3, H_g, W_g]`` (same size) and ``k >= 0`` local views
                ``[B, 3, H_l, W_l]`` (same size), rows view-major.
            n_iter: current iteration (unused by the constant-momentum schedule).
        """
        if len(crops) < 2:
            raise ValueError(f"ToCoViT: crops must hold 2 global views and then local views, got {len(crops)}")
        global_views, local_views = list(crops[:2]), list(crops[2:])
        for name, views in (("global", global_views), ("local", local_views)):
            if any(v.ndim != 4 or v.shape != views[0].shape for v in views):
                raise ValueError(
                    f"ToCoViT: the {name} crops must be [B, 3, H, W] tensors of one shape, got "
                    f"{[tuple(v.shape) for v in views]}"
                )
        if local_views and local_views[0].shape[0] != global_views[0].shape[0]:
            raise ValueError(
                f"ToCoViT: local crops have batch {local_views[0].shape[0]}, global crops {global_views[0].shape[0]}"
            )
        self.update_teacher()
        cls_global = self.forward_features(torch.cat(global_views))[0]
        out_t = self.proj_head_t(cls_global.detach()).detach()
        cls_all = cls_global
        if local_views:
            cls_all = torch.cat([cls_global, self.forward_features(torch.cat(local_views))[0]])
        return out_t, self.proj_head(cls_all)

    def forward(
        self,
        x: torch.Tensor,
        cam_only: bool = False,
        crops: Sequence[torch.Tensor] | None = None,
        n_iter: int | None = None,
    ) -> tuple[torch.Tensor, ...]:
        """ToCo's forward (specs/endoked.md §3.2).

        Args:
            x: images ``[B, 3, H, W]``, ``H, W`` multiples of ``patch_size`` (ImageNet-normalised).
            cam_only: return the class activation maps only.
            crops: views for the CTC projections (see :meth:`forward_proj`).
            n_iter: current iteration, passed to :meth:`forward_proj`.

        Returns:
            * ``cam_only``: ``(cam_aux [B, K-1, h, w], cam [B, K-1, h, w])``, detached;
            * default: ``(cls [B, K-1], seg [B, K, h, w], fmap [B, D, h, w], cls_aux [B, K-1])``, or ``seg`` alone
              with ``seg_only``;
            * with ``crops``: the four above then ``(out_t [2B, out], out_s [(2 + k) B, out])``.
        """
        _, tokens, aux_tokens = self.forward_features(x)
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        fmap, fmap_aux = self._to_2d(tokens, h, w), self._to_2d(aux_tokens, h, w)
        if cam_only:
            cam = F.conv2d(fmap, self.classifier.weight).detach()
            cam_aux = F.conv2d(fmap_aux, self.aux_classifier.weight).detach()
            return cam_aux, cam
        seg = self.decoder(fmap)
        if self.seg_only and crops is None:
            return seg
        cls = self.classifier(F.adaptive_max_pool2d(fmap, 1)).flatten(1)
        cls_aux = self.aux_classifier(F.adaptive_max_pool2d(fmap_aux, 1)).flatten(1)
        if crops is None:
            return cls, seg, fmap, cls_aux
        out_t, out_s = self.forward_proj(crops, n_iter)
        return cls, seg, fmap, cls_aux, out_t, out_s

    def param_groups(self) -> list[list[nn.Parameter]]:
        """ToCo's optimiser groups (lr x1, x1, x10, x10 in PolyWarmupAdamW).

        ``[encoder parameters whose name has no "norm", encoder norm parameters, classifier weights + student
        head, decoder]``. As in the reference, frozen tensors (the position embedding, the head's weight-norm
        magnitude) stay in their groups (they get no gradient); the teacher head is in none.
        """
        groups: list[list[nn.Parameter]] = [[], [], [], []]
        for name, param in self.encoder.named_parameters():
            groups[1 if "norm" in name else 0].append(param)
        groups[2] += [self.classifier.weight, self.aux_classifier.weight, *self.proj_head.parameters()]
        groups[3] += list(self.decoder.parameters())
        return groups
