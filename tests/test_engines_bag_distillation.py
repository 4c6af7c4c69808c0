"""common.engines.bag_distillation: teacher + student phases on tiny synthetic bags, schedule flags, the bag evaluator's
AUCs on a constructed case and the per-bag CSV export (specs/endoked.md §2.4-§2.7, §7 rows 3 and 5)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import read_csv
from ignite.engine import Events
from monai.handlers import ROCAUC, from_engine
from torch import nn
from torch.utils.data import DataLoader

from common.engines.bag_distillation import (
    BagDistillationEvents,
    BagDistillationTrainer,
    BagEvaluator,
    BagScoreWriter,
    InstanceAUC,
    build_optimizers,
    write_bag_scores,
)
from common.losses.mil_distillation import abmil_bag_loss, dsmil_bag_loss
from common.networks.mil import AttentionMILHead, DSMILHead, EndoKEDMIL, InstanceClassifierHead

pytestmark = pytest.mark.usefixtures("one_thread")

SIZES, LABELS = (3, 4, 5, 3), (1, 0, 1, 0)  # four bags: two positive, two negative


def bags() -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [{"image": torch.randn(n, 3, 64, 64, generator=gen) + y, "label": y, "exam_id": f"E{i}",
             "image_paths": [f"E{i}/{j}.jpg" for j in range(n)]}
            for i, (n, y) in enumerate(zip(SIZES, LABELS))]


def loaders() -> tuple[DataLoader, DataLoader]:
    items = bags()
    instances = [{"image": img, "label": b["label"]} for b in items for img in b["image"]]
    return DataLoader(items, batch_size=1), DataLoader(instances, batch_size=4)


def trainer(max_epochs: int = 1, network: nn.Module | None = None, **kwargs) -> BagDistillationTrainer:
    torch.manual_seed(0)
    bag_loader, instance_loader = loaders()
    return BagDistillationTrainer(device="cpu", max_epochs=max_epochs, train_data_loader=bag_loader,
                                  network=network or EndoKEDMIL(), instance_loader=instance_loader, **kwargs)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(module: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(v, before[k]) for k, v in module.state_dict().items() if v.is_floating_point())


def watch_teacher_mode(engine: BagDistillationTrainer) -> list[bool]:
    """``training`` flags of teacher 1 at every forward of the student phase."""
    modes: list[bool] = []
    engine.network.teacher1.register_forward_pre_hook(
        lambda m, _: modes.append(m.training) if engine.student_engine.state.iteration else None)
    return modes


def test_one_epoch_teacher_then_student_phase():
    engine = trainer()
    net = engine.network
    initial = {p: snapshot(getattr(net, p)) for p in ("encoder", "teacher1", "teacher2", "student")}
    teacher_out, student_out, student_during_teacher = [], [], []
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: (
        teacher_out.append(e.state.output), student_during_teacher.append(changed(net.student, initial["student"]))))
    engine.student_engine.add_event_handler(Events.ITERATION_COMPLETED,
                                            lambda e: student_out.append(e.state.output))
    bn_stats = {}
    engine.add_event_handler(BagDistillationEvents.STUDENT_STARTED,
                             lambda e: bn_stats.setdefault("before", snapshot(net.teacher1.classifier)))
    modes = watch_teacher_mode(engine)
    engine.run()

    # teacher phase: one finite loss per bag, the student untouched while it runs
    assert len(teacher_out) == 4 and all(math.isfinite(float(o["loss"])) for o in teacher_out)
    assert not any(student_during_teacher)
    assert [o["exam_id"] for o in teacher_out] == ["E0", "E1", "E2", "E3"]
    # recorded ranges = min / max of every instance score the teacher phase produced (15 instances)
    for t, key in enumerate(("teacher1_scores", "teacher2_scores")):
        scores = torch.cat([o[key].reshape(-1) for o in teacher_out])
        assert scores.numel() == 15
        assert engine.score_ranges[t] == pytest.approx((float(scores.min()), float(scores.max())))
    # student phase: ceil(15 / 4) = 4 batches; negative-bag instances get 0, positive ones sum_t 0.5 * [1e-5, 1-1e-5]
    assert len(student_out) == 4
    targets = torch.cat([o["pseudo_label"] for o in student_out])
    labels = torch.cat([o["label"] for o in student_out])
    assert torch.all(targets[labels == 0] == 0)
    assert torch.all((targets[labels == 1] >= 1e-5 - 1e-7) & (targets[labels == 1] <= 1 - 1e-5 + 1e-7))
    losses = [float(o["loss"]) for o in student_out]
    assert all(math.isfinite(v) for v in losses)
    assert engine.state.metrics["student_loss"] == pytest.approx(sum(losses) / 4)
    # teacher heads in eval mode while labelling (default), so their BatchNorm statistics do not move
    assert modes and not any(modes)
    assert not changed(net.teacher1.classifier, bn_stats["before"])
    # every part was trained
    assert all(changed(getattr(net, p), initial[p]) for p in initial)


def test_student_period_and_smooth_epochs():
    engine = trainer(max_epochs=3, student_period=2, smooth_epochs=0)
    student_epochs, skipped = [], []
    engine.add_event_handler(BagDistillationEvents.STUDENT_COMPLETED, lambda e: student_epochs.append(e.state.epoch))
    engine.add_event_handler(Events.ITERATION_COMPLETED,
                             lambda e: skipped.append((e.state.epoch, e.state.output["exam_id"],
                                                       e.state.output["skipped"])))
    engine.run()
    # 0-based epochs 0, 1, 2: the student runs when e % 2 == 0 -> ignite epochs 1 and 3
    assert student_epochs == [1, 3]
    # smoothE = 0: positive bags (E0, E2) are skipped when e > 0, i.e. in ignite epochs 2 and 3
    assert [s for s in skipped if s[2]] == [(2, "E0", True), (2, "E2", True), (3, "E0", True), (3, "E2", True)]
    assert len(skipped) == 12


class _EpochEndProbe:
    """A train handler reading the student loss when the epoch ends (as a validation or checkpoint handler would)."""

    def __init__(self):
        self.seen = []

    def attach(self, engine):
        engine.add_event_handler(Events.EPOCH_COMPLETED,
                                 lambda e: self.seen.append(e.state.metrics.get("student_loss")))


def test_train_handlers_see_the_epoch_after_the_student_phase():
    probe = _EpochEndProbe()
    trainer(train_handlers=[probe]).run()
    assert len(probe.seen) == 1 and probe.seen[0] is not None and math.isfinite(probe.seen[0])


def test_faithful_flags_run_and_label_in_train_mode():
    net = EndoKEDMIL(student_returns_features=True)
    engine = trainer(network=net, teachers_train_mode_for_labels=True, dsmil_softmax_twice=False,
                     student_neg_weight=1.0)
    bn_stats = {}
    engine.add_event_handler(BagDistillationEvents.STUDENT_STARTED,
                             lambda e: bn_stats.setdefault("before", snapshot(net.teacher1.classifier)))
    modes = watch_teacher_mode(engine)
    top_layer = snapshot(net.student.top_layer)
    engine.run()
    assert math.isfinite(engine.state.metrics["student_loss"])
    assert modes and all(modes)  # teacher heads in train mode while labelling (§7 row 5)
    assert changed(net.teacher1.classifier, bn_stats["before"])  # so BatchNorm running statistics moved
    assert not changed(net.student.top_layer, top_layer)  # the faithful student never uses its top layer


def test_trainer_rejects_bad_input():
    with pytest.raises(ValueError, match="must hold the modules"):
        trainer(network=nn.Linear(2, 2))
    net = EndoKEDMIL()
    with pytest.raises(ValueError, match="optimizers must have the keys"):
        trainer(network=net, optimizers={"encoder": torch.optim.SGD(net.encoder.parameters(), lr=0.1)})
    bad = BagDistillationTrainer(device="cpu", max_epochs=1, network=net,
                                 train_data_loader=[{"image": torch.zeros(2, 3, 64, 64), "label": torch.tensor([1]),
                                                     "exam_id": ["X7"]}],
                                 instance_loader=[{"image": torch.zeros(2, 3, 64, 64), "label": torch.ones(2)}])
    with pytest.raises(ValueError, match=r"bag 'X7'.*\[1, N, 3, H, W\]"):
        bad.run()


class _Mean(nn.Module):
    def forward(self, x):  # [N, 3, H, W] -> [N, 1]
        return x.mean(dim=(1, 2, 3)).unsqueeze(1)


class _BagHead(nn.Module):
    def __init__(self, pool):
        super().__init__()
        self.pool = pool

    def forward(self, h):  # bag logits [0, pool(h)] -> prob sigmoid(pool(h))
        return torch.stack([torch.zeros(()), self.pool(h)]).unsqueeze(0), h.transpose(0, 1)


class _Student(nn.Module):
    def forward(self, h):  # logits [0, h] -> instance prob sigmoid(h)
        return torch.cat([torch.zeros_like(h), h], dim=1)


class _Stub(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = _Mean()
        self.teacher1 = _BagHead(lambda h: h.mean())
        self.teacher2 = _BagHead(lambda h: -h.max())
        self.student = _Student()


def constructed_bags() -> DataLoader:
    def bag(exam, values, label, instance_labels=None):
        item = {"image": torch.stack([torch.full((3, 4, 4), v) for v in values]), "label": label, "exam_id": exam,
                "image_paths": [f"{exam}/{i}.jpg" for i in range(len(values))]}
        if instance_labels is not None:
            item["instance_label"] = torch.tensor(instance_labels)
        return item

    items = [bag("A", [2.0, -1.0], 1, [1, 0]), bag("B", [-3.0, 3.0], 0), bag("C", [0.5], 1, [1]),
             bag("D", [1.0], 0, [0])]
    return DataLoader(items, batch_size=1)


def bag_auc(key: str = "student") -> ROCAUC:
    return ROCAUC(output_transform=from_engine([f"{key}_prob", "label"]))


def test_bag_evaluator_aucs_and_score_csvs(tmp_path):
    auc = {k: bag_auc(k) for k in ("teacher1", "teacher2")}
    evaluator = BagEvaluator(device="cpu", val_data_loader=constructed_bags(), network=_Stub(),
                             key_val_metric={"bag_auc": bag_auc()},
                             additional_metrics={**auc, "instance_auc": InstanceAUC()},
                             val_handlers=[BagScoreWriter(tmp_path)])
    evaluator.run()
    m = evaluator.state.metrics
    # student bag score = max instance value: A 2 (+), B 3 (-), C 0.5 (+), D 1 (-)
    # pairs (+ > -): (2>3 no) (2>1 yes) (0.5>3 no) (0.5>1 no) -> AUC 1/4
    assert m["bag_auc"] == pytest.approx(0.25)
    # teacher 1 = mean: A 0.5, B 0, C 0.5, D 1 -> (0.5>0 yes) (0.5>1 no) twice -> 2/4
    assert m["teacher1"] == pytest.approx(0.5)
    # teacher 2 = -max: A -2, B -3, C -0.5, D -1 -> (-2>-3 yes) (-2>-1 no) (-0.5>-3 yes) (-0.5>-1 yes) -> 3/4
    assert m["teacher2"] == pytest.approx(0.75)
    # instances with known labels: + {2 (A), 0.5 (C)}, - {-1 (A), 1 (D)}; B's unknown instances are left out
    # (2>-1) (2>1) (0.5>-1) yes, (0.5>1) no -> 3/4 (counting B's -3, 3 as negatives would give 5/8)
    assert m["instance_auc"] == pytest.approx(0.75)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["A_gt1.csv", "B_gt0.csv", "C_gt1.csv", "D_gt0.csv"]
    rows = read_csv(tmp_path / "A_gt1.csv")
    assert list(rows[0]) == ["0", "1"]
    # instance probabilities sigmoid(2) = 0.880797, sigmoid(-1) = 0.268941
    assert [r["0"] for r in rows] == ["A/0.jpg", "A/1.jpg"]
    assert [float(r["1"]) for r in rows] == pytest.approx([0.880797, 0.268941], abs=1e-6)


def test_bag_evaluator_on_the_real_network_after_training():
    engine = trainer()
    engine.run()
    bag_loader, _ = loaders()
    outputs = []
    evaluator = BagEvaluator(device="cpu", val_data_loader=bag_loader, network=engine.network,
                             key_val_metric={"bag_auc": bag_auc()})
    evaluator.add_event_handler(Events.ITERATION_COMPLETED, lambda e: outputs.append(e.state.output))
    evaluator.run()
    assert 0.0 <= evaluator.state.metrics["bag_auc"] <= 1.0
    assert [o["instance_prob"].shape[0] for o in outputs] == list(SIZES)
    assert all(torch.equal(o["instance_label"], torch.full((n,), -1)) for o, n in zip(outputs, SIZES))
    assert all(float(o["student_prob"]) == float(o["instance_prob"].max()) for o in outputs)
    assert outputs[1]["image_paths"] == ["E1/0.jpg", "E1/1.jpg", "E1/2.jpg", "E1/3.jpg"]


def test_instance_auc_needs_a_known_label():
    metric = InstanceAUC()
    metric.reset()
    metric.update((torch.tensor([0.3, 0.7]), torch.tensor([-1, -1])))
    with pytest.raises(Exception, match="no instance with a known label"):
        metric.compute()


def test_write_bag_scores_names_and_columns(tmp_path):
    path = write_bag_scores("exam_12", ["a.jpg", "b.jpg"], torch.tensor([0.25, 0.875]), torch.tensor([0]), tmp_path)
    assert path == tmp_path / "exam_12_gt0.csv"
    assert read_csv(path) == [{"0": "a.jpg", "1": "0.25"}, {"0": "b.jpg", "1": "0.875"}]
    assert write_bag_scores("exam_13", ["c.jpg"], [0.5], 1, tmp_path).name == "exam_13_gt1.csv"
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    with pytest.raises(ValueError, match="exam_14.*2 image paths and 1 scores"):
        write_bag_scores("exam_14", ["a.jpg", "b.jpg"], [0.5], 1, tmp_path)
    with pytest.raises(ValueError, match="exam_15.*label 2"):
        write_bag_scores("exam_15", ["a.jpg"], [0.5], 2, tmp_path)
    with pytest.raises(ValueError, match="cannot name a file"):
        write_bag_scores("a/b", ["a.jpg"], [0.5], 1, tmp_path)


# ----------------------------------------------------------------------------------------------- two processes
LR = 0.5
# one bag per rank: rank 0 a positive bag of 3 frames, rank 1 a negative bag of 4 frames (8 x 8 pixels)
RANK_BAGS = {0: (3, 1), 1: (4, 0)}


def _tiny_mil(seed: int) -> nn.Module:
    """The four EndoKED-MIL parts at toy width (D = 4, hidden 8) without dropout, initialised from ``seed``."""
    torch.manual_seed(seed)
    net = nn.Module()
    net.encoder = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                nn.Flatten())
    net.teacher1 = AttentionMILHead(4, hidden_features=8, attention_features=4, dropout=0.0)
    net.teacher2 = DSMILHead(4, hidden_features=8, dropout=0.0)
    net.student = InstanceClassifierHead(4, hidden_features=8, dropout=0.0)
    return net


def _rank_bag(rank: int) -> tuple[torch.Tensor, int]:
    n, label = RANK_BAGS[rank]
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(10 + rank)) + label, label


def _distributed_worker(rank: int, store: str, results: dict) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        bag, label = _rank_bag(rank)
        net = _tiny_mil(seed=rank)  # different initial weights per rank: rank 0's must win
        engine = BagDistillationTrainer(
            device="cpu", max_epochs=1, network=net, optimizers=build_optimizers(net, LR),
            train_data_loader=[{"image": bag[None], "label": torch.tensor([label]), "exam_id": [f"R{rank}"]}],
            instance_loader=[{"image": bag, "label": torch.full((bag.shape[0],), label)}])
        out: dict = {}
        engine.add_event_handler(Events.STARTED, lambda e: out.setdefault("start", snapshot(net)))
        engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: out.update(
            teacher_step=snapshot(net), local_ranges=list(engine.score_ranges)))
        engine.add_event_handler(BagDistillationEvents.STUDENT_STARTED,
                                 lambda e: out.update(ranges=list(engine.score_ranges)))
        engine.run()
        out["final"] = snapshot(net)
        results[rank] = out
    finally:
        dist.destroy_process_group()


def _teacher_gradients(net: nn.Module, rank: int) -> dict[str, torch.Tensor]:
    """Gradients of L_T = L_T1 + L_T2 (spec §2.4, lambda = (1, 1)) on rank ``rank``'s bag, computed in this process."""
    net = copy.deepcopy(net)
    bag, label = _rank_bag(rank)
    features = net.encoder(bag)
    logits1, _ = net.teacher1(features)
    logits2, scores2 = net.teacher2(features)
    loss = (abmil_bag_loss(torch.softmax(logits1, dim=1), torch.tensor([float(label)]))
            + dsmil_bag_loss(torch.softmax(logits2, dim=1), scores2, torch.tensor([float(label)])))
    loss.backward()
    return {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in net.named_parameters()}


