"""What a few-shot bundle's config names: data sources, their datalists, text tables, episode datasets, support sets.

The readers of :mod:`common.data.fewshot_datasets` each know one layout; a config names a source as a mapping::

    {"kind": "wbc", "root": "/data/wbc", "classes": ["nucleus"], "descriptions": "prompts/wbc.json",
     "protocol": "sample", "episodes": 600, "name": "wbc"}

where ``kind`` picks the reader (:data:`READERS`), every key the reader takes is passed on, and the rest describes
the episodes (``protocol``: ``sample`` = the PATNet/HSNet protocol with ``episodes`` episodes, ``enumerate`` = every
item once as the query, ``volume`` = the CHAOS protocol with ``support_volume``) and the class texts
(``descriptions``: a description file of :mod:`common.data.category_text`).

Training data is a MONAI datalist, so that MONAI Label's ``BundleTrainTask`` can hand in its own
``[{"image", "label"}]`` lists: :func:`classes_datalist` flattens class lists into
``{"image", "label", "class_name", ...}`` dicts and :func:`datalist_classes` reads them back (entries without a
``class_name`` belong to ``default_class``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from common.data.category_text import TextEmbeddingTable, ensure_text_table
from common.data.fewshot_datasets import (
    class_folder_classes,
    coco20i_classes,
    isic2018_classes,
    isic_flat_classes,
    lung_classes,
    pascal5i_classes,
    polyp_classes,
    volume_slice_classes,
    wbc_classes,
)
from common.data.fewshot_episodes import (
    EpisodeDataset,
    TrainingEpisodeDataset,
    enumerate_episodes,
    sample_episodes,
    volume_episodes,
)
from common.networks.text_encoders import make_text_encoder, text_encoder_name
from common.transforms.fewshot import FewShotPairLoader

__all__ = [
    "READERS",
    "read_classes",
    "merge_classes",
    "classes_datalist",
    "datalist_classes",
    "split_datalist",
    "TextSettings",
    "text_table",
    "training_episodes",
    "validation_episodes",
    "TargetEpisodes",
    "target_episodes",
    "load_support_set",
]

ClassList = dict[str, list[dict]]

READERS: dict[str, Callable[..., ClassList]] = {
    "class_folders": class_folder_classes,
    "wbc": wbc_classes,
    "isic2018": isic2018_classes,
    "isic": isic_flat_classes,
    "lung": lung_classes,
    "volumes": volume_slice_classes,
    "polyp": polyp_classes,
    "pascal5i": pascal5i_classes,
    "coco20i": coco20i_classes,
}
EPISODE_KEYS = ("name", "descriptions", "protocol", "episodes", "support_volume", "seed")


def read_classes(source: Mapping) -> ClassList:
    """The class list of one source mapping (module docstring); ValueError for an unknown ``kind``."""
    if "kind" not in source or "root" not in source:
        raise ValueError(f"a few-shot source needs 'kind' and 'root', got keys {sorted(source)}")
    kind = source["kind"]
    if kind not in READERS:
        raise ValueError(f"unknown few-shot source kind {kind!r}; known kinds: {', '.join(sorted(READERS))}")
    kwargs = {k: v for k, v in source.items() if k not in ("kind", "root", *EPISODE_KEYS)}
    return READERS[kind](source["root"], **kwargs)


def merge_classes(sources: Sequence[Mapping]) -> ClassList:
    """The classes of several sources in one list (source order, then each source's class order); a class name
    found in two sources is refused (two domains would silently share one class id and one text)."""
    merged: ClassList = {}
    for source in sources:
        for name, items in read_classes(source).items():
            if name in merged:
                raise ValueError(f"class {name!r} of source {source.get('root')} is already given by another source")
            merged[name] = list(items)
    if not merged:
        raise ValueError("no few-shot source given")
    return merged


def classes_datalist(classes: Mapping[str, Sequence[dict]]) -> list[dict]:
    """``[{"image", "label", "class_name", ...}]``: every item of every class, its ``mask`` renamed ``label``."""
    return [{**{k: v for k, v in item.items() if k != "mask"}, "label": item["mask"], "class_name": name}
            for name, items in classes.items() for item in items]


def datalist_classes(data: Sequence[Mapping], default_class: str | None) -> ClassList:
    """The class list of a datalist (:func:`classes_datalist`, or MONAI Label's ``{"image", "label"}`` dicts whose
    class is ``default_class``), in order of first appearance."""
    classes: ClassList = {}
    for entry in data:
        if "image" not in entry or "label" not in entry:
            raise ValueError(f"datalist entry {dict(entry)} needs 'image' and 'label'")
        item = {k: v for k, v in entry.items() if k not in ("label", "class_name")}
        item["mask"] = entry["label"]
        if "name" not in item:
            image = entry["image"]
            item["name"] = Path(image).stem if isinstance(image, (str, os.PathLike)) else f"item{len(classes)}"
        item.setdefault("fg_values", None)
        item.setdefault("ignore_value", None)
        name = entry.get("class_name", default_class)
        if name is None:
            raise ValueError(f"datalist entry {entry['image']} has no 'class_name' and no default class is set "
                             "(the bundle's 'datalist_class')")
        classes.setdefault(name, []).append(item)
    if not classes:
        raise ValueError("the few-shot datalist is empty")
    return classes


def split_datalist(data: Sequence[Mapping], val_fraction: float, seed: int = 0) -> dict[str, list[dict]]:
    """``{"train": [...], "val": [...]}``: per class, ``round(val_fraction * n)`` entries (at least 2 when the class
    has 4 or more, so that a validation episode has a query and a support) drawn with ``seed`` go to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[str, list[int]] = {}
    for i, entry in enumerate(data):
        by_class.setdefault(entry.get("class_name", ""), []).append(i)
    rng = np.random.default_rng(seed)
    val: set[int] = set()
    for indices in by_class.values():
        n_val = int(round(val_fraction * len(indices)))
        if val_fraction > 0 and len(indices) >= 4:
            n_val = max(n_val, 2)
        if n_val >= 2 and len(indices) - n_val >= 2:
            val.update(int(i) for i in rng.choice(indices, size=n_val, replace=False))
    return {"train": [dict(e) for i, e in enumerate(data) if i not in val],
            "val": [dict(e) for i, e in enumerate(data) if i in val]}


class TextSettings:
    """Which text encoder turns class descriptions into embeddings, and where the tables are cached.

    Args:
        encoder: ``"open_clip"`` or ``"sentence"`` (:func:`common.networks.text_encoders.make_text_encoder`).
        model_name: open_clip model (ViT-B-32, ViT-B-16, RN50) or None.
        weights: local weights (open_clip checkpoint file, sentence model folder) or None.
        cache_dir: folder of the cached ``<descriptions stem>-<encoder hash>.pt`` tables.
    """

    def __init__(self, encoder: str, model_name: str | None, weights: str | None, cache_dir: str) -> None:
        self.encoder, self.model_name, self.weights = encoder, model_name, weights
        self.name = text_encoder_name(encoder, model_name, weights)
        self.cache_dir = Path(cache_dir)
        self._build = cache(lambda: make_text_encoder(encoder, model_name, weights))

    def table(self, descriptions: str | os.PathLike) -> TextEmbeddingTable:
        """The (cached) embedding table of one description file."""
        tag = hashlib.sha256(self.name.encode()).hexdigest()[:12]
        cache_path = self.cache_dir / f"{Path(descriptions).stem}-{tag}.pt"
        return ensure_text_table(descriptions, cache_path, self._build, self.name)


def text_table(descriptions: str | Sequence[str], settings: TextSettings) -> TextEmbeddingTable:
    """One embedding table for one or several description files (classes in file order, the background text of the
    first file); a class described twice is refused."""
    files = [descriptions] if isinstance(descriptions, (str, os.PathLike)) else list(descriptions)
    if not files:
        raise ValueError("text_table: no description file given")
    tables = [settings.table(f) for f in files]
    if len(tables) == 1:
        return tables[0]
    names = [n for t in tables for n in t.names]
    if len(set(names)) != len(names):
        raise ValueError(f"text_table: a class is described in two of {files}")
    return TextEmbeddingTable(names, torch.cat([t.embeddings for t in tables]), tables[0].background,
                              meta={"files": [str(f) for f in files], "encoder": settings.name})


def training_episodes(data: Sequence[Mapping], shot: int, image_size: int, default_class: str | None,
                      text: TextEmbeddingTable | None = None, seed: int = 0) -> TrainingEpisodeDataset:
    """Episodic training set over a datalist: every item once per epoch as the query, random supports."""
    return TrainingEpisodeDataset(datalist_classes(data, default_class), shot, FewShotPairLoader(image_size),
                                  text_table=text, seed=seed)


def validation_episodes(data: Sequence[Mapping], shot: int, image_size: int, default_class: str | None,
                        text: TextEmbeddingTable | None = None, n_episodes: int | None = None,
                        seed: int = 0) -> EpisodeDataset:
    """Fixed validation episodes over a datalist: ``n_episodes`` sampled (PATNet protocol) or, when None, every item
    once as the query."""
    classes = datalist_classes(data, default_class)
    episodes = (enumerate_episodes(classes, shot, seed) if n_episodes is None
                else sample_episodes(classes, shot, n_episodes, seed))
    dataset = EpisodeDataset(episodes, FewShotPairLoader(image_size), text_table=text)
    dataset.class_names = list(classes)
    return dataset


class TargetEpisodes:
    """``shot -> EpisodeDataset`` of one target source (what :class:`common.handlers.fewshot_report.FewShotSweep`
    calls): the source's classes are read once, the episodes follow its ``protocol``."""

    def __init__(self, source: Mapping, image_size: int, settings: TextSettings | None = None) -> None:
        self.source = dict(source)
        self.protocol = self.source.get("protocol", "sample")
        if self.protocol not in ("sample", "enumerate", "volume"):
            raise ValueError(f"target {self.source.get('name')}: unknown protocol {self.protocol!r} "
                             "(sample, enumerate, volume)")
        if self.protocol == "volume" and "support_volume" not in self.source:
            raise ValueError(f"target {self.source.get('name')}: the volume protocol needs 'support_volume'")
        self.classes = read_classes(self.source)
        self.loader = FewShotPairLoader(image_size)
        self.text = None
        if settings is not None:
            if "descriptions" not in self.source:
                raise ValueError(f"target {self.source.get('name')}: text is on but no 'descriptions' file is given")
            self.text = text_table(self.source["descriptions"], settings)

    def __call__(self, shot: int) -> EpisodeDataset:
        seed = int(self.source.get("seed", 0))
        if self.protocol == "sample":
            episodes = sample_episodes(self.classes, shot, int(self.source.get("episodes", 600)), seed)
        elif self.protocol == "enumerate":
            episodes = enumerate_episodes(self.classes, shot, seed)
        else:
            episodes = volume_episodes(self.classes, self.source["support_volume"], shot)
        dataset = EpisodeDataset(episodes, self.loader, text_table=self.text)
        dataset.class_names = list(self.classes)
        return dataset


def target_episodes(targets: Sequence[Mapping], image_size: int,
                    settings: TextSettings | None = None) -> dict[str, TargetEpisodes]:
    """``{name: TargetEpisodes}`` of the targets (named by their ``name``, else their ``kind``)."""
    named = {t.get("name", t.get("kind")): TargetEpisodes(t, image_size, settings) for t in targets}
    if len(named) != len(targets):
        raise ValueError(f"two targets share a name: {[t.get('name', t.get('kind')) for t in targets]}")
    return named


def load_support_set(source: Mapping, class_name: str, shot: int, image_size: int,
                     text: TextEmbeddingTable | None = None, names: Sequence[str] | None = None
                     ) -> dict[str, torch.Tensor]:
    """The support set that primes a network for inference (:meth:`common.networks.patnet.PATNet.set_support`).

    Args:
        source: a source mapping (module docstring) holding ``class_name``.
        class_name: the class to segment.
        shot: K, the number of supports: the first K items in the reader's order, or the items named ``names``.
        image_size: side of the square network input.
        text: the embedding table of the class texts (text-guided networks).
        names: item names (file stems) to use instead of the first K.

    Returns:
        ``support_images [K, 3, S, S]``, ``support_masks [K, S, S]`` and, with ``text``, ``class_text`` and
        ``background_text [d]``.
    """
    classes = read_classes(source)
    if class_name not in classes:
        raise ValueError(f"support set {source.get('root')}: no class {class_name!r} (classes: {list(classes)})")
    items = classes[class_name]
    if names is not None:
        by_name = {item["name"]: item for item in items}
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"support set {source.get('root')}: class {class_name!r} has no items {missing}")
        items = [by_name[n] for n in names]
    if shot < 1 or shot > len(items):
        raise ValueError(f"support set {source.get('root')}: {shot}-shot needs {shot} images of {class_name!r}, "
                         f"found {len(items)}")
    loader = FewShotPairLoader(image_size)
    pairs = [loader(item) for item in items[:shot]]
    support = {"support_images": torch.stack([p[0] for p in pairs]), "support_masks": torch.stack([p[1] for p in pairs])}
    if text is not None:
        support["class_text"] = torch.as_tensor(text[class_name], dtype=torch.float32)
        support["background_text"] = torch.as_tensor(text.background, dtype=torch.float32)
    return support
