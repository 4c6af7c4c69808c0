"""Fuzzy-rank class-wise sampling and the "acisis" (Basak et al.) DHC baseline against hand-computed values
(specs/dhc.md §9 row "acisis")."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from common.engines.co_training import CoTrainingTrainer, RepeatedRandomSampler
from common.engines.dhc_baselines.acisis import ACISIS
from common.losses.cld_sampling import sampling_rates
from common.losses.fuzzy_rank_sampling import (
    ConfidenceArray,
    class_confidence,
    class_score_sums,
    fuzzy_rank_scores,
    gompertz_rank,
    stabilised_sampling_mask,
)
from common.networks.vnet import DualVNet

pytestmark = pytest.mark.usefixtures("one_thread")


def log_probs(rows: list[list[float]]) -> torch.Tensor:
    """Logits ``[1, C, 1, 1, V]`` whose softmax at voxel ``v`` is ``rows[v]`` (rows sum to 1)."""
    return torch.log(torch.tensor(rows)).T.reshape(1, len(rows[0]), 1, 1, len(rows))


# three voxels, C = 3: v0 GT 0 p = [.5, .25, .25]; v1 GT 0 p = [.25, .5, .25]; v2 GT 2 p = [.25, .25, .5]
LABELLED = log_probs([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25], [0.25, 0.25, 0.5]])
LABEL = torch.tensor([0, 0, 2]).reshape(1, 1, 1, 1, 3)


def test_gompertz_rank_values():
    # R(x) = 1 - exp(-exp(-2x)):  x = 0: exp(0) = 1, 1 - e^-1 = 0.6321206
    #   x = 0.1: exp(-0.2) = 0.8187308, exp(-0.8187308) = 0.4409910 -> 0.5590090
    #   x = 0.4: exp(-0.8) = 0.4493290, exp(-0.4493290) = 0.6380562 -> 0.3619438
    #   x = 1:   exp(-2) = 0.1353353,   exp(-0.1353353) = 0.8734230 -> 0.1265770
    values = gompertz_rank(torch.tensor([0.0, 0.1, 0.4, 1.0]))
    assert values.tolist() == pytest.approx([0.6321206, 0.5590090, 0.3619438, 0.1265770], abs=1e-6)


def test_fuzzy_rank_fusion_by_hand():
    # rows = metrics (M = 3), columns = classes (C = 4), top_k = 3: the class with the smallest score of each row
    # (largest Gompertz rank) gets the penalty 0.632 and score 0.
    scores = torch.tensor([[0.4, 0.3, 0.2, 0.1],
                           [0.1, 0.2, 0.3, 0.4],
                           [0.3, 0.1, 0.4, 0.2]])
    # R(0.1) = 1 - exp(-0.8187308) = 0.5590090, R(0.2) = 1 - exp(-0.6703200) = 1 - 0.5115448 = 0.4884552,
    # R(0.3) = 1 - exp(-0.5488116) = 1 - 0.5776358 = 0.4223642, R(0.4) = 0.3619438
    # penalised: row 0 class 3, row 1 class 0, row 2 class 1
    # FR = [.3619438 + .632 + .4223642, .4223642 + .4884552 + .632, .4884552 + .4223642 + .3619438,
    #       .632 + .3619438 + .4884552] = [1.4163080, 1.5428194, 1.2727632, 1.4823990]
    # CCF = 1 - (kept scores)/3 = [1 - .7/3, 1 - .5/3, 1 - .9/3, 1 - .6/3] = [.7666667, .8333333, .7, .8]
    # F = FR * CCF = [1.0858361, 1.2856828, 0.8909342, 1.1859192]
    fused = fuzzy_rank_scores(scores, top_k=3)
    assert fused.tolist() == pytest.approx([1.0858361, 1.2856828, 0.8909342, 1.1859192], abs=1e-6)
    # top_k >= C: nothing penalised; FR = sum of the ranks, CCF = 1 - column mean
    # class 0: R = .3619438 + .5590090 + .4223642 = 1.3433170, CCF = 1 - .8/3 = .7333333 -> 0.9850991
    assert float(fuzzy_rank_scores(scores, top_k=12)[0]) == pytest.approx(0.9850991, abs=1e-6)
    # ties at the k-th value are all kept: a constant row with top_k = 1 keeps every class
    # R(0.25) = 1 - exp(-exp(-0.5)) = 1 - exp(-0.6065307) = 1 - 0.5452392 = 0.4547608; CCF = 1 - 0.25 = 0.75
    tied = fuzzy_rank_scores(torch.full((1, 4), 0.25), top_k=1)
    assert tied.tolist() == pytest.approx([0.4547608 * 0.75] * 4, abs=1e-6)


def test_class_confidence_normalises_with_a_softmax_then_by_the_max():
    # mean scores ln [4, 3, 2, 1] etc. -> softmax rows [.4, .3, .2, .1], ... = the rows of the fusion test above
    mean = torch.log(torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 3.0, 4.0], [3.0, 1.0, 4.0, 2.0]]))
    # F / max F = [1.0858361, 1.2856828, 0.8909342, 1.1859192] / 1.2856828
    assert class_confidence(mean, top_k=3).tolist() == pytest.approx([0.8445599, 1.0, 0.6929658, 0.9224042],
                                                                     abs=1e-6)


def test_sampling_rates_by_hand():
    # 1 - CC = [1, .5, .25, 0], max 1 -> ratios ^ 2.5 = [1, .5^2.5 = 0.1767767, .25^2.5 = 0.03125, 0]
    rates = sampling_rates(torch.tensor([0.0, 0.5, 0.75, 1.0]), 2.5)
    assert rates.tolist() == pytest.approx([1.0, 0.1767767, 0.03125, 0.0], abs=1e-6)
    # only the ratio to the largest gap matters: 1 - CC = [.5, .25] -> [1, .5^1 = .5] with exponent 1
    assert sampling_rates(torch.tensor([0.5, 0.75]), 1.0).tolist() == pytest.approx([1.0, 0.5], abs=1e-6)


def test_sampling_mask_times_confidence_with_a_given_uniform_tensor():
    logits = log_probs([[0.7, 0.1, 0.1, 0.1], [0.2, 0.6, 0.1, 0.1], [0.1, 0.1, 0.5, 0.3], [0.1, 0.1, 0.1, 0.7]])
    rates = torch.tensor([1.0, 0.1767767, 0.03125, 0.0])
    uniform = torch.tensor([0.5, 0.9, 0.5, 0.99]).reshape(1, 1, 1, 4)
    # keep if u > 1 - s: v0 class 0: .5 > 0 kept, .7^1.5 = 0.5856620;  v1 class 1: .9 > .8232233 kept,
    #   .6^1.5 = 0.4647580;  v2 class 2: .5 <= .96875 dropped;  v3 class 3: .99 <= 1 dropped
    mask = stabilised_sampling_mask(logits, rates, uniform)
    assert mask.shape == (1, 1, 1, 4)
    assert mask.flatten().tolist() == pytest.approx([0.5856620, 0.4647580, 0.0, 0.0], abs=1e-6)
    # beta = 0: the kept voxels get weight 1
    assert stabilised_sampling_mask(logits, rates, uniform, 0.0).flatten().tolist() == [1.0, 1.0, 0.0, 0.0]
    # the drawn mask keeps class c with probability s_c: all of class 0 (s = 1), none of class 3 (s = 0)
    drawn = ConfidenceArray(4, refresh_iters=1)
    drawn.rates.copy_(rates)
    assert drawn.sampling_mask(logits).flatten()[[0, 3]].tolist() == pytest.approx([0.5856620, 0.0], abs=1e-6)


def test_class_score_sums_by_hand():
    # sum_k ln p_k = ln .5 + 2 ln .25 = -0.6931472 - 2.7725887 = -3.4657359 for every voxel
    # entropy: class 0 = .5 (-3.4657359) + .25 (-3.4657359) = -2.5993019; class 2 = .5 (-3.4657359) = -1.7328680
    # confidence: class 0 = .5 + .25 = .75, class 2 = .5;  variance: class 0 = (.5 - .5) + (.5 - .25) = .25
    sums, counts = class_score_sums(LABELLED, LABEL)
    assert counts.tolist() == [2.0, 0.0, 1.0]
    assert sums[0].tolist() == pytest.approx([-2.5993019, 0.0, -1.7328680], abs=1e-5)
    assert sums[1].tolist() == pytest.approx([0.75, 0.0, 0.5], abs=1e-6)
    assert sums[2].tolist() == pytest.approx([0.25, 0.0, 0.0], abs=1e-6)
    # each voxel is paired with its own label: swapping the two patches of a batch swaps nothing in the sums
    batch = torch.cat([LABELLED, log_probs([[1 / 3] * 3] * 3)])
    labels = torch.cat([LABEL, torch.ones_like(LABEL)])
    sums2, counts2 = class_score_sums(batch, labels)
    # uniform patch: class 1 gets 3 voxels of confidence 1/3, gap 0, entropy 1/3 * 3 ln(1/3) = -1.0986123 each
    assert counts2.tolist() == [2.0, 3.0, 1.0]
    assert sums2[:, 1].tolist() == pytest.approx([-3.2958369, 1.0, 0.0], abs=1e-5)
    assert torch.allclose(sums2[:, [0, 2]], sums[:, [0, 2]])


def test_confidence_array_refresh_by_hand():
    array = ConfidenceArray(3, refresh_iters=2, top_k=2)  # momentum .99, gamma 2.5
    assert array.rates.tolist() == [1.0, 1.0, 1.0] and array.class_conf.tolist() == [0.0, 0.0, 0.0]
    assert array.update(LABELLED, LABEL).tolist() == [1.0, 1.0, 1.0]  # window not full: rates unchanged
    assert int(array.iterations) == 1
    rates = array.update(LABELLED, LABEL)  # 2nd iteration: refresh
    # mean over the 2 iterations = class means: entropy [-2.5993019/2, 0, -1.7328680] = [-1.2996510, 0, -1.7328680],
    #   confidence [.375, 0, .5], variance [.125, 0, 0]
    # softmax rows: exp(entropy) = [.2726269, 1, .1767767] / 1.4494036 = [.1880959, .6899389, .1219651]
    #   exp(conf) = [1.4549914, 1, 1.6487213] / 4.1037127 = [.3545549, .2436818, .4017633]
    #   exp(var) = [1.1331485, 1, 1] / 3.1331485 = [.3616645, .3191678, .3191678]
    # R = 1 - exp(-exp(-2S)): row 0 exp(-2S) = [.6864706, .2516093, .7835423] -> R = [.4966505, .2224515, .5432149]
    #   row 1 [.4920821, .6142437, .4477471] -> [.3886478, .4589501, .3609337]
    #   row 2 [.4851346, .5281708, .5281708] -> [.3843857, .4103174, .4103174]
    # top 2 (smallest R): row 0 keeps classes 0, 1 (class 2 -> .632); row 1 keeps 0, 2 (class 1 -> .632);
    #   row 2: 2nd smallest is .4103174, shared by classes 1 and 2 -> all three kept (tie)
    # FR = [.4966505 + .3886478 + .3843857, .2224515 + .632 + .4103174, .632 + .3609337 + .4103174]
    #    = [1.2696840, 1.2647689, 1.4032511]
    # CCF = [1 - (.1880959 + .3545549 + .3616645)/3, 1 - (.6899389 + .3191678)/3, 1 - (.4017633 + .3191678)/3]
    #     = [.6985616, .6636311, .7596896]
    # F = [.8869525, .8393400, 1.0660353] -> CC_cur = F / 1.0660353 = [.8320104, .7873472, 1]
    # CC = .99 * 0 + .01 CC_cur = [.0083201, .0078735, .01]
    # 1 - CC = [.9916799, .9921265, .99] / .9921265 = [.9995498, 1, .9978566] -> ^2.5 = [.9988749, 1, .9946501]
    assert array.class_conf.tolist() == pytest.approx([0.0083201, 0.0078735, 0.01], abs=1e-6)
    assert rates.tolist() == pytest.approx([0.9988749, 1.0, 0.9946501], abs=1e-6)
    assert int(array.iterations) == 0 and float(array.score_sums.abs().sum()) == 0.0  # window emptied
    with pytest.raises(RuntimeError, match="no iteration recorded"):
        array.refresh()


def test_confidence_array_state_round_trip():
    array = ConfidenceArray(3, refresh_iters=2, top_k=2)
    keys = set(array.state_dict())
    assert keys == {"score_sums", "iterations", "class_conf", "rates"}
    array.update(LABELLED, LABEL)  # mid-window state
    buffer = io.BytesIO()
    torch.save(array.state_dict(), buffer)
    restored = ConfidenceArray(3, refresh_iters=2, top_k=2)
    restored.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert int(restored.iterations) == 1
    # the restored window completes exactly like the original one
    assert torch.equal(restored.update(LABELLED, LABEL), array.update(LABELLED, LABEL))


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="top_k"):
        fuzzy_rank_scores(torch.rand(3, 4), top_k=0)
    with pytest.raises(ValueError, match="penalty"):
        fuzzy_rank_scores(torch.rand(3, 4), top_k=2, penalty=1.5)
    with pytest.raises(ValueError, match=r"\[M, C\]"):
        fuzzy_rank_scores(torch.rand(4), top_k=2)
    with pytest.raises(ValueError, match="confidence_exponent"):
        stabilised_sampling_mask(LABELLED, torch.ones(3), torch.rand(1, 1, 1, 3), -1.0)
    with pytest.raises(ValueError, match="uniform"):
        stabilised_sampling_mask(LABELLED, torch.ones(3), torch.rand(1, 1, 1, 2))
    with pytest.raises(ValueError, match="rates"):
        stabilised_sampling_mask(LABELLED, torch.ones(4), torch.rand(1, 1, 1, 3))
    with pytest.raises(ValueError, match="rate_exponent"):
        ConfidenceArray(3, refresh_iters=1, rate_exponent=-1.0)
    with pytest.raises(ValueError, match="target shape"):
        class_score_sums(LABELLED, torch.zeros(1, 1, 1, 1, 2))
    with pytest.raises(ValueError, match=r"target values must lie in \[0, 3\)"):
        class_score_sums(LABELLED, torch.full((1, 1, 1, 1, 3), 3))
    with pytest.raises(ValueError, match="refresh_iters"):
        ConfidenceArray(3, refresh_iters=0)
    with pytest.raises(ValueError, match="momentum"):
        ConfidenceArray(3, refresh_iters=1, momentum=1.5)
    with pytest.raises(ValueError, match="num_classes"):
        ConfidenceArray(1, refresh_iters=1)
    with pytest.raises(ValueError, match="expected num_classes=4"):
        ConfidenceArray(4, refresh_iters=1).update(LABELLED, LABEL)
    with pytest.raises(ValueError, match="ema_max"):
        ACISIS(3, refresh_iters=1, ema_max=2.0)


class FixedLogits(nn.Module):
    """``forward(x)`` = ``scale * logits[:len(x)]`` whatever the values of ``x`` (one trainable scalar)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.logits[: x.shape[0]]


