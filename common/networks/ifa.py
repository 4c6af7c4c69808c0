"""IFA: Iterative Few-shot Adaptor for cross-domain few-shot segmentation (a CD-TG host).

Nie, Xing, Zhang, Yan, Xiao, Tan, Kot and Lu, "Cross-Domain Few-Shot Segmentation via Iterative Support-Query
Correspondence Mining", CVPR 2024 (pp. 3380-3390; arXiv 2401.08407). The paper builds on SSP (Fan et al.,
"Self-Support Few-Shot Semantic Segmentation", ECCV 2022) and adds Bi-directional Few-shot Prediction (BFP) and its
iterated form, the Iterative Few-shot Adaptor (IFA), used both in source training and in a fine-tuning stage on the
labelled target supports. Only the paper's abstract was at hand when this was written: the equations below
reconstruct BFP/IFA from it and from the public official implementation (github.com/niejiahao1998/IFA, commit
99001f6; read, not copied), which also gives every constant (the x10 cosine scale, the SSP thresholds and mixing
weights, the loss weights, the fine-tuning optimiser). CD-TG plug-in hook: specs/cdtg.md §5.6-§5.7.

Shapes: images ``[B, 3, H, W]``, K supports ``[B, K, 3, H, W]`` with masks ``[B, K, H, W]`` (1 foreground, 0
background, any other value, e.g. 255, ignored); features ``F [., C, h, w]``, ``C = 1024``, ``h = H / 8`` (ResNet-50).
A *prototype map* is ``[N, C, 1, 1]`` (global) or ``[N, C, h, w]`` (one prototype per position).

1. Backbone (SSP's ResNet-50): stem + layer1 frozen (``no_grad``), layer2 and layer3 trained, every BatchNorm frozen
   (eval mode, no gradient); layer3 dilated (stride 1, dilation 2), so ``F`` is layer3's output at stride 8, taken
   before the last block's ReLU. No layer4. Stem: ``"deep"`` (official: three 3x3 convolutions 3 -> 64 -> 64 -> 128)
   or ``"torchvision"`` (the 7x7 stem of the ImageNet file PATNet uses); see :class:`IFANet`.
2. Similarity logits, channel 0 background, 1 foreground, ``tau = 10``:
   ``S(F; P^f, P^b)(x) = tau [cos(F(x), P^b(x)), cos(F(x), P^f(x))]``.
3. Support prototypes (MAP, eps 1e-5, masks resized bilinearly with ``align_corners=True``): per shot
   ``p^f_k = MAP(F_s^k, [M_s^k = 1])``, ``p^b_k = MAP(F_s^k, [M_s^k = 0])``; ``P^f = mean_k p^f_k``,
   ``P^b = mean_k p^b_k``. **CD-TG**: ``(p^f_k, p^b_k) <- text_guide.fuse(0, F_s^k, m_k, p^f_k, p^b_k, e_c, e_bg)``
   (``(1 - alpha) p + alpha p^t``) before the mean, after ``text_guide.augment`` of the support features.
4. Self-support prototypes ``SSP(F, O)`` of features ``F`` under logits ``O`` (:func:`self_support_prototypes`):
   ``pi = softmax(O)``; foreground region ``R^f = {x : pi_1(x) > 0.7}``, background ``R^b = {x : pi_0(x) > 0.6}``,
   each replaced by the ``min(12, hw)`` most probable positions when empty; ``s^f = mean_{R^f} F``,
   ``s^b = mean_{R^b} F``, and the adaptive (local) background ``a^b(x) = sum_{y in R^b} w_xy F(y)`` with
   ``w_x. = softmax_y(2 cos(F(x), F(y)))``.
5. BFP, iteration ``t`` with support prototypes ``(P^f_t, P^b_t)`` (``t = 1``: those of step 3):

   * support -> query (:func:`predict_query`): ``O^0_q = S(F_q; P^f_t, P^b_t)``, ``(s^f, s^b, a^b) = SSP(F_q, O^0_q)``,
     query prototypes ``Q^f = (P^f_t + s^f) / 2``, ``Q^b = 0.3 s^b + 0.7 a^b``, prediction ``O^t_q = S(F_q; Q^f, Q^b)``.
     Refinement (``refine``, iteration 1 only): ``(s'^f, s'^b, a'^b) = SSP(F_q, O^1_q)``,
     ``Q'^f = (P^f + s'^f) / 2``, ``Q'^b = 0.3 s'^b + 0.7 a'^b``,
     ``Q''^{f,b} = 0.5 P^{f,b} + 0.2 Q^{f,b} + 0.3 Q'^{f,b}``, ``O^ref_q = 0.7 S(F_q; Q''^f, Q''^b) + 0.3 O^1_q``.
   * query -> support (:func:`predict_support`), per shot: ``O^0_s = S(F_s; Q^f, Q^b)`` (the query's predicted
     foreground prototype, and its background map applied position by position on the support grid),
     ``(u^f, u^b, c^b) = SSP(F_s, O^0_s)``, ``R^f = (P^f_t + u^f) / 2``, ``R^b = 0.3 u^b + 0.7 c^b``, back-predicted
     support ``O^t_s = S(F_s; R^f, R^b)``.
   * IFA: the next iteration starts from the support side's prototypes, ``P^f_{t+1} = mean_k R^f``,
     ``P^b_{t+1} = mean_k R^b`` (a background map).

   Inference runs iteration 1's support -> query direction only; the network outputs ``O^ref_q`` (``refine``) or
   ``O^1_q``, bilinearly (``align_corners=True``) resized to ``[B, 2, H, W]``. K shots share the mean prototypes
   (SSP/IFA K-shot), so one call handles ``[B, K, 3, H, W]`` supports without voting.
6. Losses, all ``CE(., ignore_index=255)`` on logits resized to the image (:meth:`IFANet.training_loss`):
   ``L = CE(O^ref_q, M_q) + CE(O^1_q, M_q) + CE(S(F_q; MAP(F_q, M_q)), M_q) + 0.2 CE(S(F_s; p^f_k, p^b_k), M_s)
   + 0.4 CE(O^1_s, M_s) + 0.1 sum_{t=2..T} (CE(O^t_q, M_q) + CE(O^t_s, M_s))`` — the query and support
   self-matching terms are SSP's; ``T = 1`` in source training (official ``train.py``), ``T = 3`` in IFA
   fine-tuning (official ``ifa.py``). Without ``refine`` the first term is dropped (``O^1_q`` is the output).
7. Fine-tuning (:meth:`IFANet.finetune`): SGD (lr 5e-4 in the official run scripts, 5e-6 for Chest X-ray; momentum
   0.9, weight decay 5e-4) on the layer2/layer3 convolution weights for 20 steps, each on pseudo-episodes built from
   the labelled supports alone: the pseudo-query is a randomly flipped / rotated copy of one support (with its mask),
   the supports stay as given, ``T = 3``.

Choices where the paper or code leaves room (switches where a second reading is plausible):

* ``refine`` (default True): SSP's refinement, on in every official run script (``--refine``).
* ``stem`` (default ``"deep"``): the official code uses SSP's deep-stem ResNet-50 (its pre-trained file and all
  official IFA checkpoints have that stem); ``"torchvision"`` takes the 7x7 stem so the torchvision ImageNet file
  loads; the paper only says "ResNet-50".
* ``fuse_query_prototypes`` (default False): CD-TG fuses the support prototypes of step 3 only. The text describes
  the support class and its MAP is exact under the ground-truth support mask; the query prototypes ``s^f, s^b`` are
  pooled under a *predicted* region and already carry the fused ``P^f`` with weight 1/2, so fusing them would add
  the text a second time under a noisy mask. With the switch on, ``(s^f, s^b)`` (and ``(s'^f, s'^b)``) of the query
  pass through ``fuse`` with the query features and the region ``R^f`` (an adapter: ``fuse``'s text background uses
  ``1 - R^f``, not ``R^b``); the local map ``a^b`` stays visual (``fuse`` takes ``[B, C]`` prototypes). Later
  iterations' support prototypes inherit the text through ``P^f_{t+1} = (P^f_t + u^f) / 2``; the self-matching term
  of the query uses visual prototypes.
* Fine-tuning granularity: the official ``ifa.py`` fine-tunes once per target dataset (20 epochs of one batch of
  pseudo-episodes drawn from random target images, best epoch picked on the test set); :meth:`IFANet.finetune`
  adapts on one episode's supports, for the caller to save and restore per episode. The query image is not read:
  IFA's fine-tuning is supervised by the support labels only. Colour jitter of the official pseudo-query
  (brightness/contrast, hue/saturation on uint8 images) is left out, as our images arrive normalised; rot90 is used
  only for square images.
* The official non-refine ``train.py`` pairs iteration 2's query prediction with the support mask (an index slip);
  we weight ``O^1_s`` by 0.4 in both modes. Its K-shot back-prediction indexes shots and episodes in different
  orders when B > 1 and K > 1; here every support is paired with its own episode's query prototypes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck

from common.networks.fewshot_host import PrimedSupport, TextGuide, check_resnet_shape, init_resnet_parameters
from common.networks.patnet import RESNET50_LAYERS, RESNET50_WIDTHS, pre_relu_bottleneck
from common.networks.prototypes import masked_average_pool, resize_mask
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "STEMS",
    "build_ifa_backbone",
    "load_ifa_backbone_weights",
    "similarity_logits",
    "SelfSupport",
    "self_support_prototypes",
    "QueryPrediction",
    "predict_query",
    "SupportPrediction",
    "predict_support",
    "IFANet",
    "ifa_resnet50",
]

RESNET50_TRUNK_LAYERS = RESNET50_LAYERS[:3]  # layer1..3 of ResNet-50 (the trunk is cut after layer3)
RESNET50_TRUNK_WIDTHS = RESNET50_WIDTHS[:3]
STEMS = ("deep", "torchvision")

SCALE = 10.0  # tau of the similarity logits
FG_THRESHOLD, BG_THRESHOLD, TOP_K, LOCAL_SCALE = 0.7, 0.6, 12, 2.0  # SSP region selection / local attention
MAP_EPS = 1e-5
LOSS_WEIGHTS = {"output": 1.0, "query": 1.0, "query_self": 1.0, "support_self": 0.2, "support": 0.4,
                "query_later": 0.1, "support_later": 0.1}
IGNORE_INDEX = 255

# (features [N, C, h, w], region [N, 1, h, w], fg [N, C], bg [N, C]) -> text-fused (fg, bg)
PrototypeFuser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _make_stage(inplanes: int, width: int, blocks: int, stride: int, dilate: bool) -> nn.Sequential:
    """``blocks`` torchvision Bottlenecks of ``width``; ``dilate`` trades the stride for dilation ``stride`` in
    blocks 2.. (the first block keeps dilation 1, as torchvision and SSP do)."""
    out = width * Bottleneck.expansion
    first_stride = 1 if dilate else stride
    downsample = None
    if first_stride != 1 or inplanes != out:
        downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride=first_stride, bias=False), nn.BatchNorm2d(out))
    layers = [Bottleneck(inplanes, width, first_stride, downsample)]
    layers += [Bottleneck(out, width, dilation=stride if dilate else 1) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def build_ifa_backbone(layers: Sequence[int] = RESNET50_TRUNK_LAYERS, widths: Sequence[int] = RESNET50_TRUNK_WIDTHS,
                       stem: str = "deep") -> nn.ModuleDict:
    """SSP's ResNet trunk as ``{"layer0", "layer1", "layer2", "layer3"}`` (official IFA child names).

    ``layer0 = Sequential(conv1, bn1, ReLU, MaxPool(3, 2, 1))`` with ``conv1`` the deep stem
    ``Sequential(conv3x3(3, w, s2), BN, ReLU, conv3x3(w, w), BN, ReLU, conv3x3(w, 2w))`` and ``bn1 = BN(2w)``, or the
    torchvision stem ``conv7x7(3, w, s2)``, ``bn1 = BN(w)`` (``w = widths[0]``); layer1..3 are torchvision
    Bottleneck stages (strides 1, 2, dilated 2). Initialisation as torchvision/SSP: Kaiming-normal (fan_out)
    convolutions, BatchNorm weight 1 / bias 0.

    Raises:
        ValueError: ``layers``/``widths`` not three positive integers, or an unknown ``stem``.
    """
    layers, widths = check_resnet_shape(layers, widths, stages=3)
    if stem not in STEMS:
        raise ValueError(f"IFA backbone: stem must be one of {STEMS}, got {stem!r}")
    w = widths[0]
    if stem == "deep":
        conv1 = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                              nn.Conv2d(w, w, 3, 1, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                              nn.Conv2d(w, 2 * w, 3, 1, 1, bias=False))
        inplanes = 2 * w
    else:
        conv1, inplanes = nn.Conv2d(3, w, 7, 2, 3, bias=False), w
    trunk = nn.ModuleDict({
        "layer0": nn.Sequential(conv1, nn.BatchNorm2d(inplanes), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)),
        "layer1": _make_stage(inplanes, widths[0], layers[0], 1, False),
        "layer2": _make_stage(widths[0] * 4, widths[1], layers[1], 2, False),
        "layer3": _make_stage(widths[1] * 4, widths[2], layers[2], 2, True),
    })
    init_resnet_parameters(trunk)
    return trunk


def load_ifa_backbone_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load an ImageNet ResNet state dict into ``trunk`` (a module with ``layer0..layer3`` children, strict).

    The file is a ResNet definition's state dict: SSP's deep-stem ResNet (``conv1.{0,1,3,4,6}.*``, ``bn1.*``) for
    the deep stem, torchvision's (``conv1.weight``, ``bn1.*``) for the torchvision stem. ``conv1.`` maps to
    ``layer0.0.``, ``bn1.`` to ``layer0.1.``, ``layer1..3`` keep their names; ``layer4.*`` and ``fc.*`` are not part
    of IFA and are skipped (the official code loads this file with ``strict=False``); every other key must match.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named).
    """
    mapped = {}
    for key, value in read_state_dict(path).items():
        if key.startswith(("layer4.", "fc.")):
            continue
        if key.startswith("conv1."):
            key = "layer0.0." + key.removeprefix("conv1.")
        elif key.startswith("bn1."):
            key = "layer0.1." + key.removeprefix("bn1.")
        mapped[key] = value
    view = nn.ModuleDict({name: getattr(trunk, name) for name in ("layer0", "layer1", "layer2", "layer3")})
    load_state_dict_strict(view, mapped, path)


