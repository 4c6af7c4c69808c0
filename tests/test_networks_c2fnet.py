"""Tests of C2FNet (common/networks/c2fnet.py) and its bundle override
(bundles/endoked_polyp_segmentation/configs/networks/c2fnet.json)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.networks.c2fnet import ACFM, DGCM, MSCA, C2FNet
from common.networks.res2net import res2net50_v1b, res2net_stages

from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, fixed_image, identity_batchnorms, n_params, seeded,
                                  tiny_with_bn_stats, train_and_evaluate_override)

# a 64,633-parameter instance: decoder width 8, one Res2Net block per stage, 64-channel stages, stem width 8
TINY = {"channel": 8, "backbone_layers": (1, 1, 1, 1), "backbone_channels": (16, 16, 16, 16), "stem_width": 8}
TINY_IDS = {"c2fnet_channel": 8, "c2fnet_backbone_layers": [1, 1, 1, 1], "c2fnet_backbone_channels": [16, 16, 16, 16],
            "c2fnet_stem_width": 8}
BACKBONE_TINY = {"layers": (1, 1, 1, 1), "channels": (16, 16, 16, 16), "stem_width": 8}
LN3 = math.log(3.0)  # sigmoid(ln 3) = 3/4, sigmoid(2 ln 3) = 9/10
FC_PARAMS = 2048 * 1000 + 1000  # the official network's unused Res2Net ImageNet classifier (resnet.fc)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one intra-op thread is fastest on a shared CPU


def _tiny(seed: int = 0, **kwargs) -> C2FNet:
    """A tiny C2FNet with non-trivial BatchNorm statistics (two training forwards), in eval mode."""
    return tiny_with_bn_stats(C2FNet, seed, **TINY, **kwargs)


@pytest.fixture(scope="module")
def full_model() -> C2FNet:
    return seeded(C2FNet)


@pytest.fixture(scope="module")
def tiny_model() -> C2FNet:
    return _tiny()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return fixed_image()


# ------------------------------------------------------------------------------------ full-size network
# Published figure: the IJCAI 2021 paper (Sun et al.) and the official README (thograce/C2FNet) print no parameter
# count. The reference is therefore the official network as its code defines it (lib/C2FNet.py, channel=64, one
# output channel), whose Res2Net keeps the unused 1000-class ``fc`` (the EndoKED copy of that file prints it with
# thop): official = ours + fc = 26,362,217 + 2,048,000 + 1,000 = 28,411,217 -> 28.41 M.
#   Res2Net-50 v1b without fc: 25,718,352 - 2,049,000 = 23,669,352   (tests/test_networks_res2net.py)
#   RFBs (512 / 1024 / 2048 -> 64): 546,688 + 710,528 + 1,038,208;   ACFM 41,568 x 2;   DGCM 120,128 x 2
#   upconv3/2 36,992 x 2 (3x3 64->64 36,864 + BN 128);   classifier 65
def test_parameter_count_matches_the_official_definition(full_model):
    n = n_params(full_model)
    assert n == 26_362_217  # pinned exact count
    assert n_params(full_model.resnet) == 25_718_352 - FC_PARAMS
    decoder = [(full_model.rfb2_1, 546_688), (full_model.rfb3_1, 710_528), (full_model.rfb4_1, 1_038_208),
               (full_model.acfm3, 41_568), (full_model.dgcm3, 120_128), (full_model.upconv3, 36_992),
               (full_model.classifier, 65)]
    assert [n_params(m) for m, _ in decoder] == [count for _, count in decoder]
    # MSCA(64, r=4): two bottlenecks of (64*16 + 16) + 2*16 + (16*64 + 64) + 2*64 = 2,288 -> 4,576
    assert n_params(full_model.acfm3.msca) == 4_576
    official = n + FC_PARAMS
    assert official == 28_411_217 and round(official / 1e6, 2) == 28.41
    # the official state dict: ours plus resnet.fc.weight / resnet.fc.bias
    assert len(full_model.state_dict()) + 2 == 1_024


def test_full_network_output_shapes(full_model):
    full_model.train()
    maps = full_model(torch.randn(2, 3, 64, 64))  # batch 2: MSCA's global branch normalises one value per sample
    assert isinstance(maps, tuple) and len(maps) == 1 and maps[0].shape == (2, 1, 64, 64)
    full_model.eval()
    with torch.no_grad():
        assert full_model(torch.randn(1, 3, 64, 64)).shape == (1, 1, 64, 64)


def test_official_key_names(full_model):
    keys = set(full_model.state_dict())
    assert {"resnet.conv1.0.weight", "resnet.bn1.running_var", "resnet.layer4.2.convs.2.weight",
            "resnet.layer2.0.downsample.1.weight", "rfb2_1.branch0.0.conv.weight", "rfb4_1.branch3.3.conv.weight",
            "rfb3_1.branch2.1.bn.running_mean", "rfb2_1.conv_cat.conv.weight", "rfb2_1.conv_res.bn.bias",
            "acfm3.msca.local_att.0.bias", "acfm3.msca.local_att.4.running_var", "acfm2.msca.global_att.1.weight",
            "acfm2.msca.global_att.5.bias", "acfm3.conv.conv.weight", "dgcm3.h2h.conv.weight", "dgcm2.h2l.bn.weight",
            "dgcm2.mscah.local_att.3.weight", "dgcm3.mscal.global_att.4.bias", "dgcm2.conv.bn.num_batches_tracked",
            "upconv3.conv.weight", "upconv2.bn.bias", "classifier.weight", "classifier.bias"} <= keys
    assert not any(k.startswith("resnet.fc.") for k in keys)


# ----------------------------------------------------------------------------- hand-computed modules
def _set(conv: nn.Conv2d, weight: list[float] | float, bias: float | None = 0.0) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.as_tensor(weight, dtype=torch.float32).reshape(conv.weight.shape))
        if bias is not None:
            conv.bias.fill_(bias)


def _identity_conv3x3(conv: nn.Conv2d) -> None:
    """A 1 -> 1 3x3 convolution (padding 1) computing y = x: only the centre tap is 1."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1] = 1.0


