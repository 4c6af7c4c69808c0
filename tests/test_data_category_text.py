"""Category description files, text-embedding tables and their cache, scripts/encode_prompts.py
(specs/cdtg.md §5.1-§5.3), and the shipped prompt files of the CD-TG bundle."""

import json
import re
from pathlib import Path

import fire
import pytest
import torch

from common.data.category_text import (TextEmbeddingTable, encode_descriptions, ensure_text_table,
                                       normalize_class_name, read_descriptions)
from conftest import REPO_ROOT, load_script

PROMPTS = REPO_ROOT / "common" / "data" / "prompts"


class CountingEncoder:
    """A text encoder computable by hand: e(text) = [characters, words, letters 'a']."""

    dim = 3

    def __init__(self, name: str = "counting:v1") -> None:
        self.name = name
        self.calls = 0

    def encode(self, texts: list[str]) -> torch.Tensor:
        self.calls += 1
        return torch.tensor([[len(t), len(t.split()), t.count("a")] for t in texts], dtype=torch.float32)


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _descriptions(tmp_path: Path, **changes) -> Path:
    data = {"dataset": "toy",
            "categories": [{"id": 1, "name": "Right_Kidney", "supercategory": "organ", "caption": "kidney a"},
                           {"id": 0, "name": "liver", "supercategory": "organ", "caption": "big liver"}],
            "background": {"caption": "a b c"}}
    data.update(changes)
    return _write(tmp_path / "toy.json", data)


def test_read_sorts_by_id_and_encode_by_hand(tmp_path):
    path = _descriptions(tmp_path)
    desc = read_descriptions(path)
    assert desc.names == ["liver", "Right_Kidney"] and desc.ids == [0, 1] and desc.dataset == "toy"
    table = encode_descriptions(path, CountingEncoder())
    # "big liver": 9 chars, 2 words, 0 'a'; "kidney a": 8 chars, 2 words, 1 'a'; "a b c": 5 chars, 3 words, 1 'a'
    assert torch.equal(table.embeddings, torch.tensor([[9.0, 2, 0], [8, 2, 1]]))
    assert torch.equal(table.background, torch.tensor([5.0, 3, 1]))
    assert table.dim == 3 and len(table) == 2
    assert torch.equal(table["right kidney"], table["RIGHT-kidney"]) and table.index("Right Kidney") == 1
    with pytest.raises(ValueError, match=r"class 'spleen' has no description in .*toy\.json"):
        table["spleen"]


def test_normalize_class_name():
    assert normalize_class_name("Seborrheic_Keratosis") == normalize_class_name("seborrheic keratosis")
    assert normalize_class_name("diningtable") == normalize_class_name("dining table") == "diningtable"


@pytest.mark.parametrize("change, message", [
    ({"background": {"text": "x"}}, "'background' must be an object with a 'caption'"),
    ({"categories": []}, "'categories' must be a non-empty list"),
    ({"categories": [{"id": 0, "name": "a", "caption": "x"}]},
     r"categories\[0\] is missing key\(s\) \['supercategory'\]"),
    ({"categories": [{"id": 0, "name": "a", "supercategory": "", "caption": "  "}]}, "'caption' must be a non-empty"),
    ({"categories": [{"id": 0, "name": "a", "supercategory": "", "caption": "x"},
                     {"id": 0, "name": "b", "supercategory": "", "caption": "y"}]}, r"duplicate category ids \[0\]"),
    ({"categories": [{"id": 0, "name": "Left kidney", "supercategory": "", "caption": "x"},
                     {"id": 1, "name": "left_kidney", "supercategory": "", "caption": "y"}]},
     "duplicate category names"),
    ({"categories": [{"id": "0", "name": "a", "supercategory": "", "caption": "x"}]}, "'id' must be a non-negative"),
])
def test_bad_description_files_name_the_file(tmp_path, change, message):
    path = _descriptions(tmp_path, **change)
    with pytest.raises(ValueError, match=message) as err:
        read_descriptions(path)
    assert str(path) in str(err.value)


def test_missing_keys_and_files(tmp_path):
    path = _write(tmp_path / "bare.json", {"categories": []})
    with pytest.raises(ValueError, match=r"bare\.json: missing key\(s\) \['dataset', 'background'\]"):
        read_descriptions(path)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match=r"broken\.json: not valid JSON"):
        read_descriptions(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="nothing.json"):
        read_descriptions(tmp_path / "nothing.json")
    with pytest.raises(FileNotFoundError, match="encode_prompts"):
        TextEmbeddingTable.load(tmp_path / "nothing.pt")


