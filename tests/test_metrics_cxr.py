"""Zero-shot metrics (MedKLIP protocol) and the per-image segmentation Dice of ASG (specs/asg.md §6.3, §6.4,
§10 item 11)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from common.metrics.cxr import SegmentationDice, multilabel_zero_shot, per_image_dice, zero_shot_metrics

# ----------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_by_hand_four_samples():
    # y = [0, 0, 1, 1], s = [0.1, 0.4, 0.35, 0.8]
    # AUC: pairs (pos, neg): (0.35, 0.1) ✓, (0.35, 0.4) ✗, (0.8, 0.1) ✓, (0.8, 0.4) ✓ -> 3/4
    # thresholds (predict s >= t): 0.1: P 2/4, R 1 -> F1 2/3; 0.35: P 2/3, R 1 -> F1 0.8;
    #                              0.4: P 1/2, R 1/2 -> F1 1/2; 0.8: P 1, R 1/2 -> F1 2/3      -> f1 0.8, t* = 0.35
    # acc with s > 0.35 (strict): predictions [0, 1, 0, 1] vs [0, 0, 1, 1] -> 2/4 = 0.5
    # (with s >= t* it would be [0, 1, 1, 1] -> 0.75: the sample scoring exactly t* is predicted negative)
    metrics = zero_shot_metrics(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8]))
    assert metrics == pytest.approx({"auc": 0.75, "f1": 0.8, "acc": 0.5, "threshold": 0.35})


def test_zero_shot_tied_max_f1_takes_the_lowest_threshold():
    # y = [1, 0, 0, 1], s = [0.2, 0.4, 0.6, 0.8]
    # thresholds: 0.2: TP 2, FP 2 -> P 1/2, R 1 -> F1 2/3; 0.4: TP 1, FP 2 -> P 1/3, R 1/2 -> F1 2/5;
    #             0.6: TP 1, FP 1 -> F1 1/2; 0.8: TP 1, FP 0 -> P 1, R 1/2 -> F1 2/3
    # tie at 2/3: np.argmax over sklearn's ascending thresholds keeps the first, t* = 0.2 (MedKLIP's code)
    # acc with s > 0.2: [0, 1, 1, 1] vs [1, 0, 0, 1] -> 1/4 (t* = 0.8 would give 1/2)
    # AUC: pos {0.2, 0.8} vs neg {0.4, 0.6}: 2 of 4 pairs ordered -> 0.5
    metrics = zero_shot_metrics(np.array([1, 0, 0, 1]), np.array([0.2, 0.4, 0.6, 0.8]))
    assert metrics == pytest.approx({"auc": 0.5, "f1": 2 / 3, "acc": 0.25, "threshold": 0.2})


def brute_force(y: np.ndarray, s: np.ndarray) -> dict[str, float]:
    """Sweep every distinct score as a threshold (predict s >= t), F1 = 0 where P + R = 0, first maximum in
    ascending t; AUC from pair counting (ties count 1/2); acc with s > t*."""
    best_f1, best_t = -1.0, None
    for t in np.unique(s):  # ascending
        pred = s >= t
        tp, fp, fn = np.sum(pred & (y == 1)), np.sum(pred & (y == 0)), np.sum(~pred & (y == 1))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        if f1 > best_f1:
            best_f1, best_t = f1, t
    pos, neg = s[y == 1], s[y == 0]
    auc = (np.sum(pos[:, None] > neg[None, :]) + 0.5 * np.sum(pos[:, None] == neg[None, :])) / (pos.size * neg.size)
    return {"auc": auc, "f1": best_f1, "acc": float(np.mean((s > best_t) == y)), "threshold": float(best_t)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_equals_brute_force_sweep(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=40)
    s = np.round(np.clip(0.3 * y + rng.normal(0.4, 0.25, size=40), 0, 1), 1)  # one decimal -> many ties
    assert np.unique(s).size < 40
    assert zero_shot_metrics(y, s) == pytest.approx(brute_force(y, s), abs=1e-12)


def test_zero_shot_accepts_tensors_and_rejects_bad_input():
    assert zero_shot_metrics(torch.tensor([0, 1]), torch.tensor([0.2, 0.7]))["auc"] == 1.0
    with pytest.raises(ValueError, match="AUC is undefined"):
        zero_shot_metrics(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="differ in shape"):
        zero_shot_metrics(np.array([0, 1]), np.array([0.1, 0.5, 0.9]))
    with pytest.raises(ValueError, match="only 0 and 1"):
        zero_shot_metrics(np.array([0, 2]), np.array([0.1, 0.5]))
    with pytest.raises(ValueError, match="NaN"):
        zero_shot_metrics(np.array([0, 1]), np.array([0.1, np.nan]))


def test_multilabel_zero_shot_skips_single_class_columns(caplog):
    # class "pneumonia": the 4-sample example (auc 0.75, f1 0.8, acc 0.5)
    # class "effusion": y = [0, 1, 0, 1], s = [0.1, 0.9, 0.2, 0.8]: auc 1, f1 1 at t* = 0.8,
    #   acc with s > 0.8: [0, 1, 0, 0] -> 3/4
    # class "hernia": no positive -> skipped with a warning
    # mean: auc (0.75 + 1)/2 = 0.875, f1 (0.8 + 1)/2 = 0.9, acc (0.5 + 0.75)/2 = 0.625
    y = np.array([[0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 1, 0]])
    s = np.array([[0.1, 0.1, 0.3], [0.4, 0.9, 0.2], [0.35, 0.2, 0.1], [0.8, 0.8, 0.5]])
    with caplog.at_level(logging.WARNING, logger="common.metrics.cxr"):
        result = multilabel_zero_shot(y, s, ["pneumonia", "effusion", "hernia"])
    assert "hernia" in caplog.text
    assert result["skipped"] == ["hernia"]
    assert set(result["per_class"]) == {"pneumonia", "effusion"}
    assert result["per_class"]["effusion"] == pytest.approx({"auc": 1.0, "f1": 1.0, "acc": 0.75, "threshold": 0.8})
    assert result["mean"] == pytest.approx({"auc": 0.875, "f1": 0.9, "acc": 0.625})
    with pytest.raises(ValueError, match="names"):
        multilabel_zero_shot(y, s, ["a", "b"])
    with pytest.raises(ValueError, match="single label value"):
        multilabel_zero_shot(y[:, 2:], s[:, 2:], ["hernia"])


# ----------------------------------------------------------------------------------------------- Dice

# four 1 x 2 x 2 images (probabilities, ground truth), row-major pixels
EMPTY_BOTH = ([0.1, 0.5, 0.2, 0.0], [0, 0, 0, 0])  # 0.5 is not > 0.5 -> P empty, G empty -> 1
EMPTY_GT = ([0.9, 0.1, 0.1, 0.1], [0, 0, 0, 0])  # P = {0}, G empty -> 0
PARTIAL = ([0.8, 0.3, 0.2, 0.1], [1, 1, 0, 0])  # P = {0}, G = {0, 1}: 2*1 / (1 + 2) = 2/3
DISJOINT = ([0.0, 0.0, 0.0, 0.7], [1, 0, 0, 0])  # P = {3}, G = {0}: 0


def images(*cases: tuple[list[float], list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.tensor([c[0] for c in cases]).reshape(-1, 1, 2, 2)
    target = torch.tensor([c[1] for c in cases], dtype=torch.float32).reshape(-1, 1, 2, 2)
    return probs, target


def test_per_image_dice_rules():
    probs, target = images(EMPTY_BOTH, EMPTY_GT, PARTIAL, DISJOINT)
    assert per_image_dice(probs, target).tolist() == pytest.approx([1.0, 0.0, 2 / 3, 0.0])
    # a lower threshold: EMPTY_BOTH now predicts pixel 1 (0.5 > 0.4) -> 0; PARTIAL unchanged
    assert per_image_dice(probs, target, threshold=0.4).tolist() == pytest.approx([0.0, 0.0, 2 / 3, 0.0])
    with pytest.raises(ValueError, match="same shape"):
        per_image_dice(probs, target[:2])


# batch 1: EMPTY_BOTH, PARTIAL -> [1, 2/3], mean 5/6
# batch 2: EMPTY_GT, DISJOINT, PARTIAL -> [0, 0, 2/3], mean 2/9
# average="batch": (5/6 + 2/9) / 2 = (15/18 + 4/18) / 2 = 19/36 = 0.527778
# average="image": (1 + 2/3 + 0 + 0 + 2/3) / 5 = (7/3) / 5 = 7/15 = 0.466667
BATCHES = [images(EMPTY_BOTH, PARTIAL), images(EMPTY_GT, DISJOINT, PARTIAL)]
EXPECTED = {"batch": 19 / 36, "image": 7 / 15}


@pytest.mark.parametrize("average", ["batch", "image"])
def test_segmentation_dice_averages_by_hand(average):
    metric = SegmentationDice(average=average)
    for probs, target in BATCHES:
        metric.update((probs, target))
    assert metric.compute() == pytest.approx(EXPECTED[average], rel=1e-9)
    metric.reset()
    with pytest.raises(NotComputableError):
        metric.compute()
    # decollated lists of per-image tensors give the same result
    for probs, target in BATCHES:
        metric.update((list(probs), list(target)))
    assert metric.compute() == pytest.approx(EXPECTED[average], rel=1e-9)


def test_segmentation_dice_attached_to_an_engine():
    engine = Engine(lambda eng, batch: {"pred": batch[0], "label": batch[1]})
    SegmentationDice(output_transform=lambda out: (out["pred"], out["label"])).attach(engine, "dice")
    state = engine.run(BATCHES, max_epochs=1)
    assert state.metrics["dice"] == pytest.approx(19 / 36, rel=1e-9)
    with pytest.raises(ValueError, match="average"):
        SegmentationDice(average="pixel")


def _worker(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out = {}
        for average in ("batch", "image"):
            metric = SegmentationDice(average=average)
            metric.update(BATCHES[rank])  # rank 0 sees batch 1, rank 1 batch 2
            out[average] = metric.compute()
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_segmentation_dice_all_reduces_over_two_ranks(tmp_path):
    # each rank holds one batch; both ranks report the value of the two batches together (19/36 and 7/15),
    # not their own batch mean (5/6 or 2/9)
    results = mp.Manager().dict()
    # fork (not spawn): the children reuse the imported modules, which keeps this test a few seconds long
    mp.start_processes(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True, start_method="fork")
    for rank in (0, 1):
        assert results[rank] == pytest.approx(EXPECTED, rel=1e-9)