@pytest.mark.slow
def test_two_ranks_train_one_network(tmp_path):
    """2 gloo processes with different bags and different initial weights: both start from rank 0's weights, the
    teacher step uses the mean of the two ranks' gradients, the student phase the score range over both ranks, and
    both ranks end with the same parameters and BatchNorm statistics."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_distributed_worker, args=(str(tmp_path / "store"), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    rank0_init = dict(_tiny_mil(seed=0).state_dict())
    for key, value in rank0_init.items():  # rank 1 built its network from seed 1 but starts from rank 0's
        assert torch.equal(r1["start"][key], value) and torch.equal(r0["start"][key], value), key
    assert any(not torch.equal(v, _tiny_mil(seed=1).state_dict()[k]) for k, v in rank0_init.items())

    # teacher step: theta_1 = theta_0 - lr * (g_0 + g_1) / 2 over encoder + teachers; the student is not stepped
    net = _tiny_mil(seed=0)
    g0, g1 = _teacher_gradients(net, 0), _teacher_gradients(net, 1)
    assert any(not torch.allclose(g0[n], g1[n]) for n in g0)  # the ranks' own steps would differ
    for name, param in net.named_parameters():
        expected = param.detach() - LR * (g0[name] + g1[name]) / 2 if not name.startswith("student.") \
            else param.detach()
        for out in (r0, r1):
            torch.testing.assert_close(out["teacher_step"][name], expected, rtol=1e-5, atol=1e-7, msg=name)

    # score ranges: rank r recorded (min, max) of its own bag; the student phase uses min of the minima and max of
    # the maxima, the same on both ranks
    local0, local1 = r0["local_ranges"], r1["local_ranges"]
    assert local0 != local1
    expected_ranges = [(min(a[0], b[0]), max(a[1], b[1])) for a, b in zip(local0, local1)]
    assert r0["ranges"] == expected_ranges and r1["ranges"] == expected_ranges  # extremes: exact, no arithmetic

    # after the student phase both ranks hold one network (parameters and BatchNorm buffers), the student trained
    assert set(r0["final"]) == set(r1["final"])
    for key in r0["final"]:
        assert torch.equal(r0["final"][key], r1["final"][key]), key
    assert any(not torch.equal(r0["final"][k], r0["teacher_step"][k]) for k in r0["final"] if k.startswith("student."))
