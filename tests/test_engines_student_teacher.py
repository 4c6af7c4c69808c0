"""StudentTeacherTrainer (common/engines/student_teacher.py): schedules, views, EMA, frozen layer, clip, errors.

Toy networks over 2-element views keep every gradient and update computable by hand; one test uses the real
DINO head (common/networks/dino_head.py) so that the frozen-name matching meets the parametrised weight names.
"""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Events
from torch import nn
from torch.utils.data import DataLoader

from common.engines.student_teacher import StudentTeacherTrainer, _at, prepare_views
from common.networks.dino_head import DINOHead, MultiCropWrapper

pytestmark = pytest.mark.usefixtures("one_thread")


class ViewsLinear(nn.Module):
    """``y = cat(views) @ w^T + b`` with ``w [1, 2]`` and ``b [1]``; records the views of every call."""

    def __init__(self, weight: tuple[float, float] = (1.0, 2.0), bias: float = 0.0) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        with torch.no_grad():
            self.layer.weight.copy_(torch.tensor([weight]))
            self.layer.bias.fill_(bias)
        self.seen: list[list[torch.Tensor]] = []

    def forward(self, views: list[torch.Tensor]) -> torch.Tensor:
        self.seen.append([v.clone() for v in views])
        return self.layer(torch.cat(list(views)))


class SpyLoss:
    """``L = sum(student output)`` (teacher output multiplied by 0); records the arguments of every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor, dict]] = []

    def __call__(self, student_out: torch.Tensor, teacher_out: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls.append((student_out.detach().clone(), teacher_out.detach().clone(), kwargs))
        return student_out.sum() + 0.0 * teacher_out.sum()


class RecordingSGD(torch.optim.SGD):
    """SGD that records ``(lr, weight_decay)`` of every parameter group at each ``step``."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[list[tuple[float, float]]] = []

    def step(self, closure=None):
        self.records.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        return super().step(closure)


# Three views of batch size 1: x1 = [1, 2], x2 = [3, 4], x3 = [5, 6].
VIEWS = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]), torch.tensor([5.0, 6.0])]


def loader(n_batches: int = 1, views: list[torch.Tensor] = VIEWS) -> DataLoader:
    """``n_batches`` batches ``{"image": [V tensors [1, 2]]}`` by the default collation of per-sample view lists."""
    return DataLoader([{"image": [v.clone() for v in views]} for _ in range(n_batches)], batch_size=1)


def make_trainer(student: nn.Module, teacher: nn.Module, optimizer: torch.optim.Optimizer, loss=None,
                 n_batches: int = 1, max_epochs: int = 1, views: list[torch.Tensor] = VIEWS,
                 **kwargs) -> StudentTeacherTrainer:
    kwargs.setdefault("momentum", 0.5)
    return StudentTeacherTrainer(device=torch.device("cpu"), max_epochs=max_epochs,
                                 train_data_loader=loader(n_batches, views), network=student, teacher=teacher,
                                 optimizer=optimizer, loss_function=loss or SpyLoss(), decollate=False, **kwargs)


# ------------------------------------------------------------------------------------------------ helpers


def test_at_constant_list_and_past_the_end():
    assert _at(0.7, 5) == 0.7  # a constant stays constant
    assert _at([0.1, 0.2, 0.3], 1) == 0.2
    assert _at([0.1, 0.2, 0.3], 10) == 0.3  # past the end: the last value


def test_prepare_views_lists_a_single_tensor_and_refuses_bad_input():
    views, label = prepare_views({"image": torch.ones(2, 3, 4, 4)})
    assert label is None and len(views) == 1 and views[0].shape == (2, 3, 4, 4)
    views, _ = prepare_views({"image": [torch.ones(1, 2), torch.zeros(1, 2)]}, device="cpu")
    assert [v.sum().item() for v in views] == [2.0, 0.0]
    with pytest.raises(ValueError, match="non-empty list of view tensors"):
        prepare_views({"image": []})
    with pytest.raises(ValueError, match="non-empty list of view tensors"):
        prepare_views({"image": "not views"})


# ------------------------------------------------------------------------------------------------ one step


