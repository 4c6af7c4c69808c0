"""PIDNet-S: a three-branch real-time segmentation network (detail P, context I, boundary D branches).

Reference:
    J. Xu, Z. Xiong, S. P. Bhattacharyya, "PIDNet: A Real-time Semantic Segmentation Network Inspired by PID
    Controllers", CVPR 2023 (arXiv:2206.02066). Official code: github.com/XuJiacong/PIDNet.

Architecture (``C = planes``; PIDNet-S: ``C = 32``, ``n = 3``, PAPPM width 96, head width 128; PIDNet-M: ``C = 64``)::

    stem   conv1 (two stride-2 3x3 conv-BN-ReLU) -> layer1 (2 basic blocks, C) -> layer2 (2 basic blocks, 2C)
           -> x [B, 2C, H/8, W/8], shared by the three branches
    I      layer3 (n blocks, 4C, /16) -> layer4 (n blocks, 8C, /32) -> layer5 (2 bottlenecks, 16C, /64) -> PAPPM (4C)
    P      at /8: layer3_ (2 blocks, 2C) -Pag(I3)-> layer4_ (2 blocks, 2C) -Pag(I4)-> layer5_ (bottleneck, 4C)
    D      at /8: layer3_d (C) + diff3(I3) -> layer4_d (2C) + diff4(I4) -> layer5_d (bottleneck, 4C)
    fuse   Bag(P, I, D) -> final_layer -> logits [B, K, H/8, W/8], upsampled bilinearly to [B, K, H, W]
    aux    seghead_p on the stage-3 P feature (semantic), seghead_d on the stage-4 D feature (boundary)

Distinctive modules (``U`` = bilinear resize, ``align_corners=False``; ``sigmoid`` element-wise):

* Pag, pixel-attention-guided fusion of the detail feature ``P [B, 2C, h, w]`` with the compressed context
  ``I [B, 2C, h', w']`` (``compression3/4``: 1x1 conv-BN of the I stage); ``f_x, f_y``: 1x1 conv-BN ``2C -> C``::

      s     = sigmoid( sum_c f_x(P) * U(f_y(I)) )          # [B, 1, h, w]
      P_out = (1 - s) * P + s * U(I)                       # [B, 2C, h, w]

* Light Bag, boundary-attention-guided fusion of ``P, I, D [B, 4C, h, w]``; ``conv_p, conv_i``: 1x1 conv-BN::

      e   = sigmoid(D)
      out = conv_p((1 - e) * I + P) + conv_i(I + e * P)   # [B, 4C, h, w]

* PAPPM, parallel aggregation pyramid pooling on ``x [B, 16C, h, w]`` (``b = ppm_planes``); every branch is
  BN-ReLU-1x1 conv, branch ``k = 1..4`` after AvgPool(5, 2), AvgPool(9, 4), AvgPool(17, 8) (kernel, stride; zero
  padding ``kernel // 2``, counted in the average) and global pooling::

      y_0 = scale0(x);  y_k = U(scale_k(x)) + y_0          # [B, b, h, w]
      out = compression([y_0, G([y_1..y_4])]) + shortcut(x)   # G: BN-ReLU-3x3 conv in 4 groups; out [B, 4C, h, w]

* segment head: BN-ReLU-3x3 conv (``head_planes``) -> BN-ReLU-1x1 conv with bias (``out_channels``).

Module names follow the official code so that its checkpoints load (``conv1``, ``layer1``..``layer5``, ``layer3_``..,
``layer3_d``.., ``compression3/4``, ``pag3/4``, ``diff3/4``, ``spp``, ``dfm``, ``seghead_p``, ``seghead_d``,
``final_layer``). With the defaults (PIDNet-S, 1 output channel, no boundary head) the network has 7,697,634
parameters.

Differences from the original, and why:

* Boundary head. The original trains with ``augment=True``: a semantic head on P (``seghead_p``, CE x 0.4), the
  final head (OHEM CE x 1) and a boundary head on D (``seghead_d``, class-balanced BCE x 20 against dilated Canny
  edges of the label, plus an OHEM CE on the final logits restricted to pixels whose boundary probability exceeds
  0.8). This bundle supervises every returned map with the same mask loss, which cannot supervise a boundary map,
  so by default (``boundary_head=False``) ``seghead_d`` is not built: training returns the two mask maps
  ``(P head, final)``, and the D branch still gets its gradient through the Bag attention ``sigmoid(D)``.
  ``boundary_head=True`` builds it and appends its boundary logits as a third training output, for a trainer with a
  boundary loss. Official checkpoints load either way (:func:`load_pidnet_checkpoint` drops ``seghead_d.*`` when the
  head is not built).
* The original aliases the stage-3 P and stage-4 D features that feed the auxiliary heads and then applies an
  in-place ReLU to them, so those heads see ``ReLU(P3)`` and ``ReLU(D4)``; this implementation computes that
  explicitly (no in-place operations).
* Only the PIDNet-S/M layout (``m = 2``: PAPPM and Light Bag) is built; PIDNet-L (``m = 3``, DAPPM and Bag) is not.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "PagFM",
    "LightBag",
    "PAPPM",
    "SegmentHead",
    "PIDNet",
    "IMAGENET_MODULES",
    "PIDNetImageNetPart",
    "load_pidnet_imagenet",
    "load_pidnet_checkpoint",
]

logger = logging.getLogger(__name__)

# Modules held by the official ImageNet files (PIDNet_{S,M}_ImageNet.pth.tar, besides their classification head): the
# stem and I branch up to layer5 and the P branch; not PAPPM, the D branch, Bag or the segmentation heads. For
# PIDNet-S these are 302 tensors holding 6,456,274 values (BN statistics included), the count a public report of
# loading the official file gives; mmsegmentation's PIDNet also notes that the D branch is not pretrained.
IMAGENET_MODULES: tuple[str, ...] = (
    "conv1", "layer1", "layer2", "layer3", "layer4", "layer5",
    "compression3", "compression4", "pag3", "pag4", "layer3_", "layer4_", "layer5_",
)
# Buffers of the official training wrapper (``FullModel``: the network under ``model.``, its losses beside it).
_WRAPPER_LOSS_PREFIXES: tuple[str, ...] = ("sem_loss.", "bd_loss.")


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (``align_corners=False``, as the official ``algc = False``)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _conv_bn(in_ch: int, out_ch: int, kernel_size: int, stride: int = 1) -> nn.Sequential:
    """``BN(Conv(x))``, bias-free convolution with "same" padding; state-dict keys ``0.weight``, ``1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_ch),
    )


