"""DCRNet (common/networks/dcrnet.py): official size and key names, the relation modules and the memory bank on
hand-made examples, checkpoint loading, eval-mode contract (trace, channels_last, bf16, batch independence) and one
bundle run through configs/networks/dcrnet.json."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from common.networks.dcrnet import (
    DCRNet,
    PositionAttention,
    batch_normalised_context,
    region_embeddings,
    resnet_encoder,
    slot_normalised_context,
)
from polyp_network_checks import (assert_bf16_close, assert_gradients, assert_load_fails, assert_rejects_size,
                                  assert_reloads, assert_traceable, n_params, seeded, train_and_evaluate_override,
                                  with_bn_stats)

TINY = dict(encoder_layers=(1, 1, 1, 1), encoder_channels=(8, 16, 32, 64), head_channels=8, bank_size=5)
LN3 = math.log(3.0)

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs) -> DCRNet:
    return seeded(DCRNet, **{**TINY, **kwargs})


def _filled(model: DCRNet, batches: int = 2) -> DCRNet:
    """``model`` after ``batches`` training forwards of 2 images (bank partly written, BN statistics moved), in eval
    mode, with a non-zero interior-attention weight."""
    with torch.no_grad():
        model.sa_head.gamma.fill_(0.5)
    return with_bn_stats(model, batches)


@pytest.fixture(scope="module")
def full_model() -> DCRNet:
    return seeded(DCRNet)


# ----------------------------------------------------------------------------------------------- 1. size
def test_parameter_count_and_output_shapes(full_model):
    """Neither the paper (ISBI 2022, 4 pages) nor the official README (PRIS-CV/DCRNet) gives a parameter count, so
    the count is derived from the official module definitions (lib/UNet_ResNet34.py, lib/DCRNet.py, lib/modules.py):

    ResNet-34 without fc: 21,797,672 - (512·1000 + 1000) = 21,284,672
    DecoderBlocks (conv3x3 C->C/4, BN, conv3x3 C/4->C', BN):
        center 512->512: 589,824 + 256 + 589,824 + 1,024 = 1,180,928;  decoder4 768->256: 1,770,368;
        decoder3 384->128: 442,816;  decoder2 192->64: 110,816;  decoder1 128->64: 55,488      -> 3,560,416
    finalconv heads (288·C_in + 64 + 33): 18,529 + 18,529 + 36,961 + 73,825                     ->   147,844
    L 513, X 2,359,296 + 1,024, phi/psi/delta 3 × 131,584, rho 132,096, g 525,312,
    sa_head 32,832 + 32,832 + 262,656 + 1                                                     -> 3,741,314
    total 28,734,246 parameters; the official class also holds the never-applied ``fusion`` conv
    (512·512 + 512 = 262,656, buffers here), so ``sum(p.numel())`` of the official DCRNet() is 28,996,902.
    """
    assert n_params(full_model) == 28_734_246
    assert n_params(full_model) + full_model.fusion.weight.numel() + full_model.fusion.bias.numel() == 28_996_902
    assert tuple(full_model.bank.shape) == (20, 512, 1)
    with torch.no_grad():
        assert tuple(full_model.eval()(torch.randn(1, 3, 64, 64)).shape) == (1, 1, 64, 64)
        # training needs >= 2 bank entries after the first write (BatchNorm1d over the slots, as in the original)
        outputs = full_model.train()(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape) for o in outputs] == [(2, 1, 64, 64)] * 5
    assert int(full_model.bank_ptr) == 2


# ----------------------------------------------------------------------------------------------- 2. modules by hand
def test_region_embedding_by_hand():
    # L = [0, ln3, 0, 0] -> softmax over the 4 positions = [1, 3, 1, 1] / 6
    logits = torch.tensor([0.0, LN3, 0.0, 0.0]).reshape(1, 1, 2, 2)
    features = torch.tensor([[6.0, 12.0, 0.0, 6.0], [1.0, 1.0, 1.0, 1.0]]).reshape(1, 2, 2, 2)
    # channel 0: (6·1 + 12·3 + 0·1 + 6·1) / 6 = 48 / 6 = 8;  channel 1: 1
    assert torch.allclose(region_embeddings(features, logits), torch.tensor([[[8.0], [1.0]]]))


def test_official_context_normalises_over_the_batch_and_reads_row_major():
    """B=2 images, S=1 slot with value [1, 2], hw = 1x2 positions, rho = identity."""
    logits = torch.tensor([[[0.0, LN3]], [[0.0, 0.0]]])  # [B, S, hw]
    values = torch.tensor([[1.0, 2.0]])
    out = batch_normalised_context(logits, values, nn.Identity(), 1, 2, per_image=False)
    # softmax over the 2 images: p0 [0, 0] -> [1/2, 1/2];  p1 [ln3, 0] -> [3/4, 1/4]
    # Z [hw, K, B]: Z[p0] = [[.5, .5], [1, 1]],  Z[p1] = [[.75, .25], [1.5, .5]]
    # row-major [.5 .5 1 1 .75 .25 1.5 .5] read as [B=2, C=2, 1, 2]
    expected = torch.tensor([[[[0.5, 0.5]], [[1.0, 1.0]]], [[[0.75, 0.25]], [[1.5, 0.5]]]])
    assert torch.allclose(out, expected)


def test_official_context_per_image_is_the_sum_of_the_bank_values():
    """Eval mode: each image is a batch of one, its softmax is 1, Z[p] = sum_s values[s] = [1+3, 2+4] = [4, 6] for
    both positions; [hw=2, C=2] = [[4, 6], [4, 6]] read row-major as [C=2, 1, 2] gives c0 = [4, 6], c1 = [4, 6]."""
    logits = torch.tensor([[[0.0, LN3], [5.0, -1.0]], [[2.0, 0.0], [0.0, 7.0]]])  # [B=2, S=2, hw=2]: no effect
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    out = batch_normalised_context(logits, values, nn.Identity(), 1, 2, per_image=True)
    assert torch.allclose(out, torch.tensor([[[4.0, 6.0]], [[4.0, 6.0]]]).expand(2, 2, 1, 2))


def test_paper_context_normalises_over_the_slots():
    logits = torch.tensor([[[0.0, LN3], [0.0, 0.0]]])  # [B=1, S=2, hw=2]
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # p0: softmax([0, 0]) = [1/2, 1/2] -> [2, 3];  p1: softmax([ln3, 0]) = [3/4, 1/4] -> [1.5, 2.5]
    out = slot_normalised_context(logits, values, nn.Identity(), 1, 2)
    assert torch.allclose(out, torch.tensor([[[[2.0, 1.5]], [[3.0, 2.5]]]]))


def test_position_attention_by_hand():
    """C = 8 (query/key width 1), a 1x2 map; q = ln3 · x_0, k = x_0, v = x, gamma = 2.
    x_0 = [1, 0], x_1 = [4, 8], other channels 0. Energies: row p0 = [ln3·1, 0] -> softmax [3/4, 1/4];
    row p1 = [0, 0] -> [1/2, 1/2]. out_0 = [3/4, 1/2], out_1 = [3/4·4 + 1/4·8, 1/2·4 + 1/2·8] = [5, 6];
    y = 2·out + x: y_0 = [2.5, 1.0], y_1 = [14, 20]."""
    pam = PositionAttention(8)
    with torch.no_grad():
        for conv in (pam.query_conv, pam.key_conv, pam.value_conv):
            conv.weight.zero_()
            conv.bias.zero_()
        pam.query_conv.weight[0, 0] = LN3
        pam.key_conv.weight[0, 0] = 1.0
        pam.value_conv.weight.copy_(torch.eye(8).reshape(8, 8, 1, 1))
        pam.gamma.fill_(2.0)
    x = torch.zeros(1, 8, 1, 2)
    x[0, 0, 0] = torch.tensor([1.0, 0.0])
    x[0, 1, 0] = torch.tensor([4.0, 8.0])
    expected = torch.zeros(1, 8, 1, 2)
    expected[0, 0, 0] = torch.tensor([2.5, 1.0])
    expected[0, 1, 0] = torch.tensor([14.0, 20.0])
    assert torch.allclose(pam(x), expected)


def test_memory_bank_is_a_queue_written_only_in_training():
    model = _tiny()  # 5 slots of [64, 1]
    assert model._memory().shape[0] == 5  # nothing written: every (zero) slot is used
    for batch, ptr, written in ((2, 2, [1, 2, 0, 0, 0]), (2, 4, [1, 2, 3, 4, 0]),
                                (3, 0, [1, 2, 3, 4, 5]),  # only 1 of 3 fits: the rest is dropped, pointer wraps
                                (2, 2, [6, 7, 3, 4, 5])):
        first = int(model.bank.max()) + 1  # embeddings numbered on from the largest value written so far
        values = torch.arange(first, first + batch, dtype=torch.float32)
        model._push_to_bank(values.reshape(batch, 1, 1).expand(batch, 64, 1))
        assert int(model.bank_ptr) == ptr
        assert model.bank[:, 0, 0].tolist() == written
    fresh = _tiny()
    fresh._push_to_bank(torch.ones(2, 64, 1))
    assert fresh._memory().shape[0] == 2  # only the written slots, as the official bank[0:ptr]
    fresh.train()(torch.randn(2, 3, 64, 64))
    assert int(fresh.bank_ptr) == 4
    before = fresh.bank.clone()
    with torch.no_grad():
        fresh.eval()(torch.randn(3, 3, 64, 64))
    assert torch.equal(fresh.bank, before) and int(fresh.bank_ptr) == 4


# ----------------------------------------------------------------------------------------------- 3. checkpoints
def test_official_checkpoint_round_trip_and_missing_key(tmp_path):
    source = _filled(_tiny())
    x = torch.randn(1, 3, 64, 96)
    state = source.state_dict()
    assert {"bank", "bank_ptr", "fusion.weight", "fusion.bias", "L.weight", "X.0.weight", "phi.1.running_mean",
            "rho.0.weight", "g.0.weight", "sa_head.gamma", "firstconv.weight", "encoder4.0.downsample.0.weight",
            "center.norm1.weight", "finalconv1.4.bias"} <= set(state)
    path = str(tmp_path / "Train_on_KvasirandDB_1_Best.pt")
    official = {"state_dict": {f"module.{k}": v for k, v in state.items()}}  # the EndoKED script saves the DDP keys
    # allclose(atol=1e-6) = assert_close(rtol=1e-5, atol=1e-6)
    (loaded,) = assert_reloads(official, path, source, x, lambda p: _tiny(checkpoint=p), tol=(1e-5, 1e-6))
    assert torch.equal(loaded.bank, source.bank) and int(loaded.bank_ptr) == int(source.bank_ptr)
    assert_load_fails({k: v for k, v in state.items() if k != "bank"}, path, lambda p: _tiny(checkpoint=p), "'bank'")


def test_pretrained_backbone_has_torchvision_names(tmp_path):
    """The official backbone is torchvision's ImageNet ResNet-34 (conv1, bn1, layer1..4, fc), loaded whole; the
    network keeps the stem and the stages and drops fc."""
    assert set(resnet_encoder().state_dict()) == set(torchvision.models.resnet34().state_dict())
    torch.manual_seed(1)
    imagenet = resnet_encoder(layers=TINY["encoder_layers"], channels=TINY["encoder_channels"]).state_dict()
    path = tmp_path / "resnet34-b627a593.pth"
    torch.save(imagenet, path)
    model = _tiny(pretrained_backbone=str(path))
    assert torch.equal(model.firstconv.weight, imagenet["conv1.weight"])
    assert torch.equal(model.encoder4[0].conv2.weight, imagenet["layer4.0.conv2.weight"])
    assert not any(k.startswith("fc.") for k in model.state_dict())
    torch.save({k: v for k, v in imagenet.items() if k != "fc.weight"}, path)
    with pytest.raises(ValueError, match="fc.weight"):
        _tiny(pretrained_backbone=str(path))


# ----------------------------------------------------------------------------------------------- 4. contract
@pytest.mark.parametrize("official", [True, False])
def test_eval_traces_and_is_layout_and_batch_independent(official):
    model = _filled(_tiny(official_relation=official))
    x = torch.randn(3, 3, 64, 96)
    # traced on one image, run on three; allclose(atol=1e-5) = assert_close(rtol=1e-5, atol=1e-5)
    eager = assert_traceable(model, x, trace_on=x[:1], tol=(1e-5, 1e-5), channels_last_tol=(1e-5, 1e-5))
    with torch.no_grad():
        singles = torch.cat([model(x[i:i + 1]) for i in range(3)])
    assert torch.allclose(singles, eager, atol=1e-5)  # an image's output ignores the rest of its batch
    assert_bf16_close(model, x, min_corr=None, mean_error=(0.1, 0.05))


def test_input_size_is_checked():
    assert_rejects_size(_tiny().eval(), (64, 80), r"DCRNet.*\(1, 3, 64, 80\)")


@pytest.mark.parametrize("official", [True, False])
def test_every_parameter_gets_a_gradient(official):
    model = _tiny(official_relation=official)
    with torch.no_grad():
        model.sa_head.gamma.fill_(0.5)  # at 0 (its initial value) the attention convs get exact-zero gradients
    model.train()
    model(torch.randn(2, 3, 64, 64))  # fill two slots first
    assert_gradients(model, torch.randn(2, 3, 64, 64), 5, reduce=lambda o: o.square().mean())


# ----------------------------------------------------------------------------------------------- 5. bundle
@pytest.mark.slow
def test_bundle_trains_and_evaluates_dcrnet(tmp_path: Path):
    train_and_evaluate_override(tmp_path, "dcrnet.json", DCRNet, dcrnet_encoder_layers=[1, 1, 1, 1],
                                dcrnet_encoder_channels=[8, 16, 32, 64], dcrnet_head_channels=8, dcrnet_bank_size=6)
    weights = torch.load(tmp_path / "models" / "model.pt", weights_only=True)
    assert weights["bank"].abs().sum() > 0  # the bank is saved with the weights