def test_one_step_sgd_then_ema_by_hand_and_output_keys():
    student, teacher = ViewsLinear((1.0, 2.0), 0.0), ViewsLinear((2.0, -2.0), 1.0)
    optimizer = torch.optim.SGD(student.parameters(), lr=999.0)  # overwritten by the schedule
    trainer = make_trainer(student, teacher, optimizer, lr_schedule=[0.1], momentum=[0.5],
                           loss_schedules={"teacher_temp": [0.04]})
    trainer.run()
    # L = sum_v (w . x_v + b): dL/dw = x1 + x2 + x3 = [9, 12], dL/db = 3.
    # SGD lr 0.1: w' = [1 - 0.9, 2 - 1.2] = [0.1, 0.8], b' = 0 - 0.3 = -0.3.
    assert torch.allclose(student.layer.weight, torch.tensor([[0.1, 0.8]]))
    assert torch.allclose(student.layer.bias, torch.tensor([-0.3]))
    # EMA with lambda 0.5 towards the *updated* student: w_t = 0.5 [2, -2] + 0.5 [0.1, 0.8] = [1.05, -0.6],
    # b_t = 0.5 * 1 + 0.5 * (-0.3) = 0.35.
    assert torch.allclose(teacher.layer.weight, torch.tensor([[1.05, -0.6]]))
    assert torch.allclose(teacher.layer.bias, torch.tensor([0.35]))
    assert all(not p.requires_grad for p in teacher.parameters())
    output = trainer.state.output
    assert set(output) == {"loss", "lr", "momentum", "teacher_temp"}
    # loss = (1*1 + 2*2) + (1*3 + 2*4) + (1*5 + 2*6) = 5 + 11 + 17 = 33
    assert output["loss"].item() == pytest.approx(33.0)
    assert not output["loss"].requires_grad
    assert output["lr"] == pytest.approx(0.1)
    assert output["momentum"] == 0.5 and output["teacher_temp"] == 0.04


def test_teacher_sees_only_the_first_views_and_student_all():
    student, teacher = ViewsLinear(), ViewsLinear()
    loss = SpyLoss()
    make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.0), loss=loss,
                 n_teacher_views=2).run()
    assert len(teacher.seen) == 1 and len(student.seen) == 1
    assert [v.tolist() for v in teacher.seen[0]] == [[[1.0, 2.0]], [[3.0, 4.0]]]
    assert [v.tolist() for v in student.seen[0]] == [[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]
    student_out, teacher_out, _ = loss.calls[0]
    # the loss gets the student's 3 rows and the teacher's 2: teacher w = [1, 2], b = 0 -> [5, 11]
    assert student_out.shape == (3, 1) and teacher_out.flatten().tolist() == [5.0, 11.0]


# ------------------------------------------------------------------------------------------------ schedules


def test_lr_on_every_group_and_weight_decay_on_group_zero_per_step():
    student, teacher = ViewsLinear(), ViewsLinear()
    optimizer = RecordingSGD([{"params": [student.layer.weight]},
                              {"params": [student.layer.bias], "weight_decay": 0.0}], lr=1.0, weight_decay=0.5)
    loss = SpyLoss()
    # 2 batches x 2 epochs = 4 iterations, schedules of 3 values: step 3 takes the last value.
    trainer = make_trainer(student, teacher, optimizer, loss=loss, n_batches=2, max_epochs=2,
                           lr_schedule=[0.3, 0.2, 0.1], weight_decay_schedule=[0.04, 0.05, 0.06],
                           loss_schedules={"teacher_temp": [0.01, 0.02, 0.03], "scale": 2.0})
    trainer.run()
    assert optimizer.records == [
        [(0.3, 0.04), (0.3, 0.0)],
        [(0.2, 0.05), (0.2, 0.0)],
        [(0.1, 0.06), (0.1, 0.0)],
        [(0.1, 0.06), (0.1, 0.0)],
    ]
    assert [kwargs for _, _, kwargs in loss.calls] == [
        {"teacher_temp": 0.01, "scale": 2.0},
        {"teacher_temp": 0.02, "scale": 2.0},
        {"teacher_temp": 0.03, "scale": 2.0},
        {"teacher_temp": 0.03, "scale": 2.0},
    ]
    assert trainer.state.output["teacher_temp"] == 0.03 and trainer.state.output["scale"] == 2.0


def test_no_schedule_leaves_the_optimiser_values():
    student, teacher = ViewsLinear(), ViewsLinear()
    optimizer = RecordingSGD(student.parameters(), lr=0.25, weight_decay=0.125)
    make_trainer(student, teacher, optimizer).run()
    assert optimizer.records == [[(0.25, 0.125)]]


def test_momentum_schedule_per_step():
    # lambda = [0, 1]: step 0 copies the student into the teacher, step 1 keeps the teacher.
    student, teacher = ViewsLinear((1.0, 2.0), 0.0), ViewsLinear((7.0, 7.0), 7.0)
    trainer = make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), n_batches=2,
                           momentum=[0.0, 1.0])
    snapshots = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: snapshots.append(teacher.layer.weight.detach().clone()))
    trainer.run()
    # step 0: w_s = [1, 2] - 0.1 [9, 12] = [0.1, 0.8] and w_t = w_s; step 1: w_t stays [0.1, 0.8]
    assert torch.allclose(snapshots[0], torch.tensor([[0.1, 0.8]]))
    assert torch.allclose(snapshots[1], torch.tensor([[0.1, 0.8]]))
    assert trainer.state.output["momentum"] == 1.0
    # while the student moved on: w_s = [0.1, 0.8] - 0.1 [9, 12] = [-0.8, -0.4]
    assert torch.allclose(student.layer.weight, torch.tensor([[-0.8, -0.4]]))


