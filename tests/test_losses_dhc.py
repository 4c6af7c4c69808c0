"""DHC's weighted CE + Dice, DistDW and DiffDW against values worked out by hand (specs/dhc.md §4.1-4.4, §11.2)."""

import io
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common.losses.debiased_weighting import DiffDW, DistDW, class_counts, distribution_weights
from common.losses.weighted_ce_dice import (
    WeightedCEDiceLoss,
    batch_dice,
    hard_batch_dice,
    weighted_cross_entropy,
    weighted_dice_loss,
)

# Four voxels, C = 3, logits = log(probabilities) so that softmax gives back these rows exactly:
#   v0 p = [.5, .25, .25]  y = 0      v1 p = [.2, .6, .2]  y = 1
#   v2 p = [.1, .1, .8]    y = 2      v3 p = [.25, .25, .5] y = 2
# arranged as a batch of B = 2 images of 1 x 2 voxels (v0, v1 | v2, v3): logits [2, 3, 1, 2], target [2, 1, 1, 2].
PROBS = torch.tensor([[0.5, 0.25, 0.25], [0.2, 0.6, 0.2], [0.1, 0.1, 0.8], [0.25, 0.25, 0.5]], dtype=torch.float64)
LOGITS = PROBS.log().reshape(2, 2, 3).permute(0, 2, 1).unsqueeze(2).float()  # [B=2, C=3, 1, 2]
TARGET = torch.tensor([0, 1, 2, 2]).reshape(2, 1, 1, 2)
# per-voxel CE -ln p_{y}: [ln 2, -ln .6, -ln .8, ln 2] = [.693147, .510826, .223144, .693147]
CE_V = [math.log(2), -math.log(0.6), -math.log(0.8), math.log(2)]
W = torch.tensor([0.5, 1.0, 2.0])
# w_y = [.5, 1, 2, 2], sum 5.5:  CE = (.5*.693147 + .510826 + 2*.223144 + 2*.693147) / 5.5 = 2.689981 / 5.5 = .489087
CE_W = (0.5 * CE_V[0] + CE_V[1] + 2 * CE_V[2] + 2 * CE_V[3]) / 5.5
# Dice pooled over batch and voxels, smooth 1, classes 1..2 only:
#   c=1: sum p = .25+.6+.1+.25 = 1.2, sum g = 1, sum pg = .6  -> D1 = (1.2 + 1) / (1.2 + 1 + 1) = 2.2/3.2 = .6875
#   c=2: sum p = .25+.2+.8+.5 = 1.75, sum g = 2, sum pg = .8+.5 = 1.3 -> D2 = (2.6 + 1) / (1.75 + 2 + 1) = .757895
D1, D2 = 2.2 / 3.2, 3.6 / 4.75
DICE_W = -(1.0 * D1 + 2.0 * D2) / 2  # -(w1 D1 + w2 D2) / (C - 1) = -(.6875 + 1.515789) / 2 = -1.101645


def test_weighted_ce_by_hand_and_against_torch():
    assert weighted_cross_entropy(LOGITS, TARGET, W).item() == pytest.approx(CE_W, rel=1e-5)
    # same definition as PyTorch's cross_entropy(weight=w, reduction='mean')
    torch_ce = F.cross_entropy(LOGITS, TARGET[:, 0], weight=W).item()
    assert weighted_cross_entropy(LOGITS, TARGET[:, 0], W).item() == pytest.approx(torch_ce, rel=1e-6)
    # w_0 = 0 ignores v0 entirely: (.510826 + .223144 + .693147) / 3 = .475705
    w0 = torch.tensor([0.0, 1.0, 1.0])
    assert weighted_cross_entropy(LOGITS, TARGET, w0).item() == pytest.approx(sum(CE_V[1:]) / 3, rel=1e-5)


