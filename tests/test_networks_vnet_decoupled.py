"""Tests of DST's decoupled VNet and warm-start gradient reversal (common/networks/vnet_decoupled.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.networks.branches import Branches
from common.networks.vnet import VNet
from common.networks.vnet_decoupled import (
    DecoupledVNet,
    DualDecoupledVNet,
    GradientReverseFunction,
    WarmStartGradientReverse,
    warm_start_coefficient,
)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------- parameter count (hand-derived, no published figure)

# Per-module counts of the VNet (tests/test_networks_vnet.py, f = 32, C = 14): conv 3^3 = 27*in*out + out, k2
# (de)conv = 8*in*out + out, BN = 2*out.
ENCODER = {
    "block_one": 960, "block_one_dw": 16_576, "block_two": 221_568, "block_two_dw": 65_920,
    "block_three": 1_328_256, "block_three_dw": 262_912, "block_four": 5_310_720, "block_four_dw": 1_050_112,
    "block_five": 21_238_272,
}
DECODER = {
    "block_five_up": 1_049_344,  # 8*512*256 + 256 + 2*256
    "block_six": 5_310_720,  # 3 * (27*256*256 + 256 + 512)
    "block_six_up": 262_528,  # 8*256*128 + 128 + 256
    "block_seven": 1_328_256,  # 3 * (27*128*128 + 128 + 256)
    "block_seven_up": 65_728,  # 8*128*64 + 64 + 128
    "block_eight": 221_568,  # 2 * (27*64*64 + 64 + 128)
    "block_eight_up": 16_480,  # 8*64*32 + 32 + 64
    "block_nine": 27_744,  # 27*32*32 + 32 + 64
    "out_conv": 462,  # 32*14 + 14
}


def test_parameter_count_decoupled_vnet() -> None:
    # encoder: 960 + 16,576 + 221,568 + 65,920 + 1,328,256 + 262,912 + 5,310,720 + 1,050,112 + 21,238,272
    #        = 29,495,296
    assert sum(ENCODER.values()) == 29_495_296
    # one decoder: 1,049,344 + 5,310,720 + 262,528 + 1,328,256 + 65,728 + 221,568 + 16,480 + 27,744 + 462
    #            = 8,282,830;  VNet = encoder + one decoder = 29,495,296 + 8,282,830 = 37,778,126 (the official VNet)
    assert sum(DECODER.values()) == 8_282_830
    assert 29_495_296 + 8_282_830 == 37_778_126
    # DecoupledVNet = encoder + 3 decoders = 29,495,296 + 3 * 8,282,830 = 29,495,296 + 24,848,490 = 54,343,786;
    # the gradient reversal and the dropouts have no parameters.
    with torch.device("meta"):  # shapes only: no 54 M random draws
        model = DecoupledVNet(1, 14, 32, "batchnorm", has_dropout=True)
    assert _n_params(model) == 54_343_786
    children = {name: _n_params(child) for name, child in model.named_children()}
    assert children == {**ENCODER, **DECODER, "dropout": 0, "decoder_pseudo": 8_282_830,
                        "decoder_worst": 8_282_830, "grl": 0}
    assert {name: _n_params(child) for name, child in model.decoder_worst.named_children()} == {
        **DECODER, "dropout": 0}
    # AMOS (C = 16): three out_convs grow by 2 * (32 + 1) = 66 each -> + 198.
    with torch.device("meta"):
        assert _n_params(DecoupledVNet(1, 16, 32)) == 54_343_786 + 3 * 66
        assert _n_params(DualDecoupledVNet(1, 14, 32)) == 2 * 54_343_786


def test_state_dict_keys() -> None:
    model = DecoupledVNet(1, 3, n_filters=2)
    keys = list(model.state_dict())
    # The main path keeps the VNet keys: a plain VNet state dict is a subset.
    assert set(VNet(1, 3, n_filters=2).state_dict()) <= set(keys)
    # VNet 205 keys; a decoder = 4 up blocks * 7 (deconv w, b + BN w, b, mean, var, count) + 9 convs * 7 + out_conv 2
    # = 28 + 63 + 2 = 93; 205 + 2 * 93 + grl.num_steps = 392.
    assert len(keys) == 392
    assert "decoder_pseudo.block_nine.conv.0.weight" in keys and "decoder_worst.out_conv.bias" in keys
    assert "grl.num_steps" in keys


# ---------------------------------------------------------------- shapes, heads, trace

def test_forward_and_heads_shapes() -> None:
    torch.manual_seed(0)
    model = DecoupledVNet(1, 4, n_filters=2, has_dropout=True).eval()
    x = torch.randn(2, 1, 16, 32, 32)
    with torch.no_grad():
        main = model(x)
        heads = model.forward_heads(x)
    assert main.shape == (2, 4, 16, 32, 32)
    assert [tuple(h.shape) for h in heads] == [(2, 4, 16, 32, 32)] * 3
    assert torch.equal(heads[0], main)  # forward = the main head
    assert not torch.allclose(heads[1], main) and not torch.allclose(heads[2], heads[1])  # own weights per decoder


def test_trace_eval_main_head() -> None:
    torch.manual_seed(0)
    model = DecoupledVNet(1, 3, n_filters=2, has_dropout=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        traced = torch.jit.trace(model, x)
        assert torch.allclose(traced(x), model(x), atol=1e-6)


def test_dropout_reaches_every_decoder() -> None:
    model = DecoupledVNet(1, 3, n_filters=2, dropout=0.25)
    for decoder in (model, model.decoder_pseudo, model.decoder_worst):
        assert decoder.has_dropout and decoder.dropout.p == 0.25
    assert not DecoupledVNet(1, 3, n_filters=2).decoder_worst.has_dropout


def test_bad_input_shape_raises() -> None:
    with pytest.raises(ValueError, match="divisible by 16"):
        DecoupledVNet(1, 3, n_filters=2).forward_heads(torch.zeros(1, 1, 16, 16, 20))


# ---------------------------------------------------------------- warm-start gradient reversal

def test_warm_start_coefficient_by_hand() -> None:
    # λ(i) = 2 (hi - lo) / (1 + exp(-α i / N)) - (hi - lo) + lo, lo 0, hi 0.1, α 1, N 500:
    # i = 0:   0.2 / (1 + 1) - 0.1 = 0
    assert warm_start_coefficient(0) == 0.0
    # i = 250: 0.2 / (1 + e^-0.5) - 0.1 = 0.2 / 1.6065307 - 0.1 = 0.1244919 - 0.1 = 0.0244919
    assert warm_start_coefficient(250) == pytest.approx(0.0244919, abs=1e-7)
    # i = 500: 0.2 / (1 + e^-1) - 0.1 = 0.2 / 1.3678794 - 0.1 = 0.1462117 - 0.1 = 0.0462117
    assert warm_start_coefficient(500) == pytest.approx(0.0462117, abs=1e-7)
    # lo = 0.05: i = 0 gives lo; i = 500: 2 * 0.05 / 1.3678794 - 0.05 + 0.05 = 0.0731059
    assert warm_start_coefficient(0, lo=0.05) == pytest.approx(0.05)
    assert warm_start_coefficient(500, lo=0.05) == pytest.approx(0.0731059, abs=1e-7)
    # towards hi only asymptotically: 0.1 tanh(2400 / 1000) = 0.1 * 0.98367 = 0.098367
    assert warm_start_coefficient(2400) == pytest.approx(0.1 * math.tanh(2.4))


@pytest.mark.parametrize(("steps", "coeff"), [(0, 0.0), (250, 0.0244919), (500, 0.0462117)])
def test_reversal_identity_forward_scaled_negative_backward(steps: int, coeff: float) -> None:
    layer = WarmStartGradientReverse()
    layer.num_steps.fill_(steps)
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    (y,) = layer(x)
    assert torch.equal(y, x)
    upstream = torch.tensor([1.0, 2.0, -4.0])
    y.backward(upstream)
    # dL/dx = -λ * upstream, e.g. i = 500: -0.0462117 * [1, 2, -4] = [-0.0462117, -0.0924234, 0.1848468]
    assert torch.allclose(x.grad, -coeff * upstream, atol=1e-7)


def test_reversal_function_and_several_inputs() -> None:
    a = torch.ones(2, requires_grad=True)
    GradientReverseFunction.apply(a, 0.5).sum().backward()
    assert torch.equal(a.grad, torch.full((2,), -0.5))  # d(sum)/da = 1 -> -0.5 * 1
    layer = WarmStartGradientReverse(lo=0.2, hi=0.2)  # constant λ = 0.2
    b, c = torch.ones(3, requires_grad=True), torch.ones(1, requires_grad=True)
    out_b, out_c = layer(b, c)
    (out_b.sum() + 3 * out_c.sum()).backward()
    assert torch.allclose(b.grad, torch.full((3,), -0.2)) and torch.allclose(c.grad, torch.tensor([-0.6]))


def test_step_counter_is_a_restored_buffer() -> None:
    layer = WarmStartGradientReverse()
    assert int(layer.num_steps) == 0 and layer.coefficient() == 0.0
    for _ in range(3):
        layer.step()
    assert int(layer.state_dict()["num_steps"]) == 3
    restored = WarmStartGradientReverse()
    restored.load_state_dict(layer.state_dict())
    assert restored.coefficient() == pytest.approx(warm_start_coefficient(3))


def test_encoder_gradient_through_worst_head_is_reversed() -> None:
    torch.manual_seed(0)
    model = DecoupledVNet(1, 3, n_filters=2).eval()  # eval: deterministic BN, no dropout
    model.grl.num_steps.fill_(500)
    x = torch.randn(1, 1, 16, 16, 16)
    encoder = list(model.block_one.parameters())
    weights = torch.randn(1, 3, 16, 16, 16)
    (model.forward_heads(x)[2] * weights).sum().backward()
    reversed_grad = [p.grad.clone() for p in encoder]
    plain = torch.autograd.grad((model.decoder_worst(model.encode(x)) * weights).sum(), encoder)
    # the reversal is linear on every feature, so the encoder gradient is -λ(500) = -0.0462117 times the plain one
    for got, ref in zip(reversed_grad, plain):
        assert torch.allclose(got, -0.0462117 * ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.decoder_worst.parameters())


@pytest.mark.parametrize("kwargs", [{"lo": 0.2, "hi": 0.1}, {"lo": -0.1}, {"max_iters": 0}, {"alpha": 0.0}])
def test_reversal_bad_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="WarmStartGradientReverse"):
        WarmStartGradientReverse(**kwargs)


# ---------------------------------------------------------------- two branches

def test_dual_decoupled_vnet() -> None:
    torch.manual_seed(0)
    model = DualDecoupledVNet(1, 3, n_filters=2, has_dropout=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model(x), (model.branch_a(x) + model.branch_b(x)) / 2)
    assert isinstance(model, Branches) and model.branches == "AB"
    assert {"branch_a.grl.num_steps", "branch_b.grl.num_steps"} <= set(model.state_dict())
    # BN affine reset by both initialisers (γ = 1, β = 0); B xavier: conv std sqrt(2 / (fan_in + fan_out)) differs
    # from A's kaiming sqrt(2 / fan_in) on block_five (fan_in = 27 * 32 = 864, fan_out = 864): 0.0340 vs 0.0481.
    std_a = float(model.branch_a.block_five.conv[0].weight.std())
    std_b = float(model.branch_b.block_five.conv[0].weight.std())
    assert std_a == pytest.approx(math.sqrt(2 / 864), rel=0.1) and std_b == pytest.approx(math.sqrt(2 / 1728), rel=0.1)
    with pytest.raises(ValueError, match="init_b"):
        DualDecoupledVNet(1, 3, n_filters=2, init_b="uniform")
