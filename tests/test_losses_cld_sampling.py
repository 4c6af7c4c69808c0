"""CLD confidence bank, sampling rates, random voxel mask, sampled CE and the CLD method, against values worked out
by hand (specs/dhc.md §9 "cld")."""

import io
import math

import pytest
import torch

from common.engines.dhc_baselines.cld import CLD
from common.losses.cld_sampling import (ConfidenceBank, label_quantity_weights, sampled_cross_entropy, sampling_mask,
                                        sampling_rates)
from common.losses.weighted_ce_dice import WeightedCEDiceLoss
from common.networks.vnet import VNet

C = 3


def patch(rows: list[list[float]]) -> torch.Tensor:
    """Per-voxel class rows -> [1, C, 1, 1, V]."""
    return torch.tensor(rows, dtype=torch.float32).T.reshape(1, C, 1, 1, len(rows))


def labels(values: list[int]) -> torch.Tensor:
    return torch.tensor(values).reshape(1, 1, 1, 1, len(values))


def test_label_quantity_weights_by_hand():
    # N = [1000, 125, 8]: max N / N_c = [1, 8, 125] -> cube roots [1, 2, 5]
    assert torch.allclose(label_quantity_weights([1000, 125, 8]), torch.tensor([1.0, 2.0, 5.0]))
    # power 1/2: [1000, 250, 10] -> ratios [1, 4, 100] -> [1, 2, 10]
    assert torch.allclose(label_quantity_weights([1000, 250, 10], power=0.5), torch.tensor([1.0, 2.0, 10.0]))
    # an absent class is as rare as the rarest present one: [1000, 8, 0] -> [1, 5, 5] (DHC's code: infinite)
    assert torch.allclose(label_quantity_weights([1000, 8, 0]), torch.tensor([1.0, 5.0, 5.0]))
    with pytest.raises(ValueError, match="at least one class present"):
        label_quantity_weights([0, 0, 0])
    with pytest.raises(ValueError):
        label_quantity_weights([10])
    with pytest.raises(ValueError):
        label_quantity_weights([10, 5], power=-1.0)


def test_confidence_bank_refresh_every_period_then_ema():
    bank = ConfidenceBank(C, momentum=0.9, period=2)
    # iteration 1: GT [0, 0, 1, 2], p of the GT class .8, .6, .5, .2 -> sums [1.4, .5, .2], counts [2, 1, 1]
    it1 = patch([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.3, 0.5, 0.2], [0.5, 0.3, 0.2]]), labels([0, 0, 1, 2])
    assert torch.equal(bank.update(*it1), torch.zeros(C))  # no refresh yet: the bank still starts at 0
    assert torch.allclose(bank.conf_sum, torch.tensor([1.4, 0.5, 0.2], dtype=torch.float64))
    # iteration 2: GT [0, 1, 1, 1], p .7, .3, .4, .2 -> window sums [2.1, 1.4, .2], counts [3, 4, 1]
    # -> new = [.7, .35, .2]; first refresh: the bank takes it as is
    it2 = patch([[0.7, 0.2, 0.1], [0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.6, 0.2, 0.2]]), labels([0, 1, 1, 1])
    assert torch.allclose(bank.update(*it2), torch.tensor([0.7, 0.35, 0.2]))
    assert torch.all(bank.conf_sum == 0) and torch.all(bank.conf_count == 0)
    # iterations 3 and 4: GT [0, 0, 1, 1] with p .9, .9, .6, .5 twice -> new = [3.6 / 4, 2.2 / 4, 0 / 0] =
    # [.9, .55, 0] (class 2 absent: 0, as the original)
    it3 = patch([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.2, 0.6, 0.2], [0.3, 0.5, 0.2]]), labels([0, 0, 1, 1])
    assert torch.allclose(bank.update(*it3), torch.tensor([0.7, 0.35, 0.2]))  # not before the 4th
    # EMA: .9 [.7, .35, .2] + .1 [.9, .55, 0] = [.63 + .09, .315 + .055, .18] = [.72, .37, .18]
    assert torch.allclose(bank.update(*it3), torch.tensor([0.72, 0.37, 0.18]))
    assert int(bank.step) == 4


def test_confidence_bank_state_dict():
    bank = ConfidenceBank(C, period=3)
    bank.update(patch([[0.8, 0.1, 0.1]]), labels([0]))
    assert set(bank.state_dict()) == {"confidence", "conf_sum", "conf_count", "step"}
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    other = ConfidenceBank(C, period=3)
    other.load_state_dict(torch.load(buffer))
    assert int(other.step) == 1 and torch.equal(other.conf_sum, bank.conf_sum)