def test_dice_is_batch_pooled_and_excludes_background():
    assert weighted_dice_loss(LOGITS, TARGET, W).item() == pytest.approx(DICE_W, rel=1e-5)
    # Per-image Dice would differ: image 0, class 1 = (1.2 + 1) / (.85 + 1 + 1) = .7719; image 1, class 1 has no GT:
    # 1 / (.35 + 1) = .7407; mean .7563 != pooled .6875.
    probs = torch.softmax(LOGITS, 1)
    onehot = F.one_hot(TARGET[:, 0], 3).movedim(-1, 1).float()
    assert batch_dice(probs, onehot, 1.0)[1].item() == pytest.approx(0.6875, rel=1e-5)
    # background weight does not enter the Dice term: w_0 = 100 leaves it unchanged
    w_bg = torch.tensor([100.0, 1.0, 2.0])
    assert weighted_dice_loss(LOGITS, TARGET, w_bg).item() == pytest.approx(DICE_W, rel=1e-5)


def test_total_loss_and_weight_scale():
    loss = WeightedCEDiceLoss()
    # CE + Dice = .489087 - 1.101645 = -.612557
    assert loss(LOGITS, TARGET, W).item() == pytest.approx(CE_W + DICE_W, rel=1e-5)
    # 3 w: CE unchanged (.489087), Dice x3 (-3.304934) -> total -2.815847
    assert loss(LOGITS, TARGET, 3 * W).item() == pytest.approx(CE_W + 3 * DICE_W, rel=1e-5)
    assert weighted_cross_entropy(LOGITS, TARGET, 3 * W).item() == pytest.approx(CE_W, rel=1e-5)
    # CE only (the cross pseudo supervision term), float labels accepted
    assert WeightedCEDiceLoss(lambda_dice=0.0)(LOGITS, TARGET.float(), W).item() == pytest.approx(CE_W, rel=1e-5)


def test_absent_class_soft_and_hard_dice():
    # Soft Dice of a class absent from the whole batch's GT: D = (0 + 1) / (sum p + 0 + 1).
    # Class 1 with target [0, 2, 2, 2] (v1 relabelled): sum p1 = 1.2 -> D1 = 1 / 2.2 = .454545;
    # class 2: sum p = 1.75, sum g = 3, sum pg = .2+.8+.5 = 1.5 -> D2 = 4 / 5.75 = .695652
    target = torch.tensor([0, 2, 2, 2]).reshape(2, 1, 2)
    expected = -(1.0 / 2.2 + 2.0 * 4 / 5.75) / 2  # -.922925
    assert weighted_dice_loss(LOGITS, target, W).item() == pytest.approx(expected, rel=1e-5)
    # Hard Dice, pooled over the batch, background included, smooth 1e-8. Arg-max labels of LOGITS: [0, 1 | 2, 2].
    # Ground truth [0, 1 | 0, 0]:
    #   c=0: TP 1 (v0), FP 0, FN 2 (v2, v3) -> (2 + 1e-8) / (2 + 0 + 2 + 2e-8) = .5
    #   c=1: TP 1, FP 0, FN 0 -> 1
    #   c=2: TP 0, FP 2, FN 0 -> 1e-8 / (2 + 2e-8) = 5e-9
    gt = torch.tensor([0, 1, 0, 0]).reshape(2, 1, 2)
    assert hard_batch_dice(LOGITS, gt).tolist() == pytest.approx([0.5, 1.0, 5e-9], rel=1e-5)
    # a class absent from both prediction and GT gets (0 + 1e-8) / (0 + 1e-8 + 1e-8) = .5 (4 classes, class 3 absent)
    logits4 = torch.cat([LOGITS, torch.full((2, 1, 1, 2), -10.0)], dim=1)
    assert hard_batch_dice(logits4, TARGET)[3].item() == pytest.approx(0.5, rel=1e-6)


def test_all_background_guard(caplog):
    # DistDW gives background weight 0; all-background targets make sum_i w_{y_i} = 0 -> CE = 0/0.
    w = torch.tensor([0.0, 4 / 3, 8 / 3])
    background = torch.zeros(2, 1, 1, 2, dtype=torch.long)
    logits = LOGITS.clone().requires_grad_(True)
    with caplog.at_level(logging.WARNING, logger="common.losses.weighted_ce_dice"):
        ce = weighted_cross_entropy(logits, background, w)
    assert ce.item() == 0.0 and "CE term skipped" in caplog.text
    # the Dice term is still finite: classes 1, 2 have no GT -> D1 = 1 / (1.2 + 1), D2 = 1 / (1.75 + 1)
    total = WeightedCEDiceLoss()(logits, background, w)
    assert total.item() == pytest.approx(-(4 / 3 / 2.2 + 8 / 3 / 2.75) / 2, rel=1e-5)  # -(.60606 + .96970)/2 = -.78788
    total.backward()
    assert torch.isfinite(logits.grad).all()
    assert math.isnan(weighted_cross_entropy(LOGITS, background, w, nan_guard=False).item())