def stub_pair() -> tuple[FixedLogits, FixedLogits, torch.Tensor, torch.Tensor]:
    """C = 3; one labelled and one unlabelled patch of 2 voxels each."""
    student = FixedLogits(torch.cat([log_probs([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]]),    # labelled, GT [0, 2]
                                     log_probs([[0.5, 0.25, 0.25], [0.25, 0.25, 0.5]])]))  # unlabelled
    teacher = FixedLogits(log_probs([[0.2, 0.6, 0.2], [0.1, 0.2, 0.7]]))  # pseudo labels [1, 2]
    return student, teacher, torch.zeros(2, 1, 1, 1, 2), torch.tensor([0, 2]).reshape(1, 1, 1, 1, 2)


def test_acisis_loss_by_hand():
    student, teacher, image, label = stub_pair()
    method = ACISIS(3, refresh_iters=5)  # rates stay 1 in the first iteration: every voxel kept
    out = method(student, teacher, image, label, consistency=0.1, epoch=0)
    # sup: CE = (-ln .5 - ln .5) / 2 = 0.6931472; Dice (batch, smooth 1, no bg):
    #   class 1: p = [.25, .25], g = [0, 0] -> (0 + 1) / (.5 + 1) = 0.6666667
    #   class 2: p = [.25, .5],  g = [0, 1] -> (2 * .5 + 1) / (.75 + 1 + 1) = 0.7272727
    #   L_Dice = -(0.6666667 + 0.7272727) / 2 = -0.6969697  -> sup = 0.6931472 - 0.6969697 = -0.0038225
    assert float(out["loss_sup"]) == pytest.approx(-0.0038225, abs=1e-6)
    # unlabelled: student max prob .5 at both voxels -> m = .5^1.5 = 0.3535534; teacher pseudo labels [1, 2]
    #   CE = [-ln .25, -ln .5] = [1.3862944, 0.6931472]; L_u = .3535534 (1.3862944 + .6931472) / 2 = 0.3675968
    assert out["pseudo"].flatten().tolist() == [1, 2]
    assert out["mask"].flatten().tolist() == pytest.approx([0.3535534, 0.3535534], abs=1e-6)
    assert float(out["loss_unsup"]) == pytest.approx(0.3675968, abs=1e-6)
    assert float(out["loss"].detach()) == pytest.approx(-0.0038225 + 0.1 * 0.3675968, abs=1e-6)
    # the gradient reaches the student only
    out["loss"].backward()
    assert student.scale.grad is not None and torch.isfinite(student.scale.grad)
    assert teacher.scale.grad is None
    # class 0 never sampled: the voxel predicted as 0 drops out -> L_u = .3535534 * .6931472 / 2 = 0.1225323
    method.confidence.rates.copy_(torch.tensor([0.0, 1.0, 1.0]))
    out = method(student, teacher, image, label, consistency=0.1, epoch=0)
    assert float(out["loss_unsup"]) == pytest.approx(0.1225323, abs=1e-6)


