"""DINOLoss against hand-computed values and a brute-force pair loop (specs/sparsam.md §4, §10 item 2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from common.losses.dino import DINOLoss

LN2, LN3, LN4, LN5 = math.log(2), math.log(3), math.log(4), math.log(5)


def _loss_with_center(center, **kwargs) -> DINOLoss:
    loss = DINOLoss(**kwargs)
    loss.center.copy_(torch.as_tensor(center, dtype=torch.float32).reshape(1, -1))
    return loss


def test_two_views_by_hand_and_center_update():
    # K = 2, B = 1, two global views seen by both networks, tau_s = 0.1, tau_t = 0.5, centre c = [1, 0].
    # teacher g0 = [1 + 0.5 ln3, 0]: (t - c)/0.5 = [ln3, 0]  -> P = [3/4, 1/4]
    # teacher g1 = [1, 0.5 ln2]:      (t - c)/0.5 = [0, ln2]  -> P = [1/3, 2/3]
    # student v0 = [0.1 ln4, 0]:      s/0.1 = [ln4, 0]        -> log P = [ln(4/5), ln(1/5)]
    # student v1 = [0, 0]:                                    -> log P = [ln(1/2), ln(1/2)]
    # pairs (same view skipped): (g0, v1) = -(3/4 + 1/4) ln(1/2) = ln2 = 0.693147
    #                            (g1, v0) = -(1/3 ln(4/5) + 2/3 ln(1/5)) = ln5 - ln4/3 = 1.147340
    # L = (0.693147 + 1.147340) / 2 = 0.920244
    loss = _loss_with_center([1.0, 0.0], out_dim=2)
    teacher = torch.tensor([[1 + 0.5 * LN3, 0.0], [1.0, 0.5 * LN2]])
    student = torch.tensor([[0.1 * LN4, 0.0], [0.0, 0.0]])
    expected = (LN2 + (LN5 - LN4 / 3)) / 2
    assert loss(student, teacher, teacher_temp=0.5).item() == pytest.approx(expected, rel=1e-6)
    # centre after the call (training mode): mean(t) = [1 + 0.25 ln3, 0.25 ln2] = [1.274653, 0.173287]
    # c = 0.9 [1, 0] + 0.1 mean(t) = [1.0274653, 0.0173287]
    c_new = [0.9 + 0.1 * (1 + 0.25 * LN3), 0.1 * 0.25 * LN2]
    assert loss.center.flatten().tolist() == pytest.approx(c_new, rel=1e-6)


def test_matches_brute_force_pair_loop_for_2_plus_5_views():
    torch.manual_seed(0)
    batch, k, tau_t = 3, 16, 0.04
    center = torch.randn(1, k)
    loss = _loss_with_center(center, out_dim=k).eval()  # eval: the centre stays fixed
    student = torch.randn(7 * batch, k)
    teacher = torch.randn(2 * batch, k)
    total, n_terms = 0.0, 0
    for g in range(2):
        p_t = F.softmax((teacher[g * batch : (g + 1) * batch] - center) / tau_t, dim=-1)
        for v in range(7):
            if v == g:
                continue
            log_p_s = F.log_softmax(student[v * batch : (v + 1) * batch] / 0.1, dim=-1)
            total += -(p_t * log_p_s).sum(dim=-1).mean().item()
            n_terms += 1
    assert n_terms == 12  # 2 * 7 - 2 same-view pairs
    assert loss(student, teacher, teacher_temp=tau_t).item() == pytest.approx(total / 12, rel=1e-5)
    assert torch.equal(loss.center, center)


def test_teacher_equal_student_gives_mean_entropy():
    # K = 2, B = 2, both views identical, teacher == student logits, tau_t = tau_s = 0.1.
    # Rows x and -x have zero mean, so the first-batch centre is 0 as well.
    # row 0: x/0.1 = [ln3, 0] -> p = [3/4, 1/4]; row 1: -x/0.1 = [-ln3, 0] -> p = [1/4, 3/4]
    # H = -(3/4 ln(3/4) + 1/4 ln(1/4)) = ln4 - (3/4) ln3 = 1.386294 - 0.823959 = 0.562335 for both rows.
    x = torch.tensor([[0.1 * LN3, 0.0], [-0.1 * LN3, 0.0]])
    logits = torch.cat([x, x])  # views 0 and 1
    loss = DINOLoss(out_dim=2)
    assert loss(logits, logits, teacher_temp=0.1).item() == pytest.approx(LN4 - 0.75 * LN3, rel=1e-6)


def test_center_ema_and_first_batch_initialisation():
    teacher = torch.tensor([[3.0, 4.0], [5.0, 6.0]])  # row mean [4, 5]
    loss = DINOLoss(out_dim=2)
    assert "center" in loss.state_dict() and torch.count_nonzero(loss.center) == 0
    loss.update_center(teacher)  # all-zero centre -> c = batch mean = [4, 5]
    assert loss.center.tolist() == [[4.0, 5.0]]
    loss = _loss_with_center([1.0, 2.0], out_dim=2)
    loss.update_center(teacher)  # c = 0.9 [1, 2] + 0.1 [4, 5] = [1.3, 2.3]
    assert loss.center.flatten().tolist() == pytest.approx([1.3, 2.3], rel=1e-6)


def test_zero_center_uses_batch_mean_in_forward():
    torch.manual_seed(1)
    student, teacher = torch.randn(4 * 2, 5), torch.randn(2 * 2, 5)
    fresh = DINOLoss(out_dim=5)
    value = fresh(student, teacher, teacher_temp=0.04)
    # the batch mean is the centre used for this batch, and it is stored (not 0.1 * mean)
    assert torch.allclose(fresh.center, teacher.mean(dim=0, keepdim=True))
    preset = _loss_with_center(teacher.mean(dim=0), out_dim=5).eval()
    assert value.item() == pytest.approx(preset(student, teacher, teacher_temp=0.04).item(), rel=1e-6)
    # an (almost) zero stored centre gives a different value: the batch mean really was used
    near_zero = _loss_with_center([1e-9, 0.0, 0.0, 0.0, 0.0], out_dim=5).eval()
    assert abs(near_zero(student, teacher, teacher_temp=0.04).item() - value.item()) > 1e-4


def test_gradient_reaches_student_only_and_eval_freezes_center():
    torch.manual_seed(2)
    student = torch.randn(3 * 2, 4, requires_grad=True)
    teacher = torch.randn(2 * 2, 4, requires_grad=True)
    loss = _loss_with_center([0.5, 0.0, 0.0, 0.0], out_dim=4).eval()
    loss(student, teacher, teacher_temp=0.04).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None
    assert loss.center.flatten().tolist() == [0.5, 0.0, 0.0, 0.0]


def test_center_survives_state_dict_round_trip():
    loss = _loss_with_center([0.25, -1.5, 2.0], out_dim=3)
    restored = DINOLoss(out_dim=3)
    restored.load_state_dict(loss.state_dict())
    assert restored.center.flatten().tolist() == [0.25, -1.5, 2.0]


@pytest.mark.parametrize(
    "student_shape, teacher_shape, temp, match",
    [
        ((6, 3), (4, 4), 0.04, "teacher_out must have shape"),
        ((6, 3), (3, 3), 0.04, "not a positive multiple of n_global_views=2"),
        ((5, 3), (4, 3), 0.04, "not a multiple of the batch size 2"),
        ((6, 3), (4, 3), 0.0, "teacher_temp must be > 0"),
    ],
)
def test_bad_input_is_reported(student_shape, teacher_shape, temp, match):
    with pytest.raises(ValueError, match=match):
        DINOLoss(out_dim=3)(torch.zeros(student_shape), torch.zeros(teacher_shape), teacher_temp=temp)


def test_single_view_has_no_pair():
    with pytest.raises(ValueError, match="no cross-view pair"):
        DINOLoss(out_dim=3, n_global_views=1)(torch.zeros(2, 3), torch.zeros(2, 3), teacher_temp=0.04)