def _bn_relu_conv(in_ch: int, out_ch: int, kernel_size: int, groups: int = 1) -> list[nn.Module]:
    """The pre-activation triple ``[BN, ReLU, Conv]`` (bias-free) used by PAPPM."""
    return [
        nn.BatchNorm2d(in_ch),
        nn.ReLU(),
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, groups=groups, bias=False),
    ]


class BasicBlock(nn.Module):
    """ResNet basic block ``[B, inplanes, h, w] -> [B, planes, h/stride, w/stride]``.

    ``y = BN(Conv3(ReLU(BN(Conv3_s(x))))) + shortcut(x)``, followed by a ReLU when ``relu_out``; ``shortcut`` is a
    strided 1x1 conv-BN (``downsample``) when the shape changes, the identity otherwise.
    """

    expansion = 1
    default_relu_out = True

    def __init__(self, inplanes: int, planes: int, stride: int = 1, relu_out: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        out = planes * self.expansion
        self.downsample = _conv_bn(inplanes, out, 1, stride) if stride != 1 or inplanes != out else None
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + shortcut
        return self.relu(y) if self.relu_out else y


class Bottleneck(nn.Module):
    """Bottleneck block with expansion 2, ``[B, inplanes, h, w] -> [B, 2 planes, h/stride, w/stride]``.

    ``y = BN(Conv1(ReLU(BN(Conv3_s(ReLU(BN(Conv1(x)))))))) + shortcut(x)``, then a ReLU when ``relu_out``.
    """

    expansion = 2
    default_relu_out = False

    def __init__(self, inplanes: int, planes: int, stride: int = 1, relu_out: bool = False) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU()
        self.downsample = _conv_bn(inplanes, out, 1, stride) if stride != 1 or inplanes != out else None
        self.relu_out = relu_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y)) + shortcut
        return self.relu(y) if self.relu_out else y


