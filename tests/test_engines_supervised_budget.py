"""Supervised baseline over label budgets (specs/sparsam.md §6.2, §6.5): rows, split, weights, errors."""

import logging

import numpy as np
import pytest
import torch
from ignite.engine import Engine, Events
from PIL import Image
from torch import nn

from common.engines.supervised_budget import (
    KeepBestWeights,
    balanced_accuracy_metric,
    class_weights,
    split_train_validation,
    supervised_budget_sweep,
)

pytestmark = pytest.mark.usefixtures("one_thread")

COLOURS = ((0.8, 0.1, 0.1), (0.1, 0.8, 0.1), (0.1, 0.1, 0.8))  # class 0 red, 1 green, 2 blue


def _write_items(folder, counts, rng):
    """``counts[c]`` 16x16 PNGs of colour ``COLOURS[c]`` plus uniform noise in [-0.1, 0.1]."""
    folder.mkdir()
    items = []
    for label, count in enumerate(counts):
        for i in range(count):
            pixels = np.clip(np.array(COLOURS[label]) + rng.uniform(-0.1, 0.1, (16, 16, 3)), 0, 1)
            path = folder / f"c{label}_{i}.png"
            Image.fromarray((pixels * 255).astype(np.uint8)).save(path)
            items.append({"image": str(path), "label": label})
    return items


