"""Config-level few-shot data: source mappings, datalists (MONAI Label's too), splits, text tables, target episodes,
support sets, and the checkpoints the evaluation sweep loads."""

from __future__ import annotations

import pytest
import torch

from common.data.category_text import TextEmbeddingTable, prompt_file
from common.data.demo_shapes import ensure_demo_shapes
from common.data.fewshot_sources import (
    TargetEpisodes,
    classes_datalist,
    datalist_classes,
    load_support_set,
    merge_classes,
    read_classes,
    split_datalist,
    text_table,
)
from common.utils.checkpoints import checkpointed_networks


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return ensure_demo_shapes(tmp_path_factory.mktemp("shapes"))


def source(shapes, domain: str = "source") -> dict:
    return {"kind": "class_folders", "root": f"{shapes}/{domain}"}


class FakeSettings:
    """Stands in for TextSettings: a fixed table per description file (no encoder)."""

    name = "fake"

    def __init__(self, tables: dict[str, TextEmbeddingTable]) -> None:
        self.tables = tables

    def table(self, descriptions):
        return self.tables[str(descriptions)]


def test_read_and_merge_sources(shapes):
    classes = read_classes(source(shapes))
    assert list(classes) == ["disc", "square", "star", "triangle"] and all(len(v) == 12 for v in classes.values())
    merged = merge_classes([source(shapes), source(shapes, "target")])
    assert list(merged) == ["disc", "square", "star", "triangle", "cross", "ring"]
    with pytest.raises(ValueError, match="'disc' .* already given"):
        merge_classes([source(shapes), source(shapes)])
    with pytest.raises(ValueError, match="unknown few-shot source kind 'nope'.*class_folders"):
        read_classes({"kind": "nope", "root": str(shapes)})


def test_datalist_round_trip_and_monai_label_entries(shapes):
    classes = read_classes(source(shapes, "target"))
    data = classes_datalist(classes)
    assert len(data) == 24 and {"image", "label", "class_name"} <= set(data[0]) and "mask" not in data[0]
    back = datalist_classes(data, default_class=None)
    assert list(back) == ["cross", "ring"] and back["ring"][0]["mask"] == classes["ring"][0]["mask"]
    # MONAI Label's entries carry no class: they take the default one, named after the image file
    plain = [{"image": e["image"], "label": e["label"]} for e in data[:3]]
    (name, items), = datalist_classes(plain, "polyp").items()
    assert name == "polyp" and items[0]["name"] == "cross_000" and items[0]["fg_values"] is None
    with pytest.raises(ValueError, match="no 'class_name' and no default class"):
        datalist_classes(plain, None)


def test_split_datalist_per_class(shapes):
    data = classes_datalist(read_classes(source(shapes)))
    split = split_datalist(data, 0.2, seed=0)
    # 12 per class: round(0.2 * 12) = round(2.4) = 2 to validation, 10 to training; 4 classes
    assert len(split["val"]) == 4 * 2 and len(split["train"]) == 4 * 10
    assert {e["image"] for e in split["val"]}.isdisjoint(e["image"] for e in split["train"])
    assert split == split_datalist(data, 0.2, seed=0) and split != split_datalist(data, 0.2, seed=1)
    # a class of 3 cannot give 2 validation items and keep 2 for training: it stays whole in training
    small = [dict(e, class_name="few") for e in data[:3]]
    assert split_datalist(small, 0.5)["val"] == []
    # a class of 4 or more gives at least 2 to validation: round(0.1 * 4) = 0 -> 2 (2 left to train);
    # round(0.1 * 5) = round(0.5) = 0 (banker's rounding) -> 2 (3 left to train)
    for n, n_train in ((4, 2), (5, 3)):
        some = [dict(e, class_name="some") for e in data[:n]]
        assert [len(split_datalist(some, 0.1)[k]) for k in ("val", "train")] == [2, n_train]
    assert split_datalist(data[:4], 0.0)["val"] == []  # no validation asked for: none taken


