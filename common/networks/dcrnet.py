"""DCRNet: a ResNet-34 U-Net whose deepest feature is enhanced by within-image and cross-image relations.

Reference:
    Z. Yin, K. Liang, Z. Ma, J. Guo, "Duplex Contextual Relation Network for Polyp Segmentation",
    IEEE ISBI 2022 (arXiv:2103.06725). Official code: github.com/PRIS-CV/DCRNet (``lib/DCRNet.py``,
    ``lib/UNet_ResNet34.py``, ``lib/modules.py``), used unchanged as an EndoKED baseline
    (``EndoKED_SEG_Baselines/DCRNet``).

Architecture (strides relative to the ``H x W`` input; widths of the published network)::

    stem  = ReLU(BN(Conv7x7/2(x)))                      [B, 64, H/2, W/2]   (firstconv, firstbn)
    e1..e4 = ResNet-34 stages after a 3x3/2 max pool      64, 128, 256, 512 channels at H/4 .. H/32
    y     = PAM(e4) + ECRM(e4)                            interior + exterior relations, [B, 512, H/32, W/32]
    U-Net decoder (DecoderBlock: conv3x3 C->C/4, conv3x3 C/4->C', nearest x2):
    d4 = decoder4(center(y) ++ e3);  d3 = decoder3(d4 ++ e2);  d2 = decoder2(d3 ++ e1);  d1 = decoder1(d2 ++ stem)
    side logits f_i = finalconv_i(d_i) (conv3x3 -> 32, BN, ReLU, Dropout2d(0.1), conv1x1), at strides 1, 2, 4, 8.

Interior contextual relation (``sa_head``, DANet's position attention), ``x [B, C, hw]``::

    A[i, j] = softmax_j((W_q x)_i . (W_k x)_j)  [B, hw, hw];   PAM(x) = gamma * (W_v x) A^T + x   (gamma starts at 0)

Exterior contextual relation (ECRM: ``L``, ``X``, ``phi``, ``psi``, ``delta``, ``rho``, ``g`` and the memory bank)::

    X = ReLU(BN(Conv3x3(e4)))  [B, C, h, w];   L = Conv1x1(e4)  [B, N, h, w]   (N = out_channels; L is also the
    coarse "aux" logit map, supervised)
    f = X softmax_hw(L)^T  [B, C, N]                    region embedding of each image
    bank [S, C, N]: a FIFO of region embeddings written (detached) in training mode (``bank_ptr`` = next slot)
    q = phi(bank) [S, K],  v = delta(bank) [S, K],  k = psi(X) [B, K, hw]    (phi/psi/delta/rho: Conv1d-BN-ReLU)
    logits = q k  [B, S, hw]
    ECRM(e4) = g([X, rho(context)])                     g: Conv1x1-BN-ReLU, 2C -> C

with ``context`` computed as the official code does (``official_relation=True``, see
:func:`batch_normalised_context`): the softmax runs over the *images of the batch* for each position and slot,
``rho`` runs on a ``[hw, K, B]`` tensor and its ``[hw, C, B]`` output is reinterpreted row-major as
``[B, C, h, w]``. At test time the official scripts feed one image at a time, where that softmax is 1 and the
context is the same for every image (``rho(sum_s v_s)`` scattered over the map): the cross-image branch acts as a
bias learnt from the bank. ``official_relation=False`` gives the relation the paper describes instead
(:func:`slot_normalised_context`: softmax over the bank slots for each position, layout kept).

Return convention: in **training** mode ``forward`` returns ``(aux, f4, f3, f2, f1)``, all ``[B, N, H, W]``
(bilinear, ``align_corners=True``), which the official code supervises with equal weights; in **eval** mode it
returns ``f1``, the map the official test scripts threshold after a sigmoid.

Differences from the official code, and why:
    * The bank is written only in training mode. The official test scripts call ``model(image)`` with its default
      ``flag='train'``, so they keep writing test images into the bank while testing (the output then depends on
      the order of the test images); here evaluation is deterministic given the buffers. The official
      ``flag='test'`` path (attend to the batch's own embeddings) is not used by any official script and is not
      reproduced.
    * In eval mode every image is treated as a batch of one (how the official scripts test), so an image's output
      does not depend on the other images of its batch.
    * The bank slots used are those written so far (non-zero rows: region embeddings are averages of ReLU
      features), which is what the official ``bank[0:ptr]`` / ``bank_full`` logic selects, without the Python
      flag (not in the state dict) that ``nn.DataParallel`` replicas lose. If no slot is written yet (a fresh
      network in eval mode), all slots are used.
    * ``fusion`` (a 1x1 convolution the official class defines but never applies) is kept as two buffers with its
      official names, so official checkpoints load strictly and no parameter is left without a gradient (the
      bundle trains under DistributedDataParallel without ``find_unused_parameters``). The official parameter
      count is ours plus its ``C*C + C`` values.

``H`` and ``W`` must be multiples of 32. Training needs at least two bank entries after the first write (a batch
of two or more), because ``phi`` and ``delta`` batch-normalise over the bank slots, as in the original.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.models.resnet import BasicBlock, ResNet
from torch import nn

from common.utils.checkpoints import load_state_dict_strict, read_state_dict

__all__ = [
    "DecoderBlock",
    "PositionAttention",
    "UnusedConv1x1",
    "region_embeddings",
    "batch_normalised_context",
    "slot_normalised_context",
    "resnet_encoder",
    "DCRNet",
    "load_dcrnet_checkpoint",
]

logger = logging.getLogger(__name__)


def _conv_bn_relu_2d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """``ReLU(BN(Conv2d))`` without conv bias, "same" padding (keys ``0.weight``, ``1.*``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


def _conv_bn_relu_1d(in_channels: int, out_channels: int) -> nn.Sequential:
    """``ReLU(BN(Conv1d_1x1))`` without conv bias, on ``[B, C, L]`` (keys ``0.weight``, ``1.*``)."""
    return nn.Sequential(nn.Conv1d(in_channels, out_channels, 1, bias=False), nn.BatchNorm1d(out_channels), nn.ReLU())


def _side_head(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    """``Conv1x1(Dropout2d(ReLU(BN(Conv3x3(x)))))``: one side-output logit head (keys ``0``, ``1``, ``4``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, mid_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(mid_channels),
        nn.ReLU(),
        nn.Dropout2d(0.1),
        nn.Conv2d(mid_channels, out_channels, 1),
    )


class DecoderBlock(nn.Module):
    """LinkNet-style decoder step: ``Up2(ReLU(BN(Conv3x3(ReLU(BN(Conv3x3(x)))))))``.

    ``[B, C, h, w] -> [B, out_channels, 2h, 2w]``; the middle width is ``C // 4``, the upsampling is nearest.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid = in_channels // 4
        self.conv1 = nn.Conv2d(in_channels, mid, 3, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(mid)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, out_channels, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(out_channels)
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.norm1(self.conv1(x)))
        x = self.relu2(self.norm2(self.conv2(x)))
        return F.interpolate(x, scale_factor=2, mode="nearest")


class PositionAttention(nn.Module):
    """Position attention of DANet (Fu et al., CVPR 2019): DCRNet's interior contextual relation.

    With ``x [B, C, hw]``, ``q = W_q x``, ``k = W_k x`` (``C -> C // reduction``, 1x1 with bias), ``v = W_v x``::

        A[b, i, j] = softmax_j(q_i . k_j)          # [B, hw, hw]
        y[b, :, i] = gamma * sum_j A[b, i, j] v_j + x_i

    ``[B, C, h, w] -> [B, C, h, w]``; ``gamma`` is a learnt scalar initialised to 0.
    """

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        if channels // reduction < 1:
            raise ValueError(f"PositionAttention: channels ({channels}) must be >= reduction ({reduction}).")
        self.query_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.key_conv = nn.Conv2d(channels, channels // reduction, 1)
        self.value_conv = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        query = self.query_conv(x).flatten(2)  # [B, C', hw]
        key = self.key_conv(x).flatten(2)
        attention = torch.softmax(query.transpose(1, 2) @ key, dim=-1)  # [B, hw (query), hw (key)]
        out = self.value_conv(x).flatten(2) @ attention.transpose(1, 2)  # [B, C, hw]
        return self.gamma * out.reshape(x.shape) + x


class UnusedConv1x1(nn.Module):
    """The weights of a ``C -> C`` 1x1 convolution that the official DCRNet defines (``fusion``) but never applies.

    Held as buffers named ``weight`` ``[C, C, 1, 1]`` and ``bias`` ``[C]`` so that official checkpoints load
    strictly; it has no ``forward``.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.zeros(channels, channels, 1, 1))
        self.register_buffer("bias", torch.zeros(channels))


def region_embeddings(features: torch.Tensor, region_logits: torch.Tensor) -> torch.Tensor:
    """Soft region pooling: ``f[b, :, n] = sum_p softmax_p(L[b, n])_p X[b, :, p]``.

    Args:
        features: ``X [B, C, h, w]``.
        region_logits: ``L [B, N, h, w]``; the softmax runs over the ``h*w`` positions of each map.

    Returns:
        ``[B, C, N]``, one embedding per image and region map.
    """
    weights = torch.softmax(region_logits.flatten(2), dim=-1)  # [B, N, hw]
    return features.flatten(2) @ weights.transpose(1, 2)


def batch_normalised_context(
    logits: torch.Tensor,
    values: torch.Tensor,
    rho: Callable[[torch.Tensor], torch.Tensor],
    height: int,
    width: int,
    per_image: bool,
) -> torch.Tensor:
    """The cross-image context exactly as the official ``attentive_interaction`` computes it.

    With ``logits [B, S, hw]`` (slot ``s`` vs position ``p`` of image ``b``) and ``values [S, K]``::

        A[p, s, b]  = softmax_b(logits[b, s, p])           # normalised over the images of the batch
        Z[p, :, b]  = sum_s A[p, s, b] values[s]            # [hw, K, B]
        R           = rho(Z)                                # [hw, C, B]: Conv1d over K, the batch as length
        out         = R read row-major as [B, C, h, w]

    The last step moves values across channels, positions and images (a ``view`` in the original). With
    ``per_image=True`` each image is computed as a batch of one, as the official test scripts run: the softmax over
    one image is 1, so ``Z[p, :, b] = sum_s values[s]`` for every position, and ``R[:, :, b]`` ``[hw, C]`` is read
    row-major as that image's ``[C, h, w]``.

    Args:
        logits: ``[B, S, hw]``.
        values: ``[S, K]``.
        rho: ``[n, K, L] -> [n, C, L]``.
        height, width: ``h`` and ``w`` with ``h * w = hw``.
        per_image: treat every image as its own batch (eval mode).

    Returns:
        ``[B, C, h, w]``.
    """
    batch = logits.shape[0]
    by_position = logits.permute(2, 1, 0)  # [hw, S, B]
    if per_image:  # a softmax over a batch of one image: exactly 1 (NaN where the logit is not finite, as there)
        weights = torch.softmax(by_position.unsqueeze(-1), dim=-1).squeeze(-1)
    else:
        weights = torch.softmax(by_position, dim=-1)
    mixed = (weights.transpose(1, 2) @ values).transpose(1, 2)  # [hw, K, B]
    related = rho(mixed)  # [hw, C, B]
    if per_image:
        related = related.permute(2, 0, 1)  # [B, hw, C]: each image's [hw, C] block on its own
    return related.reshape(batch, -1, height, width)


def slot_normalised_context(
    logits: torch.Tensor, values: torch.Tensor, rho: Callable[[torch.Tensor], torch.Tensor], height: int, width: int
) -> torch.Tensor:
    """The cross-image context as the paper describes it: each position attends to the bank slots.

    ``A[b, s, p] = softmax_s(logits[b, s, p])``, ``Z[b, :, p] = sum_s A[b, s, p] values[s]`` ``[B, K, hw]``,
    ``out = rho(Z)`` ``[B, C, hw]`` reshaped to ``[B, C, h, w]`` (layout kept, images independent).
    """
    weights = torch.softmax(logits, dim=1)  # [B, S, hw]
    return rho(values.transpose(0, 1) @ weights).reshape(logits.shape[0], -1, height, width)


def resnet_encoder(
    in_channels: int = 3,
    layers: Sequence[int] = (3, 4, 6, 3),
    channels: Sequence[int] = (64, 128, 256, 512),
    pretrained_path: str | os.PathLike | None = None,
) -> ResNet:
    """A torchvision-layout ResNet with basic blocks (ResNet-34 by default), built by timm.

    State-dict keys are torchvision's (``conv1``, ``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``, ``fc``),
    so the official ImageNet file ``resnet34-b627a593.pth`` (or ``-333f7ec4``) loads strictly, 1000-class ``fc``
    included; DCRNet keeps the stem and the four stages and drops ``fc``, as the official code does.

    Args:
        in_channels: image channels.
        layers: blocks per stage.
        channels: stage widths (the 7x7 stem always has 64 outputs, as in torchvision; a first stage of another
            width starts with a projection shortcut).
        pretrained_path: ImageNet checkpoint with torchvision's key names, loaded strictly.
    """
    model = ResNet(block=BasicBlock, layers=tuple(layers), channels=tuple(channels), in_chans=in_channels,
                   zero_init_last=False)
    if pretrained_path is not None:
        load_state_dict_strict(model, read_state_dict(pretrained_path), pretrained_path)
        logger.info("loaded ResNet ImageNet weights from '%s'", pretrained_path)
    return model


class DCRNet(nn.Module):
    """DCRNet (Yin et al., ISBI 2022) with the official module names (see the module docstring).

    Args:
        in_channels: image channels.
        out_channels: logit channels ``N`` (1 for polyps); also the number of region maps per image in the bank.
        encoder_layers: blocks per ResNet stage ((3, 4, 6, 3): ResNet-34).
        encoder_channels: ResNet stage widths ``c1..c4``; the relation modules work at ``C = c4`` with
            ``K = c4 // 2`` (512 and 256 in the published network).
        head_channels: hidden width of the four side-output heads.
        bank_size: memory-bank slots ``S`` (20 in the official training and EndoKED scripts).
        official_relation: cross-image context as the official code computes it
            (:func:`batch_normalised_context`, default) or as the paper describes it
            (:func:`slot_normalised_context`); both use the same weights.
        pretrained_backbone: official torchvision ImageNet ResNet file (``resnet34-b627a593.pth``), loaded
            strictly into :func:`resnet_encoder`; its ``fc`` is dropped.
        checkpoint: a full DCRNet state dict with the official keys (``{"model"|"state_dict": sd}`` wrappers and
            ``module.`` prefixes accepted), loaded strictly after ``pretrained_backbone``, bank buffers included.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        encoder_layers: Sequence[int] = (3, 4, 6, 3),
        encoder_channels: Sequence[int] = (64, 128, 256, 512),
        head_channels: int = 32,
        bank_size: int = 20,
        official_relation: bool = True,
        pretrained_backbone: str | os.PathLike | None = None,
        checkpoint: str | os.PathLike | None = None,
    ) -> None:
        super().__init__()
        if len(encoder_layers) != 4 or len(encoder_channels) != 4:
            raise ValueError("DCRNet: encoder_layers and encoder_channels must have four entries each.")
        if bank_size < 1:
            raise ValueError(f"DCRNet: bank_size must be >= 1, got {bank_size}.")
        c1, c2, c3, c4 = encoder_channels
        self.bank_size = bank_size
        self.official_relation = official_relation
        resnet = resnet_encoder(in_channels, encoder_layers, encoder_channels, pretrained_backbone)
        self.firstconv, self.firstbn, self.firstrelu = resnet.conv1, resnet.bn1, resnet.act1
        self.firstmaxpool = resnet.maxpool
        self.encoder1, self.encoder2 = resnet.layer1, resnet.layer2
        self.encoder3, self.encoder4 = resnet.layer3, resnet.layer4
        # decoder (ResNet34Unet)
        self.center = DecoderBlock(c4, c4)
        self.decoder4 = DecoderBlock(c4 + c3, c3)
        self.decoder3 = DecoderBlock(c3 + c2, c2)
        self.decoder2 = DecoderBlock(c2 + c1, c1)
        self.decoder1 = DecoderBlock(c1 + self.firstconv.out_channels, c1)  # d2 ++ stem output (64 channels)
        self.finalconv1 = _side_head(c1, head_channels, out_channels)
        self.finalconv2 = _side_head(c1, head_channels, out_channels)
        self.finalconv3 = _side_head(c2, head_channels, out_channels)
        self.finalconv4 = _side_head(c3, head_channels, out_channels)
        # memory bank: network state, saved in the state dict as in the original
        self.register_buffer("bank_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("bank", torch.zeros(bank_size, c4, out_channels))
        # exterior (cross-image) relation
        self.L = nn.Conv2d(c4, out_channels, 1)
        self.X = _conv_bn_relu_2d(c4, c4, 3)
        self.phi = _conv_bn_relu_1d(c4, c4 // 2)
        self.psi = _conv_bn_relu_1d(c4, c4 // 2)
        self.delta = _conv_bn_relu_1d(c4, c4 // 2)
        self.rho = _conv_bn_relu_1d(c4 // 2, c4)
        self.g = _conv_bn_relu_2d(2 * c4, c4, 1)
        # interior (within-image) relation
        self.sa_head = PositionAttention(c4)
        self.fusion = UnusedConv1x1(c4)
        if checkpoint is not None:
            load_dcrnet_checkpoint(self, checkpoint)

    @torch.no_grad()
    def _push_to_bank(self, embeddings: torch.Tensor) -> None:
        """Write ``embeddings [B, C, N]`` at ``bank_ptr`` as the official queue does: only up to the last slot
        (the rest of the batch is dropped), then move the pointer, wrapping to 0."""
        start = int(self.bank_ptr)
        count = min(embeddings.shape[0], self.bank_size - start)
        self.bank[start:start + count] = embeddings[:count].to(self.bank.dtype)
        self.bank_ptr[0] = (start + count) % self.bank_size

    def _memory(self) -> torch.Tensor:
        """The written bank slots ``[S', C, N]`` (every slot while none is written)."""
        written = self.bank.flatten(1).ne(0).any(dim=1)
        return self.bank[written | ~written.any()]

    def _cross_image_context(self, features: torch.Tensor) -> torch.Tensor:
        """``rho(context)`` for ``X [B, C, h, w]`` from the bank: ``[B, C, h, w]``."""
        _, _, height, width = features.shape
        memory = self._memory()
        # one entry per (slot, region map): [S', K, N] -> [S' * N, K]
        queries = self.phi(memory).transpose(1, 2).flatten(0, 1)
        values = self.delta(memory).transpose(1, 2).flatten(0, 1)
        logits = queries @ self.psi(features.flatten(2))  # [B, S'N, hw]
        if self.official_relation:
            return batch_normalised_context(logits, values, self.rho, height, width, per_image=not self.training)
        return slot_normalised_context(logits, values, self.rho, height, width)

    def _decode(self, fused: torch.Tensor, e3: torch.Tensor, e2: torch.Tensor, e1: torch.Tensor,
                stem: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Side logits ``f4, f3, f2, f1`` at strides 8, 4, 2, 1 (not yet upsampled)."""
        d4 = self.decoder4(torch.cat([self.center(fused), e3], dim=1))
        d3 = self.decoder3(torch.cat([d4, e2], dim=1))
        d2 = self.decoder2(torch.cat([d3, e1], dim=1))
        d1 = self.decoder1(torch.cat([d2, stem], dim=1))
        return self.finalconv4(d4), self.finalconv3(d3), self.finalconv2(d2), self.finalconv1(d1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...] | torch.Tensor:
        """``x [B, C_in, H, W]`` (ImageNet-normalised) -> training: ``(aux, f4, f3, f2, f1)``; eval: ``f1``; every
        map ``[B, N, H, W]`` logits."""
        if x.ndim != 4 or x.shape[-2] % 32 or x.shape[-1] % 32:
            raise ValueError(f"DCRNet: input must be [B, C, H, W] with H and W multiples of 32, got {tuple(x.shape)}.")
        stem = self.firstrelu(self.firstbn(self.firstconv(x)))
        e1 = self.encoder1(self.firstmaxpool(stem))
        e2 = self.encoder2(e1)
        e3 = self.encoder3(e2)
        e4 = self.encoder4(e3)
        region_logits = self.L(e4)
        features = self.X(e4)
        if self.training:
            self._push_to_bank(region_embeddings(features, region_logits))
        exterior = self.g(torch.cat([features, self._cross_image_context(features)], dim=1))
        f4, f3, f2, f1 = self._decode(self.sa_head(e4) + exterior, e3, e2, e1, stem)
        if not self.training:
            return f1
        size = x.shape[-2:]
        coarse = (region_logits, f4, f3, f2)  # strides 32, 8, 4, 2
        return (*(F.interpolate(m, size=size, mode="bilinear", align_corners=True) for m in coarse), f1)


def load_dcrnet_checkpoint(model: DCRNet, path: str | os.PathLike) -> None:
    """Strictly load a full DCRNet state dict (official keys, bank buffers included; ``{"model"|"state_dict": sd}``
    and ``module.``-prefixed keys accepted) into ``model`` in place.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, or missing / unexpected / shape-mismatched keys (named in the message).
    """
    state_dict = read_state_dict(path)
    load_state_dict_strict(model, state_dict, path)
    logger.info("loaded DCRNet weights from '%s' (%d tensors)", path, len(state_dict))