def test_acisis_teacher_ema_momentum():
    method = ACISIS(3, refresh_iters=1)
    student, teacher, _, _ = stub_pair()
    with torch.no_grad():
        teacher.scale.fill_(0.0)
    assert method.momentum(0) == 0.0  # 1 - 1/1: epoch 0 copies the student
    method.after_step(student, teacher, epoch=1)  # alpha = 1 - 1/2 = .5 -> .5 * 0 + .5 * 1
    assert teacher.scale.item() == pytest.approx(0.5)
    method.after_step(student, teacher, epoch=500)  # alpha = min(1 - 1/501, .99) = .99 -> .99 * .5 + .01 = .505
    assert teacher.scale.item() == pytest.approx(0.505)
    with pytest.raises(ValueError, match="epoch"):
        method.momentum(-1)


def test_acisis_on_tiny_vnets_and_in_the_trainer():
    torch.manual_seed(0)
    patch, classes = (16, 16, 32), 4  # bottleneck 1x1x2: BatchNorm in train mode needs > 1 value per channel
    net = DualVNet(1, classes, 2, has_dropout=True).train()
    method = ACISIS(classes, refresh_iters=3)
    assert ACISIS.trains_b is False and ACISIS.uses_b is True
    image, label = torch.randn(2, 1, *patch), torch.randint(0, classes, (1, 1, *patch))
    out = method(net.branch_a, net.branch_b, image, label, consistency=0.1, epoch=0)
    assert torch.isfinite(out["loss"]) and out["pred"].shape == (2, classes, *patch)
    assert out["mask"].shape == (1, *patch) and out["pseudo"].shape == (1, *patch)
    out["loss"].backward()
    assert all(p.grad is not None for p in net.branch_a.parameters())
    assert all(p.grad is None for p in net.branch_b.parameters())
    with pytest.raises(ValueError, match="expects num_classes=3"):
        ACISIS(3, refresh_iters=1)(net.branch_a, net.branch_b, image, label.clamp(max=2), 0.1, 0)
    with pytest.raises(ValueError, match="labelled patches first"):
        method(net.branch_a, net.branch_b, image, torch.cat([label] * 3), 0.1, 0)
    # one epoch of the co-training engine: 3 batches of 2 + 2, 2 + 2, 1 + 1 patches = one refresh window
    gen = torch.Generator().manual_seed(0)
    labelled = [{"image": torch.randn(1, *patch, generator=gen),
                 "label": torch.randint(0, classes, (1, *patch), generator=gen)} for _ in range(2)]
    unlabelled = [{"image": torch.randn(1, *patch, generator=gen)} for _ in range(5)]
    method = ACISIS(classes, refresh_iters=3)
    engine = CoTrainingTrainer(
        device=torch.device("cpu"), max_epochs=1, network=net, loss_function=None, decollate=False,
        train_data_loader=torch.utils.data.DataLoader(labelled, batch_size=2, sampler=RepeatedRandomSampler(2, 5)),
        unlabelled_loader=torch.utils.data.DataLoader(unlabelled, batch_size=2),
        optimizer=torch.optim.SGD(net.branch_a.parameters(), lr=0.01), method=method, base_lr=0.01)
    assert engine.optimizers == [engine.optimizer]
    engine.run()
    # the window of 3 iterations was refreshed once: CC = .01 CC_cur > 0, rates in (0, 1] with a maximum of 1
    assert int(method.confidence.iterations) == 0
    assert bool((method.confidence.class_conf > 0).all()) and float(method.confidence.class_conf.max()) <= 0.01
    assert float(method.confidence.rates.max()) == pytest.approx(1.0) and bool((method.confidence.rates > 0).all())
    assert {"confidence.class_conf", "confidence.rates"} <= set(method.state_dict())
    # epoch 0: alpha = 0, the teacher is the student after every step
    assert all(torch.equal(s, t) for s, t in zip(net.branch_a.parameters(), net.branch_b.parameters()))
    assert math.isfinite(engine.state.output["loss"].item())
