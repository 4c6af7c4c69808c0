"""Tests of SS-Net's VNet with projection, prediction and selector heads (common/networks/vnet_ssnet.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from common.networks.vnet import VNet
from common.networks.vnet_ssnet import SSNetVNet


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_count_dhc_configuration() -> None:
    # DHC's VNet4SSNet(1, 14, n_filters=32, "batchnorm", has_dropout=True): f = 32, head width F = 2f = 64.
    model = SSNetVNet(1, 14, n_filters=32, has_dropout=True)
    # projection: Linear(32, 64) 32*64 + 64 = 2,112; BatchNorm1d(64) 2*64 = 128; Linear(64, 64) 64*64 + 64 = 4,160
    assert _n_params(model.projection_head) == 2_112 + 128 + 4_160 == 6_400
    # prediction: Linear(64, 64) 4,160 + BatchNorm1d 128 + Linear(64, 64) 4,160
    assert _n_params(model.prediction_head) == 4_160 + 128 + 4_160 == 8_448
    # one selector: Linear(64, 64) 4,160 + BatchNorm1d 128 + Linear(64, 1) 64 + 1 = 65 -> 4,353; 14 class + 14 memory
    assert [_n_params(s) for s in model.class_selectors] == [4_353] * 14
    assert _n_params(model.memory_selectors) == 14 * 4_353 == 60_942
    heads = 6_400 + 8_448 + 28 * 4_353  # = 6,400 + 8,448 + 121,884 = 136,732
    # VNet part: 37,778,126 (tests/test_networks_vnet.py, re-derived there per block)
    assert _n_params(model) == 37_778_126 + heads == 37_914_858


def test_vnet_keys_unchanged_and_vnet_state_loads() -> None:
    torch.manual_seed(0)
    vnet, model = VNet(1, 3, n_filters=4), SSNetVNet(1, 3, n_filters=4)
    head_keys = set(model.state_dict()) - set(vnet.state_dict())
    assert set(vnet.state_dict()) <= set(model.state_dict())
    assert {k.split(".")[0] for k in head_keys} == {"projection_head", "prediction_head", "class_selectors",
                                                     "memory_selectors"}
    result = model.load_state_dict(vnet.state_dict(), strict=False)
    # BatchNorm fills a missing num_batches_tracked itself, so only the other head entries are reported missing
    assert not result.unexpected_keys
    assert set(result.missing_keys) == {k for k in head_keys if not k.endswith("num_batches_tracked")}
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), vnet.eval()(x))


def test_shapes_and_embedding_is_out_conv_input() -> None:
    torch.manual_seed(0)
    model = SSNetVNet(1, 3, n_filters=4, has_dropout=True).eval()
    assert (model.embedding_dim, model.feature_dim) == (4, 8)
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        logits, embedding = model.forward_features(x)
        assert logits.shape == (2, 3, 16, 16, 16) and embedding.shape == (2, 4, 16, 16, 16)
        torch.testing.assert_close(model(x), logits)
        torch.testing.assert_close(model.out_conv(embedding), logits)  # the embedding is what out_conv reads
        voxels = embedding.movedim(1, -1).reshape(-1, 4)  # 2 * 16^3 = 8,192 voxels
        assert model.project(voxels).shape == (8_192, 8)
        assert model.predict(voxels).shape == (8_192, 8)
        assert model.class_selectors[2](model.predict(voxels)).shape == (8_192, 1)
    assert len(model.out_conv._forward_pre_hooks) == 0  # the capture hook is removed again


def test_embedding_after_dropout_in_train_mode() -> None:
    # The embedding is taken after Dropout3d, so whole channels are zero in train mode (p = 0.5, 4 channels x 2).
    torch.manual_seed(3)
    model = SSNetVNet(1, 2, n_filters=4, has_dropout=True, normalization="none").train()
    _, embedding = model.forward_features(torch.randn(2, 1, 16, 16, 16))
    zero_channels = (embedding.flatten(2).abs().amax(dim=2) == 0).sum().item()
    assert zero_channels > 0


def test_forward_traces_in_eval_mode() -> None:
    torch.manual_seed(0)
    model = SSNetVNet(1, 3, n_filters=4, has_dropout=True).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    traced = torch.jit.trace(model, x)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="out_channels"):
        SSNetVNet(1, 0)
    with pytest.raises(ValueError, match="divisible by 16"):
        SSNetVNet(1, 2, n_filters=4).forward_features(torch.zeros(1, 1, 16, 16, 24))
