"""Adsh adaptive thresholds, the logit-masking CE and the Adsh method, against values worked out by hand
(specs/dhc.md §9 "adsh")."""

import io
import math

import pytest
import torch

from common.engines.dhc_baselines.adsh import Adsh
from common.losses.adaptive_thresholds import AdaptiveThresholds, adsh_period, logit_masked_cross_entropy
from common.networks.vnet import VNet

C = 3
BINS = 10  # bin b = floor(10 p): no value below sits on a bin edge

# 8 voxels (two patches of 1x1x4), rows = (p0, p1, p2), arg-max in the comment
VOXELS = [
    [0.03, 0.95, 0.02],  # 1
    [0.04, 0.93, 0.03],  # 1
    [0.12, 0.85, 0.03],  # 1
    [0.17, 0.75, 0.08],  # 1
    [0.78, 0.15, 0.07],  # 0
    [0.63, 0.25, 0.12],  # 0
    [0.06, 0.32, 0.62],  # 2
    [0.35, 0.07, 0.58],  # 2
]


def probs_of(rows: list[list[float]]) -> torch.Tensor:
    """Rows of 4 voxels per patch -> probabilities [N, C, 1, 1, 4]."""
    p = torch.tensor(rows, dtype=torch.float32).reshape(-1, 4, C)
    return p.permute(0, 2, 1).reshape(-1, C, 1, 1, 4)


