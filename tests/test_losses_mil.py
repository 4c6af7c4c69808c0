"""common.losses.mil_distillation: teacher bag losses, min-max clamp, pseudo-label merge and the student loss, all
against hand calculations (specs/endoked.md §2.4, §7 rows 2 and 4)."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.mil_distillation import (
    abmil_bag_loss,
    dsmil_bag_loss,
    merge_pseudo_labels,
    minmax_normalise,
    student_distillation_loss,
)


def test_abmil_bag_loss_by_hand():
    probs = torch.tensor([[0.2, 0.8]])
    # Y = 1: -log(0.8 + 1e-5) = 0.223131
    assert abs(float(abmil_bag_loss(probs, torch.tensor([1]))) - 0.223131) < 1e-6
    # Y = 0: -log(1 - 0.8 + 1e-5) = -log(0.20001) = 1.609388
    assert abs(float(abmil_bag_loss(probs, torch.tensor([0]))) - 1.609388) < 1e-6
    # p = 1 exactly, Y = 0: -log(0 + 1e-5) = 11.512925 (the eps keeps it finite)
    assert abs(float(abmil_bag_loss(torch.tensor([[0.0, 1.0]]), 0)) - 11.512925) < 1e-5


def test_dsmil_bag_loss_softmax_twice_flag():
    probs = torch.tensor([[0.25, 0.75]])
    scores = torch.tensor([[0.2, 0.6]])
    # BCE(max s = 0.6, Y = 1) = -log 0.6 = 0.510826
    # faithful: CE(softmax([0.25, 0.75]), 1) = log(1 + e^-0.5) = 0.474077 -> 0.5 (0.474077 + 0.510826) = 0.492451
    assert abs(float(dsmil_bag_loss(probs, scores, torch.tensor([1]))) - 0.492451) < 1e-6
    # intended: CE of the logits = -log p_1 = -log 0.75 = 0.287682 -> 0.5 (0.287682 + 0.510826) = 0.399254
    assert abs(float(dsmil_bag_loss(probs, scores, torch.tensor([1]), softmax_twice=False)) - 0.399254) < 1e-6


def test_dsmil_intended_equals_cross_entropy_of_logits():
    logits = torch.tensor([[1.5, -0.5]])
    scores = torch.tensor([[0.3, 0.1, 0.2]])
    # softmax([1.5, -0.5]) = [1, e^-2] / (1 + e^-2); CE(logits, 0) = log(1 + e^-2) = 0.126928
    # BCE(max s = 0.3, Y = 0) = -log 0.7 = 0.356675 -> 0.5 (0.126928 + 0.356675) = 0.241802
    value = dsmil_bag_loss(torch.softmax(logits, dim=1), scores, 0, softmax_twice=False)
    assert abs(float(value) - 0.241802) < 1e-6


def test_bag_losses_reject_bad_input():
    with pytest.raises(ValueError, match="0 or 1"):
        abmil_bag_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([2]))
    with pytest.raises(ValueError, match="instance_scores"):
        dsmil_bag_loss(torch.tensor([[0.5, 0.5]]), torch.tensor([0.2, 0.3]), 1)
    with pytest.raises(ValueError, match="bag_probs"):
        abmil_bag_loss(torch.tensor([0.5, 0.5]), 1)


def test_minmax_normalise_and_clamp():
    scores = torch.tensor([0.2, 0.5, 1.0, -0.1, 0.6])
    out = minmax_normalise(scores, 0.0, 1.0)
    # (s - 0) / 1, clamped to [1e-5, 1 - 1e-5]: 1.0 -> 0.99999, -0.1 -> 0.00001
    assert torch.allclose(out, torch.tensor([0.2, 0.5, 0.99999, 0.00001, 0.6]), atol=1e-7)
    # range (0.2, 0.6): (s - 0.2) / 0.4 = [0, 0.75, 2, -0.75, 1] -> [1e-5, 0.75, 1-1e-5, 1e-5, 1-1e-5]
    out = minmax_normalise(scores, 0.2, 0.6)
    assert torch.allclose(out, torch.tensor([1e-5, 0.75, 0.99999, 1e-5, 0.99999]), atol=1e-6)
    with pytest.raises(ValueError, match="max > min"):
        minmax_normalise(scores, 0.3, 0.3)


def test_merge_pseudo_labels_negative_bags_are_zero():
    s1 = torch.tensor([2.0, 4.0, 6.0, 10.0])  # range (2, 10): [0, 0.25, 0.5, 1] -> [1e-5, 0.25, 0.5, 0.99999]
    s2 = torch.tensor([0.1, 0.3, 0.5, 0.9])  # range (0.1, 0.5): [0, 0.5, 1, 2] -> [1e-5, 0.5, 0.99999, 0.99999]
    bag_labels = torch.tensor([1, 1, 0, 1])
    merged = merge_pseudo_labels([s1, s2], [(2.0, 10.0), (0.1, 0.5)], [0.5, 0.5], bag_labels)
    # 0.5 a + 0.5 b = [1e-5, 0.375, (0.5 + 0.99999) / 2, 0.99999]; instance 2 is in a negative bag -> 0
    assert torch.allclose(merged, torch.tensor([1e-5, 0.375, 0.0, 0.99999]), atol=1e-6)
    # unequal weights (0.2, 0.8) on instance 1: 0.2 * 0.25 + 0.8 * 0.5 = 0.45
    merged = merge_pseudo_labels([s1, s2], [(2.0, 10.0), (0.1, 0.5)], [0.2, 0.8], bag_labels)
    assert abs(float(merged[1]) - 0.45) < 1e-6 and float(merged[2]) == 0.0


def test_merge_pseudo_labels_rejects_mismatch():
    with pytest.raises(ValueError, match="one range and one weight per teacher"):
        merge_pseudo_labels([torch.zeros(2)], [(0.0, 1.0), (0.0, 1.0)], [1.0], torch.ones(2))
    with pytest.raises(ValueError, match="teacher 1 gives 3 scores for 2 instances"):
        merge_pseudo_labels([torch.zeros(3)], [(0.0, 1.0)], [1.0], torch.ones(2))


def test_student_distillation_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p = [[0.5, 0.5], [0.75, 0.25]]
    targets = torch.tensor([1.0, 0.0])
    # w_n = 0.1: i=0: 0.9 * 1 * log(0.50001); i=1: 0.1 * 1 * log(0.75001)
    # L = -(0.9 * -0.693127 + 0.1 * -0.287669) / 2 = 0.326291
    assert abs(float(student_distillation_loss(logits, targets, w_neg=0.1)) - 0.326291) < 1e-6
    # literal script default w_n = 1.0: the positive term vanishes; L = -(0 + log(0.75001)) / 2 = 0.143834
    assert abs(float(student_distillation_loss(logits, targets, w_neg=1.0)) - 0.143834) < 1e-6


def test_student_loss_with_soft_target_and_feature_output():
    # the faithful student returns 4 "logits" (hidden units); softmax over all 4 and use columns 0 and 1
    hidden = torch.tensor([[0.0, 0.0, math.log(2.0), 0.0]])  # softmax = [1, 1, 2, 1] / 5 = [0.2, 0.2, 0.4, 0.2]
    # target 0.5, w_n = 0.1: -(0.1 * 0.5 * log(0.20001) + 0.9 * 0.5 * log(0.20001)) = -0.5 log(0.20001) = 0.804694
    assert abs(float(student_distillation_loss(hidden, torch.tensor([0.5]))) - 0.804694) < 1e-6
    with pytest.raises(ValueError, match="2 targets for 1 instances"):
        student_distillation_loss(hidden, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="w_neg"):
        student_distillation_loss(hidden, torch.tensor([0.5]), w_neg=1.5)