def test_text_table_merges_files():
    a = TextEmbeddingTable(["polyp"], torch.ones(1, 4), torch.zeros(4))
    b = TextEmbeddingTable(["liver", "aorta"], torch.full((2, 4), 2.0), torch.full((4,), 9.0))
    merged = text_table(["a.json", "b.json"], FakeSettings({"a.json": a, "b.json": b}))
    assert merged.names == ["polyp", "liver", "aorta"] and torch.equal(merged["aorta"], torch.full((4,), 2.0))
    assert torch.equal(merged.background, torch.zeros(4))  # the first file's background sentence
    with pytest.raises(ValueError, match="described in two"):
        text_table(["a.json", "a2.json"], FakeSettings({"a.json": a, "a2.json": a}))


def test_target_episodes_protocols(shapes):
    target = TargetEpisodes({**source(shapes, "target"), "name": "shapes", "episodes": 6}, image_size=32)
    one, five = target(1), target(5)
    assert len(one) == len(five) == 6 and one.class_names == ["cross", "ring"]
    # class of episode i = i mod 2
    assert [one[i]["class_name"] for i in range(4)] == ["cross", "ring", "cross", "ring"]
    assert five[0]["support_images"].shape == (5, 3, 32, 32)
    enumerated = TargetEpisodes({**source(shapes, "target"), "protocol": "enumerate"}, image_size=32)(1)
    assert len(enumerated) == 24  # every image once as the query
    with pytest.raises(ValueError, match="unknown protocol 'random'"):
        TargetEpisodes({**source(shapes, "target"), "protocol": "random"}, image_size=32)
    with pytest.raises(ValueError, match="needs 'support_volume'"):
        TargetEpisodes({**source(shapes, "target"), "protocol": "volume"}, image_size=32)


def test_load_support_set(shapes):
    table = TextEmbeddingTable(["cross", "ring"], torch.eye(2), torch.tensor([0.5, 0.5]))
    support = load_support_set(source(shapes, "target"), "ring", 2, 32, table, names=["ring_003", "ring_007"])
    assert support["support_images"].shape == (2, 3, 32, 32) and support["support_masks"].shape == (2, 32, 32)
    assert torch.equal(support["class_text"], torch.tensor([0.0, 1.0]))
    assert set(support["support_masks"].unique().tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError, match="no class 'disc'"):
        load_support_set(source(shapes, "target"), "disc", 1, 32)
    with pytest.raises(ValueError, match="has no items \\['ring_999'\\]"):
        load_support_set(source(shapes, "target"), "ring", 1, 32, names=["ring_999"])
    with pytest.raises(ValueError, match="13-shot needs 13 images of 'ring', found 12"):
        load_support_set(source(shapes, "target"), "ring", 13, 32)


def test_shipped_prompt_files():
    assert prompt_file("wbc").endswith("common/data/prompts/wbc.json")
    with pytest.raises(FileNotFoundError, match="no shipped description file nope.json.*'wbc'"):
        prompt_file("nope")


def test_checkpointed_networks(tmp_path):
    trained, other = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    torch.save(trained.state_dict(), tmp_path / "a.pt")
    loaded = checkpointed_networks({"A": (other, tmp_path / "a.pt"), "B": (torch.nn.Linear(2, 1), tmp_path / "b.pt")})
    assert list(loaded) == ["A"] and torch.equal(loaded["A"].weight, trained.weight)
    with pytest.raises(FileNotFoundError, match="none of the checkpoints exists"):
        checkpointed_networks({"B": (torch.nn.Linear(2, 1), tmp_path / "b.pt")})
    torch.save(torch.nn.Linear(3, 1).state_dict(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match="c.pt' does not match Linear"):
        checkpointed_networks({"C": (torch.nn.Linear(2, 1), tmp_path / "c.pt")})
