"""CD-TG plug-in: text-guided support prototypes and feature-style augmentation for few-shot segmentation.

"Leveraging Language to Generalize Natural Images to Few-shot Medical Image Segmentation" (Cross-domain
Text-guided module, CD-TG), re-implemented from specs/cdtg.md §5.4-§5.6 for a PATNet host.

Semantic-guided Unit (SGU, §5.4), for visual features ``F [B, C, h, w]`` and a text embedding ``e [B, d]``::

    t      = W_2 ReLU(W_1 e + b_1) + b_2                         text MLP, Linear d->C, ReLU, Linear C->C   [B, C]
    F^t(x) = LN( F(x) + MHA(F(x); t, t) )                        image tokens query the text repeated at every x

Every key equals ``t``, so the attention weights are uniform and the attention output is one vector per sample,
independent of the image: ``F^t(x) = LN(F(x) + u(e))`` with ``u(e) = W_o (W_v t + b_v) + b_o`` (closed form,
O(hw) instead of O((hw)^2) memory). ``W_q``/``W_k`` are kept as in the original ``nn.MultiheadAttention``; the
literal attention is available for checking (``literal=True``).

Text-guided prototypes and fusion (§5.4 items 3-5, §5.6), per episode ``b`` and feature level ``l``, with the soft
support mask ``m_l [B, 1, h, w]`` and the visual prototypes ``P^f_l, P^b_l [B, C]`` of the host::

    p^{t,f}_l = MAP(SGU_s(F_l, e_class), m_l)        p^{t,b}_l = MAP(SGU_s(F_l, e_background), 1 - m_l)
    P^f_l <- (1 - alpha) P^f_l + alpha p^{t,f}_l      P^b_l <- (1 - alpha) P^b_l + alpha p^{t,b}_l

``alpha`` is the *text* weight (the README's reading, default 0.7); the reference code's ``0.7 image / 0.3 text``
is ``alpha = 0.3``. One SGU per backbone stage ``s`` (ResNet-50: 512, 1024, 2048 channels), shared by that stage's
levels; prototypes are never averaged across levels or across the episodes of a batch (§5.6 ★).

Feature-style augmentation (ADaIN, §5.5), training only: a random pseudo-style ``S`` of ``F`` (one of noise,
contrast, boundary, low_contrast with strength ``s``), then AdaIN with per-sample, per-channel statistics over
``h x w`` (``sigma`` = unbiased std)::

    F' = sigma(S) (F - mu(F)) / (sigma(F) + 1e-5) + mu(S)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.prototypes import masked_average_pool

__all__ = ["STYLE_KINDS", "adain", "SemanticGuidedUnit", "FeatureStyleAugment", "TextGuidedPrototypes"]

STYLE_KINDS: tuple[str, ...] = ("noise", "contrast", "boundary", "low_contrast")


def _channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and unbiased std over ``h x w`` of ``x [B, C, h, w]``, each ``[B, C, 1, 1]``."""
    flat = x.flatten(2)
    return flat.mean(dim=2)[..., None, None], flat.std(dim=2, unbiased=True)[..., None, None]


