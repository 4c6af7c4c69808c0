"""FewShotIoU / FewShotIoUMetric (specs/cdtg.md §3) on hand-made 4x4 episodes, the arithmetic in the comments."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine
from ignite.exceptions import NotComputableError

from common.metrics.fewshot import FewShotIoU, FewShotIoUMetric, all_reduce_fewshot_iou


def _mask(*cells: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(4, 4, dtype=torch.long)
    for r, c in cells:
        m[r, c] = 1
    return m


def _block(rows: range, cols: range) -> torch.Tensor:
    return _mask(*[(r, c) for r in rows for c in cols])


# episode 1, class 0: G = rows 0-1 x cols 0-1 (4 px), P = rows 0-1 x cols 0-2 (6 px)
#   fg: I = 4, U = 6 + 4 - 4 = 6;  bg: #P0 = 10, #G0 = 12, I = 10 (P0 inside G0), U = 12
# episode 2, class 0: G = row 0 (4 px), P = pixel (0, 0) (1 px)
#   fg: I = 1, U = 4;               bg: #P0 = 15, #G0 = 12, I = 12, U = 15
# episode 3, class 1: G = col 3 (4 px), P = col 3 rows 0-2 (3 px)
#   fg: I = 3, U = 4;               bg: #P0 = 13, #G0 = 12, I = 12, U = 13
G = torch.stack([_block(range(2), range(2)), _block(range(1), range(4)), _block(range(4), range(3, 4))])
P = torch.stack([_block(range(2), range(3)), _mask((0, 0)), _block(range(3), range(3, 4))])
CLASS_ID = torch.tensor([0, 0, 1])


def test_hand_made_episodes() -> None:
    iou = FewShotIoU(2)
    iou.update(P, G, CLASS_ID)
    assert iou.intersection.tolist() == [[10 + 12, 12], [4 + 1, 3]]
    assert iou.union.tolist() == [[12 + 15, 13], [6 + 4, 4]]
    assert iou.episodes.tolist() == [2, 1]
    # class 0: fg I = 5, U = 10 -> 0.5; class 1: 3 / 4 = 0.75
    assert iou.per_class_iou() == pytest.approx({0: 0.5, 1: 0.75})
    # mIoU = 100 * (0.5 + 0.75) / 2 = 62.5
    assert iou.miou() == pytest.approx(62.5)
    # FB-IoU: fg sum I / sum U = 8 / 14, bg = 34 / 40 = 0.85 -> 100 * (8/14 + 0.85) / 2 = 71.0714...
    assert iou.fb_iou() == pytest.approx(100 * (8 / 14 + 0.85) / 2)


def test_accumulated_miou_is_not_the_mean_of_episode_ious() -> None:
    iou = FewShotIoU(2)
    for b in range(3):  # one episode at a time gives the same sums as the batch
        iou.update(P[b:b + 1], G[b:b + 1], CLASS_ID[b:b + 1])
    assert iou.miou() == pytest.approx(62.5)
    # mean of the per-episode fg IoUs: (4/6 + 1/4 + 3/4) / 3 = 0.5556, per class then mean: ((4/6 + 1/4)/2 + 3/4)/2
    assert iou.miou() != pytest.approx(100 * (4 / 6 + 1 / 4 + 3 / 4) / 3, abs=1)
    assert iou.miou() != pytest.approx(100 * ((4 / 6 + 1 / 4) / 2 + 3 / 4) / 2, abs=1)


def test_unseen_classes_are_left_out_and_empty_union_counts_zero() -> None:
    iou = FewShotIoU(5)
    # class 3: G and P both empty -> fg I = U = 0, IoU = 0 / max(0, 1) = 0 (not NaN); bg I = U = 16
    iou.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.tensor([3]))
    assert iou.per_class_iou() == {3: 0.0}
    assert iou.miou() == 0.0  # mean over the one seen class, not over 5
    assert iou.fb_iou() == pytest.approx(100 * (0 / 1 + 16 / 16) / 2)  # 50
    # class 1, perfect: its IoU 1 joins -> mIoU = 100 * (0 + 1) / 2 = 50
    iou.update(G[:1], G[:1], torch.tensor([1]))
    assert iou.miou() == pytest.approx(50.0)


def test_ignored_pixels_fall_out_of_both_bins() -> None:
    target = _block(range(1), range(4))[None].clone()  # G = row 0
    pred = _block(range(2), range(4))[None]  # P = rows 0-1
    ignore = _block(range(1, 2), range(4))[None]  # row 1 ignored
    target[ignore.bool()] = 255  # PASCAL boundary value, allowed where ignored
    iou = FewShotIoU(1)
    iou.update(pred, target, [0], ignore)
    # kept: rows 0, 2, 3. fg: I = 4, U = 4 -> 1; bg: I = U = 8 -> FB-IoU 100
    assert iou.intersection.tolist() == [[8], [4]] and iou.union.tolist() == [[8], [4]]
    assert iou.miou() == pytest.approx(100.0) and iou.fb_iou() == pytest.approx(100.0)
    plain = FewShotIoU(1)
    plain.update(pred, (target == 1).long(), [0])  # without ignore: fg 4 / 8
    assert plain.miou() == pytest.approx(50.0)


def test_bad_input() -> None:
    iou = FewShotIoU(2)
    with pytest.raises(ValueError, match="class ids"):
        iou.update(P, G, torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="other than 0 / 1"):
        iou.update(P, G * 255, CLASS_ID)
    with pytest.raises(ValueError, match="differ in shape"):
        iou.update(P, G[:, :3], CLASS_ID)
    with pytest.raises(ValueError, match="3 class ids for 2"):
        iou.update(P[:2], G[:2], CLASS_ID)
    with pytest.raises(ValueError, match="n_classes"):
        FewShotIoU(0)
    with pytest.raises(NotComputableError):
        iou.miou()


def test_ignite_metric_and_merge() -> None:
    outputs = [{"pred": P[:2], "label": G[:2], "class_id": CLASS_ID[:2], "ignore": None},
               [{"pred": P[2], "label": G[2], "class_id": CLASS_ID[2], "ignore": torch.zeros(4, 4)}]]  # decollated

    engine = Engine(lambda e, batch: batch)
    FewShotIoUMetric(2, "miou").attach(engine, "miou")
    metric = FewShotIoUMetric(2, "fbiou")
    metric.attach(engine, "fbiou")
    state = engine.run(outputs, max_epochs=1)
    assert state.metrics["miou"] == pytest.approx(62.5)
    assert state.metrics["fbiou"] == pytest.approx(100 * (8 / 14 + 0.85) / 2)
    merged = all_reduce_fewshot_iou(metric.iou)  # one process: a copy with the same sums
    assert merged is not metric.iou and torch.equal(merged.union, metric.iou.union)
    with pytest.raises(ValueError, match="kind"):
        FewShotIoUMetric(2, "dice")
