"""Tests of scripts/convert_classification.py on tiny fake Matek, HyperKvasir and ISIC 2019 trees (8x8 images)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from common.data.classification_folders import classification_datalist, dataset_splits, read_labels
from conftest import REPO_ROOT, load_script


convert = load_script("convert_classification")


def write_image(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (value, 50, 200)).save(path)
    return path


def csv_lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def matek_tree(root: Path) -> Path:
    write_image(root / "BAS" / "0001-1000" / "BAS_00001.jpg")
    write_image(root / "ART" / "0001-1000" / "ART_00002.jpg")
    write_image(root / "ART" / "0001-1000" / "ART_00001.jpg")
    write_image(root / "ART" / "1001-2000" / "ART_01001.jpg")
    (root / "ART" / "0001-1000" / "Thumbs.db").write_bytes(b"x")  # not an image: ignored
    (root / "EMPTY").mkdir()  # a class folder without images: skipped with a warning
    return root


HK = "labeled-images"
HK_FILES = {  # relative path -> class (the finding folder)
    "lower-gi-tract/pathological-findings/polyps/p1.jpg": "polyps",
    "lower-gi-tract/pathological-findings/polyps/p2.jpg": "polyps",
    "lower-gi-tract/pathological-findings/polyps/p3.jpg": "polyps",
    "upper-gi-tract/anatomical-landmarks/z-line/z1.jpg": "z-line",
    "upper-gi-tract/anatomical-landmarks/z-line/z2.jpg": "z-line",
}


def hyperkvasir_tree(root: Path) -> Path:
    for rel in HK_FILES:
        write_image(root / HK / rel)
    (root / HK / "image-labels.csv").write_text("Video file,Finding\n")  # not an image: ignored
    return root


def sparsam_splits(folder: Path, train: list[tuple[str, str]], test: list[tuple[str, str]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("labeled_train.csv", train), ("test.csv", test)):
        lines = [",image,label"] + [f"{i},{image},{label}" for i, (image, label) in enumerate(rows)]
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


ISIC_HEADER = "image,MEL,NV,BCC,AK,BKL,DF,VASC,SCC,UNK"


def isic_tree(root: Path, rows: list[str]) -> Path:
    """``ISIC_2019_Training_Input/<image>.jpg`` for every row and the ground-truth CSV beside the folder."""
    for row in rows:
        write_image(root / "ISIC_2019_Training_Input" / f"{row.split(',')[0]}.jpg")
    (root / "ISIC_2019_Training_Input" / "LICENSE.txt").write_text("CC-BY-NC")
    (root / "ISIC_2019_Training_GroundTruth.csv").write_text("\n".join([ISIC_HEADER, *rows]) + "\n")
    return root / "ISIC_2019_Training_Input"


ISIC_ROWS = [
    "ISIC_0000001,0.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",  # NV
    "ISIC_0000002,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0",  # MEL
    "ISIC_0000003_downsampled,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,0.0",  # SCC
]


# ---------------------------------------------------------------------------------------------------- matek


def test_matek_copy(tmp_path):
    out = Path(convert.matek(src=str(matek_tree(tmp_path / "bm")), out=str(tmp_path / "out")))
    # classes sorted by folder name: ART -> 0, BAS -> 1; the empty folder is no class; rows sorted by id
    assert csv_lines(out / "labels.csv") == ["id,class_id,class_name", "ART_00001,0,ART", "ART_00002,0,ART",
                                             "ART_01001,0,ART", "BAS_00001,1,BAS"]
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        "ART_00001.jpg", "ART_00002.jpg", "ART_01001.jpg", "BAS_00001.jpg"]
    assert not (out / "images" / "ART_00001.jpg").is_symlink()
    assert not (out / "splits").exists()
    assert [(i.id, i.class_name) for i in read_labels(out)][-1] == ("BAS_00001", "BAS")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_matek_symlink_into_an_empty_folder(tmp_path):
    src = matek_tree(tmp_path / "bm")
    (tmp_path / "out").mkdir()
    out = Path(convert.matek(src=str(src), out=str(tmp_path / "out"), symlink=True))
    link = out / "images" / "BAS_00001.jpg"
    assert link.is_symlink() and link.resolve() == (src / "BAS" / "0001-1000" / "BAS_00001.jpg").resolve()


def test_matek_duplicate_ids(tmp_path):
    src = matek_tree(tmp_path / "bm")
    write_image(src / "BAS" / "extra" / "ART_00001.jpg")
    with pytest.raises(ValueError, match=r"two source images have the id .*'ART_00001'.*ART_00001\.jpg"):
        convert.matek(src=str(src), out=str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_matek_without_images(tmp_path):
    (tmp_path / "bm" / "ART").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no image found in the class folders of .*bm"):
        convert.matek(src=str(tmp_path / "bm"), out=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.matek(src=str(tmp_path / "nowhere"), out=str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------- atomicity


def test_refuses_a_non_empty_output_folder(tmp_path):
    out = tmp_path / "out"
    write_image(out / "keep.png")
    with pytest.raises(ValueError, match=r"output folder .*out exists and is not empty"):
        convert.matek(src=str(matek_tree(tmp_path / "bm")), out=str(out))
    assert [p.name for p in out.iterdir()] == ["keep.png"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing_place(src, dst, symlink):
        calls.append(dst)
        if len(calls) == 3:
            raise OSError("disk full")
        dst.write_bytes(src.read_bytes())

    monkeypatch.setattr(convert, "_place", failing_place)
    with pytest.raises(OSError, match="disk full"):
        convert.matek(src=str(matek_tree(tmp_path / "bm")), out=str(tmp_path / "out"))
    assert len(calls) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bm"]  # neither out nor the temporary folder


# ---------------------------------------------------------------------------------------------------- hyperkvasir


def test_hyperkvasir_with_unlabelled_images_and_sparsam_splits(tmp_path):
    src = hyperkvasir_tree(tmp_path / "hyper-kvasir")
    write_image(src / "unlabeled-images" / "images" / "n1.jpg")
    rel = lambda name: next(f"hyper_kvasir/{HK}/{r}" for r in HK_FILES if r.endswith(f"/{name}.jpg"))  # noqa: E731
    splits = sparsam_splits(tmp_path / "splits" / "endo", train=[(rel("p1"), "polyps"), (rel("p3"), "polyps"),
                                                                 (rel("z2"), "z-line")],
                            test=[(rel("p2"), "polyps"), (rel("z1"), "z-line")])
    (splits / "unlabeled_train.csv").write_text(",image\n")  # not read
    out = Path(convert.hyperkvasir(src=str(src), out=str(tmp_path / "endo"), splits=str(splits),
                                   unlabeled=str(src / "unlabeled-images" / "images")))
    # src is the folder holding labeled-images/; classes sorted: polyps -> 0, z-line -> 1
    assert csv_lines(out / "labels.csv") == ["id,class_id,class_name", "p1,0,polyps", "p2,0,polyps", "p3,0,polyps",
                                             "z1,1,z-line", "z2,1,z-line"]
    assert csv_lines(out / "splits" / "train.csv") == ["id", "p1", "p3", "z2"]
    assert csv_lines(out / "splits" / "test.csv") == ["id", "p2", "z1"]
    assert (out / "images" / "n1.jpg").is_file()
    splits_read = dataset_splits(out)
    assert [i.id for i in splits_read["test"]] == ["p2", "z1"]
    ssl = classification_datalist(out, "ssl")
    assert [(e["id"], e["label"]) for e in ssl] == [("n1", -1), ("p1", 0), ("p3", 0), ("z2", 1)]


def test_hyperkvasir_from_the_labeled_images_folder(tmp_path):
    src = hyperkvasir_tree(tmp_path / "hk") / HK
    out = Path(convert.hyperkvasir(src=str(src), out=str(tmp_path / "endo")))
    assert len(csv_lines(out / "labels.csv")) == 1 + 5
    write_image(tmp_path / "flat" / "a.jpg")  # not <region>/<category>/<finding>/*.jpg
    with pytest.raises(ValueError, match=r"no image found in .*flat; expected labeled-images/<region>/"):
        convert.hyperkvasir(src=str(tmp_path / "flat"), out=str(tmp_path / "endo2"))


@pytest.mark.parametrize(
    "train, pattern",
    [
        ([("x/labeled-images/a/b/polyps/p1.jpg", "z-line")],
         r"labeled_train\.csv line 2: image 'p1' has label 'z-line' here but class 'polyps'"),
        ([("x/p9.jpg", "polyps")], r"labeled_train\.csv line 2: image 'x/p9\.jpg' is not among the labelled"),
        ([("x/p1.jpg", "polyps"), ("y/p1.jpg", "polyps")], r"labeled_train\.csv line 3: image 'p1' is listed again"),
        ([("x/p2.jpg", "polyps")], r"1 image\(s\) are in both split files .*: p2"),
    ],
    ids=["label", "unknown", "repeated", "both"],
)
def test_bad_sparsam_splits(tmp_path, train, pattern):
    src = hyperkvasir_tree(tmp_path / "hk")
    splits = sparsam_splits(tmp_path / "splits", train=train, test=[("x/p2.jpg", "polyps")])
    with pytest.raises(ValueError, match=pattern):
        convert.hyperkvasir(src=str(src), out=str(tmp_path / "endo"), splits=str(splits))
    assert not (tmp_path / "endo").exists()


def test_sparsam_split_columns(tmp_path):
    src = hyperkvasir_tree(tmp_path / "hk")
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "test.csv").write_text("id,class\np1,polyps\n")
    with pytest.raises(ValueError, match=r"test\.csv is missing the column\(s\) \['image', 'label'\]"):
        convert.hyperkvasir(src=str(src), out=str(tmp_path / "endo"), splits=str(tmp_path / "splits"))
    (tmp_path / "splits" / "test.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"has neither labeled_train\.csv nor test\.csv"):
        convert.hyperkvasir(src=str(src), out=str(tmp_path / "endo"), splits=str(tmp_path / "splits"))


# ---------------------------------------------------------------------------------------------------- isic


def test_isic2019(tmp_path):
    src = isic_tree(tmp_path / "isic", ISIC_ROWS)
    out = Path(convert.isic2019(src=str(src), out=str(tmp_path / "out")))
    # class_id = position among the ground-truth columns without UNK: MEL 0, NV 1, ..., SCC 7
    assert csv_lines(out / "labels.csv") == ["id,class_id,class_name", "ISIC_0000001,1,NV", "ISIC_0000002,0,MEL",
                                             "ISIC_0000003_downsampled,7,SCC"]
    assert not (out / "images" / "LICENSE.jpg").exists() and len(list((out / "images").iterdir())) == 3


@pytest.mark.parametrize(
    "row, pattern",
    [
        ("ISIC_0000009,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0", r"line 5: image 'ISIC_0000009' is labelled UNK"),
        ("ISIC_0000009,1.0,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0", r"line 5: image 'ISIC_0000009' must have exactly one"),
        ("ISIC_0000009,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0", r"line 5: image 'ISIC_0000009' must have exactly one"),
        ("ISIC_0000009,0.5,0.5,0.0,0.0,0.0,0.0,0.0,0.0,0.0", r"line 5: image 'ISIC_0000009' must have exactly one"),
        ("ISIC_0000009,x,1.0,0.0,0.0,0.0,0.0,0.0,0.0,0.0", r"line 5: image 'ISIC_0000009' has a non-numeric"),
    ],
    ids=["unk", "two", "none", "soft", "text"],
)
def test_isic2019_bad_rows(tmp_path, row, pattern):
    src = isic_tree(tmp_path / "isic", [*ISIC_ROWS, row])
    with pytest.raises(ValueError, match=pattern):
        convert.isic2019(src=str(src), out=str(tmp_path / "out"))


def test_isic2019_images_and_rows_must_match(tmp_path):
    src = isic_tree(tmp_path / "isic", ISIC_ROWS)
    write_image(src / "ISIC_0000077.jpg")
    with pytest.raises(ValueError, match=r"1 image\(s\) of .* have no row in .*GroundTruth\.csv: ISIC_0000077"):
        convert.isic2019(src=str(src), out=str(tmp_path / "out"))
    (src / "ISIC_0000077.jpg").unlink()
    (src / "ISIC_0000002.jpg").unlink()
    with pytest.raises(ValueError, match=r"line 3: image 'ISIC_0000002' has no image file"):
        convert.isic2019(src=str(src), out=str(tmp_path / "out"))
    gt = tmp_path / "isic" / "ISIC_2019_Training_GroundTruth.csv"
    gt.rename(tmp_path / "gt.csv")
    with pytest.raises(FileNotFoundError, match="pass --ground_truth"):
        convert.isic2019(src=str(src), out=str(tmp_path / "out"))


def test_isic2019_with_sparsam_splits_on_the_command_line(tmp_path):
    src = isic_tree(tmp_path / "isic", ISIC_ROWS)
    (tmp_path / "isic" / "ISIC_2019_Training_GroundTruth.csv").rename(tmp_path / "gt.csv")
    splits = sparsam_splits(tmp_path / "splits", train=[("ISIC_2019_Training_Input/ISIC_0000001.jpg", "NV")],
                            test=[("ISIC_2019_Training_Input/ISIC_0000002.jpg", "MEL")])
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts" / "convert_classification.py"), "isic2019", "--src", str(src),
         "--out", str(tmp_path / "out"), "--ground_truth", str(tmp_path / "gt.csv"), "--splits", str(splits)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 labelled image(s) in 3 class(es)" in result.stderr
    out = tmp_path / "out"
    assert csv_lines(out / "splits" / "train.csv") == ["id", "ISIC_0000001"]
    assert csv_lines(out / "splits" / "test.csv") == ["id", "ISIC_0000002"]
    # the third image is in neither split file: labelled but unused by train/test
    splits_read = dataset_splits(out)
    assert [i.class_name for i in splits_read["train"]] == ["NV"]
    assert [i.class_name for i in splits_read["test"]] == ["MEL"]
