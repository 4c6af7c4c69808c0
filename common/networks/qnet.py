"""Q-Net: query-informed few-shot medical image segmentation (a CD-TG host).

Shen, Li, Jin and Liu, "Q-Net: Query-Informed Few-Shot Medical Image Segmentation", arXiv 2208.11451 (2022), built
on ADNet (Hansen et al., "Anomaly Detection-Inspired Few-Shot Medical Image Segmentation Through Self-Supervision
with Supervoxels", Medical Image Analysis, 2022, 102385). Re-implemented from
the papers' description; the official repository (github.com/shenqq377/Q-Net, ``models/fewshot.py``,
``models/encoder.py``) was read for the module names (so that its ``torch.save(model.state_dict())`` files load
strictly) and for the constants below. CD-TG plug-in: specs/cdtg.md §5.4-§5.7.

One 1-shot episode, query ``I_q [B, 3, H, W]``, support ``(I_s [B, 3, H, W], M_s [B, H, W])``:

1. Encoder (``encoder``): a torchvision ResNet-101 whose layer2 and layer3 are dilated instead of strided
   (``replace_stride_with_dilation = (True, True, False)``), initialised from the COCO-trained torchvision
   DeepLabV3-ResNet-101 (``backbone_weights``; an ImageNet ResNet-101 file also loads). Support and query go through
   it as one batch (as the official code does, so training-mode BatchNorm sees both). Dual path: ``reduce1``
   (1x1 conv, no bias) maps layer3 (1024 ch, stride 4) to ``f^1 [B, 512, H/4, W/4]``, ``reduce2`` maps layer4
   (2048 ch, stride 8) to ``f^2 [B, 512, H/8, W/8]``.
2. Query-informed threshold adaptation: ``T = reduce1d(fc(GAP(layer4(I_q))))`` ``[B]`` — the ResNet's own
   ``fc`` (2048 -> 1000) and ``reduce1d`` (1000 -> 1) applied to the globally averaged layer4 features of the
   *query*; ADNet's threshold was one learned scalar (initialised to -10) instead.
3. Foreground prototype per path (MAP on the image grid, as the official ``getFeatures``): the features are
   bilinearly upsampled (``align_corners=False``) to the mask size and ``p^n = sum_x up(f^n_s)(x) M_s(x) /
   (sum_x M_s(x) + 1e-5)`` ``[B, 512]``; computed here without materialising the upsampled map, through the
   separable adjoint of the upsampling (:func:`upsampled_masked_average_pool`, equal up to rounding).
   With a text guide (CD-TG) the support features are first ``augment``-ed and ``p^n`` is replaced by the
   foreground output of ``text_guide.fuse(n, f^n_s, m^n, p^n, p^n_bg, e_c, e_bg)`` (stage ``n`` = path, both
   512 channels; ``m^n`` the support mask resized to the path's grid, ``p^n_bg`` the background MAP computed the
   same way as ``p^n``). Q-Net has no background prototype: the plug-in's fused background is not used.
4. Anomaly score and prediction (ADNet): ``S^n(x) = -alpha cos(f^n_q(x), p^n)`` with the scale ``alpha = 20``
   (``scaler`` in ADNet/Q-Net) and the foreground probability ``q^n(x) = 1 - sigmoid(0.5 (S^n(x) - T))``
   (= ``sigmoid(10 cos + T / 2)``; the boundary is ``cos = -T / 20``).
5. Query-informed prototype refinement (evaluation only, ``refine_steps`` Adam steps, lr ``refine_lr``, per path):
   with the current hard query mask ``Q = 1[q^n > 0.5]`` the query features are rebuilt with the prototype in the
   predicted foreground, ``F~ = f^n_q (1 - Q) + p^n Q``, both maps min-max normalised over the whole episode
   tensor and squashed, ``N(F) = sigmoid((F - min F) / (max F - min F))``, and ``p^n`` minimises
   ``BCE(input = N(f^n_q), target = N(F~))`` (mean over the episode's elements); ``Q`` is recomputed after every
   step and the final ``q^n`` uses the refined prototype.
6. Output: ``q = sum_n w_n up(q^n) / sum_n w_n`` with the path weights ``w = (0.9, 0.1)`` and ``up`` bilinear
   (``align_corners=True``) to ``(H, W)``; :meth:`QNet.forward` returns ``log(clamp([1 - q, q], eps, 1 - eps))``
   ``[B, 2, H, W]`` (``eps`` the float32 machine epsilon) — the official network's output passed through the log
   its training loss takes, so that the episodic trainer's cross-entropy equals the official NLL (softmax of these
   logits gives ``[1 - q, q]`` back).

Training loss (:meth:`QNet.training_loss`, official ``train.py``; :meth:`QNet.episode_loss` for the episodic
trainer): ``L = L_q + L_align`` with
``L_q = NLL(log q, M_q)`` weighted 0.1 (background) / 1.0 (foreground), and ADNet's prototype alignment loss
``L_align``: the query prototypes ``p^n_q`` are taken under the predicted query mask ``1[q > 0.5]`` (skipped when
empty), the support is predicted from them with the query threshold ``T`` and the same path weights, and
``L_align = NLL(log(clamp([1 - q_s, q_s])), M_s)`` (unweighted), averaged over the episodes. Q-Net has no threshold
loss (ADNet's ``t_loss`` belonged to its learned scalar threshold).

Choices where the public description is ambiguous:

* Two versions of the official refinement exist. The one implemented (BCE of min-max normalised maps, hard mask,
  Adam lr 0.01) is the later one, also carried by the works derived from Q-Net; the earlier one used a soft mask
  and a cross-entropy between the raw maps with lr 2e-3. The official ``forward`` default was 30 steps in the
  earlier version and 0 (off unless the test script passes ``n_iters``) in the later one; ``refine_steps = 30``
  here, 0 switches it off. The min-max range is floored at 1e-12 (a constant map would divide by zero).
* ``freeze_backbone`` (default off, as the official training, which updates the whole encoder including its
  BatchNorm statistics): when set, conv1..layer4 are frozen (no gradient, eval-mode BatchNorm) while ``fc``,
  ``reduce1``, ``reduce2`` and ``reduce1d`` still train.
* K shots: the official code averages the K support prototypes; here K-shot is the host-independent vote of K
  1-shot passes (:func:`common.networks.shot_vote.vote_shots`), as the episodic engines do, also for a primed
  support set.
* Refinement runs autograd inside ``forward``, so a network with ``refine_steps > 0`` cannot be traced with
  ``torch.jit.trace``; with ``refine_steps = 0`` the primed network traces.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from common.networks.fewshot_host import (
    PrimedSupport,
    TextGuide,
    check_episode_inputs,
    check_resnet_shape,
    init_resnet_parameters,
)
from common.networks.patnet import RESNET50_WIDTHS
from common.networks.prototypes import resize_mask
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "build_dilated_resnet",
    "upsampled_masked_average_pool",
    "anomaly_probability",
    "query_threshold",
    "refine_prototype",
    "QNetEncoder",
    "load_qnet_backbone_weights",
    "QNet",
]

RESNET101_LAYERS = (3, 4, 23, 3)
RESNET_WIDTHS = RESNET50_WIDTHS  # ResNet-101 has ResNet-50's widths
QNET_DILATION = (True, True, False)
SCALE = 20.0  # ADNet / Q-Net ``scaler``
PATH_WEIGHTS = (0.9, 0.1)
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def build_dilated_resnet(layers: Sequence[int] = RESNET101_LAYERS, widths: Sequence[int] = RESNET_WIDTHS,
                         dilation: Sequence[bool] = QNET_DILATION) -> ResNet:
    """A randomly initialised torchvision Bottleneck ``ResNet`` (incl. ``fc`` to 1000 classes) whose layer2..4 are
    dilated instead of strided where ``dilation`` says so (torchvision's ``replace_stride_with_dilation``).

    ResNet-101 is ``(3, 4, 23, 3)`` x ``(64, 128, 256, 512)``; other widths rebuild the stem and the stages with
    torchvision's ``_make_layer`` and re-apply its initialisation (Kaiming-normal fan_out convolutions, BatchNorm
    1 / 0).

    Raises:
        ValueError: ``layers`` / ``widths`` not four positive integers, or ``dilation`` not three flags.
    """
    layers, widths = check_resnet_shape(layers, widths)
    dilation = [bool(d) for d in dilation]
    if len(dilation) != 3:
        raise ValueError(f"dilation must be 3 flags (layer2..layer4), got {dilation}")
    net = ResNet(Bottleneck, list(layers), replace_stride_with_dilation=dilation)
    if widths == RESNET_WIDTHS:
        return net
    net.inplanes, net.dilation = widths[0], 1
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    for i, (width, blocks) in enumerate(zip(widths, layers)):
        layer = net._make_layer(Bottleneck, width, blocks, stride=1 if i == 0 else 2,
                                dilate=False if i == 0 else dilation[i - 1])
        setattr(net, f"layer{i + 1}", layer)
    net.fc = nn.Linear(widths[3] * Bottleneck.expansion, net.fc.out_features)
    init_resnet_parameters(net)
    return net


def _linear_upsampling_adjoint(size_in: int, size_out: int, like: torch.Tensor) -> torch.Tensor:
    """``[size_in, size_out]``: the transpose of 1-D linear interpolation (``align_corners=False``) from
    ``size_in`` to ``size_out`` samples."""
    eye = torch.eye(size_in, dtype=like.dtype, device=like.device).unsqueeze(1)
    return F.interpolate(eye, size=size_out, mode="linear", align_corners=False)[:, 0]


def upsampled_masked_average_pool(features: torch.Tensor, mask: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The official Q-Net / ADNet MAP: ``sum_x up(f)(x) M(x) / (sum_x M(x) + eps)`` with ``up`` the bilinear
    (``align_corners=False``) upsampling of ``features [B, C, h, w]`` to the grid of ``mask [B, H, W]`` (or
    ``[B, 1, H, W]``) -> ``[B, C]``.

    Bilinear upsampling is separable, ``up(f) = A f B^T``, so ``sum_x up(f)(x) M(x) = sum_y f(y) (A^T M B)(y)``:
    the mask is pulled back to the feature grid instead of pushing ``C`` channels to the image grid.
    """
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if features.dim() != 4 or mask.dim() != 3 or mask.shape[0] != features.shape[0]:
        raise ValueError(f"upsampled_masked_average_pool: features must be [B, C, h, w] and mask [B, H, W] with the "
                         f"same B, got {tuple(features.shape)} and {tuple(mask.shape)}")
    mask = mask.to(features.dtype)
    (h, w), (big_h, big_w) = features.shape[-2:], mask.shape[-2:]
    rows = _linear_upsampling_adjoint(h, big_h, features)
    cols = _linear_upsampling_adjoint(w, big_w, features)
    pulled = torch.einsum("yH,bHW,xW->byx", rows, mask, cols)
    return torch.einsum("bcyx,byx->bc", features, pulled) / (mask.sum(dim=(1, 2))[:, None] + eps)


