"""Tests of the PVTv2 backbone (common/networks/pvt_v2.py) and Polyp-PVT (common/networks/polyp_pvt.py)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.pvt_v2 import checkpoint_filter_fn
from torch import nn

from common.networks.polyp_pvt import (
    CFM,
    BasicConv2d,
    ChannelAttention,
    PolypPVT,
    SimilarityAggregation,
    SpatialAttention,
)
from common.networks.pvt_v2 import (
    PVT_V2_BUILDERS,
    Attention,
    Block,
    PyramidVisionTransformerV2,
    load_pvt_v2_pretrained,
    pvt_v2_b0,
    pvt_v2_b1,
)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def b2_model() -> PolypPVT:
    torch.manual_seed(0)
    return PolypPVT().eval()


@pytest.fixture(scope="module")
def b0_model() -> PolypPVT:
    torch.manual_seed(0)
    return PolypPVT(backbone="pvt_v2_b0").eval()


# ---------------------------------------------------------------- parameter counts (official figures)

# Source: official_figures.md §1, DengPingFan/Polyp-PVT@cd71fbf9 lib/pvt.py (PolypPVT(), channel=32, pvt_v2_b2).
OFFICIAL_CHILDREN = {
    "backbone": 24_849_856,
    "Translayer2_0": 2_112,
    "Translayer2_1": 4_160,
    "Translayer3_1": 10_304,
    "Translayer4_1": 16_448,
    "CFM": 221_952,
    "ca": 512,
    "sa": 98,
    "SAM": 2_096,
    "down05": 0,
    "out_SAM": 33,
    "out_CFM": 33,
}


def test_polyp_pvt_b2_matches_official_parameter_table(b2_model):
    # official_figures.md §1, DengPingFan/Polyp-PVT@cd71fbf9 lib/pvt.py: same children, same order, same counts
    children = {name: _n_params(child) for name, child in b2_model.named_children()}
    assert children == OFFICIAL_CHILDREN
    assert list(children) == list(OFFICIAL_CHILDREN)
    assert _n_params(b2_model) == 25_107_604
    assert len(b2_model.state_dict()) == 419
    assert len(list(b2_model.parameters())) == 383
    # a few decoder figures by hand: BasicConv2d(64->32, 1x1) = 64*32 conv + 2*32 BN = 2048 + 64 = 2112;
    # CFM = 4 * (32*32*9 + 64) + 2 * (64*64*9 + 128) + (96*96*9 + 192) + (96*32*9 + 64)
    #     = 37120 + 73984 + 83136 + 27712 = 221952;  ca = 64*4 + 4*64 = 512;  sa = 2*7*7 = 98;
    # SAM = 2 * (32*16 + 16) + (16*16 + 16) + 16*16 + 16*32 = 1056 + 272 + 256 + 512 = 2096
    assert 4 * (32 * 32 * 9 + 64) + 2 * (64 * 64 * 9 + 128) + (96 * 96 * 9 + 192) + (96 * 32 * 9 + 64) == 221_952


def test_block_parameter_count_by_hand():
    # stage-1 block of b2: dim 64, mlp 8 (hidden 512), sr 8, qkv bias:
    # norm1 128 + q 64*64+64=4160 + kv 64*128+128=8320 + proj 4160 + sr 64*64*8*8+64=262208 + sr-norm 128
    # + norm2 128 + fc1 64*512+512=33280 + dwconv 512*9+512=5120 + fc2 512*64+64=32832  = 350464
    blk = Block(64, num_heads=1, mlp_ratio=8, qkv_bias=True, sr_ratio=8)
    assert _n_params(blk) == 350_464
    # stage-4 block of b2: dim 512, mlp 4 (hidden 2048), sr 1 (no sr conv / norm):
    # norm1 1024 + q 262656 + kv 525312 + proj 262656 + norm2 1024 + fc1 1050624 + dwconv 20480 + fc2 1049088
    # = 3172864
    blk = Block(512, num_heads=8, mlp_ratio=4, qkv_bias=True, sr_ratio=1)
    assert _n_params(blk) == 3_172_864
    assert not hasattr(blk.attn, "sr")


def test_builders_match_published_sizes():
    # Published #Params (M) with the 1000-class head: whai362/PVT README classification table (B0 3.7, B1 14.0,
    # B2 25.4, B3 45.2, B4 62.6, B5 82.0; also the timm model cards, e.g. pvt_v2_b5.in1k 82.0).
    # Our builders have no head: add C4*1000 + 1000.
    published = {"pvt_v2_b0": 3.7, "pvt_v2_b1": 14.0, "pvt_v2_b2": 25.4, "pvt_v2_b3": 45.2,
                 "pvt_v2_b4": 62.6, "pvt_v2_b5": 82.0}
    counts = {}
    for name, builder in PVT_V2_BUILDERS.items():
        with torch.device("meta"):  # shapes only: skips the ~200 M random initialisations
            model = builder()
        counts[name] = _n_params(model)
        head = model.embed_dims[-1] * 1000 + 1000
        assert round((counts[name] + head) / 1e6, 1) == published[name], name
    assert counts["pvt_v2_b2"] == 24_849_856  # official_figures.md §1 (backbone row)
    ordered = [counts[f"pvt_v2_b{i}"] for i in range(6)]
    assert ordered == sorted(ordered) and len(set(ordered)) == 6


# ---------------------------------------------------------------- forward shapes and return convention


def test_b2_forward_shapes(b2_model):
    feats = []
    handle = b2_model.backbone.register_forward_hook(lambda _m, _i, out: feats.extend(out))
    try:
        with torch.no_grad():
            out = b2_model(torch.randn(1, 3, 352, 352))
    finally:
        handle.remove()
    # official_figures.md §1: output [1,1,352,352]; features at strides 4/8/16/32 of 352 = 88/44/22/11
    assert out.shape == (1, 1, 352, 352)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 88, 88), (1, 128, 44, 44), (1, 320, 22, 22), (1, 512, 11, 11)]
    assert torch.isfinite(out).all()


def test_backbone_b0_feature_shapes():
    feats = pvt_v2_b0()(torch.randn(2, 3, 64, 64))
    # 64 / 4, 8, 16, 32 = 16, 8, 4, 2 with b0 widths 32, 64, 160, 256
    assert [tuple(f.shape) for f in feats] == [(2, 32, 16, 16), (2, 64, 8, 8), (2, 160, 4, 4), (2, 256, 2, 2)]


def test_backbone_matches_timm_reference_through_official_key_conversion():
    """timm's independent PVTv2 implementation reads *official* checkpoints through its ``checkpoint_filter_fn``
    (official keys -> timm keys); feeding it our state dict therefore checks both the key names and the maths."""
    torch.manual_seed(0)
    ours = pvt_v2_b0().eval()
    reference = timm.create_model("pvt_v2_b0", pretrained=False).eval()
    assert not isinstance(reference, PyramidVisionTransformerV2)  # timm's registry is left alone
    missing, unexpected = reference.load_state_dict(checkpoint_filter_fn(ours.state_dict(), reference), strict=False)
    assert sorted(missing) == ["head.bias", "head.weight"] and unexpected == []
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        feats = ours(x)
    assert len(feats) == len(expected) == 4
    for f, e in zip(feats, expected):
        torch.testing.assert_close(f, e, atol=1e-5, rtol=1e-5)


def _manual_heads(model: PolypPVT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P1, P2 written out from the paper's equations with the model's submodules."""
    x1, x2, x3, x4 = model.backbone(x)
    x1 = model.ca(x1) * x1
    cim = model.sa(x1) * x1
    cfm = model.CFM(model.Translayer4_1(x4), model.Translayer3_1(x3), model.Translayer2_1(x2))
    t2 = F.interpolate(model.Translayer2_0(cim), scale_factor=0.5, mode="bilinear", align_corners=True)
    sam = model.SAM(cfm, t2)
    p1 = F.interpolate(model.out_CFM(cfm), scale_factor=8, mode="bilinear")
    p2 = F.interpolate(model.out_SAM(sam), scale_factor=8, mode="bilinear")
    return p1, p2