def test_thresholds_by_hand_majority_is_the_most_predicted_class():
    thr = AdaptiveThresholds(C, period=1, major_threshold=0.9, bins=BINS)
    # N = [2, 4, 2] -> k* = 1 (not class 0); #(p1 > .9) = 2 (.95, .93) -> rho = 2/4 = .5
    # ranks r = floor(.5 [2, 4, 2]) = [1, 2, 1] (0-based), over the class-c probability of all 8 voxels:
    #   p0 sorted .78 .63 .35 .17 .12 .06 .04 .03 -> rank 1 = .63 -> bin 6 -> tau0 = .6
    #   p1 sorted .95 .93 .85 .75 .32 .25 .15 .07 -> rank 2 = .85 -> bin 8 -> tau1 = .8
    #   p2 sorted .62 .58 .12 .08 .07 .03 .03 .02 -> rank 1 = .58 -> bin 5 -> tau2 = .5
    tau = thr.update(probs_of(VOXELS))
    assert torch.allclose(tau, torch.tensor([0.6, 0.8, 0.5]))
    # mask [p > tau]: channel 0 keeps v4 (.78), v5 (.63); channel 1 v0-v2; channel 2 v6 (.62), v7 (.58)
    mask = thr.mask(probs_of(VOXELS)).permute(0, 2, 3, 4, 1).reshape(8, C)
    assert mask[:, 0].tolist() == [0, 0, 0, 0, 1, 1, 0, 0]
    assert mask[:, 1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert mask[:, 2].tolist() == [0, 0, 0, 0, 0, 0, 1, 1]


def test_ranks_run_over_all_voxels_not_only_the_predicted_ones():
    thr = AdaptiveThresholds(C, period=1, major_threshold=0.7, bins=BINS)
    # #(p1 > .7) = 4 = N_1 -> rho = 1 -> r = [2, 4, 2]
    #   p0 rank 2 = .35, a voxel predicted as class 2 (the paper would rank class 0's two predictions only) -> .3
    #   p1 rank 4 = .32 -> .3;  p2 rank 2 = .12 -> .1
    assert torch.allclose(thr.update(probs_of(VOXELS)), torch.tensor([0.3, 0.3, 0.1]))


def test_rank_is_clamped_to_the_last_voxel():
    thr = AdaptiveThresholds(C, period=1, major_threshold=0.5, bins=BINS)
    # every voxel predicted 0 with p0 > .5 -> rho = 1, r0 = floor(1 * 4) = 4 -> clamped to V - 1 = 3: the smallest
    # p0, .55 -> bin 5 -> .5;  r1 = r2 = floor(1 * 0) = 0: the largest p1 = .28 -> .2, the largest p2 = .17 -> .1
    rows = [[0.95, 0.03, 0.02], [0.83, 0.13, 0.04], [0.65, 0.26, 0.09], [0.55, 0.28, 0.17]]
    assert torch.allclose(thr.update(probs_of(rows)), torch.tensor([0.5, 0.2, 0.1]))


def test_estimate_only_every_period_iterations_and_window_resets():
    thr = AdaptiveThresholds(C, period=3, major_threshold=0.9, bins=BINS)
    first, second = probs_of(VOXELS[:4]), probs_of(VOXELS[4:])
    # iterations 1 and 2: recorded, thresholds still 0 (every channel kept)
    assert torch.equal(thr.update(first), torch.zeros(C))
    assert torch.equal(thr.update(second), torch.zeros(C))
    assert int(thr.step) == 2 and int(thr.predicted_counts.sum()) == 8 and int(thr.histogram.sum()) == 8 * C
    assert torch.all(thr.mask(first) == 1)
    # iteration 3 (the same 4 voxels as iteration 1 again): window = 12 voxels, N = [2, 8, 2], #(p1 > .9) = 4
    # -> rho = .5 -> r = [1, 4, 1];  p0 .78 .63 ... -> .6;  p1 .95 .95 .93 .93 .85 ... rank 4 = .85 -> .8;
    # p2 .62 .58 ... -> .5
    assert torch.allclose(thr.update(first), torch.tensor([0.6, 0.8, 0.5]))
    assert int(thr.step) == 3 and int(thr.histogram.sum()) == 0 and int(thr.predicted_counts.sum()) == 0
    assert int(thr.confident_counts.sum()) == 0
    # iteration 4: a new window, thresholds kept until iteration 6
    assert torch.allclose(thr.update(second), torch.tensor([0.6, 0.8, 0.5]))


def test_state_dict_round_trip_resumes_the_window():
    thr = AdaptiveThresholds(C, period=2, bins=BINS)
    thr.update(probs_of(VOXELS))
    assert set(thr.state_dict()) == {"thresholds", "predicted_counts", "confident_counts", "histogram", "step"}
    buffer = io.BytesIO()
    torch.save(thr.state_dict(), buffer)
    buffer.seek(0)
    other = AdaptiveThresholds(C, period=2, bins=BINS)
    other.load_state_dict(torch.load(buffer))
    assert all(torch.equal(a, b) for a, b in zip(other.state_dict().values(), thr.state_dict().values()))
    assert torch.equal(other.update(probs_of(VOXELS)), thr.update(probs_of(VOXELS)))


def test_logit_masked_cross_entropy_by_hand():
    # v0: z = [2, 1, 0], y = 0, m = [1, 0, 1] -> [2, 0, 0]: log(e^2 + 2) - 2 = log 9.389056 - 2 = .239534
    # v1: z = [.5, 1.5, -1], y = 1, m = 0 -> [0, 0, 0]: ln 3 = 1.098612 (constant, no gradient)
    # v2: z = [1, 2, 0], y = 1, m = [1, 0, 0] -> [1, 0, 0]: log(e + 2) - 0 = log 4.718282 = 1.551444
    z = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.5, -1.0], [1.0, 2.0, 0.0]]).T.reshape(1, C, 1, 1, 3)
    z.requires_grad_(True)
    y = torch.tensor([0, 1, 1]).reshape(1, 1, 1, 3)
    m = torch.tensor([[1.0, 0, 1], [0, 0, 0], [1, 0, 0]]).T.reshape(1, C, 1, 1, 3)
    loss = logit_masked_cross_entropy(z, y, m)
    expected = (math.log(math.e ** 2 + 2) - 2 + math.log(3) + math.log(math.e + 2)) / 3
    assert math.isclose(float(loss.detach()), expected, rel_tol=1e-6)  # (.239534 + 1.098612 + 1.551444) / 3 = .963197
    loss.backward()
    grad = z.grad.reshape(C, 3).T
    # v0: d/dz0 = (e^2 / 9.389056 - 1) / 3 = -.071005, d/dz1 = 0 (masked), d/dz2 = (1 / 9.389056) / 3 = .035502
    assert torch.allclose(grad[0], torch.tensor([(math.e ** 2 / (math.e ** 2 + 2) - 1) / 3, 0.0,
                                                 1 / (math.e ** 2 + 2) / 3]), atol=1e-6)
    assert torch.all(grad[1] == 0)
    # v2: the masked pseudo-label channel gets nothing, the kept channel 0 is pushed down: e / 4.718282 / 3 = .192046
    assert math.isclose(float(grad[2, 0]), math.e / (math.e + 2) / 3, rel_tol=1e-5) and float(grad[2, 1]) == 0


