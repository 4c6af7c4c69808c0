"""StructureLoss against values worked out by hand (specs/endoked.md §4.2)."""

import math

import pytest
import torch
from monai.losses import DeepSupervisionLoss

from common.losses.structure import StructureLoss, boundary_weights

# A 2x2 mask with one foreground pixel. On a 2x2 image every 31x31 window (zero padding 15, padding counted)
# holds the whole image, so the local mean is sum(G) / 31^2 = 1/961 at every pixel:
#   w(0,0) = 1 + 5 * |1/961 - 1| = 1 + 4800/961 = 5761/961,   w(other) = 1 + 5/961 = 966/961.
MASK = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
W_FG, W_BG = 5761 / 961, 966 / 961


def test_boundary_weights_by_hand():
    w = boundary_weights(MASK)
    assert w[0, 0, 0, 0].item() == pytest.approx(W_FG, rel=1e-6)
    assert w[0, 0, 1, 1].item() == pytest.approx(W_BG, rel=1e-6)


def test_zero_logits_by_hand():
    # logits 0 -> p = 0.5 and BCE = ln 2 at every pixel, whatever the target, so mean and weighted BCE agree.
    # inter = 0.5 * W_FG ; union = 1.5 * W_FG + 3 * 0.5 * W_BG = 1.5 * (5761 + 966) / 961 = 1.5 * 7 = 10.5
    inter = 0.5 * W_FG
    wiou = 1 - (inter + 1) / (10.5 - inter + 1)  # = 1 - 3.99740 / 8.50260 = 0.52986
    expected = math.log(2) + wiou  # 1.22301
    logits = torch.zeros_like(MASK)
    assert StructureLoss()(logits, MASK).item() == pytest.approx(expected, rel=1e-5)
    assert StructureLoss(weighted_bce=True)(logits, MASK).item() == pytest.approx(expected, rel=1e-5)


def test_official_mean_bce_quirk_differs_from_weighted_bce():
    # logits [[2, 0], [0, 0]]: BCE(2, 1) = ln(1 + e^-2) = 0.126928, BCE(0, 0) = ln 2 = 0.693147.
    logits = torch.tensor([[[[2.0, 0.0], [0.0, 0.0]]]])
    bce_fg, bce_bg = math.log(1 + math.exp(-2)), math.log(2)
    mean_bce = (bce_fg + 3 * bce_bg) / 4  # 0.551592: what the official reduce='none' quirk computes
    weighted_bce = (W_FG * bce_fg + 3 * W_BG * bce_bg) / (W_FG + 3 * W_BG)  # (5761*.126928 + 2898*.693147)/8659 = .316430
    p_fg = 1 / (1 + math.exp(-2))  # 0.880797
    inter = W_FG * p_fg
    union = W_FG * (p_fg + 1) + 3 * W_BG * 0.5
    wiou = 1 - (inter + 1) / (union - inter + 1)
    assert StructureLoss()(logits, MASK).item() == pytest.approx(mean_bce + wiou, rel=1e-5)
    assert StructureLoss(weighted_bce=True)(logits, MASK).item() == pytest.approx(weighted_bce + wiou, rel=1e-5)


def test_batch_mean_and_deep_supervision_sum():
    # The loss of a batch is the mean of the per-image losses; DeepSupervisionLoss("same") sums over (P1, P2).
    loss = StructureLoss(weighted_bce=True)
    a, b = torch.randn(1, 1, 8, 8), torch.randn(1, 1, 8, 8)
    ga, gb = (torch.rand(1, 1, 8, 8) > 0.5).float(), (torch.rand(1, 1, 8, 8) > 0.5).float()
    batch = loss(torch.cat([a, b]), torch.cat([ga, gb]))
    assert batch.item() == pytest.approx((loss(a, ga).item() + loss(b, gb).item()) / 2, rel=1e-6)
    ds = DeepSupervisionLoss(StructureLoss(), weight_mode="same")
    assert ds((a, b), ga).item() == pytest.approx(StructureLoss()(a, ga).item() + StructureLoss()(b, ga).item(), rel=1e-6)


def test_perfect_confident_prediction_is_near_zero_and_gradients_flow():
    target = torch.zeros(1, 1, 16, 16)
    target[..., 4:12, 4:12] = 1
    logits = (target * 2 - 1) * 20  # +-20: sigmoid is 1 - 2e-9 on the mask, 2e-9 off it
    assert StructureLoss()(logits, target).item() < 1e-3
    logits = torch.zeros(1, 1, 16, 16, requires_grad=True)
    StructureLoss()(logits, target).backward()
    assert logits.grad is not None and logits.grad[..., 8, 8].item() < 0 < logits.grad[..., 0, 0].item()


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match="differ"):
        StructureLoss()(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