def test_train_mode_tuple_and_eval_mode_sum():
    torch.manual_seed(1)
    model = PolypPVT(backbone="pvt_v2_b0", drop_path_rate=0.0)  # no stochastic depth: train == eval maths
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model.eval()
        p1_ref, p2_ref = _manual_heads(model, x)
        summed = model(x)
        model.train()
        for m in model.modules():  # BN on running statistics so that both modes compute the same heads
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        out = model(x)
    assert isinstance(out, tuple) and len(out) == 2
    assert out[0].shape == out[1].shape == (2, 1, 64, 64)
    torch.testing.assert_close(out[0], p1_ref)  # P1 = head on the CFM feature
    torch.testing.assert_close(out[1], p2_ref)  # P2 = head on the SAM feature
    assert isinstance(summed, torch.Tensor) and summed.shape == (2, 1, 64, 64)
    torch.testing.assert_close(summed, p1_ref + p2_ref)
    assert not torch.allclose(p1_ref, p2_ref)


def test_out_channels_and_in_channels():
    model = PolypPVT(in_channels=1, out_channels=2, backbone="pvt_v2_b0").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 1, 64, 64))
    assert out.shape == (1, 2, 64, 64)
    assert model.backbone.patch_embed1.proj.in_channels == 1


def test_autocast_bf16_and_channels_last(b0_model):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = b0_model(x)
        cl = b0_model(x.contiguous(memory_format=torch.channels_last))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = b0_model(x)
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)
    assert low.shape == ref.shape and torch.isfinite(low).all()
    torch.testing.assert_close(low.float(), ref, atol=5e-2, rtol=5e-2)  # bf16 has ~3 significant digits


