"""ToCo / EndoKED-WSSS losses (common/losses/toco.py) against values worked out by hand (specs/endoked.md §3.4)."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.toco import CTCLoss, PTCLoss, TwoClassDiceLoss
from common.transforms.cams import label_to_affinity_mask

# ------------------------------------------------------------------------------------------------ PTC


def test_ptc_loss_by_hand():
    # tokens f0 = (1, 0), f1 = (1, 1), f2 = (0, -1), f3 = (5, 5) on a 1x4 grid, labels [1, 1, 0, 255]
    # |cos|: c01 = 1/sqrt2, c02 = 0, c12 = 1/sqrt2; token 3 is ignored.
    # positive pairs (0,1), (1,0): sum = sqrt2, N1 = 2 -> pull = 1 - sqrt2 / 3
    # negative pairs (0,2), (2,0), (1,2), (2,1): sum = sqrt2, N0 = 4 -> push = sqrt2 / 5
    # L = 0.5 (1 - sqrt2/3) + 0.5 sqrt2/5 = 0.5 - sqrt2/15 = 0.405719
    fmap = torch.tensor([[1.0, 1.0, 0.0, 5.0], [0.0, 1.0, -1.0, 5.0]]).view(1, 2, 1, 4)
    affinity = label_to_affinity_mask(torch.tensor([[[1, 1, 0, 255]]]))
    loss = PTCLoss()(fmap, affinity)
    assert loss.item() == pytest.approx(0.5 - math.sqrt(2) / 15, rel=1e-6)


def test_ptc_loss_sums_over_the_batch_and_checks_shapes():
    # image 0: two identical tokens, same label: pull sum 2 * 1, N1 = 2; image 1: two orthogonal tokens with
    # different labels: push sum 0, N0 = 2. Batch sums: pull = 1 - 2 / (2 + 1) = 1/3, push = 0 / 3 -> L = 1/6
    fmap = torch.tensor([[[[1.0, 1.0]], [[0.0, 0.0]]], [[[1.0, 0.0]], [[0.0, 1.0]]]])  # [2, 2, 1, 2]
    affinity = label_to_affinity_mask(torch.tensor([[1, 1], [0, 1]]))
    assert PTCLoss()(fmap, affinity).item() == pytest.approx(1 / 6, rel=1e-6)
    with pytest.raises(ValueError, match="affinity must be"):
        PTCLoss()(fmap, torch.zeros(2, 3, 3))


# ------------------------------------------------------------------------------------------------ CTC


def test_ctc_loss_one_positive_one_negative_by_hand():
    # tau = 0.5 -> e_gk = exp(2 t_g . s_k). Image 0: t1 = (1, 0), t2 = (0, 1); positive crop s1 = (ln2/2, 0),
    # negative crop s2 = (0, ln3/2):  e11 = exp(ln2) = 2, e21 = 1, e12 = 1, e22 = exp(ln3) = 3.
    # negative sums: N_1 = e12 = 1, N_2 = e22 = 3
    # positive term:  -log(2 / (2 + 1 + 1e-4)) - log(1 / (1 + 3 + 1e-4)) = log(1.50005) + log(4.0001)
    # always-added:   -log(1 / (1 + 1 + 1e-4)) - log(1 / (1 + 3 + 1e-4)) = log(2.0001) + log(4.0001)
    # l0 = (log 1.50005 + 2 log 4.0001 + log 2.0001) / (2 * (1 + 1e-4)) = 3.87133 / 2.0002 = 1.93547
    # Image 1: all vectors 0 -> every e = 1, both crops positive, no negatives:
    # each of the 4 positive terms is -log(1 / (1 + 0 + 1e-4)) = log 1.0001, the always-added 2 x log(1 + 0 + 1e-4):
    # l1 = 6 log(1.0001) / (2 * (2 + 1e-4))
    ln2, ln3 = math.log(2), math.log(3)
    t = {(0, 0): (1.0, 0.0), (1, 0): (0.0, 1.0), (0, 1): (0.0, 0.0), (1, 1): (0.0, 0.0)}  # (view, image)
    s = {(0, 0): (ln2 / 2, 0.0), (1, 0): (0.0, ln3 / 2), (0, 1): (0.0, 0.0), (1, 1): (0.0, 0.0)}
    # view-major rows: v * B + b
    teacher = torch.tensor([t[(0, 0)], t[(0, 1)], t[(1, 0)], t[(1, 1)]])
    student = torch.tensor([s[(0, 0)], s[(0, 1)], s[(1, 0)], s[(1, 1)]])
    flags = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    l0 = (math.log(1.50005) + 2 * math.log(4.0001) + math.log(2.0001)) / (2 * (1 + 1e-4))
    l1 = 6 * math.log(1.0001) / (2 * (2 + 1e-4))
    loss = CTCLoss(temperature=0.5)(student, teacher, flags)
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-5)
    # image 0 alone
    loss0 = CTCLoss(0.5)(torch.tensor([s[(0, 0)], s[(1, 0)]]), torch.tensor([t[(0, 0)], t[(1, 0)]]), flags[:1])
    assert loss0.item() == pytest.approx(l0, rel=1e-5)


def test_ctc_loss_only_negatives_keeps_the_always_added_term():
    # no positive crop: l = log(1 + N_1 + 1e-4) + log(1 + N_2 + 1e-4) with N_g = 1 (all vectors 0), divided by
    # 2 * (0 + 1e-4): 2 log(2.0001) / 2e-4 = 6931.8
    zeros = torch.zeros(2, 3)
    loss = CTCLoss(0.5)(torch.zeros(1, 3), zeros, torch.tensor([[0.0]]))
    assert loss.item() == pytest.approx(2 * math.log(2.0001) / 2e-4, rel=1e-5)


def test_ctc_loss_checks_shapes():
    with pytest.raises(ValueError, match="do not fit flags"):
        CTCLoss()(torch.zeros(5, 4), torch.zeros(2, 4), torch.ones(1, 4))
    with pytest.raises(ValueError, match="temperature"):
        CTCLoss(temperature=0.0)


# ------------------------------------------------------------------------------------------------ Dice


def test_two_class_dice_by_hand_with_an_ignored_pixel():
    # logits z0 = 0, z1 = [[ln3, 0], [-ln3, 0]] -> p1 = [[.75, .5], [.25, .5]], p0 = [[.25, .5], [.75, .5]]
    # labels [[1, 0], [0, 255]]: t0 = [[0, 1], [1, 0]], t1 = [[1, 0], [0, 0]] (the ignored pixel has t = 0)
    # class 0: sum p t = .5 + .75 = 1.25; sum p^2 = .0625 + .25 + .5625 + .25 = 1.125; sum t^2 = 2
    #          dice = (2.5 + 1e-5) / (3.125 + 1e-5) = 0.8
    # class 1: sum p t = .75; sum p^2 = 1.125; sum t^2 = 1 -> dice = (1.5 + 1e-5) / (2.125 + 1e-5) = 0.70588
    # loss = ((1 - 0.8) + (1 - 0.70588)) / 2 = 0.24706
    ln3 = math.log(3)
    logits = torch.stack([torch.zeros(2, 2), torch.tensor([[ln3, 0.0], [-ln3, 0.0]])])[None]
    labels = torch.tensor([[[1, 0], [0, 255]]])
    dice0 = (2.5 + 1e-5) / (3.125 + 1e-5)
    dice1 = (1.5 + 1e-5) / (2.125 + 1e-5)
    loss = TwoClassDiceLoss()(logits, labels)
    assert loss.item() == pytest.approx(((1 - dice0) + (1 - dice1)) / 2, rel=1e-5)


def test_two_class_dice_sums_over_the_batch():
    # two 1-pixel images, logits 0 (p = .5 each class), labels 0 and 1:
    # class 0: sum p t = .5, sum p^2 = .5, sum t^2 = 1 -> dice = (1 + 1e-5) / (1.5 + 1e-5); class 1 the same
    # (a per-image Dice would differ: image 0 class 1 alone gives (1e-5) / (.25 + 1e-5))
    logits = torch.zeros(2, 2, 1, 1)
    labels = torch.tensor([[[0]], [[1]]])
    expected = 1 - (1 + 1e-5) / (1.5 + 1e-5)
    assert TwoClassDiceLoss()(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="need logits"):
        TwoClassDiceLoss()(torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))


def test_losses_give_gradients():
    fmap = torch.randn(1, 4, 2, 2, requires_grad=True)
    PTCLoss()(fmap, label_to_affinity_mask(torch.tensor([[0, 0, 1, 1]]))).backward()
    logits = torch.randn(1, 2, 3, 3, requires_grad=True)
    TwoClassDiceLoss()(logits, torch.randint(0, 2, (1, 3, 3))).backward()
    student = torch.randn(4, 8, requires_grad=True)
    CTCLoss()(student, torch.randn(2, 8), torch.tensor([[1.0, 1.0, 0.0, 1.0]])).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (fmap, logits, student))
