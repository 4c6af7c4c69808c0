"""Tests of the classification folder reader (common/data/classification_folders.py) and of the per-class label
budgets (common/data/label_budget.py), on tiny folders made in tmp_path and on the real WBC set."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.data.classification_folders import (
    ClassifiedImage,
    check_images,
    class_index,
    class_names,
    classification_datalist,
    dataset_splits,
    filter_min_class_size,
    list_images,
    read_labels,
    read_split_ids,
    split_train_test,
    unlabeled_images,
)
from common.data.label_budget import DEFAULT_BUDGETS, budgets_for, subsample_per_class
from conftest import require_data

# ---------------------------------------------------------------------------------------------------- helpers


def write_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (8, 8)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, {"RGB": (200, 80, 70), "RGBA": (1, 2, 3, 4)}.get(mode, 128)).save(path)
    return path


def make_dataset(root: Path, rows: list[tuple[str, int, str]], unlabelled: tuple[str, ...] = (),
                 header: str = "id,class_id,class_name") -> Path:
    """``images/<id>.png`` (8x8 RGB) for every row and unlabelled id, and ``labels.csv`` with ``rows``."""
    for image_id, _, _ in rows:
        write_image(root / "images" / f"{image_id}.png")
    for image_id in unlabelled:
        write_image(root / "images" / f"{image_id}.png")
    lines = [header] + [f"{i},{c},{n}" for i, c, n in rows]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


def write_split(root: Path, name: str, ids: list[str]) -> None:
    (root / "splits").mkdir(exist_ok=True)
    (root / "splits" / name).write_text("id\n" + "".join(f"{i}\n" for i in ids))


def item(image_id: str, class_id: int, name: str | None = None) -> ClassifiedImage:
    return ClassifiedImage(image_id, f"/x/{image_id}.png", class_id, name or f"c{class_id}")


# six images: class 2 'b' x3, class 10 'a' x2, class 7 'c' x1
ROWS = [("003", 2, "b"), ("001", 10, "a"), ("002", 2, "b"), ("010", 7, "c"), ("004", 2, "b"), ("005", 10, "a")]


# ---------------------------------------------------------------------------------------------------- reading


def test_read_labels_keeps_ids_as_text_and_sorts(tmp_path):
    root = make_dataset(tmp_path, ROWS, unlabelled=("u1", "u0"))
    items = read_labels(root)
    assert [i.id for i in items] == ["001", "002", "003", "004", "005", "010"]  # zero-padded, sorted
    assert items[0] == ClassifiedImage("001", str(root / "images" / "001.png"), 10, "a")
    # class index = rank of the integer class_id: 2 -> 0, 7 -> 1, 10 -> 2 (numeric, not text order "10" < "2")
    assert class_index(items) == {2: 0, 7: 1, 10: 2}
    assert class_names(items) == ["b", "c", "a"]
    assert list(unlabeled_images(root)) == ["u0", "u1"]


def test_extra_columns_spaces_and_other_extensions(tmp_path):
    write_image(tmp_path / "images" / "a.JPG")
    write_image(tmp_path / "images" / "b.tif")
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "labels.csv").write_text("class_name, id ,class_id,source\nx , a,1,foo\ny,b, 2 ,bar\n")
    items = read_labels(tmp_path)
    assert [(i.id, i.class_id, i.class_name) for i in items] == [("a", 1, "x"), ("b", 2, "y")]
    assert list(list_images(tmp_path)) == ["a", "b"]


@pytest.mark.parametrize(
    "setup, error, pattern",
    [
        (lambda r: None, FileNotFoundError, "does not exist"),
        (lambda r: (r / "x").mkdir(parents=True), FileNotFoundError, r"no images/ folder"),
        (lambda r: write_image(r / "images" / "a.png"), FileNotFoundError, r"no labels\.csv"),
        (lambda r: ((r / "images").mkdir(parents=True), (r / "labels.csv").write_text("id,class_id,class_name\n")),
         ValueError, r"holds no image.*empty"),
        (lambda r: (write_image(r / "images" / "a.png"), (r / "labels.csv").write_text("id,class_id,class_name\n")),
         ValueError, r"labels\.csv has a header but no row"),
        (lambda r: (write_image(r / "images" / "a.png"), (r / "labels.csv").write_text("id,label\na,1\n")),
         ValueError, r"missing the column\(s\) \['class_id', 'class_name'\]"),
    ],
    ids=["no-folder", "no-images", "no-labels", "no-image-files", "no-rows", "columns"],
)
def test_missing_parts(tmp_path, setup, error, pattern):
    root = tmp_path / "ds"
    setup(root)
    with pytest.raises(error, match=pattern):
        read_labels(root)


@pytest.mark.parametrize(
    "rows, pattern",
    [
        ([("a", 1, "x"), ("b", 1, "y")], r"line 3: class_id 1 is named 'y', but 'x' on line 2"),
        ([("a", 1, "x"), ("b", 2, "x")], r"line 3: class_name 'x' has class_id 2, but 1 on line 2"),
        ([("a", 1, "x"), ("a", 1, "x")], r"line 3: id 'a' is listed again \(first on line 2\)"),
        ([("a", "one", "x")], r"line 2: class_id 'one' of id 'a' is not an integer"),
        ([("a", 1, "")], r"line 2: empty class_name"),
    ],
    ids=["two-names", "two-ids", "duplicate-id", "non-integer", "empty-name"],
)
def test_bad_rows(tmp_path, rows, pattern):
    root = make_dataset(tmp_path, rows)
    with pytest.raises(ValueError, match=pattern) as err:
        read_labels(root)
    assert str(root / "labels.csv") in str(err.value)


def test_label_row_without_image(tmp_path):
    root = make_dataset(tmp_path, [("001", 1, "x"), ("002", 1, "x")])
    (root / "images" / "002.png").unlink()
    with pytest.raises(ValueError, match=r"1 id\(s\) of .*labels\.csv have no image .*'002' \(line 3\)"):
        read_labels(root)


def test_two_files_with_one_id(tmp_path):
    root = make_dataset(tmp_path, [("a", 1, "x")])
    write_image(root / "images" / "a.jpg")
    with pytest.raises(ValueError, match=r"share the id 'a': a\.jpg and a\.png"):
        read_labels(root)


# ---------------------------------------------------------------------------------------------------- images


def test_check_images_modes_and_corrupt_files(tmp_path):
    paths = [write_image(tmp_path / f"{i}.png") for i in range(3)]
    assert check_images(paths) == {"RGB": 3}
    grey = write_image(tmp_path / "grey.png", mode="L")
    write_image(tmp_path / "palette.png", mode="P")  # palette colours load as RGB: not odd
    assert check_images([*paths, tmp_path / "palette.png"]) == {"RGB": 3, "P": 1}
    with pytest.raises(ValueError, match=r"mixed channel counts: .*grey\.png has PIL mode 'L' \(1 channel\(s\)\) "
                                         r"but most images are 'RGB' \(3 channel\(s\)\)"):
        check_images([paths[0], grey, *paths[1:]])
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"these are not image bytes")
    with pytest.raises(ValueError, match=r"junk\.png is corrupt or not an image"):
        check_images([*paths, junk])
    big = write_image(tmp_path / "big.png", size=(64, 64))
    cut = tmp_path / "cut.png"
    cut.write_bytes(big.read_bytes()[:-40])
    check_images([cut], decode=False)  # the header is intact
    with pytest.raises(ValueError, match=r"cut\.png is corrupt"):
        check_images([cut])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        check_images([tmp_path / "gone.png"])
    with pytest.raises(ValueError, match="no image"):
        check_images([])


def test_datalist_checks_images(tmp_path):
    root = make_dataset(tmp_path, [("a", 1, "x"), ("b", 1, "x"), ("c", 2, "y"), ("d", 2, "y"), ("e", 2, "y")])
    write_split(root, "train.csv", ["a", "c"])
    write_split(root, "test.csv", ["b", "d", "e"])
    write_image(root / "images" / "b.png", mode="L")
    assert len(classification_datalist(root, "train")) == 2  # the grey image is not in train
    with pytest.raises(ValueError, match=r"b\.png has PIL mode 'L' .* most images are 'RGB'"):
        classification_datalist(root, "test")
    assert len(classification_datalist(root, "test", check=False)) == 3


# ---------------------------------------------------------------------------------------------------- splits


def test_split_train_test_sizes_by_hand():
    items = [item(f"a{i}", 1) for i in range(10)] + [item(f"b{i}", 2) for i in range(3)]
    items += [item("c0", 3), item("c1", 3)]
    train, test = split_train_test(items, test_fraction=0.3, seed=0)
    # per class n_test = floor(n*0.3 + 0.5) clipped to [1, n-1]: 10 -> floor(3.5) = 3 ; 3 -> floor(1.4) = 1 ;
    # 2 -> floor(1.1) = 1
    assert Counter(i.class_id for i in test) == {1: 3, 2: 1, 3: 1}
    assert Counter(i.class_id for i in train) == {1: 7, 2: 2, 3: 1}
    assert {i.id for i in train}.isdisjoint({i.id for i in test}) and len(train) + len(test) == 15
    assert [i.id for i in train] == sorted(i.id for i in train)
    # reproducible; another seed moves at least one image of class 1 (C(10,3) = 120 possible test sets)
    assert split_train_test(items, 0.3, seed=0) == (train, test)
    assert any(split_train_test(items, 0.3, seed=s)[1] != test for s in range(1, 4))
    # a tiny fraction still puts one image of each class in test: floor(10*0.01+0.5) = 0 -> raised to 1
    assert Counter(i.class_id for i in split_train_test(items, 0.01, seed=0)[1]) == {1: 1, 2: 1, 3: 1}


def test_split_train_test_needs_two_images_per_class(caplog):
    items = [item("a0", 1, "big"), item("a1", 1, "big"), item("a2", 1, "big"), item("z", 5, "basophil")]
    with pytest.raises(ValueError, match=r"'basophil' \(class_id 5, image 'z'\).*min_class_size=2"):
        split_train_test(items, 0.3, 0)
    with caplog.at_level(logging.INFO, logger="common.data.classification_folders"):
        train, test = split_train_test(items, 0.3, 0, min_class_size=2)
    assert "drops 1 class(es): 'basophil' (class_id 5): 1" in caplog.text
    assert len(train) == 2 and len(test) == 1  # 3 images: floor(0.9+0.5) = 1 test
    with pytest.raises(ValueError, match="test_fraction"):
        split_train_test(items, 1.0, 0)
    with pytest.raises(ValueError, match="empty"):
        split_train_test([], 0.3, 0)


def test_filter_min_class_size():
    items = [item("a", 1), item("b", 1), item("c", 1), item("d", 2), item("e", 2), item("f", 3)]
    assert [i.id for i in filter_min_class_size(items, 2)] == ["a", "b", "c", "d", "e"]  # class 3 has 1 image
    assert [i.id for i in filter_min_class_size(items, 3)] == ["a", "b", "c"]
    with pytest.raises(ValueError, match=r"leaves no class; class sizes: 'c1' \(class_id 1\): 3"):
        filter_min_class_size(items, 4)
    with pytest.raises(ValueError, match="min_class_size must be an integer >= 1"):
        filter_min_class_size(items, 0)


def test_split_files(tmp_path):
    rows = [("a", 1, "x"), ("b", 1, "x"), ("c", 1, "x"), ("d", 2, "y"), ("e", 2, "y")]
    root = make_dataset(tmp_path, rows, unlabelled=("u",))
    write_split(root, "train.csv", ["a", "b", "d"])
    write_split(root, "test.csv", ["e", "c"])
    splits = dataset_splits(root)
    assert [i.id for i in splits["train"]] == ["a", "b", "d"] and [i.id for i in splits["test"]] == ["c", "e"]
    (root / "splits" / "train.csv").unlink()  # train = the labelled images not in test
    assert [i.id for i in dataset_splits(root)["train"]] == ["a", "b", "d"]
    # min_class_size counts the training images (class 2 has 1 there) and filters test to the same classes
    write_split(root, "train.csv", ["a", "b", "d"])
    splits = dataset_splits(root, min_class_size=2)
    assert [i.id for i in splits["train"]] == ["a", "b"] and [i.id for i in splits["test"]] == ["c"]


@pytest.mark.parametrize(
    "train, test, pattern",
    [
        (["a", "zz"], None, r"train\.csv names the id 'zz', which has no image in images/"),
        (["a", "u"], None, r"train\.csv names the id 'u', which has no row in labels\.csv"),
        (["a"], ["a", "b"], r"1 id\(s\) are in both .*train\.csv and .*test\.csv: a"),
        (["a", "b", "a"], None, r"train\.csv line 4: id 'a' is listed again"),
    ],
    ids=["unknown", "unlabelled", "both", "repeated"],
)
def test_bad_split_files(tmp_path, train, test, pattern):
    root = make_dataset(tmp_path, [("a", 1, "x"), ("b", 1, "x"), ("c", 1, "x")], unlabelled=("u",))
    write_split(root, "train.csv", train)
    if test is not None:
        write_split(root, "test.csv", test)
    with pytest.raises(ValueError, match=pattern):
        dataset_splits(root)


def test_split_file_without_id_column(tmp_path):
    (tmp_path / "train.csv").write_text("image,label\na.png,x\n")
    with pytest.raises(ValueError, match=r"train\.csv is missing the column\(s\) \['id'\]"):
        read_split_ids(tmp_path / "train.csv")


# ---------------------------------------------------------------------------------------------------- datalists


def test_roles_and_ssl_images(tmp_path):
    rows = [("a", 3, "x"), ("b", 3, "x"), ("c", 3, "x"), ("d", 9, "y"), ("e", 9, "y")]
    root = make_dataset(tmp_path, rows, unlabelled=("u1", "u2"))
    write_split(root, "train.csv", ["a", "b", "d"])
    write_split(root, "test.csv", ["c", "e"])
    train = classification_datalist(root, "train")
    assert train == [
        {"image": str(root / "images" / "a.png"), "label": 0, "id": "a"},  # class_id 3 -> index 0, 9 -> 1
        {"image": str(root / "images" / "b.png"), "label": 0, "id": "b"},
        {"image": str(root / "images" / "d.png"), "label": 1, "id": "d"},
    ]
    assert [(e["id"], e["label"]) for e in classification_datalist(root, "test")] == [("c", 0), ("e", 1)]
    ssl = classification_datalist(root, "ssl")  # labelled train + unlabelled, never test
    assert [(e["id"], e["label"]) for e in ssl] == [("a", 0), ("b", 0), ("d", 1), ("u1", -1), ("u2", -1)]
    buggy = classification_datalist(root, "ssl", duplicate_labeled_bug=True)  # reference code: train twice
    assert [e["id"] for e in buggy] == ["a", "b", "d", "a", "b", "d"]
    with pytest.raises(ValueError, match=r"role must be one of \('ssl', 'train', 'test'\), got 'val'"):
        classification_datalist(root, "val")


def test_duplicate_bug_needs_unlabelled_images(tmp_path):
    # the reference code reads the labelled csv twice only when an unlabelled csv exists
    root = make_dataset(tmp_path, [("a", 1, "x"), ("b", 1, "x"), ("c", 2, "y"), ("d", 2, "y")])
    plain = classification_datalist(root, "ssl", test_fraction=0.5)
    assert classification_datalist(root, "ssl", test_fraction=0.5, duplicate_labeled_bug=True) == plain
    assert len(plain) == 2  # 2 classes x 2 images, floor(2*0.5+0.5) = 1 test each -> 2 train


# ---------------------------------------------------------------------------------------------------- budgets


def test_subsample_per_class_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2])
    # numpy default_rng(0).permutation(6) = [3, 2, 5, 4, 0, 1]; walk with n = 2:
    # 3 (class 1, 1st) take, 2 (class 0, 1st) take, 5 (class 2, 1st) take, 4 (class 1, 2nd) take,
    # 0 (class 0, 2nd) take, 1 (class 0, would be 3rd) skip -> sorted [0, 2, 3, 4, 5]
    assert np.random.default_rng(0).permutation(6).tolist() == [3, 2, 5, 4, 0, 1]
    assert subsample_per_class(labels, 2, seed=0).tolist() == [0, 2, 3, 4, 5]
    # n = 1: 3 (class 1), 2 (class 0), 5 (class 2) -> [2, 3, 5]
    assert subsample_per_class(labels, 1, seed=0).tolist() == [2, 3, 5]
    # a budget above every class size takes everything
    assert subsample_per_class(labels, 1000, seed=0).tolist() == [0, 1, 2, 3, 4, 5]
    assert subsample_per_class(["b", "a", "b"], 1, seed=0).dtype == np.int64


def test_subsample_per_class_counts_and_seeds():
    labels = np.repeat([0, 1, 2], [50, 7, 1])
    picked = subsample_per_class(labels, 10, seed=3)
    assert Counter(labels[picked].tolist()) == {0: 10, 1: 7, 2: 1}  # min(50,10), min(7,10), min(1,10)
    assert len(set(picked.tolist())) == 18
    assert np.array_equal(subsample_per_class(labels, 10, seed=3), picked)
    assert not np.array_equal(subsample_per_class(labels, 10, seed=4), picked)


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_subsample_bad_budget(n):
    with pytest.raises(ValueError, match="n_per_class must be an integer >= 1"):
        subsample_per_class([0, 1], n, seed=0)


def test_subsample_bad_labels():
    with pytest.raises(ValueError, match="empty"):
        subsample_per_class([], 1, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        subsample_per_class(np.zeros((2, 2)), 1, seed=0)


def test_budgets_for():
    assert DEFAULT_BUDGETS == (1, 5, 10, 25, 50, 100, 250, 500, 1000)
    # largest class 176: keep 1..100, replace 250/500/1000 by 176 once
    assert budgets_for(np.repeat([1, 2], [176, 53])) == [1, 5, 10, 25, 50, 100, 176]
    assert budgets_for(np.repeat([1, 2], [100, 3])) == [1, 5, 10, 25, 50, 100]  # 100 is already a budget
    assert budgets_for(np.repeat([1, 2], [1200, 3])) == list(DEFAULT_BUDGETS)
    assert budgets_for([0, 0, 1], budgets=(5, 1)) == [1, 2]
    with pytest.raises(ValueError, match="each budget must be an integer >= 1, got 0"):
        budgets_for([0, 1], budgets=(0, 5))
    with pytest.raises(ValueError, match="budgets is empty"):
        budgets_for([0, 1], budgets=())


# ---------------------------------------------------------------------------------------------------- real data

WBC_COUNTS = {"neutrophil": 176, "lymphocyte": 53, "monocyte": 48, "eosinophil": 22, "basophil": 1}


@pytest.mark.realdata
def test_real_wbc_folder():
    root = require_data("wbc")
    items = read_labels(root)
    assert len(items) == 300 and items[0].id == "001"
    assert Counter(i.class_name for i in items) == WBC_COUNTS
    assert class_names(items) == ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]  # ids 1..5
    assert unlabeled_images(root) == {}
    assert check_images(i.path for i in items) == {"RGB": 300}
    with pytest.raises(ValueError, match=r"'basophil' \(class_id 5, image '\d+'\).*min_class_size=2"):
        classification_datalist(root, "train", check=False)
    train = classification_datalist(root, "train", min_class_size=2, check=False)
    test = classification_datalist(root, "test", min_class_size=2, check=False)
    # test = floor(n*0.3+0.5): 176 -> 53, 53 -> 16, 48 -> 14, 22 -> 7 (= 90); train = 299 - 90 = 209
    assert Counter(e["label"] for e in test) == {0: 53, 1: 16, 2: 14, 3: 7}
    assert len(train) == 209 and not {e["id"] for e in train} & {e["id"] for e in test}
    assert classification_datalist(root, "ssl", min_class_size=2, check=False) == train  # no unlabelled images
    labels = np.array([i.class_id for i in items])
    assert budgets_for(labels) == [1, 5, 10, 25, 50, 100, 176]
    picked = subsample_per_class(labels, 25, seed=0)
    assert Counter(labels[picked].tolist()) == {1: 25, 2: 25, 3: 25, 4: 22, 5: 1}