def test_backward_in_train_mode():
    model = PolypPVT(backbone="pvt_v2_b0").train()
    p1, p2 = model(torch.randn(2, 3, 64, 64))
    (p1.mean() + p2.mean()).backward()
    assert model.backbone.patch_embed1.proj.weight.grad is not None
    assert model.SAM.conv_extend.weight.grad is not None


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="pvt_v2_b9"):
        PolypPVT(backbone="pvt_v2_b9")
    with pytest.raises(ValueError, match="multiples of 32"):
        PolypPVT(backbone="pvt_v2_b0")(torch.randn(1, 3, 80, 64))
    with pytest.raises(ValueError, match="depths"):
        PyramidVisionTransformerV2(depths=(1, 1, 1))


# ---------------------------------------------------------------- regularisation and initialisation


def test_dropout_and_drop_path_schedule(b2_model):
    model = PolypPVT(backbone="pvt_v2_b0", dropout=0.25)
    blk = model.backbone.block3[1]
    assert blk.mlp.drop.p == 0.25 and blk.attn.proj_drop.p == 0.25
    bb = b2_model.backbone
    # linspace(0, 0.1, 3+4+6+3 = 16): block i has rate 0.1 * i / 15; first is 0 -> Identity
    assert isinstance(bb.block1[0].drop_path, nn.Identity)
    assert bb.block1[1].drop_path.drop_prob == pytest.approx(0.1 / 15)
    assert bb.block3[0].drop_path.drop_prob == pytest.approx(0.1 * 7 / 15)  # 7th block (index 7)
    assert bb.block4[2].drop_path.drop_prob == pytest.approx(0.1)


def test_official_initialisation(b2_model):
    bb = b2_model.backbone
    # Conv2d ~ N(0, sqrt(2 / (k*k*C_out/groups))): patch_embed1 7*7*64 = 3136 -> 0.02525 (9408 samples);
    # stage-1 sr conv 8*8*64 = 4096 -> 0.02210 (262144 samples); dwconv 3*3*512/512 = 9 -> 0.4714 (4608 samples)
    assert bb.patch_embed1.proj.weight.std().item() == pytest.approx(math.sqrt(2 / 3136), rel=0.05)
    assert bb.block1[0].attn.sr.weight.std().item() == pytest.approx(math.sqrt(2 / 4096), rel=0.02)
    assert bb.block1[0].mlp.dwconv.dwconv.weight.std().item() == pytest.approx(math.sqrt(2 / 9), rel=0.05)
    assert bb.block2[0].attn.kv.weight.std().item() == pytest.approx(0.02, rel=0.02)  # Linear: std 0.02
    assert torch.count_nonzero(bb.block2[0].attn.kv.bias) == 0
    assert torch.count_nonzero(bb.patch_embed1.proj.bias) == 0
    assert torch.equal(bb.norm4.weight, torch.ones(512)) and torch.count_nonzero(bb.norm4.bias) == 0
    # LayerNorm eps: 1e-6 in blocks / stage norms, PyTorch default 1e-5 in patch embed and sr norm (official)
    assert bb.norm1.eps == 1e-6 and bb.block1[0].norm1.eps == 1e-6
    assert bb.patch_embed1.norm.eps == 1e-5 and bb.block1[0].attn.norm.eps == 1e-5


