"""Tests of DST's losses (common/losses/dst.py) and of the DST co-training method
(common/engines/dhc_baselines/dst.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.engines.dhc_baselines.dst import DST
from common.losses.dst import (
    confidence_masked_cross_entropy,
    confidence_pseudo_labels,
    shift_log,
    worst_case_estimation_loss,
)
from common.networks.vnet import VNet
from common.networks.vnet_decoupled import DecoupledVNet, DualDecoupledVNet, WarmStartGradientReverse

LN2 = math.log(2.0)


def _voxels(*logits: list[float]) -> torch.Tensor:
    """One single-voxel patch per list: ``[N, C, 1, 1, 1]``."""
    return torch.tensor(logits).view(len(logits), -1, 1, 1, 1)


# ---------------------------------------------------------------- worst-case estimation loss

def test_shift_log_clamps_at_one() -> None:
    # log(min(x + 1e-6, 1)): x = 0.5 -> ln 0.500001 = -0.6931452; x = 1 -> log 1 = 0 (not ln 1.000001 > 0);
    # x = 0 -> ln 1e-6 = -13.8155106
    got = shift_log(torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64))
    assert torch.allclose(got, torch.tensor([-0.6931452, 0.0, -13.8155106], dtype=torch.float64), atol=1e-7)


def test_worst_case_loss_by_hand() -> None:
    # labelled voxel: main [2, 0, 0] -> target 0; worst [ln 2, 0, 0] -> p_0 = 2 / (2 + 1 + 1) = 0.5,
    #   CE = -ln 0.5 = 0.6931472, times η' = 2 -> 1.3862944
    # unlabelled voxel: main [0, 3, 0] -> target 1; worst [0, ln 2, ln 5] -> p_1 = 2 / (1 + 2 + 5) = 0.25,
    #   -log(1 - 0.25 + 1e-6) = -ln 0.750001 = 0.2876807
    # total 1.3862944 + 0.2876807 = 1.6739751
    main_l, worst_l = _voxels([2.0, 0.0, 0.0]), _voxels([LN2, 0.0, 0.0]).requires_grad_()
    main_u, worst_u = _voxels([0.0, 3.0, 0.0]), _voxels([0.0, LN2, math.log(5.0)]).requires_grad_()
    main_l.requires_grad_()
    loss = worst_case_estimation_loss(main_l, worst_l, main_u, worst_u)
    assert float(loss.detach()) == pytest.approx(1.6739751, abs=1e-6)
    loss.backward()
    assert main_l.grad is None  # the main head only gives the targets
    # d(2 CE)/dz = 2 (p - onehot) = 2 * ([0.5, 0.25, 0.25] - [1, 0, 0]) = [-1, 0.5, 0.5]
    assert torch.allclose(worst_l.grad.flatten(), torch.tensor([-1.0, 0.5, 0.5]), atol=1e-6)
    # η' = 0 leaves the unlabelled term alone: 0.2876807
    assert float(worst_case_estimation_loss(main_l, worst_l, main_u, worst_u, eta_prime=0.0)) == pytest.approx(
        0.2876807, abs=1e-6)


def test_worst_case_labelled_target_is_the_main_arg_max() -> None:
    # same worst logits [ln 2, 0, 0]; main [0, 2, 0] -> target 1: p_1 = 1/4, 2 * ln 4 = 2.7725887;
    # unlabelled as above 0.2876807 -> 3.0602694
    loss = worst_case_estimation_loss(_voxels([0.0, 2.0, 0.0]), _voxels([LN2, 0.0, 0.0]), _voxels([0.0, 3.0, 0.0]),
                                      _voxels([0.0, LN2, math.log(5.0)]))
    assert float(loss) == pytest.approx(3.0602694, abs=1e-6)


def test_worst_case_unlabelled_term_extremes() -> None:
    main = _voxels([0.0, 1.0])  # target 1 on both parts
    # p_worst(target) -> 1: 1 - p = 0 in float32, -log(0 + 1e-6) = 13.8155106 (finite)
    confident = worst_case_estimation_loss(main, _voxels([-30.0, 30.0]), main, _voxels([-30.0, 30.0]), eta_prime=0.0)
    assert float(confident) == pytest.approx(13.8155106, rel=1e-5)
    # p_worst(target) -> 0: 1 - p + 1e-6 > 1 is clamped to 1, so exactly 0 (never negative)
    assert float(worst_case_estimation_loss(main, _voxels([-30.0, 30.0]), main, _voxels([30.0, -30.0]),
                                            eta_prime=0.0)) == 0.0


def test_worst_case_bad_inputs() -> None:
    two = _voxels([0.0, 1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="one shape"):
        worst_case_estimation_loss(two, two[:1], two, two)
    with pytest.raises(ValueError, match="empty"):
        worst_case_estimation_loss(two, two, two[:0], two[:0])
    with pytest.raises(ValueError, match="eta_prime"):
        worst_case_estimation_loss(two, two, two, two, eta_prime=-1.0)
    big = torch.zeros(1, 2, 2, 1, 1)
    with pytest.raises(ValueError, match="differ beyond the batch"):
        worst_case_estimation_loss(two, two, big, big)


# ---------------------------------------------------------------- confidence-masked pseudo-label CE

def test_confidence_masked_cross_entropy_by_hand() -> None:
    # teacher voxel 0 [0, 4]: p_1 = 1 / (1 + e^-4) = 0.9820 > 0.95 -> label 1, kept;
    # teacher voxel 1 [0, 1]: p_1 = 0.7311 <= 0.95 -> masked
    teacher = torch.tensor([[[0.0, 0.0], [4.0, 1.0]]])  # [N=1, C=2, 2 voxels]
    student = torch.tensor([[[0.0, 5.0], [0.0, 0.0]]], requires_grad=True)
    loss, labels, mask = confidence_masked_cross_entropy(student, teacher)
    assert labels.tolist() == [[1, 1]] and mask.tolist() == [[True, False]]
    # student voxel 0 [0, 0] on label 1: CE = ln 2; divided by all 2 voxels: 0.3465736
    assert float(loss) == pytest.approx(LN2 / 2, abs=1e-6)
    loss.backward()
    # d/dz of CE / 2 on voxel 0 = ([0.5, 0.5] - [0, 1]) / 2 = [0.25, -0.25]; voxel 1 masked -> 0
    assert torch.allclose(student.grad, torch.tensor([[[0.25, 0.0], [-0.25, 0.0]]]))
    # divided by the kept voxels only: ln 2 = 0.6931472
    assert float(confidence_masked_cross_entropy(student, teacher, normalise="mask")[0]) == pytest.approx(LN2)


def test_confidence_threshold_is_strict() -> None:
    # softmax([0, 0]) = [0.5, 0.5] exactly: not > 0.5; arg-max of the tie is class 0
    labels, mask = confidence_pseudo_labels(torch.zeros(1, 2, 1), threshold=0.5)
    assert labels.tolist() == [[0]] and mask.tolist() == [[False]]
    assert confidence_pseudo_labels(torch.zeros(1, 2, 1), threshold=0.49)[1].tolist() == [[True]]


def test_confidence_bad_inputs() -> None:
    with pytest.raises(ValueError, match="threshold"):
        confidence_pseudo_labels(torch.zeros(1, 2, 1), threshold=1.0)
    with pytest.raises(ValueError, match="logits must be"):
        confidence_pseudo_labels(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="one shape"):
        confidence_masked_cross_entropy(torch.zeros(1, 2, 2), torch.zeros(1, 2, 3))


# ---------------------------------------------------------------- the DST method: wiring by hand

class _FixedHeads(nn.Module):
    """A "branch" whose three heads are fixed single-voxel parameters ``[2, 2, 1, 1, 1]`` (1 labelled, 1 unlabelled
    patch), with a real gradient-reversal counter."""

    def __init__(self, main: list[list[float]], pseudo: list[list[float]], worst: list[list[float]]) -> None:
        super().__init__()
        self.main, self.pseudo, self.worst = (nn.Parameter(_voxels(*v)) for v in (main, pseudo, worst))
        self.grl = WarmStartGradientReverse()

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.main, self.pseudo, self.worst


def _fixed_pair() -> tuple[_FixedHeads, _FixedHeads]:
    zeros = [[0.0, 0.0], [0.0, 0.0]]
    branch_a = _FixedHeads(zeros, zeros, zeros)
    branch_b = _FixedHeads([[0.0, 1.0], [0.0, 0.0]], [[0.0, 5.0], [5.0, 0.0]], zeros)
    return branch_a, branch_b


# Labelled patch: y = 1. τ = 0.7, λ = 0.1.
# sup (CE + batch Dice without background, smooth 1):
#   A main [0, 0]: CE = ln 2 = 0.6931472; p_1 = 0.5, D_1 = (2 * 0.5 + 1) / (0.5 + 1 + 1) = 0.8 -> -0.8 => -0.1068528
#   B main [0, 1]: CE = ln(1 + e^-1) = 0.3132617; p_1 = 0.7310586, D_1 = 2.4621172 / 2.7310586 = 0.9015248
#   => -0.5882632;  sup = -0.6951160
# worst (η' = 2, worst logits all 0 -> p = 0.5):
#   A: targets argmax [0, 0] = 0 (tie) on both patches: 2 ln 2 + (-ln 0.500001) = 1.3862944 + 0.6931452 = 2.0794396
#   B: targets 1 (labelled, main [0, 1]) and 0 (unlabelled, main [0, 0]): the same 2.0794396;  worst = 4.1588792
# teachers: B pseudo [0, 5] / [5, 0]: p = 0.9933 > 0.7 on both patches, labels 1, 0; B main [0, 1]: 0.7311 > 0.7
#   on the labelled patch (label 1), [0, 0] (0.5) masked; A's heads (all 0, p = 0.5) never teach.
SUP, WORST = -0.6951160, 4.1588792


def test_dst_pseudo_to_main_by_hand() -> None:
    branch_a, branch_b = _fixed_pair()
    branch_a.grl.num_steps.fill_(500)
    method = DST(2, threshold=0.7)
    out = method(branch_a, branch_b, torch.zeros(2, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1), 0.1, 0)
    # A's main [0, 0] learns B's pseudo labels [1, 0], both kept: (ln 2 + ln 2) / 2 = ln 2 = 0.6931472; B learns nothing
    assert float(out["loss_cps"]) == pytest.approx(LN2, abs=1e-6)
    assert float(out["loss_sup"]) == pytest.approx(SUP, abs=1e-6)
    assert float(out["loss_worst"]) == pytest.approx(WORST, abs=1e-6)
    assert float(out["loss_unsup"]) == pytest.approx(LN2 + WORST, abs=1e-6)
    # loss = sup + λ (cps + worst) = -0.6951160 + 0.1 * 4.8520264 = -0.2099134
    assert float(out["loss"]) == pytest.approx(-0.2099134, abs=1e-6)
    assert out["pseudo_b"].flatten().tolist() == [1, 0] and out["mask_b"].flatten().tolist() == [True, True]
    assert out["mask_a"].flatten().tolist() == [False, False]
    # coefficient read before the step: λ_GRL(500) = 0.0462117; one step per branch and forward
    assert float(out["grl_coefficient"]) == pytest.approx(0.0462117, abs=1e-7)
    assert (int(branch_a.grl.num_steps), int(branch_b.grl.num_steps)) == (501, 1)
    out["loss"].backward()
    # the original: no loss is differentiable in the pseudo heads
    assert branch_a.pseudo.grad is None and branch_b.pseudo.grad is None


def test_dst_main_to_pseudo_by_hand() -> None:
    branch_a, branch_b = _fixed_pair()
    method = DST(2, threshold=0.7, cross_supervision="main_to_pseudo")
    out = method(branch_a, branch_b, torch.zeros(2, 1, 1, 1, 1), torch.ones(1, 1, 1, 1, 1), 0.1, 0)
    # A's pseudo [0, 0] learns B's main labels: labelled patch kept (label 1, CE ln 2), unlabelled masked:
    # ln 2 / 2 voxels = 0.3465736; B's pseudo learns from A's main (p = 0.5, all masked): 0
    assert float(out["loss_cps"]) == pytest.approx(LN2 / 2, abs=1e-6)
    assert float(out["loss_worst"]) == pytest.approx(WORST, abs=1e-6)
    assert out["mask_b"].flatten().tolist() == [True, False]
    out["loss"].backward()
    # dL/dz of λ CE / 2 on A's pseudo, labelled patch: 0.1 * ([0.5, 0.5] - [0, 1]) / 2 = [0.025, -0.025]; masked 0
    assert torch.allclose(branch_a.pseudo.grad.flatten(), torch.tensor([0.025, -0.025, 0.0, 0.0]), atol=1e-7)
    assert torch.equal(branch_b.pseudo.grad, torch.zeros_like(branch_b.pseudo))


# ---------------------------------------------------------------- the DST method on tiny real networks

def _batch(seed: int = 0) -> tuple[DualDecoupledVNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    network = DualDecoupledVNet(1, 3, n_filters=2, has_dropout=True).train()
    return network, torch.randn(4, 1, 16, 16, 16), torch.randint(0, 3, (2, 1, 16, 16, 16))


def _grad_sum(module: nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_dst_forward_finite_with_gradient_in_all_decoders() -> None:
    network, image, label = _batch()
    before = {k: v.clone() for k, v in network.state_dict().items() if k.endswith("grl.num_steps")}
    assert before == {"branch_a.grl.num_steps": torch.tensor(0), "branch_b.grl.num_steps": torch.tensor(0)}
    method = DST(3, threshold=0.0, cross_supervision="main_to_pseudo")  # τ = 0 keeps every voxel
    out = method(network.branch_a, network.branch_b, image, label, 0.1, 0)
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (4, 3, 16, 16, 16)
    out["loss"].backward()
    for branch in (network.branch_a, network.branch_b):
        for part in (branch.block_one, branch.block_nine, branch.out_conv, branch.decoder_pseudo,
                     branch.decoder_worst):
            assert _grad_sum(part) > 0
    state = network.state_dict()
    assert int(state["branch_a.grl.num_steps"]) == 1 and int(state["branch_b.grl.num_steps"]) == 1


def test_dst_original_leaves_pseudo_decoders_untrained() -> None:
    network, image, label = _batch(1)
    out = DST(3, threshold=0.0)(network.branch_a, network.branch_b, image, label, 0.1, 0)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    for branch in (network.branch_a, network.branch_b):
        assert all(p.grad is None for p in branch.decoder_pseudo.parameters())
        assert _grad_sum(branch.out_conv) > 0 and _grad_sum(branch.decoder_worst) > 0


def test_dst_bad_inputs() -> None:
    with pytest.raises(ValueError, match="num_classes"):
        DST(1)
    for kwargs, word in (({"threshold": 1.0}, "threshold"), ({"eta_prime": -1.0}, "eta_prime"),
                         ({"cross_supervision": "both"}, "cross_supervision"), ({"normalise": "sum"}, "normalise")):
        with pytest.raises(ValueError, match=word):
            DST(3, **kwargs)
    image, label = torch.zeros(2, 1, 16, 16, 16), torch.zeros(1, 1, 16, 16, 16)
    with pytest.raises(ValueError, match="DecoupledVNet-like"):
        DST(3)(VNet(1, 3, n_filters=2), VNet(1, 3, n_filters=2), image, label, 0.1, 0)
    wide = DecoupledVNet(1, 4, n_filters=2)
    with pytest.raises(ValueError, match="num_classes=3"):
        DST(3)(wide, wide, image, label, 0.1, 0)
    with pytest.raises(ValueError, match="labelled and unlabelled"):
        DST(4)(wide, wide, image, torch.zeros(2, 1, 16, 16, 16), 0.1, 0)
