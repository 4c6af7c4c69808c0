"""Saliency-style measures of the polyp-segmentation literature (PraNet, Polyp-PVT, ...).

These are the per-image measures of the evaluation toolbox of Fan et al. (the MATLAB ``Eval`` code shipped with
PraNet, and its Python port PySODMetrics), re-implemented in numpy from the papers' equations:

* :func:`mae` -- mean absolute error.
* :func:`s_measure` -- Structure-measure S_alpha (Fan et al., ICCV 2017).
* :func:`weighted_f_measure` -- weighted F-measure F^w_beta (Margolin et al., CVPR 2014).
* :func:`e_measure_curve`, :func:`mean_e_measure`, :func:`adaptive_e_measure` -- Enhanced-alignment measure
  E_phi (Fan et al., IJCAI 2018).
* :func:`saliency_measures` -- the four numbers a polyp paper reports, in one dict.

Input conventions, shared by every function:

* ``pred``: float array of shape (H, W) with values in [0, 1] -- a probability map, already min-max normalised by
  the caller (the toolbox applies ``mapminmax`` before scoring). Values up to ``1e-6`` outside [0, 1] are accepted
  as float error and clipped.
* ``gt``: array of shape (H, W), either ``bool`` or numeric with values in {0, 1} only. A grey-level mask must be
  binarised by the caller first (the toolbox's rule: ``gt / gt.max() > 0.5``).

Every score is per image; a dataset score is the mean over images (for the E-measure curve: the mean curve).

The toolbox's ``eps`` is MATLAB's ``eps`` = 2**-52 (:data:`EPS`); it is added exactly where the toolbox adds it,
so that results agree with the toolbox to floating-point precision (not merely to its visible digits).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "EPS",
    "mae",
    "s_measure",
    "weighted_f_measure",
    "e_measure_curve",
    "mean_e_measure",
    "adaptive_e_measure",
    "saliency_measures",
]

EPS: float = float(np.finfo(np.float64).eps)
"""MATLAB's ``eps`` (2**-52), the regulariser used throughout the toolbox."""

_RANGE_TOL = 1e-6
_N_THRESHOLDS = 256