# ---------------------------------------------------------------- hand-checkable building blocks


def test_channel_attention_by_hand():
    ca = ChannelAttention(16)  # hidden 16 // 16 = 1
    with torch.no_grad():
        nn.init.zeros_(ca.fc1.weight)
        x = torch.randn(2, 16, 3, 3)
        torch.testing.assert_close(ca(x), torch.full((2, 16, 1, 1), 0.5))  # sigmoid(0) = 0.5
        nn.init.ones_(ca.fc1.weight)
        nn.init.ones_(ca.fc2.weight)
        # every channel holds the pixels (0, 0.2): avg 0.1, max 0.2
        # avg branch: fc1 = 16*0.1 = 1.6 -> fc2 = 1.6; max branch: 16*0.2 = 3.2; sigmoid(4.8) = 0.991837
        x = torch.tensor([0.0, 0.2]).view(1, 1, 1, 2).expand(1, 16, 1, 2)
        torch.testing.assert_close(ca(x), torch.full((1, 16, 1, 1), 0.991837), atol=1e-6, rtol=0)
        # pixels (-0.1, -0.2): fc1 gives -2.4 and -1.6, ReLU -> 0, so sigmoid(0) = 0.5
        x = torch.tensor([-0.1, -0.2]).view(1, 1, 1, 2).expand(1, 16, 1, 2)
        torch.testing.assert_close(ca(x), torch.full((1, 16, 1, 1), 0.5))


def test_spatial_attention_by_hand():
    sa = SpatialAttention()
    with torch.no_grad():
        nn.init.zeros_(sa.conv1.weight)
        sa.conv1.weight[0, 0, 3, 3] = 1.0  # centre tap on the channel-mean map
        sa.conv1.weight[0, 1, 3, 3] = 2.0  # centre tap on the channel-max map
        x = torch.tensor([-1.0, 0.5]).view(1, 2, 1, 1)
        # mean = -0.25, max = 0.5 -> -0.25 + 2 * 0.5 = 0.75 -> sigmoid(0.75) = 0.679179
        torch.testing.assert_close(sa(x), torch.full((1, 1, 1, 1), 0.679179), atol=1e-6, rtol=0)


def test_basic_conv2d_keeps_negative_values():
    # official quirk (spec §7 row 17): the ReLU is constructed but not applied
    conv = BasicConv2d(2, 1, 1).eval()  # BN at init: running mean 0, var 1, gamma 1, beta 0
    with torch.no_grad():
        conv.conv.weight.fill_(-1.0)
        out = conv(torch.ones(1, 2, 1, 1))
    # conv: -1 - 1 = -2; BN: -2 / sqrt(1 + 1e-5) = -1.99999
    torch.testing.assert_close(out, torch.full((1, 1, 1, 1), -2.0 / math.sqrt(1 + 1e-5)))
    assert isinstance(conv.relu, nn.ReLU)


def test_cfm_follows_the_cascade_equations():
    torch.manual_seed(0)
    cfm = CFM(4).eval()
    x1, x2, x3 = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 8, 8)

    def up(t: torch.Tensor) -> torch.Tensor:
        return F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=True)

    with torch.no_grad():
        x2_1 = cfm.conv_upsample1(up(x1)) * x2
        x3_1 = cfm.conv_upsample2(up(up(x1))) * cfm.conv_upsample3(up(x2)) * x3
        x2_2 = cfm.conv_concat2(torch.cat([x2_1, cfm.conv_upsample4(up(x1))], 1))
        x3_2 = cfm.conv_concat3(torch.cat([x3_1, cfm.conv_upsample5(up(x2_2))], 1))
        expected = cfm.conv4(x3_2)
        out = cfm(x1, x2, x3)
    assert out.shape == (1, 4, 8, 8)
    torch.testing.assert_close(out, expected)