def similarity_logits(features: torch.Tensor, proto_fg: torch.Tensor, proto_bg: torch.Tensor,
                      scale: float = SCALE) -> torch.Tensor:
    """``scale * [cos(F, P^b), cos(F, P^f)]`` ``[N, 2, h, w]`` of features ``[N, C, h, w]`` and prototype maps
    ``[N, C, 1, 1]`` or ``[N, C, h, w]`` (channel 0 background, 1 foreground; cosine eps 1e-8)."""
    return scale * torch.stack([F.cosine_similarity(features, proto_bg, dim=1),
                                F.cosine_similarity(features, proto_fg, dim=1)], dim=1)


class SelfSupport(NamedTuple):
    """Self-support prototypes of one feature map (SSP): global ``fg``, ``bg`` ``[N, C]``, the adaptive background
    map ``bg_local [N, C, h, w]`` and the selected regions ``fg_region``, ``bg_region`` ``[N, 1, h, w]`` (0/1)."""

    fg: torch.Tensor
    bg: torch.Tensor
    bg_local: torch.Tensor
    fg_region: torch.Tensor
    bg_region: torch.Tensor


def _region(prob: torch.Tensor, threshold: float, top_k: int) -> torch.Tensor:
    """0/1 ``[N, hw]``: ``prob > threshold``, or the ``min(top_k, hw)`` largest ``prob`` where nothing passes."""
    above = (prob > threshold).to(prob.dtype)
    top = torch.zeros_like(prob).scatter(1, prob.topk(min(top_k, prob.shape[1]), dim=1).indices, 1.0)
    return torch.where(above.amax(dim=1, keepdim=True) > 0, above, top)


