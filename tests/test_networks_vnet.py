"""Tests of the DHC / UA-MT VNet, its initialisers and the DHC checkpoint loader (common/networks/vnet.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.vnet import VNet, kaiming_normal_init_, load_dhc_checkpoint, xavier_normal_init_


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _dhc_vnet(n_classes: int = 14, normalization: str = "batchnorm") -> VNet:
    """The network exactly as DHC's train_dhc.py builds it (specs/dhc.md §3)."""
    return VNet(1, n_classes, n_filters=32, normalization=normalization, has_dropout=True)


# ---------------------------------------------------------------- parameter counts (official figures)

# Source: official_figures.md §2, xmed-lab/DHC@b3dee972 code/models/vnet.py,
# VNet(n_channels=1, n_classes=14, n_filters=32, normalization='batchnorm', has_dropout=True).
# Each value re-derived by hand: conv 3^3 in->out = 27*in*out + out, k2 (de)conv = 8*in*out + out, BN = 2*out.
OFFICIAL_CHILDREN = {
    "block_one": 960,  # 27*1*32 + 32 + 2*32 = 864 + 32 + 64
    "block_one_dw": 16_576,  # 8*32*64 + 64 + 128 = 16,384 + 192
    "block_two": 221_568,  # 2 * (27*64*64 + 64 + 128) = 2 * 110,784
    "block_two_dw": 65_920,  # 8*64*128 + 128 + 256 = 65,536 + 384
    "block_three": 1_328_256,  # 3 * (27*128*128 + 128 + 256) = 3 * 442,752
    "block_three_dw": 262_912,  # 8*128*256 + 256 + 512 = 262,144 + 768
    "block_four": 5_310_720,  # 3 * (27*256*256 + 256 + 512) = 3 * 1,770,240
    "block_four_dw": 1_050_112,  # 8*256*512 + 512 + 1024 = 1,048,576 + 1,536
    "block_five": 21_238_272,  # 3 * (27*512*512 + 512 + 1024) = 3 * 7,079,424
    "block_five_up": 1_049_344,  # 8*512*256 + 256 + 512 = 1,048,576 + 768
    "block_six": 5_310_720,  # = block_four
    "block_six_up": 262_528,  # 8*256*128 + 128 + 256 = 262,144 + 384
    "block_seven": 1_328_256,  # = block_three
    "block_seven_up": 65_728,  # 8*128*64 + 64 + 128 = 65,536 + 192
    "block_eight": 221_568,  # = block_two
    "block_eight_up": 16_480,  # 8*64*32 + 32 + 64 = 16,384 + 96
    "block_nine": 27_744,  # 27*32*32 + 32 + 64 = 27,648 + 96
    "out_conv": 462,  # 32*14 + 14
    "dropout": 0,
}


def test_parameter_count_matches_official() -> None:
    model = _dhc_vnet()
    # official_figures.md §2: total params 37,778,126; state_dict keys 205; parameter tensors 118.
    assert _n_params(model) == 37_778_126
    assert sum(OFFICIAL_CHILDREN.values()) == 37_778_126
    assert {name: _n_params(child) for name, child in model.named_children()} == OFFICIAL_CHILDREN
    # 21 conv stages (1+2+3+3+3+3+3+2+1) + 8 resampling blocks, each conv (w, b) + BN (w, b, mean, var, count):
    # 29 * 7 = 203 keys + out_conv (w, b) = 205; parameter tensors 29 * 4 + 2 = 118.
    assert len(model.state_dict()) == 205
    assert len(list(model.parameters())) == 118


def test_parameter_count_sixteen_classes_and_no_norm() -> None:
    # AMOS (C = 16): only out_conv grows, by 2 output channels x (32 weights + 1 bias) = 2 * 33 = 66.
    assert _n_params(_dhc_vnet(16)) == 37_778_126 + 66
    # No normalisation drops 2 affine parameters per normalised channel. Normalised channels:
    # conv blocks 32 + 2*64 + 3*128 + 3*256 + 3*512 + 3*256 + 3*128 + 2*64 + 32 = 4,160,
    # down 64+128+256+512 = 960, up 256+128+64+32 = 480 -> 5,600 channels -> 11,200 parameters.
    assert _n_params(_dhc_vnet(normalization="none")) == 37_778_126 - 11_200
    # InstanceNorm3d is affine-free (and keeps no running stats), so it adds nothing either.
    assert _n_params(_dhc_vnet(normalization="instancenorm")) == 37_778_126 - 11_200
    # GroupNorm(16 groups) has the same 2 affine parameters per channel as BatchNorm.
    assert _n_params(_dhc_vnet(normalization="groupnorm")) == 37_778_126