def _check_inputs(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (pred, gt) pair and return them as (float64 array clipped to [0, 1], bool array)."""
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.ndim != 2:
        raise ValueError(f"pred must be a 2-D array (H, W), got shape {pred.shape}.")
    if gt.shape != pred.shape:
        raise ValueError(f"gt must have the same shape as pred {pred.shape}, got {gt.shape}.")
    if pred.size == 0:
        raise ValueError(f"pred must not be empty, got shape {pred.shape}.")
    if not (np.issubdtype(pred.dtype, np.floating) or np.issubdtype(pred.dtype, np.integer)
            or pred.dtype == np.bool_):
        raise ValueError(f"pred must be a real-valued array, got dtype {pred.dtype}.")
    pred = pred.astype(np.float64)
    if not np.all(np.isfinite(pred)):
        raise ValueError("pred contains NaN or infinite values.")
    low, high = float(pred.min()), float(pred.max())
    if low < -_RANGE_TOL or high > 1.0 + _RANGE_TOL:
        raise ValueError(f"pred must lie in [0, 1] (min-max normalise it first), got range [{low}, {high}].")
    if gt.dtype != np.bool_:
        if not (np.issubdtype(gt.dtype, np.floating) or np.issubdtype(gt.dtype, np.integer)):
            raise ValueError(f"gt must be boolean or numeric with values in {{0, 1}}, got dtype {gt.dtype}.")
        if not np.all((gt == 0) | (gt == 1)):
            raise ValueError(
                "gt must be boolean or contain only 0 and 1; binarise a grey-level mask first (gt / gt.max() > 0.5)."
            )
        gt = gt == 1
    return np.clip(pred, 0.0, 1.0), gt


def mae(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean absolute error between a probability map and a binary mask.

    Perazzi et al., "Saliency filters: contrast based filtering for salient region detection", CVPR 2012:

    .. math:: \\mathrm{MAE} = \\frac{1}{HW} \\sum_{i,j} |P_{ij} - G_{ij}|

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.

    Returns:
        MAE in [0, 1]; 0 for a perfect prediction. Lower is better.

    Raises:
        ValueError: on a shape mismatch, a non 2-D input, ``pred`` outside [0, 1] or a non-binary ``gt``.
    """
    pred, gt = _check_inputs(pred, gt)
    return float(np.mean(np.abs(pred - gt)))


def _object_similarity(values: np.ndarray) -> float:
    """Object-level similarity O = 2 x / (x^2 + 1 + sigma_x + eps) of a non-empty 1-D array of scores.

    sigma_x is the sample standard deviation (ddof=1); for a single value it is 0, as MATLAB's ``std`` returns.
    """
    mean = float(np.mean(values))
    std = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
    return 2.0 * mean / (mean * mean + 1.0 + std + EPS)


def _region_similarity(pred: np.ndarray, gt: np.ndarray) -> float:
    """SSIM-like region similarity Q = 4 x y s_xy / ((x^2 + y^2)(s_x^2 + s_y^2)) of one non-empty quadrant.

    (Co)variances are normalised by (N - 1 + eps) as in the toolbox, so a single-pixel quadrant has zero variance.
    With a = 4 x y s_xy and b = (x^2 + y^2)(s_x^2 + s_y^2): Q = a / (b + eps) if a != 0, Q = 1 if a = b = 0
    (e.g. a constant prediction on a constant mask), and Q = 0 otherwise.
    """
    gt = gt.astype(np.float64)
    denominator = pred.size - 1 + EPS
    mean_x, mean_y = float(np.mean(pred)), float(np.mean(gt))
    dev_x, dev_y = pred - mean_x, gt - mean_y
    var_x = float(np.sum(dev_x * dev_x)) / denominator
    var_y = float(np.sum(dev_y * dev_y)) / denominator
    cov_xy = float(np.sum(dev_x * dev_y)) / denominator
    a = 4.0 * mean_x * mean_y * cov_xy
    b = (mean_x * mean_x + mean_y * mean_y) * (var_x + var_y)
    if a != 0.0:
        return a / (b + EPS)
    return 1.0 if b == 0.0 else 0.0


def _gt_centroid(gt: np.ndarray) -> tuple[int, int]:
    """1-based (X, Y) = (column, row) centroid of a non-empty mask, rounded half away from zero as MATLAB does."""
    total = int(np.count_nonzero(gt))
    height, width = gt.shape
    x_mean = float(gt.sum(axis=0) @ np.arange(1, width + 1)) / total
    y_mean = float(gt.sum(axis=1) @ np.arange(1, height + 1)) / total
    # x_mean, y_mean >= 1 > 0, so floor(v + 0.5) is MATLAB's round (half away from zero).
    return int(np.floor(x_mean + 0.5)), int(np.floor(y_mean + 0.5))


def s_measure(pred: np.ndarray, gt: np.ndarray, alpha: float = 0.5) -> float:
    """Structure-measure S_alpha of a probability map.

    Fan et al., "Structure-measure: A new way to evaluate foreground maps", ICCV 2017:

    .. math:: S = \\alpha S_o + (1 - \\alpha) S_r

    * Object-aware term: with the foreground ratio :math:`\\mu = |G| / HW` and
      :math:`O(x) = 2\\bar{x} / (\\bar{x}^2 + 1 + \\sigma_x + \\epsilon)` (:math:`\\sigma_x` the sample standard
      deviation, 0 for a single value),
      :math:`S_o = \\mu\\, O(P[G]) + (1 - \\mu)\\, O(1 - P[\\neg G])`.
    * Region-aware term: the image is split into 4 quadrants at the 1-based gt centroid
      :math:`(X, Y) = \\mathrm{round}(\\text{mean column}, \\text{mean row})` (MATLAB rounding, half away from zero);
      the top-left quadrant holds rows 1..Y and columns 1..X. Each quadrant k is scored with
      :math:`Q_k = 4\\bar{x}\\bar{y}\\sigma_{xy} / ((\\bar{x}^2+\\bar{y}^2)(\\sigma_x^2+\\sigma_y^2) + \\epsilon)`
      ((co)variances normalised by :math:`N_k - 1 + \\epsilon`; :math:`Q_k = 1` when numerator and denominator are
      both 0, :math:`Q_k = 0` when only the numerator is 0), and
      :math:`S_r = \\sum_k w_k Q_k` with :math:`w_k` the quadrant's share of the image area.

    Toolbox special cases: if gt has no foreground, :math:`S = 1 - \\mathrm{mean}(P)`; if gt is all foreground,
    :math:`S = \\mathrm{mean}(P)`. A negative combined score is clipped to 0 (as PySODMetrics does).

    Differences from the toolbox, both on degenerate splits only: when the centroid falls on the last column (or
    row), the right (bottom) quadrants are empty and have weight 0; the toolbox then returns NaN (mean of an empty
    array times 0), here they contribute 0. PySODMetrics rounds the 0-based centroid half-to-even and adds 1, which
    differs from MATLAB's rounding when the 0-based mean is exactly k + 0.5 with k even; MATLAB's rule is used here.

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.
        alpha: weight of the object term, in [0, 1]; 0.5 in the papers.

    Returns:
        S in [0, 1]; 1 for a perfect prediction. Higher is better.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`) or ``alpha`` outside [0, 1].
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}.")
    pred, gt = _check_inputs(pred, gt)
    fg_ratio = float(np.mean(gt))
    if fg_ratio == 0.0:
        return float(1.0 - np.mean(pred))
    if fg_ratio == 1.0:
        return float(np.mean(pred))

    object_score = fg_ratio * _object_similarity(pred[gt]) + (1.0 - fg_ratio) * _object_similarity(1.0 - pred[~gt])

    height, width = gt.shape
    area = height * width
    x, y = _gt_centroid(gt)
    w_lt = x * y / area
    w_rt = (width - x) * y / area
    w_lb = x * (height - y) / area
    w_rb = 1.0 - w_lt - w_rt - w_lb
    quadrants = (
        (np.s_[:y, :x], w_lt),
        (np.s_[:y, x:], w_rt),
        (np.s_[y:, :x], w_lb),
        (np.s_[y:, x:], w_rb),
    )
    region_score = sum(
        weight * _region_similarity(pred[index], gt[index]) for index, weight in quadrants if pred[index].size > 0
    )

    return float(max(alpha * object_score + (1.0 - alpha) * region_score, 0.0))


def _matlab_gaussian_kernel(size: int = 7, sigma: float = 5.0) -> np.ndarray:
    """2-D Gaussian kernel of MATLAB's ``fspecial('gaussian', size, sigma)``, shape (size, size), summing to 1.

    ``fspecial`` also zeroes entries below ``eps * max``; for the sizes used here (7, sigma 5) none is that small.
    """
    half = (size - 1) / 2.0
    coords = np.arange(size) - half
    kernel = np.exp(-(coords[:, None] ** 2 + coords[None, :] ** 2) / (2.0 * sigma * sigma))
    return kernel / kernel.sum()


def weighted_f_measure(pred: np.ndarray, gt: np.ndarray, beta2: float = 1.0) -> float:
    """Weighted F-measure F^w_beta of a probability map.

    Margolin, Zelnik-Manor and Tal, "How to evaluate foreground maps?", CVPR 2014, as in the toolbox's ``WFb.m``:

    1. :math:`E = |G - P|`; :math:`(D, I) = ` Euclidean distance from each pixel to the nearest foreground pixel
       and that pixel's index (``scipy.ndimage.distance_transform_edt(~G, return_indices=True)``, i.e. ``bwdist``).
    2. Pixel dependency: :math:`E_t = E` on the foreground and :math:`E_t(p) = E(I(p))` on the background;
       :math:`E_A = E_t \\star K` with :math:`K` the 7x7 Gaussian of sigma 5 (``fspecial('gaussian', 7, 5)``),
       a 'same'-size correlation with zero padding (``imfilter``); :math:`M = \\min(E, E_A)` on the foreground and
       :math:`M = E` on the background.
    3. Pixel importance: :math:`B = 1` on the foreground and :math:`B = 2 - \\exp(\\ln(0.5) / 5 \\cdot D)` on the
       background; :math:`E_w = M B`.
    4. :math:`TP_w = |G| - \\sum_G E_w`, :math:`FP_w = \\sum_{\\neg G} E_w`,
       :math:`R = 1 - \\mathrm{mean}_G(E_w)`, :math:`P = TP_w / (\\epsilon + TP_w + FP_w)`, and
       :math:`F^w = (1 + \\beta^2) R P / (\\epsilon + R + \\beta^2 P)`.

    Edge case: a gt without foreground gives 0 (PySODMetrics' convention; the MATLAB code fails on it).
    Where a background pixel has several nearest foreground pixels, the one chosen by scipy may differ from
    MATLAB's ``bwdist``, which can change the score slightly when their errors differ.

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.
        beta2: :math:`\\beta^2`, weight of recall against precision; 1 in the papers.

    Returns:
        F^w in [0, 1]; 1 (up to eps) for a perfect prediction. Higher is better.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`) or a negative ``beta2``.
    """
    if beta2 < 0:
        raise ValueError(f"beta2 must be non-negative, got {beta2}.")
    pred, gt = _check_inputs(pred, gt)
    if not gt.any():
        return 0.0

    error = np.abs(pred - gt)
    distance, nearest = ndimage.distance_transform_edt(~gt, return_indices=True)
    # On the foreground the nearest foreground pixel is the pixel itself, so this only changes the background.
    error_t = error[nearest[0], nearest[1]]
    error_a = ndimage.correlate(error_t, _matlab_gaussian_kernel(7, 5.0), mode="constant", cval=0.0)
    min_error = np.where(gt & (error_a < error), error_a, error)
    importance = np.where(gt, 1.0, 2.0 - np.exp(np.log(0.5) / 5.0 * distance))
    weighted_error = min_error * importance

    tp_w = np.count_nonzero(gt) - float(np.sum(weighted_error[gt]))
    fp_w = float(np.sum(weighted_error[~gt]))
    recall = 1.0 - float(np.mean(weighted_error[gt]))
    precision = tp_w / (EPS + tp_w + fp_w)
    return float((1.0 + beta2) * recall * precision / (EPS + recall + beta2 * precision))


def _enhanced_alignment(
    tp: np.ndarray | int, fp: np.ndarray | int, n_gt_fg: int, n_pixels: int
) -> np.ndarray | float:
    """E_phi of binary maps described only by their confusion counts (scalars or arrays, one entry per map).

    A binary map takes two values, so the enhanced alignment matrix takes at most four values, one per cell of the
    confusion matrix; its sum is the count-weighted sum of those four values.
    """
    tp = np.asarray(tp, dtype=np.float64)
    fp = np.asarray(fp, dtype=np.float64)
    pred_fg = tp + fp
    if n_gt_fg == 0:
        enhanced_sum = n_pixels - pred_fg
    elif n_gt_fg == n_pixels:
        enhanced_sum = pred_fg
    else:
        fn = n_gt_fg - tp
        tn = (n_pixels - n_gt_fg) - fp
        mean_pred = pred_fg / n_pixels
        mean_gt = n_gt_fg / n_pixels

        def enhanced(pred_dev: np.ndarray, gt_dev: float) -> np.ndarray:
            align = 2.0 * gt_dev * pred_dev / (gt_dev * gt_dev + pred_dev * pred_dev + EPS)
            return (align + 1.0) ** 2 / 4.0

        enhanced_sum = (
            tp * enhanced(1.0 - mean_pred, 1.0 - mean_gt)
            + fp * enhanced(1.0 - mean_pred, -mean_gt)
            + fn * enhanced(-mean_pred, 1.0 - mean_gt)
            + tn * enhanced(-mean_pred, -mean_gt)
        )
    return enhanced_sum / (n_pixels - 1 + EPS)


def e_measure_curve(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """E-measure of the 256 binarisations of a probability map, ``curve[t]`` for threshold t = 0..255.

    Fan et al., "Enhanced-alignment Measure for Binary Foreground Map Evaluation", IJCAI 2018. For a binary map
    F and mask G, with :math:`\\varphi_F = F - \\mathrm{mean}(F)`, :math:`\\varphi_G = G - \\mathrm{mean}(G)`:

    .. math::

        \\xi = \\frac{2\\, \\varphi_G \\circ \\varphi_F}{\\varphi_G \\circ \\varphi_G + \\varphi_F \\circ \\varphi_F
        + \\epsilon}, \\qquad
        E_\\varphi = \\frac{1}{HW - 1 + \\epsilon} \\sum_{i,j} \\frac{(1 + \\xi_{ij})^2}{4}

    The denominator :math:`HW - 1 + \\epsilon` is the toolbox's, so a perfect binary map scores
    :math:`HW / (HW - 1)`, marginally above 1. Toolbox special cases: if gt has no foreground the enhanced matrix
    is :math:`1 - F` (score = number of predicted-background pixels / (HW - 1)); if gt is all foreground it is
    :math:`F` (score = number of predicted-foreground pixels / (HW - 1)).

    Binarisation follows PySODMetrics: ``q = floor(255 * pred)`` (``uint8``) and :math:`F_t = [q \\ge t]`, so
    t = 0 selects every pixel. (The MATLAB ``Eval`` script uses ``pred > k/255`` for k = 255..0, i.e. the same
    family of maps shifted by one level.) All 256 maps are scored at once from cumulative histograms of q over
    the gt foreground and background; no pixel loop.

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.

    Returns:
        float64 array of shape (256,); entry t is E_phi of the map binarised at threshold t.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`).
    """
    pred, gt = _check_inputs(pred, gt)
    levels = (pred * 255).astype(np.uint8)
    fg_hist = np.bincount(levels[gt], minlength=_N_THRESHOLDS)
    bg_hist = np.bincount(levels[~gt], minlength=_N_THRESHOLDS)
    # Number of pixels with level >= t, for t = 0..255: reversed cumulative sums.
    tp = np.cumsum(fg_hist[::-1])[::-1]
    fp = np.cumsum(bg_hist[::-1])[::-1]
    return _enhanced_alignment(tp, fp, int(np.count_nonzero(gt)), gt.size)


def mean_e_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """Mean E-measure (mE_phi of the polyp papers): the mean of :func:`e_measure_curve` over its 256 thresholds.

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.

    Returns:
        Mean E_phi, about [0, 1] (a perfect binary prediction gives HW / (HW - 1), see :func:`e_measure_curve`).
        Higher is better.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`).
    """
    return float(np.mean(e_measure_curve(pred, gt)))


def adaptive_e_measure(pred: np.ndarray, gt: np.ndarray) -> float:
    """E-measure of the map binarised at the adaptive threshold :math:`t = \\min(2\\, \\mathrm{mean}(P), 1)`.

    Fan et al., IJCAI 2018 (see :func:`e_measure_curve` for the equation and special cases). As in PySODMetrics
    the map is :math:`[P \\ge t]` on the unquantised probabilities. (The MATLAB ``Eval`` script uses
    :math:`[P > 2\\, \\mathrm{mean}(P)]` without the cap.)

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.

    Returns:
        Adaptive E_phi. Higher is better.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`).
    """
    pred, gt = _check_inputs(pred, gt)
    binary = pred >= min(2.0 * float(np.mean(pred)), 1.0)
    tp = np.count_nonzero(binary & gt)
    fp = np.count_nonzero(binary & ~gt)
    return float(_enhanced_alignment(tp, fp, int(np.count_nonzero(gt)), gt.size))


def saliency_measures(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    """The four per-image numbers reported by the polyp papers.

    Args:
        pred: probability map, shape (H, W), values in [0, 1].
        gt: binary mask, shape (H, W), bool or {0, 1}.

    Returns:
        ``{"s_measure": S_alpha (alpha=0.5), "weighted_f": F^w (beta^2=1), "mean_e": mean E_phi, "mae": MAE}``.

    Raises:
        ValueError: on invalid ``pred``/``gt`` (see :func:`mae`).
    """
    pred, gt = _check_inputs(pred, gt)
    return {
        "s_measure": s_measure(pred, gt),
        "weighted_f": weighted_f_measure(pred, gt),
        "mean_e": mean_e_measure(pred, gt),
        "mae": mae(pred, gt),
    }