def test_table_round_trip_and_shape_checks(tmp_path):
    table = encode_descriptions(_descriptions(tmp_path), CountingEncoder())
    table.save(tmp_path / "t.pt")
    loaded = TextEmbeddingTable.load(tmp_path / "t.pt")
    assert loaded.names == table.names and torch.equal(loaded.embeddings, table.embeddings)
    assert torch.equal(loaded.background, table.background) and loaded.meta["encoder"] == "counting:v1"
    with pytest.raises(ValueError, match=r"t\.pt"):  # a missing class names the table file too
        loaded["spleen"]
    with pytest.raises(ValueError, match="background must be"):
        TextEmbeddingTable(["a"], torch.zeros(1, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="embeddings must be"):
        TextEmbeddingTable(["a", "b"], torch.zeros(1, 3), torch.zeros(3))


def test_cache_is_reused_until_file_or_encoder_changes(tmp_path):
    path, cache = _descriptions(tmp_path), tmp_path / "cache" / "toy.pt"
    encoder = CountingEncoder()
    first = ensure_text_table(path, cache, lambda: encoder)
    assert encoder.calls == 1 and cache.is_file()
    # same file, same encoder name: read from the cache; with encoder_name given the factory is not even called
    ensure_text_table(path, cache, lambda: encoder)
    built = []
    again = ensure_text_table(path, cache, lambda: built.append(1) or encoder, encoder_name="counting:v1")
    assert encoder.calls == 1 and not built and torch.equal(again.embeddings, first.embeddings)
    # an edited caption changes the hash: encoded again
    _descriptions(tmp_path, background={"caption": "a b c d"})
    assert ensure_text_table(path, cache, lambda: encoder).background[1].item() == 4.0  # 4 words
    assert encoder.calls == 2
    # another encoder name: encoded again
    other = CountingEncoder("counting:v2")
    ensure_text_table(path, cache, lambda: other)
    assert other.calls == 1 and TextEmbeddingTable.load(cache).meta["encoder"] == "counting:v2"
    with pytest.raises(ValueError, match="differs from the name"):
        ensure_text_table(path, cache, lambda: other, encoder_name="counting:v3")


def test_encode_prompts_cli(tmp_path, monkeypatch):
    script = load_script("encode_prompts")
    made = []

    def fake_make(kind, model_name, weights):
        made.append((kind, model_name, weights))
        return CountingEncoder(f"{kind}:{model_name}")

    monkeypatch.setattr(script, "make_text_encoder", fake_make)
    path, out = _descriptions(tmp_path), tmp_path / "out" / "toy.pt"
    summary = fire.Fire(script.encode_prompts, command=["--descriptions", str(path), "--out", str(out),
                                                        "--encoder", "open_clip", "--model_name", "ViT-B-32"])
    assert made == [("open_clip", "ViT-B-32", None)]
    assert summary["dim"] == 3 and summary["names"] == ["liver", "Right_Kidney"]
    table = TextEmbeddingTable.load(out)
    assert torch.equal(table["liver"], torch.tensor([9.0, 2, 0])) and table.meta["encoder"] == "open_clip:ViT-B-32"


def test_encode_prompts_with_a_real_open_clip_tower(tmp_path, monkeypatch):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (extra [clip]) is not installed")
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    tiny = open_clip.CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=16,
                                                                 image_size=32),
                          text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1))
    monkeypatch.setattr(open_clip, "create_model", lambda name, pretrained=None: tiny)  # no ViT-B-32 build
    script = load_script("encode_prompts")
    out = tmp_path / "lung.pt"
    script.encode_prompts(str(PROMPTS / "lung.json"), str(out), "open_clip", "ViT-B-32")
    table = TextEmbeddingTable.load(out)
    caption = read_descriptions(PROMPTS / "lung.json").captions[0]
    with torch.no_grad():
        expected = tiny.encode_text(open_clip.get_tokenizer("ViT-B-32")([caption]))[0]
    assert table.dim == 32 and torch.allclose(table["lung"], expected, atol=1e-6)


SHIPPED = {
    "isic": ["melanoma", "nevus", "seborrheic keratosis", "lesion"],
    "lung": ["lung"],
    "wbc": ["cytoplasm", "nucleus", "cell"],
    "chaos_mr": ["liver", "right kidney", "left kidney", "spleen"],
    "btcv": ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
             "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland",
             "left adrenal gland"],
    "polyp": ["polyp"],
    "pascal": ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
               "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor"],
    "shapes": ["disc", "square", "triangle", "star", "ring", "cross"],
}


@pytest.mark.parametrize("dataset", sorted(SHIPPED))
def test_shipped_prompt_files(dataset):
    path = PROMPTS / f"{dataset}.json"
    desc = read_descriptions(path)
    assert [normalize_class_name(n) for n in desc.names] == [normalize_class_name(n) for n in SHIPPED[dataset]]
    assert desc.ids == list(range(len(SHIPPED[dataset])))
    raw_ids = [c["id"] for c in json.loads(path.read_text())["categories"]]
    assert raw_ids == desc.ids  # 0-based in file order
    for caption in desc.captions:
        assert re.fullmatch(r"A photo of .+ in which .+\.", caption), caption
    assert desc.background.endswith(".")


def test_shipped_captions_fit_clip_context():
    # CLIP's context is 77 tokens including the start and end tokens: longer captions would be cut silently
    tokenizer = pytest.importorskip("open_clip.tokenizer", reason="open_clip (extra [clip]) is not installed")
    bpe = tokenizer.SimpleTokenizer()
    for dataset in SHIPPED:
        desc = read_descriptions(PROMPTS / f"{dataset}.json")
        for caption in desc.captions + [desc.background]:
            assert len(bpe.encode(caption)) <= 75, (dataset, caption)
