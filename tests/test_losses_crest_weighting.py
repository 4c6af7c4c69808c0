"""CReST class weights of the DHC "crest" baseline against values worked out by hand (specs/dhc.md §9)."""

import io

import pytest
import torch
import torch.nn.functional as F

from common.losses.crest_weighting import CReSTWeighting, crest_weights


def _logits(counts, shape):
    """One-hot logits [B, C, *spatial] whose arg-max histogram is ``counts`` (voxels shuffled; only counts matter)."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]
    b, *spatial = shape
    return F.one_hot(labels.reshape(b, *spatial), len(counts)).movedim(-1, 1).float() * 3.0


def test_crest_weights_by_hand():
    # N = [8, 1, 27]: mu = (N / 27)^(1/3) = [2/3, 1/3, 1]; frequency order (desc) = [2, 0, 1]
    #   rank 0 (class 2) <- mu of rank 2 (class 1) = 1/3; rank 1 (class 0) <- mu of rank 1 = 2/3;
    #   rank 2 (class 1) <- mu of rank 0 (class 2) = 1   -> w = [2/3, 1, 1/3]
    assert crest_weights([8, 1, 27]).tolist() == pytest.approx([2 / 3, 1, 1 / 3], abs=1e-7)
    # alpha = 1: mu = N / 27 = [8/27, 1/27, 1] -> w = [8/27, 1, 1/27]
    assert crest_weights([8, 1, 27], alpha=1.0).tolist() == pytest.approx([8 / 27, 1, 1 / 27], abs=1e-7)
    # absent class: mu_2 = (1e-8 / (8 + 1e-8))^(1/3) = (1.25e-9)^(1/3) = 1.0772173e-3; N = [1, 8, 0]:
    #   mu = [1/2, 1, 1.0772e-3], order [1, 0, 2] -> class 1 <- 1.0772e-3, class 0 <- 1/2, class 2 <- 1
    assert crest_weights([1, 8, 0]).tolist() == pytest.approx([0.5, 1.0772173e-3, 1.0], abs=1e-7)
    # all equal: mu = 1 for every class -> w = 1; all zero: (1e-8 / 1e-8) = 1 -> w = 1
    assert crest_weights([4, 4, 4]).tolist() == pytest.approx([1, 1, 1])
    assert crest_weights([0, 0]).tolist() == pytest.approx([1, 1])


def test_crest_ties_are_broken_by_class_index():
    # N = [5, 5, 1]: mu = [1, 1, 0.2^(1/3) = 0.5848035]; stable order [0, 1, 2] ->
    #   class 0 <- mu of rank 2 = 0.5848, class 1 <- rank 1 = 1, class 2 <- rank 0 = 1
    assert crest_weights([5, 5, 1]).tolist() == pytest.approx([0.5848035, 1, 1], abs=1e-6)
    # N = [1, 5, 5]: stable order [1, 2, 0] -> class 1 <- 0.5848, class 2 <- 1, class 0 <- 1
    assert crest_weights([1, 5, 5]).tolist() == pytest.approx([1, 0.5848035, 1], abs=1e-6)
    # four classes, two tied pairs: N = [3, 24, 3, 24]: mu = [1/2, 1, 1/2, 1], order [1, 3, 0, 2]
    #   class 1 <- mu[2] = 1/2, class 3 <- mu[0] = 1/2, class 0 <- mu[3] = 1, class 2 <- mu[1] = 1
    assert crest_weights([3, 24, 3, 24]).tolist() == pytest.approx([1, 0.5, 1, 0.5], abs=1e-7)


def test_init_and_ema_over_two_updates():
    crest = CReSTWeighting(3)  # m = 0.99, alpha = 1/3
    assert crest.get_weights().tolist() == [1, 1, 1]
    with pytest.raises(RuntimeError, match="init_weights"):
        crest.update(_logits([1, 8, 0], (1, 1, 3, 3)))
    # labelled GT counts [8, 1, 27] -> w0 = [2/3, 1, 1/3]
    assert crest.init_weights([8, 1, 27]).tolist() == pytest.approx([2 / 3, 1, 1 / 3], abs=1e-6)
    # update 1: arg-max counts [1, 8, 0] (9 voxels) -> w_cur = [.5, 1.0772173e-3, 1]
    #   w1 = .99 [2/3, 1, 1/3] + .01 [.5, .0010772, 1] = [.66 + .005, .99 + .0000108, .33 + .01]
    #      = [.665, .9900108, .34]
    w1 = crest.update(_logits([1, 8, 0], (1, 1, 3, 3)))
    assert w1.dtype == torch.float32
    assert w1.tolist() == pytest.approx([0.665, 0.99001077, 0.34], abs=1e-6)
    # update 2: counts [27, 1, 8] (36 voxels, B = 2) -> mu = [1, 1/3, 2/3], order [0, 2, 1]
    #   -> w_cur = [1/3, 1, 2/3];  w2 = .99 w1 + .01 w_cur
    #   = [.65835 + .0033333, .9801107 + .01, .3366 + .0066667] = [.6616833, .9901107, .3432667]
    w2 = crest.update(_logits([27, 1, 8], (2, 1, 3, 6)))
    assert w2.tolist() == pytest.approx([0.6616833, 0.9901107, 0.3432667], abs=1e-6)
    assert torch.equal(crest.get_weights(), w2)
    # the returned vector is a copy, not the buffer
    w2.zero_()
    assert crest.get_weights().tolist() == pytest.approx([0.6616833, 0.9901107, 0.3432667], abs=1e-6)


def test_momentum_zero_gives_current_weights():
    crest = CReSTWeighting(3, momentum=0.0)
    crest.init_weights([1, 1, 1])
    assert crest.update_counts([8, 1, 27]).tolist() == pytest.approx([2 / 3, 1, 1 / 3], abs=1e-6)


def test_state_dict_round_trip():
    def fresh():
        module = CReSTWeighting(3)
        module.init_weights([8, 1, 27])
        return module

    module = fresh()
    for i in range(3):
        module.update_counts([10 + i, 20 - 3 * i, 5 * i])
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    restored = CReSTWeighting(3)  # not initialised: the flag comes back from the state dict
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(restored.initialised)
    assert torch.equal(restored.get_weights(), module.get_weights())
    expected = module.update_counts([3, 2, 1])
    assert torch.equal(restored.update_counts([3, 2, 1]), expected)
    assert not torch.allclose(fresh().update_counts([3, 2, 1]), expected)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        CReSTWeighting(1)
    with pytest.raises(ValueError, match="momentum"):
        CReSTWeighting(3, momentum=1.5)
    with pytest.raises(ValueError, match="alpha"):
        CReSTWeighting(3, alpha=0.0)
    with pytest.raises(ValueError, match="alpha"):
        crest_weights([1, 2], alpha=-1.0)
    with pytest.raises(ValueError, match="counts"):
        crest_weights([3])
    with pytest.raises(ValueError, match="counts"):
        crest_weights([1, -2, 3])
    with pytest.raises(ValueError, match="counts"):
        crest_weights([[1, 2], [3, 4]])
    crest = CReSTWeighting(3)
    with pytest.raises(ValueError, match="counts must be 3 values"):
        crest.init_weights([1, 2])
    crest.init_weights([1, 2, 3])
    with pytest.raises(ValueError, match="logits must be"):
        crest.update(torch.zeros(2, 4, 1, 3, 3))
    with pytest.raises(ValueError, match="logits must be"):
        crest.update(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="no voxels"):
        crest.update(torch.zeros(0, 3, 1, 2, 2))
