"""Schedules and teacher EMA by hand (specs/sparsam.md §4-§5, §10 items 2, 4, 6)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from common.utils.schedules import cosine_schedule, ema_update, linear_warmup_constant, teacher_momentum_schedule

HALF_SQRT2 = math.sqrt(2) / 2


def test_cosine_with_warmup_by_hand():
    # warm-up linspace(0, 1, 4) = [0, 1/3, 2/3, 1] (step 0, mid warm-up, end = base); cosine over N = 4 steps j = 0..3:
    # 0 + 0.5 * (1 + cos(pi j / 4)) = [1, 0.5 + sqrt2/4 = 0.853553, 0.5, 0.5 - sqrt2/4 = 0.146447]
    values = cosine_schedule(1.0, 0.0, total_iters=8, warmup_iters=4)
    expected = [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 0.5 + HALF_SQRT2 / 2, 0.5, 0.5 - HALF_SQRT2 / 2]
    assert values.shape == (8,)
    assert values.tolist() == pytest.approx(expected, abs=1e-12)


def test_cosine_lr_like_schedule_with_start_and_final():
    # base 5e-4, final 1e-6, warm-up from 1e-4 over 3 steps: linspace(1e-4, 5e-4, 3) = [1e-4, 3e-4, 5e-4];
    # cosine N = 2: j = 0 -> 5e-4; j = 1 -> 1e-6 + 0.5 * (5e-4 - 1e-6) * (1 + cos(pi/2)) = 2.505e-4
    values = cosine_schedule(5e-4, 1e-6, total_iters=5, warmup_iters=3, warmup_start=1e-4)
    assert values.tolist() == pytest.approx([1e-4, 3e-4, 5e-4, 5e-4, 2.505e-4], rel=1e-12)


def test_cosine_increasing_and_bad_lengths():
    # weight decay 0.04 -> 0.4 over 3 steps: 0.4 - 0.18 * (1 + cos(pi j / 3))
    #   = [0.4 - 0.36 = 0.04, 0.4 - 0.27 = 0.13, 0.4 - 0.09 = 0.31]
    assert cosine_schedule(0.04, 0.4, total_iters=3).tolist() == pytest.approx([0.04, 0.13, 0.31], rel=1e-12)
    with pytest.raises(ValueError, match="warmup_iters"):
        cosine_schedule(1.0, 0.0, total_iters=3, warmup_iters=4)
    with pytest.raises(ValueError, match="total_iters"):
        cosine_schedule(1.0, 0.0, total_iters=0)


def test_teacher_temperature_warmup_then_constant():
    # linspace(0.02, 0.04, 5) = [0.02, 0.025, 0.03, 0.035, 0.04], then 0.04 for the 3 remaining steps
    values = linear_warmup_constant(0.02, 0.04, warmup_iters=5, total_iters=8)
    assert values[0] == pytest.approx(0.02)  # step 0
    assert values[2] == pytest.approx(0.03)  # mid warm-up
    assert values[4:].tolist() == pytest.approx([0.04] * 4)  # end of warm-up and after
    assert values.shape == (8,)


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("constant", [0.996, 0.996, 0.996]),
        # base -> 1: 1 - 0.002 * (1 + cos(pi j / 3)) = [0.996, 1 - 0.003, 1 - 0.001]
        ("dino_cosine", [0.996, 0.997, 0.999]),
        # 1 -> base: 0.996 + 0.002 * (1 + cos(pi j / 3)) = [1.0, 0.996 + 0.003, 0.996 + 0.001]
        ("released_2025", [1.0, 0.999, 0.997]),
    ],
)
def test_teacher_momentum_schedules(kind, expected):
    assert teacher_momentum_schedule(kind, 0.996, total_iters=3).tolist() == pytest.approx(expected, abs=1e-12)


def test_teacher_momentum_default_and_unknown_kind():
    assert np.all(teacher_momentum_schedule("constant", total_iters=4) == 0.9995)
    with pytest.raises(ValueError, match="'cosine'"):
        teacher_momentum_schedule("cosine", total_iters=4)


class _OneParam(nn.Module):
    def __init__(self, weight: float, stat: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([weight]))
        self.register_buffer("stat", torch.tensor([stat]))


def test_ema_on_one_parameter_by_hand_and_buffers_untouched():
    teacher, student = _OneParam(1.0, 5.0), _OneParam(3.0, 7.0)
    ema_update(teacher, student, momentum=0.9)  # 0.9 * 1 + 0.1 * 3 = 1.2
    assert teacher.weight.item() == pytest.approx(1.2)
    ema_update(teacher, student, momentum=0.5)  # 0.5 * 1.2 + 0.5 * 3 = 2.1
    assert teacher.weight.item() == pytest.approx(2.1)
    assert teacher.stat.item() == 5.0 and student.stat.item() == 7.0 and student.weight.item() == 3.0
    assert teacher.weight.grad_fn is None and teacher.weight.requires_grad


def test_ema_momentum_one_keeps_teacher_and_bad_input():
    teacher, student = _OneParam(1.0, 0.0), _OneParam(3.0, 0.0)
    ema_update(teacher, student, momentum=1.0)
    assert teacher.weight.item() == 1.0
    with pytest.raises(ValueError, match="momentum"):
        ema_update(teacher, student, momentum=1.5)
    with pytest.raises(ValueError, match="parameter tensors"):
        ema_update(teacher, nn.Linear(1, 1), momentum=0.9)
    with pytest.raises(ValueError, match="shape"):
        ema_update(nn.Linear(2, 1, bias=False), nn.Linear(3, 1, bias=False), momentum=0.9)
