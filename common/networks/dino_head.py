"""DINO projection head, multi-crop wrapper and optimiser helpers of Sparsam.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers" (DINO), ICCV 2021, §3.1 and App. A
(projection head, multi-crop); Sparsam (Nielsen et al., Bioengineering 2023) uses a 4-layer MLP before the
bottleneck (specs/sparsam.md §3.2-§3.3, §5). Attribute names follow Sparsam's state dict (``mlp``, ``last_layer``;
``backbone``, ``projection_head``); the last layer uses torch's parametrisation API, so its two tensors are
``last_layer.parametrizations.weight.original0`` (magnitude ``g``, ``[K, 1]``) and ``.original1`` (direction ``v``,
``[K, bottleneck]``) instead of the legacy ``weight_g`` / ``weight_v``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = ["DINOHead", "MultiCropWrapper", "cancel_last_layer_gradients", "dino_param_groups"]


class DINOHead(nn.Module):
    """MLP -> L2-normalisation -> weight-normalised linear layer without bias.

    ``x [N, in_dim] -> mlp -> z [N, bottleneck_dim] -> z / ||z||_2 -> last_layer -> [N, out_dim]``, where ``mlp``
    has ``n_layers`` Linear layers (``in -> hidden -> ... -> hidden -> bottleneck``) with GELU between them and no
    BatchNorm, and ``last_layer`` computes ``W z`` with ``W_k = g_k v_k / ||v_k||``. The MLP weights are drawn from
    a truncated normal (std 0.02, cut at +-2), biases are 0; ``g`` is filled with 1 and, with ``norm_last_layer``,
    frozen (``requires_grad=False``), so every output is a cosine similarity in [-1, 1].

    Args:
        in_dim: backbone feature size (384 for XCiT-S12).
        out_dim: ``K`` prototypes (65,536).
        hidden_dim: MLP hidden width (2048).
        bottleneck_dim: MLP output width (256).
        n_layers: number of Linear layers in the MLP (4 in Sparsam, 3 in DINO).
        norm_last_layer: freeze the magnitude ``g`` of the last layer at 1.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        n_layers: int = 4,
        norm_last_layer: bool = True,
    ) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"DINOHead: n_layers must be >= 1, got {n_layers}")
        dims = [in_dim] + [hidden_dim] * (n_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(n_layers):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(dims[i], dims[i + 1]))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(self._init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    @staticmethod
    def _init_linear(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, in_dim] -> [N, out_dim]``."""
        return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class MultiCropWrapper(nn.Module):
    """Backbone + head over a list of crops of possibly different sizes.

    Consecutive views with the same spatial size are concatenated along the batch and passed through the
    backbone together (Sparsam: the 2 global crops in one call, the 5 local crops in another); the ``[n B, D]``
    features are concatenated in view order and passed through the head once.

    Args:
        backbone: maps ``[n, C, H, W]`` to features ``[n, D]`` (e.g. timm XCiT with ``num_classes=0``).
        head: maps ``[N, D]`` to ``[N, out]``; ``None`` means identity (features only).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection_head = nn.Identity() if head is None else head

    def forward(self, views: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        """
        Args:
            views: list of ``V`` tensors ``[B, C, H_v, W_v]`` (any ``[B, ...]`` the backbone accepts; a single
                tensor is one view). Views are grouped by ``shape[1:]``.

        Returns:
            ``[V * B, out]``, view-major (rows ``v*B .. (v+1)*B - 1`` belong to view ``v``).
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        if len(views) == 0:
            raise ValueError("MultiCropWrapper: got an empty list of views")
        batch = views[0].shape[0]
        for i, view in enumerate(views):
            if view.ndim < 2 or view.shape[0] != batch:
                raise ValueError(
                    f"MultiCropWrapper: view {i} has shape {tuple(view.shape)}; expected [B={batch}, C, *spatial]"
                )
        features, start = [], 0
        while start < len(views):
            stop = start + 1
            while stop < len(views) and views[stop].shape[1:] == views[start].shape[1:]:
                stop += 1
            features.append(self.backbone(torch.cat(list(views[start:stop]))))
            start = stop
        return self.projection_head(torch.cat(features))


def cancel_last_layer_gradients(module: nn.Module) -> None:
    """Set ``.grad = None`` on every parameter whose name contains ``last_layer`` (DINO head's last layer).

    Called after ``backward`` during the first epoch(s) so the optimiser skips the prototypes (Sparsam: 1 epoch).
    """
    params = [p for name, p in module.named_parameters() if "last_layer" in name]
    if not params:
        raise ValueError(f"cancel_last_layer_gradients: {type(module).__name__} has no parameter named '*last_layer*'")
    for p in params:
        p.grad = None


def dino_param_groups(module: nn.Module) -> list[dict]:
    """Two optimiser groups: ``[{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]``.

    Biases and every 1-D parameter (norm weights, ...) are not decayed; frozen parameters are left out. The first
    group takes the optimiser's ``weight_decay``, which the weight-decay schedule overwrites each step.
    """
    decayed, not_decayed = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        (not_decayed if name.endswith(".bias") or p.ndim == 1 else decayed).append(p)
    return [{"params": decayed}, {"params": not_decayed, "weight_decay": 0.0}]
