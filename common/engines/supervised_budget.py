"""Supervised deep-learning baseline over label budgets, trained with MONAI engines.

Nielsen et al., "Self-Supervision for Medical Image Classification: State-of-the-Art Performance with ~100
Labeled Training Samples per Class", Bioengineering 10(8):895, 2023 (specs/sparsam.md §6.2, §6.5, §7).

The SSL features + sklearn classifiers (:mod:`common.metrics.label_budget_sweep`) are compared against a network
trained end to end on the same labelled subsets. For each budget ``n`` (labelled images per class) and draw ``d``
(seed ``s_d = seed + d``):

1. the labelled subset is :func:`common.data.label_budget.subsample_per_class` ``(labels, n, s_d)``, so
   ``n_train = sum_c min(n, N_c)``;
2. it is split 70 / 30 into training and validation parts, stratified by class
   (:func:`split_train_validation`, ``random_state = s_d``);
3. a fresh network from ``network_factory()`` (after ``monai.utils.set_determinism(s_d)``) is trained with
   class-weighted cross-entropy (:func:`class_weights`) and ``AdamW(lr, weight_decay)`` by a
   ``monai.engines.SupervisedTrainer``; a ``ValidationHandler`` runs a ``SupervisedEvaluator`` after every epoch
   and its balanced accuracy (:func:`balanced_accuracy_metric`) selects the best weights (:class:`KeepBestWeights`);
4. those weights score the test items: balanced accuracy ``BA = (1/C) sum_c TP_c / (TP_c + FN_c)``
   (``sklearn.metrics.balanced_accuracy_score``, as for the SSL sweep) → one row
   ``{classifier: "supervised", n_per_class, n_train, draw, seed, balanced_accuracy}``.

Deviations from the released code (spec §6.5, §9.7; its DL gym does not run at HEAD): epochs with one validation
per epoch instead of evaluations every 100 steps with early stopping, no AGC clipping and no plateau LR scheduler;
the augmentation is whatever ``train_transform`` does.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.metrics import EpochMetric
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.utils import set_determinism
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import train_test_split
from torch import nn

from common.data.label_budget import subsample_per_class
from common.metrics.label_budget_sweep import budget_row

__all__ = [
    "CLASSIFIER_NAME",
    "KeepBestWeights",
    "balanced_accuracy_metric",
    "class_weights",
    "split_train_validation",
    "supervised_budget_sweep",
]

logger = logging.getLogger(__name__)

CLASSIFIER_NAME = "supervised"
METRIC_NAME = "balanced_accuracy"


def class_weights(labels: np.ndarray | Sequence[int], n_classes: int) -> torch.Tensor:
    """Cross-entropy class weights ``w_c ∝ 1 / N_c``, rescaled so that ``sum_c w_c = C``.

    ``w_c = C * (1 / N_c) / sum_k (1 / N_k)`` with ``N_c`` the number of ``labels`` equal to ``c``
    (spec §6.5; e.g. counts 6, 3 give ``2 * (1/6, 1/3) / (1/2) = (2/3, 4/3)``).

    Args:
        labels: ``[N]`` integer class indices in ``0..n_classes-1``.
        n_classes: number of classes ``C``.

    Returns:
        float32 tensor ``[C]``.

    Raises:
        ValueError: a label outside ``0..C-1``, or a class without any label (its weight would be infinite).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got shape {labels.shape} and dtype {labels.dtype}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must lie in 0..{n_classes - 1}, got values {np.unique(labels).tolist()}")
    counts = np.bincount(labels, minlength=n_classes)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(f"class(es) {empty.tolist()} have no training image, so their class weight is undefined")
    inverse = 1.0 / counts
    return torch.as_tensor(n_classes * inverse / inverse.sum(), dtype=torch.float32)