def self_support_prototypes(features: torch.Tensor, logits: torch.Tensor, fg_threshold: float = FG_THRESHOLD,
                            bg_threshold: float = BG_THRESHOLD, top_k: int = TOP_K,
                            local_scale: float = LOCAL_SCALE) -> SelfSupport:
    """SSP's self-support prototypes of ``features [N, C, h, w]`` under 2-class ``logits [N, 2, h, w]`` (module
    docstring, step 4): regions by thresholding ``softmax(logits)`` (top-k fallback), their mean features, and the
    background map ``a^b(x) = sum_{y in R^b} softmax_y(local_scale * cos(F(x), F(y))) F(y)``."""
    n, c, h, w = features.shape
    prob = logits.softmax(dim=1).flatten(2)  # [N, 2, hw]
    feats = features.flatten(2)  # [N, C, hw]
    fg_region = _region(prob[:, 1], fg_threshold, top_k)
    bg_region = _region(prob[:, 0], bg_threshold, top_k)
    fg = (feats * fg_region[:, None]).sum(-1) / fg_region.sum(-1, keepdim=True)
    bg = (feats * bg_region[:, None]).sum(-1) / bg_region.sum(-1, keepdim=True)
    unit = F.normalize(feats, dim=1)
    affinity = local_scale * unit.transpose(1, 2) @ unit  # [N, hw (x), hw (y)]
    weights = affinity.masked_fill(bg_region[:, None, :] == 0, float("-inf")).softmax(dim=-1)
    bg_local = (feats @ weights.transpose(1, 2)).view(n, c, h, w)
    return SelfSupport(fg, bg, bg_local, fg_region.view(n, 1, h, w), bg_region.view(n, 1, h, w))


