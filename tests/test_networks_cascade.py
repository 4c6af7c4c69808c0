"""Tests of PVT-CASCADE / Polyp-CASCADE (common/networks/cascade.py) and its bundle override
(bundles/endoked_polyp_segmentation/configs/networks/cascade.json)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.networks.cascade import (
    AttentionGate,
    CascadeDecoder,
    ConvBlock,
    PVTCascade,
    UpConvBlock,
    convolutional_attention,
)
from common.networks.polyp_pvt import ChannelAttention, SpatialAttention

from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, fixed_image, n_params, seeded, tiny_with_bn_stats,
                                  train_and_evaluate_override)

# a 0.29 M-parameter instance: PVTv2 with stage widths 8/16/40/64 (divisible by the heads 1/2/5/8), one block each
TINY = {"backbone": "pvt_v2_b0", "embed_dims": (8, 16, 40, 64), "depths": (1, 1, 1, 1)}
TINY_IDS = {"cascade_backbone": "pvt_v2_b0", "cascade_embed_dims": [8, 16, 40, 64], "cascade_depths": [1, 1, 1, 1]}

# one intra-op thread: on the shared 2-core CI machine two threads make these tiny forwards ~50x slower
pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **kwargs) -> PVTCascade:
    """A tiny PVT-CASCADE with non-trivial BatchNorm statistics (two training forwards), in eval mode."""
    return tiny_with_bn_stats(PVTCascade, seed, **TINY, **kwargs)


@pytest.fixture(scope="module")
def full_model() -> PVTCascade:
    return seeded(PVTCascade)


@pytest.fixture(scope="module")
def tiny_model() -> PVTCascade:
    return _tiny()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return fixed_image()


# ------------------------------------------------------------------------------------ full-size network
# Published figure: 35.28 M parameters for PVT-CASCADE on Synapse (9 classes, Dice 81.06), the authors' own
# comparison table in G-CASCADE (Rahman & Marculescu, WACV 2024, Table 1). The table text could not be opened
# here: the figure was confirmed only through a third-party script that pairs 81.06 Dice with 35.28 M for
# PVT-CASCADE, and by the arithmetic below. The CASCADE README gives no parameter count.
# Synapse differs in the heads and in the grayscale adapter, both counted there:
#   heads: out_head_k = Conv1x1(c_k -> n_class), (512 + 320 + 128 + 64) * n + 4 * n = 1028 * n
#          -> 1 class: 1,028; 9 classes: 9,252
#   official 1 -> 3 grayscale adapter `conv` (Conv1x1 1->3 with bias: 6, BN(3): 6) = 12, left out here
#   ours (1 class, no adapter)  = 35,272,783
#   Synapse configuration       = 35,272,783 - 1,028 + 9,252 + 12 = 35,281,019 -> 35.28 M
# (EMCAD, Rahman et al., CVPR 2024, Table 1 lists 34.12 M for PVT-CASCADE; that figure matches no head count.)
OURS_CHILDREN = {
    "backbone": 24_849_856,  # PVTv2-b2 without the ImageNet head (pvt_v2.py)
    "decoder": 10_421_899,
    "out_head1": 513, "out_head2": 321, "out_head3": 129, "out_head4": 65,
}


def test_parameter_count_matches_the_published_figure(full_model):
    n = n_params(full_model)
    assert n == 35_272_783  # pinned exact count
    assert {k: n_params(c) for k, c in full_model.named_children()} == OURS_CHILDREN
    synapse = n - 1_028 + 9 * 1_028 + 12
    assert synapse == 35_281_019
    assert round(synapse / 1e6, 2) == 35.28


def test_decoder_blocks_have_the_official_sizes(full_model):
    # hand counts for widths (512, 320, 128, 64): AG3 = 2 * (320*128 + 128 + 2*128) + (128 + 1 + 2) = 82,819;
    # ConvBlock3 = 640*320*9 + 320 + 320*320*9 + 320 + 2 * 2*320 = 2,766,720; CA3 = 2 * 640 * (640 // 16) = 51,200
    sizes = {k: n_params(c) for k, c in full_model.decoder.named_children()}
    assert sizes["AG3"] == 82_819 and sizes["ConvBlock3"] == 2_766_720 and sizes["CA3"] == 51_200
    assert sizes["AG1"] == 2 * (64 * 32 + 32 + 64) + (32 + 1 + 2)  # F_int = 32 at the first stage
    assert sizes["SA"] == 2 * 7 * 7  # one spatial attention shared by the four CAMs


def test_full_network_output_shapes(full_model):
    x = torch.randn(1, 3, 64, 64)
    full_model.train()
    maps = full_model(x)
    assert isinstance(maps, tuple) and len(maps) == 4
    assert all(m.shape == (1, 1, 64, 64) for m in maps)
    full_model.eval()
    with torch.no_grad():
        assert full_model(x).shape == (1, 1, 64, 64)


# ----------------------------------------------------------------------------- hand-computed modules
def _identity_bn(bn: nn.BatchNorm2d) -> None:
    """Eval-mode BatchNorm computing y = x: gamma 1, beta 0, mean 0, var 1 - eps (so sqrt(var + eps) = 1)."""
    bn.eval()
    with torch.no_grad():
        bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0 - bn.eps)


def test_attention_gate_on_a_hand_example():
    ag = AttentionGate(1, 1, 1)
    with torch.no_grad():
        ag.W_g[0].weight.fill_(1.0), ag.W_g[0].bias.zero_()   # W_g g = g
        ag.W_x[0].weight.fill_(2.0), ag.W_x[0].bias.zero_()   # W_x x = 2x
        ag.psi[0].weight.fill_(1.0), ag.psi[0].bias.fill_(-3.0)  # psi q = q - 3
    for bn in (ag.W_g[1], ag.W_x[1], ag.psi[1]):
        _identity_bn(bn)
    g = torch.tensor([[[[1.0, -1.0], [0.0, 2.0]]]])
    x = torch.tensor([[[[1.0, 2.0], [-1.0, 0.5]]]])
    # g + 2x = [[3, 3], [-2, 3]]; ReLU -> [[3, 3], [0, 3]]; -3 -> [[0, 0], [-3, 0]]
    # sigmoid -> [[0.5, 0.5], [s, 0.5]] with s = sigmoid(-3) = 0.0474259; x * gate:
    s = 1.0 / (1.0 + math.exp(3.0))
    expected = torch.tensor([[[[0.5, 1.0], [-s, 0.25]]]])
    torch.testing.assert_close(ag(g, x), expected, rtol=1e-6, atol=1e-6)


def test_up_conv_block_on_a_hand_example():
    ucb = UpConvBlock(1, 1)
    conv = ucb.up[1]
    with torch.no_grad():
        conv.weight.zero_(), conv.weight[0, 0, 1, 1].fill_(1.0), conv.weight[0, 0, 1, 2].fill_(1.0)
        conv.bias.fill_(-1.0)  # y[i, j] = u[i, j] + u[i, j + 1] - 1 (zero padding on the right)
    _identity_bn(ucb.up[2])
    x = torch.tensor([[[[1.0, 2.0], [3.0, -4.0]]]])
    # nearest x2: u = [[1, 1, 2, 2], [1, 1, 2, 2], [3, 3, -4, -4], [3, 3, -4, -4]]
    # row 0: [1+1, 1+2, 2+2, 2+0] - 1 = [1, 2, 3, 1]; row 2: [3+3, 3-4, -4-4, -4+0] - 1 = [5, -2, -9, -5]; ReLU
    row_a, row_b = [1.0, 2.0, 3.0, 1.0], [5.0, 0.0, 0.0, 0.0]
    expected = torch.tensor([[[row_a, row_a, row_b, row_b]]])
    torch.testing.assert_close(ucb(x), expected)


def test_convolutional_attention_on_a_hand_example():
    c = 16  # the smallest width channel attention (ratio 16) accepts
    ca, sa, block = ChannelAttention(c), SpatialAttention(), ConvBlock(c, c)
    with torch.no_grad():
        ca.fc1.weight.fill_(1.0 / c)  # hidden = channel mean of the pooled descriptor
        ca.fc2.weight.fill_(1.0)
        sa.conv1.weight.zero_(), sa.conv1.weight[0, 0, 3, 3].fill_(1.0)  # SA = sigmoid(mean over channels)
        for conv in (block.conv[0], block.conv[3]):  # identity 3x3 convolutions
            conv.weight.zero_(), conv.bias.zero_()
            conv.weight[torch.arange(c), torch.arange(c), 1, 1] = 1.0
    _identity_bn(block.conv[1]), _identity_bn(block.conv[4])
    m = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    x = m.expand(1, c, 2, 2)  # every channel holds m
    # CA: avg-pool 2.5, max-pool 4 per channel -> fc1 (mean) 2.5 and 4 -> ReLU -> fc2 (x1) -> 2.5 + 4 = 6.5
    a = 1.0 / (1.0 + math.exp(-6.5))  # 0.9984988
    # x' = a * m on every channel; SA: mean_c x' = a * m -> gate sigmoid(a * m); output x' * gate (all positive,
    # so the ReLUs of the identity ConvBlock keep it)
    xp = a * m
    expected = (xp * torch.sigmoid(xp)).expand(1, c, 2, 2)
    torch.testing.assert_close(convolutional_attention(x, ca, sa, block), expected, rtol=1e-6, atol=1e-6)


def test_decoder_stage_shapes():
    decoder = CascadeDecoder((64, 40, 16, 8)).eval()
    x4, x3, x2, x1 = (torch.randn(1, c, s, s) for c, s in ((64, 2), (40, 4), (16, 8), (8, 16)))
    with torch.no_grad():
        outs = decoder(x4, (x3, x2, x1))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 2, 2), (1, 40, 4, 4), (1, 16, 8, 8), (1, 8, 16, 16)]


def test_eval_output_is_the_sum_of_the_four_heads(tiny_model, image):
    with torch.no_grad():
        heads = tiny_model.side_outputs(image)
        out = tiny_model(image)
    assert len(heads) == 4
    torch.testing.assert_close(out, heads[0] + heads[1] + heads[2] + heads[3])


# ----------------------------------------------------------------------------------- checkpoints
def test_checkpoint_in_the_official_format_loads(tiny_model, image, tmp_path):
    official = {f"module.{k}": v for k, v in tiny_model.state_dict().items()}
    # the official grayscale adapter (conv = Conv1x1(1 -> 3), BN(3)) is in every official state dict
    official |= {
        "module.conv.0.weight": torch.randn(3, 1, 1, 1), "module.conv.0.bias": torch.zeros(3),
        "module.conv.1.weight": torch.ones(3), "module.conv.1.bias": torch.zeros(3),
        "module.conv.1.running_mean": torch.zeros(3), "module.conv.1.running_var": torch.ones(3),
        "module.conv.1.num_batches_tracked": torch.tensor(0),
    }
    assert_reloads({"model": official}, str(tmp_path / "PolypPVT-CASCADE.pth"), tiny_model, image,
                   lambda path: _tiny(seed=5, checkpoint=path))


def test_checkpoint_with_a_missing_key_names_it(tiny_model, tmp_path):
    state = dict(tiny_model.state_dict())
    del state["decoder.AG2.psi.0.weight"]
    assert_load_fails(state, str(tmp_path / "broken.pth"), lambda path: PVTCascade(**TINY, checkpoint=path),
                      r"decoder\.AG2\.psi\.0\.weight")


def test_pretrained_backbone_loads_official_keys(tmp_path):
    torch.manual_seed(3)
    source = PVTCascade(**TINY).backbone
    state = dict(source.state_dict())
    state["head.weight"], state["head.bias"] = torch.randn(1000, 64), torch.zeros(1000)  # ImageNet classifier
    assert "block1.0.attn.q.weight" in state and "patch_embed1.proj.weight" in state  # official key names
    path = tmp_path / "pvt_tiny.pth"
    torch.save(state, path)
    torch.manual_seed(4)
    model = PVTCascade(**TINY, pretrained_backbone=str(path))
    for key, value in source.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key


# ------------------------------------------------------------------------------- the network contract
def test_eval_traces_and_accepts_channels_last(tiny_model, image):
    assert_traceable(tiny_model, image)


def test_eval_under_bf16_autocast(tiny_model, image):
    assert_bf16_close(tiny_model, image, min_corr=0.99)


def test_bad_input_size_is_named(tiny_model):
    assert_rejects_size(tiny_model, (64, 48), r"PVTCascade.*\(64, 48\)")


def _biases_before_batchnorm(model: nn.Module) -> set[str]:
    """Names of convolution biases directly followed by a BatchNorm in an ``nn.Sequential`` (as in the official
    blocks): in training mode the BatchNorm subtracts the batch mean, so their gradient is zero up to rounding."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, nn.Sequential):
            layers = list(module)
            for i, (layer, nxt) in enumerate(zip(layers, layers[1:])):
                if isinstance(layer, nn.Conv2d) and isinstance(nxt, nn.BatchNorm2d) and layer.bias is not None:
                    names.add(f"{prefix}.{i}.bias")
    return names


def test_every_parameter_gets_a_gradient(image):
    # every gradient is non-zero, except the conv biases that a BatchNorm cancels
    model = _tiny(seed=7)
    before_bn = _biases_before_batchnorm(model)
    assert "decoder.AG3.psi.0.bias" in before_bn
    assert_gradients(model, image, 4, zero_ok=before_bn)


# ----------------------------------------------------------------------------------- bundle override
@pytest.mark.slow
def test_bundle_trains_and_evaluates_through_the_override(tmp_path):
    train_and_evaluate_override(tmp_path, "cascade.json", PVTCascade, **TINY_IDS)