def test_adsh_period():
    assert [adsh_period(n) for n in (1, 3, 4, 12, 16, 18, 206)] == [1, 1, 1, 3, 4, 4, 51]
    with pytest.raises(ValueError):
        adsh_period(0)


@pytest.mark.parametrize("kwargs", [dict(num_classes=1, period=1), dict(num_classes=C, period=0),
                                    dict(num_classes=C, period=1, major_threshold=1.0),
                                    dict(num_classes=C, period=1, major_threshold=0.0),
                                    dict(num_classes=C, period=1, bins=1), dict(num_classes=C, period=1.5)])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError):
        AdaptiveThresholds(**kwargs)


def test_bad_inputs_are_named():
    thr = AdaptiveThresholds(C, period=2, bins=BINS)
    with pytest.raises(ValueError, match="probabilities must be"):
        thr.update(torch.rand(1, C + 1, 1, 1, 4))
    with pytest.raises(ValueError, match="window is empty"):
        thr.estimate()
    z = torch.randn(1, C, 1, 1, 3)
    with pytest.raises(ValueError, match="channel_mask"):
        logit_masked_cross_entropy(z, torch.zeros(1, 1, 1, 3), torch.ones(1, C, 1, 1, 2))
    with pytest.raises(ValueError, match="target values must lie"):
        logit_masked_cross_entropy(z, torch.full((1, 1, 1, 3), C), torch.ones_like(z))
    with pytest.raises(ValueError, match="does not match"):
        logit_masked_cross_entropy(z, torch.zeros(2, 1, 1, 3), torch.ones_like(z))


def test_adsh_cps_uses_the_other_branch_labels_and_masks():
    torch.manual_seed(0)
    z_a, z_b = torch.randn(2, C, 1, 1, 4) * 3, torch.randn(2, C, 1, 1, 4) * 3
    method = Adsh(C, period=1, bins=BINS)
    label = torch.zeros(1, 1, 1, 1, 4)
    out = method(lambda _: z_a, lambda _: z_b, torch.zeros(2, 1, 1, 1, 4), label, 0.1, 0)
    # thresholds were estimated from the unlabelled patch (period 1) before the masks were made
    reference_a = AdaptiveThresholds(C, period=1, bins=BINS)
    reference_b = AdaptiveThresholds(C, period=1, bins=BINS)
    p_a, p_b = z_a.softmax(1), z_b.softmax(1)
    reference_a.update(p_a[1:])
    reference_b.update(p_b[1:])
    assert torch.equal(out["thresholds_a"], reference_a.thresholds)
    assert torch.equal(out["thresholds_b"], reference_b.thresholds)
    expected = (logit_masked_cross_entropy(z_a, z_b.argmax(1), reference_b.mask(p_b))
                + logit_masked_cross_entropy(z_b, z_a.argmax(1), reference_a.mask(p_a)))
    assert torch.allclose(out["loss_unsup"], expected)
    assert torch.allclose(out["loss"], out["loss_sup"] + 0.1 * out["loss_unsup"])


def test_adsh_forward_on_tiny_vnets_trains_both_branches_and_updates_buffers():
    torch.manual_seed(0)
    net_a, net_b = VNet(1, C, n_filters=2, has_dropout=True), VNet(1, C, n_filters=2, has_dropout=True)
    method = Adsh(C, period=2)
    image, label = torch.randn(2, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    keys = {k for k in method.state_dict()}
    assert {"thresholds_a.thresholds", "thresholds_b.histogram", "thresholds_a.step"} <= keys
    out = method(net_a, net_b, image, label, 0.1, 0)
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (2, C, 16, 16, 16)
    out["loss"].backward()
    for net in (net_a, net_b):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert int(method.thresholds_a.step) == 1 and torch.equal(method.thresholds_a.thresholds, torch.zeros(C))
    with torch.no_grad():
        method(net_a, net_b, image, label, 0.1, 0)
    assert int(method.thresholds_b.step) == 2
    assert bool((method.thresholds_a.thresholds > 0).any()) and bool((method.thresholds_b.thresholds > 0).any())