# ------------------------------------------------------------------------------------------------ gradients


def tiny_dino() -> MultiCropWrapper:
    """Flatten + Linear(2 -> 4) backbone and a 2-layer DINO head (bottleneck 3, 5 prototypes)."""
    return MultiCropWrapper(nn.Sequential(nn.Flatten(), nn.Linear(2, 4)),
                            DINOHead(4, out_dim=5, hidden_dim=6, bottleneck_dim=3, n_layers=2))


def test_frozen_last_layer_does_not_move_until_the_given_iteration():
    torch.manual_seed(0)
    student = tiny_dino()
    teacher = tiny_dino()
    teacher.load_state_dict(student.state_dict())
    direction = "projection_head.last_layer.parametrizations.weight.original1"
    params = dict(student.named_parameters())
    assert direction in params  # the real parametrised name contains "last_layer"
    target = torch.randn(3, 5)

    def loss(student_out, teacher_out, **_):
        return (student_out * target).sum() + 0.0 * teacher_out.sum()

    trainer = make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.5), loss=loss,
                           n_batches=3, freeze_until_iteration=2, frozen_names=("last_layer",))
    history = [{k: p.detach().clone() for k, p in params.items()}]
    trainer.add_event_handler(Events.ITERATION_COMPLETED,
                              lambda e: history.append({k: p.detach().clone() for k, p in params.items()}))
    trainer.run()
    # steps 0 and 1 (< freeze_until_iteration = 2): the last layer's direction keeps its value; the backbone moves
    assert torch.equal(history[1][direction], history[0][direction])
    assert torch.equal(history[2][direction], history[0][direction])
    assert not torch.equal(history[1]["backbone.1.weight"], history[0]["backbone.1.weight"])
    assert not torch.equal(history[1]["projection_head.mlp.0.weight"], history[0]["projection_head.mlp.0.weight"])
    # step 2: its gradient is kept and SGD moves it
    assert not torch.equal(history[3][direction], history[2][direction])


def test_grad_clip_is_called_with_the_student_parameters_holding_gradients():
    student, teacher = ViewsLinear(), ViewsLinear()
    calls = []

    def clip(parameters):
        parameters = list(parameters)
        calls.append(([id(p) for p in parameters], [p.grad.clone() for p in parameters]))
        for p in parameters:
            p.grad.mul_(0.5)  # the step must use the clipped gradient

    make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), grad_clip=clip).run()
    assert len(calls) == 1
    ids, grads = calls[0]
    assert ids == [id(p) for p in student.parameters()]
    # raw gradients dL/dw = [9, 12], dL/db = 3 (see the one-step test)
    assert grads[0].tolist() == [[9.0, 12.0]] and grads[1].tolist() == [3.0]
    # halved: w' = [1, 2] - 0.1 [4.5, 6] = [0.55, 1.4]
    assert torch.allclose(student.layer.weight, torch.tensor([[0.55, 1.4]]))


# ------------------------------------------------------------------------------------------------ errors


def test_non_finite_loss_raises_naming_the_iteration():
    student, teacher = ViewsLinear(), ViewsLinear()

    def loss(student_out, teacher_out, **_):
        scale = float("nan") if len(calls) == 1 else 1.0  # finite at ignite iteration 1, NaN at iteration 2
        calls.append(scale)
        return scale * student_out.sum()

    calls: list[float] = []
    trainer = make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), loss=loss, n_batches=2)
    with pytest.raises(FloatingPointError, match=r"at iteration 2 \(epoch 1\)"):
        trainer.run()
    # the failing step changed nothing: w after step 0 only = [1, 2] - 0.1 [9, 12] = [0.1, 0.8]
    assert torch.allclose(student.layer.weight, torch.tensor([[0.1, 0.8]]))


def test_fewer_views_than_the_teacher_needs_raises():
    student, teacher = ViewsLinear(), ViewsLinear()
    trainer = make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), n_teacher_views=2,
                           views=VIEWS[:1])
    with pytest.raises(ValueError, match="1 views in the batch, the teacher needs 2"):
        trainer.run()


def test_n_teacher_views_below_one_is_refused():
    student, teacher = ViewsLinear(), ViewsLinear()
    with pytest.raises(ValueError, match="n_teacher_views must be >= 1, got 0"):
        make_trainer(student, teacher, torch.optim.SGD(student.parameters(), lr=0.1), n_teacher_views=0)
