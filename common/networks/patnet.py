"""PATNet: Pyramid Anchor Transformation network for cross-domain few-shot segmentation (the CD-TG host).

Lei et al., "Cross-Domain Few-Shot Semantic Segmentation" (PATNet, ECCV 2022), built on HSNet (Min et al., ICCV
2021); specs/cdtg.md §4.1-§4.7, with the CD-TG text plug-in hook of §5.6. One 1-shot episode, query ``I_q`` and
support ``(I_s, M_s)``, each ``[B, 3, H, W]`` / ``[B, H, W]``:

1. Frozen ResNet (torchvision Bottleneck blocks) features ``f_l``: the output of every bottleneck of layer2, layer3,
   layer4 after the residual addition and before the final ReLU (ResNet-50: 4 + 6 + 3 = 13 levels; ``[B, 512, H/8]``,
   ``[B, 1024, H/16]``, ``[B, 2048, H/32]``), computed under ``no_grad`` with the backbone in eval mode.
2. MAP (§4.2): ``m_l = bilinear(M_s, (h_l, w_l))``, prototypes ``p^f_l, p^b_l`` and masked support features
   ``f~^s_l = f^s_l * m_l``. With a text guide (CD-TG, §5.6) the support features are first ``augment``-ed and the
   prototypes are then replaced by ``text_guide.fuse(stage, f^s_l, m_l, p^f_l, p^b_l, e_c, e_bg)``.
3. Pyramid Anchor Transformation (§4.3): ``C^_l = rownorm([p^b_l; p^f_l])`` ``[2, c]``, ``A^ = rownorm(A_s)`` (the
   weight ``[2, c]`` of ``reference_layer{s+1}``, row 0 background, row 1 foreground), ``T_l = (pinv(C^_l) A^)^T``
   ``[c, c]``, so that ``T_l c^f_l = a^f`` and ``T_l c^b_l = a^b``; ``f'^q_l = T_l f^q_l``, ``f'^s_l = T_l f~^s_l``.
   ``T_l = A^^T pinv(C^_l)^T`` has rank 2 and is applied in that factored form.
4. Hypercorrelation (§4.4): ``C_l(x_q, x_s) = max(0, cos(f'^q_l(x_q), f'^s_l(x_s)))`` ``[B, h, w, h, w]``, stacked
   per stage along channels in level order: ``C^2 [B, 4, 50^4]``, ``C^3 [B, 6, 25^4]``, ``C^4 [B, 3, 13^4]`` at 400 px.
5. HPN learner (§4.6): center-pivot 4D squeeze blocks, top-down mixing, support-dim average, 2D decoder ->
   2-class logits at ``H/4``, bilinearly (``align_corners=True``) resized to ``[B, 2, H, W]``.

Optional test-time fine-tuning of the anchors (TFI, §4.7) is ``PATNet.finetune_anchors`` (off unless called);
``PATNet.finetune`` is its K-shot form for the episodic evaluator's ``finetune_steps``.

Deployment (inference.json, MONAI Label, TorchScript export): a network *primed* with a support set
(:meth:`PATNet.set_support`, or the ``support`` constructor argument) segments a query image alone,
``forward(query_image)``: one 1-shot pass per support, the K masks merged by the HSNet vote
(:func:`common.networks.shot_vote.vote_shots`); K = 1 returns the logits, K > 1 the one-hot voted mask. The support
tensors are non-persistent buffers, so the state dict stays the official one (priming, input checks and checkpoint
loading are the hosts' shared ones, :mod:`common.networks.fewshot_host`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from common.networks.center_pivot_conv4d import CenterPivotConv4d
from common.networks.fewshot_host import (
    PrimedSupport,
    TextGuide,
    check_episode_inputs,
    check_resnet_shape,
    init_resnet_parameters,
    shots_as_batch,
)
from common.networks.prototypes import masked_average_pool, resize_mask

__all__ = [
    "TextGuide",
    "build_resnet_backbone",
    "load_backbone_weights",
    "frozen_backbone",
    "pre_relu_bottleneck",
    "extract_bottleneck_features",
    "anchor_transform",
    "apply_anchor_transform",
    "hypercorrelation",
    "HPNLearner",
    "PATNet",
    "patnet_resnet50",
]

RESNET50_LAYERS = (3, 4, 6, 3)
RESNET50_WIDTHS = (64, 128, 256, 512)


def build_resnet_backbone(layers: Sequence[int] = RESNET50_LAYERS,
                          widths: Sequence[int] = RESNET50_WIDTHS) -> ResNet:
    """A randomly initialised torchvision ``ResNet`` with ``Bottleneck`` blocks (incl. the unused ``fc``).

    ``layers`` are the bottleneck counts of layer1..4 and ``widths`` their bottleneck widths (output channels are
    ``4 * width``). ResNet-50 is ``(3, 4, 6, 3)`` x ``(64, 128, 256, 512)``; other widths rebuild the stem and the four
    stages with torchvision's own ``ResNet._make_layer`` and re-apply torchvision's initialisation (Kaiming-normal
    fan_out convolutions, BatchNorm weight 1 / bias 0).

    Raises:
        ValueError: ``layers`` or ``widths`` not four positive integers.
    """
    layers, widths = check_resnet_shape(layers, widths)
    net = ResNet(Bottleneck, list(layers))
    if widths == RESNET50_WIDTHS:
        return net
    net.inplanes = widths[0]
    net.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
    net.bn1 = nn.BatchNorm2d(widths[0])
    for i, (width, blocks) in enumerate(zip(widths, layers)):
        setattr(net, f"layer{i + 1}", net._make_layer(Bottleneck, width, blocks, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(widths[3] * Bottleneck.expansion, net.fc.out_features)
    init_resnet_parameters(net)
    return net


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a torchvision ResNet state dict (e.g. the ImageNet ResNet-50 file) from ``path`` into ``backbone``.

    The file is read with ``torch.load(weights_only=True)`` onto the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a state dict, or its keys/shapes do not match the backbone (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"backbone weights file {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"backbone weights file {path} holds a {type(state).__name__}, expected a state dict")
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"backbone weights file {path} does not match the ResNet backbone: {len(missing)} missing keys "
            f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, {len(wrong)} shape mismatches "
            f"{[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in wrong[:5]]}")
    backbone.load_state_dict(state)


def frozen_backbone(layers: Sequence[int], widths: Sequence[int], backbone_weights: str | Path | None = None
                    ) -> tuple[ResNet, tuple[int, int, int], tuple[int, ...]]:
    """PATNet's frozen feature extractor (specs/cdtg.md §4.1), shared by its descendants: the ResNet of
    :func:`build_resnet_backbone` with ``backbone_weights`` loaded when given (:func:`load_backbone_weights`), no
    gradient and in eval mode; with the feature channels of layer2, layer3, layer4 (``4 w``: 512, 1024, 2048 for
    ResNet-50) and the stage index (0 = layer2) of each of the ``sum(layers[1:])`` levels of
    :func:`extract_bottleneck_features`."""
    backbone = build_resnet_backbone(layers, widths)
    if backbone_weights is not None:
        load_backbone_weights(backbone, backbone_weights)
    backbone.requires_grad_(False)
    backbone.eval()
    stage_channels = tuple(int(w) * Bottleneck.expansion for w in widths[1:])
    level_stages = tuple(s for s, n in enumerate(layers[1:]) for _ in range(int(n)))
    return backbone, stage_channels, level_stages


def pre_relu_bottleneck(block: Bottleneck, x: torch.Tensor) -> torch.Tensor:
    """A torchvision ``Bottleneck`` up to the residual addition, without its final ReLU."""
    identity = x if block.downsample is None else block.downsample(x)
    out = block.relu(block.bn1(block.conv1(x)))
    out = block.relu(block.bn2(block.conv2(out)))
    return block.bn3(block.conv3(out)) + identity


def extract_bottleneck_features(backbone: ResNet, image: torch.Tensor) -> list[torch.Tensor]:
    """Pre-ReLU outputs of every bottleneck of layer2, layer3 and layer4 (specs/cdtg.md §4.1), in network order.

    ``image [B, 3, H, W]`` -> ``sum(layers[1:])`` tensors ``[B, 4 w_s, H / 2^(s+3), W / 2^(s+3)]`` (ceil-rounded).
    Runs with whatever grad mode and train/eval mode the caller has set.
    """
    x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(image))))
    x = backbone.layer1(x)
    feats = []
    for layer in (backbone.layer2, backbone.layer3, backbone.layer4):
        for block in layer:
            pre = pre_relu_bottleneck(block, x)
            feats.append(pre)
            x = torch.relu(pre)
    return feats


def anchor_transform(proto_fg: torch.Tensor, proto_bg: torch.Tensor, anchors: torch.Tensor,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors ``(U, V)`` of the Pyramid Anchor Transformation ``T = (pinv(C^) A^)^T = U V`` (specs/cdtg.md §4.3).

    Args:
        proto_fg: ``p^f`` ``[B, C]``.
        proto_bg: ``p^b`` ``[B, C]``.
        anchors: ``A`` ``[2, C]``, row 0 background anchor, row 1 foreground anchor.
        eps: added to the row norms of ``C^ = [p^b; p^f]`` and ``A``.

    Returns:
        ``U = A^^T`` ``[C, 2]`` and ``V = pinv(C^)^T`` ``[B, 2, C]``; ``T = U @ V`` ``[B, C, C]`` maps the normalised
        prototypes onto the normalised anchors (``T c^f = a^f``, ``T c^b = a^b``).
    """
    protos = torch.stack([proto_bg, proto_fg], dim=1)
    protos = protos / (protos.norm(dim=-1, keepdim=True) + eps)
    anchors = anchors / (anchors.norm(dim=-1, keepdim=True) + eps)
    return anchors.t(), torch.linalg.pinv(protos).transpose(1, 2)


