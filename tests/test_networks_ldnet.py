"""Tests of LDNet (common/networks/ldnet.py) and its bundle override
(bundles/endoked_polyp_segmentation/configs/networks/ldnet.json)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.ldnet import (
    EfficientSelfAttentionBlock,
    KernelUpdater,
    LDNet,
    LesionCrossAttentionBlock,
    dynamic_kernel_conv,
)
from common.networks.res2net import res2net50_v1b

from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, fixed_image, n_params, tiny_with_bn_stats,
                                  train_and_evaluate_override)

TINY_BACKBONE = {"backbone_layers": (1, 1, 1, 1), "backbone_channels": (16, 16, 16, 16), "stem_width": 8}
# a 0.06 M-parameter instance: one Res2Net block per stage, decoder widths 8..16, 2 heads of width 8
TINY = {"decoder_channels": (8, 8, 16, 16, 16), "unified_channels": 8, "heads": 2, "dim_head": 8, "mlp_dim": 16,
        **TINY_BACKBONE}
TINY_IDS = {"ldnet_decoder_channels": [8, 8, 16, 16, 16], "ldnet_unified_channels": 8, "ldnet_heads": 2,
            "ldnet_dim_head": 8, "ldnet_mlp_dim": 16, "ldnet_backbone_layers": [1, 1, 1, 1],
            "ldnet_backbone_channels": [16, 16, 16, 16], "ldnet_stem_width": 8}

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **kwargs) -> LDNet:
    """A tiny LDNet with non-trivial BatchNorm statistics (two training forwards), in eval mode."""
    return tiny_with_bn_stats(LDNet, seed, **TINY, **kwargs)


@pytest.fixture(scope="module")
def tiny_model() -> LDNet:
    return _tiny()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return fixed_image()


# ------------------------------------------------------------------------------------ published size
def test_full_size_parameter_count_and_output_shapes():
    """The LDNet paper and the official README (ReaFly/LDNet) give no parameter count, so the count of the official
    model definition (models/LDNet.py, models/modules.py) is pinned, by hand:

    * Res2Net-50 v1b stem + layer1..4: 25,718,352 - fc (2048·1000 + 1000) = 23,669,352
    * reduce2..5 (1x1, bias): 256·64+64 + 512·128+128 + 1024·256+256 + 2048·512+512 = 1,393,600
    * decoder blocks, (C -> C/4 -> C_out) 3x3 convs with bias + BN:
      512->512: 590,208 + 591,360; 768->256: 1,327,680 + 443,136; 384->128: 332,064 + 110,976;
      192->64: 83,088 + 27,840; 128->64: 36,960 + 18,624                                   = 3,561,936
    * GroupNorm(16, 512) 1,024 + generate_head Linear(512, 64) 32,832                      = 33,856
    * 4 kernel updaters: 2·Linear(64,128) + 3·Linear(64,64) + 5·LayerNorm(64) = 29,760 each  = 119,040
    * unify1..5 (1x1 -> 64): 4,160 + 4,160 + 8,256 + 16,448 + 32,832                        = 65,856
    * ESA/LCA block of width C (to_qkv C·1536, to_out 512·C + C, LN 2C, MLP C·512+512 + 512·C+C) = 3,076·C + 512;
      ESA widths 64+64+128+256 = 512, LCA widths 64+128+256+512 = 960:
      3,076·1,472 + 8·512                                                                  = 4,531,968
    total 23,669,352 + 9,706,256 = 33,375,608 (33.4 M).
    """
    torch.manual_seed(0)
    model = LDNet()
    assert n_params(model) == 33_375_608
    assert n_params(model) - n_params(nn.ModuleList([model.encoder1_conv, model.encoder1_bn, model.encoder2,
                                                       model.encoder3, model.encoder4, model.encoder5])) == 9_706_256
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        maps = model.train()(x)
        assert len(maps) == 5 and all(m.shape == (1, 1, 64, 64) for m in maps)
        assert model.eval()(x).shape == (1, 1, 64, 64)


def test_tiny_instance_is_small(tiny_model):
    assert n_params(tiny_model) < 500_000


# ------------------------------------------------------------------------- hand-computed modules
def test_lesion_cross_attention_pools_the_lesion_and_broadcasts_it():
    """One head of width 1 on a 2-channel 2x2 map; v = channel 0, the MLP's last layer zeroed.

    m = sigmoid([[ln 3, -ln 3], [0, 0]]) = [[0.75, 0.25], [0.5, 0.5]], sum m = 2
    v_bar = sum(m v) / (sum m + 5e-4) = (4·0.75 + 8·0.25 + 2·0.5 + 6·0.5) / 2.0005 = 9 / 2.0005 = 4.498875
    a single key: softmax over one position = 1, so every pixel gets to_out(v_bar) = (1·v_bar + 0.5, 2·v_bar - 1),
    whatever the query and key weights: out = x + (4.998875, 7.997751) channel-wise.
    """
    torch.manual_seed(0)
    block = LesionCrossAttentionBlock(dim=2, heads=1, dim_head=1, mlp_dim=4)
    with torch.no_grad():
        block.LCAlayer.to_qkv.weight.copy_(torch.tensor([[0.3, -0.7], [1.5, 2.0], [1.0, 0.0]]).view(3, 2, 1, 1))
        block.LCAlayer.to_out[0].weight.copy_(torch.tensor([[1.0], [2.0]]))
        block.LCAlayer.to_out[0].bias.copy_(torch.tensor([0.5, -1.0]))
        block.ff.fn.net[3].weight.zero_()
        block.ff.fn.net[3].bias.zero_()
    x = torch.tensor([[[4.0, 8.0], [2.0, 6.0]], [[1.0, -1.0], [3.0, 0.0]]]).unsqueeze(0)
    mask = torch.tensor([[math.log(3.0), -math.log(3.0)], [0.0, 0.0]]).view(1, 1, 2, 2)
    v_bar = 9.0 / 2.0005
    expected = x + torch.tensor([v_bar + 0.5, 2.0 * v_bar - 1.0]).view(1, 2, 1, 1)
    torch.testing.assert_close(block(x, mask), expected)
    with torch.no_grad():  # the query/key projections cannot change a softmax over one key
        block.LCAlayer.to_qkv.weight[:2].mul_(-3.0)
    torch.testing.assert_close(block(x, mask), expected)


def test_efficient_self_attention_attends_over_pyramid_pooled_keys():
    """One head of width 4 (scale 4^-0.5 = 0.5) on a 1-channel 1x2 map x = [0, 2]; only q_0 = ln2·x, k_0 = v_0 = x
    are non-zero, to_out picks channel 0, the MLP's last layer is zeroed.

    Pooled keys (= values) of [0, 2]: 1x1 -> 1; 3x3 -> columns (0, 1, 2), 3 rows; 5x5 -> columns (0, 0, 1, 2, 2),
    5 rows: the value 0 appears 3 + 10 = 13 times, 1 appears 1 + 3 + 5 = 9 times, 2 appears 3 + 10 = 13 times (35).
    pixel 0: q = 0, uniform attention: (0·13 + 1·9 + 2·13) / 35 = 1
    pixel 1: q·k·0.5 = ln2·k, weights 13·1, 9·2, 13·4: (0·13 + 1·18 + 2·52) / (13 + 18 + 52) = 122 / 83
    out = x + attention = [0 + 1, 2 + 122/83] = [1, 3.469880].
    """
    block = EfficientSelfAttentionBlock(dim=1, heads=1, dim_head=4, mlp_dim=4)
    with torch.no_grad():
        weight = torch.zeros(12, 1, 1, 1)
        weight[0], weight[4], weight[8] = math.log(2.0), 1.0, 1.0
        block.ESAlayer.to_qkv.weight.copy_(weight)
        block.ESAlayer.to_out[0].weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
        block.ESAlayer.to_out[0].bias.zero_()
        block.ff.fn.net[3].weight.zero_()
        block.ff.fn.net[3].bias.zero_()
    out = block(torch.tensor([0.0, 2.0]).view(1, 1, 1, 2))
    torch.testing.assert_close(out, torch.tensor([1.0, 2.0 + 122.0 / 83.0]).view(1, 1, 1, 2))


def test_kernel_updater_gates_the_lesion_feature_into_the_kernel():
    """U = 3, K = 1, identity-like layers. feat channels: ones, [[3, 1], [1, 3]], zeros; previous prediction logit 0
    (upsampled: sigmoid = 0.5 everywhere); kernel W = (1, 0, 2).

    lesion f = 0.5 · (4, 8, 0) = (2, 4, 0); pred_transform = [I; I] + bias (0, 0, 0, 0, 0, 3): p_in = (2, 4, 0),
    p_out = (2, 4, 3); head_transform = [I; I]: k_in = k_out = (1, 0, 2); g = k_in * p_in = (2, 0, 0)
    pred gate = sigmoid(LN(-g)) = sigmoid(-sqrt2, 1/sqrt2, 1/sqrt2) = (0.195570, 0.669762, 0.669762)
    head gate = sigmoid(LN(g))  = (0.804430, 0.330238, 0.330238)
    LN(p_out) = (-1.224745, 1.224745, 0), LN(k_out) = (0, -1.224745, 1.224745)   (sqrt 1.5 = 1.224745)
    update = (-0.239524, 0.415829, 0.404458); mean 0.193588, std 0.306300
    W' = ReLU(LN(update)) = ReLU(-1.414, 0.725588, 0.688463) = (0, 0.725588, 0.688463)
    (LayerNorm's eps 1e-5 moves these by < 5e-5.)
    """
    updater = KernelUpdater(channels=3, kernel_size=1)
    eye = torch.eye(3)
    with torch.no_grad():
        updater.pred_transform_layer.weight.copy_(torch.cat([eye, eye]))
        updater.pred_transform_layer.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 3.0]))
        updater.head_transform_layer.weight.copy_(torch.cat([eye, eye]))
        updater.head_transform_layer.bias.zero_()
        updater.pred_gate.weight.copy_(-eye)
        updater.head_gate.weight.copy_(eye)
        updater.fc_layer.weight.copy_(eye)
        for layer in (updater.pred_gate, updater.head_gate, updater.fc_layer):
            layer.bias.zero_()
    feat = torch.stack([torch.ones(2, 2), torch.tensor([[3.0, 1.0], [1.0, 3.0]]), torch.zeros(2, 2)]).unsqueeze(0)
    kernel = torch.tensor([1.0, 0.0, 2.0]).view(1, 1, 3, 1, 1)
    new = updater(feat, kernel, torch.zeros(1, 1, 1, 1))
    assert new.shape == (1, 1, 3, 1, 1)
    torch.testing.assert_close(new.flatten(), torch.tensor([0.0, 0.725588, 0.688463]), atol=1e-4, rtol=0)


def test_dynamic_kernel_is_applied_per_image():
    """K = 1, two images with their own kernels:
    image 0: (1, -1) · ([[1, 2], [3, 4]], ones) = [[0, 1], [2, 3]]
    image 1: (2, 0.5) · ([[0, 1], [0, 1]], [[2, 2], [0, 0]]) = [[1, 3], [0, 2]]
    and, for K = 3 and 2 output channels, the same as conv2d(feat[b], kernel[b], padding=1) image by image."""
    feat = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]],
                         [[[0.0, 1.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]]])
    kernel = torch.tensor([[1.0, -1.0], [2.0, 0.5]]).view(2, 1, 2, 1, 1)
    expected = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[1.0, 3.0], [0.0, 2.0]]]).unsqueeze(1)
    torch.testing.assert_close(dynamic_kernel_conv(feat, kernel, 1), expected)
    feat, kernel = torch.randn(3, 4, 5, 6), torch.randn(3, 2, 4, 3, 3)
    reference = torch.cat([F.conv2d(feat[b:b + 1], kernel[b], padding=1) for b in range(3)])
    torch.testing.assert_close(dynamic_kernel_conv(feat, kernel, 3), reference)


def test_training_returns_the_five_stage_maps_finest_first(image):
    """Training: the five stage logits (strides 1, 2, 4, 8, 16), the coarse ones upsampled to the input size;
    eval: the full-resolution one alone."""
    model = _tiny(seed=2)
    with torch.no_grad():
        assert torch.equal(model(image), model._predictions(image)[0])
        model.train()
        stages = model._predictions(image)
        maps = model(image)
    assert [tuple(s.shape[-2:]) for s in stages] == [(64, 64), (32, 32), (16, 16), (8, 8), (4, 4)]
    assert len(maps) == 5 and all(m.shape == (2, 1, 64, 64) for m in maps)
    torch.testing.assert_close(maps[0], stages[0])
    for stage, full in zip(stages[1:], maps[1:]):
        torch.testing.assert_close(full, F.interpolate(stage, size=(64, 64), mode="bilinear", align_corners=False))


# -------------------------------------------------------------------------------------- checkpoints
def test_official_checkpoint_loads_and_missing_keys_are_named(tiny_model, image, tmp_path):
    state = tiny_model.state_dict()
    official = {"encoder1_conv.0.weight", "encoder1_bn.running_var", "encoder2.0.convs.0.weight", "reduce5.bias",
                "decoder5.conv1.conv.bias", "decoderList.3.conv2.bn.running_mean", "gobal_average_pool.0.weight",
                "generate_head.weight", "headUpdators.3.pred_transform_layer.weight", "headUpdators.0.fc_norm.bias",
                "unifyList.0.weight", "esa1.ESAlayer.to_qkv.weight", "esaList.3.ff.fn.net.3.weight",
                "lca4.LCAlayer.to_out.0.weight", "lcaList.0.ff.norm.weight"}
    assert official <= set(state) and not any(k.startswith("fc.") for k in state)
    path = tmp_path / "LDNet_Best.pt"
    ddp = {f"module.{k}": v for k, v in state.items()}  # DDP state dict, as the EndoKED baseline saves
    assert_reloads(ddp, path, tiny_model, image, lambda p: _tiny(seed=3, checkpoint=p), tol=None)
    assert_load_fails({"state_dict": {k: v for k, v in state.items() if k != "headUpdators.2.head_gate.bias"}}, path,
                      lambda p: LDNet(**TINY, checkpoint=p), r"headUpdators\.2\.head_gate\.bias")


def test_pretrained_backbone_loads_the_official_res2net_file(tmp_path):
    torch.manual_seed(5)
    source = res2net50_v1b(**{"layers": (1, 1, 1, 1), "channels": (16, 16, 16, 16), "stem_width": 8})
    path = tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"
    torch.save(source.state_dict(), path)  # the official names, 1000-class fc included
    model = LDNet(**TINY, pretrained_backbone=path)
    for ours, theirs in (("encoder1_conv", "conv1"), ("encoder1_bn", "bn1"), ("encoder2", "layer1"),
                         ("encoder5", "layer4")):
        for key, value in getattr(source, theirs).state_dict().items():
            torch.testing.assert_close(getattr(model, ours).state_dict()[key], value)


# ------------------------------------------------------------------------------- export and training
def test_eval_traces_and_accepts_channels_last(tiny_model, image):
    assert_traceable(tiny_model, image, check_trace=False)


def test_eval_under_bf16_autocast(tiny_model, image):
    assert_bf16_close(tiny_model, image, min_corr=0.98)


def test_bad_input_size_is_named(tiny_model):
    assert_rejects_size(tiny_model, (64, 48), r"LDNet.*\(64, 48\)")


def test_every_parameter_gets_a_gradient(image):
    assert_gradients(_tiny(seed=7), image, 5)


# ----------------------------------------------------------------------------------- bundle override
@pytest.mark.slow
def test_bundle_trains_and_evaluates_through_the_override(tmp_path):
    train_and_evaluate_override(tmp_path, "ldnet.json", LDNet, **TINY_IDS)
