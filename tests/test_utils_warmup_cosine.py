"""ASG's per-step warm-up + cosine learning rate by hand (specs/asg.md §5, §10 item 9).

T = 100 steps, W = int(0.4 T) = 40, max 4e-5, min 1e-8 (the released values), so (max - min) = 3.999e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.utils.warmup_cosine import WarmupCosineLR, warmup_cosine_factor, warmup_cosine_lr

MAX, MIN, T, W = 4e-5, 1e-8, 100, 40
# t = 0: min = 1e-8
# t = 20 (W/2): 1e-8 + 3.999e-5 * 20/40 = 2.0005e-5
# t = 40 (W): 1e-8 + 3.999e-5 * 1/2 (1 + cos 0) = 4e-5
# t = 55: 1e-8 + 3.999e-5 * 1/2 (1 + cos(π 15/60)) = 1e-8 + 3.999e-5 * 0.853553 = 3.414360e-5
# t = 70 ((W + T)/2): 1e-8 + 3.999e-5 * 1/2 (1 + cos(π/2)) = 2.0005e-5
# t = 100 (T): 1e-8 + 3.999e-5 * 1/2 (1 + cos π) = 1e-8;   t = 105 (past T): stays 1e-8
EXPECTED = {0: 1e-8, 20: 2.0005e-5, 40: 4e-5, 55: 3.414360e-5, 70: 2.0005e-5, 100: 1e-8, 105: 1e-8}


def test_lr_at_key_steps():
    for step, lr in EXPECTED.items():
        assert warmup_cosine_lr(step, T, W, MAX, MIN) == pytest.approx(lr, rel=1e-6), step
        assert warmup_cosine_factor(step, T, W, MAX, MIN) == pytest.approx(lr / MAX, rel=1e-6), step
    # one step before the peak is still on the ramp: 1e-8 + 3.999e-5 * 39/40 = 1e-8 + 3.899025e-5 = 3.900025e-5
    assert warmup_cosine_lr(39, T, W, MAX, MIN) == pytest.approx(3.900025e-5, rel=1e-7)


def test_no_warmup_starts_at_max():
    # W = 0: t = 0 is already the cosine start (max); t = 50 = T/2 -> (max + min) / 2
    assert warmup_cosine_lr(0, T, 0, MAX, MIN) == pytest.approx(MAX, rel=1e-12)
    assert warmup_cosine_lr(50, T, 0, MAX, MIN) == pytest.approx((MAX + MIN) / 2, rel=1e-12)


def run_schedule(optimizer: torch.optim.Optimizer, scheduler: WarmupCosineLR, steps: int) -> list[list[float]]:
    """lr of every group used at steps 0 .. steps-1 (read before each optimiser step)."""
    used = []
    for _ in range(steps):
        used.append([group["lr"] for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return used


def test_scheduler_drives_sgd_param_groups():
    # group 0 starts at 4e-5 (max), group 1 at 8e-5: each warms up to its own lr, both decay to the same min;
    # group 1 at t = 20: 1e-8 + (8e-5 - 1e-8) / 2 = 4.0005e-5
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD([{"params": [params[0]]}, {"params": [params[1]], "lr": 8e-5}], lr=MAX)
    scheduler = WarmupCosineLR(optimizer, total_steps=T, warmup_fraction=0.4, min_lr=MIN)
    assert scheduler.warmup_steps == W
    used = run_schedule(optimizer, scheduler, 106)
    for step, lr in EXPECTED.items():
        assert used[step][0] == pytest.approx(lr, rel=1e-6), step
    assert used[20][1] == pytest.approx(4.0005e-5, rel=1e-6)
    assert used[40][1] == pytest.approx(8e-5, rel=1e-6) and used[100][1] == pytest.approx(MIN, rel=1e-6)


def test_warmup_steps_are_truncated():
    # T = 7, fraction 0.4 -> W = int(2.8) = 2: t = 1 is halfway up (min + (max - min)/2), t = 2 the peak
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = WarmupCosineLR(optimizer, total_steps=7, warmup_fraction=0.4, min_lr=0.0)
    assert scheduler.warmup_steps == 2
    used = [lr for (lr,) in run_schedule(optimizer, scheduler, 8)]
    # cosine over T - W = 5 steps: t = 2 + j -> 1/2 (1 + cos(π j / 5))
    expected = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * j / 5)) for j in range(6)]
    assert used == pytest.approx(expected, abs=1e-12)


def test_scheduler_resumes_from_state_dict():
    def make():
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=MAX)
        return optimizer, WarmupCosineLR(optimizer, total_steps=T, min_lr=MIN)

    optimizer, scheduler = make()
    run_schedule(optimizer, scheduler, 55)
    optimizer2, scheduler2 = make()
    optimizer2.load_state_dict(optimizer.state_dict())
    scheduler2.load_state_dict(scheduler.state_dict())
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(EXPECTED[55], rel=1e-6)
    run_schedule(optimizer2, scheduler2, 15)
    assert optimizer2.param_groups[0]["lr"] == pytest.approx(EXPECTED[70], rel=1e-6)


def test_bad_arguments_raise():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=MAX)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosineLR(optimizer, total_steps=0)
    for fraction in (1.0, -0.1):
        with pytest.raises(ValueError, match="warmup_fraction"):
            WarmupCosineLR(optimizer, total_steps=T, warmup_fraction=fraction)
    with pytest.raises(ValueError, match="min_lr"):
        WarmupCosineLR(optimizer, total_steps=T, min_lr=1e-3)
    with pytest.raises(ValueError, match="min_lr"):
        warmup_cosine_lr(0, T, W, max_lr=1e-8, min_lr=1e-6)
    with pytest.raises(ValueError, match="warmup_steps"):
        warmup_cosine_lr(0, T, T, MAX, MIN)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine_lr(-1, T, W, MAX, MIN)
