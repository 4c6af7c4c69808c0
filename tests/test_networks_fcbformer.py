"""FCBFormer (common/networks/fcbformer.py): published size, the residual block and the progressive locality decoder
on hand-made inputs, official checkpoints, the bundle contract (trace, channels_last, autocast, gradients) and one
bundle run through configs/networks/fcbformer.json."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from common.networks.fcbformer import FCBFormer, ResidualBlock, TransformerBranch
from common.networks.pvt_v2 import pvt_v2_b3
from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, n_params, seeded, train_and_evaluate_override)

TINY_BACKBONE = {"embed_dims": (16, 32, 40, 64), "depths": (1, 1, 1, 1)}  # heads (1, 2, 5, 8) divide the widths
TINY = {**TINY_BACKBONE, "decoder_channels": 8, "fcb_channels": 8, "fcb_channel_mults": (1, 1, 1, 1, 2, 2),
        "fcb_num_res_blocks": 1, "num_groups": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(seed: int = 0, **kwargs) -> FCBFormer:
    return seeded(FCBFormer, seed, **TINY, **kwargs)


@pytest.fixture(scope="module")
def full_model() -> FCBFormer:
    return seeded(FCBFormer).eval()


# ------------------------------------------------------------------------------------------ published size


def test_full_size_parameter_count_and_output_shapes(full_model):
    # The MIUA 2022 paper and the official README (ESandML/FCBFormer) print no parameter count, so the sizes are
    # pinned per part from the official Models/models.py architecture, with the arithmetic:
    children = {name: n_params(child) for name, child in full_model.named_children()}
    assert children == {"TB": 46_404_544, "FCB": 6_384_800, "PH": 172_993}
    assert n_params(full_model) == 52_962_337  # 52.96 M
    # PVTv2-b3: 45.2 M in the PVTv2 paper (Wang et al., CVMJ 2022, Table 1 / whai362/PVT README), which counts the
    # ImageNet head Linear(512, 1000) = 512 * 1000 + 1000 = 513,000 that FCBFormer drops.
    backbone = n_params(full_model.TB.backbone)
    assert backbone == 44_725_696 and round((backbone + 513_000) / 1e6, 1) == 45.2
    # RB(a -> b) = GN(2a) + Conv3x3(a*b*9 + b) + GN(2b) + Conv3x3(b*b*9 + b) + [a != b] Conv1x1(a*b + b)
    rb64 = 128 + 36_928 + 128 + 36_928  # RB(64 -> 64) = 74,112
    rb128 = 256 + 73_792 + 128 + 36_928 + 8_256  # RB(128 -> 64) = 119,360
    rb320 = 640 + 184_384 + 128 + 36_928 + 20_544  # 242,624
    rb512 = 1_024 + 294_976 + 128 + 36_928 + 32_832  # 365,888
    assert n_params(full_model.TB.LE) == 2 * rb64 + (rb128 + rb64) + (rb320 + rb64) + (rb512 + rb64) == 1_098_432
    assert n_params(full_model.TB.SFA) == 3 * (rb128 + rb64) == 580_416
    rb96 = 192 + 55_360 + 128 + 36_928 + 6_208  # PH: RB(64 + 32 -> 64) = 98,816
    assert children["PH"] == rb96 + rb64 + 65
    assert n_params(full_model.FCB.middle_block) == 2 * 2 * (256 + 147_584)  # 2 x RB(128 -> 128) = 591,360
    assert len(full_model.FCB.enc_blocks) == 18 and len(full_model.FCB.dec_blocks) == 18
    assert len(full_model.state_dict()) == 1_034

    with torch.no_grad():
        x = torch.randn(1, 3, 64, 64)
        assert full_model(x).shape == (1, 1, 64, 64)
        full_model.train()
        try:
            out = full_model(x)
        finally:
            full_model.eval()
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == (1, 1, 64, 64)


def test_fcb_decoder_consumes_encoder_skips_in_reverse(full_model):
    # widths per level 32, 32, 64, 64, 128, 128; the encoder keeps 18 skips:
    #   32 (stem) | 32 32 32 | 32 32 32 | 64 64 64 | 64 64 64 | 128 128 128 | 128 128   (3rd of a level: stride-2)
    # the decoder pops them from the end, each block taking [h, skip]:
    #   level 128: 128+128 x3 | level 128: 256, 256, 128+64 | level 64: 128+64, 64+64 x2 | level 64: 128, 128, 64+32
    #   level 32: 64+32, 64, 64 | level 32: 64 x3
    widths = [block[0].in_layers[0].num_channels for block in full_model.FCB.dec_blocks]
    assert widths == [256, 256, 256, 256, 256, 192, 192, 128, 128, 128, 128, 96, 96, 64, 64, 64, 64, 64]
    upsampling = [i for i, block in enumerate(full_model.FCB.dec_blocks) if len(block) == 2]
    assert upsampling == [2, 5, 8, 11, 14]  # the last block of every level but the final one


# ------------------------------------------------------------------------------------------ hand-made examples


def _center_tap(conv: nn.Conv2d, weight: float, bias: float) -> None:
    """A 3x3 convolution that multiplies its (single-channel) input by ``weight`` and adds ``bias``."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = weight
        conv.bias.fill_(bias)


