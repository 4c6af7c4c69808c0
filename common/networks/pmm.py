"""PMMs: Prototype Mixture Models for few-shot semantic segmentation (a CD-TG host).

Yang, Liu, Li, Jiao and Ye, "Prototype Mixture Models for Few-shot Semantic Segmentation", ECCV 2020 (the PMMs
network; the CANet-lineage backbone of Zhang et al., CVPR 2019). Re-implemented from the paper's description; the
official repository (github.com/Yang-Bob/PMMs: ``networks/FPMMs.py``, ``models/PMMs.py``, ``models/ASPP.py``,
``models/backbone/resnet_dialated.py``) was read for the module names (so that its checkpoints load strictly) and
the constants below. CD-TG plug-in: specs/cdtg.md §5.4-§5.7.

One 1-shot episode, query ``I_q [B, 3, H, W]``, support ``(I_s, M_s [B, H, W])``:

1. Backbone (``model_res``): a Caffe-style dilated ResNet-50 cut after layer3 (stride on the first 1x1 conv of a
   block, max-pool with ``ceil_mode``, layer3 with stride 1 and dilation 2), ImageNet weights (``backbone_weights``,
   a torchvision ResNet-50 file; layer4 and fc are not used); its BatchNorm affine parameters are frozen.
   ``F = layer5(layer2 ⊕ layer3)``: 512 + 1024 channels at stride 8 (``ceil``: 41 x 41 at 321 px), conv 3x3
   (dilation 2) -> 256, BatchNorm, ReLU. Support and query go through it in two separate calls.
2. Prototype mixtures by EM (``PMMs``, no gradient, as the official code): with the support mask resized
   bilinearly (``align_corners=True``) to the grid, ``m``, the foreground samples are ``x_i = m_i F_s(i)`` and the
   background samples ``(1 - m_i) F_s(i)`` over all ``N = h w`` positions (zeroed samples cannot move a mean). From
   ``k = 3`` unit means ``mu_k`` (drawn once, ``N(0, 2/k)`` then L2-normalised, from a fixed seed: a
   non-persistent buffer, so the initialisation is deterministic and the state dict stays the official one),
   ``T = 10`` iterations of::

       E:  z_ik = exp(kappa x_i . mu_k) / sum_j exp(kappa x_i . mu_j)                      kappa = 20
       M:  mu_k = normalise( sum_i z~_ik x_i ),   z~_ik = z_ik / (sum_i z_ik + 1e-6),   normalise(v) = v / (|v| + 1e-6)

   (the vMF likelihood ``exp(kappa mu^T x)``; for unit-norm samples ``x . mu = cos(x, mu)``) give
   ``P^f = (mu^f_1..k)`` and ``P^b = (mu^b_1..k)``, each ``[B, k, 256]``.
3. P-Match: ``G = layer56( sum_k layer55( F_q ⊕ tile(mu^f_k) ) )`` (conv 3x3 dilation 2, 512 -> 256, BN, ReLU,
   shared over k; then conv 3x3, BN, ReLU).
4. P-Conv (no gradient, as the official code): ``P(x) = softmax_j( F_q(x) . mu_j )`` over the ``2k`` prototypes
   (no ``kappa``), ``P_f = sum_{fg} P``, ``P_b = sum_{bg} P``; the map ``[P_b, P_f]`` ``[B, 2, h, w]``.
5. Segmentation head: ``X = G + R_1(G ⊕ [P_b, P_f])``, ``X = X + R_2(X)``, ``X = X + R_3(X)`` with
   ``R_i = ReLU, conv 3x3, ReLU, conv 3x3`` (``residule1..3``), then the ASPP-like ``layer6`` (image pooling 1x1
   conv, 1x1 conv and 3x3 convs with dilation 6, 12, 18, each ReLU + Dropout2d(0.5), concatenated to 1280
   channels), ``layer7`` (1x1 conv -> 256, BN, ReLU) and ``layer9`` (1x1 conv -> 2): logits at the grid,
   bilinearly upsampled (``align_corners=False``) to ``(H, W)``. Loss: cross-entropy (the engines' default).

CD-TG (spec §5.7, "fuse each mixture prototype with the text prototype"): with a text guide the support features
are ``augment``-ed before EM and every mixture prototype is fused by :func:`fuse_mixture`, one ``fuse`` call per
``i`` at stage 0 (256 channels): ``P^f_i <- (1 - a) P^f_i + a p^{t,f}`` and ``P^b_i <- (1 - a) P^b_i + a p^{t,b}``.
The fused prototypes replace the EM ones in P-Match and P-Conv. As P-Conv carries no gradient, the fused background
prototypes do not train the plug-in (the foreground ones do, through P-Match). The EM prototypes have unit norm
while the text prototypes (MAP of LayerNorm'd features) do not; they are mixed as they are.

Choices where the public description is ambiguous:

* As in the official code, the E-step uses the raw dot product ``kappa x . mu`` (the samples are not normalised, so
  it is ``kappa cos(x, mu)`` only for unit-norm samples) and P-Conv a softmax of raw dot products without
  ``kappa``.
* ``freeze_backbone`` (default off, as the official training, which trains the backbone convolutions at the base
  learning rate while its BatchNorm affine parameters stay frozen and its running statistics update): when set,
  the whole backbone is frozen (no gradient, eval-mode BatchNorm).
* K shots: the official ``forward_5shot`` runs one EM on the K support maps concatenated; here K-shot is the
  host-independent vote of K 1-shot passes (:func:`common.networks.shot_vote.vote_shots`), as the episodic engines
  do, also for a primed support set.
* A support set given to :meth:`PMMNet.set_support` (inference: the user's annotated examples) whose resized mask
  has fewer than ``k`` positions with ``m > 0`` (foreground) or ``m < 1`` (background) is refused (``ValueError``,
  "too small for the mixture size"), before anything is primed. Episodes (training, evaluation) are not refused:
  as in the official code, EM then runs on the few non-zero samples (zero samples leave a mean at 0), so that a
  source or target with small structures (an adrenal gland covers one position of the 17 x 17 grid at 128 px)
  trains and is evaluated on the same episodes as the other hosts.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common.networks.fewshot_host import (
    PrimedSupport,
    TextGuide,
    check_episode_inputs,
    check_resnet_shape,
)
from common.networks import patnet
from common.networks.prototypes import resize_mask
from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "CaffeBottleneck",
    "DilatedResNet",
    "load_pmm_backbone_weights",
    "l2_normalise",
    "em_prototypes",
    "PrototypeMixture",
    "fuse_mixture",
    "PSPModule",
    "PMMNet",
]

RESNET50_LAYERS = patnet.RESNET50_LAYERS[:3]  # layer1..3 of ResNet-50 (the backbone is cut after layer3)
RESNET50_WIDTHS = patnet.RESNET50_WIDTHS[:3]


class CaffeBottleneck(nn.Module):
    """Bottleneck with the stride on the first 1x1 conv and the dilation on the 3x3 conv (padding = dilation);
    BatchNorm affine parameters frozen. Children: ``conv1, bn1, conv2, bn2, conv3, bn3, relu, downsample``."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class DilatedResNet(nn.Module):
    """The CANet / PMMs ``Res50_Deeplab`` backbone cut after layer3 (official child names ``conv1, bn1, relu,
    maxpool, layer1, layer2, layer3``): stem 7x7 / 2, max-pool 3x3 / 2 (``ceil_mode``), layer1 (stride 1),
    layer2 (stride 2), layer3 (stride 1, dilation 2). Convolutions ``N(0, 0.01)``, BatchNorm 1 / 0 with frozen
    affine parameters.

    Args:
        layers: bottleneck counts of layer1..3 (ResNet-50: ``(3, 4, 6)``).
        widths: bottleneck widths of layer1..3 (``(64, 128, 256)``); the stem has ``widths[0]`` channels.
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, widths: Sequence[int] = RESNET50_WIDTHS) -> None:
        super().__init__()
        layers, widths = check_resnet_shape(layers, widths, stages=3)
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1, ceil_mode=True)
        self.layer1 = self._make_layer(widths[0], layers[0])
        self.layer2 = self._make_layer(widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(widths[2], layers[2], dilation=2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.01)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
                m.requires_grad_(False)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4 or dilation in (2, 4):
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, kernel_size=1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        modules = [CaffeBottleneck(self.inplanes, planes, stride, dilation, downsample)]
        self.inplanes = planes * 4
        modules += [CaffeBottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x [B, 3, H, W]`` -> ``(layer2 [B, 4 w_1, h, w], layer3 [B, 4 w_2, h, w])``, both at stride 8."""
        x = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        out2 = self.layer2(x)
        return out2, self.layer3(out2)