def anomaly_probability(features: torch.Tensor, prototype: torch.Tensor, threshold: torch.Tensor,
                        scale: float = SCALE) -> torch.Tensor:
    """ADNet's foreground probability ``1 - sigmoid(0.5 (-scale cos(f(x), p) - T))`` of ``features [B, C, h, w]``
    against ``prototype [B, C]`` with ``threshold T [B]`` -> ``[B, h, w]``."""
    score = -scale * F.cosine_similarity(features, prototype[..., None, None], dim=1)
    return 1.0 - torch.sigmoid(0.5 * (score - threshold.view(-1, 1, 1)))


def query_threshold(layer4: torch.Tensor, fc: nn.Linear, head: nn.Linear) -> torch.Tensor:
    """Q-Net's query-informed threshold ``T = head(fc(GAP(layer4)))``: ``layer4 [B, C, h, w]`` -> ``[B]``."""
    return head(fc(layer4.mean(dim=(2, 3)))).squeeze(1)


def _squash(x: torch.Tensor) -> torch.Tensor:
    """``sigmoid((x - min x) / (max x - min x))`` with min / max over each episode's ``[C, h, w]``."""
    flat = x.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    span = (high - low).clamp(min=1e-12)
    return torch.sigmoid((x - low.view(-1, 1, 1, 1)) / span.view(-1, 1, 1, 1))