def _residual_stage(
    block: type[BasicBlock] | type[Bottleneck], inplanes: int, planes: int, blocks: int, stride: int = 1
) -> nn.Sequential:
    """``blocks`` residual blocks, the first one strided.

    Output activations as in the official stages: the first block ends as its type does by default (ReLU for a basic
    block, none for a bottleneck), later blocks with a ReLU except the last one.
    """
    layers = [block(inplanes, planes, stride, relu_out=block.default_relu_out)]
    width = planes * block.expansion
    layers += [block(width, planes, relu_out=i < blocks - 1) for i in range(1, blocks)]
    return nn.Sequential(*layers)


class PagFM(nn.Module):
    """Pag: pixel-attention-guided fusion of a detail map ``x [B, C, h, w]`` and a context map ``y [B, C, h', w']``.

    ``s = sigmoid(sum_c f_x(x) * U(f_y(y)))`` ``[B, 1, h, w]``; returns ``(1 - s) * x + s * U(y)`` ``[B, C, h, w]``.
    """

    def __init__(self, in_channels: int, mid_channels: int) -> None:
        super().__init__()
        self.f_x = _conv_bn(in_channels, mid_channels, 1)
        self.f_y = _conv_bn(in_channels, mid_channels, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        query = _resize(self.f_y(y), size)
        similarity = torch.sigmoid((self.f_x(x) * query).sum(dim=1, keepdim=True))
        return (1 - similarity) * x + similarity * _resize(y, size)


class LightBag(nn.Module):
    """Light Bag: boundary-attention-guided fusion of ``p, i, d [B, C, h, w]`` -> ``[B, C_out, h, w]``.

    ``e = sigmoid(d)``; returns ``conv_p((1 - e) * i + p) + conv_i(i + e * p)`` with 1x1 conv-BN ``conv_p, conv_i``:
    where the D branch sees a boundary (``e -> 1``) the detail feature dominates, elsewhere the context does.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv_p = _conv_bn(in_channels, out_channels, 1)
        self.conv_i = _conv_bn(in_channels, out_channels, 1)

    def forward(self, p: torch.Tensor, i: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        edge = torch.sigmoid(d)
        return self.conv_p((1 - edge) * i + p) + self.conv_i(i + edge * p)


class PAPPM(nn.Module):
    """Parallel aggregation PPM ``[B, inplanes, h, w] -> [B, outplanes, h, w]`` (equations in the module docstring).

    The four pooled branches are summed with the unpooled one and then processed together by one grouped 3x3
    convolution (``scale_process``, 4 groups), instead of DAPPM's sequential cascade.
    """

    def __init__(self, inplanes: int, branch_planes: int, outplanes: int) -> None:
        super().__init__()
        self.scale1 = nn.Sequential(nn.AvgPool2d(5, stride=2, padding=2), *_bn_relu_conv(inplanes, branch_planes, 1))
        self.scale2 = nn.Sequential(nn.AvgPool2d(9, stride=4, padding=4), *_bn_relu_conv(inplanes, branch_planes, 1))
        self.scale3 = nn.Sequential(nn.AvgPool2d(17, stride=8, padding=8), *_bn_relu_conv(inplanes, branch_planes, 1))
        self.scale4 = nn.Sequential(nn.AdaptiveAvgPool2d(1), *_bn_relu_conv(inplanes, branch_planes, 1))
        self.scale0 = nn.Sequential(*_bn_relu_conv(inplanes, branch_planes, 1))
        self.scale_process = nn.Sequential(*_bn_relu_conv(4 * branch_planes, 4 * branch_planes, 3, groups=4))
        self.compression = nn.Sequential(*_bn_relu_conv(5 * branch_planes, outplanes, 1))
        self.shortcut = nn.Sequential(*_bn_relu_conv(inplanes, outplanes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        base = self.scale0(x)
        pooled = [_resize(scale(x), size) + base for scale in (self.scale1, self.scale2, self.scale3, self.scale4)]
        processed = self.scale_process(torch.cat(pooled, dim=1))
        return self.compression(torch.cat([base, processed], dim=1)) + self.shortcut(x)


class SegmentHead(nn.Module):
    """``conv2(ReLU(bn2(conv1(ReLU(bn1(x))))))``: 3x3 conv to ``inter`` channels, then a 1x1 conv with bias.

    ``[B, in_ch, h, w] -> [B, out_ch, h, w]`` (logits at the feature's resolution).
    """

    def __init__(self, in_ch: int, inter: int, out_ch: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, inter, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(inter)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(inter, out_ch, 1, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.relu(self.bn2(self.conv1(self.relu(self.bn1(x))))))


class PIDNet(nn.Module):
    """PIDNet (Xu et al., CVPR 2023) in its S/M layout; the defaults are PIDNet-S with one output channel.

    Return convention: in **training** mode the tuple ``(P, F)`` of logit maps ``[B, out_channels, H, W]``, ``P``
    from the auxiliary head on the stage-3 detail feature and ``F`` the final (Bag-fused) prediction, both at 1/8
    resolution upsampled bilinearly to the input size (plus the boundary logits ``[B, 1, H, W]`` as a third map when
    ``boundary_head``); in **eval** mode the single map ``F``, the one the official inference uses.

    ``H`` and ``W`` must be multiples of 32. PAPPM's global-pooling branch normalises one value per channel and
    sample, so training needs batches of at least two (the official loader drops the last incomplete batch).

    Args:
        in_channels: image channels.
        out_channels: classes of the segmentation heads (1 for binary polyp segmentation; 19 for Cityscapes).
        planes: base width ``C`` (32 for PIDNet-S, 64 for PIDNet-M).
        ppm_planes: PAPPM branch width (96).
        head_planes: hidden width of ``final_layer`` and ``seghead_p`` (128).
        n: basic blocks in the I-branch stages ``layer3`` and ``layer4`` (3).
        boundary_head: build the D-branch boundary head ``seghead_d`` and return its logits in training.
        pretrained_backbone: path of an official ImageNet file (e.g. ``PIDNet_S_ImageNet.pth.tar``), see
            :func:`load_pidnet_imagenet`.
        checkpoint: path of a full PIDNet checkpoint in the official format, loaded strictly after
            ``pretrained_backbone``, see :func:`load_pidnet_checkpoint`.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        planes: int = 32,
        ppm_planes: int = 96,
        head_planes: int = 128,
        n: int = 3,
        boundary_head: bool = False,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        c = planes
        self.boundary_head = boundary_head
        self.relu = nn.ReLU()
        # stem and I branch
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
        )
        self.layer1 = _residual_stage(BasicBlock, c, c, 2)
        self.layer2 = _residual_stage(BasicBlock, c, 2 * c, 2, stride=2)
        self.layer3 = _residual_stage(BasicBlock, 2 * c, 4 * c, n, stride=2)
        self.layer4 = _residual_stage(BasicBlock, 4 * c, 8 * c, n, stride=2)
        self.layer5 = _residual_stage(Bottleneck, 8 * c, 8 * c, 2, stride=2)
        # P branch
        self.compression3 = _conv_bn(4 * c, 2 * c, 1)
        self.compression4 = _conv_bn(8 * c, 2 * c, 1)
        self.pag3 = PagFM(2 * c, c)
        self.pag4 = PagFM(2 * c, c)
        self.layer3_ = _residual_stage(BasicBlock, 2 * c, 2 * c, 2)
        self.layer4_ = _residual_stage(BasicBlock, 2 * c, 2 * c, 2)
        self.layer5_ = _residual_stage(Bottleneck, 2 * c, 2 * c, 1)
        # D branch
        self.layer3_d = BasicBlock(2 * c, c, relu_out=False)
        self.layer4_d = _residual_stage(Bottleneck, c, c, 1)
        self.diff3 = _conv_bn(4 * c, c, 3)
        self.diff4 = _conv_bn(8 * c, 2 * c, 3)
        self.spp = PAPPM(16 * c, ppm_planes, 4 * c)
        self.dfm = LightBag(4 * c, 4 * c)
        self.layer5_d = _residual_stage(Bottleneck, 2 * c, 2 * c, 1)
        # heads
        self.seghead_p = SegmentHead(2 * c, head_planes, out_channels)
        if boundary_head:
            self.seghead_d = SegmentHead(2 * c, c, 1)
        self.final_layer = SegmentHead(4 * c, head_planes, out_channels)
        self._init_weights()
        if pretrained_backbone is not None:
            load_pidnet_imagenet(self, pretrained_backbone)
        if checkpoint is not None:
            load_pidnet_checkpoint(self, checkpoint)

    def _init_weights(self) -> None:
        """Official initialisation: Kaiming-normal (fan-out) convolutions, BN weight 1 and bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _branches(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, 3, H, W]`` -> (``ReLU(P3)`` ``[B, 2C, H/8, W/8]``, ``ReLU(D4)`` ``[B, 2C, H/8, W/8]``,
        final logits ``[B, K, H/8, W/8]``)."""
        x = self.relu(self.layer2(self.relu(self.layer1(self.conv1(x)))))
        size = x.shape[-2:]
        # stage 3
        p = self.layer3_(x)
        d = self.layer3_d(x)
        i = self.relu(self.layer3(x))
        p3 = self.relu(self.pag3(p, self.compression3(i)))
        d = d + _resize(self.diff3(i), size)
        # stage 4
        i = self.relu(self.layer4(i))
        p = self.pag4(self.layer4_(p3), self.compression4(i))
        d4 = self.relu(self.layer4_d(self.relu(d)) + _resize(self.diff4(i), size))
        # stage 5 and fusion
        p = self.layer5_(self.relu(p))
        d = self.layer5_d(d4)
        i = _resize(self.spp(self.layer5(i)), size)
        return p3, d4, self.final_layer(self.dfm(p, i, d))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        if x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"PIDNet: input height and width must be multiples of 32, got {tuple(x.shape[-2:])}.")
        size = x.shape[-2:]
        p3, d4, logits = self._branches(x)
        final = _resize(logits, size)
        if not self.training:
            return final
        outputs = (_resize(self.seghead_p(p3), size), final)
        if self.boundary_head:
            outputs += (_resize(self.seghead_d(d4), size),)
        return outputs