def test_state_dict_key_layout() -> None:
    keys = list(VNet(1, 2, n_filters=4).state_dict())
    # Official layout: block.conv.<index in the Sequential conv, BN, ReLU, conv, BN, ReLU, ...>.
    assert keys[:7] == [
        "block_one.conv.0.weight",
        "block_one.conv.0.bias",
        "block_one.conv.1.weight",
        "block_one.conv.1.bias",
        "block_one.conv.1.running_mean",
        "block_one.conv.1.running_var",
        "block_one.conv.1.num_batches_tracked",
    ]
    assert "block_five.conv.6.weight" in keys  # third conv of block_five at index 2*3 = 6
    assert keys[-2:] == ["out_conv.weight", "out_conv.bias"]
    # Without normalisation the Sequential is conv, ReLU, conv, ...: second conv of block_two at index 2.
    assert "block_two.conv.2.weight" in VNet(1, 2, n_filters=4, normalization="none").state_dict()


# ---------------------------------------------------------------- shapes

@pytest.mark.parametrize(
    ("normalization", "n_filters"), [("batchnorm", 4), ("none", 4), ("instancenorm", 4), ("groupnorm", 16)]
)
def test_output_shape(normalization: str, n_filters: int) -> None:
    torch.manual_seed(0)
    model = VNet(1, 5, n_filters=n_filters, normalization=normalization).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 1, 16, 32, 32))
    assert out.shape == (2, 5, 16, 32, 32)
    assert torch.isfinite(out).all()


def test_encoder_feature_shapes() -> None:
    model = VNet(1, 3, n_filters=4).eval()
    with torch.no_grad():
        features = model.encode(torch.randn(2, 1, 16, 32, 32))
    # level k: channels 4 * 2^k, spatial (16, 32, 32) / 2^k, k = 0..4 (as official_figures.md §2 for f=32).
    assert [tuple(f.shape) for f in features] == [
        (2, 4, 16, 32, 32),
        (2, 8, 8, 16, 16),
        (2, 16, 4, 8, 8),
        (2, 32, 2, 4, 4),
        (2, 64, 1, 2, 2),
    ]