def refine_prototype(query_features: torch.Tensor, prototype: torch.Tensor, threshold: torch.Tensor, steps: int,
                     lr: float = 0.01, scale: float = SCALE) -> torch.Tensor:
    """Query-informed prototype refinement (module docstring, step 5): ``steps`` Adam steps on a detached copy of
    ``prototype [B, C]`` against ``query_features [B, C, h, w]`` with ``threshold [B]``; returns the refined
    prototype ``[B, C]`` (no graph to the inputs). The episodes are independent: the loss is the sum of the
    per-episode means and Adam acts per element."""
    if steps < 1 or lr <= 0:
        raise ValueError(f"refine_prototype: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
    with torch.inference_mode(False), torch.enable_grad():  # also under no_grad / inference_mode callers
        feats = query_features.detach().clone()
        proto = prototype.detach().clone().requires_grad_(True)
        optimizer = torch.optim.Adam([proto], lr=lr)
        squashed = _squash(feats)
        for _ in range(steps):
            with torch.no_grad():
                fg = (anomaly_probability(feats, proto, threshold, scale) > 0.5).to(feats.dtype).unsqueeze(1)
            rebuilt = feats * (1.0 - fg) + proto[..., None, None] * fg
            target = _squash(rebuilt)
            loss = F.binary_cross_entropy(squashed, target, reduction="none").flatten(1).mean(dim=1).sum()
            optimizer.zero_grad()
            loss.backward(inputs=[proto])
            optimizer.step()
    return proto.detach()


class QNetEncoder(nn.Module):
    """Q-Net's ``Res101Encoder`` (official child names): ``backbone`` (``nn.ModuleDict`` of a torchvision ResNet's
    children conv1 .. fc), ``reduce1`` (1x1 conv layer3 -> ``channels``, no bias), ``reduce2`` (1x1 conv layer4 ->
    ``channels``, no bias), ``reduce1d`` (``Linear(1000, 1)``, the threshold head).

    Args:
        layers, widths: ResNet bottleneck counts / widths of layer1..4 (ResNet-101 by default).
        channels: output channels of both paths (512).
        freeze_backbone: freeze conv1..layer4 (no gradient, eval-mode BatchNorm); ``fc`` and the heads still train.
    """

    def __init__(self, layers: Sequence[int] = RESNET101_LAYERS, widths: Sequence[int] = RESNET_WIDTHS,
                 channels: int = 512, freeze_backbone: bool = False) -> None:
        super().__init__()
        resnet = build_dilated_resnet(layers, widths, QNET_DILATION)
        self.backbone = nn.ModuleDict(dict(resnet.named_children()))
        out3, out4 = 4 * widths[2], 4 * widths[3]
        self.reduce1 = nn.Conv2d(out3, channels, kernel_size=1, bias=False)
        self.reduce2 = nn.Conv2d(out4, channels, kernel_size=1, bias=False)
        self.reduce1d = nn.Linear(self.backbone["fc"].out_features, 1)
        for conv in (self.reduce1, self.reduce2):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            for name in _TRUNK:
                self.backbone[name].requires_grad_(False)
                self.backbone[name].eval()

    def train(self, mode: bool = True) -> QNetEncoder:
        """Training mode everywhere except a frozen trunk, which stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            for name in _TRUNK:
                self.backbone[name].eval()
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``images [N, 3, H, W]`` -> ``(f^1 [N, c, H/4, W/4], f^2 [N, c, H/8, W/8], T [N])``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            x = images
            for name in _TRUNK[:-1]:
                x = self.backbone[name](x)
            layer3 = x
            layer4 = self.backbone["layer4"](layer3)
        return self.reduce1(layer3), self.reduce2(layer4), query_threshold(layer4, self.backbone["fc"],
                                                                            self.reduce1d)


def load_qnet_backbone_weights(encoder: QNetEncoder, path: str | os.PathLike) -> None:
    """Load ``encoder.backbone`` from a torchvision file: the COCO DeepLabV3-ResNet-101 state dict (keys
    ``backbone.*``; ``classifier.*`` / ``aux_classifier.*`` ignored; it has no ``fc``, which keeps its
    initialisation, as in the official code) or a ResNet-101 state dict (``conv1.weight`` ... ``fc.bias``).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: missing or shape-mismatched keys, or keys of neither format (named).
    """
    state = read_state_dict(path)
    expected = encoder.backbone.state_dict()
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        state.update({k: v for k, v in expected.items() if k.startswith("fc.")})
    load_state_dict_strict(encoder.backbone, state, path)


class _Episode(NamedTuple):
    """Intermediate results of a batch of Q-Net episodes."""

    support_feats: list[torch.Tensor]  # (possibly augmented) support features of the two paths
    query_feats: list[torch.Tensor]  # query features of the two paths
    threshold: torch.Tensor  # query-informed threshold T [B]
    mask: torch.Tensor  # support mask [B, H, W]
    prob: torch.Tensor  # combined foreground probability q [B, H, W]


class QNet(PrimedSupport, nn.Module):
    """Q-Net with the optional CD-TG text hook; see the module docstring for the equations.

    Children (official state-dict names): ``encoder`` (:class:`QNetEncoder`) and ``text_guide`` when one is given.
    ResNet-101: 46,123,025 parameters, 630 state-dict keys.

    Args:
        layers, widths: ResNet bottleneck counts / widths of layer1..4 (ResNet-101: ``(3, 4, 23, 3)`` x
            ``(64, 128, 256, 512)``).
        backbone_weights: optional torchvision DeepLabV3-ResNet-101 (COCO, the official initialisation) or
            ResNet-101 state-dict file for the encoder's ResNet (:func:`load_qnet_backbone_weights`).
        checkpoint: optional official Q-Net checkpoint (``encoder.*`` keys), loaded strictly after
            ``backbone_weights`` (:func:`common.networks.fewshot_host.load_host_checkpoint`).
        text_guide: optional CD-TG plug-in (``augment`` + ``fuse``) with two 512-channel stages (the two paths);
            when set, ``forward`` needs ``class_text`` and ``background_text``.
        support: optional support set to prime the network with (:meth:`set_support`).
        channels: output channels of the two paths (512).
        scale: ADNet's cosine scale ``alpha`` (20).
        path_weights: weights of the layer3 / layer4 path predictions (0.9, 0.1).
        refine_steps: Adam steps of the prototype refinement at evaluation (30; 0 = off).
        refine_lr: its learning rate (0.01).
        background_weight: weight of the background class in :meth:`training_loss`'s query NLL (0.1).
        freeze_backbone: freeze the ResNet trunk (see :class:`QNetEncoder`; off in the official training).
    """

    def __init__(self, layers: Sequence[int] = RESNET101_LAYERS, widths: Sequence[int] = RESNET_WIDTHS,
                 backbone_weights: str | Path | None = None, checkpoint: str | Path | None = None,
                 text_guide: TextGuide | None = None, support: Mapping[str, torch.Tensor] | None = None,
                 channels: int = 512, scale: float = SCALE, path_weights: Sequence[float] = PATH_WEIGHTS,
                 refine_steps: int = 30, refine_lr: float = 0.01, background_weight: float = 0.1,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.encoder = QNetEncoder(layers, widths, channels, freeze_backbone)
        if backbone_weights is not None:
            load_qnet_backbone_weights(self.encoder, backbone_weights)
        self.text_guide = text_guide
        weights = tuple(float(w) for w in path_weights)
        if len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"QNet: path_weights must be 2 non-negative weights with a positive sum, got {weights}")
        if refine_steps < 0 or refine_lr <= 0:
            raise ValueError(f"QNet: refine_steps must be >= 0 and refine_lr > 0, got {refine_steps}, {refine_lr}")
        self.path_weights = weights
        self.scale = float(scale)
        self.refine_steps = int(refine_steps)
        self.refine_lr = float(refine_lr)
        self.background_weight = float(background_weight)
        self._finish_init(checkpoint, support)

    def _combine(self, path_probs: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        """``sum_n w_n up(q^n) / sum_n w_n`` ``[B, H, W]`` of the per-path maps ``[B, h_n, w_n]``."""
        total = sum(w * F.interpolate(p.unsqueeze(1), size=size, mode="bilinear", align_corners=True)[:, 0]
                    for w, p in zip(self.path_weights, path_probs))
        return total / sum(self.path_weights)

    def _episode(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                 class_text: torch.Tensor | None, background_text: torch.Tensor | None) -> _Episode:
        """Features, threshold, prototypes and the combined foreground probability ``q [B, H, W]`` of a batch of
        episodes (module docstring steps 1-6)."""
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        b = query_image.shape[0]
        mask = support_mask[:, 0] if support_mask.dim() == 4 else support_mask
        mask = mask.float()
        down2, down3, tau = self.encoder(torch.cat([support_image, query_image]))
        support_feats, query_feats, threshold = [down2[:b], down3[:b]], [down2[b:], down3[b:]], tau[b:]
        if self.text_guide is not None:
            support_feats = self.text_guide.augment(support_feats)
        prototypes = []
        for stage, feat in enumerate(support_feats):
            proto = upsampled_masked_average_pool(feat, mask)
            if self.text_guide is not None:
                proto_bg = upsampled_masked_average_pool(feat, 1.0 - mask)
                proto, _ = self.text_guide.fuse(stage, feat, resize_mask(mask, tuple(feat.shape[-2:])), proto,
                                                proto_bg, class_text, background_text)
            if not self.training and self.refine_steps > 0:
                proto = refine_prototype(query_feats[stage], proto, threshold, self.refine_steps, self.refine_lr,
                                         self.scale)
            prototypes.append(proto)
        path_probs = [anomaly_probability(q, p, threshold, self.scale) for q, p in zip(query_feats, prototypes)]
        return _Episode(support_feats, query_feats, threshold, mask,
                        self._combine(path_probs, tuple(query_image.shape[-2:])))

    @staticmethod
    def _log_probs(prob: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(torch.float32).eps
        return torch.log(torch.stack([1.0 - prob, prob], dim=1).clamp(eps, 1.0 - eps))

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor | None = None,
                support_mask: torch.Tensor | None = None, class_text: torch.Tensor | None = None,
                background_text: torch.Tensor | None = None) -> torch.Tensor:
        """1-shot logits ``log(clamp([1 - q, q]))`` ``[B, 2, H, W]`` of ``query_image [B, 3, H, W]`` given
        ``support_image [B, 3, H, W]`` and ``support_mask [B, H, W]``; ``class_text`` / ``background_text [B, d]``
        only with a text guide (and then required). Without a support, the primed set is used (:meth:`set_support`).
        """
        if self._primed_call(support_image, support_mask):
            return self._forward_primed(query_image)
        return self._log_probs(self._episode(query_image, support_image, support_mask, class_text,
                                             background_text).prob)

    def training_loss(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                      query_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                      background_text: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Q-Net's training objective on a batch of 1-shot episodes (module docstring): ``{"loss": L_q + L_align,
        "query_loss": L_q, "align_loss": L_align, "logits": [B, 2, H, W]}``. ``query_mask [B, H, W]`` holds 0 / 1
        (255 = ignored in ``L_q``)."""
        out = self._episode(query_image, support_image, support_mask, class_text, background_text)
        logits = self._log_probs(out.prob)
        weight = logits.new_tensor([self.background_weight, 1.0])
        query_loss = F.nll_loss(logits, query_mask.long(), weight=weight, ignore_index=255)
        align = self._alignment_loss(out.query_feats, out.support_feats, out.prob, out.mask, out.threshold)
        return {"loss": query_loss + align, "query_loss": query_loss, "align_loss": align, "logits": logits}

    def episode_loss(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                     query_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                     background_text: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The episodic trainer's hook (:class:`common.engines.episodic.EpisodicTrainer`): ``(L_q + L_align,
        logits [B, 2, H, W])`` of :meth:`training_loss`."""
        out = self.training_loss(query_image, support_image, support_mask, query_mask, class_text, background_text)
        return out["loss"], out["logits"]

    def _alignment_loss(self, query_feats: Sequence[torch.Tensor], support_feats: Sequence[torch.Tensor],
                        prob: torch.Tensor, support_mask: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        """ADNet / Q-Net prototype alignment: support predicted from the query prototypes under ``1[q > 0.5]``,
        NLL against the support mask, per episode (0 for an episode with an empty predicted mask), averaged."""
        pred_mask = (prob > 0.5).to(prob.dtype)
        size = tuple(support_mask.shape[-2:])
        protos = [upsampled_masked_average_pool(q, pred_mask) for q in query_feats]
        support_prob = self._combine([anomaly_probability(s, p, threshold, self.scale)
                                      for s, p in zip(support_feats, protos)], size)
        per_pixel = F.nll_loss(self._log_probs(support_prob), (support_mask > 0.5).long(), reduction="none")
        kept = pred_mask.flatten(1).any(dim=1).to(prob.dtype)
        return (per_pixel.flatten(1).mean(dim=1) * kept).mean()
