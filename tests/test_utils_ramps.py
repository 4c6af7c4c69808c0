"""DHC's per-epoch sigmoid ramp-up and poly lr against values worked out by hand (specs/dhc.md §4.5, §11.3)."""

import math

import pytest
import torch

from common.utils.ramps import (
    consistency_weight,
    consistency_weight_in_epoch,
    lr_in_epoch,
    poly_lr,
    sigmoid_rampup,
)


def test_sigmoid_rampup_by_hand():
    # lambda(0) = .1 exp(-5) = .1 * .0067379 = 6.7379e-4
    assert consistency_weight(0, 0.1, 300) == pytest.approx(6.7379e-4, rel=1e-4)
    # lambda(E) = w exp(0) = w;  clamped beyond E
    assert consistency_weight(300, 0.1, 300) == pytest.approx(0.1, rel=1e-12)
    assert consistency_weight(450, 0.1, 300) == pytest.approx(0.1, rel=1e-12)
    # half way: exp(-5 * .5^2) = exp(-1.25) = .286505
    assert sigmoid_rampup(150, 300) == pytest.approx(0.286505, rel=1e-5)
    assert sigmoid_rampup(3, 0) == 1.0  # no ramp


def test_poly_lr_by_hand():
    # 3e-2 (1 - 150/300)^.9 = 3e-2 * .5^.9 = 3e-2 * .535887 = .0160766
    assert poly_lr(150, 3e-2, 300) == pytest.approx(0.0160766, rel=1e-5)
    assert poly_lr(0, 3e-2, 300) == 3e-2
    assert poly_lr(300, 3e-2, 300) == 0.0


def test_one_epoch_lag():
    # values are assigned after epoch e with index e, so epochs 0 and 1 both run at the epoch-0 values
    assert lr_in_epoch(0, 3e-2, 300) == lr_in_epoch(1, 3e-2, 300) == 3e-2
    # epoch 151 runs at poly(150) = .0160766;  epoch 300 (the 301st of range(E + 1)) at 3e-2 (1/300)^.9 = 1.8e-4
    assert lr_in_epoch(151, 3e-2, 300) == pytest.approx(0.0160766, rel=1e-5)
    assert lr_in_epoch(300, 3e-2, 300) == pytest.approx(3e-2 * (1 / 300) ** 0.9, rel=1e-12)
    assert consistency_weight_in_epoch(1, 0.1, 300) == pytest.approx(0.1 * math.exp(-5), rel=1e-12)
    # exp(-5 (1 - 149/300)^2) = exp(-5 * .503333^2) = exp(-1.266722) = .281754
    assert consistency_weight_in_epoch(150, 0.1, 300) == pytest.approx(0.0281754, rel=1e-5)
    # torch's PolynomialLR stepped after each epoch is one epoch ahead: during epoch 1 it gives
    # 3e-2 (1 - 1/300)^.9 = 3e-2 * .996997 = .0299099, DHC still 3e-2
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-2)
    sched = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=300, power=0.9)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0299099, rel=1e-5)
    assert opt.param_groups[0]["lr"] != pytest.approx(lr_in_epoch(1, 3e-2, 300))


def test_bad_epochs_are_reported():
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        sigmoid_rampup(-1, 10)
    with pytest.raises(ValueError, match="max_epochs"):
        poly_lr(301, 3e-2, 300)
    with pytest.raises(ValueError, match="max_epochs"):
        poly_lr(0, 3e-2, 0)
    with pytest.raises(ValueError, match="rampup_length"):
        sigmoid_rampup(0, -5)