def split_train_validation(labels: np.ndarray | Sequence[int], val_fraction: float,
                           seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of a labelled subset into training and validation positions (spec §6.5).

    ``train_test_split(arange(N), train_size=1 - val_fraction, stratify=labels, random_state=seed)``, which
    keeps ``floor((1 - val_fraction) * N)`` images for training and the rest for validation.

    **Fallback:** stratification is impossible when some class has fewer than 2 images (e.g. 1 labelled image per
    class) or when either part would hold fewer images than there are classes (e.g. 2 per class for 3 classes:
    ``N_val = 6 - floor(4.2) = 2 < 3``). Then the whole subset trains the network and the validation "split" is
    the training subset itself, so the best-weight selection sees training balanced accuracy.

    Args:
        labels: ``[N]`` class labels of the subset.
        val_fraction: share of the subset held out for validation, in ``(0, 1)``.
        seed: ``random_state`` of the split.

    Returns:
        ``(train_positions, val_positions)``, sorted integer arrays indexing ``labels``.
    """
    labels = np.asarray(labels)
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    n = len(labels)
    if n == 0:
        raise ValueError("cannot split an empty labelled subset")
    _, counts = np.unique(labels, return_counts=True)
    n_train = math.floor((1.0 - val_fraction) * n)
    if counts.min() < 2 or n_train < len(counts) or n - n_train < len(counts):
        logger.info("subset of %d images (smallest class %d) cannot be split stratified; training on all of it and "
                    "validating on the training subset", n, counts.min())
        everything = np.arange(n)
        return everything, everything.copy()
    train, val = train_test_split(np.arange(n), train_size=1.0 - val_fraction, stratify=labels, random_state=seed)
    return np.sort(train), np.sort(val)


def _balanced_accuracy(y_pred: torch.Tensor, y: torch.Tensor) -> float:
    """``balanced_accuracy_score(y, argmax_c y_pred)`` for logits ``[N, C]`` and labels ``[N]``."""
    return float(balanced_accuracy_score(y.cpu().numpy(), y_pred.argmax(dim=1).cpu().numpy()))


def balanced_accuracy_metric(output_transform: Callable = lambda out: (out["pred"], out["label"])) -> EpochMetric:
    """Ignite metric: balanced accuracy (macro recall) of the argmax of accumulated logits ``[N, C]``.

    The default ``output_transform`` reads ``(pred, label)`` from a MONAI engine output with ``decollate=False``.
    """
    return EpochMetric(_balanced_accuracy, output_transform=output_transform, check_compute_fn=False)


class KeepBestWeights:
    """Keep an in-memory copy of the network weights at the best value of an evaluator metric.

    Attached to an evaluator, after each of its runs (``EPOCH_COMPLETED``) the weights are copied when
    ``engine.state.metrics[metric_name]`` is strictly larger than the best so far (ties keep the earlier weights);
    ``best_epoch`` is the evaluator's ``state.epoch`` then (the trainer's epoch under a ``ValidationHandler``).

    Args:
        network: the trained module.
        metric_name: key of the metric in ``engine.state.metrics``.
    """

    def __init__(self, network: nn.Module, metric_name: str = METRIC_NAME) -> None:
        self.network = network
        self.metric_name = metric_name
        self.best_metric = -math.inf
        self.best_epoch = 0
        self.state_dict: dict[str, torch.Tensor] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        value = float(engine.state.metrics[self.metric_name])
        if value > self.best_metric:
            self.best_metric, self.best_epoch = value, engine.state.epoch
            self.state_dict = copy.deepcopy(self.network.state_dict())

    def restore(self) -> None:
        """Load the best weights into the network."""
        if self.state_dict is None:
            raise RuntimeError("KeepBestWeights.restore: no evaluation has completed, so no weights were kept")
        self.network.load_state_dict(self.state_dict)


def _prepare_batch(batchdata: dict[str, Any], device: torch.device | str | None = None, non_blocking: bool = False,
                   **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(image [B, 3, S, S] float, label [B] long)`` on ``device``."""
    images = torch.as_tensor(batchdata["image"]).to(device=device, dtype=torch.float32, non_blocking=non_blocking)
    labels = torch.as_tensor(batchdata["label"])
    if labels.numel() != images.shape[0]:
        raise ValueError(f"expected one class index per image, got labels of shape {tuple(labels.shape)} for "
                         f"{images.shape[0]} images")
    return images, labels.reshape(-1).to(device=device, dtype=torch.long, non_blocking=non_blocking)