def test_bad_inputs_are_reported():
    with pytest.raises(ValueError, match="one value per class"):
        weighted_cross_entropy(LOGITS, TARGET, torch.ones(4))
    with pytest.raises(ValueError, match=">= 0"):
        WeightedCEDiceLoss()(LOGITS, TARGET, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        weighted_dice_loss(LOGITS, TARGET + 1, W)
    with pytest.raises(ValueError, match="does not match"):
        weighted_dice_loss(LOGITS, TARGET[..., :1], W)
    with pytest.raises(ValueError, match="non-integer"):
        weighted_cross_entropy(LOGITS, TARGET.float() + 0.5, W)


def test_distdw_weights_and_ema():
    # P = 1000 / [1000, 100, 10, 1] = [1, 10, 100, 1000]; ln P = [0, 1, 2, 3] ln 10; w = 4 ln P / (3 ln 10)
    assert distribution_weights([1000, 100, 10, 1]).tolist() == pytest.approx([0, 4 / 3, 8 / 3, 4], abs=1e-6)
    # absent class: P_3 = (1000 + 1e-8) / 1e-8 = 1e11 + 1, ln = 25.32844
    #   -> w = 4 [0, 2.302585, 4.605170, 25.32844] / 25.32844
    assert distribution_weights([1000, 100, 10, 0]).tolist() == pytest.approx([0, 0.363636, 0.727273, 4], abs=1e-5)
    dist = DistDW(4)  # m = 0.99
    with pytest.raises(RuntimeError, match="init_weights"):
        dist.update_counts([1, 2, 3, 4])
    assert dist.init_weights([1000, 100, 10, 1]).tolist() == pytest.approx([0, 4 / 3, 8 / 3, 4], abs=1e-6)
    # counts reversed -> w_cur = [4, 8/3, 4/3, 0];  .99 [0, 4/3, 8/3, 4] + .01 [4, 8/3, 4/3, 0]
    #   = [.04, 1.32 + .026667, 2.64 + .013333, 3.96] = [.04, 1.346667, 2.653333, 3.96]
    expected = [0.04, 1.346667, 2.653333, 3.96]
    assert dist.update_counts([1, 10, 100, 1000]).tolist() == pytest.approx(expected, abs=1e-5)
    assert dist.get_weights().tolist() == pytest.approx(expected, abs=1e-5)


def test_distdw_update_from_logits_and_degenerate_counts(caplog):
    dist = DistDW(3, momentum=0.0)  # m = 0: the new weights are w_cur alone
    dist.init_weights(class_counts(np.array([0, 0, 1, 2]), 3))  # counts [2, 1, 1]
    # arg-max of LOGITS: [0, 1, 2, 2] -> counts [1, 1, 2]: P = [2, 2, 1], w = 3 ln P / ln 2 = [3, 3, 0]
    assert dist.update(LOGITS).tolist() == pytest.approx([3, 3, 0], abs=1e-6)
    # all counts equal: 0/0 weights -> update skipped, weights kept
    with caplog.at_level(logging.WARNING, logger="common.losses.debiased_weighting"):
        assert dist.update_counts([5, 5, 5]).tolist() == pytest.approx([3, 3, 0], abs=1e-6)
    assert "weights left unchanged" in caplog.text
    with pytest.raises(ValueError, match="all class counts are equal"):
        distribution_weights([2, 2])
    with pytest.raises(ValueError, match="counts must be 3 values"):
        dist.update_counts([1, 2])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        class_counts(torch.tensor([0, 3]), 3)


def test_diffdw_worked_example():
    diff = DiffDW(3)  # K = 50, beta = .98
    assert diff.get_weights().tolist() == [3.0, 3.0, 3.0]  # placeholder C 1
    # Step 1, d_0 = 1e-8, d_1 = [.9, .5, .1]: all Delta > 0, learn = d ln(d / 1e-8):
    #   .9 ln 9e7 = .9 * 18.3153 = 16.4838;  .5 ln 5e7 = 8.8638;  .1 ln 1e7 = 1.6118
    #   L = .02 learn = [.329676, .177275, .032236];  U = 0;  D = (1e-8 / L) ** .2 (common factor (1e-8) ** .2)
    #   L ** -.2 = [1.2485, 1.4134, 1.9876];  V = .98 + .02 (1 - d) = [.982, .99, .998]
    #   w~ ~ [1.2260, 1.3993, 1.9836] -> w = 3 w~ / 1.9836 = [1.8542, 2.1162, 3.0]
    assert diff.update_dice([0.9, 0.5, 0.1]).tolist() == pytest.approx([1.854, 2.116, 3.0], abs=1e-3)
    # Step 2, d_2 = [.95, .4, .2]: Delta = [.05, -.1, .1], r = [ln(.95/.9), ln .8, ln 2] = [.054067, -.223144, .693147]
    #   learn = [.0027033, 0, .069315], unlearn = [0, .0223144, 0]
    #   L = .98 L + .02 learn = [.323136, .173730, .032978];  U = [0, .00044629, 0]
    #   D = ((U + 1e-8) / (L + 1e-8)) ** .2 = [(3.0947e-8) ** .2, (2.5689e-3) ** .2, (3.0324e-7) ** .2]
    #     = [.031486, .303354, .049700];  V = .98 V + .02 (1 - d) = [.96336, .9822, .99404]
    #   w~ = [.030333, .297958, .049404] -> w = 3 w~ / .297958 = [.3054, 3.0, .4974]
    assert diff.update_dice([0.95, 0.4, 0.2]).tolist() == pytest.approx([0.305, 3.0, 0.497], abs=1e-3)


def test_diffdw_update_from_logits():
    diff = DiffDW(3)
    # arg-max [0, 1 | 2, 2] vs TARGET [0, 1 | 2, 2] except v3 relabelled 0:
    #   c=0: TP 1, FN 1 -> (2 + 1e-8) / (3 + 2e-8) = 2/3;  c=1: 1;  c=2: TP 1, FP 1 -> 2/3
    # first step: learn = d ln(d / 1e-8) = [.666667 * 18.0152, 1 * 18.4207, .666667 * 18.0152]
    #   = [12.0101, 18.4207, 12.0101]
    #   L ** -.2 ratio: class 1 / class 0 = (12.0101 / 18.4207) ** .2 = .918012
    #   V = .98 + .02 (1 - d) = [.986667, .98, .986667]
    #   w~ ∝ [.986667, .918012 * .98 = .899652, .986667] -> w = [3, 3 * .899652 / .986667 = 2.735429, 3]
    target = torch.tensor([0, 1, 2, 0]).reshape(2, 1, 2)
    assert diff.update(LOGITS, target).tolist() == pytest.approx([3.0, 2.735429, 3.0], abs=1e-4)
    assert diff.last_dice.tolist() == pytest.approx([2 / 3, 1.0, 2 / 3], rel=1e-6)
    with pytest.raises(ValueError, match="values in"):
        diff.update_dice([0.0, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"logits must be \[B, 3"):
        diff.update(torch.zeros(1, 4, 2, 2), torch.zeros(1, 2, 2))


def _fresh(kind):
    if kind == "diff":
        return DiffDW(3)
    dist = DistDW(3)
    dist.init_weights([1000, 100, 10])
    return dist


def _step(module, i):
    if isinstance(module, DiffDW):
        return module.update_dice([0.9 - 0.1 * i, 0.5 + 0.1 * i, 0.2])
    return module.update_counts([100, 10 + 5 * i, 1 + i])


@pytest.mark.parametrize("kind", ["diff", "dist"])
def test_state_dict_round_trip(kind):
    module = _fresh(kind)
    for i in range(3):
        _step(module, i)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    restored = _fresh(kind)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.get_weights(), module.get_weights())
    # the next update continues identically (all state restored, not only the weights) ...
    expected = _step(module, 3)
    assert torch.equal(_step(restored, 3), expected)
    # ... and differs from the same update on a module without that history
    assert not torch.allclose(_step(_fresh(kind), 3), expected)
