"""Rank reductions on two real gloo processes: the DINO centre (with ``all_reduce_center``), DHC's class
statistics and buffer broadcasts are those of the global batch on every rank (what a single process computes on the
concatenated batch)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from common.losses.debiased_weighting import DistDW
from common.losses.dino import DINOLoss
from common.losses.weighted_ce_dice import hard_batch_dice
from common.utils.distributed import (all_reduce_extreme, all_reduce_sum, average_gradients, broadcast_from_rank0,
                                      world_size)

# teacher logits (K = 2): rank 0 holds rows [1, 0] and [3, 0], rank 1 the row [0, 2]
TEACHER = {0: torch.tensor([[1.0, 0.0], [3.0, 0.0]]), 1: torch.tensor([[0.0, 2.0]])}
# 1 x 1 x 4 label maps (3 classes); logits are one-hot of the predicted class
PRED = {0: torch.tensor([1, 1, 0, 0]), 1: torch.tensor([1, 0, 0, 2])}
TRUE = {0: torch.tensor([1, 0, 1, 0]), 1: torch.tensor([1, 0, 0, 0])}


def _logits(classes: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(classes, 3).T.float()[None, :, None, :]  # [1, 3, 1, 4]


def _worker(rank: int, store: str, results: dict) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        out = {"world": world_size()}
        loss = DINOLoss(out_dim=2, n_global_views=1, all_reduce_center=True)
        loss.update_center(TEACHER[rank])
        out["center"] = loss.center.clone()
        per_rank = DINOLoss(out_dim=2, n_global_views=1)  # Sparsam's default: each rank its own centre
        per_rank.update_center(TEACHER[rank])
        out["center_per_rank"] = per_rank.center.clone()
        out["dice"] = hard_batch_dice(_logits(PRED[rank]), TRUE[rank][None, None, None], over_ranks=True)
        out["dice_local"] = hard_batch_dice(_logits(PRED[rank]), TRUE[rank][None, None, None])
        weighting = DistDW(num_classes=3, momentum=0.0)
        weighting.init_weights([1.0, 1.0, 2.0])
        out["dist_weights"] = weighting.update(_logits(PRED[rank]))
        out["sum"] = all_reduce_sum(torch.tensor([float(rank + 1)]))
        scores = torch.tensor([float(rank), 5.0 - 4.0 * rank])  # rank 0: [0, 5], rank 1: [1, 1]
        out["max"] = all_reduce_extreme(scores, largest=True)
        out["min"] = all_reduce_extreme(scores, largest=False)
        param = torch.nn.Parameter(torch.zeros(2))
        param.grad = torch.tensor([2.0 * rank, 1.0])  # rank 0: [0, 1], rank 1: [2, 1]
        # a head used on rank 1 only (its class is absent from rank 0's batch), and one used nowhere
        head, unused = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
        if rank == 1:
            head.grad = torch.tensor([4.0])
        average_gradients([param, head, unused])
        out["grad"] = param.grad.clone()
        out["head_grad"], out["unused_grad"] = head.grad.clone(), unused.grad
        buffer = torch.full((2,), float(rank))
        broadcast_from_rank0([buffer])
        out["buffer"] = buffer
        results[rank] = out
    finally:
        dist.destroy_process_group()


def test_two_ranks_share_global_batch_statistics(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    for rank in (0, 1):
        out = results[rank]
        assert out["world"] == 2
        # global mean of the 3 rows: [(1 + 3 + 0) / 3, (0 + 0 + 2) / 3] = [4/3, 2/3] (not [2, 0] / [0, 2] per rank)
        assert torch.allclose(out["center"], torch.tensor([[4 / 3, 2 / 3]]))
        # class 1 over both ranks: TP = 1 + 1 = 2, |pred| = 2 + 1 = 3, |true| = 2 + 1 = 3 -> 2*2 / (3 + 3) = 2/3
        # class 2: predicted once (rank 1), never true -> (0 + 1e-8) / (1 + 0 + 2e-8) ~ 1e-8
        assert abs(out["dice"][1].item() - 2 / 3) < 1e-6
        assert out["dice"][2].item() < 1e-6
        # predicted-class counts of the global batch: class 0: 2 + 2 = 4, class 1: 2 + 1 = 3, class 2: 0 + 1 = 1;
        # DistDW with momentum 0 takes distribution_weights([4, 3, 1]) at once, the same on both ranks
        assert torch.equal(out["dist_weights"], results[0]["dist_weights"])
        assert out["sum"].item() == 3.0  # 1 + 2
        assert out["max"].tolist() == [1.0, 5.0] and out["min"].tolist() == [0.0, 1.0]  # of [0, 5] and [1, 1]
        assert out["grad"].tolist() == [1.0, 1.0]  # ([0, 1] + [2, 1]) / 2
        assert out["head_grad"].tolist() == [2.0] and out["unused_grad"] is None  # (0 + 4) / 2; no rank: None
        assert out["buffer"].tolist() == [0.0, 0.0]  # rank 0's values everywhere
    # Sparsam's per-rank centres: rank 0 [(1 + 3) / 2, 0] = [2, 0], rank 1 [0, 2]
    assert results[0]["center_per_rank"].tolist() == [[2.0, 0.0]]
    assert results[1]["center_per_rank"].tolist() == [[0.0, 2.0]]
    # on its own, rank 0's class-1 Dice is 2*1 / (2 + 2) = 0.5 and rank 1's is 2*1 / (1 + 1) = 1
    assert abs(results[0]["dice_local"][1].item() - 0.5) < 1e-6
    assert abs(results[1]["dice_local"][1].item() - 1.0) < 1e-6
    reference = DistDW(num_classes=3, momentum=0.0)
    reference.init_weights([1.0, 1.0, 2.0])
    assert torch.allclose(results[0]["dist_weights"], reference.update_counts(torch.tensor([4.0, 3.0, 1.0])))
