"""Few-shot segmentation episodes (specs/cdtg.md §1.1, §2.4) and the datasets that load them.

An episode of class ``c`` is a query item and ``K`` support items of ``c`` (PATNet, Lei et al., ECCV 2022; HSNet,
Min et al., ICCV 2021). Protocols:

* :func:`sample_episodes` (ISIC, lung, Deepglobe, WBC at test): episode ``i`` has class ``i mod n_classes``, a query
  drawn uniformly from that class and ``K`` supports each drawn uniformly from the class, redrawn while equal to the
  query (duplicates among supports allowed). One ``numpy.random.Generator`` seeded once draws all episodes in
  order, so they do not depend on the batch size or the number of workers.
* :func:`enumerate_episodes` (CD-TG WBC reader): every item is the query once, class by class, with ``K``
  distinct other items of its class as supports.
* :func:`volume_episodes` (CHAOS-MRI, Ouyang et al. ECCV 2020 protocol): for each organ, the supports are the
  labelled slices of a support volume at the percentiles ``p_j = 1/(2K) + j (1 - 1/K) / (K - 1)``,
  ``j = 0..K-1`` (``p = 1/2`` for ``K = 1``) of the organ's extent — slice ``floor(p_j n)`` of its ``n`` labelled
  slices in order; the queries are every slice of every other volume that contains the organ.

:class:`EpisodeDataset` turns episodes into the dicts of the CD-TG interface contract (§1)::

    query_image [3, S, S], query_mask [S, S], query_ignore [S, S], support_images [K, 3, S, S],
    support_masks [K, S, S], class_id, class_name, query_name, episode (+ class_text [d], background_text [d])

:class:`TrainingEpisodeDataset` draws supports at random (a MONAI ``Randomizable``) for episodic training.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Randomizable
from torch.utils.data import Dataset

from common.transforms.fewshot import FewShotPairLoader, item_source

__all__ = [
    "Episode",
    "sample_episodes",
    "enumerate_episodes",
    "support_percentiles",
    "volume_episodes",
    "EpisodeDataset",
    "TrainingEpisodeDataset",
]

ClassList = Mapping[str, Sequence[dict]]


@dataclass(frozen=True, eq=False)
class Episode:
    """One few-shot episode: the class (name and 0-based id in the class list), the query item, ``K`` supports."""

    class_name: str
    class_id: int
    query: dict
    supports: tuple[dict, ...]

    @property
    def shot(self) -> int:
        """``K``, the number of supports."""
        return len(self.supports)


def _check_shot(shot: int) -> None:
    if isinstance(shot, bool) or not isinstance(shot, int) or shot < 1:
        raise ValueError(f"shot must be a positive integer, got {shot!r}")


def _check_classes(classes: ClassList, shot: int, distinct: bool = False) -> list[str]:
    """Class names of a valid class list; ValueError naming the class and its count otherwise."""
    _check_shot(shot)
    if not classes:
        raise ValueError("the class list is empty: no class to draw episodes from.")
    for name, items in classes.items():
        n = len(items)
        if n < 2:
            raise ValueError(f"class {name!r} has {n} item(s); an episode needs at least 2 (a query and a support).")
        if shot > n - 1:
            what = "distinct other images" if distinct else "other images"
            raise ValueError(f"shot {shot} is larger than the {n - 1} {what} class {name!r} has besides a query "
                             f"({n} items).")
    return list(classes)


def sample_episodes(classes: ClassList, shot: int, n_episodes: int, seed: int = 0) -> list[Episode]:
    """``n_episodes`` episodes by the PATNet / HSNet test protocol (module docstring): class ``i mod n_classes``,
    uniform query, ``K`` supports drawn uniformly among the class's other items (with repetition).

    Raises:
        ValueError: empty class list, a class with fewer than 2 items, ``shot`` larger than a class's number of
            other items, ``n_episodes < 1``.
    """
    names = _check_classes(classes, shot)
    if isinstance(n_episodes, bool) or not isinstance(n_episodes, int) or n_episodes < 1:
        raise ValueError(f"n_episodes must be a positive integer, got {n_episodes!r}")
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(n_episodes):
        class_id = i % len(names)
        items = classes[names[class_id]]
        q = int(rng.integers(len(items)))
        supports = []
        while len(supports) < shot:
            s = int(rng.integers(len(items)))
            if s != q:
                supports.append(items[s])
        episodes.append(Episode(names[class_id], class_id, items[q], tuple(supports)))
    return episodes


def enumerate_episodes(classes: ClassList, shot: int, seed: int = 0) -> list[Episode]:
    """One episode per item (the CD-TG WBC reader): class by class, item by item as query, with ``K`` distinct
    other items of the class drawn without replacement as supports (``numpy`` generator seeded once)."""
    names = _check_classes(classes, shot, distinct=True)
    rng = np.random.default_rng(seed)
    episodes = []
    for class_id, name in enumerate(names):
        items = classes[name]
        for q, query in enumerate(items):
            others = [i for i in range(len(items)) if i != q]
            picks = rng.choice(len(others), size=shot, replace=False)
            episodes.append(Episode(name, class_id, query, tuple(items[others[int(j)]] for j in picks)))
    return episodes


def support_percentiles(shot: int) -> list[float]:
    """``p_j = 1/(2K) + j (1 - 1/K) / (K - 1)``, ``j = 0..K-1``; ``[0.5]`` for ``K = 1`` (Ouyang et al.)."""
    _check_shot(shot)
    if shot == 1:
        return [0.5]
    return [1.0 / (2 * shot) + j * (1.0 - 1.0 / shot) / (shot - 1) for j in range(shot)]


def volume_episodes(classes: ClassList, support_volume: str | int, shot: int) -> list[Episode]:
    """CHAOS protocol episodes (§2.4) from a class list of volume slices (``"volume"``, ``"slice"`` items, as
    :py:func:`common.data.fewshot_datasets.volume_slice_classes` returns).

    For each organ (class order): the organ's slices in ``support_volume`` sorted by ``slice``, ``n`` of them, give
    the supports ``floor(p_j n + 1e-9)`` for the percentiles of :func:`support_percentiles`; every slice of every
    other volume containing the organ is a query, volume by volume, slice by slice.

    Args:
        classes: class list of volume slices.
        support_volume: the support volume's id, or its position among the sorted volume ids.
        shot: ``K``.

    Raises:
        ValueError: empty class list, items without ``"volume"``/``"slice"``, an unknown support volume, an organ
            absent from the support volume or with no query.
    """
    _check_shot(shot)
    if not classes:
        raise ValueError("the class list is empty: no class to draw episodes from.")
    volumes: set[str] = set()
    for name, items in classes.items():
        for item in items:
            if "volume" not in item or "slice" not in item:
                raise ValueError(f"item {item.get('name')!r} of class {name!r} is not a volume slice "
                                 "(no 'volume'/'slice' keys).")
            volumes.add(str(item["volume"]))
    ordered = sorted(volumes)
    if isinstance(support_volume, int) and not isinstance(support_volume, bool):
        if not 0 <= support_volume < len(ordered):
            raise ValueError(f"support_volume {support_volume} is out of range: there are {len(ordered)} volumes.")
        support_volume = ordered[support_volume]
    if support_volume not in volumes:
        raise ValueError(f"support_volume {support_volume!r} is not among the volumes {ordered}.")
    percentiles = support_percentiles(shot)
    episodes = []
    for class_id, (name, items) in enumerate(classes.items()):
        labelled = sorted((it for it in items if it["volume"] == support_volume), key=lambda it: it["slice"])
        if not labelled:
            raise ValueError(f"class {name!r} has no slice in the support volume {support_volume!r}.")
        n = len(labelled)
        supports = tuple(labelled[min(math.floor(p * n + 1e-9), n - 1)] for p in percentiles)
        queries = sorted((it for it in items if it["volume"] != support_volume),
                         key=lambda it: (str(it["volume"]), it["slice"]))
        if not queries:
            raise ValueError(f"class {name!r} has no slice outside the support volume {support_volume!r}: no query.")
        episodes += [Episode(name, class_id, query, supports) for query in queries]
    return episodes


def _check_text_table(text_table, class_names: Sequence[str]) -> None:
    if text_table is None:
        return
    if getattr(text_table, "background", None) is None:
        raise ValueError(f"text table {type(text_table).__name__} has no 'background' embedding.")
    for name in class_names:
        try:
            text_table[name]
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"class {name!r} has no embedding in the text table: {err}") from err


class _EpisodeLoading:
    """Shared loading of an episode into the contract §1 dict."""

    loader: FewShotPairLoader
    text_table: object | None

    def _load(self, index: int, class_name: str, class_id: int, query: dict, supports: Sequence[dict]) -> dict:
        q_image, q_mask, q_ignore = self.loader(query)
        images, masks = [], []
        for support in supports:
            image, mask, _ = self.loader(support)
            if not mask.any():
                raise ValueError(
                    f"support {item_source(support['mask'], support.get('name', 'item'))} "
                    f"({support.get('name')!r}) of episode {index} (class {class_name!r}, query "
                    f"{query.get('name')!r}) has an empty mask after resizing to {self.loader.image_size}."
                )
            images.append(image)
            masks.append(mask)
        data = {
            "query_image": q_image, "query_mask": q_mask, "query_ignore": q_ignore,
            "support_images": torch.stack(images), "support_masks": torch.stack(masks),
            "class_id": int(class_id), "class_name": class_name, "query_name": str(query.get("name", "")),
            "episode": int(index),
        }
        if self.text_table is not None:
            data["class_text"] = torch.as_tensor(self.text_table[class_name], dtype=torch.float32)
            data["background_text"] = torch.as_tensor(self.text_table.background, dtype=torch.float32)
        return data


class EpisodeDataset(_EpisodeLoading, Dataset):
    """A fixed list of episodes as a torch ``Dataset`` of contract §1 dicts (module docstring).

    Args:
        episodes: from :func:`sample_episodes`, :func:`enumerate_episodes` or :func:`volume_episodes`.
        loader: turns an item into (image, mask, ignore) tensors.
        text_table: optional object with ``__getitem__(class_name) -> Tensor [d]`` and ``.background [d]``
            (:py:class:`common.data.category_text.TextEmbeddingTable`); adds ``class_text``, ``background_text``.

    Raises:
        ValueError: no episode, or a class of the episodes missing from ``text_table`` (at construction); a support
            mask empty after resizing (when the episode is loaded; names the support file and the episode).
    """

    def __init__(self, episodes: Sequence[Episode], loader: FewShotPairLoader, text_table=None) -> None:
        if not episodes:
            raise ValueError("EpisodeDataset needs at least one episode.")
        self.episodes = list(episodes)
        self.loader = loader
        self.text_table = text_table
        _check_text_table(text_table, sorted({e.class_name for e in self.episodes}))

    def __len__(self) -> int:
        return len(self.episodes)

    def __getitem__(self, index: int) -> dict:
        e = self.episodes[index]
        return self._load(index, e.class_name, e.class_id, e.query, e.supports)


class TrainingEpisodeDataset(_EpisodeLoading, Randomizable, Dataset):
    """Episodic training data: item ``i`` is the query (all items of all classes, class by class), its ``K``
    supports are drawn with ``self.R`` uniformly among the other items of its class (with repetition, as PATNet's
    training reader).

    ``monai.data.DataLoader`` seeds ``self.R`` (per worker), and :py:class:`common.handlers.epoch_seed.EpochSeed`
    reseeds it every epoch, so the draws are reproducible.

    Args:
        classes: class list (class name -> items).
        shot: ``K``.
        loader: turns an item into (image, mask, ignore) tensors.
        text_table: as for :class:`EpisodeDataset`.
        seed: initial seed of ``self.R``.

    Raises:
        ValueError: as :func:`sample_episodes` for the class list, and for a class missing from ``text_table``.
    """

    def __init__(self, classes: ClassList, shot: int, loader: FewShotPairLoader, text_table=None,
                 seed: int = 0) -> None:
        names = _check_classes(classes, shot)
        self.classes = {name: list(classes[name]) for name in names}
        self.shot = shot
        self.loader = loader
        self.text_table = text_table
        _check_text_table(text_table, names)
        self._index = [(c, q) for c, name in enumerate(names) for q in range(len(self.classes[name]))]
        self._names = names
        self._supports: list[int] = []
        self.set_random_state(seed)

    def __len__(self) -> int:
        return len(self._index)

    def randomize(self, data: tuple[int, int]) -> None:
        """Draw the support indices for ``data = (class_id, query index)``: uniform over the class minus the query."""
        class_id, q = data
        n = len(self.classes[self._names[class_id]])
        draws = self.R.randint(0, n - 1, size=self.shot)
        self._supports = [int(s) + (s >= q) for s in draws]

    def __getitem__(self, index: int) -> dict:
        class_id, q = self._index[index]
        name = self._names[class_id]
        self.randomize((class_id, q))
        items = self.classes[name]
        return self._load(index, name, class_id, items[q], [items[s] for s in self._supports])