def test_residual_block_by_hand():
    rb = ResidualBlock(1, 1, num_groups=1)
    _center_tap(rb.in_layers[2], 1.0, 0.0)  # conv1 = identity
    _center_tap(rb.out_layers[2], 2.0, 0.1)  # conv2 = 2 * . + 0.1
    x = torch.tensor([[[[0.0, 1.0], [3.0, 4.0]]]])
    # (four distinct values: GroupNorm would map any two-valued map to the same +-1 pattern whatever the activation)
    # GN(x): mean 2, variance 2.5 -> z = [-1.2649, -0.6325, 0.6325, 1.2649]
    # SiLU(z) = z / (1 + exp(-z)) = [-0.2784, -0.2194, 0.4130, 0.9865]
    # GN: mean 0.2254, std 0.5163 -> [-0.9759, -0.8616, 0.3634, 1.4741]; SiLU -> [-0.2671, -0.2559, 0.2144, 1.1995]
    # conv2 -> [-0.4342, -0.4118, 0.5287, 2.4989]; + x -> [-0.4342, 0.5882, 3.5287, 6.4989]
    expected = torch.tensor([[-0.434221, 0.588199], [3.528718, 6.498923]])
    torch.testing.assert_close(rb(x)[0, 0], expected, atol=1e-4, rtol=0)


def _pass_through_decoder() -> TransformerBranch:
    """A width-1 decoder whose RBs reduce to their skips: LE_i = channel mean, SFA_i([E, A]) = E + 10 A."""
    tb = TransformerBranch(**TINY_BACKBONE, channels=1, num_groups=1)
    with torch.no_grad():
        for rb in tb.modules():
            if isinstance(rb, ResidualBlock):
                for conv in (rb.in_layers[2], rb.out_layers[2]):
                    conv.weight.zero_()
                    conv.bias.zero_()
        for le, width in zip(tb.LE, TINY_BACKBONE["embed_dims"]):
            le[0].skip.weight.fill_(1.0 / width)
            le[0].skip.bias.zero_()
        for sfa in tb.SFA:
            sfa[0].skip.weight.copy_(torch.tensor([1.0, 10.0]).view(1, 2, 1, 1))
            sfa[0].skip.bias.zero_()
    return tb


def _levels(maps: list[list[list[float]]]) -> list[torch.Tensor]:
    """Pyramid levels ``[1, C_i, h, w]`` repeating each hand-made map over the stage's channels."""
    return [torch.tensor(m).expand(1, c, -1, -1) for m, c in zip(maps, TINY_BACKBONE["embed_dims"])]


def test_progressive_locality_decoder_by_hand():
    tb = _pass_through_decoder()
    # (2x2 maps at least: GroupNorm rejects a group holding a single value)
    # A_4 = 4; A_3 = 3 + 10 * 4 = 43; A_2 = 2 + 430 = 432; A_1 = F_1 + 4320 (SFA order and [E_i, A] order)
    out = tb.decode(_levels([[[1.0, 2.0], [3.0, 4.0]], [[2.0] * 2] * 2, [[3.0] * 2] * 2, [[4.0] * 2] * 2]))
    torch.testing.assert_close(out, torch.tensor([[[[4321.0, 4322.0], [4323.0, 4324.0]]]]))
    # nearest (not bilinear) upsampling of a 2x2 stage-2 map to the 4x4 stage-1 size, weighted by 10
    out = tb.decode(_levels([[[0.0] * 4] * 4, [[1.0, 2.0], [3.0, 4.0]], [[0.0] * 2] * 2, [[0.0] * 2] * 2]))
    expected = torch.tensor([[10.0, 10, 20, 20], [10, 10, 20, 20], [30, 30, 40, 40], [30, 30, 40, 40]])
    torch.testing.assert_close(out[0, 0], expected)


