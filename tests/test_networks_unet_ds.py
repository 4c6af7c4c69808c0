"""Tests of the deep-supervised 3D U-Net of the URPC baseline (common/networks/unet_ds.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.networks.unet_ds import UNetDS3D

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(in_channels=1, out_channels=3, feature_scale=16)  # widths 4, 8, 16, 32, 64
SHAPE = (2, 1, 16, 32, 32)  # bottleneck 1x2x2: instance norm needs more than one voxel


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter count of UNetDS3D(1, 14)

# No published figure: counted by hand from the definition. Widths w = 64/4 .. 1024/4 = 16, 32, 64, 128, 256.
# conv 3x3x3 in->out (with bias) = 27*in*out + out; instance norm is affine-free (0); head 1x1x1 = in*14 + 14.
ENCODERS = [
    7_376,  # 1->16: 27*1*16 + 16 = 448;         16->16: 27*16*16 + 16 = 6,928
    41_536,  # 16->32: 27*16*32 + 32 = 13,856;    32->32: 27*32*32 + 32 = 27,680
    166_016,  # 32->64: 27*32*64 + 64 = 55,360;    64->64: 27*64*64 + 64 = 110,656
    663_808,  # 64->128: 27*64*128 + 128 = 221,312; 128->128: 27*128*128 + 128 = 442,496
    2_654_720,  # 128->256: 27*128*256 + 256 = 884,992; 256->256: 27*256*256 + 256 = 1,769,728
]
DECODERS = [  # finest first; input = skip w_k + upsampled w_{k+1}
    27_680,  # 16+32=48->16: 27*48*16 + 16 = 20,752;     16->16: 6,928
    110_656,  # 32+64=96->32: 27*96*32 + 32 = 82,976;     32->32: 27,680
    442_496,  # 64+128=192->64: 27*192*64 + 64 = 331,840; 64->64: 110,656
    1_769_728,  # 128+256=384->128: 27*384*128 + 128 = 1,327,232; 128->128: 442,496
]
HEADS = [238, 462, 910, 1_806]  # 16*14+14, 32*14+14, 64*14+14, 128*14+14
TOTAL = 5_887_432  # encoders 3,533,456 + decoders 2,350,560 + heads 3,416


def test_parameter_count_is_pinned_per_module() -> None:
    net = UNetDS3D(1, 14)
    assert [_n_params(m) for m in net.encoders] == ENCODERS
    assert [_n_params(m) for m in net.decoders] == DECODERS
    assert [_n_params(m) for m in net.heads] == HEADS
    assert sum(ENCODERS) + sum(DECODERS) + sum(HEADS) == TOTAL
    assert _n_params(net) == TOTAL
    assert [h.in_channels for h in net.heads] == [16, 32, 64, 128]
    # batch norm adds gamma, beta per conv output: 2 convs per block, 2*2*(16+32+64+128+256) = 1,984 in the encoder,
    # 2*2*(16+32+64+128) = 960 in the decoder -> 5,887,432 + 2,944
    assert _n_params(UNetDS3D(1, 14, normalization="batchnorm")) == TOTAL + 2_944


def test_instance_norm_is_affine_free_and_init_is_kaiming() -> None:
    net = UNetDS3D(1, 14)
    norms = [m for m in net.modules() if isinstance(m, nn.InstanceNorm3d)]
    assert len(norms) == 18 and not any(m.affine or m.track_running_stats for m in norms)  # 9 blocks x 2 convs
    weight = net.encoders[4].conv[0].weight  # 128 -> 256, fan_in = 27 * 128 = 3,456; 884,736 samples
    # kaiming normal, gain sqrt(2): std = sqrt(2 / 3456) = 0.024056
    assert weight.std().item() == pytest.approx(math.sqrt(2 / 3456), rel=0.01)
    assert abs(weight.mean().item()) < 1e-3


# ---------------------------------------------------------------- shapes, dropout, trace


def test_heads_are_full_size_logits_finest_first() -> None:
    torch.manual_seed(0)
    net = UNetDS3D(**TINY).eval()
    x = torch.randn(SHAPE)
    with torch.no_grad():
        heads = net.forward_heads(x)
        assert [tuple(h.shape) for h in heads] == [(2, 3, 16, 32, 32)] * 4
        assert torch.equal(net(x), heads[0])
    # head k is computed by heads[k] (width 4 * 2^k): a loss on head k reaches only that 1x1x1 convolution
    for k in range(4):
        net.zero_grad()
        net.forward_heads(x)[k].sum().backward()
        assert [m.weight.grad is not None for m in net.heads] == [i == k for i in range(4)]
        assert net.heads[k].in_channels == 4 * 2**k


def test_dropout_sits_after_every_decoder_stage_only_in_train_mode() -> None:
    net = UNetDS3D(**TINY)
    assert [d.p for d in net.dropouts] == [0.1, 0.2, 0.3, 0.5]  # finest first = (0.5, 0.3, 0.2, 0.1) reversed
    x = torch.randn(SHAPE)
    with torch.no_grad():
        torch.manual_seed(1)
        first = net.forward_heads(x)[3]
        torch.manual_seed(2)
        assert not torch.equal(net.forward_heads(x)[3], first)  # channels dropped at random
        net.eval()
        assert torch.equal(net.forward_heads(x)[3], net.forward_heads(x)[3])


def test_traces_in_eval_mode() -> None:
    torch.manual_seed(0)
    net = UNetDS3D(**TINY).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        traced = torch.jit.trace(net, x)
        other = torch.randn(SHAPE)
        torch.testing.assert_close(traced(other), net(other))


# ---------------------------------------------------------------- bad arguments


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(out_channels=0), "out_channels"),
        (dict(feature_scale=128), "feature_scale"),
        (dict(dropout=(0.5, 0.3, 0.2)), "dropout"),
        (dict(dropout=(0.5, 0.3, 0.2, 1.0)), "dropout"),
        (dict(normalization="layernorm"), "normalization"),
        (dict(normalization="groupnorm"), "multiple of 16"),  # feature_scale 16: first width 4
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetDS3D(**{**TINY, **kwargs})


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 1, 16, 32, 24), "divisible by 16"),
        ((1, 2, 16, 32, 32), r"expected input \[B, 1, D, H, W\]"),
        ((1, 16, 32, 32), r"expected input \[B, 1, D, H, W\]"),
        ((1, 1, 16, 16, 16), "single bottleneck voxel"),
    ],
)
def test_bad_inputs_are_named(shape: tuple[int, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        UNetDS3D(**TINY).forward_heads(torch.zeros(shape))
