"""Polyp protocols (a)-(c) of specs/endoked.md §5.1 against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from common.metrics.polyp import (
    PolypDiceMetric,
    hd95,
    normalise_ground_truth,
    polyp_measures,
    prepare_probability,
)


def test_prepare_probability_min_max_by_hand():
    # sigmoid(0) = 0.5, sigmoid(ln 3) = 0.75 -> min-max: (0.5-0.5)/(0.25+1e-8) = 0, (0.75-0.5)/(0.25+1e-8) = 1 - 4e-8
    r = prepare_probability(torch.tensor([[0.0, math.log(3)]]), (1, 2))
    assert r.shape == (1, 2)
    assert r[0, 0].item() == 0.0 and r[0, 1].item() == pytest.approx(1.0, abs=1e-6)
    # a constant map has max == min: (r - min) / 1e-8 = 0 everywhere
    assert prepare_probability(torch.full((1, 1, 3, 3), 2.0), (6, 6)).abs().max().item() == 0.0


def test_prepare_probability_resizes_bilinear_to_native_size():
    # 1x2 logits [-1, 1] resized to 1x4 with align_corners=False: source x = (i + 0.5) / 2 - 0.5
    # -> -0.25, 0.25, 0.75, 1.25 -> clamped to [0, 1] -> logits -1, -0.5, 0.5, 1; monotone after sigmoid/min-max
    r = prepare_probability(torch.tensor([[-1.0, 1.0]]), (1, 4))[0].numpy()
    s = 1 / (1 + np.exp(-np.array([-1.0, -0.5, 0.5, 1.0])))
    np.testing.assert_allclose(r, (s - s.min()) / (s.max() - s.min() + 1e-8), rtol=1e-5)


def test_measures_on_a_4x4_case_by_hand():
    gt = np.zeros((4, 4))
    gt[:2, :2] = 255  # G: 4 pixels; divided by its max -> 1
    prob = np.zeros((4, 4))
    prob[0, 0] = prob[0, 1] = prob[1, 0] = 0.9  # 3 of G
    prob[3, 3] = 0.6  # 1 false positive;  P = 4 pixels, |P∩G| = 3, |P∪G| = 5
    m = polyp_measures(prob, gt, saliency=False)
    assert m["dice"] == 0.7778  # (2*3 + 1) / (4 + 4 + 1) = 7/9 = 0.77777... -> 4 decimals
    assert m["iou"] == pytest.approx(4 / 6)  # (3 + 1) / (5 + 1)
    assert m["f1"] == pytest.approx(0.75)  # 2*3 / (2*3 + 1 + 1)
    assert m["jaccard"] == pytest.approx(0.6)  # 3 / (3 + 1 + 1)
    assert m["precision"] == pytest.approx(0.75) and m["recall"] == pytest.approx(0.75)
    # soft Dice (a): sum r g = 2.7, sum r = 3.3, sum g = 4 -> (5.4 + 1) / (3.3 + 4 + 1) = 6.4 / 8.3
    assert m["soft_dice"] == pytest.approx(6.4 / 8.3)


def test_empty_prediction_and_empty_ground_truth():
    m = polyp_measures(np.zeros((5, 5)), np.zeros((5, 5)), saliency=False)
    assert m["dice"] == 1.0  # (0 + 1) / (0 + 0 + 1): smoothed Dice of protocol (b)
    assert m["f1"] == 0.0 and m["jaccard"] == 0.0  # scikit-learn zero_division=0: empty P and G score 0 in (c)
    assert m["precision"] == 0.0 and m["recall"] == 0.0
    assert math.isnan(m["hd95"])
    gt = np.zeros((5, 5))
    gt[2, 2] = 1
    assert polyp_measures(np.zeros((5, 5)), gt, saliency=False)["dice"] == 0.5  # (0 + 1) / (0 + 1 + 1)


def test_hd95_by_hand():
    # single pixels 3 columns apart: every surface distance is 3
    a, b = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    a[2, 0], b[2, 3] = True, True
    assert hd95(a, b) == 3.0
    # 3x3 squares shifted by one column: the 8 boundary pixels of each square are at distance 0 (four of them)
    # or 1 (four) from the other boundary, in both directions -> 16 pooled values, eight 0 and eight 1;
    # numpy's 95th percentile sits at index 0.95 * 15 = 14.25, between two 1s -> 1.0
    a, b = np.zeros((5, 5), bool), np.zeros((5, 5), bool)
    a[1:4, 1:4], b[1:4, 2:5] = True, True
    assert hd95(a, b) == 1.0
    # the same squares with 2 mm pixels along columns: the 1-pixel offsets become 2 mm
    assert hd95(a, b, spacing=(1.0, 2.0)) == 2.0
    assert math.isnan(hd95(np.zeros((3, 3), bool), b[:3, :3]))


def test_ground_truth_is_divided_by_its_max():
    np.testing.assert_allclose(normalise_ground_truth(np.array([[0, 128], [255, 0]])), [[0, 128 / 255], [1, 0]])
    with pytest.raises(ValueError, match="2-D"):
        normalise_ground_truth(np.zeros((2, 3, 3)))


def test_dice_metric_for_engines():
    # image 1: logits +10 on G and -10 elsewhere -> P = G -> Dice 1
    # image 2: constant logits -> min-max gives 0 everywhere -> P empty, |G| = 4 -> Dice (0+1)/(0+4+1) = 0.2
    gt = torch.zeros(1, 1, 4, 4)
    gt[..., :2, :2] = 255
    good = torch.where(gt > 0, 10.0, -10.0)
    flat = torch.zeros(1, 1, 4, 4)
    metric = PolypDiceMetric()
    metric([good[0], flat[0]], [gt[0], gt[0]])  # decollated lists, as the engines pass them
    assert metric.aggregate().item() == pytest.approx((1.0 + 0.2) / 2)
    metric.reset()
    with pytest.raises(ValueError, match="no image"):
        metric.aggregate()


def test_dice_metric_evaluates_at_native_size():
    # logits at 2x2 (network size), mask at 4x4 (native size): bilinear upsampling of [[10, -10], [-10, -10]]
    # gives a positive region in the top-left; a mask equal to the thresholded upsampled map scores Dice 1.
    logits = torch.tensor([[[[10.0, -10.0], [-10.0, -10.0]]]])
    r = prepare_probability(logits, (4, 4))
    gt = (r >= 0.5).float()[None, None] * 255
    metric = PolypDiceMetric()
    metric(logits, gt)
    assert metric.aggregate().item() == 1.0