# ------------------------------------------------------------------------------------------ checkpoints


def _official_file(model: FCBFormer) -> dict:
    """What the official train.py saves (here with DataParallel's ``module.`` prefix as well)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return {"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
            "optimizer_state_dict": optimizer.state_dict(), "loss": np.float64(0.25),
            "test_measure_mean": np.mean([0.8, 0.9]), "test_measure_std": np.std([0.8, 0.9])}


def test_official_checkpoint_loads_and_a_missing_key_is_named(tmp_path):
    source = _tiny(seed=1).eval()
    x = torch.randn(1, 3, 32, 32)
    path = tmp_path / "FCBFormer_Kvasir.pt"
    assert_reloads(_official_file(source), path, source, x, lambda p: _tiny(seed=2, checkpoint=p))
    # a file written under numpy 1.x names its scalars numpy.core.multiarray (legacy pickle: plain-text globals)
    legacy = tmp_path / "numpy1.pt"
    torch.save(_official_file(source), legacy, _use_new_zipfile_serialization=False)
    data = legacy.read_bytes()
    assert b"numpy._core.multiarray" in data
    legacy.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(_tiny(seed=3, checkpoint=legacy).PH[2].weight, source.PH[2].weight)

    state = {k: v for k, v in source.state_dict().items() if k != "TB.SFA.1.0.skip.weight"}
    assert_load_fails({"state_dict": state}, path, lambda p: _tiny(checkpoint=p), r"TB\.SFA\.1\.0\.skip\.weight")


def test_pretrained_backbone_reads_official_pvt_keys(tmp_path):
    torch.manual_seed(4)
    pvt = pvt_v2_b3(**TINY_BACKBONE)
    state = {**pvt.state_dict(), "head.weight": torch.randn(1000, 64), "head.bias": torch.zeros(1000)}
    assert {"patch_embed1.proj.weight", "block3.0.attn.sr.weight", "norm4.weight"} <= set(state)
    path = tmp_path / "pvt_v2_b3.pth"
    torch.save(state, path)
    model = _tiny(pretrained_backbone=path)
    # Sequential(patch_embed1, block1, norm1, patch_embed2, ...): index 3 * (stage - 1) + {0, 1, 2}
    assert torch.equal(model.TB.backbone[0].proj.weight, pvt.patch_embed1.proj.weight)
    assert torch.equal(model.TB.backbone[7][0].attn.sr.weight, pvt.block3[0].attn.sr.weight)
    assert torch.equal(model.state_dict()["TB.backbone.11.weight"], pvt.norm4.weight)


# ------------------------------------------------------------------------------------------ bundle contract


def test_trace_channels_last_autocast_and_bad_size():
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 64)
    assert_traceable(model, x, check_trace=False, channels_last_tol=(1e-4, 1e-4))
    assert_bf16_close(model, x, min_corr=None)
    assert_rejects_size(model, (48, 64), r"FCBFormer.*\(48, 64\)")


def test_every_parameter_gets_a_gradient():
    model = _tiny()
    assert n_params(model) == 297_001  # the tiny instance the tests and the bundle run use (< 0.5 M)
    # 64 px: at 32 px stage 4 is a single token, whose attention ignores the query (a zero, not a missing, gradient)
    assert_gradients(model, torch.randn(2, 3, 64, 64), 1, reduce=torch.sum)


@pytest.mark.slow
def test_bundle_trains_and_evaluates_through_the_override(tmp_path):
    train_and_evaluate_override(
        tmp_path, "fcbformer.json", FCBFormer, fcbformer_embed_dims=list(TINY["embed_dims"]),
        fcbformer_depths=list(TINY["depths"]), fcbformer_decoder_channels=8, fcbformer_fcb_channels=8,
        fcbformer_fcb_channel_mults=list(TINY["fcb_channel_mults"]), fcbformer_fcb_num_res_blocks=1,
        fcbformer_num_groups=4,
    )
