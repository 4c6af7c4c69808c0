"""Tests of PIDNet-S (common/networks/pidnet.py) and its bundle override
(bundles/endoked_polyp_segmentation/configs/networks/pidnet.json)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from common.networks.pidnet import IMAGENET_MODULES, PAPPM, LightBag, PagFM, PIDNet

from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, fixed_image, identity_batchnorms, n_params, seeded,
                                  tiny_with_bn_stats, train_and_evaluate_override)

# a 66 k-parameter instance: base width 4, PAPPM and head width 4, one basic block in layer3 / layer4
TINY = {"planes": 4, "ppm_planes": 4, "head_planes": 4, "n": 1}
TINY_IDS = {"pidnet_planes": 4, "pidnet_ppm_planes": 4, "pidnet_head_planes": 4, "pidnet_n": 1}
LN3 = math.log(3.0)

pytestmark = pytest.mark.usefixtures("one_thread")  # sigmoid(ln 3) = 3/4, sigmoid(-ln 3) = 1/4


def _tiny(seed: int = 0, **kwargs) -> PIDNet:
    """A tiny PIDNet with non-trivial BatchNorm statistics (two training forwards), in eval mode."""
    return tiny_with_bn_stats(PIDNet, seed, **TINY, **kwargs)


@pytest.fixture(scope="module")
def full_model() -> PIDNet:
    return seeded(PIDNet)


@pytest.fixture(scope="module")
def tiny_model() -> PIDNet:
    return _tiny(boundary_head=True)


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return fixed_image()


# ------------------------------------------------------------------------------------ full-size network
# Published figure: 7.6 M parameters for PIDNet-S, Xu, Xiong & Bhattacharyya, CVPR 2023, comparison table on
# Cityscapes (#Params column). That is the inference model of the official code (augment=False: no seghead_p,
# no seghead_d) with 19 classes. Ours has 1 class and keeps seghead_p (the auxiliary P head used in training):
#   seghead_p (1 class)   = BN(64) 128 + Conv3x3 64->128 73,728 + BN(128) 256 + Conv1x1 128->1 (+bias) 129 = 74,241
#   final_layer.conv2     = 128 * K + K  ->  1 class: 129, 19 classes: 2,451
#   ours                  = 7,697,634
#   Cityscapes inference  = 7,697,634 - 74,241 - 129 + 2,451 = 7,625,715  -> 7.6 M
# Cross-check: a public re-implementation reports 7,716,549 for "exactly PIDNet-S" with both auxiliary heads and
# 2 classes = ours + 2 * 129 (a second class in final_layer and seghead_p) + seghead_d
# (BN(64) 128 + Conv3x3 64->32 18,432 + BN(32) 64 + Conv1x1 32->1 (+bias) 33 = 18,657) = 7,716,549.
def test_parameter_count_matches_the_published_figure(full_model):
    n = n_params(full_model)
    assert n == 7_697_634  # pinned exact count
    assert n_params(full_model.seghead_p) == 74_241
    assert n_params(full_model.final_layer.conv2) == 129
    cityscapes_inference = n - 74_241 - 129 + (128 * 19 + 19)
    assert cityscapes_inference == 7_625_715
    assert round(cityscapes_inference / 1e6, 1) == 7.6
    assert n + 2 * 129 + (128 + 64 * 32 * 9 + 64 + 33) == 7_716_549


def test_imagenet_modules_have_the_official_file_size(full_model):
    # a public report of loading PIDNet_S_ImageNet.pth.tar into the official PIDNet-S: 302 tensors matched,
    # 6,456,274 values (BN running statistics and num_batches_tracked included)
    state = {k: v for k, v in full_model.state_dict().items() if k.split(".")[0] in IMAGENET_MODULES}
    assert len(state) == 302
    assert sum(v.numel() for v in state.values()) == 6_456_274


def test_full_network_output_shapes(full_model):
    full_model.train()
    maps = full_model(torch.randn(2, 3, 64, 64))  # batch 2: PAPPM's global branch normalises one value per sample
    assert isinstance(maps, tuple) and len(maps) == 2
    assert all(m.shape == (2, 1, 64, 64) for m in maps)
    full_model.eval()
    with torch.no_grad():
        assert full_model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


# ----------------------------------------------------------------------------- hand-computed modules
def test_pag_fusion_on_a_hand_example():
    pag = PagFM(2, 2)
    with torch.no_grad():
        pag.f_x[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))  # f_x(x) = x
        pag.f_y[0].weight.copy_(2 * torch.eye(2).view(2, 2, 1, 1))  # f_y(y) = 2 y
    identity_batchnorms(pag)
    x = torch.stack([torch.tensor([[-1.0, LN3 - 1], [-LN3 - 1, -1.0]]), torch.full((2, 2), 4.0)]).unsqueeze(0)
    y = torch.tensor([0.5, 0.125]).view(1, 2, 1, 1)  # a 1x1 context map: U(y) is y at every pixel
    # s = sigmoid(x_0 * 1 + x_1 * 1/4) = sigmoid([[0, ln3], [-ln3, 0]]) = [[1/2, 3/4], [1/4, 1/2]]
    # out_0 = (1 - s) x_0 + s / 2  = [[-1/4, (ln3 - 1)/4 + 3/8], [-3 (ln3 + 1)/4 + 1/8, -1/4]]
    # out_1 = (1 - s) 4 + s / 8    = 4 - 31/8 s = [[2.0625, 1.09375], [3.03125, 2.0625]]
    expected = torch.tensor([[[[-0.25, 0.125 + LN3 / 4], [-0.625 - 0.75 * LN3, -0.25]],
                              [[2.0625, 1.09375], [3.03125, 2.0625]]]])
    torch.testing.assert_close(pag(x, y), expected, rtol=1e-6, atol=1e-6)


def test_light_bag_on_a_hand_example():
    bag = LightBag(1, 1)
    with torch.no_grad():
        bag.conv_p[0].weight.fill_(1.0)
        bag.conv_i[0].weight.fill_(2.0)
    identity_batchnorms(bag)
    p = torch.tensor([[[[2.0, 4.0]]]])
    i = torch.tensor([[[[6.0, 8.0]]]])
    d = torch.tensor([[[[0.0, LN3]]]])
    # e = sigmoid(d) = [1/2, 3/4]
    # conv_p((1 - e) i + p) = [3 + 2, 2 + 4] = [5, 6]; conv_i(i + e p) = 2 [6 + 1, 8 + 3] = [14, 22]
    torch.testing.assert_close(bag(p, i, d), torch.tensor([[[[19.0, 28.0]]]]))


def test_pappm_on_a_hand_example():
    ppm = PAPPM(1, 1, 1)
    with torch.no_grad():
        for conv in ppm.modules():
            if isinstance(conv, nn.Conv2d):
                conv.weight.fill_(1.0)  # 1x1: y = x; grouped 3x3 on a 1x1 map: only the centre tap sees data
    identity_batchnorms(ppm)
    x = torch.full((1, 1, 1, 1), 2.0)  # the I feature at 1/64 of a 64-pixel input
    # base = 2; average pools count the zero padding: 2/25 (5x5), 2/81 (9x9), 2/289 (17x17); global: 2
    # y_k = pooled + base = 2.08, 2 + 2/81, 2 + 2/289, 4; scale_process keeps them (ReLU of positives)
    # out = compression(base + sum y_k) + shortcut(x) = (2 + 10.08 + 2/81 + 2/289) + 2
    expected = 2 + (2.08 + 2 + 2 / 81 + 2 + 2 / 289 + 4) + 2
    torch.testing.assert_close(ppm(x), torch.full((1, 1, 1, 1), expected))


# ----------------------------------------------------------------------------------- checkpoints
def _official(state: dict[str, torch.Tensor], wrapper: str) -> dict:
    """``state`` as the official training saves it: the ``FullModel`` wrapper (network under ``model.``, the
    class-weighted CE's buffer beside it), as ``best.pt`` (flat), ``checkpoint.pth.tar`` or a DDP state dict."""
    full = {f"model.{k}": v for k, v in state.items()} | {"sem_loss.criterion.weight": torch.ones(1)}
    if wrapper == "checkpoint":
        return {"epoch": 3, "best_mIoU": 0.5, "state_dict": full}
    if wrapper == "ddp":
        return {f"module.{k}": v for k, v in full.items()}
    return full


@pytest.mark.parametrize("wrapper", ["best", "checkpoint", "ddp"])
def test_official_checkpoint_loads(tiny_model, image, tmp_path, wrapper):
    assert_reloads(_official(dict(tiny_model.state_dict()), wrapper), str(tmp_path / "PIDNet_S_polyp.pt"),
                   tiny_model, image, lambda path: _tiny(seed=5, boundary_head=True, checkpoint=path),
                   lambda path: _tiny(seed=6, checkpoint=path))  # without the boundary head: seghead_d.* dropped


def test_checkpoint_with_a_missing_key_names_it(tiny_model, tmp_path):
    state = _official(dict(tiny_model.state_dict()), "best")
    del state["model.dfm.conv_p.0.weight"]
    assert_load_fails(state, str(tmp_path / "broken.pt"),
                      lambda path: PIDNet(**TINY, boundary_head=True, checkpoint=path),
                      r"missing.*dfm\.conv_p\.0\.weight")


def _imagenet_file(tmp_path: Path, drop: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet file with the official key names: the stem, I and P branches of a tiny PIDNet plus a classifier
    (its key names are irrelevant: the official loader drops every key the segmentation network lacks)."""
    torch.manual_seed(3)
    source = PIDNet(**TINY)
    state = {k: v for k, v in source.state_dict().items() if k.split(".")[0] in IMAGENET_MODULES}
    assert "layer3_.0.conv1.weight" in state and "pag4.f_y.1.running_var" in state
    assert "spp.scale0.2.weight" not in state and "layer3_d.conv1.weight" not in state
    classifier = {"last_layer.0.weight": torch.randn(1024, 64, 1, 1), "linear.weight": torch.randn(1000, 1024),
                  "linear.bias": torch.zeros(1000)}
    saved = {k: v for k, v in state.items() if k != drop} | classifier
    path = tmp_path / "PIDNet_S_ImageNet.pth.tar"
    torch.save({"epoch": 100, "state_dict": saved}, path)
    return path, state


def test_pretrained_backbone_loads_the_official_imagenet_keys(tmp_path):
    path, state = _imagenet_file(tmp_path)
    torch.manual_seed(4)
    model = PIDNet(**TINY, pretrained_backbone=str(path))
    torch.manual_seed(4)
    scratch = PIDNet(**TINY)
    loaded = model.state_dict()
    for key, value in scratch.state_dict().items():
        assert torch.equal(loaded[key], state.get(key, value)), key  # I/P branches loaded, the rest as initialised


def test_pretrained_backbone_with_a_missing_key_names_it(tmp_path):
    path, _ = _imagenet_file(tmp_path, drop="layer5.1.bn3.running_var")
    with pytest.raises(ValueError, match=r"missing.*layer5\.1\.bn3\.running_var"):
        PIDNet(**TINY, pretrained_backbone=str(path))


# ------------------------------------------------------------------------------- the network contract
def test_eval_traces_and_accepts_channels_last(tiny_model, image):
    # channels_last: float32 reassociation only
    assert_traceable(tiny_model, image, channels_last_tol=(1e-4, 1e-4))


def test_eval_under_bf16_autocast(tiny_model, image):
    assert_bf16_close(tiny_model, image, min_corr=0.99)


def test_bad_input_size_is_named(tiny_model):
    assert_rejects_size(tiny_model, (64, 48), r"PIDNet.*\(64, 48\)")


@pytest.mark.parametrize("boundary_head", [False, True])
def test_every_parameter_gets_a_gradient(image, boundary_head):
    # per-channel shifts whose every consumer is a BatchNorm normalising with batch statistics get an exactly zero
    # gradient in training mode, in the original as here: layer5's output biases (every PAPPM branch starts with BN)
    # and the Bag's output biases (final_layer starts with BN); every other parameter gets a non-zero one
    shift_invariant = {"layer5.0.bn3.bias", "layer5.0.downsample.1.bias", "layer5.1.bn3.bias",
                       "dfm.conv_p.1.bias", "dfm.conv_i.1.bias"}
    assert_gradients(_tiny(seed=7, boundary_head=boundary_head), image, 3 if boundary_head else 2,
                     zero_ok=shift_invariant)


# ----------------------------------------------------------------------------------- bundle override
@pytest.mark.slow
def test_bundle_trains_and_evaluates_through_the_override(tmp_path):
    train_and_evaluate_override(tmp_path, "pidnet.json", PIDNet, **TINY_IDS)
