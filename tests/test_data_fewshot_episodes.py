"""Tests of common/data/fewshot_episodes.py: episode protocols (specs/cdtg.md §1.1, §2.4) and the contract §1
episode dicts."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from monai.data import DataLoader

from common.data.fewshot_episodes import (
    EpisodeDataset,
    TrainingEpisodeDataset,
    enumerate_episodes,
    sample_episodes,
    support_percentiles,
    volume_episodes,
)
from common.transforms.fewshot import FewShotPairLoader

S = 16


def _items(prefix: str, n: int, size: int = 8) -> list[dict]:
    items = []
    for k in range(n):
        image = np.full((size, size, 3), 10 * k, np.uint8)
        mask = np.zeros((size, size), np.uint8)
        mask[2:6, 2:6] = 255
        items.append({"image": image, "mask": mask, "name": f"{prefix}{k}", "fg_values": None, "ignore_value": None})
    return items


def _classes(sizes=(3, 4, 5)) -> dict[str, list[dict]]:
    return {f"c{i}": _items(f"c{i}_", n) for i, n in enumerate(sizes)}


def _key(episode) -> tuple:
    return episode.class_id, episode.query["name"], tuple(s["name"] for s in episode.supports)


class _Table:
    """A text table as contract §3 describes it: ``table[name] -> [d]``, ``.background [d]``."""

    def __init__(self, names, d=4):
        self.vectors = {n: torch.full((d,), float(i)) for i, n in enumerate(names)}
        self.background = torch.full((d,), -1.0)

    def __getitem__(self, name):
        if name not in self.vectors:
            raise ValueError(f"no description of {name!r} in table.json")
        return self.vectors[name]


# ------------------------------------------------------------------------------------------------ sampling


def test_sample_episodes_protocol():
    classes = _classes()
    episodes = sample_episodes(classes, shot=2, n_episodes=600, seed=0)
    assert len(episodes) == 600
    assert [e.class_id for e in episodes[:7]] == [0, 1, 2, 0, 1, 2, 0]  # class of episode i = i mod 3
    assert Counter(e.class_name for e in episodes) == {"c0": 200, "c1": 200, "c2": 200}
    for e in episodes:
        assert e.shot == 2 and e.class_name == f"c{e.class_id}"
        assert all(s["name"] != e.query["name"] for s in e.supports)  # query never a support
        assert all(s["name"].startswith(f"{e.class_name}_") for s in (e.query, *e.supports))
    # 2 independent draws from the 2 other items of c0 repeat one half of the time: duplicates are allowed
    assert any(len(set(s["name"] for s in e.supports)) < 2 for e in episodes if e.class_id == 0)
    # the query is uniform over the class: 200 episodes of c2 (5 items) -> 40 expected each
    counts = Counter(e.query["name"] for e in episodes if e.class_id == 2)
    assert len(counts) == 5 and all(20 <= c <= 60 for c in counts.values())


def test_sample_episodes_seeded():
    classes = _classes()
    first = [_key(e) for e in sample_episodes(classes, 1, 50, seed=0)]
    assert first == [_key(e) for e in sample_episodes(classes, 1, 50, seed=0)]
    assert first != [_key(e) for e in sample_episodes(classes, 1, 50, seed=1)]
    # the first episodes do not depend on how many are drawn (one generator, drawn in order)
    assert first[:10] == [_key(e) for e in sample_episodes(classes, 1, 10, seed=0)]


def test_sampling_errors():
    with pytest.raises(ValueError, match="class list is empty"):
        sample_episodes({}, 1, 10)
    with pytest.raises(ValueError, match=r"class 'lonely' has 1 item"):
        sample_episodes({"ok": _items("a", 3), "lonely": _items("b", 1)}, 1, 10)
    with pytest.raises(ValueError, match=r"shot 3 is larger than the 2 other images class 'small' has.*3 items"):
        sample_episodes({"small": _items("a", 3)}, 3, 10)
    with pytest.raises(ValueError, match="n_episodes"):
        sample_episodes(_classes(), 1, 0)
    with pytest.raises(ValueError, match="shot"):
        enumerate_episodes(_classes(), 0)


def test_enumerate_episodes():
    classes = _classes((3, 4))
    episodes = enumerate_episodes(classes, shot=2, seed=0)
    # every item is the query once, class by class: 3 + 4 = 7 episodes
    assert [(e.class_id, e.query["name"]) for e in episodes] == [
        (0, "c0_0"), (0, "c0_1"), (0, "c0_2"), (1, "c1_0"), (1, "c1_1"), (1, "c1_2"), (1, "c1_3")]
    for e in episodes:
        names = [s["name"] for s in e.supports]
        assert len(set(names)) == 2 and e.query["name"] not in names  # K distinct others
    # class c0 has 3 items: the 2 supports of query c0_0 can only be c0_1 and c0_2
    assert sorted(s["name"] for s in episodes[0].supports) == ["c0_1", "c0_2"]
    assert [_key(e) for e in episodes] == [_key(e) for e in enumerate_episodes(classes, 2, seed=0)]
    with pytest.raises(ValueError, match=r"shot 3 is larger than the 2 distinct other images class 'c0'"):
        enumerate_episodes(classes, 3)


# ------------------------------------------------------------------------------------------------ volumes


def _volume_classes() -> dict[str, list[dict]]:
    # "liver" on slices 10..19 of volume A (an extent of 10 slices) and 3..5 of B; "spleen" on 4..5 of A, 7 of B
    def items(volume, slices):
        return [{**_items("s", 1)[0], "name": f"{volume}:z{z}", "volume": volume, "slice": z} for z in slices]
    return {"liver": items("B", [5, 3, 4]) + items("A", list(range(19, 9, -1))),
            "spleen": items("A", [4, 5]) + items("B", [7])}


def test_support_percentiles_by_hand():
    assert support_percentiles(1) == [0.5]
    # K = 5: 1/(2*5) + j (1 - 1/5) / 4 = 0.1 + 0.2 j -> 0.1, 0.3, 0.5, 0.7, 0.9
    assert np.allclose(support_percentiles(5), [0.1, 0.3, 0.5, 0.7, 0.9])
    # K = 2: 1/4 + j (1/2) / 1 -> 0.25, 0.75
    assert np.allclose(support_percentiles(2), [0.25, 0.75])


def test_volume_episodes_percentile_supports():
    classes = _volume_classes()
    one = volume_episodes(classes, "A", shot=1)
    liver = [e for e in one if e.class_name == "liver"]
    # K = 1 on the 10-slice extent z = 10..19: position floor(0.5 * 10) = 5 -> z = 15
    assert [s["slice"] for s in liver[0].supports] == [15]
    # queries: every liver slice of the other volume, in slice order
    assert [e.query["name"] for e in liver] == ["B:z3", "B:z4", "B:z5"]
    five = volume_episodes(classes, "A", shot=5)
    # K = 5: positions floor(10 * (0.1, 0.3, 0.5, 0.7, 0.9)) = 1, 3, 5, 7, 9 -> z = 11, 13, 15, 17, 19
    assert [s["slice"] for s in five[0].supports] == [11, 13, 15, 17, 19]
    spleen = [e for e in one if e.class_name == "spleen"]
    # spleen extent in A is z = 4, 5: floor(0.5 * 2) = 1 -> z = 5; its one query is B:z7
    assert [(e.class_id, e.query["name"], e.supports[0]["slice"]) for e in spleen] == [(1, "B:z7", 5)]
    # the support volume by position among the sorted volume ids: 0 -> "A"
    assert [_key(e) for e in volume_episodes(classes, 0, 1)] == [_key(e) for e in one]
    with pytest.raises(ValueError, match="support_volume 'C' is not among"):
        volume_episodes(classes, "C", 1)
    with pytest.raises(ValueError, match="not a volume slice"):
        volume_episodes(_classes(), "A", 1)


# ------------------------------------------------------------------------------------------------ datasets


def test_episode_dataset_contract():
    classes = _classes()
    episodes = sample_episodes(classes, shot=2, n_episodes=4, seed=0)
    table = _Table(list(classes), d=4)
    ds = EpisodeDataset(episodes, FewShotPairLoader(image_size=S), text_table=table)
    assert len(ds) == 4
    item = ds[1]
    assert set(item) == {"query_image", "query_mask", "query_ignore", "support_images", "support_masks", "class_id",
                         "class_name", "query_name", "episode", "class_text", "background_text"}
    assert item["query_image"].shape == (3, S, S) and item["query_image"].dtype == torch.float32
    assert item["query_mask"].shape == item["query_ignore"].shape == (S, S)
    assert item["support_images"].shape == (2, 3, S, S) and item["support_masks"].shape == (2, S, S)
    assert item["class_id"] == 1 and item["class_name"] == "c1" and item["episode"] == 1
    assert item["query_name"] == episodes[1].query["name"]
    assert torch.equal(item["class_text"], torch.full((4,), 1.0))  # c1 is the table's row 1
    assert torch.equal(item["background_text"], -torch.ones(4))
    # 4x4 foreground block of an 8x8 mask -> 8x8 of the 16x16 resized mask
    assert item["query_mask"].sum() == 64 and item["support_masks"].sum() == 128
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["support_images"].shape == (2, 2, 3, S, S) and batch["class_id"].tolist() == [0, 1]
    assert batch["class_name"] == ["c0", "c1"] and batch["class_text"].shape == (2, 4)
    assert "class_text" not in EpisodeDataset(episodes, FewShotPairLoader(image_size=S))[0]


def test_episode_dataset_errors():
    classes = _classes()
    episodes = sample_episodes(classes, shot=1, n_episodes=3, seed=0)
    with pytest.raises(ValueError, match=r"class 'c2' has no embedding.*table.json"):
        EpisodeDataset(episodes, FewShotPairLoader(image_size=S), text_table=_Table(["c0", "c1"]))
    # a support whose 1-pixel foreground vanishes when 8x8 is resized to 2x2 (nearest keeps pixels 0 and 4)
    tiny = _items("t", 2)
    tiny[1]["mask"] = np.zeros((8, 8), np.uint8)
    tiny[1]["mask"][7, 7] = 255
    tiny[0]["mask"] = tiny[1]["mask"].copy()
    ds = EpisodeDataset(sample_episodes({"tiny": tiny}, 1, 1), FewShotPairLoader(image_size=2))
    with pytest.raises(ValueError, match=r"support <in-memory array of t\d> .* of episode 0 .* empty mask"):
        ds[0]


def _draw_all(ds) -> list[tuple[int, ...]]:
    draws = []
    for class_id, q in ds._index:
        ds.randomize((class_id, q))
        draws.append(tuple(ds._supports))
    return draws


def test_training_episode_dataset():
    classes = _classes((4, 5))
    loader = FewShotPairLoader(image_size=S)
    ds = TrainingEpisodeDataset(classes, shot=3, loader=loader, seed=0)
    assert len(ds) == 9  # one episode per item of every class: 4 + 5
    names = [ds[i]["query_name"] for i in range(len(ds))]
    assert names == ["c0_0", "c0_1", "c0_2", "c0_3", "c1_0", "c1_1", "c1_2", "c1_3", "c1_4"]
    ds.set_random_state(0)
    draws = _draw_all(ds)
    for (class_id, q), supports in zip(ds._index, draws):
        assert len(supports) == 3 and q not in supports
        assert all(0 <= s < len(classes[f"c{class_id}"]) for s in supports)
    ds.set_random_state(0)
    assert _draw_all(ds) == draws
    ds.set_random_state(1)
    assert _draw_all(ds) != draws
    item = ds[4]
    assert item["class_id"] == 1 and item["query_name"] == "c1_0" and item["episode"] == 4
    assert item["support_images"].shape == (3, 3, S, S)
    # every other item of the class is drawn, the query never: 400 x 3 draws for query 0 of c1 (others 1..4)
    seen = Counter()
    for _ in range(400):
        ds.randomize((1, 0))
        seen.update(ds._supports)
    assert set(seen) == {1, 2, 3, 4} and all(c > 220 for c in seen.values())  # 1200 / 4 = 300 expected each


def test_training_dataset_seeded_by_monai_loader():
    ds = TrainingEpisodeDataset(_classes((3, 4)), shot=2, loader=FewShotPairLoader(image_size=S))
    torch.manual_seed(7)
    first = [b["support_images"] for b in DataLoader(ds, batch_size=7)]
    torch.manual_seed(7)
    second = [b["support_images"] for b in DataLoader(ds, batch_size=7)]
    assert torch.equal(first[0], second[0])


def test_training_dataset_errors():
    loader = FewShotPairLoader(image_size=S)
    with pytest.raises(ValueError, match=r"class 'c0' has 1 item"):
        TrainingEpisodeDataset({"c0": _items("a", 1)}, 1, loader)
    with pytest.raises(ValueError, match="class 'c1' has no embedding"):
        TrainingEpisodeDataset(_classes((3, 4)), 1, loader, text_table=_Table(["c0"]))