def _zero_msca(msca: MSCA) -> None:
    """L(z) = G(z) = 0, so MSCA(z) = sigmoid(0) = 1/2 everywhere."""
    for conv in msca.modules():
        if isinstance(conv, nn.Conv2d):
            _set(conv, 0.0)


def test_msca_on_a_hand_example():
    msca = MSCA(channels=2, reduction=2)  # hidden width 1
    identity_batchnorms(msca)
    _set(msca.local_att[0], [1.0, 0.0])  # local: h = ReLU(z_0)
    _set(msca.local_att[3], [1.0, 1.0])  # L = (h, h)
    _set(msca.global_att[1], [0.0, 1.0])  # global: g = ReLU(mean(z_1))
    _set(msca.global_att[4], [1.0, -1.0])  # G = (g, -g)
    z0 = torch.tensor([[0.0, LN3], [-LN3, 0.0]])
    z1 = torch.tensor([[0.0, 2 * LN3], [LN3, LN3]])  # mean ln 3
    w = msca(torch.stack([z0, z1]).unsqueeze(0))
    # L = ReLU(z0) = [[0, ln3], [0, 0]] on both channels; G = (ln3, -ln3)
    # channel 0: sigmoid([[ln3, 2 ln3], [ln3, ln3]]) = [[3/4, 9/10], [3/4, 3/4]]
    # channel 1: sigmoid([[-ln3, 0], [-ln3, -ln3]]) = [[1/4, 1/2], [1/4, 1/4]]
    expected = torch.tensor([[[[0.75, 0.9], [0.75, 0.75]], [[0.25, 0.5], [0.25, 0.25]]]])
    torch.testing.assert_close(w, expected)


