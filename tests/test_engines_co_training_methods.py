"""common.engines.co_training_methods: every DHC method by name, its networks and the run context it receives."""

from __future__ import annotations

import pytest
import torch

from common.engines.co_training_methods import (
    CONTEXT,
    METHODS,
    NEEDS_LABELLED_COUNTS,
    MethodEntry,
    build_method,
    build_network,
    has_branch_b,
)
from common.networks.branches import Branches
from common.networks.vnet import DualVNet

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4
COUNTS = torch.tensor([5000.0, 2000.0, 500.0, 50.0])
SINGLE_NETWORK = {"urpc", "ssnet"}
STUDENT_ONLY = {"uamt", "acisis", "urpc", "ssnet"}  # predict with branch A alone


def test_the_paper_table_is_complete():
    # DHC, CPS, UA-MT and the nine baselines of specs/dhc.md §9
    assert sorted(METHODS) == sorted(["dhc", "cps", "uamt", "urpc", "ssnet", "dst", "depl", "adsh", "crest", "simis",
                                      "acisis", "cld"])
    assert NEEDS_LABELLED_COUNTS == ("dhc", "simis", "crest", "cld")


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_builds_its_networks_and_predicts_logits(name):
    torch.manual_seed(0)
    net = build_network(name, 1, C, 4, has_dropout=False).eval()
    assert isinstance(net, Branches)
    assert hasattr(net, "branch_b") == has_branch_b(name) == (name not in SINGLE_NETWORK)
    assert net.branches == ("A" if name in STUDENT_ONLY else "AB")
    with torch.no_grad():
        logits = net(torch.randn(1, 1, 32, 32, 32))
    assert logits.shape == (1, C, 32, 32, 32) and torch.isfinite(logits).all()
    method = build_method(name, C, COUNTS, max_epochs=10, patch_size=(32, 32, 32), n_unlabelled=16, epoch_length=8,
                          n_filters=4)
    assert method.uses_b == has_branch_b(name)


def test_cps_initialises_branch_b_with_xavier_and_dhc_with_kaiming():
    # kaiming_normal_ (fan_in, gain sqrt 2) vs xavier_normal_ (gain 1, fan_in + fan_out): the first VNet conv has
    # fan_in = 1 * 27 = 27 and fan_out = 4 * 27 = 108 -> std sqrt(2 / 27) = 0.272 vs sqrt(2 / 135) = 0.122
    for name, std in (("dhc", (2 / 27) ** 0.5), ("cps", (2 / 135) ** 0.5)):
        torch.manual_seed(0)
        net = build_network(name, 1, C, 4)
        assert isinstance(net, DualVNet)
        weight = net.branch_b.block_one.conv[0].weight
        assert weight.std().item() == pytest.approx(std, rel=0.25)


def test_widths_follow_n_filters():
    # URPC's U-Net starts at f / 2: f = 32 gives the original 16..256 widths, 5,887,432 parameters
    # (tests/test_networks_unet_ds.py derives the figure module by module)
    assert sum(p.numel() for p in build_network("urpc", 1, 14, 32).parameters()) == 5_887_432
    # SS-Net's projected features are 2 f wide: f = 4 -> 8
    assert build_method("ssnet", C, n_filters=4).memory.feature_dim == 8


def test_run_context_becomes_each_constructor_argument():
    # Adsh: a threshold estimate every max(#U // 4, 1) iterations: 16 // 4 = 4, 3 // 4 = 0 -> 1
    assert build_method("adsh", C, n_unlabelled=16).thresholds_a.period == 4
    assert build_method("adsh", C, n_unlabelled=3).thresholds_b.period == 1
    # Basak et al.: sampling rates refreshed once per epoch
    assert build_method("acisis", C, epoch_length=8).confidence.refresh_iters == 8
    # CLD: label-quantity weights (max N / N_c)^(1/3): 5000 / 50 = 100 -> 100^(1/3) = 4.642
    assert build_method("cld", C, COUNTS).class_weight[3].item() == pytest.approx(100 ** (1 / 3), rel=1e-5)
    # UA-MT's threshold ramp spans the run
    assert build_method("uamt", C, max_epochs=7).max_epochs == 7


def test_bad_names_and_missing_context_are_named():
    with pytest.raises(ValueError, match=r"unknown co-training method 'mt'; choose one of \['acisis'"):
        build_network("mt")
    with pytest.raises(ValueError, match="n_unlabelled is required"):
        build_method("adsh", C)
    with pytest.raises(ValueError, match="epoch_length is required"):
        build_method("acisis", C)
    with pytest.raises(ValueError, match="patch_size is required"):
        build_method("depl", C)
    with pytest.raises(ValueError, match="unknown context"):
        MethodEntry(METHODS["cps"].method, METHODS["cps"].network, ("batch_size",))
    assert set(CONTEXT) >= {c for entry in METHODS.values() for c in entry.context}
