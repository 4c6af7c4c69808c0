"""Tests of common.data.cxr_datasets: ASG region annotation, MIMIC-CXR, downstream layouts (spec asg.md §2, §6).

Every dataset is a tiny synthetic copy of the real layout written in tmp_path (DICOM files are empty: only their
paths are read). Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
from pathlib import Path

import numpy as np
import pytest

from common.data.cxr_datasets import (
    CHEXPERT_TASKS,
    NIH_CLASSES,
    NUM_REGIONS,
    NUM_TAGS,
    boxes_to_mask,
    chexpert_datalist,
    covidx_datalist,
    mimic_cxr_datalist,
    nih_datalist,
    read_region_annotation,
    rle_decode,
    rsna_pneumonia_datalist,
    rsna_segmentation_datalist,
    sample_fraction,
    siim_datalist,
)


def write_csv(path: Path, header: list[str], rows: list[list], compress: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with (gzip.open(path, "wt", newline="") if compress else open(path, "w", newline="")) as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def ids(entries: list[dict]) -> list[str]:
    return [e["id"] for e in entries]


def check_partition(datalist: dict, expected_ids: set[str]) -> None:
    """train / valid / test are disjoint and together hold exactly ``expected_ids``."""
    parts = [set(ids(datalist[k])) for k in ("train", "valid", "test")]
    assert sum(map(len, parts)) == len(expected_ids)
    assert set().union(*parts) == expected_ids


# ------------------------------------------------------------------------------------------ region annotation
SENTENCES = ["left lung is clear", "no pleural effusion"]  # 4 + 3 = 7 words, positions 0..6


def raw_record() -> dict:
    """labels.pickle schema: 2 valid boxes then 21 padding rows; sent_index 23 x 110, -1 padded."""
    labels = np.zeros(NUM_TAGS, dtype=np.int64)
    labels[[0, 5]] = 1
    labels[7] = -1
    region = -np.ones((NUM_REGIONS, 4))
    region[0] = [10, 20, 110, 220]
    region[1] = [5.5, 6.5, 50, 60]
    sent_index = -np.ones((NUM_REGIONS, 110), dtype=np.int64)
    sent_index[0, :4] = [0, 1, 2, 3]  # words of "left lung is clear"
    sent_index[1, :3] = [4, 5, 6]  # words of "no pleural effusion"
    return {"path2sent": list(SENTENCES), "labels": labels, "region": region, "sent_index": sent_index}


def expected_record() -> dict:
    labels = [0] * NUM_TAGS
    labels[0] = labels[5] = 1
    labels[7] = -1
    return {"sentences": SENTENCES, "labels": labels, "boxes": [[10.0, 20.0, 110.0, 220.0], [5.5, 6.5, 50.0, 60.0]],
            "sent_index": [[0, 1, 2, 3], [4, 5, 6]]}


def to_json(record: dict) -> dict:
    return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in record.items()}


def write_annotation(path: Path, records: dict) -> Path:
    if path.suffix == ".json":
        path.write_text(json.dumps({k: to_json(v) for k, v in records.items()}))
    else:
        path.write_bytes(pickle.dumps(records))
    return path


@pytest.mark.parametrize("name", ["labels.pickle", "labels.json"])
def test_region_annotation_pickle_and_json_drop_padding(tmp_path: Path, name: str) -> None:
    path = write_annotation(tmp_path / name, {"files/p10/a.jpg": raw_record()})
    assert read_region_annotation(path) == {"files/p10/a.jpg": expected_record()}


def test_region_annotation_without_regions(tmp_path: Path) -> None:
    raw = raw_record() | {"region": [], "sent_index": -np.ones((NUM_REGIONS, 110))}
    out = read_region_annotation(write_annotation(tmp_path / "labels.pickle", {"k": raw}))["k"]
    assert out["boxes"] == [] and out["sent_index"] == []
    assert out["labels"] == expected_record()["labels"]


def _with(**changes) -> dict:
    raw = raw_record()
    for field, change in changes.items():
        change(raw[field])
    return raw


@pytest.mark.parametrize("raw, message", [
    (raw_record() | {"labels": []}, "empty tag list"),
    (raw_record() | {"labels": [0] * 39}, "shape"),
    (_with(labels=lambda a: a.__setitem__(3, 2)), "only 1, 0 and -1"),
    (_with(region=lambda a: a.__setitem__(5, [1, 1, 9, 9])), "follows a padding row"),  # valid row after padding
    (_with(region=lambda a: a.__setitem__(1, [50, 6.5, 5.5, 60])), "x1 < x2"),  # inverted box
    (_with(sent_index=lambda a: a.__setitem__((2, 0), 1)), "row 2 has word positions"),  # no box for row 2
    (_with(sent_index=lambda a: a.__setitem__((1, slice(0, 3)), -1)), "no sentence position"),  # box 1 unaligned
    (_with(sent_index=lambda a: a.__setitem__((0, 6), 5)), "followed by -1 padding"),  # position after padding
    (_with(sent_index=lambda a: a.__setitem__((1, 3), 7)), "past the 7 words"),  # only positions 0..6 exist
    ({k: v for k, v in raw_record().items() if k != "sent_index"}, "no field"),
])
def test_region_annotation_bad_records_name_file_and_key(tmp_path: Path, raw: dict, message: str) -> None:
    path = write_annotation(tmp_path / "labels.json", {"img-7": raw})
    with pytest.raises(ValueError, match=message) as err:
        read_region_annotation(path)
    assert "labels.json" in str(err.value) and "img-7" in str(err.value)


def test_region_annotation_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pickle"):
        read_region_annotation(tmp_path / "nope.pickle")
    (tmp_path / "labels.csv").write_text("x")
    with pytest.raises(ValueError, match="pickle, .pkl or .json"):
        read_region_annotation(tmp_path / "labels.csv")


# ----------------------------------------------------------------------------------------------- MIMIC-CXR
REPORTS = {
    # impression comes first (§2.2): "no acute process", then the findings sentences
    "p10/p10000001/s50000001": "FINAL REPORT\n FINDINGS: The lungs are clear. No effusion.\n"
                               " IMPRESSION: No acute process.\n",
    "p10/p10000001/s50000002": "FINDINGS: Heart size is normal.\n",
    "p11/p11000002/s50000003": "IMPRESSION: Mild cardiomegaly is seen.\n",
    "p11/p11000002/s50000004": "INDICATION: Cough.\n",  # neither findings nor impression -> study dropped
    "p12/p12000003/s50000005": "IMPRESSION: No change.\n",  # 2 words < 3 -> dropped
}
# dicom, subject, study, view, split
MIMIC_ROWS = [
    ("d1", "10000001", "50000001", "PA", "train"),
    ("d2", "10000001", "50000001", "LATERAL", "train"),  # lateral -> dropped
    ("d3", "10000001", "50000002", "AP", "validate"),
    ("d4", "11000002", "50000003", "PA", "test"),
    ("d5", "11000002", "50000004", "PA", "train"),
    ("d6", "12000003", "50000005", "AP", "train"),
]


def image_rel(dicom: str, subject: str, study: str) -> str:
    return f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}.jpg"


@pytest.fixture
def mimic_root(tmp_path: Path) -> Path:
    root = tmp_path / "mimic"
    write_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz", ["dicom_id", "subject_id", "study_id", "ViewPosition"],
              [r[:4] for r in MIMIC_ROWS], compress=True)
    write_csv(root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
              [(d, st, su, sp) for d, su, st, _, sp in MIMIC_ROWS])
    for dicom, subject, study, _, _ in MIMIC_ROWS:
        touch(root / image_rel(dicom, subject, study))
    for study, text in REPORTS.items():
        (root / "files" / f"{study}.txt").write_text(text)
    return root


def test_mimic_frontal_filter_split_merge_and_reports(mimic_root: Path) -> None:
    out = mimic_cxr_datalist(mimic_root)
    # d2 lateral, d5 no findings/impression, d6 < 3 words are dropped; validate (d3) + test (d4) -> valid
    assert (ids(out["train"]), ids(out["valid"]), out["test"]) == (["d1"], ["d3", "d4"], [])
    d1 = out["train"][0]
    assert d1["image"] == str(mimic_root / "files/p10/p10000001/s50000001/d1.jpg")
    assert d1["sentences"] == ["no acute process", "the lungs are clear", "no effusion"]
    assert (d1["labels"], d1["boxes"], d1["sent_index"]) == ([0] * NUM_TAGS, [], [])
    assert out["valid"][1]["sentences"] == ["mild cardiomegaly is seen"]
    kept = mimic_cxr_datalist(mimic_root, merge_test=False)
    assert (ids(kept["valid"]), ids(kept["test"])) == (["d3"], ["d4"])


def test_mimic_reports_dir(mimic_root: Path, tmp_path: Path) -> None:
    reports = tmp_path / "mimic-cxr-reports"
    for study in REPORTS:  # reports in their own tree (the MIMIC-CXR report archive), not beside the images
        target = reports / "files" / f"{study}.txt"
        target.parent.mkdir(parents=True, exist_ok=True)
        (mimic_root / "files" / f"{study}.txt").rename(target)
    with pytest.raises(FileNotFoundError, match=r"s50000001\.txt of the image files/p10/p10000001/s50000001/d1"):
        mimic_cxr_datalist(mimic_root)
    out = mimic_cxr_datalist(mimic_root, reports_dir=reports)
    assert ids(out["train"]) == ["d1"] and out["train"][0]["sentences"][0] == "no acute process"


def test_mimic_with_annotation(mimic_root: Path, tmp_path: Path) -> None:
    path = write_annotation(tmp_path / "labels.json", {
        image_rel("d1", "10000001", "50000001"): raw_record(),  # key = path relative to root (ASG's CSV)
        "d3": raw_record() | {"region": [], "sent_index": []},  # key = dicom_id; an image without regions
        "d5": raw_record(),  # report without findings/impression is not read when annotated
    })
    out = mimic_cxr_datalist(mimic_root, annotation=path)
    # d4 and d6 have no annotation record -> dropped
    assert (ids(out["train"]), ids(out["valid"])) == (["d1", "d5"], ["d3"])
    d1 = out["train"][0]
    assert {k: d1[k] for k in ("sentences", "labels", "boxes", "sent_index")} == expected_record()
    assert out["valid"][0]["boxes"] == [] and out["valid"][0]["sent_index"] == []


def test_mimic_errors(mimic_root: Path) -> None:
    (mimic_root / image_rel("d3", "10000001", "50000002")).unlink()
    with pytest.raises(FileNotFoundError, match=r"split\.csv line 4 names the image .*d3\.jpg"):
        mimic_cxr_datalist(mimic_root)
    assert ids(mimic_cxr_datalist(mimic_root, check_files=False)["valid"]) == ["d3", "d4"]
    (mimic_root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    with pytest.raises(FileNotFoundError, match="mimic-cxr-2.0.0-metadata.csv"):
        mimic_cxr_datalist(mimic_root)


def test_mimic_bad_split_and_empty(mimic_root: Path) -> None:
    write_csv(mimic_root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
              [("d1", "50000001", "10000001", "training")])
    with pytest.raises(ValueError, match=r"line 2: split 'training'"):
        mimic_cxr_datalist(mimic_root)
    write_csv(mimic_root / "mimic-cxr-2.0.0-split.csv", ["dicom_id", "study_id", "subject_id", "split"],
              [("d2", "50000001", "10000001", "train")])  # only a lateral image
    with pytest.raises(ValueError, match="no MIMIC-CXR image kept"):
        mimic_cxr_datalist(mimic_root)


# --------------------------------------------------------------------------------------------- fractions
def test_sample_fraction_sizes_order_and_determinism() -> None:
    records = list(range(20))
    tenth = sample_fraction(records, 0.1)
    assert len(tenth) == 2  # round(0.1 * 20) = 2
    assert tenth == sorted(tenth) and set(tenth) <= set(records)  # original order, a subset
    assert sample_fraction(records, 0.1) == tenth  # seed 42 -> same draw every time
    assert len(sample_fraction(records, 0.01)) == 1  # round(0.2) = 0, raised to at least 1
    assert len(sample_fraction(records, 0.5)) == 10
    assert sample_fraction(records, 1.0) == records
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            sample_fraction(records, bad)


def test_sample_fraction_matches_pandas_sample() -> None:
    """MGCA subsamples with ``df.sample(frac=f, random_state=42)``; the same rows must be kept."""
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"i": range(37)})
    for fraction in (0.1, 0.05, 0.3):  # 4, 2 and 11 of 37 rows (pandas keeps 0 rows when round(f * n) = 0)
        expected = sorted(frame.sample(frac=fraction, random_state=42)["i"].tolist())
        assert sample_fraction(list(range(37)), fraction) == expected


# ---------------------------------------------------------------------------------------------- CheXpert
CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "No Finding", "Atelectasis", "Cardiomegaly",
                   "Consolidation", "Edema", "Pleural Effusion"]


def chexpert_row(split: str, patient: int, view: str, labels: list[str]) -> list[str]:
    path = f"CheXpert-v1.0-small/{split}/patient{patient:05d}/study1/view1_{view.lower()}.jpg"
    return [path, "Male", "60", view, "AP", "", *labels]


@pytest.fixture
def chexpert_root(tmp_path: Path) -> Path:
    root = tmp_path / "CheXpert-v1.0-small"
    train = [chexpert_row("train", 1, "Frontal", ["-1.0", "-1.0", "-1.0", "-1.0", "-1.0"]),
             chexpert_row("train", 2, "Frontal", ["", "1.0", "", "0.0", "1.0"]),
             chexpert_row("train", 3, "Lateral", ["1.0", "1.0", "1.0", "1.0", "1.0"])]
    train += [chexpert_row("train", p, "Frontal", ["0.0"] * 5) for p in range(4, 13)]  # 11 frontal in all
    test = [chexpert_row("valid", 20, "Frontal", ["1.0", "0.0", "0.0", "0.0", "0.0"]),
            chexpert_row("valid", 21, "Lateral", ["0.0"] * 5),
            chexpert_row("valid", 22, "Frontal", ["0.0", "1.0", "0.0", "0.0", "1.0"])]
    write_csv(root / "train.csv", CHEXPERT_HEADER, train)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, test)
    for row in train + test:
        touch(root / Path(*Path(row[0]).parts[1:]))
    return root


def test_chexpert_uncertainty_frontal_and_splits(chexpert_root: Path) -> None:
    out = chexpert_datalist(chexpert_root)
    labels = {e["id"]: e["label"] for part in out.values() for e in part}
    p1, p2 = "train/patient00001/study1/view1_frontal.jpg", "train/patient00002/study1/view1_frontal.jpg"
    # all -1: U-Ones for Atelectasis, Edema, Pleural Effusion; U-Zeros for Cardiomegaly, Consolidation
    assert dict(zip(CHEXPERT_TASKS, labels[p1])) == {"Atelectasis": 1.0, "Cardiomegaly": 0.0, "Consolidation": 0.0,
                                                     "Edema": 1.0, "Pleural Effusion": 1.0}
    assert labels[p2] == [0.0, 1.0, 0.0, 0.0, 1.0]  # empty (NaN) -> 0
    assert ids(out["test"]) == ["valid/patient00020/study1/view1_frontal.jpg",
                                "valid/patient00022/study1/view1_frontal.jpg"]  # official valid.csv, frontal
    # 11 frontal training images: valid = min(5000, 11 // 5) = 2, train = 9; the lateral one is nowhere
    assert (len(out["train"]), len(out["valid"])) == (9, 2)
    frontal = {f"train/patient{p:05d}/study1/view1_frontal.jpg" for p in [1, 2, *range(4, 13)]}
    assert set(ids(out["train"])) | set(ids(out["valid"])) == frontal
    assert out["train"][0]["image"] == str(chexpert_root / out["train"][0]["id"])


def test_chexpert_fraction_subsamples_train_only(chexpert_root: Path) -> None:
    full = chexpert_datalist(chexpert_root)
    small = chexpert_datalist(chexpert_root, fraction=0.1)
    assert len(small["train"]) == 1  # max(1, round(0.9)) = 1
    assert set(ids(small["train"])) <= set(ids(full["train"]))
    assert (small["valid"], small["test"]) == (full["valid"], full["test"])
    assert chexpert_datalist(chexpert_root, fraction=0.1) == small


def test_chexpert_errors(chexpert_root: Path) -> None:
    with open(chexpert_root / "train.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(chexpert_row("train", 30, "Frontal", ["2.0", "0", "0", "0", "0"]))
    touch(chexpert_root / "train/patient00030/study1/view1_frontal.jpg")
    with pytest.raises(ValueError, match=r"train\.csv line 14: Atelectasis = '2\.0'"):
        chexpert_datalist(chexpert_root)


def test_chexpert_missing_test_table(chexpert_root: Path) -> None:
    (chexpert_root / "valid.csv").unlink()
    with pytest.raises(FileNotFoundError, match="valid.csv"):
        chexpert_datalist(chexpert_root)


def test_chexpert_missing_image_names_row_and_image(chexpert_root: Path) -> None:
    (chexpert_root / "train/patient00004/study1/view1_frontal.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.csv line 5 names the image .*patient00004"):
        chexpert_datalist(chexpert_root)


# ---------------------------------------------------------------------------------------------------- RSNA
RSNA_HEADER = ["patientId", "x", "y", "width", "height", "Target"]


@pytest.fixture
def rsna_root(tmp_path: Path) -> Path:
    root = tmp_path / "rsna"
    rows = [["pH", "", "", "", "", "0"], ["pA", "10", "20", "30", "40", "1"], ["pA", "100.0", "200", "5", "6", "1"],
            ["pB", "", "", "", "", "0"], ["pC", "1", "2", "3", "4", "1"]]
    rows += [[f"p{c}", "", "", "", "", "0"] for c in "DEFG"]  # 8 patients pA .. pH
    write_csv(root / "stage_2_train_labels.csv", RSNA_HEADER, rows)
    for pid in "ABCDEFGH":
        touch(root / "stage_2_train_images" / f"p{pid}.dcm")
    return root


def test_rsna_pneumonia_one_entry_per_patient_and_split(rsna_root: Path) -> None:
    out = rsna_pneumonia_datalist(rsna_root)
    check_partition(out, {f"p{c}" for c in "ABCDEFGH"})
    # 8 patients: ceil(0.3 * 8) = 3 held out -> train 5; 3 halved: test 3 - ceil(1.5) = 1, valid 2
    assert [len(out[k]) for k in ("train", "valid", "test")] == [5, 2, 1]
    entries = {e["id"]: e for part in out.values() for e in part}
    assert entries["pA"] == {"id": "pA", "image": str(rsna_root / "stage_2_train_images/pA.dcm"), "label": [1.0]}
    assert entries["pB"]["label"] == [0.0]
    assert rsna_pneumonia_datalist(rsna_root) == out  # seeded
    small = rsna_pneumonia_datalist(rsna_root, fraction=0.01)
    assert len(small["train"]) == 1 and (small["valid"], small["test"]) == (out["valid"], out["test"])


def test_rsna_segmentation_boxes_and_split(rsna_root: Path) -> None:
    out = rsna_segmentation_datalist(rsna_root)
    check_partition(out, {f"p{c}" for c in "ABCDEFGH"})
    # hold-out h = min(5337, 8 // 4) = 2 patients each for valid and test
    assert [len(out[k]) for k in ("train", "valid", "test")] == [4, 2, 2]
    entries = {e["id"]: e for part in out.values() for e in part}
    # x, y, width, height -> [x, y, x + width, y + height]; two rows of pA -> two boxes
    assert entries["pA"]["boxes"] == [[10.0, 20.0, 40.0, 60.0], [100.0, 200.0, 105.0, 206.0]]
    assert entries["pB"]["boxes"] == [] and entries["pB"]["label"] == [0.0]


@pytest.mark.parametrize("row, message", [
    (["pX", "", "", "", "", "2"], "line 11: Target '2'"),
    (["pX", "", "5", "5", "5", "1"], "line 11: Target 1 needs numeric"),
    (["pX", "1", "1", "0", "5", "1"], "line 11: bad box"),
    (["pB", "1", "1", "5", "5", "1"], "line 11: patient pB has rows with both"),
])
def test_rsna_bad_rows(rsna_root: Path, row: list[str], message: str) -> None:
    touch(rsna_root / "stage_2_train_images" / "pX.dcm")
    with open(rsna_root / "stage_2_train_labels.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(row)
    with pytest.raises(ValueError, match=message):
        rsna_pneumonia_datalist(rsna_root)


def test_rsna_missing_image(rsna_root: Path) -> None:
    (rsna_root / "stage_2_train_images" / "pC.dcm").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.csv line 6 names the image .*pC\.dcm"):
        rsna_pneumonia_datalist(rsna_root)


def test_boxes_to_mask_by_hand() -> None:
    # box [1, 0, 3, 2] = mask[0:2, 1:3]; float box [0.5, 2.6, 1.5, 4.0]: of the pixel centres only 0.5 lies in
    # [0.5, 1.5) along x (1.5 is excluded) and only 3.5 in [2.6, 4.0) along y -> pixel (3, 0)
    expected = np.array([[0, 1, 1, 0, 0],
                         [0, 1, 1, 0, 0],
                         [0, 0, 0, 0, 0],
                         [1, 0, 0, 0, 0]], dtype=np.uint8)
    mask = boxes_to_mask([[1, 0, 3, 2], [0.5, 2.6, 1.5, 4.0]], height=4, width=5)
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    # overlapping boxes give a union (still 1), parts outside the image are clipped
    assert np.array_equal(boxes_to_mask([[3, 2, 9, 9], [4, 3, 5, 4]], 4, 5)[2:, 3:], np.ones((2, 2), np.uint8))
    assert boxes_to_mask([[3, 2, 9, 9]], 4, 5).sum() == 4
    assert not boxes_to_mask([], 4, 5).any()
    with pytest.raises(ValueError, match="shape"):
        boxes_to_mask([[1, 2, 3]], 4, 5)
    with pytest.raises(ValueError, match="x1 <= x2"):
        boxes_to_mask([[3, 0, 1, 2]], 4, 5)


# -------------------------------------------------------------------------------------------------- COVIDx
@pytest.fixture
def covidx_root(tmp_path: Path) -> Path:
    root = tmp_path / "covidx"
    names = ["normal", "pneumonia", "COVID-19"]
    train = [f"P{i} img{i}.png {names[i % 3]} cohen" for i in range(9)] + ["P9 img 9.png normal sirm"]
    test = ["T0 t0.jpg COVID-19 ricord", "T1 t1.jpg normal rsna"]
    root.mkdir()
    (root / "train_COVIDx9A.txt").write_text("\n".join(train) + "\n")
    (root / "test_COVIDx9A.txt").write_text("\n".join(test) + "\n\n")
    for i in range(9):
        touch(root / "train" / f"img{i}.png")
    touch(root / "train" / "img 9.png")
    touch(root / "test" / "t0.jpg")
    touch(root / "test" / "t1.jpg")
    return root


def test_covidx_labels_and_splits(covidx_root: Path) -> None:
    out = covidx_datalist(covidx_root)
    # 10 training lines, valid_fraction 0.1 -> ceil(1.0) = 1 valid, 9 train
    assert (len(out["train"]), len(out["valid"])) == (9, 1)
    assert out["test"] == [{"id": "t0.jpg", "label": 2, "image": str(covidx_root / "test/t0.jpg")},
                           {"id": "t1.jpg", "label": 0, "image": str(covidx_root / "test/t1.jpg")}]
    labels = {e["id"]: e["label"] for e in out["train"] + out["valid"]}
    assert [labels[f"img{i}.png"] for i in range(3)] == [0, 1, 2]  # normal / pneumonia / COVID-19
    assert labels["img 9.png"] == 0  # a file name with a space
    assert len(covidx_datalist(covidx_root, valid_fraction=0.2)["valid"]) == 2  # MGCA's 20 %
    with pytest.raises(ValueError, match="valid_fraction"):
        covidx_datalist(covidx_root, valid_fraction=1.0)


def test_covidx_errors(covidx_root: Path) -> None:
    with open(covidx_root / "test_COVIDx9A.txt", "a") as handle:
        handle.write("T2 t2.jpg positive bimcv\n")
    with pytest.raises(ValueError, match=r"test_COVIDx9A\.txt line 4: unknown label 'positive'"):
        covidx_datalist(covidx_root)
    (covidx_root / "train" / "img3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"train_COVIDx9A\.txt line 4 names the image .*img3\.png"):
        covidx_datalist(covidx_root)


# ---------------------------------------------------------------------------------------------------- SIIM
def test_rle_decode_by_hand() -> None:
    # "1 2 3 1" on a 3 x 4 (H x W) image: run 1 starts at 1, covers flat 1, 2; run 2 starts at 1 + 2 + 3 = 6,
    # covers flat 6. Column-major flat index i -> (row i % 3, column i // 3): (1, 0), (2, 0), (0, 2)
    expected = np.array([[0, 0, 1, 0],
                         [1, 0, 0, 0],
                         [1, 0, 0, 0]], dtype=np.uint8)
    mask = rle_decode("1 2 3 1", height=3, width=4)
    assert mask.dtype == np.uint8 and np.array_equal(mask, expected)
    assert np.array_equal(rle_decode("0 12", 3, 4), np.ones((3, 4), np.uint8))  # whole image
    assert not rle_decode("-1", 3, 4).any() and rle_decode("-1").shape == (1024, 1024)
    with pytest.raises(ValueError, match="even number"):
        rle_decode("1 2 3", 3, 4)
    with pytest.raises(ValueError, match="past the 3 x 4"):
        rle_decode("10 3", 3, 4)  # pixels 10, 11, 12 but only 0 .. 11 exist


SIIM_IDS = [f"1.2.{i}" for i in range(10)]
SIIM_POSITIVE = {"1.2.1": ["1 2 3 1", "10 2"], "1.2.4": ["0 5"], "1.2.6": ["3 3"], "1.2.8": ["2 2"]}


@pytest.fixture
def siim_root(tmp_path: Path) -> Path:
    root = tmp_path / "siim"
    rows = [[i, " " + rle] for i in SIIM_IDS for rle in SIIM_POSITIVE.get(i, ["-1"])]
    write_csv(root / "train-rle.csv", ["ImageId", " EncodedPixels"], rows)  # the challenge's header has a space
    for n, image_id in enumerate(SIIM_IDS):
        touch(root / "dicom-images-train" / f"study{n}" / f"series{n}" / f"{image_id}.dcm")
    return root


def test_siim_rows_united_and_paths_found(siim_root: Path) -> None:
    out = siim_datalist(siim_root, balance=False, height=3, width=4)
    check_partition(out, set(SIIM_IDS))
    # 10 images: ceil(3.0) = 3 held out -> train 7; 3 halved: test 1, valid 2
    assert [len(out[k]) for k in ("train", "valid", "test")] == [7, 2, 1]
    entries = {e["id"]: e for part in out.values() for e in part}
    assert entries["1.2.1"] == {"id": "1.2.1", "label": [1.0], "rle": ["1 2 3 1", "10 2"],
                                "image": str(siim_root / "dicom-images-train/study1/series1/1.2.1.dcm")}
    assert entries["1.2.0"]["label"] == [0.0] and entries["1.2.0"]["rle"] == []


def test_siim_balance_train_only(siim_root: Path) -> None:
    plain = siim_datalist(siim_root, balance=False, height=3, width=4)
    balanced = siim_datalist(siim_root, height=3, width=4)
    assert (balanced["valid"], balanced["test"]) == (plain["valid"], plain["test"])
    positives = [e for e in plain["train"] if e["label"] == [1.0]]
    negatives = [e for e in plain["train"] if e["label"] == [0.0]]
    kept_neg = [e for e in balanced["train"] if e["label"] == [0.0]]
    assert [e for e in balanced["train"] if e["label"] == [1.0]] == positives  # every positive kept
    assert len(kept_neg) == min(len(positives), len(negatives)) and len(negatives) > len(positives)
    assert all(e in negatives for e in kept_neg)
    small = siim_datalist(siim_root, fraction=0.01, height=3, width=4)
    assert len(small["train"]) == 1 and small["train"][0] in balanced["train"]


@pytest.mark.parametrize("rle, message", [("1 2 3", "line 13: RLE '1 2 3' must be an even number"),
                                          ("20 2", "line 13: RLE is empty or runs past"),
                                          ("-1", "line 13: image 1.2.1 has both")])
def test_siim_bad_rows(siim_root: Path, rle: str, message: str) -> None:
    with open(siim_root / "train-rle.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["1.2.1", rle])
    with pytest.raises(ValueError, match=message):
        siim_datalist(siim_root, height=3, width=4)


def test_siim_missing_image(siim_root: Path) -> None:
    (siim_root / "dicom-images-train/study3/series3/1.2.3.dcm").unlink()
    with pytest.raises(FileNotFoundError, match=r"train-rle\.csv line 6 names the image 1\.2\.3"):
        siim_datalist(siim_root)


# ----------------------------------------------------------------------------------------------------- NIH
@pytest.fixture
def nih_root(tmp_path: Path) -> Path:
    root = tmp_path / "nih"
    findings = ["No Finding", "Effusion|Mass", "Hernia", "Pleural_Thickening|Atelectasis"] + ["No Finding"] * 8
    names = [f"0000{i:04d}_000.png" for i in range(12)]
    write_csv(root / "Data_Entry_2017.csv", ["Image Index", "Finding Labels", "Follow-up #", "Patient ID"],
              [[n, f, "0", str(i)] for i, (n, f) in enumerate(zip(names, findings))])
    (root / "train_val_list.txt").write_text("\n".join(names[:10]) + "\n")
    (root / "test_list.txt").write_text("\n".join(names[10:]) + "\n")
    for i, name in enumerate(names):
        touch(root / f"images_{1 + i % 2:03d}" / "images" / name)
    return root


def test_nih_labels_and_splits(nih_root: Path) -> None:
    out = nih_datalist(nih_root)
    assert ids(out["test"]) == ["00000010_000.png", "00000011_000.png"]
    assert (len(out["train"]), len(out["valid"])) == (9, 1)  # 10 % of 10 train_val images
    labels = {e["id"]: e["label"] for part in out.values() for e in part}
    assert labels["00000000_000.png"] == [0.0] * 14
    # Effusion is class 2 and Mass class 4; Hernia 13; Atelectasis 0 and Pleural_Thickening 12
    assert [i for i, v in enumerate(labels["00000001_000.png"]) if v] == [2, 4]
    assert [NIH_CLASSES[i] for i, v in enumerate(labels["00000002_000.png"]) if v] == ["Hernia"]
    assert [i for i, v in enumerate(labels["00000003_000.png"]) if v] == [0, 12]
    entry = {e["id"]: e for e in out["test"]}["00000011_000.png"]
    assert entry["image"] == str(nih_root / "images_002/images/00000011_000.png")


def test_nih_errors(nih_root: Path) -> None:
    (nih_root / "images_002/images/00000003_000.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"line 5 / .*train_val_list\.txt name the image 00000003_000"):
        nih_datalist(nih_root)
    with open(nih_root / "Data_Entry_2017.csv", "a", newline="") as handle:
        csv.writer(handle).writerow(["x.png", "Effusion|Cough", "0", "99"])
    with pytest.raises(ValueError, match=r"Data_Entry_2017\.csv line 14: unknown finding\(s\) \['Cough'\]"):
        nih_datalist(nih_root)


# ----------------------------------------------------------------------------------------- missing tables
@pytest.mark.parametrize("reader, table", [
    (chexpert_datalist, "train.csv"), (rsna_pneumonia_datalist, "stage_2_train_labels.csv"),
    (rsna_segmentation_datalist, "stage_2_train_labels.csv"), (covidx_datalist, "train_COVIDx9A.txt"),
    (siim_datalist, "train-rle.csv"), (nih_datalist, "Data_Entry_2017.csv"),
    (mimic_cxr_datalist, "mimic-cxr-2.0.0-metadata.csv"),
])
def test_missing_table_is_named(tmp_path: Path, reader, table: str) -> None:
    with pytest.raises(FileNotFoundError, match=table.replace(".", r"\.")):
        reader(tmp_path)
