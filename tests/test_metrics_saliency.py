"""Tests for common.metrics.saliency (MAE, S-measure, weighted F-measure, E-measure).

Expected values are worked out by hand on tiny arrays; the arithmetic is in the comments. The slow references at
the bottom re-derive the measures from their definitions with explicit loops (tests only, arrays <= 16x16).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.metrics.saliency import (
    adaptive_e_measure,
    e_measure_curve,
    mae,
    mean_e_measure,
    s_measure,
    saliency_measures,
    weighted_f_measure,
)

EPS = 2.0**-52  # MATLAB eps


def _disc(size: int = 16, radius: float = 4.5, centre: tuple[float, float] = (7.0, 8.0)) -> np.ndarray:
    rows, cols = np.mgrid[:size, :size]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


# ----------------------------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "func", [mae, s_measure, weighted_f_measure, e_measure_curve, mean_e_measure, adaptive_e_measure, saliency_measures]
)
def test_validation(func):
    gt = np.zeros((4, 4), bool)
    gt[1:3, 1:3] = True
    pred = np.full((4, 4), 0.5)
    with pytest.raises(ValueError, match="same shape"):
        func(pred, gt[:3])
    with pytest.raises(ValueError, match="2-D"):
        func(pred[None], gt[None])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        func(pred * 3, gt)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        func(pred - 0.6, gt)
    with pytest.raises(ValueError, match="NaN"):
        func(np.where(gt, np.nan, pred), gt)
    with pytest.raises(ValueError, match="gt must be boolean"):
        func(pred, gt.astype(np.uint8) * 255)  # a 0/255 mask must be binarised first
    # float error just outside [0, 1] and a {0., 1.} float mask are accepted
    func(np.where(gt, 1.0 + 1e-9, -1e-9), gt.astype(np.float32))


def test_parameter_validation():
    gt = np.eye(3, dtype=bool)
    pred = np.full((3, 3), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        s_measure(pred, gt, alpha=1.5)
    with pytest.raises(ValueError, match="beta2"):
        weighted_f_measure(pred, gt, beta2=-1.0)


# ----------------------------------------------------------------------------------------------------------------
# MAE
# ----------------------------------------------------------------------------------------------------------------


def test_mae_hand():
    pred = np.array([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6], [0.7, 0.8, 0.9]])
    gt = np.array([[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    # |pred - gt| = 0.9 0.8 0.7 / 0.4 0.5 0.6 / 0.7 0.8 0.9 -> sum 6.3 -> / 9 = 0.7
    assert mae(pred, gt) == pytest.approx(0.7, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# S-measure
# ----------------------------------------------------------------------------------------------------------------


def test_s_measure_hand_4x4():
    gt = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    pred = np.zeros((4, 4))
    pred[0, 0] = pred[0, 1] = 1.0
    pred[1, 0] = 0.5
    # Object term: mu = 3/16.
    #   fg scores [1, 1, 0.5]: mean 5/6, sample std sqrt((1/36 + 1/36 + 1/9) / 2) = sqrt(1/12)
    #   O_fg = 2 * 5/6 / ((5/6)^2 + 1 + sqrt(1/12))
    #   bg: 1 - pred = 1 on all 13 bg pixels: mean 1, std 0 -> O_bg = 2 / (1 + 1) = 1
    o_fg = (5 / 3) / (25 / 36 + 1 + math.sqrt(1 / 12))
    s_o = 3 / 16 * o_fg + 13 / 16 * 1.0
    # Region term: 1-based fg coordinates (1,1), (1,2), (2,1): mean row = mean col = 4/3 -> X = Y = 1.
    #   LT = pixel (0,0): single pixel, zero variance -> a = b = 0 -> Q = 1,               w = 1*1/16
    #   RT = row 0, cols 1..3: pred [1,0,0] == gt [1,0,0]: x = y = 1/3, var = cov = 1/3,
    #        a = 4 (1/9)(1/3) = 4/27 = b -> Q = 1,                                          w = 3*1/16
    #   LB = rows 1..3, col 0: pred [.5,0,0], gt [1,0,0]: x = 1/6, y = 1/3,
    #        var_x = (1/9 + 2/36) / 2 = 1/12, var_y = 1/3, cov = (2/9 + 2/18) / 2 = 1/6,
    #        a = 4 (1/6)(1/3)(1/6) = 1/27, b = (1/36 + 1/9)(1/12 + 1/3) = 25/432 -> Q = 16/25, w = 1*3/16
    #   RB = rows 1..3, cols 1..3: all zero in both -> a = b = 0 -> Q = 1,                  w = 9/16
    s_r = (1 + 3 + 3 * 16 / 25 + 9) / 16  # = 0.9325
    expected = 0.5 * s_o + 0.5 * s_r  # ~= 0.951290
    assert s_measure(pred, gt) == pytest.approx(expected, abs=1e-12)
    # alpha weights the two terms
    assert s_measure(pred, gt, alpha=1.0) == pytest.approx(s_o, abs=1e-12)
    assert s_measure(pred, gt, alpha=0.0) == pytest.approx(s_r, abs=1e-12)


def test_s_measure_centroid_rounds_half_away_from_zero():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = 0.5 * gt
    # Object: fg all 0.5 -> O_fg = 1 / (0.25 + 1) = 0.8; bg 1 - 0 = 1 -> O_bg = 1; mu = 1/4 -> S_o = 0.2 + 0.75 = 0.95
    # Centroid: 1-based mean col = mean row = 1.5 -> MATLAB round -> X = Y = 2, quadrants follow the block edges:
    #   LT: pred const 0.5, gt const 1 -> a = b = 0 -> 1; the three others are all zero -> 1.  S_r = 1.
    # S = 0.5 * 0.95 + 0.5 * 1 = 0.975.  (Half-to-even rounding of the 0-based mean 0.5 would give X = Y = 1 and
    # S_r = 1/16 + 2 * 3/16 * 0.64 + 9/16 * 0.64 = 0.6625, i.e. S = 0.80625.)
    assert s_measure(pred, gt) == pytest.approx(0.975, abs=1e-12)


def test_s_measure_centroid_on_last_column_is_finite():
    gt = np.zeros((3, 3), bool)
    gt[:, 2] = True
    # Centroid X = 3 = width, Y = 2: the right quadrants are empty (weight 0); the toolbox would give NaN.
    # Perfect prediction: S_o = 1 (O = 2 / (1 + 1) on both sides); LT (rows 1-2) and LB (row 3) both have
    # pred == gt = [0, 0, 1] per row -> Q = 1; S_r = 6/9 + 3/9 = 1 -> S = 1.
    assert s_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-12)


def test_s_measure_special_cases():
    pred = np.array([[0.0, 0.2], [0.4, 0.6]])  # mean 0.3
    # no foreground: S = 1 - mean(pred) = 0.7; all foreground: S = mean(pred) = 0.3
    assert s_measure(pred, np.zeros((2, 2), bool)) == pytest.approx(0.7, abs=1e-12)
    assert s_measure(pred, np.ones((2, 2), bool)) == pytest.approx(0.3, abs=1e-12)


def test_s_measure_perfect_and_inverted():
    gt = _disc()
    assert s_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-12)
    # inverted: O_fg = O_bg = 0 (mean 0), so S <= (1 - alpha) * S_r <= 0.5; mixed quadrants have negative Q
    assert s_measure(1.0 - gt, gt) < 0.5


# ----------------------------------------------------------------------------------------------------------------
# Weighted F-measure
# ----------------------------------------------------------------------------------------------------------------


def test_weighted_f_perfect_and_empty_gt():
    gt = _disc()
    # E = 0 everywhere -> Ew = 0, TPw = |G|, FPw = 0, R = 1, P = |G| / (|G| + eps) -> F = 2P / (1 + P) = 1 - O(eps)
    assert weighted_f_measure(gt.astype(float), gt) == pytest.approx(1.0, abs=1e-12)
    # gt without foreground -> 0 by convention
    assert weighted_f_measure(np.zeros((5, 5)), np.zeros((5, 5), bool)) == 0.0
    assert weighted_f_measure(np.full((5, 5), 0.3), np.zeros((5, 5), bool)) == 0.0


def test_weighted_f_half_confident_centre_pixel():
    gt = np.zeros((7, 7), bool)
    gt[3, 3] = True
    pred = 0.5 * gt
    # E = 0.5 at the centre, 0 elsewhere. Every bg pixel's nearest fg pixel is the centre -> Et = 0.5 everywhere.
    # The 7x7 kernel centred at (3,3) lies inside the image -> EA(centre) = 0.5 * sum(K) = 0.5 -> min(E, EA) = 0.5.
    # Ew = 0.5 at the centre, 0 on bg. TPw = 1 - 0.5 = 0.5, FPw = 0, R = 1 - 0.5 = 0.5, P = 0.5 / 0.5 = 1,
    # F = 2 * 0.5 * 1 / (0.5 + 1) = 2/3.
    assert weighted_f_measure(pred, gt) == pytest.approx(2 / 3, abs=1e-12)


def test_weighted_f_zero_padding_of_gaussian():
    gt = np.zeros((3, 3), bool)
    gt[1, 1] = True
    pred = 0.5 * gt
    # As above Et = 0.5 on the whole 3x3 image, but the zero padding keeps only the central 3x3 of the 7x7 kernel:
    # g(x) = exp(-x^2 / 50): g(0) = 1, g(1) = 0.980199, g(2) = 0.923116, g(3) = 0.835270.
    # K = g(x) g(y) / (sum_{|x|<=3} g)^2, so the kept mass is S3 = (sum_{|x|<=1} g / sum_{|x|<=3} g)^2
    # = (2.960397 / 6.477170)^2 = 0.208897, EA(centre) = 0.5 * S3 = 0.104449 < E = 0.5 -> Ew(centre) = 0.104449.
    # TPw = 1 - 0.104449, FPw = 0 -> P = 1, R = 1 - 0.104449 = 0.895551, F = 2R / (R + 1) = 0.944891.
    g = [math.exp(-x * x / 50) for x in range(4)]
    s3 = ((g[0] + 2 * g[1]) / (g[0] + 2 * (g[1] + g[2] + g[3]))) ** 2
    recall = 1 - 0.5 * s3
    assert weighted_f_measure(pred, gt) == pytest.approx(2 * recall / (recall + 1), abs=1e-12)


def test_weighted_f_perfect_foreground_grey_background():
    gt = np.zeros((3, 3), bool)
    gt[1, 1] = True
    pred = np.where(gt, 1.0, 0.5)
    # E = 0 at the centre, 0.5 on bg; Et copies the centre's E (0) to bg -> Et = 0 -> EA = 0 -> Ew(centre) = 0.
    # Bg importance B(d) = 2 - 0.5^(d/5): 4 edge neighbours at d = 1, 4 corners at d = sqrt(2).
    # FPw = 0.5 * (4 (2 - 0.5^0.2) + 4 (2 - 0.5^(sqrt(2)/5))) = 0.5 * (4 * 1.129449 + 4 * 1.178031) = 4.614960
    # TPw = 1, R = 1, P = 1 / (1 + 4.614960) = 0.178096, F_b2 = (1 + b2) P / (1 + b2 P)
    fp_w = 0.5 * (4 * (2 - 0.5**0.2) + 4 * (2 - 0.5 ** (math.sqrt(2) / 5)))
    precision = 1 / (1 + fp_w)
    assert weighted_f_measure(pred, gt) == pytest.approx(2 * precision / (1 + precision), abs=1e-12)  # 0.302346
    assert weighted_f_measure(pred, gt, beta2=0.3) == pytest.approx(
        1.3 * precision / (1 + 0.3 * precision), abs=1e-12
    )


def test_weighted_f_all_zero_and_inverted_prediction():
    gt = np.zeros((7, 7), bool)
    gt[3, 3] = True
    # All-zero prediction: E = 1 at the centre, 0 on bg; Et = 1 everywhere; full kernel inside -> EA = 1 = E,
    # so Ew(centre) = 1 -> TPw = 1 - 1 = 0 -> P = 0 -> F = 0 (up to rounding of sum(K)).
    assert weighted_f_measure(np.zeros((7, 7)), gt) == pytest.approx(0.0, abs=1e-12)
    disc = _disc()
    assert weighted_f_measure(1.0 - disc, disc) < 0.1


# ----------------------------------------------------------------------------------------------------------------
# E-measure
# ----------------------------------------------------------------------------------------------------------------

# 2x2 example: gt has one fg pixel; pred levels floor(255 p) = 255, 127, 63, 0.
_E_GT = np.array([[1, 0], [0, 0]], bool)
_E_PRED = np.array([[1.0, 0.5], [0.25, 0.0]])
# N = 4, mean(G) = 1/4, phi_G = 3/4 on fg, -1/4 on bg; score = sum(enhanced) / (N - 1) = sum / 3.
# t = 0: F all ones, phi_F = 0 -> xi = 0 -> enhanced = 1/4 per pixel -> sum 1.
_E_T0 = 1 / 3
# t = 1..63: F = [[1,1],[1,0]], mean 3/4, phi_F = 1/4 | -3/4.
#   F1G1: xi = 2 (3/4)(1/4) / (9/16 + 1/16) = 0.6 -> (1.6)^2 / 4 = 0.64
#   F1G0 (x2): xi = 2 (-1/4)(1/4) / (1/16 + 1/16) = -1 -> 0
#   F0G0: xi = 2 (-1/4)(-3/4) / (1/16 + 9/16) = 0.6 -> 0.64          sum 1.28
_E_T63 = 1.28 / 3
# t = 64..127: F = [[1,1],[0,0]], mean 1/2, phi_F = 1/2 | -1/2.
#   F1G1: xi = 2 (3/4)(1/2) / (9/16 + 1/4) = 12/13 -> (25/13)^2 / 4 = 625/676
#   F1G0: xi = 2 (-1/4)(1/2) / (1/16 + 1/4) = -0.8 -> 0.2^2 / 4 = 0.01
#   F0G0 (x2): xi = 2 (-1/4)(-1/2) / (1/16 + 1/4) = 0.8 -> 1.8^2 / 4 = 0.81  sum 625/676 + 1.63
_E_T127 = (625 / 676 + 0.01 + 2 * 0.81) / 3  # ~= 0.851519
# t = 128..255: F == G -> xi = 1 (up to eps) -> enhanced = 1 -> sum 4
_E_T255 = 4 / 3


def test_e_measure_curve_hand():
    curve = e_measure_curve(_E_PRED, _E_GT)
    assert curve.shape == (256,)
    expected = np.empty(256)
    expected[0] = _E_T0
    expected[1:64] = _E_T63
    expected[64:128] = _E_T127  # pred 0.5 -> level 127 is still selected at t = 127 (q >= t), not at t = 128
    expected[128:] = _E_T255
    np.testing.assert_allclose(curve, expected, rtol=0, atol=1e-12)
    # mean over the 256 thresholds: (1 * T0 + 63 * T63 + 64 * T127 + 128 * T255) / 256
    expected_mean = (_E_T0 + 63 * _E_T63 + 64 * _E_T127 + 128 * _E_T255) / 256
    assert mean_e_measure(_E_PRED, _E_GT) == pytest.approx(expected_mean, abs=1e-12)


def test_e_measure_special_cases():
    # gt all background: score = (number of predicted-background pixels) / (N - 1)
    curve = e_measure_curve(_E_PRED, np.zeros((2, 2), bool))
    # t = 0: 0 bg px; t = 1..63: 1; t = 64..127: 2; t >= 128: 3 -> / 3
    assert curve[0] == pytest.approx(0.0, abs=1e-12)
    assert curve[1] == pytest.approx(1 / 3, abs=1e-12)
    assert curve[100] == pytest.approx(2 / 3, abs=1e-12)
    assert curve[255] == pytest.approx(1.0, abs=1e-12)
    # gt all foreground: score = (number of predicted-foreground pixels) / (N - 1): 4/3, 1, 2/3, 1/3
    curve = e_measure_curve(_E_PRED, np.ones((2, 2), bool))
    np.testing.assert_allclose(curve[[0, 63, 64, 128]], [4 / 3, 1.0, 2 / 3, 1 / 3], rtol=0, atol=1e-12)


def test_e_measure_perfect_and_inverted():
    gt = _disc()
    n = gt.size
    # Perfect binary prediction: t = 0 selects every pixel (1/4 per pixel -> (N/4) / (N - 1)), t = 1..255 give the
    # perfect map (N / (N - 1)) -> mean = (N/4 + 255 N) / (256 (N - 1)) ~= 0.9971 for N = 256.
    perfect = gt.astype(float)
    assert mean_e_measure(perfect, gt) == pytest.approx((n / 4 + 255 * n) / (256 * (n - 1)), abs=1e-12)
    # adaptive threshold 2 mean(gt) < 1 selects exactly the fg -> N / (N - 1)
    assert adaptive_e_measure(perfect, gt) == pytest.approx(n / (n - 1), abs=1e-12)
    assert mean_e_measure(1.0 - perfect, gt) < 0.3


def test_adaptive_e_measure_hand():
    # mean(pred) = 1.75 / 4 = 0.4375 -> threshold 0.875 -> F = [[1,0],[0,0]] == G -> 4 / 3
    assert adaptive_e_measure(_E_PRED, _E_GT) == pytest.approx(4 / 3, abs=1e-12)
    # mean 0.6 -> 2 mean = 1.2 capped at 1 -> only the pixel equal to 1 is selected
    pred = np.array([[1.0, 0.9], [0.5, 0.0]])  # mean 0.6
    assert adaptive_e_measure(pred, _E_GT) == pytest.approx(4 / 3, abs=1e-12)
    # threshold 2 * 0.25 = 0.5 selects pred >= 0.5 -> [[1,1],[0,0]] -> the t = 64..127 value above
    pred = np.array([[0.5, 0.5], [0.0, 0.0]])
    assert adaptive_e_measure(pred, _E_GT) == pytest.approx(_E_T127, abs=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Aggregate
# ----------------------------------------------------------------------------------------------------------------


def test_saliency_measures_perfect_and_inverted():
    gt = _disc()
    n = gt.size
    perfect = saliency_measures(gt.astype(float), gt)
    assert set(perfect) == {"s_measure", "weighted_f", "mean_e", "mae"}
    assert perfect["s_measure"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["weighted_f"] == pytest.approx(1.0, abs=1e-12)
    assert perfect["mean_e"] == pytest.approx((n / 4 + 255 * n) / (256 * (n - 1)), abs=1e-12)
    assert perfect["mae"] == 0.0
    inverted = saliency_measures(1.0 - gt, gt)
    assert inverted["mae"] == 1.0
    assert inverted["s_measure"] < 0.5 and inverted["weighted_f"] < 0.1 and inverted["mean_e"] < 0.3


def test_saliency_measures_matches_individual_functions():
    rng = np.random.default_rng(3)
    gt = _disc(12, 3.5, (5.0, 6.0))
    pred = np.clip(0.6 * gt + 0.5 * rng.random(gt.shape), 0, 1)
    out = saliency_measures(pred, gt)
    assert out["s_measure"] == s_measure(pred, gt)
    assert out["weighted_f"] == weighted_f_measure(pred, gt)
    assert out["mean_e"] == mean_e_measure(pred, gt)
    assert out["mae"] == mae(pred, gt)


# ----------------------------------------------------------------------------------------------------------------
# Slow references with explicit loops (small random cases)
# ----------------------------------------------------------------------------------------------------------------


def _slow_s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
    h, w = gt.shape
    n_fg = sum(1 for i in range(h) for j in range(w) if gt[i, j])
    if n_fg == 0:
        return 1.0 - pred.sum() / (h * w)
    if n_fg == h * w:
        return pred.sum() / (h * w)

    def obj(values):
        m = sum(values) / len(values)
        s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
        return 2 * m / (m * m + 1 + s + EPS)

    fg = [pred[i, j] for i in range(h) for j in range(w) if gt[i, j]]
    bg = [1 - pred[i, j] for i in range(h) for j in range(w) if not gt[i, j]]
    mu = n_fg / (h * w)
    s_o = mu * obj(fg) + (1 - mu) * obj(bg)

    x = int(sum(j + 1 for i in range(h) for j in range(w) if gt[i, j]) / n_fg + 0.5)  # MATLAB round, 1-based
    y = int(sum(i + 1 for i in range(h) for j in range(w) if gt[i, j]) / n_fg + 0.5)

    def ssim(rows, cols):
        ps = [pred[i, j] for i in rows for j in cols]
        gs = [float(gt[i, j]) for i in rows for j in cols]
        n = len(ps)
        mx, my = sum(ps) / n, sum(gs) / n
        vx = sum((p - mx) ** 2 for p in ps) / (n - 1 + EPS)
        vy = sum((g - my) ** 2 for g in gs) / (n - 1 + EPS)
        cxy = sum((p - mx) * (g - my) for p, g in zip(ps, gs)) / (n - 1 + EPS)
        a = 4 * mx * my * cxy
        b = (mx * mx + my * my) * (vx + vy)
        return a / (b + EPS) if a != 0 else (1.0 if b == 0 else 0.0)

    s_r = 0.0
    for rows in (range(0, y), range(y, h)):
        for cols in (range(0, x), range(x, w)):
            if len(rows) and len(cols):
                s_r += len(rows) * len(cols) / (h * w) * ssim(rows, cols)
    return max(alpha * s_o + (1 - alpha) * s_r, 0.0)


def _slow_weighted_f(pred: np.ndarray, gt: np.ndarray) -> float:
    h, w = gt.shape
    fg = [(i, j) for i in range(h) for j in range(w) if gt[i, j]]
    err = np.abs(pred - gt)
    dist = np.zeros((h, w))
    err_t = err.copy()
    for i in range(h):
        for j in range(w):
            if not gt[i, j]:
                d, (fi, fj) = min((math.hypot(i - a, j - b), (a, b)) for a, b in fg)
                dist[i, j], err_t[i, j] = d, err[fi, fj]
    g = [math.exp(-(k * k) / 50) for k in range(-3, 4)]
    total = sum(g) ** 2
    err_a = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            for di in range(-3, 4):
                for dj in range(-3, 4):
                    if 0 <= i + di < h and 0 <= j + dj < w:
                        err_a[i, j] += g[di + 3] * g[dj + 3] / total * err_t[i + di, j + dj]
    tp_w, fp_w, ew_fg = float(len(fg)), 0.0, 0.0
    for i in range(h):
        for j in range(w):
            if gt[i, j]:
                ew = min(err[i, j], err_a[i, j])
                tp_w -= ew
                ew_fg += ew
            else:
                fp_w += err[i, j] * (2 - 0.5 ** (dist[i, j] / 5))
    recall = 1 - ew_fg / len(fg)
    precision = tp_w / (EPS + tp_w + fp_w)
    return 2 * recall * precision / (EPS + recall + precision)


def _slow_e_curve(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    h, w = gt.shape
    n = h * w
    levels = [[math.floor(255 * pred[i, j]) for j in range(w)] for i in range(h)]
    g = gt.astype(float)
    curve = np.empty(256)
    for t in range(256):
        f = np.array([[1.0 if levels[i][j] >= t else 0.0 for j in range(w)] for i in range(h)])
        if g.sum() == 0:
            enhanced = 1 - f
        elif g.sum() == n:
            enhanced = f
        else:
            pf, pg = f - f.mean(), g - g.mean()
            enhanced = np.zeros((h, w))
            for i in range(h):
                for j in range(w):
                    xi = 2 * pg[i, j] * pf[i, j] / (pg[i, j] ** 2 + pf[i, j] ** 2 + EPS)
                    enhanced[i, j] = (xi + 1) ** 2 / 4
        curve[t] = enhanced.sum() / (n - 1 + EPS)
    return curve


def _random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(5, 13, size=2)
    gt = np.zeros((h, w), bool)  # a rectangle: every bg pixel has a unique nearest fg pixel
    r0, c0 = rng.integers(0, h - 1), rng.integers(0, w - 1)
    gt[r0 : r0 + rng.integers(1, h - r0 + 1), c0 : c0 + rng.integers(1, w - c0 + 1)] = True
    pred = np.clip(0.5 * gt + 0.7 * rng.random((h, w)), 0, 1)
    pred = (pred - pred.min()) / (pred.max() - pred.min())
    return pred, gt


@pytest.mark.parametrize("seed", range(4))
def test_against_slow_references(seed):
    pred, gt = _random_case(seed)
    assert s_measure(pred, gt) == pytest.approx(_slow_s_measure(pred, gt), abs=1e-10)
    assert weighted_f_measure(pred, gt) == pytest.approx(_slow_weighted_f(pred, gt), abs=1e-10)
    np.testing.assert_allclose(e_measure_curve(pred, gt), _slow_e_curve(pred, gt), rtol=0, atol=1e-10)


def test_s_and_e_against_slow_references_irregular_gt():
    rng = np.random.default_rng(7)
    gt = rng.random((9, 11)) < 0.4
    pred = rng.random((9, 11))
    pred = (pred - pred.min()) / (pred.max() - pred.min())
    assert s_measure(pred, gt) == pytest.approx(_slow_s_measure(pred, gt), abs=1e-10)
    np.testing.assert_allclose(e_measure_curve(pred, gt), _slow_e_curve(pred, gt), rtol=0, atol=1e-10)