class PIDNetImageNetPart(nn.ModuleDict):
    """A view of the modules of ``model`` that an ImageNet file initialises (:data:`IMAGENET_MODULES`), under their
    own names, so that its state-dict keys are the network's (``conv1.0.weight``, ``pag3.f_x.0.weight``, ...)."""

    def __init__(self, model: PIDNet) -> None:
        super().__init__({name: getattr(model, name) for name in IMAGENET_MODULES})


def load_pidnet_imagenet(model: PIDNet, path: str | os.PathLike) -> None:
    """Load an official ImageNet PIDNet file (e.g. ``PIDNet_S_ImageNet.pth.tar``, ``{"state_dict": sd}``) in place.

    As in the official loader, the keys the segmentation network does not have (the classification head) are
    dropped. The rest must then fill the pretrained modules (:data:`IMAGENET_MODULES`) exactly: no key missing, none
    of a wrong shape, and none of another module (the D branch, PAPPM, Bag and heads keep their initialisation).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    network_keys = model.state_dict().keys()
    source = read_state_dict(path)
    state_dict = {k: v for k, v in source.items() if k in network_keys}
    load_state_dict_strict(PIDNetImageNetPart(model), state_dict, path)
    logger.info("loaded PIDNet ImageNet weights from '%s' (%d tensors; %d classifier tensors dropped)",
                path, len(state_dict), len(source) - len(state_dict))


def load_pidnet_checkpoint(model: PIDNet, path: str | os.PathLike) -> None:
    """Strictly load a full PIDNet checkpoint in the official format into ``model`` in place.

    Accepted: the network's own state dict, ``{"state_dict"|"model": sd}`` wrappers and ``module.`` prefixes
    (:func:`~common.utils.checkpoints.read_state_dict`), and the official training wrapper's keys: ``model.``-prefixed
    network keys beside the loss buffers ``sem_loss.*`` / ``bd_loss.*`` (dropped). The boundary head ``seghead_d.*`` is
    dropped when ``model`` has none; every other key must match exactly.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = {}
    for key, value in read_state_dict(path).items():
        if key.startswith(_WRAPPER_LOSS_PREFIXES):
            continue
        key = key.removeprefix("model.")
        if key.startswith("seghead_d.") and not model.boundary_head:
            continue
        state_dict[key] = value
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded PIDNet weights from '%s' (%d tensors)", path, len(state_dict))
