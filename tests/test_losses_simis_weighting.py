"""SimiS class weights against values worked out by hand (specs/dhc.md §9, row "simis")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import common.losses.debiased_weighting as counting_module  # argmax_counts sums over ranks there
from common.losses.simis_weighting import SimiSWeighting, simis_weights


def _logits(classes: list[list[int]], num_classes: int = 3) -> torch.Tensor:
    """Logits ``[N, C, 1, V]`` whose arg-max per voxel is the given class (one row per patch)."""
    labels = torch.tensor(classes)  # [N, V]
    return (5.0 * F.one_hot(labels, num_classes).float()).permute(0, 2, 1).unsqueeze(2)


# Batch 1: 2 patches x 5 voxels; arg-max classes 6 x 0, 3 x 1, 1 x 2 -> N = [6, 3, 1], pi = [.6, .3, .1]
#   w_cur = 3 * ([.6, .6, .6] - [.6, .3, .1]) = [0, .9, 1.5]
BATCH_1 = _logits([[0, 0, 0, 0, 0], [0, 1, 1, 1, 2]])
W_CUR_1 = [0.0, 0.9, 1.5]
# Batch 2: 5 x 0, 0 x 1, 5 x 2 -> pi = [.5, 0, .5], max .5 -> w_cur = 3 * [0, .5, 0] = [0, 1.5, 0]
BATCH_2 = _logits([[0, 0, 0, 0, 0], [2, 2, 2, 2, 2]])
W_CUR_2 = [0.0, 1.5, 0.0]


def test_simis_weights_by_hand():
    assert torch.allclose(simis_weights([6, 3, 1]), torch.tensor(W_CUR_1, dtype=torch.float64))
    # C = 4, N = [50, 30, 20, 0] -> pi = [.5, .3, .2, 0] -> w = 4 [0, .2, .3, .5] = [0, .8, 1.2, 2]
    assert torch.allclose(simis_weights([50, 30, 20, 0]), torch.tensor([0.0, 0.8, 1.2, 2.0], dtype=torch.float64))
    # equal counts: every pi = max pi -> all 0 (no 0/0)
    assert torch.equal(simis_weights([4, 4, 4]), torch.zeros(3, dtype=torch.float64))


def test_starts_at_c_ones_and_init_weights_is_one_ema_step():
    w = SimiSWeighting(3)
    assert torch.equal(w.get_weights(), torch.full((3,), 3.0))
    # m = .99: .99 * 3 + .01 * [0, .9, 1.5] = [2.97, 2.979, 2.985]
    out = w.init_weights(torch.tensor([6, 3, 1]))
    assert torch.allclose(out, torch.tensor([2.97, 2.979, 2.985]))
    # idempotent: resets from C 1, not an EMA of the previous state
    assert torch.allclose(w.init_weights([6, 3, 1]), torch.tensor([2.97, 2.979, 2.985]))


def test_ema_over_two_updates():
    w = SimiSWeighting(3, momentum=0.5)
    # from [3, 3, 3]: .5 * 3 + .5 * [0, .9, 1.5] = [1.5, 1.95, 2.25]
    w1 = w.update(BATCH_1)
    assert w1.dtype == torch.float32
    assert torch.allclose(w1, torch.tensor([1.5, 1.95, 2.25]))
    # .5 * [1.5, 1.95, 2.25] + .5 * [0, 1.5, 0] = [.75, 1.725, 1.125]
    w2 = w.update(BATCH_2)
    assert torch.allclose(w2, torch.tensor([0.75, 1.725, 1.125]))
    assert torch.allclose(w.get_weights(), w2)
    w2[0] = 100.0  # a copy: the state is untouched
    assert torch.allclose(w.get_weights(), torch.tensor([0.75, 1.725, 1.125]))


def test_default_momentum_update_after_init():
    w = SimiSWeighting(3)
    w.init_weights([6, 3, 1])  # [2.97, 2.979, 2.985]
    # .99 * [2.97, 2.979, 2.985] + .01 * [0, 1.5, 0] = [2.9403, 2.96421, 2.95515]
    assert torch.allclose(w.update(BATCH_2), torch.tensor([2.9403, 2.96421, 2.95515]))


def test_counts_come_from_every_patch_of_the_batch():
    # labelled patch all class 0, unlabelled patch all class 2: pooled pi = [.5, 0, .5] -> [0, 1.5, 0] (batch 2);
    # the unlabelled patch alone would give pi = [0, 0, 1] -> [3, 3, 0]
    w = SimiSWeighting(3, momentum=0.0)
    assert torch.allclose(w.update(BATCH_2), torch.tensor(W_CUR_2))


def test_counts_are_summed_over_ranks(monkeypatch):
    # another rank adds 10 voxels of class 2: N = [6, 3, 1] + [0, 0, 10] = [6, 3, 11], pi = [.3, .15, .55]
    #   w = 3 * [.25, .4, 0] = [.75, 1.2, 0]
    monkeypatch.setattr(counting_module, "all_reduce_sum", lambda t: t + torch.tensor([0, 0, 10]))
    w = SimiSWeighting(3, momentum=0.0)
    assert torch.allclose(w.update(BATCH_1), torch.tensor([0.75, 1.2, 0.0]))


def test_state_dict_round_trip():
    a = SimiSWeighting(3, momentum=0.5)
    a.update(BATCH_1)
    state = a.state_dict()
    assert set(state) == {"weights"}
    b = SimiSWeighting(3, momentum=0.5)
    b.load_state_dict(state)
    assert torch.equal(b.get_weights(), a.get_weights())
    assert torch.equal(b.update(BATCH_2), a.update(BATCH_2))


def test_update_accepts_higher_dim_logits_without_grad():
    z = torch.randn(2, 4, 2, 3, 3, requires_grad=True)
    out = SimiSWeighting(4, momentum=0.0).update(z)
    counts = torch.bincount(z.argmax(1).reshape(-1), minlength=4).double()
    pi = counts / counts.sum()
    assert torch.allclose(out, (4 * (pi.max() - pi)).float())
    assert not out.requires_grad


@pytest.mark.parametrize("kwargs", [{"num_classes": 1}, {"num_classes": 3, "momentum": 1.5},
                                    {"num_classes": 3, "momentum": -0.1}, {"num_classes": 2.5}])
def test_bad_constructor_arguments(kwargs):
    with pytest.raises(ValueError, match="num_classes|momentum"):
        SimiSWeighting(**kwargs)


def test_bad_logits_and_counts():
    w = SimiSWeighting(3)
    with pytest.raises(ValueError, match="logits"):
        w.update(torch.zeros(2, 4, 1, 5))  # wrong C
    with pytest.raises(ValueError, match="logits"):
        w.update(torch.zeros(2, 3))  # no spatial dims
    with pytest.raises(ValueError, match="no voxels"):
        w.update(torch.zeros(0, 3, 1, 5))
    with pytest.raises(ValueError, match="shape"):
        w.init_weights([1, 2])
    with pytest.raises(ValueError, match=">= 0"):
        w.update_counts([1, -1, 2])
    with pytest.raises(ValueError, match="all class counts are 0"):
        w.update_counts([0, 0, 0])
    with pytest.raises(ValueError, match="finite"):
        simis_weights([1.0, float("nan"), 2.0])
    assert torch.equal(w.get_weights(), torch.full((3,), 3.0))  # failed calls leave the state untouched
