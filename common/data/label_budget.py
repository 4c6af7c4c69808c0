"""Label budgets: at most ``n`` labelled images per class, drawn reproducibly (Sparsam, specs/sparsam.md §6.2).

Sparsam (Nielsen et al., Bioengineering 10(8):895, 2023) fits its classifiers on the features of
``n ∈ {1, 5, 10, 25, 50, 100, 250, 500, 1000}`` labelled images per class; a class with fewer images contributes
all of them. The subset is drawn by walking a random permutation of the labelled set and taking an image while
its class has fewer than ``n`` taken so far.

Deviation from the reference code (spec §6.2 and §9.5): its seeded branch calls ``random.Random`` on a function
(AttributeError) and is skipped for seed 0, so only the unseeded first iteration ever ran. Here the permutation is
``numpy.random.default_rng(seed).permutation(N)``: the same seed gives the same subset on every platform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["DEFAULT_BUDGETS", "subsample_per_class", "budgets_for"]

DEFAULT_BUDGETS: tuple[int, ...] = (1, 5, 10, 25, 50, 100, 250, 500, 1000)
"""Labelled images per class evaluated by Sparsam (``eval_class_sizes``, spec §6.2)."""


def _labels(labels: np.ndarray | Sequence) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class labels, got shape {labels.shape}.")
    if labels.size == 0:
        raise ValueError("labels is empty: there is no labelled image to draw from.")
    return labels


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


def subsample_per_class(labels: np.ndarray | Sequence, n_per_class: int, seed: int) -> np.ndarray:
    """Indices of at most ``n_per_class`` images of every class, drawn with ``seed``.

    With ``π = numpy.random.default_rng(seed).permutation(N)``, walk ``i = π_0, π_1, ..., π_{N-1}`` and take ``i``
    while ``count[labels[i]] < n_per_class`` (then increment that count). A class of ``m`` images contributes
    ``min(m, n_per_class)`` of them.

    Args:
        labels: class label of each image, shape ``(N,)`` (any hashable values: ints or strings).
        n_per_class: the budget ``n >= 1``.
        seed: seed of the permutation (the reference code uses the iteration number).

    Returns:
        int64 indices into ``labels``, shape ``(sum_c min(m_c, n),)``, sorted ascending.

    Raises:
        ValueError: ``labels`` empty or not 1-D; ``n_per_class < 1`` or not an integer.
    """
    labels = _labels(labels)
    n = _positive_int("n_per_class", n_per_class)
    counts: dict[object, int] = {}
    taken: list[int] = []
    for i in np.random.default_rng(seed).permutation(labels.size):
        label = labels[i]
        if counts.get(label, 0) < n:
            counts[label] = counts.get(label, 0) + 1
            taken.append(int(i))
    return np.sort(np.asarray(taken, dtype=np.int64))


def budgets_for(labels: np.ndarray | Sequence, budgets: Sequence[int] = DEFAULT_BUDGETS) -> list[int]:
    """The budgets worth evaluating on ``labels``: those up to the largest class, plus that class size once.

    A budget above the largest class size ``m_max`` gives the same subset as ``m_max`` (every image of every
    class), so such budgets are replaced by one ``m_max`` ("all labels"). E.g. class sizes 176/53/48/22/1 give
    ``[1, 5, 10, 25, 50, 100, 176]``; with ``m_max >= 1000`` the budgets are returned unchanged.

    Args:
        labels: class label of each image, shape ``(N,)``.
        budgets: candidate budgets (each an integer >= 1).

    Returns:
        Sorted, distinct budgets.

    Raises:
        ValueError: ``labels`` empty or not 1-D; ``budgets`` empty or holding a value that is not an integer >= 1.
    """
    labels = _labels(labels)
    if len(budgets) == 0:
        raise ValueError("budgets is empty.")
    values = sorted({_positive_int("each budget", b) for b in budgets})
    largest = int(np.unique(labels, return_counts=True)[1].max())
    kept = [b for b in values if b <= largest]
    if len(kept) < len(values) and largest not in kept:
        kept.append(largest)
    return kept