def load_pmm_backbone_weights(backbone: DilatedResNet, path: str | os.PathLike) -> None:
    """Load a torchvision ResNet-50 state dict (the ImageNet file) into ``backbone``; its ``layer4.*`` and ``fc.*``
    keys are dropped (the official ``load_resnet50_param`` copies everything before layer4), every other key must
    match.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: an unreadable file, or missing / unexpected / shape-mismatched keys (named).
    """
    state = {k: v for k, v in read_state_dict(path).items() if not k.startswith(("layer4.", "fc."))}
    load_state_dict_strict(backbone, state, path)


def l2_normalise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x / (|x| + 1e-6)`` along ``dim`` (the official ``_l2norm``)."""
    return x / (1e-6 + x.norm(dim=dim, keepdim=True))


def em_prototypes(samples: torch.Tensor, init: torch.Tensor, kappa: float, iterations: int) -> torch.Tensor:
    """EM of a mixture of ``k`` von Mises-Fisher means (module docstring, step 2).

    Args:
        samples: ``x`` ``[B, C, N]``.
        init: initial unit means ``[C, k]`` (shared by the batch).
        kappa: concentration of the E-step.
        iterations: number of E + M steps.

    Returns:
        the means ``[B, k, C]``, unit norm.
    """
    mu = init.to(samples.dtype).expand(samples.shape[0], -1, -1)
    for _ in range(iterations):
        z = torch.softmax(kappa * torch.bmm(samples.transpose(1, 2), mu), dim=2)  # E: [B, N, k]
        z = z / (1e-6 + z.sum(dim=1, keepdim=True))
        mu = l2_normalise(torch.bmm(samples, z), dim=1)  # M: [B, C, k]
    return mu.transpose(1, 2)


class PrototypeMixture(nn.Module):
    """PMMs' mixture estimation (EM) and P-Conv; no parameters, no gradient (as the official module).

    Args:
        channels: feature channels ``C``.
        k: prototypes per mixture (3).
        kappa: E-step concentration (20).
        iterations: EM iterations (10).
        seed: seed of the initial means ``N(0, 2/k)``, L2-normalised (a non-persistent buffer ``mu [C, k]``).
    """

    def __init__(self, channels: int, k: int = 3, kappa: float = 20.0, iterations: int = 10, seed: int = 0) -> None:
        super().__init__()
        if channels < 1 or k < 1 or iterations < 1:
            raise ValueError(f"PrototypeMixture: channels ({channels}), k ({k}) and iterations ({iterations}) must be "
                             ">= 1")
        self.k = int(k)
        self.kappa = float(kappa)
        self.iterations = int(iterations)
        generator = torch.Generator().manual_seed(seed)
        mu = torch.randn(channels, k, generator=generator) * math.sqrt(2.0 / k)
        self.register_buffer("mu", l2_normalise(mu, dim=0), persistent=False)

    def check_support(self, mask: torch.Tensor) -> None:
        """Refuse a resized support mask ``[B, 1, h, w]`` with fewer than ``k`` foreground (``m > 0``) or
        background (``m < 1``) positions in an episode."""
        for name, region in (("foreground", mask > 0), ("background", mask < 1)):
            counts = region.flatten(1).sum(dim=1).tolist()
            small = {b: n for b, n in enumerate(counts) if n < self.k}
            if small:
                raise ValueError(f"PMM: the support {name} of episodes {sorted(small)} covers {list(small.values())} "
                                 f"positions of the {mask.shape[-2]}x{mask.shape[-1]} feature grid: too small for "
                                 f"the mixture size k = {self.k}")

    @torch.no_grad()
    def estimate(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Foreground and background mixtures ``(P^f, P^b)``, each ``[B, k, C]``, of support ``features
        [B, C, h, w]`` under the resized mask ``[B, 1, h, w]``."""
        fg = em_prototypes((mask * features).flatten(2), self.mu, self.kappa, self.iterations)
        bg = em_prototypes(((1.0 - mask) * features).flatten(2), self.mu, self.kappa, self.iterations)
        return fg, bg

    @torch.no_grad()
    def probability_map(self, query: torch.Tensor, proto_fg: torch.Tensor, proto_bg: torch.Tensor) -> torch.Tensor:
        """P-Conv: ``[P_b, P_f]`` ``[B, 2, h, w]`` of ``query [B, C, h, w]`` against ``[B, k, C]`` mixtures."""
        logits = torch.einsum("bchw,bjc->bjhw", query, torch.cat([proto_fg, proto_bg], dim=1))
        prob = torch.softmax(logits, dim=1)
        return torch.stack([prob[:, self.k:].sum(dim=1), prob[:, :self.k].sum(dim=1)], dim=1)


