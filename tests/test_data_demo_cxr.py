"""Finding tags / region alignment (common.data.cxr_findings) and the synthetic chest-radiograph demo
(common.data.demo_cxr), specs/asg.md §2.3, §3.5, §10."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.data.cxr_findings import REGION_INDEX, REGIONS, TAG_INDEX, TAGS, align_regions, extract_tags, \
    sentence_word_index
from common.data.demo_cxr import CLASSIFICATION_CLASSES, LESION_TAGS, U_ONES, ensure_demo_cxr_dataset
from conftest import require_data


def tags_of(*sentences: str) -> dict[str, int]:
    values = extract_tags(list(sentences))
    return {TAGS[i]: int(values[i]) for i in np.flatnonzero(values)}


def regions_of(*sentences: str) -> list[set[str]]:
    """Per sentence, the names of the regions it is aligned with."""
    aligned = align_regions(list(sentences))
    return [{REGIONS[r] for r in range(len(REGIONS)) if i in aligned[r]} for i in range(len(sentences))]


# --- vocabulary ------------------------------------------------------------------------------------------------

def test_tag_and_region_vocabularies():
    assert len(TAGS) == 40 and len(set(TAGS)) == 40
    assert TAGS[:5] == ("pleural effusion", "opacity", "pneumothorax", "edema", "atelectasis")  # spec §3.5
    assert TAGS[9] == "pneumonia"  # the zero-shot tag index of spec §6.3
    assert TAGS[-3:] == ("hardware", "dilation", "aspiration") and "pleural thicken" in TAGS
    assert len(REGIONS) == 23 and len(set(REGIONS)) == 23  # num_region of spec §2.3


# --- extract_tags ---------------------------------------------------------------------------------------------

def test_positive_mentions_and_surface_forms():
    assert tags_of("small left pleural effusion") == {"pleural effusion": 1}
    assert tags_of("bilateral effusions") == {"pleural effusion": 1}
    assert tags_of("the heart is enlarged") == {"cardiomegaly": 1}
    assert tags_of("enlarged heart") == {"cardiomegaly": 1}
    assert tags_of("patchy opacities") == {"opacity": 1}
    assert tags_of("bibasilar atelectatic changes") == {"atelectasis": 1}
    assert tags_of("left chest wall pacemaker") == {"pacemaker": 1}
    assert tags_of("calcified granuloma") == {"calcification": 1}  # granuloma itself is no tag


@pytest.mark.parametrize("sentence", [
    "no pleural effusion", "there is no effusion or pneumothorax", "without effusion", "negative for effusion",
    "the lungs are free of effusion", "lungs are clear of effusion", "resolved effusion", "effusion is not seen",
    "the left effusion has resolved",
])
def test_negation_cues(sentence):
    assert tags_of(sentence).get("pleural effusion", 0) == 0


@pytest.mark.parametrize("sentence", [
    "possible effusion", "possibly a small effusion", "this may be an effusion", "effusion might be present",
    "small effusion cannot be excluded", "likely small effusion", "findings suggest an effusion",
    "questionable effusion", "opacity concerning for effusion",
])
def test_uncertainty_cues(sentence):
    assert tags_of(sentence)["pleural effusion"] == -1


def test_precedence_across_sentences_and_scope():
    assert tags_of("no effusion", "possible effusion") == {"pleural effusion": -1}  # uncertain beats negated
    assert tags_of("possible effusion", "small effusion") == {"pleural effusion": 1}  # positive beats uncertain
    assert tags_of("no effusion", "small left effusion") == {"pleural effusion": 1}
    assert tags_of("the heart is not enlarged") == {}  # cue inside the mention
    assert tags_of("no change in the left lower lobe consolidation") == {"consolidation": 1}  # pseudo-negation
    assert tags_of("no effusion but there is a right lower lobe opacity") == {"opacity": 1}  # terminator
    assert tags_of("the lungs are clear") == {}  # nothing mentioned -> all 0


def test_real_iu_report_sentences():
    # IU X-ray reports 3740 and 3001 of annotation.json, cleaned as spec §2.2 (lower case, \w+ runs)
    raw = ["XXXX diffuse right lower lobe airspace opacity is present.",
           "There is no pleural effusion or pneumothorax.",
           "Probable right lower lobe pneumonia.",
           "Cannot exclude small pleural effusions."]
    sentences = [" ".join(re.findall(r"\w+", s.lower())) for s in raw]
    assert tags_of(*sentences[:3]) == {"opacity": 1, "pneumonia": -1}
    assert tags_of(sentences[3]) == {"pleural effusion": -1}
    regions = regions_of(*sentences)
    assert regions[0] == regions[2] == {"right lung", "right lower lung zone"}
    assert regions[1] == {"right costophrenic angle", "left costophrenic angle", "right apical zone",
                          "left apical zone"}


# --- align_regions --------------------------------------------------------------------------------------------

def test_region_rules():
    r = regions_of("left lower lobe consolidation", "the lungs are clear", "the heart is normal in size",
                   "small effusion on the left", "lingula atelectasis", "the mediastinum is normal",
                   "endotracheal tube tip above the carina", "no acute cardiopulmonary process")
    assert r[0] == {"left lung", "left lower lung zone"}
    assert r[1] == {"right lung", "left lung"}  # no side: both lungs
    assert r[2] == {"cardiac silhouette"}
    assert r[3] == {"left costophrenic angle"}  # side word after the structure
    assert r[4] == {"left lung", "left mid lung zone"}  # lingula is left
    assert r[5] == {"mediastinum"} and r[6] == {"trachea"} and r[7] == set()


def test_align_regions_lists_sentence_ids_per_region():
    aligned = align_regions(["right pleural effusion", "the heart is enlarged", "right base opacity"])
    assert len(aligned) == 23
    assert aligned[REGION_INDEX["right costophrenic angle"]] == [0]
    assert aligned[REGION_INDEX["cardiac silhouette"]] == [1]
    assert aligned[REGION_INDEX["right lower lung zone"]] == [2]
    assert aligned[REGION_INDEX["left lung"]] == []


def test_sentence_word_index():
    sentences = ["a b", "c d e", "f"]  # words a b | c d e | f -> offsets 0, 2, 5
    assert sentence_word_index(sentences, [1]) == [2, 3, 4]
    assert sentence_word_index(sentences, [2, 0]) == [0, 1, 5]
    assert sentence_word_index(sentences, []) == []
    words = " ".join(sentences).split()
    assert [words[k] for k in sentence_word_index(sentences, [1, 2])] == ["c", "d", "e", "f"]
    with pytest.raises(ValueError, match="out of range"):
        sentence_word_index(sentences, [3])


# --- the demo -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return ensure_demo_cxr_dataset(tmp_path_factory.mktemp("cxr") / "demo")  # the defaults: 64 / 16 / 16


def read(root: Path, name: str) -> dict:
    return json.loads((root / name).read_text())


def all_records(root: Path) -> list[dict]:
    pretrain = read(root, "pretrain.json")
    return [r for split in ("train", "valid", "test") for r in pretrain[split]]


def test_record_format(demo):
    pretrain = read(demo, "pretrain.json")
    assert {k: len(v) for k, v in pretrain.items()} == {"train": 64, "valid": 16, "test": 16}
    for rec in all_records(demo):
        assert set(rec) == {"id", "image", "sentences", "labels", "boxes", "sent_index"}
        assert rec["image"] == f"images/{rec['id']}.png"
        image = cv2.imread(str(demo / rec["image"]), cv2.IMREAD_UNCHANGED)
        assert image.ndim == 2 and image.dtype == np.uint8 and image.shape[0] != image.shape[1]
        h, w = image.shape
        assert all(s == " ".join(re.findall(r"\w+", s.lower())) and s for s in rec["sentences"])
        assert len(rec["labels"]) == 40 and set(rec["labels"]) <= {-1, 0, 1}
        assert rec["labels"] == extract_tags(rec["sentences"]).tolist()
        n_words = len(" ".join(rec["sentences"]).split())
        boxes = np.array(rec["boxes"]).reshape(-1, 4)
        assert len(boxes) == len(rec["sent_index"]) <= 23 and len(boxes) > 0
        assert np.all((0 <= boxes[:, 0]) & (boxes[:, 0] < boxes[:, 2]) & (boxes[:, 2] <= w))
        assert np.all((0 <= boxes[:, 1]) & (boxes[:, 1] < boxes[:, 3]) & (boxes[:, 3] <= h))
        aligned = align_regions(rec["sentences"])
        rows = [r for r in range(23) if aligned[r]]  # the aligned regions, in region order
        assert rec["sent_index"] == [sentence_word_index(rec["sentences"], aligned[r]) for r in rows]
        assert all(0 <= k < n_words for row in rec["sent_index"] for k in row)


def region_box(rec: dict, region: str) -> list[float] | None:
    aligned = align_regions(rec["sentences"])
    rows = [r for r in range(23) if aligned[r]]
    r = REGION_INDEX[region]
    return rec["boxes"][rows.index(r)] if r in rows else None


def test_cardiomegaly_widens_the_heart(demo):
    ratio = {1: [], 0: []}
    for rec in all_records(demo):
        value = rec["labels"][TAG_INDEX["cardiomegaly"]]
        box = region_box(rec, "cardiac silhouette")
        if value in ratio and box is not None:
            width = cv2.imread(str(demo / rec["image"]), 0).shape[1]
            ratio[value].append((box[2] - box[0]) / width)
    assert len(ratio[1]) >= 3 and len(ratio[0]) >= 10
    # heart half-width 0.16 W x U(0.92, 1.08), x 1.45 with cardiomegaly: [0.294, 0.346] vs [0.427, 0.501]
    assert max(ratio[0]) < 0.36 < min(ratio[1])


def test_lesion_masks_follow_the_tags(demo):
    seg = read(demo, "segmentation.json")
    by_image = {e["image"]: e["label"] for split in ("train", "valid", "test") for e in seg[split]}
    painted = [TAG_INDEX[t] for t in LESION_TAGS + ("pneumothorax",)]
    n_positive = 0
    for rec in all_records(demo):
        mask = cv2.imread(str(demo / by_image[rec["image"]]), cv2.IMREAD_UNCHANGED)
        image = cv2.imread(str(demo / rec["image"]), 0)
        assert mask.shape == image.shape and set(np.unique(mask).tolist()) <= {0, 255}
        expected = any(rec["labels"][i] != 0 for i in painted)
        assert mask.any() == expected, rec["sentences"]
        only_lesions = expected and rec["labels"][TAG_INDEX["pneumothorax"]] == 0
        if only_lesions and any(rec["labels"][TAG_INDEX[t]] == 1 for t in LESION_TAGS):
            n_positive += 1  # a painted opacity is brighter than the dark lung fields (~52 grey levels)
            assert image[mask > 0].mean() > 75, rec["sentences"]
    assert n_positive >= 10


def test_classification_labels(demo):
    cls = read(demo, "classification.json")
    assert cls["classes"] == list(CLASSIFICATION_CLASSES)
    records = {r["image"]: r for r in all_records(demo)}
    seen_uncertain = set()
    for split in ("train", "valid", "test"):
        assert len(cls[split]) == {"train": 64, "valid": 16, "test": 16}[split]
        for entry in cls[split]:
            labels = records[entry["image"]]["labels"]
            for c, name in enumerate(CLASSIFICATION_CLASSES):
                v = labels[TAG_INDEX[name]]
                # U-Ones (atelectasis, edema, effusion): -1 -> 1; U-Zeros (cardiomegaly, consolidation): -1 -> 0
                assert entry["label"][c] == (1 if v == 1 or (v == -1 and U_ONES[c]) else 0)
                if v == -1:
                    seen_uncertain.add(name)
            assert entry["pneumonia"] == int(labels[TAG_INDEX["pneumonia"]] == 1)
        assert 0 < sum(e["pneumonia"] for e in cls[split]) < len(cls[split])  # both classes for the AUC
    assert U_ONES == (True, False, False, True, True)
    assert {"cardiomegaly", "pleural effusion"} <= seen_uncertain  # both mappings exercised


def test_determinism_and_idempotence(demo, tmp_path):
    small = dict(n_train=3, n_valid=1, n_test=1, seed=5)
    a = ensure_demo_cxr_dataset(tmp_path / "a", **small)
    b = ensure_demo_cxr_dataset(tmp_path / "b", **small)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != ".complete")
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != ".complete")
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # same seed -> identical bytes
    stamp = (a / "pretrain.json").stat().st_mtime_ns
    ensure_demo_cxr_dataset(tmp_path / "a", **small)
    assert (a / "pretrain.json").stat().st_mtime_ns == stamp  # same parameters: nothing rewritten
    ensure_demo_cxr_dataset(tmp_path / "a", **{**small, "seed": 6})
    assert (a / "pretrain.json").read_bytes() != (b / "pretrain.json").read_bytes()  # other seed: regenerated


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="non-negative"):
        ensure_demo_cxr_dataset(tmp_path / "x", n_train=-1)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        ensure_demo_cxr_dataset(tmp_path / "x", reports=tmp_path / "missing.json")
    assert not (tmp_path / "x").exists()


def test_real_iu_reports(tmp_path):
    from common.data.cxr_reports import load_report_sentences

    annotation = require_data("cxr_reports") / "annotation.json"
    root = ensure_demo_cxr_dataset(tmp_path / "iu", reports=annotation, n_train=10, n_valid=5, n_test=5)
    pretrain = read(root, "pretrain.json")
    texts = load_report_sentences(annotation)
    for split, n in (("train", 10), ("valid", 5), ("test", 5)):
        first = [t for t in texts if t.split == split][:n]  # the first ones, in file order
        assert [r["id"] for r in pretrain[split]] == [t.id for t in first]
        assert [r["sentences"] for r in pretrain[split]] == [list(t.sentences) for t in first]
    records = all_records(root)
    assert len(records) == 20
    for rec in records:
        assert rec["labels"] == extract_tags(rec["sentences"]).tolist()
        assert (root / rec["image"]).is_file() and len(rec["boxes"]) == len(rec["sent_index"]) > 0
    # IU train report 3740 is the 5th of annotation.json: opacity positive, pneumonia uncertain ("probable")
    rec = next(r for r in pretrain["train"] if r["id"] == "3740")
    assert rec["labels"][TAG_INDEX["opacity"]] == 1 and rec["labels"][TAG_INDEX["pneumonia"]] == -1
    mask = cv2.imread(str(root / "masks" / "3740.png"), 0)
    assert mask.any()  # the right lower lobe opacity is painted
    assert region_box(rec, "right lower lung zone") is not None