def test_acfm_on_a_hand_example():
    acfm = ACFM(channels=1)  # MSCA hidden width max(1 // 4, 1) = 1
    identity_batchnorms(acfm)
    _set(acfm.msca.local_att[0], 1.0), _set(acfm.msca.local_att[3], 1.0)  # L(z) = ReLU(z)
    _set(acfm.msca.global_att[1], 0.0), _set(acfm.msca.global_att[4], 0.0)  # G(z) = 0
    _identity_conv3x3(acfm.conv.conv)  # conv = ReLU(identity)
    x = torch.tensor([[[[LN3 - 1, -1.0], [-3.0, LN3 - 1]]]])
    y = torch.ones(1, 1, 1, 1)  # Up_2(y) = 1 everywhere
    # x + y = [[ln3, 0], [-2, ln3]] -> w = sigmoid(ReLU(.)) = [[3/4, 1/2], [1/2, 3/4]]
    # w x + (1 - w) y = [[3 ln3/4 - 1/2, 0], [-1, 3 ln3/4 - 1/2]] -> ReLU
    a = 0.75 * LN3 - 0.5
    torch.testing.assert_close(acfm(x, y), torch.tensor([[[[a, 0.0], [0.0, a]]]]))


def test_dgcm_on_a_hand_example():
    dgcm = DGCM(channels=1)
    identity_batchnorms(dgcm)
    _zero_msca(dgcm.mscah), _zero_msca(dgcm.mscal)  # both attentions = 1/2
    for block in (dgcm.h2h, dgcm.h2l, dgcm.conv):
        _identity_conv3x3(block.conv)
    x = torch.tensor([[[[4.0, 0.0, 8.0, 0.0], [0.0, 4.0, 0.0, 8.0]]]])
    # high = x / 2 = [[2, 0, 4, 0], [0, 2, 0, 4]]
    # low = AvgPool_2(x) / 2 = [2, 4] / 2 = [1, 2]  (1 x 2)
    # Up to 2 x 4, bilinear, align_corners=False: source columns -0.25 (clamped), 0.25, 0.75, 1.25 (clamped)
    #   -> [1, 1.25, 1.75, 2] on both rows
    expected = torch.tensor([[[[3.0, 1.25, 5.75, 2.0], [1.0, 3.25, 1.75, 6.0]]]])
    torch.testing.assert_close(dgcm(x), expected)


