"""common.engines.co_training: batch composition, schedules, both optimisers, DHC / CPS / UA-MT specifics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.engines.utils import IterationEvents
from torch.utils.data import DataLoader

from common.engines.co_training import (
    CPS,
    DHC,
    UAMT,
    CoTrainingTrainer,
    ProbabilitySlidingWindowInferer,
    RepeatedRandomSampler,
)
from common.engines.co_training_methods import build_method
from common.engines.sliding_window import dhc_sliding_window
from common.networks.vnet import DualVNet

pytestmark = pytest.mark.usefixtures("one_thread")

C = 4
PATCH = (16, 16, 32)  # bottleneck 1x1x2: BatchNorm in train mode needs > 1 value per channel


def loaders(n_labelled: int = 2, n_unlabelled: int = 5) -> tuple[DataLoader, DataLoader]:
    """Labelled images are constant 100 + i (> 0), unlabelled ones constant -(1 + j) (< 0)."""
    gen = torch.Generator().manual_seed(0)
    labelled = [{"image": torch.full((1, *PATCH), 100.0 + i), "label": torch.randint(0, C, (1, *PATCH), generator=gen)}
                for i in range(n_labelled)]
    unlabelled = [{"image": torch.full((1, *PATCH), -(1.0 + j))} for j in range(n_unlabelled)]
    sampler = RepeatedRandomSampler(n_labelled, n_unlabelled)
    return (DataLoader(Dataset(labelled), batch_size=2, sampler=sampler),
            DataLoader(Dataset(unlabelled), batch_size=2, shuffle=True))


def trainer(method_name: str = "dhc", epochs: int = 1, **kwargs) -> CoTrainingTrainer:
    torch.manual_seed(0)
    labelled, unlabelled = loaders()
    net = DualVNet(1, C, 4, has_dropout=True, init_b="xavier" if method_name == "cps" else "kaiming")
    method = build_method(method_name, C, torch.tensor([5000.0, 2000.0, 500.0, 50.0]), max_epochs=epochs)
    opt_a = torch.optim.SGD(net.branch_a.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=3e-5)
    opt_b = torch.optim.SGD(net.branch_b.parameters(), lr=0.03, momentum=0.9, nesterov=True, weight_decay=3e-5)
    return CoTrainingTrainer(device=torch.device("cpu"), max_epochs=epochs, train_data_loader=labelled, network=net,
                             optimizer=opt_a, loss_function=None, unlabelled_loader=unlabelled, method=method,
                             optimizer_b=opt_b, base_lr=0.03, consistency_weight=0.1, decollate=False, **kwargs)


def test_repeated_sampler_repeats_the_labelled_set():
    sampler = RepeatedRandomSampler(2, 5)
    indices = list(sampler)
    # i mod 2 for i = 0..4 -> 0, 1, 0, 1, 0: case 0 three times, case 1 twice, in a shuffled order
    assert len(sampler) == 5 and sorted(indices) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="labelled set is empty"):
        RepeatedRandomSampler(0, 5)


def test_repeated_sampler_set_epoch_replays_an_epoch():
    """A new sampler told the epoch (a resumed run) gives the order the running one gave in that epoch."""
    running = RepeatedRandomSampler(3, 30, seed=4)
    orders = [list(running) for _ in range(3)]  # epochs 0, 1, 2: seeds 4, 5, 6
    assert orders[1] != orders[2]  # a new shuffle every epoch (30 indices: equal orders are vanishingly unlikely)
    resumed = RepeatedRandomSampler(3, 30, seed=4)
    resumed.set_epoch(2)
    assert list(resumed) == orders[2]


def test_batches_are_labelled_first_and_epoch_has_ceil_u_over_2_iterations():
    engine = trainer("cps")
    seen = []
    engine.add_event_handler(IterationEvents.FORWARD_COMPLETED,
                             lambda e: seen.append((e.state.output["image"][:, 0, 0, 0, 0].tolist(),
                                                    e.state.output["label"].shape[0])))
    engine.run()
    # 5 unlabelled cases in batches of 2 -> ceil(5 / 2) = 3 iterations; batches 2+2, 2+2, 1+1
    assert engine.state.iteration == 3
    assert [len(values) for values, _ in seen] == [4, 4, 2]
    for values, n_labelled in seen:
        assert all(v >= 100 for v in values[:n_labelled]) and all(v < 0 for v in values[n_labelled:])
    # every unlabelled case (-1 .. -5) is seen exactly once per epoch
    assert sorted(v for values, n in seen for v in values[n:]) == [-5.0, -4.0, -3.0, -2.0, -1.0]


def test_both_optimisers_step_and_schedules_follow_the_epoch():
    engine = trainer("dhc", epochs=3)
    before_a = [p.detach().clone() for p in engine.network.branch_a.parameters()]
    before_b = [p.detach().clone() for p in engine.network.branch_b.parameters()]
    per_epoch = []
    engine.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: per_epoch.append(
        (e.state.epoch, e.state.output["lr"], e.optimizer_b.param_groups[0]["lr"], e.state.output["consistency"])))
    engine.run()
    assert any(not torch.equal(a, p) for a, p in zip(before_a, engine.network.branch_a.parameters()))
    assert any(not torch.equal(b, p) for b, p in zip(before_b, engine.network.branch_b.parameters()))
    assert all("momentum_buffer" in s for s in engine.optimizer_b.state.values()) and engine.optimizer_b.state
    first = {epoch: values for epoch, *values in per_epoch}
    # epochs 1, 2 (e = 0, 1) run at the base lr; epoch 3 (e = 2) at 0.03 (1 - 1/3)^0.9 = 0.03 * 0.69428 = 0.020828
    assert first[1][:2] == [0.03, 0.03] and first[2][:2] == [0.03, 0.03]
    assert first[3][0] == pytest.approx(0.020828, abs=1e-6) and first[3][1] == first[3][0]
    # lambda: epochs 1, 2 -> 0.1 e^-5 = 6.7379e-4; epoch 3 -> 0.1 exp(-5 (1 - 1/3)^2) = 0.1 e^-2.2222 = 0.010836
    assert first[1][2] == pytest.approx(6.7379e-4, rel=1e-4) and first[2][2] == first[1][2]
    assert first[3][2] == pytest.approx(0.010836, rel=1e-4)


def test_dhc_weights_are_finite_and_updated():
    engine = trainer("dhc")
    method = engine.method
    w_b0 = method.dist_dw.get_weights()
    # DistDW init from counts [5000, 2000, 500, 50]: ln(N_max / N_c) = [0, 0.9163, 2.3026, 4.6052], / 4.6052 * 4
    assert w_b0.tolist() == pytest.approx([0.0, 0.7959, 2.0, 4.0], abs=1e-4)
    outputs = []
    engine.add_event_handler(IterationEvents.MODEL_COMPLETED, lambda e: outputs.append(dict(e.state.output)))
    engine.run()
    first = outputs[0]
    for key in ("weights_a", "weights_b"):
        w = first[key]
        assert torch.isfinite(w).all() and (w >= 0).all() and (w <= C + 1e-6).all()
    assert first["weights_a"].max() == pytest.approx(C)  # DiffDW: w = C w~ / max w~, so its maximum is C
    assert not torch.equal(first["weights_a"], torch.full((C,), float(C)))  # DiffDW overwrote its placeholder
    # DistDW after one update: 0.99 w0 + 0.01 w_cur, w_cur from branch B's arg-max counts on the 2 unlabelled patches
    counts = torch.bincount(first["pseudo_b"][2:].reshape(-1), minlength=C).double()
    log_ratio = torch.log((counts.max() + 1e-8) / (counts + 1e-8))
    expected = 0.99 * w_b0.double() + 0.01 * C * log_ratio / log_ratio.max()
    assert first["weights_b"].double().tolist() == pytest.approx(expected.tolist(), abs=1e-5)
    assert math.isfinite(float(first["loss"]))


def test_cps_pseudo_labels_are_the_other_branch_argmax():
    torch.manual_seed(0)
    net = DualVNet(1, C, 4, init_b="xavier").eval()  # eval: no dropout, so two forwards agree
    x, y = torch.randn(4, 1, *PATCH), torch.randint(0, C, (2, 1, *PATCH))
    out = CPS(C)(net.branch_a, net.branch_b, x, y, 0.5, 0)
    with torch.no_grad():
        z_a, z_b = net.branch_a(x), net.branch_b(x)
    assert torch.equal(out["pseudo_b"], z_b.argmax(1)) and torch.equal(out["pseudo_a"], z_a.argmax(1))
    # with w = 1 the cps CE is the plain mean CE over all 4 patches
    cps = F.cross_entropy(z_a, z_b.argmax(1)) + F.cross_entropy(z_b, z_a.argmax(1))
    assert float(out["loss_unsup"]) == pytest.approx(float(cps), rel=1e-5)
    assert float(out["loss"].detach()) == pytest.approx(float(out["loss_sup"]) + 0.5 * float(cps), rel=1e-5)


def test_uamt_teacher_is_an_ema_of_the_student():
    student, teacher = DualVNet(1, C, 4).branch_a, DualVNet(1, C, 4).branch_b
    with torch.no_grad():
        for p in student.parameters():
            p.fill_(1.0)
        for p in teacher.parameters():
            p.fill_(0.0)
    method = UAMT(C)
    method.after_step(student, teacher, epoch=1)  # alpha = min(1 - 1/2, 0.99) = 0.5 -> 0.5 * 0 + 0.5 * 1
    assert all(torch.allclose(p, torch.full_like(p, 0.5)) for p in teacher.parameters())
    method.after_step(student, teacher, epoch=500)  # alpha = 0.99 -> 0.99 * 0.5 + 0.01 * 1 = 0.505
    assert all(torch.allclose(p, torch.full_like(p, 0.505)) for p in teacher.parameters())
    assert method.threshold(0) == pytest.approx((0.75 + 0.25 * math.exp(-5)) * math.log(2))  # ramp starts at e^-5


def test_uamt_trains_only_the_student():
    engine = trainer("uamt")
    assert engine.optimizers == [engine.optimizer]
    engine.run()
    # after the epoch-0 steps (alpha = 0) the teacher equals the student exactly
    for s, t in zip(engine.network.branch_a.parameters(), engine.network.branch_b.parameters()):
        assert torch.equal(s, t)
    assert all(p.grad is None for p in engine.network.branch_b.parameters())


def test_dual_vnet_and_probability_inferer():
    torch.manual_seed(0)
    net = DualVNet(1, C, 4).eval()
    x = torch.randn(1, 1, 20, 40, 40)
    with torch.no_grad():
        window = x[..., :16, :32, :32]
        assert torch.allclose(net(window), (net.branch_a(window) + net.branch_b(window)) / 2)
        probs = ProbabilitySlidingWindowInferer((16, 32, 32), (4, 8, 8))(x, net)
    expected = dhc_sliding_window(x, [net.branch_a, net.branch_b], (16, 32, 32), (4, 8, 8))
    assert probs.shape == (1, C, 20, 40, 40) and torch.allclose(probs, expected, atol=1e-5)
    with pytest.raises(ValueError, match="init_b"):
        DualVNet(init_b="zeros")


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="unknown co-training method 'mt'"):
        build_method("mt", C)
    with pytest.raises(ValueError, match="labelled_counts"):
        build_method("dhc", C)
    labelled, _ = loaders()
    net = DualVNet(1, C, 4)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="unlabelled loader is empty"):
        CoTrainingTrainer(device="cpu", max_epochs=1, train_data_loader=labelled, network=net, optimizer=opt,
                          loss_function=None, unlabelled_loader=[], method=DHC(C, [10, 5, 2, 1]), optimizer_b=opt)
    with pytest.raises(ValueError, match="method CPS needs a network holding branch_a"):
        CoTrainingTrainer(device="cpu", max_epochs=1, train_data_loader=labelled, network=net.branch_a,
                          optimizer=opt, loss_function=None, unlabelled_loader=[1], method=CPS(C), optimizer_b=opt)