@pytest.fixture(scope="module")
def colour_items(tmp_path_factory):
    """Training classes of 6 / 4 / 2 images, test 4 images per class."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    return _write_items(root / "train", (6, 4, 2), rng), _write_items(root / "test", (4, 4, 4), rng)


def load_png(item):
    image = torch.from_numpy(np.asarray(Image.open(item["image"]), dtype=np.float32) / 255.0).permute(2, 0, 1)
    return {"image": image, "label": item["label"]}


def tiny_net():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))


def sweep(train, test, **kwargs):
    options = dict(budgets=(3,), n_draws=1, seed=0, network_factory=tiny_net, train_transform=load_png,
                   eval_transform=load_png, epochs=1, batch_size=4)
    options.update(kwargs)
    return supervised_budget_sweep(train, test, **options)


def test_class_weights_by_hand():
    # counts 6, 3: 1/c = 1/6, 1/3 (sum 1/2) -> 2 * (1/6, 1/3) / (1/2) = (2/3, 4/3), summing to C = 2
    assert torch.allclose(class_weights([0] * 6 + [1] * 3, 2), torch.tensor([2 / 3, 4 / 3]))
    # counts 1, 2, 4: 1/c = 1, 1/2, 1/4 (sum 7/4) -> 3 * (1, 1/2, 1/4) / (7/4) = (12/7, 6/7, 3/7)
    assert torch.allclose(class_weights(np.array([2, 1, 2, 0, 2, 1, 2]), 3), torch.tensor([12 / 7, 6 / 7, 3 / 7]))


def test_class_weights_refuse_an_empty_class_and_bad_labels():
    with pytest.raises(ValueError, match=r"class\(es\) \[1\]"):
        class_weights([0, 0, 2], 3)
    with pytest.raises(ValueError, match="0..1"):
        class_weights([0, 2], 2)


def test_stratified_split_sizes_and_classes():
    labels = np.array([0] * 5 + [1] * 5)
    train, val = split_train_validation(labels, 0.3, seed=0)
    # floor(0.7 * 10) = 7 training images, 10 - 7 = 3 validation images; stratified: both classes in each part
    assert (len(train), len(val)) == (7, 3)
    assert set(labels[val]) == {0, 1} and set(labels[train]) == {0, 1}
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(10))
    again = split_train_validation(labels, 0.3, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], val)


def test_split_falls_back_to_training_on_everything():
    # 1 image per class: nothing to stratify -> train on all, validate on the same images
    train, val = split_train_validation(np.array([0, 1, 2]), 0.3, seed=0)
    assert train.tolist() == val.tolist() == [0, 1, 2]
    # 2 per class, 3 classes: N_val = 6 - floor(0.7 * 6) = 6 - 4 = 2 < 3 classes -> fallback as well
    train, val = split_train_validation(np.array([0, 0, 1, 1, 2, 2]), 0.3, seed=0)
    assert train.tolist() == val.tolist() == list(range(6))
    with pytest.raises(ValueError, match="val_fraction"):
        split_train_validation(np.array([0, 1]), 1.0, seed=0)


def test_balanced_accuracy_metric_by_hand():
    eye = torch.eye(3)
    # labels 0 0 1 | 1 1 2, predictions (argmax of one-hot logits) 0 1 1 | 1 0 2, in two batches
    batches = [{"pred": eye[[0, 1, 1]], "label": torch.tensor([0, 0, 1])},
               {"pred": eye[[1, 0, 2]], "label": torch.tensor([1, 1, 2])}]
    engine = Engine(lambda e, batch: batch)
    balanced_accuracy_metric().attach(engine, "ba")
    engine.run(batches, max_epochs=1)
    # recalls: class 0 1/2, class 1 2/3, class 2 1/1 -> (1/2 + 2/3 + 1) / 3 = 13/18
    assert engine.state.metrics["ba"] == pytest.approx(13 / 18)


def test_keep_best_weights_keeps_the_best_epoch_not_the_last():
    network = nn.Linear(1, 1, bias=False)
    scores = [0.5, 0.9, 0.7, 0.9]  # the tie at epoch 4 keeps epoch 2
    engine = Engine(lambda e, b: None)

    @engine.on(Events.EPOCH_COMPLETED)
    def fake_validation(e):
        network.weight.data.fill_(float(e.state.epoch))  # weight = epoch number
        e.state.metrics["balanced_accuracy"] = scores[e.state.epoch - 1]

    keeper = KeepBestWeights(network)
    keeper.attach(engine)
    engine.run([0], max_epochs=4)
    assert network.weight.item() == 4.0
    keeper.restore()
    assert (keeper.best_epoch, keeper.best_metric, network.weight.item()) == (2, 0.9, 2.0)


def test_rows_count_n_train_and_log_lines(colour_items, caplog):
    train, test = colour_items
    with caplog.at_level(logging.INFO, logger="common.engines.supervised_budget"):
        rows = sweep(train, test, budgets=(1, 3), n_draws=2, seed=5)
    # 2 budgets x 2 draws = 4 rows; classes of 6/4/2 images: budget 1 -> 1+1+1 = 3, budget 3 -> 3+3+2 = 8
    assert len(rows) == 4
    assert [(r["n_per_class"], r["draw"], r["seed"], r["n_train"]) for r in rows] == [
        (1, 0, 5, 3), (1, 1, 6, 3), (3, 0, 5, 8), (3, 1, 6, 8)]
    assert all(r["classifier"] == "supervised" and 0.0 <= r["balanced_accuracy"] <= 1.0 for r in rows)
    assert sorted(rows[0]) == sorted(["classifier", "n_per_class", "n_train", "draw", "seed", "balanced_accuracy"])
    run_lines = [r.getMessage() for r in caplog.records if "test balanced accuracy" in r.getMessage()]
    assert len(run_lines) == 4 and "n=3 draw 1: n_train 8" in run_lines[3]


def test_reproducible_with_the_seed(colour_items):
    train, test = colour_items
    networks = []

    def recording_factory():
        networks.append(tiny_net())
        return networks[-1]

    rows = [sweep(train, test, seed=seed, network_factory=recording_factory, epochs=2) for seed in (3, 3, 4)]
    weights = [torch.cat([p.detach().flatten() for p in net.parameters()]) for net in networks]
    assert rows[0] == rows[1]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])  # another seed: another init, subset and shuffling


def test_learns_the_colour_task(colour_items):
    train, test = colour_items
    # budget 6 takes everything (6 + 4 + 2 = 12 images: 8 train, 4 validation); colour separates the classes
    rows = sweep(train, test, budgets=(6,), epochs=40, learning_rate=1e-2, weight_decay=0.0)
    assert rows[0]["n_train"] == 12
    assert rows[0]["balanced_accuracy"] > 0.9


def test_bad_input_is_refused(colour_items):
    train, test = colour_items
    with pytest.raises(ValueError, match="train_items is empty"):
        sweep([], test)
    with pytest.raises(ValueError, match="test_items is empty"):
        sweep(train, [])
    with pytest.raises(ValueError, match=r"class\(es\) \[3\] absent"):
        sweep(train, test + [{"image": test[0]["image"], "label": 3}])
    with pytest.raises(ValueError, match="budgets"):
        sweep(train, test, budgets=(0,))
    with pytest.raises(ValueError, match="budgets"):
        sweep(train, test, budgets=())
    with pytest.raises(ValueError, match=r"missing: \[1\]"):
        sweep([item for item in train if item["label"] != 1], test)