def _query_prototypes(features: torch.Tensor, logits: torch.Tensor, proto_fg: torch.Tensor,
                      fuse: PrototypeFuser | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``((P^f + s^f) / 2, 0.3 s^b + 0.7 a^b)`` of the self-support prototypes of ``features`` under ``logits``
    (``s^f, s^b`` through ``fuse`` first when given)."""
    ss = self_support_prototypes(features, logits)
    fg, bg = ss.fg, ss.bg
    if fuse is not None:
        fg, bg = fuse(features, ss.fg_region, fg, bg)
    return 0.5 * proto_fg + 0.5 * fg[..., None, None], 0.3 * bg[..., None, None] + 0.7 * ss.bg_local


class QueryPrediction(NamedTuple):
    """Support -> query half of BFP: ``logits`` ``O_q [B, 2, h, w]``, ``refined`` ``O^ref_q`` (None without
    refinement), query prototypes ``proto_fg`` ``Q^f [B, C, 1, 1]`` and ``proto_bg`` ``Q^b [B, C, h, w]``."""

    logits: torch.Tensor
    refined: torch.Tensor | None
    proto_fg: torch.Tensor
    proto_bg: torch.Tensor


def predict_query(query_feat: torch.Tensor, proto_fg: torch.Tensor, proto_bg: torch.Tensor, refine: bool = False,
                  fuse: PrototypeFuser | None = None) -> QueryPrediction:
    """Predict the query ``[B, C, h, w]`` from support prototype maps ``P^f``, ``P^b`` (``[B, C, 1, 1]`` or
    ``[B, C, h, w]``) through SSP on the query (module docstring, step 5); ``fuse`` text-fuses the query's
    self-support prototypes (the ``fuse_query_prototypes`` switch)."""
    coarse = similarity_logits(query_feat, proto_fg, proto_bg)
    q_fg, q_bg = _query_prototypes(query_feat, coarse, proto_fg, fuse)
    logits = similarity_logits(query_feat, q_fg, q_bg)
    refined = None
    if refine:
        r_fg, r_bg = _query_prototypes(query_feat, logits, proto_fg, fuse)
        m_fg = 0.5 * proto_fg + 0.2 * q_fg + 0.3 * r_fg
        m_bg = 0.5 * proto_bg + 0.2 * q_bg + 0.3 * r_bg
        refined = 0.7 * similarity_logits(query_feat, m_fg, m_bg) + 0.3 * logits
    return QueryPrediction(logits, refined, q_fg, q_bg)


class SupportPrediction(NamedTuple):
    """Query -> support half of BFP: back-predicted support ``logits`` ``O_s [B, K, 2, h, w]`` and the next
    iteration's support prototypes ``proto_fg [B, C, 1, 1]``, ``proto_bg [B, C, h, w]`` (means over the K shots)."""

    logits: torch.Tensor
    proto_fg: torch.Tensor
    proto_bg: torch.Tensor


def predict_support(support_feat: torch.Tensor, query_fg: torch.Tensor, query_bg: torch.Tensor,
                    proto_fg: torch.Tensor) -> SupportPrediction:
    """Predict every support ``[B, K, C, h, w]`` back from the query prototypes ``Q^f [B, C, 1, 1]``, ``Q^b``
    (``[B, C, 1, 1]`` or ``[B, C, h, w]`` on the same grid), through SSP on the support, with this iteration's
    support foreground prototype ``P^f_t [B, C, 1, 1]`` (module docstring, step 5)."""
    b, k = support_feat.shape[:2]
    feats = support_feat.flatten(0, 1)
    coarse = similarity_logits(feats, query_fg.repeat_interleave(k, 0), query_bg.repeat_interleave(k, 0))
    s_fg, s_bg = _query_prototypes(feats, coarse, proto_fg.repeat_interleave(k, 0), None)
    logits = similarity_logits(feats, s_fg, s_bg).unflatten(0, (b, k))
    return SupportPrediction(logits, s_fg.unflatten(0, (b, k)).mean(1), s_bg.unflatten(0, (b, k)).mean(1))


def _upsample(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=True)


def _cross_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CE of ``[N, 2, h, w]`` logits resized to the ``[N, H, W]`` mask, 255 ignored."""
    return F.cross_entropy(_upsample(logits, tuple(mask.shape[-2:])), mask.long(), ignore_index=IGNORE_INDEX)


class IFANet(PrimedSupport, nn.Module):
    """IFA (SSP + BFP + IFA) with the optional CD-TG text plug-in; equations in the module docstring.

    Children (official ``IFA_MatchingNet`` state-dict names): ``layer0`` (stem + max-pool), ``layer1``, ``layer2``,
    ``layer3``, and ``text_guide`` when one is given (built with ``stage_channels=(4 * widths[2],)``; this host
    calls ``fuse`` with stage 0). ResNet-50, deep stem: 8,667,072 parameters, 8,290,304 trained (layer2/layer3
    convolutions), 270 state-dict keys.

    Args:
        layers: bottleneck counts of layer1..3 (ResNet-50 ``(3, 4, 6)``).
        widths: bottleneck widths of layer1..3 (ResNet-50 ``(64, 128, 256)``); features have ``4 * widths[2]``
            channels.
        stem: ``"deep"`` (official, SSP's ResNet) or ``"torchvision"`` (7x7 stem), see :func:`build_ifa_backbone`.
        backbone_weights: optional ImageNet ResNet state-dict file for the trunk (:func:`load_ifa_backbone_weights`).
        checkpoint: optional full-model file in the official format (keys ``layer0.0.0.weight`` ...; a
            ``{"state_dict": ...}``-style wrapper and a ``module.`` prefix are accepted), loaded strictly after
            ``backbone_weights``. With a text guide, a file without ``text_guide.*`` keys loads the host alone.
        text_guide: optional CD-TG plug-in (``augment`` + ``fuse``); ``forward`` then needs the text embeddings.
        support: optional support set to prime the network with (:meth:`set_support` arguments).
        refine: SSP's refinement of the query prediction (official runs: on).
        fuse_query_prototypes: also text-fuse the query's self-support prototypes (module docstring; default off).

    Attributes:
        feature_channels: ``C`` of the features (1024 for ResNet-50), the ``stage_channels`` of the text guide.
        kshot_forward: True: ``forward`` takes the K supports of an episode at once (prototype mean), so the episodic
            evaluator calls it once per batch of episodes instead of voting over K 1-shot passes.
    """

    kshot_forward = True

    def __init__(self, layers: Sequence[int] = RESNET50_TRUNK_LAYERS, widths: Sequence[int] = RESNET50_TRUNK_WIDTHS,
                 stem: str = "deep", backbone_weights: str | Path | None = None, checkpoint: str | Path | None = None,
                 text_guide: TextGuide | None = None, support: Mapping[str, torch.Tensor] | None = None,
                 refine: bool = True, fuse_query_prototypes: bool = False) -> None:
        super().__init__()
        for name, module in build_ifa_backbone(layers, widths, stem).items():
            self.add_module(name, module)
        self.feature_channels = int(widths[2]) * Bottleneck.expansion
        self.refine = bool(refine)
        self.fuse_query_prototypes = bool(fuse_query_prototypes)
        self.text_guide = text_guide
        if backbone_weights is not None:
            load_ifa_backbone_weights(self, backbone_weights)
        for layer in (self.layer0, self.layer1):
            layer.requires_grad_(False)
        for layer in (self.layer2, self.layer3):
            for m in layer.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.requires_grad_(False)
        self.train(self.training)
        self._finish_init(checkpoint, support)

    def train(self, mode: bool = True) -> IFANet:
        """Set training mode everywhere except the backbone's BatchNorm layers, which stay in eval mode."""
        super().train(mode)
        for layer in (self.layer0, self.layer1, self.layer2, self.layer3):
            for m in layer.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def finetune_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters IFA trains and fine-tunes: the convolution weights of layer2 and layer3."""
        return [(n, p) for n, p in self.named_parameters() if n.startswith(("layer2.", "layer3.")) and p.requires_grad]

    def extract_features(self, image: torch.Tensor) -> torch.Tensor:
        """``F [B, C, H/8, W/8]`` of ``image [B, 3, H, W]``: layer0/layer1 under ``no_grad``, layer2/layer3 with the
        caller's grad mode, the last block of layer3 without its final ReLU."""
        with torch.no_grad():
            x = self.layer1(self.layer0(image))
        x = self.layer2(x)
        for block in self.layer3[:-1]:
            x = block(x)
        return pre_relu_bottleneck(self.layer3[-1], x)

    def _empty_supports(self, support_masks: torch.Tensor) -> list[int]:
        """Indices of the supports ``[K, H, W]`` without a foreground pixel (value 1; 255 and other values are
        ignored, as in the losses)."""
        return [i for i in range(support_masks.shape[0]) if not (support_masks[i] == 1).any()]

    def _episode(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                 class_text: torch.Tensor | None, background_text: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Checked ``(supports [B, K, 3, H, W], masks [B, K, H, W])`` of the inputs."""
        if query_image.dim() != 4 or query_image.shape[1] != 3:
            raise ValueError(f"IFANet: query_image must be [B, 3, H, W], got {tuple(query_image.shape)}")
        b, _, h, w = query_image.shape
        supports = support_image.unsqueeze(1) if support_image.dim() == 4 else support_image
        if supports.dim() != 5 or supports.shape[0] != b or tuple(supports.shape[2:]) != (3, h, w):
            raise ValueError(f"IFANet: support_image must be [B, 3, H, W] or [B, K, 3, H, W] with the query's B, H, W "
                             f"{(b, h, w)}, got {tuple(support_image.shape)}")
        k = supports.shape[1]
        masks = support_mask.unsqueeze(1) if support_mask.dim() == 3 else support_mask
        if tuple(masks.shape) != (b, k, h, w):
            raise ValueError(f"IFANet: support_mask must be [B, K, H, W] = {(b, k, h, w)} (or [B, H, W] for K = 1), "
                             f"got {tuple(support_mask.shape)}")
        if self.text_guide is not None:
            if class_text is None or background_text is None:
                raise ValueError("IFANet: a text_guide is set, so class_text and background_text [B, d] are required "
                                 f"(got class_text={None if class_text is None else tuple(class_text.shape)}, "
                                 f"background_text="
                                 f"{None if background_text is None else tuple(background_text.shape)})")
            for name, text in (("class_text", class_text), ("background_text", background_text)):
                if text.dim() != 2 or text.shape[0] != b:
                    raise ValueError(f"IFANet: {name} must be [B={b}, d], got {tuple(text.shape)}")
        return supports, masks

    def _support_side(self, supports: torch.Tensor, masks: torch.Tensor, class_text: torch.Tensor | None,
                      background_text: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Support features ``[B, K, C, h, w]`` (augmented by the text guide) and per-shot prototypes ``p^f_k``,
        ``p^b_k`` ``[B, K, C]`` (fused with the text guide)."""
        b, k = supports.shape[:2]
        feats = self.extract_features(supports.flatten(0, 1))
        if self.text_guide is not None:
            feats = self.text_guide.augment([feats])[0]
        size = tuple(feats.shape[-2:])
        flat_masks = masks.flatten(0, 1)
        fg_mask, bg_mask = resize_mask(flat_masks == 1, size), resize_mask(flat_masks == 0, size)
        proto_fg = masked_average_pool(feats, fg_mask, MAP_EPS)
        proto_bg = masked_average_pool(feats, bg_mask, MAP_EPS)
        if self.text_guide is not None:
            proto_fg, proto_bg = self.text_guide.fuse(0, feats, fg_mask, proto_fg, proto_bg,
                                                      class_text.repeat_interleave(k, 0),
                                                      background_text.repeat_interleave(k, 0))
        return feats.unflatten(0, (b, k)), proto_fg.unflatten(0, (b, k)), proto_bg.unflatten(0, (b, k))

    def _query_fuser(self, class_text: torch.Tensor | None,
                     background_text: torch.Tensor | None) -> PrototypeFuser | None:
        """Adapter over ``text_guide.fuse`` for the query's self-support prototypes (``fuse_query_prototypes``)."""
        if self.text_guide is None or not self.fuse_query_prototypes:
            return None
        guide = self.text_guide

        def fuse(features: torch.Tensor, region: torch.Tensor, fg: torch.Tensor,
                 bg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return guide.fuse(0, features, region, fg, bg, class_text, background_text)

        return fuse

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor | None = None,
                support_mask: torch.Tensor | None = None, class_text: torch.Tensor | None = None,
                background_text: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, 2, H, W]`` of ``query_image [B, 3, H, W]`` given ``support_image [B, 3, H, W]`` /
        ``[B, K, 3, H, W]`` and ``support_mask [B, H, W]`` / ``[B, K, H, W]``: ``O^ref_q`` (``O^1_q`` without
        ``refine``). ``class_text``/``background_text [B, d]`` are used only with a text guide (and then required).
        Without a support, the primed support set is used (:meth:`set_support`)."""
        if self._primed_call(support_image, support_mask):
            return self._forward_primed(query_image)
        supports, masks = self._episode(query_image, support_image, support_mask, class_text, background_text)
        _, proto_fg, proto_bg = self._support_side(supports, masks, class_text, background_text)
        pred = predict_query(self.extract_features(query_image), proto_fg.mean(1)[..., None, None],
                             proto_bg.mean(1)[..., None, None], self.refine,
                             self._query_fuser(class_text, background_text))
        return _upsample(pred.refined if self.refine else pred.logits, tuple(query_image.shape[-2:]))

    def _forward_primed(self, query_image: torch.Tensor) -> torch.Tensor:
        """The K primed supports as one K-shot call (prototype mean, SSP/IFA K-shot), not the vote of the other
        hosts."""
        supports, masks, text = self.primed_episode(query_image.shape[0])
        return self(query_image, supports, masks, **text)

    def training_loss(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                      query_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                      background_text: torch.Tensor | None = None, iterations: int = 1,
                      include_output_term: bool = False) -> torch.Tensor:
        """IFA's objective (module docstring, step 6) over ``iterations`` BFP iterations ``T`` (1: source training,
        3: fine-tuning), with ``query_mask [B, H, W]`` (255 ignored).

        By default the term of the network's own output, ``CE(forward(...), M_q)``, is left out (the rest of the
        objective, to add to a cross-entropy already applied to the output). With ``include_output_term`` it returns
        the whole objective in one pass (no second forward); :meth:`episode_loss` is that form for the episodic
        trainer.
        """
        return self._objective(query_image, support_image, support_mask, query_mask, class_text, background_text,
                               iterations, include_output_term)[0]

    def episode_loss(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                     query_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                     background_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The episodic trainer's hook (:class:`common.engines.episodic.EpisodicTrainer`): the whole source-training
        objective (``T = 1``, output term included) and the output logits ``[B, 2, H, W]`` of the same pass
        (``O^ref_q``, or ``O^1_q`` without ``refine``; what ``forward`` returns)."""
        loss, output = self._objective(query_image, support_image, support_mask, query_mask, class_text,
                                       background_text, 1, True)
        return loss, _upsample(output, tuple(query_image.shape[-2:]))

    def _objective(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                   query_mask: torch.Tensor, class_text: torch.Tensor | None, background_text: torch.Tensor | None,
                   iterations: int, include_output_term: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, output logits at the feature grid)`` of :meth:`training_loss`."""
        if iterations < 1:
            raise ValueError(f"IFANet.training_loss: iterations must be >= 1, got {iterations}")
        supports, masks = self._episode(query_image, support_image, support_mask, class_text, background_text)
        b, _, h, w = query_image.shape
        if tuple(query_mask.shape) != (b, h, w):
            raise ValueError(f"IFANet.training_loss: query_mask must be [B, H, W] = {(b, h, w)}, got "
                             f"{tuple(query_mask.shape)}")
        feat_s, shot_fg, shot_bg = self._support_side(supports, masks, class_text, background_text)
        feat_q = self.extract_features(query_image)
        fuser = self._query_fuser(class_text, background_text)
        weights = LOSS_WEIGHTS
        flat_masks = masks.flatten(0, 1)

        # SSP self-matching: the query under its own ground-truth prototypes, each support under its own
        size = tuple(feat_q.shape[-2:])
        q_fg = masked_average_pool(feat_q, resize_mask(query_mask == 1, size), MAP_EPS)
        q_bg = masked_average_pool(feat_q, resize_mask(query_mask == 0, size), MAP_EPS)
        loss = weights["query_self"] * _cross_entropy(
            similarity_logits(feat_q, q_fg[..., None, None], q_bg[..., None, None]), query_mask)
        loss = loss + weights["support_self"] * _cross_entropy(
            similarity_logits(feat_s.flatten(0, 1), shot_fg.flatten(0, 1)[..., None, None],
                              shot_bg.flatten(0, 1)[..., None, None]), flat_masks)

        proto_fg, proto_bg = shot_fg.mean(1)[..., None, None], shot_bg.mean(1)[..., None, None]
        for t in range(1, iterations + 1):
            query = predict_query(feat_q, proto_fg, proto_bg, self.refine and t == 1, fuser)
            support = predict_support(feat_s, query.proto_fg, query.proto_bg, proto_fg)
            if t == 1:
                if query.refined is not None:
                    output, extra = query.refined, weights["query"] * _cross_entropy(query.logits, query_mask)
                else:
                    output, extra = query.logits, query.logits.new_zeros(())
                if include_output_term:
                    extra = extra + weights["output"] * _cross_entropy(output, query_mask)
                loss = loss + extra + weights["support"] * _cross_entropy(support.logits.flatten(0, 1), flat_masks)
            else:
                loss = (loss + weights["query_later"] * _cross_entropy(query.logits, query_mask)
                        + weights["support_later"] * _cross_entropy(support.logits.flatten(0, 1), flat_masks))
            proto_fg, proto_bg = support.proto_fg, support.proto_bg
        return loss, output

    def finetune(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                 class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None,
                 steps: int = 20, lr: float = 5e-4, momentum: float = 0.9, weight_decay: float = 5e-4,
                 iterations: int = 3, generator: torch.Generator | None = None) -> list[float]:
        """IFA fine-tuning on one batch of episodes' labelled supports, in place (module docstring, step 7).

        Every step draws, per episode, a pseudo-query: one support (random among K) with its mask, flipped
        horizontally / vertically with probability 1/2 each and rotated by a random multiple of 90 degrees (square
        images only), then takes one SGD step on :meth:`training_loss` (whole objective, ``iterations`` BFP
        iterations) over :meth:`finetune_parameters`. ``query_image`` is checked but not read (the supervision comes
        from the support labels only). Save and restore the state dict around the call to adapt per episode; call
        it in eval mode (CD-TG's style augmentation is off when fine-tuning).

        Returns:
            the loss before each step.
        """
        if steps < 1 or lr <= 0:
            raise ValueError(f"IFANet.finetune: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
        supports, masks = self._episode(query_image, support_image, support_mask, class_text, background_text)
        params = [p for _, p in self.finetune_parameters()]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        b, k = supports.shape[:2]
        losses = []
        with torch.enable_grad():
            for _ in range(steps):
                shots = torch.randint(k, (b,), generator=generator).tolist()
                images, pseudo_masks = zip(*(_flip_rotate(supports[i, j], masks[i, j], generator)
                                             for i, j in enumerate(shots)))
                loss = self.training_loss(torch.stack(images), supports, masks, torch.stack(pseudo_masks), class_text,
                                          background_text, iterations, include_output_term=True)
                optimizer.zero_grad()
                loss.backward(inputs=params)
                optimizer.step()
                losses.append(loss.item())
        return losses


def _flip_rotate(image: torch.Tensor, mask: torch.Tensor, generator: torch.Generator | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, vertical flip (p 1/2 each) and rot90 (k in 0..3; 0 or 2 for non-square images) of
    ``image [3, H, W]`` and ``mask [H, W]`` alike."""
    h_flip, v_flip, quarter = (torch.randint(n, (1,), generator=generator).item() for n in (2, 2, 4))
    dims = [d for d, flip in ((-1, h_flip), (-2, v_flip)) if flip]
    if dims:
        image, mask = image.flip(dims), mask.flip(dims)
    turns = quarter if image.shape[-1] == image.shape[-2] else 2 * (quarter % 2)
    return torch.rot90(image, turns, dims=(-2, -1)), torch.rot90(mask, turns, dims=(-2, -1))


def ifa_resnet50(stem: str = "deep", backbone_weights: str | Path | None = None, checkpoint: str | Path | None = None,
                 text_guide: TextGuide | None = None, support: Mapping[str, torch.Tensor] | None = None,
                 refine: bool = True, fuse_query_prototypes: bool = False) -> IFANet:
    """IFA with SSP's ResNet-50 trunk (see :class:`IFANet`)."""
    return IFANet(RESNET50_TRUNK_LAYERS, RESNET50_TRUNK_WIDTHS, stem=stem, backbone_weights=backbone_weights,
                  checkpoint=checkpoint, text_guide=text_guide, support=support, refine=refine,
                  fuse_query_prototypes=fuse_query_prototypes)