def _labels_of(items: list[dict], name: str) -> np.ndarray:
    if not items:
        raise ValueError(f"{name} is empty")
    for i, item in enumerate(items):
        if "label" not in item or "image" not in item:
            raise ValueError(f"{name}[{i}] lacks an 'image' or 'label' key: {sorted(item)}")
    labels = np.asarray([item["label"] for item in items])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
        raise ValueError(f"{name} labels must be integer class indices >= 0, got {np.unique(labels)[:10].tolist()}")
    return labels


def _evaluator(network: nn.Module, loader: DataLoader, device: torch.device, amp: bool,
               handlers: Sequence = ()) -> SupervisedEvaluator:
    return SupervisedEvaluator(device=device, val_data_loader=loader, network=network, prepare_batch=_prepare_batch,
                               key_val_metric={METRIC_NAME: balanced_accuracy_metric()}, val_handlers=list(handlers),
                               amp=amp, decollate=False)


def _train_one(train_items: list[dict], val_items: list[dict], test_items: list[dict], n_classes: int, seed: int,
               network_factory: Callable[[], nn.Module], train_transform: Callable, eval_transform: Callable,
               epochs: int, batch_size: int, learning_rate: float, weight_decay: float, device: torch.device,
               amp: bool, num_workers: int, progress: bool) -> tuple[float, float]:
    """Train one network, keep its best-validation weights; return ``(val BA, test BA)``."""
    set_determinism(seed=seed)
    network = network_factory().to(device)
    weights = class_weights(np.array([item["label"] for item in train_items]), n_classes).to(device)
    # A BatchNorm network cannot train on a last batch of one image; drop it (one image per epoch, reshuffled).
    drop_last = len(train_items) > batch_size and len(train_items) % batch_size == 1
    train_loader = DataLoader(Dataset(train_items, train_transform), batch_size=batch_size, shuffle=True,
                              drop_last=drop_last, num_workers=num_workers,
                              generator=torch.Generator().manual_seed(seed))
    val_loader = DataLoader(Dataset(val_items, eval_transform), batch_size=batch_size, num_workers=num_workers)
    test_loader = DataLoader(Dataset(test_items, eval_transform), batch_size=batch_size, num_workers=num_workers)

    best = KeepBestWeights(network)
    validator = _evaluator(network, val_loader, device, amp, handlers=[best])
    trainer = SupervisedTrainer(
        device=device, max_epochs=epochs, train_data_loader=train_loader, network=network,
        optimizer=torch.optim.AdamW(network.parameters(), lr=learning_rate, weight_decay=weight_decay),
        loss_function=nn.CrossEntropyLoss(weight=weights), prepare_batch=_prepare_batch,
        train_handlers=[ValidationHandler(interval=1, validator=validator, epoch_level=True)], amp=amp,
        decollate=False,
    )
    if progress:
        from ignite.handlers import ProgressBar

        ProgressBar(persist=False).attach(trainer, output_transform=lambda out: {"loss": float(out["loss"])})
    trainer.run()
    best.restore()
    tester = _evaluator(network, test_loader, device, amp)
    tester.run()
    return best.best_metric, float(tester.state.metrics[METRIC_NAME])