def test_sampling_rates_by_hand():
    # conf [.96, .84, .36] -> 1 - conf = [.04, .16, .64] -> / .64 = [.0625, .25, 1] -> sqrt = [.25, .5, 1]
    assert torch.allclose(sampling_rates(torch.tensor([0.96, 0.84, 0.36])), torch.tensor([0.25, 0.5, 1.0]))
    assert torch.allclose(sampling_rates(torch.tensor([0.96, 0.84, 0.36]), gamma=1.0),
                          torch.tensor([0.0625, 0.25, 1.0]))
    # the bank of the EMA test: 1 - [.72, .37, .18] = [.28, .63, .82] -> / .82 -> sqrt = [.584349, .876523, 1]
    assert torch.allclose(sampling_rates(torch.tensor([0.72, 0.37, 0.18])),
                          torch.tensor([math.sqrt(0.28 / 0.82), math.sqrt(0.63 / 0.82), 1.0]), atol=1e-6)
    # a bank at 0 (before the first refresh): every rate 1
    assert torch.allclose(sampling_rates(torch.zeros(C)), torch.ones(C))


def test_sampling_mask_with_given_draws():
    # arg-max [0, 0, 1, 1, 2, 2], rates [.25, .5, 1] -> keep iff u > 1 - s = [.75, .5, 0] of the predicted class
    probs = patch([[0.9, 0.05, 0.05], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.1, 0.1, 0.8],
                   [0.3, 0.3, 0.4]])
    u = torch.tensor([0.8, 0.7, 0.6, 0.4, 0.01, 0.0]).reshape(1, 1, 1, 6)
    keep = sampling_mask(probs, torch.tensor([0.25, 0.5, 1.0]), uniform=u)
    # .8 > .75 T; .7 > .75 F; .6 > .5 T; .4 > .5 F; .01 > 0 T; 0 > 0 F (strict, as the original)
    assert keep.dtype == torch.bool and keep.flatten().tolist() == [True, False, True, False, True, False]


def test_sampling_mask_keep_rate_per_predicted_class():
    # 40,000 voxels predicted as each class; keep ~ Binomial(n, s_c) / n with sd sqrt(s (1 - s) / n) <= .5 / 200 =
    # .0025, so a 5-sd tolerance .0125 fails with probability < 1e-6 for any seed (seeded here: deterministic)
    n, rates = 40000, torch.tensor([0.2, 0.5, 0.8])
    predicted = torch.arange(C).repeat_interleave(n)
    probs = torch.nn.functional.one_hot(predicted, C).T.float().reshape(1, C, 1, 1, C * n)
    keep = sampling_mask(probs, rates, generator=torch.Generator().manual_seed(0)).flatten()
    for c in range(C):
        assert abs(float(keep[predicted == c].float().mean()) - float(rates[c])) < 0.0125


def test_sampled_cross_entropy_by_hand():
    # logits = log p: v0 p=[.5,.25,.25] y=0 -> ln 2; v1 p=[.2,.6,.2] y=1 -> -ln .6; v2 p=[.1,.1,.8] y=2 -> -ln .8;
    # v3 p=[.25,.25,.5] y=2 -> ln 2;  keep [T, F, T, T], w = [1, 2, 5]
    z = patch([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]]).log().requires_grad_(True)
    y = torch.tensor([0, 1, 2, 2]).reshape(1, 1, 1, 4)
    keep = torch.tensor([True, False, True, True]).reshape(1, 1, 1, 4)
    loss = sampled_cross_entropy(z, y, keep, torch.tensor([1.0, 2.0, 5.0]))
    # (1 ln 2 + 5 (-ln .8) + 5 ln 2) / 4 voxels = (4.158883 + 1.115718) / 4 = 1.318650 (not divided by the weights)
    assert math.isclose(float(loss.detach()), (6 * math.log(2) - 5 * math.log(0.8)) / 4, rel_tol=1e-6)
    loss.backward()
    assert torch.all(z.grad[..., 1] == 0) and z.grad[..., 0].abs().sum() > 0  # the dropped voxel: no gradient
    # w = 1, everything kept: the plain mean CE (ln 2 - ln .6 - ln .8 + ln 2) / 4 = .529566
    plain = sampled_cross_entropy(z, y.unsqueeze(1), torch.ones_like(keep), torch.ones(C))
    assert math.isclose(float(plain.detach()), (2 * math.log(2) - math.log(0.6) - math.log(0.8)) / 4, rel_tol=1e-6)