def test_bad_input_shapes_raise() -> None:
    model = VNet(1, 3, n_filters=4)
    with pytest.raises(ValueError, match=r"\(1, 1, 16, 32, 24\).*divisible by 16"):
        model(torch.zeros(1, 1, 16, 32, 24))
    with pytest.raises(ValueError, match=r"expected input \[B, 1, D, H, W\].*\(1, 2, 16, 16, 16\)"):
        model(torch.zeros(1, 2, 16, 16, 16))
    with pytest.raises(ValueError, match=r"\(1, 16, 16, 16\)"):
        model(torch.zeros(1, 16, 16, 16))


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match="normalization must be one of"):
        VNet(1, 2, normalization="layernorm")
    with pytest.raises(ValueError, match="n_filters=4"):
        VNet(1, 2, n_filters=4, normalization="groupnorm")  # 4 channels cannot form 16 groups
    with pytest.raises(ValueError, match="out_channels"):
        VNet(1, 0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        VNet(1, 2, dropout=1.5)
    with pytest.raises(ValueError, match="contradicts"):
        VNet(1, 2, has_dropout=True, dropout=0.0)


# ---------------------------------------------------------------- dropout

def _two_forwards(model: VNet, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(2, 1, 16, 32, 32)
    model.train(train)
    with torch.no_grad():
        return model(x), model(x)


def test_dropout_only_in_train_mode() -> None:
    torch.manual_seed(0)
    model = VNet(1, 3, n_filters=4, has_dropout=True)
    assert model.has_dropout and model.dropout.p == 0.5  # the original Dropout3d(p=0.5)
    a, b = _two_forwards(model, train=True)
    assert (a - b).abs().max() > 1e-3  # independent channel masks -> different logits
    a, b = _two_forwards(model, train=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_without_dropout_train_forwards_are_equal() -> None:
    # Control for the test above: BatchNorm in train mode alone is deterministic.
    torch.manual_seed(0)
    a, b = _two_forwards(VNet(1, 3, n_filters=4, has_dropout=False), train=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_dropout_kwarg_switches_dropout_on() -> None:
    # MONAI Label's epistemic scoring writes network_def["dropout"] = p > 0 into a config without has_dropout.
    torch.manual_seed(0)
    model = VNet(1, 3, n_filters=4, dropout=0.2)
    assert model.has_dropout and model.dropout.p == 0.2
    a, b = _two_forwards(model, train=True)
    assert (a - b).abs().max() > 1e-3
    assert not VNet(1, 3, n_filters=4, dropout=0.0).has_dropout


# ---------------------------------------------------------------- initialisation

def _init_stats(init) -> tuple[VNet, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _dhc_vnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm3d):  # move gamma/beta off their defaults so the init must reset them
                m.weight.uniform_(2.0, 3.0)
                m.bias.uniform_(2.0, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init(model)
    return model, before


def test_kaiming_normal_init() -> None:
    model, before = _init_stats(kaiming_normal_init_)
    weight = model.block_five.conv[0].weight  # Conv3d 512 -> 512, 3^3: fan_in = 512 * 27 = 13,824
    # std = sqrt(2 / 13,824) = sqrt(1.4468e-4) = 0.012028; 7,077,888 samples -> sampling error ~0.03 %.
    assert weight.std().item() == pytest.approx(0.012028, rel=0.01)
    assert abs(weight.mean().item()) < 1e-4  # standard error 0.012 / sqrt(7.08e6) = 4.5e-6
    # PyTorch's default (kaiming_uniform, a=sqrt(5)) would give std 1/sqrt(3 * 13,824) = 0.00491 instead.
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm3d):
            assert torch.equal(module.weight, torch.ones_like(module.weight)), name
            assert torch.equal(module.bias, torch.zeros_like(module.bias)), name
    after = model.state_dict()
    assert torch.equal(after["block_five.conv.0.bias"], before["block_five.conv.0.bias"])  # conv bias kept
    assert torch.equal(after["out_conv.bias"], before["out_conv.bias"])
    assert torch.equal(after["block_five_up.conv.0.weight"], before["block_five_up.conv.0.weight"])  # deconv kept


def test_xavier_normal_init() -> None:
    model, before = _init_stats(xavier_normal_init_)
    weight = model.block_five.conv[0].weight  # fan_in = fan_out = 512 * 27 = 13,824
    # std = sqrt(2 / (13,824 + 13,824)) = sqrt(7.234e-5) = 0.0085054
    assert weight.std().item() == pytest.approx(0.0085054, rel=0.01)
    bn = model.block_five.conv[1]
    assert torch.equal(bn.weight, torch.ones(512)) and torch.equal(bn.bias, torch.zeros(512))
    assert torch.equal(model.state_dict()["block_four_dw.conv.0.bias"], before["block_four_dw.conv.0.bias"])


# ---------------------------------------------------------------- channels-last / AMP

def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    model = VNet(1, 3, n_filters=4).eval()
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model = model.to(memory_format=torch.channels_last_3d)
        out = model(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_autocast_bfloat16_forward_backward() -> None:
    """bf16 autocast: the output is bf16 and near the fp32 output, and every parameter gets a gradient.

    Finiteness of the gradients is not asserted on CPU: with torch 2.14.1, bf16 conv3d weight gradients of the
    deepest block came out non-finite in 3-6 of 100 identical repetitions (same seed, same input, 1 or 2 threads;
    fp32: 0 of 30), a nondeterminism of the CPU kernels, not of the network. The bundles autocast on CUDA only."""
    torch.manual_seed(0)
    model = VNet(1, 3, n_filters=4, has_dropout=False).train().to(memory_format=torch.channels_last_3d)
    x = torch.randn(2, 1, 16, 32, 32).to(memory_format=torch.channels_last_3d)
    reference = model(x).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits; through ~20 conv/BN layers the outputs still agree in sign almost everywhere
    # and in norm to well under 10 % (a wrong cast or a dropped layer would not)
    assert ((out.float() - reference).norm() / reference.norm()).item() < 0.1
    out.float().square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name


# ---------------------------------------------------------------- checkpoint loader

def test_load_dhc_checkpoint_round_trip(tmp_path) -> None:
    torch.manual_seed(0)
    branch_a, branch_b = VNet(1, 3, n_filters=4), VNet(1, 3, n_filters=4)
    path = tmp_path / "best_model.pth"
    torch.save({"A": branch_a.state_dict(), "B": branch_b.state_dict()}, path)  # format of specs/dhc.md §4.6
    x = torch.randn(1, 1, 16, 32, 32)
    for branch, source in (("A", branch_a), ("B", branch_b)):
        loaded = load_dhc_checkpoint(VNet(1, 3, n_filters=4), path, branch=branch)
        for key, value in source.state_dict().items():
            assert torch.equal(loaded.state_dict()[key], value), (branch, key)
        with torch.no_grad():
            torch.testing.assert_close(loaded.eval()(x), source.eval()(x))


def test_load_dhc_checkpoint_errors(tmp_path) -> None:
    path = tmp_path / "best_model.pth"
    torch.save({"A": VNet(1, 3, n_filters=4, normalization="none").state_dict()}, path)
    # batchnorm model: BN keys are missing, and the no-norm file's second conv (index 2) is unexpected.
    with pytest.raises(ValueError, match="best_model.pth") as info:
        load_dhc_checkpoint(VNet(1, 3, n_filters=4), path, branch="A")
    message = str(info.value)
    assert "missing" in message and "block_one.conv.1.weight" in message
    assert "unexpected" in message and "block_two.conv.2.weight" in message
    with pytest.raises(ValueError, match="shape-mismatched.*out_conv.weight"):
        load_dhc_checkpoint(VNet(1, 5, n_filters=4, normalization="none"), path)  # 3 vs 5 classes
    with pytest.raises(ValueError, match=r"best_model.pth.*branch key 'B'.*\['A'\]"):
        load_dhc_checkpoint(VNet(1, 3, n_filters=4, normalization="none"), path, branch="B")
    with pytest.raises(ValueError, match="branch must be 'A' or 'B'"):
        load_dhc_checkpoint(VNet(1, 3, n_filters=4), path, branch="C")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_dhc_checkpoint(VNet(1, 3, n_filters=4), tmp_path / "missing.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pth"):
        load_dhc_checkpoint(VNet(1, 3, n_filters=4), corrupt)