def supervised_budget_sweep(
    train_items: list[dict],
    test_items: list[dict],
    budgets: Sequence[int],
    n_draws: int,
    seed: int,
    network_factory: Callable[[], nn.Module],
    train_transform: Callable,
    eval_transform: Callable,
    epochs: int,
    batch_size: int,
    learning_rate: float = 1e-4,
    weight_decay: float = 0.05,
    val_fraction: float = 0.3,
    device: str | torch.device = "cpu",
    amp: bool = False,
    num_workers: int = 0,
    progress: bool = False,
) -> list[dict]:
    """Test balanced accuracy of a network trained from scratch on each label budget and draw (module doc).

    Args:
        train_items: MONAI dicts ``{"image": path, "label": class index 0..C-1, ...}`` of the whole labelled
            training split; every class ``0..C-1`` must occur (``C`` = largest label + 1).
        test_items: dicts of the fixed test split; each test class must occur in ``train_items``.
        budgets: labelled images per class, each an integer >= 1 (spec: 1, 5, 10, 25, 50, 100, 250, 500, 1000).
        n_draws: labelled subsets per budget; draw ``d`` uses seed ``seed + d`` for the subset, the split, the
            determinism seed (initial weights) and the shuffling.
        seed: seed of draw 0.
        network_factory: returns a fresh, untrained network mapping ``[B, 3, S, S]`` to logits ``[B, C]``.
        train_transform: dict transform of training items → ``{"image": float tensor [3, S, S], "label": int}``.
        eval_transform: the same for validation and test items (no augmentation).
        epochs: training epochs per run; validation after each.
        batch_size: batch size of training and evaluation.
        learning_rate: AdamW learning rate (spec: 1e-4).
        weight_decay: AdamW weight decay (spec: 0.05).
        val_fraction: held-out validation share of each subset (spec: 0.3; see :func:`split_train_validation`).
        device: torch device of training.
        amp: mixed precision in the MONAI engines (CUDA only).
        num_workers: data-loader workers.
        progress: show an ignite progress bar per training epoch.

    Returns:
        ``len(budgets) * n_draws`` rows ``{classifier: "supervised", n_per_class (requested), n_train (labelled
        subset size, training + validation), draw, seed, balanced_accuracy (test)}``, ordered by budget then draw.
    """
    train_labels = _labels_of(train_items, "train_items")
    test_labels = _labels_of(test_items, "test_items")
    bad_budgets = [b for b in budgets if int(b) != b or b < 1]
    if not budgets or bad_budgets:
        raise ValueError(f"budgets must be a non-empty list of integers >= 1, got {list(budgets)}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got epochs={epochs}, batch_size={batch_size}")
    n_classes = int(train_labels.max()) + 1
    missing_train = np.setdiff1d(np.arange(n_classes), train_labels)
    if n_classes < 2 or len(missing_train):
        raise ValueError(f"train_items must contain every class 0..{n_classes - 1} (at least 2 classes); "
                         f"missing: {missing_train.tolist()}")
    missing_test = np.setdiff1d(test_labels, train_labels)
    if len(missing_test):
        raise ValueError(f"test_items contain class(es) {missing_test.tolist()} absent from the training labels")
    device = torch.device(device)

    rows = []
    for budget in budgets:
        for draw in range(n_draws):
            draw_seed = seed + draw
            subset = np.asarray(subsample_per_class(train_labels, int(budget), draw_seed))
            train_pos, val_pos = split_train_validation(train_labels[subset], val_fraction, draw_seed)
            val_score, test_score = _train_one(
                [train_items[i] for i in subset[train_pos]], [train_items[i] for i in subset[val_pos]], test_items,
                n_classes, draw_seed, network_factory, train_transform, eval_transform, epochs, batch_size,
                learning_rate, weight_decay, device, amp, num_workers, progress,
            )
            logger.info("supervised n=%d draw %d: n_train %d (%d train / %d val), val balanced accuracy %.4f, "
                        "test balanced accuracy %.4f", budget, draw, len(subset), len(train_pos), len(val_pos),
                        val_score, test_score)
            rows.append(budget_row(CLASSIFIER_NAME, budget, len(subset), draw, draw_seed, test_score))
    return rows