def test_bad_inputs_are_named():
    for kwargs in (dict(num_classes=1), dict(num_classes=C, momentum=1.5), dict(num_classes=C, period=0)):
        with pytest.raises(ValueError):
            ConfidenceBank(**kwargs)
    bank = ConfidenceBank(C)
    with pytest.raises(ValueError, match="probabilities must be"):
        bank.update(torch.rand(1, C + 1, 1, 1, 2), labels([0, 1]))
    with pytest.raises(ValueError, match="does not match"):
        bank.update(torch.rand(1, C, 1, 1, 2), labels([0, 1, 2]))
    with pytest.raises(ValueError, match="target values must lie"):
        bank.update(torch.rand(1, C, 1, 1, 2), labels([0, C]))
    with pytest.raises(ValueError, match="gamma"):
        sampling_rates(torch.zeros(C), gamma=-0.5)
    with pytest.raises(ValueError, match="confidence must be"):
        sampling_rates(torch.zeros(1, C))
    with pytest.raises(ValueError, match="rates must be"):
        sampling_mask(torch.rand(1, C, 1, 1, 2), torch.ones(C + 1))
    with pytest.raises(ValueError, match="uniform must be"):
        sampling_mask(torch.rand(1, C, 1, 1, 2), torch.ones(C), uniform=torch.rand(1, 1, 1, 3))
    z, y = torch.randn(1, C, 1, 1, 2), torch.zeros(1, 1, 1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="class_weight"):
        sampled_cross_entropy(z, y, torch.ones(1, 1, 1, 2), torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="keep"):
        sampled_cross_entropy(z, y, torch.ones(1, 1, 1, 3), torch.ones(C))
    with pytest.raises(ValueError, match="target values must lie"):
        sampled_cross_entropy(z, y + C, torch.ones(1, 1, 1, 2), torch.ones(C))
    with pytest.raises(ValueError, match="not both"):
        CLD(C, labelled_counts=[10, 5, 1], class_weight=[1, 1, 1])
    with pytest.raises(ValueError, match="class weight must hold"):
        CLD(C, class_weight=[1.0, 2.0])
    with pytest.raises(ValueError, match="gamma"):
        CLD(C, gamma=-1.0)


def test_cld_class_weights_and_own_masks_with_the_other_branch_labels():
    assert torch.equal(CLD(C).class_weight, torch.ones(C))
    assert torch.allclose(CLD(C, class_weight=[1.0, 3.0, 4.0]).class_weight, torch.tensor([1.0, 3.0, 4.0]))
    method = CLD(C, [1000, 125, 8], period=1)  # w = [1, 2, 5]
    torch.manual_seed(1)
    z_a, z_b = torch.randn(2, C, 1, 1, 6) * 2, torch.randn(2, C, 1, 1, 6) * 2
    label = torch.tensor([0, 0, 1, 1, 2, 2]).reshape(1, 1, 1, 1, 6)
    torch.manual_seed(7)
    out = method(lambda _: z_a, lambda _: z_b, torch.zeros(2, 1, 1, 1, 6), label, 0.1, 0)
    w = torch.tensor([1.0, 2.0, 5.0])
    assert torch.allclose(out["weights_a"], w) and torch.allclose(out["weights_b"], w)
    # reference: period 1 -> each bank is the mean GT-class softmax of its branch on the labelled patch
    bank_a, bank_b = ConfidenceBank(C, period=1), ConfidenceBank(C, period=1)
    rates_a = sampling_rates(bank_a.update(z_a[:1].softmax(1), label))
    rates_b = sampling_rates(bank_b.update(z_b[:1].softmax(1), label))
    assert torch.allclose(out["sampling_rates_a"], rates_a) and torch.allclose(out["sampling_rates_b"], rates_b)
    torch.manual_seed(7)
    keep_a, keep_b = sampling_mask(z_a, rates_a), sampling_mask(z_b, rates_b)  # A drawn first, from A's arg-max
    assert torch.equal(out["keep_a"], keep_a) and torch.equal(out["keep_b"], keep_b)
    expected = (sampled_cross_entropy(z_a, z_b.argmax(1), keep_a, w)
                + sampled_cross_entropy(z_b, z_a.argmax(1), keep_b, w))
    assert torch.allclose(out["loss_unsup"], expected)
    sup = WeightedCEDiceLoss(1.0, 1.0, smooth=1.0)
    assert torch.allclose(out["loss_sup"], sup(z_a[:1], label, w) + sup(z_b[:1], label, w))


def test_cld_forward_on_tiny_vnets_trains_both_branches_and_updates_the_banks():
    torch.manual_seed(0)
    net_a, net_b = VNet(1, C, n_filters=2, has_dropout=True), VNet(1, C, n_filters=2, has_dropout=True)
    method = CLD(C, period=2)
    assert {"class_weight", "bank_a.confidence", "bank_b.conf_sum", "bank_a.step"} <= set(method.state_dict())
    image, label = torch.randn(2, 1, 16, 16, 16), torch.randint(0, C, (1, 1, 16, 16, 16))
    out = method(net_a, net_b, image, label, 0.1, 0)
    assert torch.isfinite(out["loss"]) and out["keep_a"].shape == (2, 16, 16, 16)
    out["loss"].backward()
    for net in (net_a, net_b):
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    # before the first refresh the banks are 0: every rate 1, so (almost) every voxel is kept
    assert torch.equal(method.bank_a.confidence, torch.zeros(C)) and torch.allclose(out["sampling_rates_a"],
                                                                                  torch.ones(C))
    with torch.no_grad():
        method(net_a, net_b, image, label, 0.1, 0)
    assert int(method.bank_b.step) == 2 and bool((method.bank_a.confidence > 0).all())
    assert bool((method.bank_b.confidence > 0).all())