def adain(content: torch.Tensor, style: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``sigma(S) (F - mu(F)) / (sigma(F) + eps) + mu(S)`` for content ``F`` and style ``S``, both ``[B, C, h, w]``
    with ``h * w >= 2`` (unbiased std)."""
    if content.shape != style.shape or content.dim() != 4:
        raise ValueError(f"adain: content {tuple(content.shape)} and style {tuple(style.shape)} must be the same "
                         "[B, C, h, w] shape")
    if content.shape[2] * content.shape[3] < 2:
        raise ValueError(f"adain: a feature map of {content.shape[2]}x{content.shape[3]} has no unbiased std; "
                         "at least 2 positions are needed")
    mu_c, sigma_c = _channel_stats(content)
    mu_s, sigma_s = _channel_stats(style)
    return sigma_s * (content - mu_c) / (sigma_c + eps) + mu_s


class SemanticGuidedUnit(nn.Module):
    """Text-conditioned LayerNorm'd shift of a feature map: ``F^t(x) = LN(F(x) + W_o(W_v MLP(e) + b_v) + b_o)``.

    Children: ``text_mlp`` (``Linear(d, C)``, ReLU, ``Linear(C, C)``), ``attention``
    (``nn.MultiheadAttention(C, heads)``: ``in_proj_weight [3C, C]`` rows ``[W_q; W_k; W_v]``, ``out_proj``) and
    ``norm`` (``LayerNorm(C)``). Parameters: ``d*C + C + C*C + C`` (MLP) ``+ 3C*C + 3C`` (in_proj)
    ``+ C*C + C`` (out_proj) ``+ 2C`` (LayerNorm).

    Args:
        channels: ``C``, channels of the visual features.
        text_dim: ``d``, size of the text embedding.
        heads: attention heads (``C`` must be divisible by it); only matters for the literal path.
    """

    def __init__(self, channels: int, text_dim: int, heads: int = 8) -> None:
        super().__init__()
        if channels <= 0 or text_dim <= 0 or heads <= 0:
            raise ValueError(f"SemanticGuidedUnit: channels ({channels}), text_dim ({text_dim}) and heads ({heads}) "
                             "must be positive")
        if channels % heads:
            raise ValueError(f"SemanticGuidedUnit: channels ({channels}) must be divisible by heads ({heads})")
        self.channels = channels
        self.text_dim = text_dim
        self.text_mlp = nn.Sequential(nn.Linear(text_dim, channels), nn.ReLU(), nn.Linear(channels, channels))
        self.attention = nn.MultiheadAttention(channels, heads)
        self.norm = nn.LayerNorm(channels)

    def text_shift(self, text: torch.Tensor) -> torch.Tensor:
        """``u(e) = W_o (W_v t + b_v) + b_o`` with ``t = MLP(e)``: text ``[B, d]`` -> shift ``[B, C]``."""
        c = self.channels
        t = self.text_mlp(text)
        value = F.linear(t, self.attention.in_proj_weight[2 * c:], self.attention.in_proj_bias[2 * c:])
        return self.attention.out_proj(value)

    def forward(self, features: torch.Tensor, text: torch.Tensor, literal: bool = False) -> torch.Tensor:
        """Text-guided features ``[B, C, h, w]`` of features ``[B, C, h, w]`` and text ``[B, d]``; ``literal=True``
        runs the real multi-head attention over the ``h*w`` tokens with the text repeated as keys/values
        (O((hw)^2) memory, for checking only)."""
        if features.dim() != 4 or features.shape[1] != self.channels:
            raise ValueError(f"SemanticGuidedUnit: features must be [B, {self.channels}, h, w], "
                             f"got {tuple(features.shape)}")
        if text.dim() != 2 or text.shape[0] != features.shape[0] or text.shape[1] != self.text_dim:
            raise ValueError(f"SemanticGuidedUnit: text must be [B={features.shape[0]}, d={self.text_dim}], "
                             f"got {tuple(text.shape)}")
        b, c, h, w = features.shape
        tokens = features.flatten(2).permute(2, 0, 1)  # [hw, B, C] (sequence-first, as nn.MultiheadAttention)
        if literal:
            t = self.text_mlp(text).unsqueeze(0).expand(h * w, b, c)
            shift = self.attention(tokens, t, t, need_weights=False)[0]
        else:
            shift = self.text_shift(text).unsqueeze(0)
        return self.norm(tokens + shift).permute(1, 2, 0).reshape(b, c, h, w)


class FeatureStyleAugment(nn.Module):
    """ADaIN (§5.5): re-style features with the statistics of a random pseudo-style of themselves; identity in
    eval mode.

    Styles of ``F`` with strength ``s``: ``noise`` ``F + s N(0, 1)``; ``contrast`` ``ReLU((1 + s) F)``;
    ``boundary`` ``F + s DW(F)`` with ``DW`` a depthwise 3x3 convolution drawn afresh at every call (torch's
    default ``Conv2d`` initialisation, never learned); ``low_contrast`` ``mu(F) + s (F - mu(F))``. Randomness comes
    from torch's global RNG, so seeded runs repeat.

    Args:
        strength: ``s`` (0.3 in the reference).
        eps: added to ``sigma(F)`` in AdaIN.
    """

    def __init__(self, strength: float = 0.3, eps: float = 1e-5) -> None:
        super().__init__()
        self.strength = float(strength)
        self.eps = float(eps)

    def stylise(self, features: torch.Tensor, kind: str) -> torch.Tensor:
        """The pseudo-style ``S [B, C, h, w]`` of ``features`` for one of :data:`STYLE_KINDS`."""
        s = self.strength
        if kind == "noise":
            return features + s * torch.randn_like(features)
        if kind == "contrast":
            return torch.relu((1.0 + s) * features)
        if kind == "boundary":
            c = features.shape[1]
            conv = nn.Conv2d(c, c, 3, padding=1, groups=c, device=features.device, dtype=features.dtype)
            conv.requires_grad_(False)
            return features + s * conv(features)
        if kind == "low_contrast":
            mu = features.mean(dim=(2, 3), keepdim=True)
            return mu + s * (features - mu)
        raise ValueError(f"FeatureStyleAugment: unknown style {kind!r}, expected one of {STYLE_KINDS}")

    def forward(self, features: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """``adain(F, stylise(F, kind))`` while training (``kind`` drawn uniformly when None), ``F`` in eval."""
        if not self.training:
            return features
        if kind is None:
            kind = STYLE_KINDS[int(torch.randint(len(STYLE_KINDS), (1,)).item())]
        return adain(features, self.stylise(features, kind), self.eps)


class TextGuidedPrototypes(nn.Module):
    """The CD-TG plug-in of a prototype-based few-shot host (PATNet): one :class:`SemanticGuidedUnit` per guided
    backbone stage, text-guided MAP prototypes fused into the host's visual prototypes, and ADaIN on the support
    features while training.

    Args:
        stage_channels: channels of each backbone stage the host calls ``fuse`` with (512, 1024, 2048).
        text_dim: ``d`` of the class/background text embeddings.
        alpha: text weight of the fusion ``(1 - alpha) P + alpha p^t`` (0.7: README; 0.3: reference code).
        heads: attention heads of each SGU.
        guided_stages: stages with an SGU (None = all); other stages keep their visual prototypes.
        style_augment: apply :class:`FeatureStyleAugment` to the support features while training.
        style_strength: its strength ``s``.
        seed: when given, the units are initialised from this seed without advancing torch's global generator, so
            that a host network built after the plug-in gets the same initialisation with and without it.
    """

    def __init__(self, stage_channels: Sequence[int], text_dim: int = 512, alpha: float = 0.7, heads: int = 8,
                 guided_stages: Sequence[int] | None = None, style_augment: bool = True,
                 style_strength: float = 0.3, seed: int | None = None) -> None:
        super().__init__()
        self.stage_channels = tuple(int(c) for c in stage_channels)
        if not self.stage_channels:
            raise ValueError("TextGuidedPrototypes: stage_channels is empty")
        stages = range(len(self.stage_channels)) if guided_stages is None else [int(s) for s in guided_stages]
        bad = [s for s in stages if not 0 <= s < len(self.stage_channels)]
        if bad or not stages or len(set(stages)) != len(stages):
            raise ValueError(f"TextGuidedPrototypes: guided_stages {list(stages)} must be distinct stage indices in "
                             f"0..{len(self.stage_channels) - 1} (at least one)")
        self.guided_stages = tuple(sorted(stages))
        self.text_dim = int(text_dim)
        self.alpha = alpha
        self.style_augment = bool(style_augment)
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.sgu = nn.ModuleDict({str(s): SemanticGuidedUnit(self.stage_channels[s], self.text_dim, heads)
                                      for s in self.guided_stages})
        self.style = FeatureStyleAugment(style_strength)

    @property
    def alpha(self) -> float:
        """Text weight of the fusion, in [0, 1]."""
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        if not 0.0 <= float(value) <= 1.0:
            raise ValueError(f"TextGuidedPrototypes: alpha must be in [0, 1], got {value}")
        self._alpha = float(value)

    def augment(self, support_feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """ADaIN on every support level (a fresh random style per level) when training with ``style_augment``;
        otherwise the features unchanged."""
        if self.training and self.style_augment:
            return [self.style(f) for f in support_feats]
        return list(support_feats)

    def _check_text(self, name: str, text: torch.Tensor, batch: int) -> None:
        if text.shape[-1] != self.text_dim:
            raise ValueError(f"TextGuidedPrototypes: {name} has dimension {text.shape[-1]} but text_dim is "
                             f"{self.text_dim}")
        if text.dim() != 2 or text.shape[0] != batch:
            raise ValueError(f"TextGuidedPrototypes: {name} must be [B={batch}, {self.text_dim}], "
                             f"got {tuple(text.shape)}")

    def fuse(self, stage: int, support_feat: torch.Tensor, mask: torch.Tensor, proto_fg: torch.Tensor,
             proto_bg: torch.Tensor, class_text: torch.Tensor,
             background_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused ``(P^f, P^b)``, each ``[B, C]``, of one level of ``stage``: support features ``[B, C, h, w]``,
        soft mask ``[B, 1, h, w]`` on their grid, visual prototypes ``[B, C]``, texts ``[B, d]``. Unguided stages
        return the visual prototypes unchanged."""
        if not 0 <= stage < len(self.stage_channels):
            raise ValueError(f"TextGuidedPrototypes: stage {stage} out of range 0..{len(self.stage_channels) - 1}")
        batch = support_feat.shape[0]
        self._check_text("class_text", class_text, batch)
        self._check_text("background_text", background_text, batch)
        if stage not in self.guided_stages:
            return proto_fg, proto_bg
        unit = self.sgu[str(stage)]
        text_fg = masked_average_pool(unit(support_feat, class_text), mask)
        text_bg = masked_average_pool(unit(support_feat, background_text), 1.0 - mask)
        a = self._alpha
        return (1.0 - a) * proto_fg + a * text_fg, (1.0 - a) * proto_bg + a * text_bg