def test_attention_matches_explicit_spatial_reduction_attention():
    torch.manual_seed(0)
    dim, heads, sr, h, w = 8, 2, 2, 4, 4
    attn = Attention(dim, num_heads=heads, qkv_bias=True, sr_ratio=sr).eval()
    nn.init.normal_(attn.norm.weight)  # non-trivial LayerNorm affine
    x = torch.randn(2, h * w, dim)
    with torch.no_grad():
        out = attn(x, h, w)
        # explicit: K, V from the sr-conv-reduced (4x4 -> 2x2 = 4 tokens), layer-normed grid
        grid = x.transpose(1, 2).reshape(2, dim, h, w)
        red = attn.norm(attn.sr(grid).flatten(2).transpose(1, 2))  # [2, 4, 8]
        q = attn.q(x).view(2, h * w, heads, dim // heads).transpose(1, 2)  # [2, 2, 16, 4]
        k, v = attn.kv(red).split(dim, dim=-1)
        k = k.reshape(2, 4, heads, dim // heads).transpose(1, 2)
        v = v.reshape(2, 4, heads, dim // heads).transpose(1, 2)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim // heads), dim=-1)  # [2, 2, 16, 4]
        expected = attn.proj((weights @ v).transpose(1, 2).reshape(2, h * w, dim))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _sam_constant_setup(sam: SimilarityAggregation) -> None:
    """S = 1 everywhere, GCN: conv1 = 0, conv2 = -I, conv_extend = 1/16."""
    nn.init.zeros_(sam.conv_state.weight)
    nn.init.ones_(sam.conv_state.bias)
    nn.init.zeros_(sam.gcn.conv1.weight)
    nn.init.zeros_(sam.gcn.conv1.bias)
    sam.gcn.conv2.weight.copy_(-torch.eye(16).unsqueeze(-1))
    sam.conv_extend.weight.fill_(1.0 / 16)


def test_similarity_aggregation_by_hand():
    torch.manual_seed(0)
    sam = SimilarityAggregation(num_in=32, plane_mid=16, mids=4)
    x = torch.randn(1, 32, 4, 4)  # hw = 16
    edge_off = torch.zeros(1, 32, 8, 8)
    edge_off[:, 1] = -100.0  # softmax over channels gives channel 1 ~ e^-100 ~ 0
    with torch.no_grad():
        _sam_constant_setup(sam)
        # e ~ 0 -> anchors ~ 0 -> R = softmax over 16 nodes of 0 = 1/16 everywhere (whatever conv_proj is)
        # N = S R^T = 16 pixels * 1/16 = 1; GCN: h = 0 - N = -1, conv2 = -I -> 1, ReLU -> 1
        # N' R = 16 nodes * 1 * 1/16 = 1; conv_extend: 16 states * 1 * 1/16 = 1  =>  out = x + 1
        torch.testing.assert_close(sam(x, edge_off), x + 1)
        # channel 1 of the edge map switched on: e ~ 1, anchors = pooled projections, R no longer uniform
        edge_on = torch.zeros(1, 32, 8, 8)
        edge_on[:, 0] = -100.0
        nn.init.normal_(sam.conv_proj.weight)  # std 1: projections large enough for a clearly peaked R
        assert not torch.allclose(sam(x, edge_on), x + 1, atol=1e-3)
        # zero extension conv: the module is the identity on x
        nn.init.zeros_(sam.conv_extend.weight)
        torch.testing.assert_close(sam(x, edge_on), x)


# ---------------------------------------------------------------- official key names


def test_official_state_dict_keys(b2_model):
    keys = set(b2_model.state_dict())
    for key in (
        "backbone.patch_embed1.proj.weight",
        "backbone.patch_embed1.norm.weight",
        "backbone.block1.0.attn.sr.weight",
        "backbone.block1.0.attn.norm.bias",
        "backbone.block1.0.mlp.dwconv.dwconv.weight",
        "backbone.block3.5.attn.kv.bias",
        "backbone.block4.2.attn.q.weight",
        "backbone.norm4.weight",
        "Translayer2_0.conv.weight",
        "Translayer4_1.bn.running_var",
        "CFM.conv_upsample1.conv.weight",
        "CFM.conv4.bn.num_batches_tracked",
        "SAM.gcn.conv1.weight",
        "SAM.conv_extend.weight",
        "ca.fc1.weight",
        "sa.conv1.weight",
        "out_CFM.bias",
    ):
        assert key in keys, key
    assert "backbone.block4.0.attn.sr.weight" not in keys  # sr ratio 1 in stage 4
    assert "backbone.block1.3.norm1.weight" not in keys  # b2 stage 1 has 3 blocks
    assert not any(k.startswith("backbone.head") for k in keys)


# ---------------------------------------------------------------- checkpoint loading


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("wrap", ["plain", "model", "state_dict", "ddp"])
def test_checkpoint_round_trip(b0_model, tmp_path, wrap):
    sd = b0_model.state_dict()
    obj = {
        "plain": sd,
        "model": {"model": sd, "epoch": 3},
        "state_dict": {"state_dict": sd},
        "ddp": {f"module.{k}": v for k, v in sd.items()},
    }[wrap]
    path = tmp_path / f"{wrap}.pth"
    torch.save(obj, path)
    torch.manual_seed(123)  # a different random init, overwritten by the checkpoint
    loaded = PolypPVT(backbone="pvt_v2_b0", checkpoint=str(path))
    _assert_same_weights(loaded, b0_model)


def test_pretrained_backbone_drops_head(b0_model, tmp_path):
    sd = dict(b0_model.backbone.state_dict())
    sd["head.weight"] = torch.randn(1000, 256)
    sd["head.bias"] = torch.randn(1000)
    path = tmp_path / "pvt_v2_b0.pth"
    torch.save(sd, path)
    torch.manual_seed(321)
    model = PolypPVT(backbone="pvt_v2_b0", pretrained_backbone=path)
    _assert_same_weights(model.backbone, b0_model.backbone)
    assert not torch.equal(model.out_CFM.weight, b0_model.out_CFM.weight)  # decoder untouched


def test_missing_and_corrupt_files_raise(b0_model, tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        PolypPVT(backbone="pvt_v2_b0", checkpoint=missing)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pvt_v2_pretrained(pvt_v2_b0(), missing)
    good = tmp_path / "good.pth"
    torch.save(b0_model.state_dict(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated.pth"):
        PolypPVT(backbone="pvt_v2_b0", checkpoint=truncated)
    garbage = tmp_path / "garbage.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        load_pvt_v2_pretrained(pvt_v2_b0(), garbage)
    not_sd = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], not_sd)
    with pytest.raises(ValueError, match="list.pth.*state dict"):
        PolypPVT(backbone="pvt_v2_b0", checkpoint=not_sd)


def test_mismatched_checkpoints_raise(b0_model, tmp_path):
    sd = dict(b0_model.state_dict())
    sd["out_CFM.weight"] = torch.zeros(2, 32, 1, 1)
    wrong_shape = tmp_path / "wrong_shape.pth"
    torch.save(sd, wrong_shape)
    with pytest.raises(ValueError, match=r"wrong_shape\.pth.*shape-mismatched.*out_CFM\.weight"):
        PolypPVT(backbone="pvt_v2_b0", checkpoint=wrong_shape)

    sd = dict(b0_model.state_dict())
    del sd["SAM.conv_extend.weight"]
    sd["extra.weight"] = torch.zeros(1)
    incomplete = tmp_path / "incomplete.pth"
    torch.save(sd, incomplete)
    with pytest.raises(ValueError, match=r"incomplete\.pth.*missing.*SAM\.conv_extend\.weight.*unexpected.*extra"):
        PolypPVT(backbone="pvt_v2_b0", checkpoint=incomplete)

    # a b1 backbone file (widths 64..512) into a b0 backbone (widths 32..256)
    b1_file = tmp_path / "pvt_v2_b1.pth"
    torch.save(pvt_v2_b1().state_dict(), b1_file)
    with pytest.raises(ValueError, match=r"pvt_v2_b1\.pth.*shape-mismatched.*patch_embed1\.proj\.weight"):
        load_pvt_v2_pretrained(pvt_v2_b0(), b1_file)