def test_forward_follows_the_cascade(tiny_model, image):
    """The wiring of the official forward, written out: two ACFM + DGCM stages, coarse to fine, then the classifier
    upsampled x8 (bilinear, align_corners=False)."""
    m = tiny_model
    with torch.no_grad():
        _, x2, x3, x4 = res2net_stages(m.resnet, image)
        x43 = m.acfm3(m.rfb3_1(x3), m.rfb4_1(x4))
        out43 = m.upconv3(m.dgcm3(x43) + x43)
        x432 = m.acfm2(m.rfb2_1(x2), out43)
        out432 = m.upconv2(m.dgcm2(x432) + x432)
        expected = F.interpolate(m.classifier(out432), scale_factor=8, mode="bilinear", align_corners=False)
        torch.testing.assert_close(m(image), expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- checkpoints
def _official(state: dict[str, torch.Tensor], wrapper: str) -> dict:
    """``state`` as the official code saves it: ``model.state_dict()`` with the Res2Net ``fc`` (MyTrain.py), the
    same under DistributedDataParallel (``module.`` prefix, EndoKED's MyTrain.py), or wrapped in ``state_dict``."""
    full = dict(state) | {"resnet.fc.weight": torch.randn(1000, 64), "resnet.fc.bias": torch.zeros(1000)}
    if wrapper == "ddp":
        return {f"module.{k}": v for k, v in full.items()}
    if wrapper == "state_dict":
        return {"epoch": 39, "state_dict": full}
    return full


@pytest.mark.parametrize("wrapper", ["plain", "ddp", "state_dict"])
def test_official_checkpoint_loads(tiny_model, image, tmp_path, wrapper):
    assert_reloads(_official(dict(tiny_model.state_dict()), wrapper), str(tmp_path / "C2FNet-39.pth"), tiny_model,
                   image, lambda path: _tiny(seed=5, checkpoint=path))


def test_checkpoint_without_the_unused_fc_loads(tiny_model, image, tmp_path):
    # what the bundle saves
    assert_reloads(tiny_model.state_dict(), str(tmp_path / "model.pt"), tiny_model, image,
                   lambda path: _tiny(seed=6, checkpoint=path))


def test_checkpoint_with_a_missing_key_names_it(tiny_model, tmp_path):
    state = _official(dict(tiny_model.state_dict()), "plain")
    del state["dgcm2.mscal.global_att.1.weight"]
    assert_load_fails(state, str(tmp_path / "broken.pth"), lambda path: C2FNet(**TINY, checkpoint=path),
                      r"missing.*dgcm2\.mscal\.global_att\.1\.weight")


def _imagenet_file(tmp_path: Path, drop: str | None = None) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny Res2Net-50 v1b ImageNet file with the official key names (``fc`` included), saved as a plain dict
    like ``res2net50_v1b_26w_4s-3cf99910.pth``."""
    torch.manual_seed(3)
    state = res2net50_v1b(**BACKBONE_TINY).state_dict()
    assert {"conv1.0.weight", "layer1.0.convs.0.weight", "fc.weight", "fc.bias"} <= set(state)
    path = tmp_path / "res2net50_v1b_26w_4s-3cf99910.pth"
    torch.save({k: v for k, v in state.items() if k != drop}, path)
    return path, state


def test_pretrained_backbone_loads_the_official_imagenet_keys(tmp_path, image):
    path, state = _imagenet_file(tmp_path)
    model = C2FNet(**TINY, pretrained_backbone=str(path))
    loaded = model.resnet.state_dict()
    assert set(loaded) == set(state) - {"fc.weight", "fc.bias"}  # the classifier is dropped
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)
    assert model.train()(image)[0].shape == (2, 1, 64, 64)


def test_pretrained_backbone_with_a_missing_key_names_it(tmp_path):
    path, _ = _imagenet_file(tmp_path, drop="layer3.0.bns.1.running_mean")
    with pytest.raises(ValueError, match=r"missing.*layer3\.0\.bns\.1\.running_mean"):
        C2FNet(**TINY, pretrained_backbone=str(path))


# ------------------------------------------------------------------------------- the network contract
def test_eval_traces_and_accepts_channels_last(tiny_model, image):
    assert_traceable(tiny_model, image)


def test_eval_under_bf16_autocast(tiny_model, image):
    assert_bf16_close(tiny_model, image, min_corr=0.99)


def test_bad_input_size_is_named(tiny_model):
    assert_rejects_size(tiny_model, (64, 48), r"C2FNet.*\(64, 48\)")


def test_every_parameter_gets_a_gradient(image):
    model = _tiny(seed=7)
    # MSCA's convolution biases feed a training-mode BatchNorm, which subtracts the batch mean: their gradient is
    # zero in exact arithmetic (as in the official network); every other parameter gets a non-zero one
    before_bn = {n for n, _ in model.named_parameters() if n.endswith(("local_att.0.bias", "local_att.3.bias",
                                                                       "global_att.1.bias", "global_att.4.bias"))}
    assert len(before_bn) == 4 * 6  # 6 MSCAs (2 in the ACFMs, 4 in the DGCMs), 4 biased convolutions each
    assert_gradients(model, image, 1, zero_ok=before_bn)


# ----------------------------------------------------------------------------------- bundle override
@pytest.mark.slow
def test_bundle_trains_and_evaluates_through_the_override(tmp_path):
    train_and_evaluate_override(tmp_path, "c2fnet.json", C2FNet, **TINY_IDS)