def apply_anchor_transform(features: torch.Tensor, transform: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``T f(x)`` at every pixel of ``features [B, C, h, w]`` for ``T = U V`` given as ``(U, V)`` by
    :func:`anchor_transform` -> ``[B, C, h, w]``."""
    u, v = transform
    return torch.einsum("ck,bkhw->bchw", u, torch.einsum("bkc,bchw->bkhw", v, features))


def hypercorrelation(query_feat: torch.Tensor, support_feat: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Clamped cosine similarity of every query/support pixel pair (HSNet; specs/cdtg.md §4.4).

    ``query_feat [B, C, hq, wq]``, ``support_feat [B, C, hs, ws]`` -> ``[B, hq, wq, hs, ws]`` with
    ``max(0, <q / (|q| + eps), s / (|s| + eps)>)``.
    """
    b, c, hq, wq = query_feat.shape
    hs, ws = support_feat.shape[-2:]
    q = query_feat.flatten(2)
    s = support_feat.flatten(2)
    q = q / (q.norm(dim=1, keepdim=True) + eps)
    s = s / (s.norm(dim=1, keepdim=True) + eps)
    return torch.bmm(q.transpose(1, 2), s).clamp(min=0).view(b, hq, wq, hs, ws)


def _squeeze_block(in_channels: int, out_channels: Sequence[int], kernels: Sequence[int],
                   strides: Sequence[int]) -> nn.Sequential:
    """``[CP-Conv4d(k^4, stride (1, 1, s, s), padding k // 2) -> GroupNorm(4) -> ReLU]`` per (out, k, s)."""
    modules: list[nn.Module] = []
    for out, k, s in zip(out_channels, kernels, strides):
        modules += [CenterPivotConv4d(in_channels, out, (k,) * 4, (1, 1, s, s), (k // 2,) * 4),
                    nn.GroupNorm(4, out), nn.ReLU(inplace=True)]
        in_channels = out
    return nn.Sequential(*modules)


def _resize_query_dims(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=True``) resize of the query dims of ``[B, C, Hq, Wq, Hs, Ws]`` to ``size``."""
    b, c, hq, wq, hs, ws = x.shape
    x = x.permute(0, 4, 5, 1, 2, 3).reshape(b * hs * ws, c, hq, wq)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
    return x.view(b, hs, ws, c, *size).permute(0, 3, 4, 5, 1, 2)


class HPNLearner(nn.Module):
    """HSNet's hypercorrelation squeeze (4D) + mixing + 2D decoder (specs/cdtg.md §4.6); 2,573,794 parameters.

    Children (HSNet/PATNet state-dict names): ``encoder_layer4/3/2`` squeeze the layer4/3/2 correlations
    (widths 16, 64, 128; kernels 3,3,3 / 5,3,3 / 5,5,3; support strides 2,2,2 / 4,2,2 / 4,4,2), ``encoder_layer4to3``
    and ``encoder_layer3to2`` mix (3 x CP-Conv4d 128 -> 128, k 3, stride 1), ``decoder1`` (conv3x3 128->128, ReLU,
    conv3x3 128->64, ReLU) and ``decoder2`` (conv3x3 64->64, ReLU, conv3x3 64->2) with a x2 bilinear upsampling
    between them.

    Args:
        stage_levels: number of correlation levels (channels) of the layer2, layer3, layer4 stages ((4, 6, 3) for
            ResNet-50).
    """

    def __init__(self, stage_levels: Sequence[int] = (4, 6, 3)) -> None:
        super().__init__()
        if len(stage_levels) != 3:
            raise ValueError(f"HPNLearner: stage_levels must give layer2, layer3, layer4 counts, got {stage_levels}")
        n2, n3, n4 = stage_levels
        w1, w2, w3 = 16, 64, 128
        self.stage_levels = tuple(stage_levels)
        self.encoder_layer4 = _squeeze_block(n4, [w1, w2, w3], [3, 3, 3], [2, 2, 2])
        self.encoder_layer3 = _squeeze_block(n3, [w1, w2, w3], [5, 3, 3], [4, 2, 2])
        self.encoder_layer2 = _squeeze_block(n2, [w1, w2, w3], [5, 5, 3], [4, 4, 2])
        self.encoder_layer4to3 = _squeeze_block(w3, [w3] * 3, [3] * 3, [1] * 3)
        self.encoder_layer3to2 = _squeeze_block(w3, [w3] * 3, [3] * 3, [1] * 3)
        self.decoder1 = nn.Sequential(nn.Conv2d(w3, w3, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(w3, w2, 3, padding=1), nn.ReLU())
        self.decoder2 = nn.Sequential(nn.Conv2d(w2, w2, 3, padding=1), nn.ReLU(),
                                      nn.Conv2d(w2, 2, 3, padding=1))

    def forward(self, correlations: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[C^2, C^3, C^4]`` (stage order, each ``[B, n_s, h_s, w_s, h_s, w_s]``) -> logits
        ``[B, 2, 2 h_2, 2 w_2]``. The support strides shrink every stage's support dims to the same size
        (``ceil(H / 256)`` for an ``H``-pixel image), so the squeezed stages can be added."""
        c2, c3, c4 = correlations
        s4, s3, s2 = self.encoder_layer4(c4), self.encoder_layer3(c3), self.encoder_layer2(c2)
        mix = self.encoder_layer4to3(_resize_query_dims(s4, tuple(s3.shape[2:4])) + s3)
        mix = self.encoder_layer3to2(_resize_query_dims(mix, tuple(s2.shape[2:4])) + s2)
        x = self.decoder1(mix.mean(dim=(-2, -1)))
        x = F.interpolate(x, size=(2 * x.shape[-2], 2 * x.shape[-1]), mode="bilinear", align_corners=True)
        return self.decoder2(x)


class PATNet(PrimedSupport, nn.Module):
    """PATNet (ResNet backbone) with the optional CD-TG text hook; see the module docstring for the equations.

    Children (official state-dict names): ``backbone`` (torchvision ResNet incl. the unused ``fc``, frozen),
    ``reference_layer3/2/1`` (``nn.Linear(c, 2)``, the anchors of the layer4/3/2 stages), ``hpn_learner``,
    ``cross_entropy_loss`` (``nn.CrossEntropyLoss``, no parameters), and ``text_guide`` when one is given.
    ResNet-50: 28,138,000 parameters, 424 state-dict keys (official_figures.md §3).

    Args:
        layers: bottleneck counts of layer1..4 (ResNet-50 ``(3, 4, 6, 3)``); the learner sees ``layers[1:]``
            correlation channels per stage.
        widths: bottleneck widths of layer1..4 (ResNet-50 ``(64, 128, 256, 512)``).
        backbone_weights: optional torchvision ResNet state-dict file (e.g. ImageNet ResNet-50) for the backbone.
        text_guide: optional CD-TG plug-in (``augment`` + ``fuse``, see :class:`TextGuide`); when set, ``forward``
            needs ``class_text`` and ``background_text``.
        dropout: dropout probability on the hypercorrelations before the learner (0: none, as the official model;
            MONAI Label's epistemic scoring sets it).
        support: optional support set to prime the network with (see :meth:`set_support`): a mapping with
            ``support_images [K, 3, H, W]``, ``support_masks [K, H, W]`` and, with a text guide, ``class_text`` and
            ``background_text`` ``[d]``.
        checkpoint: optional full PATNet state dict in the official key format (``module.`` prefixes stripped),
            loaded strictly after ``backbone_weights`` (:func:`~common.networks.fewshot_host.load_host_checkpoint`:
            without ``text_guide.*`` keys it loads the host and leaves the text guide as built).

    Attributes:
        stage_channels: feature channels of layer2/3/4 (``(512, 1024, 2048)`` for ResNet-50).
        level_stages: stage index (0 = layer2, 1 = layer3, 2 = layer4) of every feature level.
    """

    def __init__(self, layers: Sequence[int] = RESNET50_LAYERS, widths: Sequence[int] = RESNET50_WIDTHS,
                 backbone_weights: str | Path | None = None, text_guide: TextGuide | None = None,
                 dropout: float = 0.0, support: Mapping[str, torch.Tensor] | None = None,
                 checkpoint: str | Path | None = None) -> None:
        super().__init__()
        self.backbone, self.stage_channels, self.level_stages = frozen_backbone(layers, widths, backbone_weights)
        for stage in (2, 1, 0):  # official registration order: reference_layer3, 2, 1
            reference = nn.Linear(self.stage_channels[stage], 2)
            nn.init.kaiming_normal_(reference.weight, a=0, mode="fan_in", nonlinearity="linear")
            nn.init.zeros_(reference.bias)
            self.add_module(f"reference_layer{stage + 1}", reference)
        self.hpn_learner = HPNLearner(tuple(layers[1:]))
        self.cross_entropy_loss = nn.CrossEntropyLoss()
        self.text_guide = text_guide
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"PATNet: dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout  # functional, so that the children stay the official ones
        self._finish_init(checkpoint, support)

    def train(self, mode: bool = True) -> PATNet:
        """Set training mode on every child except the backbone, which stays in eval mode (frozen BN statistics)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def anchors(self, stage: int) -> torch.Tensor:
        """Anchor set ``A`` ``[2, c]`` of ``stage`` (0 = layer2): the weight of ``reference_layer{stage + 1}``."""
        return getattr(self, f"reference_layer{stage + 1}").weight

    def extract_features(self, image: torch.Tensor) -> list[torch.Tensor]:
        """Frozen backbone features of ``image [B, 3, H, W]`` (no_grad, eval mode), see
        :func:`extract_bottleneck_features`."""
        with torch.no_grad():
            return extract_bottleneck_features(self.backbone, image)

    def _level_prototypes(self, support_feats: list[torch.Tensor], support_mask: torch.Tensor,
                          class_text: torch.Tensor | None, background_text: torch.Tensor | None
                          ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per level: masked support feature ``f~^s_l``, prototypes ``p^f_l``, ``p^b_l`` (fused with the text
        guide when one is set)."""
        if self.text_guide is not None:
            support_feats = self.text_guide.augment(support_feats)
        levels = []
        for feat, stage in zip(support_feats, self.level_stages):
            mask = resize_mask(support_mask, tuple(feat.shape[-2:]))
            proto_fg, proto_bg = masked_average_pool(feat, mask), masked_average_pool(feat, 1.0 - mask)
            if self.text_guide is not None:
                proto_fg, proto_bg = self.text_guide.fuse(stage, feat, mask, proto_fg, proto_bg, class_text,
                                                          background_text)
            levels.append((feat * mask, proto_fg, proto_bg))
        return levels

    def correlation_pyramid(self, query_feats: list[torch.Tensor], support_feats: list[torch.Tensor],
                            support_mask: torch.Tensor, class_text: torch.Tensor | None = None,
                            background_text: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Anchor-transformed hypercorrelations stacked per stage: ``[C^2, C^3, C^4]``, each
        ``[B, n_s, h_s, w_s, h_s, w_s]`` (steps 2-4 of the module docstring)."""
        levels = self._level_prototypes(support_feats, support_mask, class_text, background_text)
        stacks: list[list[torch.Tensor]] = [[], [], []]
        for feat_q, (feat_s, proto_fg, proto_bg), stage in zip(query_feats, levels, self.level_stages):
            transform = anchor_transform(proto_fg, proto_bg, self.anchors(stage))
            stacks[stage].append(hypercorrelation(apply_anchor_transform(feat_q, transform),
                                                  apply_anchor_transform(feat_s, transform)))
        return [torch.stack(corrs, dim=1) for corrs in stacks]

    def forward(self, query_image: torch.Tensor, support_image: torch.Tensor | None = None,
                support_mask: torch.Tensor | None = None, class_text: torch.Tensor | None = None,
                background_text: torch.Tensor | None = None) -> torch.Tensor:
        """1-shot logits ``[B, 2, H, W]`` of ``query_image [B, 3, H, W]`` given ``support_image [B, 3, H, W]`` and
        ``support_mask [B, H, W]``; ``class_text``/``background_text [B, d]`` are used only with a text guide
        (and then required). Without a support, the primed support set is used (:meth:`set_support`): K = 1 gives
        its logits, K > 1 the one-hot ``[B, 2, H, W]`` of the voted mask."""
        if self._primed_call(support_image, support_mask):
            return self._forward_primed(query_image)
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        pyramid = self.correlation_pyramid(self.extract_features(query_image), self.extract_features(support_image),
                                           support_mask, class_text, background_text)
        logits = self.hpn_learner([F.dropout(c, self.dropout, self.training) for c in pyramid])
        return F.interpolate(logits, size=tuple(query_image.shape[-2:]), mode="bilinear", align_corners=True)

    def finetune_anchors(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                         class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None,
                         steps: int = 5, lr: float = 1e-3) -> list[float]:
        """Test-time fine-tuning of the anchors (TFI, specs/cdtg.md §4.7) on one batch of episodes, in place.

        Each of ``steps`` Adam steps, on the anchors ``A_1..A_3`` (the ``reference_layer`` weights) only, predicts
        the query mask ``M^q`` with the current anchors, then minimises ``sum_{levels l of layer2}
        KL(softmax(T_l p^{f,q}_l) || softmax(T_l p^f_l))`` with ``p^{f,q}_l`` the MAP of the query features under
        ``M^q`` and ``p^f_l`` the (fused) support prototype; only ``A_1`` enters this loss, so only it moves. The
        change is permanent: save and restore the ``reference_layer`` state dicts around it to adapt per episode.
        Call it with the network in eval mode.

        Returns:
            the loss before each step.
        """
        if steps < 1 or lr <= 0:
            raise ValueError(f"finetune_anchors: steps must be >= 1 and lr > 0, got steps={steps}, lr={lr}")
        check_episode_inputs(self, query_image, support_image, support_mask, class_text, background_text)
        query_feats, support_feats = self.extract_features(query_image), self.extract_features(support_image)
        params = [self.anchors(stage) for stage in range(3)]
        optimizer = torch.optim.Adam(params, lr=lr)
        losses = []
        with torch.enable_grad():
            for _ in range(steps):
                with torch.no_grad():
                    pyramid = self.correlation_pyramid(query_feats, support_feats, support_mask, class_text,
                                                       background_text)
                    query_mask = self.hpn_learner(pyramid).argmax(dim=1, keepdim=True).float()
                levels = self._level_prototypes(support_feats, support_mask, class_text, background_text)
                loss = query_feats[0].new_zeros(())
                for feat_q, (_, proto_fg, proto_bg), stage in zip(query_feats, levels, self.level_stages):
                    if stage != 0:
                        continue
                    transform = anchor_transform(proto_fg, proto_bg, self.anchors(stage))
                    proto_q = masked_average_pool(feat_q, resize_mask(query_mask, tuple(feat_q.shape[-2:])))
                    t_q = apply_anchor_transform(proto_q[..., None, None], transform).flatten(1)
                    t_s = apply_anchor_transform(proto_fg[..., None, None], transform).flatten(1)
                    loss = loss + F.kl_div(F.log_softmax(t_s, dim=1), F.log_softmax(t_q, dim=1), log_target=True,
                                           reduction="batchmean")
                optimizer.zero_grad()
                loss.backward(inputs=params)
                optimizer.step()
                losses.append(loss.item())
        return losses

    def finetune_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters :meth:`finetune` hands to its optimiser: the anchors ``A_1..A_3``."""
        return [(f"reference_layer{stage + 1}.weight", self.anchors(stage)) for stage in range(3)]

    def finetune(self, query_image: torch.Tensor, support_image: torch.Tensor, support_mask: torch.Tensor,
                 class_text: torch.Tensor | None = None, background_text: torch.Tensor | None = None,
                 steps: int = 5) -> list[float]:
        """TFI in the hosts' fine-tuning form (:mod:`common.networks.fewshot_host`): :meth:`finetune_anchors`
        (lr 1e-3) on ``B`` 1-shot episodes or, for K-shot supports ``[B, K, 3, H, W]`` / ``[B, K, H, W]``, on the
        ``B K`` (query, support) pairs at once (:func:`~common.networks.fewshot_host.shots_as_batch`: the KL terms
        of the K pairs averaged). Off by default in the bundle (the public code never calls it, spec §4.7)."""
        return self.finetune_anchors(*shots_as_batch(query_image, support_image, support_mask, class_text,
                                                     background_text), steps=steps)


def patnet_resnet50(backbone_weights: str | Path | None = None, text_guide: TextGuide | None = None,
                    dropout: float = 0.0, support: Mapping[str, torch.Tensor] | None = None) -> PATNet:
    """PATNet with a ResNet-50 backbone (optionally ImageNet weights from ``backbone_weights``), an optional
    CD-TG ``text_guide`` and an optional primed ``support`` set (see :class:`PATNet`)."""
    return PATNet(RESNET50_LAYERS, RESNET50_WIDTHS, backbone_weights=backbone_weights, text_guide=text_guide,
                  dropout=dropout, support=support)