def fuse_mixture(guide: TextGuide, stage: int, support_feat: torch.Tensor, mask: torch.Tensor,
                 proto_fg: torch.Tensor, proto_bg: torch.Tensor, class_text: torch.Tensor,
                 background_text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CD-TG on a prototype mixture: ``guide.fuse`` once per mixture component ``i``, so that
    ``P^f_i <- (1 - a) P^f_i + a p^{t,f}`` and ``P^b_i <- (1 - a) P^b_i + a p^{t,b}``.

    Args:
        guide: the plug-in (:class:`common.networks.fewshot_host.TextGuide`).
        stage: its stage index.
        support_feat: ``[B, C, h, w]``; mask: ``[B, 1, h, w]`` on its grid.
        proto_fg, proto_bg: ``[B, k, C]`` mixtures.
        class_text, background_text: ``[B, d]``.

    Returns:
        the fused mixtures ``[B, k, C]`` each.
    """
    fused = [guide.fuse(stage, support_feat, mask, proto_fg[:, i], proto_bg[:, i], class_text, background_text)
             for i in range(proto_fg.shape[1])]
    return torch.stack([f for f, _ in fused], dim=1), torch.stack([b for _, b in fused], dim=1)


def _conv_bn_relu(in_channels: int, out_channels: int, dilation: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=dilation, dilation=dilation),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


def _residual(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.ReLU(), nn.Conv2d(in_channels, channels, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(channels, channels, 3, padding=1))


class PSPModule(nn.Module):
    """The official ``PSPnet`` (ASPP-like, child ``layer6``): ``layer6_0`` on the globally averaged map (1x1 conv,
    tiled back), ``layer6_1`` 1x1 conv, ``layer6_2..4`` 3x3 convs with dilation 6, 12, 18; each conv + ReLU +
    Dropout2d(0.5); concatenated -> ``[B, 5 C, h, w]``."""

    def __init__(self, channels: int = 256) -> None:
        super().__init__()

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, kernel, padding=dilation if kernel == 3 else 0,
                                           dilation=dilation), nn.ReLU(), nn.Dropout2d(p=0.5))

        self.layer6_0 = branch(1, 1)
        self.layer6_1 = branch(1, 1)
        self.layer6_2 = branch(3, 6)
        self.layer6_3 = branch(3, 12)
        self.layer6_4 = branch(3, 18)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.layer6_0(x.mean(dim=(2, 3), keepdim=True)).expand(-1, -1, *x.shape[-2:])
        return torch.cat([pooled, self.layer6_1(x), self.layer6_2(x), self.layer6_3(x), self.layer6_4(x)], dim=1)


class PMMNet(PrimedSupport, nn.Module):
    """PMMs (the official ``FPMMs.OneModel``) with the optional CD-TG text hook; see the module docstring.

    Children (official state-dict names): ``model_res`` (:class:`DilatedResNet`), ``layer5``, ``layer55``,
    ``layer56``, ``layer6`` (:class:`PSPModule`), ``layer7``, ``layer9``, ``residule1..3``, ``PMMs``
    (:class:`PrototypeMixture`, no parameters) and ``text_guide`` when one is given. ResNet-50: 19,629,890
    parameters (8,543,296 backbone + 11,086,594 head; 30,592 of them, the backbone's BatchNorm affine parameters,
    frozen), 310 state-dict keys.

    Args:
        layers, widths: bottleneck counts / widths of the backbone's layer1..3 (ResNet-50 ``(3, 4, 6)`` x
            ``(64, 128, 256)``).
        backbone_weights: optional torchvision ResNet-50 state-dict file (ImageNet) for ``model_res``.
        checkpoint: optional official PMMs checkpoint (``model_res.*``, ``layer5.*``, ...), loaded strictly after
            ``backbone_weights`` (:func:`common.networks.fewshot_host.load_host_checkpoint`).
        text_guide: optional CD-TG plug-in with one stage of ``channels`` channels; when set, ``forward`` needs
            ``class_text`` and ``background_text``.
        support: optional support set to prime the network with (:meth:`set_support`).
        channels: width of the head (256).
        k: prototypes per mixture (3).
        kappa: E-step concentration (20).
        em_iterations: EM iterations (10).
        em_seed: seed of the EM initialisation.
        freeze_backbone: freeze ``model_res`` entirely (off in the official training).
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, widths: Sequence[int] = RESNET50_WIDTHS,
                 backbone_weights: str | Path | None = None, checkpoint: str | Path | None = None,
                 text_guide: TextGuide | None = None, support: Mapping[str, torch.Tensor] | None = None,
                 channels: int = 256, k: int = 3, kappa: float = 20.0, em_iterations: int = 10, em_seed: int = 0,
                 freeze_backbone: bool = False) -> None:
        super().__init__()
        self.model_res = DilatedResNet(layers, widths)
        if backbone_weights is not None:
            load_pmm_backbone_weights(self.model_res, backbone_weights)
        self.freeze_backbone = bool(freeze_backbone)
        if self.freeze_backbone:
            self.model_res.requires_grad_(False)
            self.model_res.eval()
        self.layer5 = _conv_bn_relu(4 * (widths[1] + widths[2]), channels, dilation=2)
        self.layer55 = _conv_bn_relu(2 * channels, channels, dilation=2)
        self.layer56 = _conv_bn_relu(channels, channels, dilation=1)
        self.layer6 = PSPModule(channels)
        self.layer7 = nn.Sequential(nn.Conv2d(5 * channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU())
        self.layer9 = nn.Conv2d(channels, 2, 1)
        self.residule1 = _residual(channels + 2, channels)
        self.residule2 = _residual(channels, channels)
        self.residule3 = _residual(channels, channels)
        self.PMMs = PrototypeMixture(channels, k, kappa, em_iterations, em_seed)
        self.text_guide = text_guide
        self._finish_init(checkpoint, support)

    def train(self, mode: bool = True) -> PMMNet:
        """Training mode everywhere except a frozen backbone, which stays in eval mode."""
        super().train(mode)
        if self.freeze_backbone:
            self.model_res.eval()
        return self

    def extract_features(self, image: torch.Tensor) -> torch.Tensor:
        """``F = layer5(layer2 ⊕ layer3)`` ``[B, channels, h, w]`` of ``image [B, 3, H, W]``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_backbone):
            out2, out3 = self.model_res(image)
        return self.layer5(torch.cat([out2, out3], dim=1))

    def _segment(self, feature: torch.Tensor, prob_map: torch.Tensor) -> torch.Tensor:
        """Residual blocks on ``feature ⊕ [P_b, P_f]``, then ``layer6``, ``layer7``, ``layer9`` -> logits at the
        grid."""
        out = feature + self.residule1(torch.cat([feature, prob_map], dim=1))
        out = out + self.residule2(out)
        out = out + self.residule3(out)
        return self.layer9(self.layer7(self.layer6(out)))

    def _check_support_set(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> None:
        """Refuse to prime with a support whose mask, resized to the feature grid, covers fewer than ``k``
        foreground or background positions (:meth:`PrototypeMixture.check_support`)."""
        training = self.training
        self.eval()  # the probe pass must not move BatchNorm statistics
        try:
            with torch.no_grad():
                grid = tuple(self.extract_features(support_images[:1]).shape[-2:])
        finally:
            self.train(training)
        self.PMMs.check_support(resize_mask(support_masks, grid))

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor | None = None,
                support_mask: torch.Tensor | None = None, class_text: torch.Tensor | None = None,
                background_text: torch.Tensor | None = None) -> torch.Tensor:
        """1-shot logits ``[B, 2, H, W]`` of ``query_image [B, 3, H, W]`` given ``support_image [B, 3, H, W]`` and
        ``support_mask [B, H, W]``; ``class_text`` / ``background_text [B, d]`` only with a text guide (and then
        required). Without a support, the primed set is used (:meth:`set_support`)."""
        if self._primed_call(support_image, support_mask):
            return self._forward_primed(query_image)
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        support_feat = self.extract_features(support_image)
        query_feat = self.extract_features(query_image)
        if self.text_guide is not None:
            support_feat = self.text_guide.augment([support_feat])[0]
        mask = resize_mask(support_mask, tuple(support_feat.shape[-2:]))
        proto_fg, proto_bg = self.PMMs.estimate(support_feat, mask)
        if self.text_guide is not None:
            proto_fg, proto_bg = fuse_mixture(self.text_guide, 0, support_feat, mask, proto_fg, proto_bg, class_text,
                                              background_text)
        size = tuple(query_feat.shape[-2:])
        matched = sum(self.layer55(torch.cat([query_feat, proto[..., None, None].expand(-1, -1, *size)], dim=1))
                      for proto in proto_fg.unbind(dim=1))
        logits = self._segment(self.layer56(matched), self.PMMs.probability_map(query_feat, proto_fg, proto_bg))
        return F.interpolate(logits, size=tuple(query_image.shape[-2:]), mode="bilinear", align_corners=False)
