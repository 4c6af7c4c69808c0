"""Atomic checkpoint files, the best-model saver's state across a resume, per-epoch reseeding, the compile switch."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import DataLoader, Dataset
from monai.transforms import Randomizable, Transform
from torch import nn
from torch.utils.data import Sampler

from common.handlers.checkpoint_saver import AtomicCheckpointSaver, AtomicDiskSaver, atomic_write
from common.handlers.epoch_seed import EpochSeed
from common.handlers.training_state import TrainingStateCheckpoint
from common.utils.checkpoints import load_checkpoint, read_state_dict
from common.utils.config import compiled


@pytest.fixture
def restore_umask():
    """Restore the process umask after a test that changes it."""
    before = os.umask(0o022)
    os.umask(before)
    yield
    os.umask(before)


def test_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"w": torch.tensor([1.0, 2.0])}, "ignored_name.pt")
    old = (tmp_path / "model.pt").read_bytes()

    def killed_mid_write(obj, f, **kwargs):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(torch, "save", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        saver({"w": torch.tensor([3.0])}, "ignored_name.pt")
    assert (tmp_path / "model.pt").read_bytes() == old  # untouched, not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # the temporary file was removed
    monkeypatch.undo()
    assert torch.equal(torch.load(tmp_path / "model.pt", weights_only=True)["w"], torch.tensor([1.0, 2.0]))


def test_fixed_name_is_replaced_not_removed(tmp_path):
    saver = AtomicDiskSaver(tmp_path, filename="model.pt")
    saver({"w": torch.zeros(1)}, "x.pt")
    saver.remove("model_key_metric=0.5000.pt")  # what ignite calls before saving a better model
    assert (tmp_path / "model.pt").is_file()
    free = AtomicDiskSaver(tmp_path)
    free({"w": torch.zeros(1)}, "epoch=1.pt")
    free.remove("epoch=1.pt")
    assert not (tmp_path / "epoch=1.pt").exists()


def test_file_mode_follows_umask(tmp_path, restore_umask):
    # a plain open() gives 0o666 & ~umask: 0o666 & ~0o022 = 0o644, 0o666 & ~0o077 = 0o600
    os.umask(0o022)
    atomic_write(tmp_path / "a.pt", lambda f: f.write(b"x"))
    assert stat.S_IMODE((tmp_path / "a.pt").stat().st_mode) == 0o644
    os.umask(0o077)
    atomic_write(tmp_path / "b.pt", lambda f: f.write(b"x"))
    assert stat.S_IMODE((tmp_path / "b.pt").stat().st_mode) == 0o600


def test_atomic_write_names_a_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        atomic_write(tmp_path / "nowhere" / "model.pt", lambda f: f.write(b"x"))


def _validate(saver: AtomicCheckpointSaver, score: float) -> None:
    """One 'validation' epoch whose key metric ``dice`` is ``score``, with ``saver`` attached."""
    evaluator = Engine(lambda engine, batch: None)
    evaluator.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: engine.state.metrics.update(dice=score))
    saver.attach(evaluator)
    evaluator.run([0], max_epochs=1)


def _best_saver(root: Path, net: nn.Module) -> AtomicCheckpointSaver:
    return AtomicCheckpointSaver(str(root), {"model": net}, save_key_metric=True, key_metric_name="dice",
                                 key_metric_filename="model.pt")


def test_best_score_survives_a_resume(tmp_path):
    net = nn.Linear(1, 1, bias=False)
    nn.init.constant_(net.weight, 1.0)
    first = _best_saver(tmp_path, net)
    _validate(first, 0.8)
    state_file = tmp_path / "state.pt"
    torch.save({"saver": first.state_dict()}, state_file)  # as in a training-state file
    state = torch.load(state_file, weights_only=True)["saver"]
    assert [score for score, _ in state["_saved"]] == [0.8]

    nn.init.constant_(net.weight, 2.0)  # the resumed run's weights
    resumed = _best_saver(tmp_path, net)
    resumed.load_state_dict(state)
    _validate(resumed, 0.5)  # worse than 0.8: model.pt keeps weight 1
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 1.0
    _validate(resumed, 0.9)  # better than 0.8: model.pt now holds weight 2
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 2.0

    other = nn.Linear(1, 1, bias=False)
    nn.init.constant_(other.weight, 3.0)
    _validate(_best_saver(tmp_path, other), 0.5)  # without the restored state even 0.5 counts as a best score
    assert torch.load(tmp_path / "model.pt", weights_only=True)["weight"].item() == 3.0


def test_saver_without_key_metric_has_empty_state(tmp_path):
    saver = AtomicCheckpointSaver(str(tmp_path), {"model": nn.Linear(1, 1)}, save_final=True, final_filename="m.pt")
    assert saver.state_dict() == {"_saved": []}
    saver.load_state_dict({"_saved": []})
    best = _best_saver(tmp_path, nn.Linear(1, 1))
    with pytest.raises(ValueError, match="_saved"):
        best.load_state_dict({"saved": []})


def test_training_state_holds_the_scaler_and_the_saver(tmp_path, restore_umask):
    os.umask(0o077)  # ignite's own atomic save would give 0o644 here (it adds group/other read whatever the umask)
    net = nn.Linear(1, 1)
    best = _best_saver(tmp_path, net)
    _validate(best, 0.25)
    trainer = Engine(lambda engine, batch: None)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)  # as MONAI trainers hold it under AMP
    TrainingStateCheckpoint(tmp_path, {"model": net, "checkpoint_saver": best}).attach(trainer)
    trainer.run([0], max_epochs=1)
    assert stat.S_IMODE((tmp_path / "training_state_epoch=1.pt").stat().st_mode) == 0o600  # 0o666 & ~0o077
    state = torch.load(tmp_path / "training_state_epoch=1.pt", weights_only=True)
    assert state["scaler"]["scale"] == 1024.0
    assert [score for score, _ in state["checkpoint_saver"]["_saved"]] == [0.25]
    assert state["trainer"]["iteration"] == 1  # one batch, one epoch


def test_training_state_leaves_out_objects_a_setting_does_not_build(tmp_path):
    # a single-network method has no second optimiser: the config names optimizer_b = None
    net = nn.Linear(1, 1)
    trainer = Engine(lambda engine, batch: None)
    TrainingStateCheckpoint(tmp_path, {"model": net, "optimizer_b": None}).attach(trainer)
    trainer.run([0], max_epochs=1)
    state = torch.load(tmp_path / "training_state_epoch=1.pt", weights_only=True)
    assert sorted(state) == ["model", "trainer"]


class _NotAWeight:
    """An arbitrary pickled object: the weights-only reader must still refuse it."""


def test_state_dict_is_read_from_a_train_script_file_with_numpy_scalars(tmp_path):
    """A file like the official FCBFormer train.py writes: the weights under "model_state_dict" (with DataParallel's
    "module." prefix) beside numpy scalars; readable under numpy 2 and numpy 1 module names, nothing else allowed."""
    weights = {"module.conv.weight": torch.randn(2, 1, 3, 3), "module.conv.bias": torch.zeros(2)}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    train_py = {"epoch": 3, "model_state_dict": weights, "optimizer_state_dict": optimizer.state_dict(),
                "loss": np.float64(0.25), "test_measure_mean": np.mean([0.8, 0.9])}
    path = tmp_path / "train_py.pt"
    torch.save(train_py, path)
    loaded = read_state_dict(path)
    assert list(loaded) == ["conv.weight", "conv.bias"]
    assert all(torch.equal(loaded[k], weights[f"module.{k}"]) for k in loaded)
    assert load_checkpoint(path)["loss"] == 0.25
    # numpy 1 pickles its scalars as numpy.core.multiarray.scalar (legacy format: plain-text globals)
    torch.save(train_py, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    assert torch.equal(read_state_dict(path)["conv.weight"], weights["module.conv.weight"])
    torch.save({**train_py, "extra": _NotAWeight()}, path)
    with pytest.raises(ValueError, match="could not read checkpoint"):
        read_state_dict(path)


class _Draw(Randomizable, Transform):
    """A MONAI random transform: each item gets one draw of its own ``RandomState``."""

    def randomize(self, data=None) -> None:
        self.value = self.R.random_sample()

    def __call__(self, x):
        self.randomize()
        return {"x": x, "r": self.value}


class _EpochSampler(Sampler[int]):
    """In order; records the epochs it is given."""

    def __init__(self, n: int) -> None:
        self.n, self.epochs = n, []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __iter__(self):
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _epoch_draws(seeded: bool, resume_at: int, warm_up: int) -> dict[int, list]:
    """Draws of the iterations of epochs 1 to 3, keyed by epoch; an epoch is 1 batch of 2 out of the loader's 2
    (without a restart, epoch 2 would take the second batch of epoch 1's iterator).

    ``resume_at`` > 0 starts the engine as a run resumed after that epoch; ``warm_up`` random numbers are drawn
    from every generator before the loader is built (a different history)."""
    torch.rand(warm_up)
    np.random.rand(warm_up)
    random.sample(range(100), warm_up)
    loader = DataLoader(Dataset(list(range(4)), transform=_Draw()), batch_size=2, shuffle=True, num_workers=0)
    extra = Dataset([0], transform=_Draw())
    draws: dict[int, list] = {}

    def step(engine: Engine, batch) -> None:
        draws.setdefault(engine.state.epoch, []).append(
            (batch["x"].tolist(), batch["r"].tolist(), extra[0]["r"], torch.rand(()).item(), np.random.rand(),
             random.random()))

    engine = Engine(step)
    if seeded:
        EpochSeed(seed=7, loaders=[DataLoader(extra)]).attach(engine)
    if resume_at:
        engine.load_state_dict({"epoch": resume_at, "max_epochs": 3, "epoch_length": 1})
    engine.run(loader, max_epochs=3, epoch_length=1)
    return draws


def test_epoch_seed_makes_an_epoch_independent_of_history():
    torch.manual_seed(0)
    fresh = _epoch_draws(seeded=True, resume_at=0, warm_up=1)
    resumed = _epoch_draws(seeded=True, resume_at=1, warm_up=5)
    assert list(resumed) == [2, 3]
    assert resumed[2] == fresh[2] and resumed[3] == fresh[3]
    # the first draws of epoch 3 come from generators seeded with seed + epoch = 7 + 3 = 10 (random and numpy are
    # not used by the loader; the torch generator is, so only its equality above is checked)
    assert fresh[3][0][5] == random.Random(10).random()
    assert fresh[3][0][4] == np.random.RandomState(10).rand()
    # epochs differ from each other: seeds 8, 9, 10
    assert fresh[1][0][5] == random.Random(8).random() != fresh[2][0][5]
    # the same comparison without EpochSeed fails, so the equality above is the handler's doing
    unseeded_fresh = _epoch_draws(seeded=False, resume_at=0, warm_up=1)
    assert _epoch_draws(seeded=False, resume_at=1, warm_up=5)[2] != unseeded_fresh[2]


def test_epoch_seed_gives_each_rank_its_own_stream(monkeypatch):
    monkeypatch.setattr("common.handlers.epoch_seed.idist.get_rank", lambda: 2)
    firsts = []
    engine = Engine(lambda e, b: firsts.append(random.random()))
    EpochSeed(seed=7).attach(engine)
    engine.run([0], max_epochs=1)
    assert firsts == [random.Random(7 + 1 + 2 * 2**20).random()]  # seed + epoch + rank * RANK_STRIDE


def test_epoch_seed_sets_sampler_epochs_and_checks_its_seed():
    sampler = _EpochSampler(2)
    engine = Engine(lambda e, b: None)
    EpochSeed(seed=1).attach(engine)
    engine.run(DataLoader(list(range(2)), sampler=sampler), max_epochs=3)
    assert sampler.epochs == [0, 1, 2]  # 0-based epoch e - 1 for e = 1, 2, 3
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed"):
            EpochSeed(seed=bad)


def test_compiled_switch_keeps_the_module():
    net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    keys = list(net.state_dict())
    assert compiled(net, False) is net and net._compiled_call_impl is None
    assert compiled(net, True) is net and net._compiled_call_impl is not None
    assert list(net.state_dict()) == keys  # no "_orig_mod." prefix

    pair = nn.Module()
    pair.branch_a, pair.branch_b = nn.Linear(1, 1), nn.Linear(1, 1)
    assert compiled(pair, True, ["branch_a", "branch_b"]) is pair
    assert pair._compiled_call_impl is None
    assert pair.branch_a._compiled_call_impl is not None and pair.branch_b._compiled_call_impl is not None
    with pytest.raises(ValueError, match="branch_c"):
        compiled(pair, True, ["branch_c"])
