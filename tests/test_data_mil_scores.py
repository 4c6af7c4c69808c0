"""Consumers of the MIL score export (common/data/mil_scores.py): per-bag CSVs, WSSS image selection, positive list."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from common.data.mil_scores import read_bag_score_csvs, select_wsss_images, write_positive_list


def write_bag(folder: Path, name: str, rows: list[tuple], header: tuple = ("0", "1")) -> Path:
    """A per-bag score CSV ``folder/name`` with ``header`` and ``rows``."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return folder / name


def frames(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"frame")
    return [folder / n for n in names]


def rows_of(exam_id: str, bag_label: int, scores: list[float]) -> list[dict]:
    return [{"image": f"{exam_id}/{i}.jpg", "score": s, "bag_label": bag_label, "exam_id": exam_id}
            for i, s in enumerate(scores)]


# ---------------------------------------------------------------------------------------------------- reading


def test_read_bag_score_csvs(tmp_path):
    a0, a1 = frames(tmp_path / "img", ["a0.jpg", "a1.jpg"])
    scores = tmp_path / "scores"
    write_bag(scores, "examB_gt0.csv", [("../img/a1.jpg", "0.25")])  # relative to the CSV's folder
    write_bag(scores, "examA_gt1.csv", [(str(a0), "0.9"), (str(a1), "1")])
    write_bag(scores, "examC_gt1.csv", [], header=("", "0", "1"))  # a pandas index column, no rows
    write_bag(scores, "summary.csv", [("x", "y")], header=("a", "b"))  # not a bag CSV: ignored
    assert read_bag_score_csvs(scores) == [
        {"image": str(a0), "score": 0.9, "bag_label": 1, "exam_id": "examA"},
        {"image": str(a1), "score": 1.0, "bag_label": 1, "exam_id": "examA"},
        {"image": str((scores / "../img/a1.jpg").absolute()), "score": 0.25, "bag_label": 0, "exam_id": "examB"},
    ]


@pytest.mark.parametrize(
    "case, error, pattern",
    [
        ("no_folder", FileNotFoundError, r"MIL score folder .*nowhere does not exist"),
        ("no_csv", FileNotFoundError, r"no per-bag score CSV"),
        ("bad_columns", ValueError, r"e_gt1\.csv lacks the column\(s\) \['1'\]"),
        ("missing_image", FileNotFoundError, r"e_gt1\.csv, line 3: frame .*gone\.jpg does not exist"),
        ("score_above_one", ValueError,
         r"e_gt1\.csv, line 2: score '1\.5' of frame .*f\.jpg is not a number in \[0, 1\]"),
        ("score_not_a_number", ValueError, r"e_gt1\.csv, line 2: score 'high'"),
        ("score_nan", ValueError, r"score 'nan'"),
        ("both_labels", ValueError, r"exam 'e' has two score CSVs"),
    ],
)
def test_read_errors_name_the_csv_and_the_frame(tmp_path, case, error, pattern):
    (image,) = frames(tmp_path / "img", ["f.jpg"])
    folder = tmp_path / "scores"
    folder.mkdir()
    score = {"score_above_one": "1.5", "score_not_a_number": "high", "score_nan": "nan"}.get(case, "0.5")
    if case == "bad_columns":
        write_bag(folder, "e_gt1.csv", [(str(image), "0.5")], header=("0", "score"))
    elif case == "missing_image":
        write_bag(folder, "e_gt1.csv", [(str(image), "0.5"), (str(tmp_path / "gone.jpg"), "0.5")])
    elif case != "no_csv":
        write_bag(folder, "e_gt1.csv", [(str(image), score)])
    if case == "both_labels":
        write_bag(folder, "e_gt0.csv", [(str(image), "0.5")])
    with pytest.raises(error, match=pattern):
        read_bag_score_csvs(tmp_path / "nowhere" if case == "no_folder" else folder)


# ---------------------------------------------------------------------------------------------------- selection


NEG_SCORES = [0.5, 0.4, 0.05, 0.3, 0.01, 0.6, 0.7, 0.2, 0.3, 0.35, 0.45, 0.5, 0.6, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]


def test_positive_threshold_is_inclusive():
    rows = rows_of("p", 1, [0.9, 0.8, 0.79, 0.5])
    # 0.9 >= 0.8 and 0.8 >= 0.8 are kept, 0.79 and 0.5 are not
    assert select_wsss_images(rows) == [{"image": "p/0.jpg", "label": 1}, {"image": "p/1.jpg", "label": 1}]
    assert select_wsss_images(rows, positive_threshold=0.5) == [{"image": f"p/{i}.jpg", "label": 1} for i in range(4)]


@pytest.mark.parametrize(
    "rule, expected",
    [
        ("first", [0, 1]),  # 20 // 10 = 2 rows in file order: rows 0 and 1
        ("lowest", [2, 4]),  # the two lowest scores: 0.01 (row 4) and 0.05 (row 2), listed in row order
    ],
)
def test_negative_rules_by_hand(rule, expected):
    rows = rows_of("n", 0, NEG_SCORES) + rows_of("small", 0, [0.1] * 9)  # 9 // 10 = 0 rows from the small bag
    assert select_wsss_images(rows, negative_rule=rule) == [{"image": f"n/{i}.jpg", "label": 0} for i in expected]


def test_random_negative_rule():
    rows = rows_of("n", 0, NEG_SCORES)
    pick = lambda seed: [r["image"] for r in select_wsss_images(rows, negative_rule="random", seed=seed)]  # noqa: E731
    picks = {seed: pick(seed) for seed in range(6)}
    for images in picks.values():
        assert len(images) == 2 and len(set(images)) == 2  # 20 // 10 = 2 distinct rows of the bag
        assert images == sorted(images, key=lambda s: int(re.search(r"/(\d+)\.", s)[1]))  # row order
    assert picks[3] == pick(3)  # seeded
    assert len({tuple(v) for v in picks.values()}) > 1  # 190 possible pairs: six seeds do not all agree


def test_negative_fraction_counts():
    # 29 % of 100 frames = 29 rows (0.29 * 100 is 28.999999999999996 in floating point)
    assert len(select_wsss_images(rows_of("n", 0, [0.5] * 100), negative_fraction=0.29)) == 29
    # the public-train variant, len // 100: 250 // 100 = 2
    assert len(select_wsss_images(rows_of("n", 0, [0.5] * 250), negative_fraction=0.01)) == 2


def test_selection_orders_positives_then_negatives():
    rows = rows_of("n", 0, NEG_SCORES) + rows_of("p", 1, [0.95, 0.1])
    assert [r["label"] for r in select_wsss_images(rows)] == [1, 0, 0]  # 1 positive, 20 // 10 = 2 negatives


def test_selection_errors():
    with pytest.raises(ValueError, match="negative_rule"):
        select_wsss_images([], negative_rule="highest")
    with pytest.raises(ValueError, match="positive_threshold"):
        select_wsss_images([], positive_threshold=1.5)
    with pytest.raises(ValueError, match="exam 'x' has rows with bag labels 1 and 0"):
        select_wsss_images(rows_of("x", 1, [0.9]) + rows_of("x", 0, [0.1]))


# ---------------------------------------------------------------------------------------------------- list


def test_write_positive_list_format(tmp_path):
    selected = [{"image": "/d/a.jpg", "label": 1}, {"image": "/d/n.jpg", "label": 0}, {"image": "/d/b.jpg", "label": 1}]
    path = write_positive_list(selected, tmp_path / "lists" / "positives.csv")
    # header of spec §1, then the positives only with a 5-digit running index from 0
    assert path.read_text().splitlines() == ["img_path,label_name", "/d/a.jpg,00000.png", "/d/b.jpg,00001.png"]
    with pytest.raises(ValueError, match="no positive image"):
        write_positive_list([{"image": "/d/n.jpg", "label": 0}], tmp_path / "empty.csv")


def test_export_to_list_round_trip(tmp_path):
    images = frames(tmp_path / "img", [f"{i}.jpg" for i in range(12)])
    write_bag(tmp_path / "scores", "pos_gt1.csv", [(str(images[0]), "0.85"), (str(images[1]), "0.2")])
    write_bag(tmp_path / "scores", "neg_gt0.csv", [(str(p), f"{0.9 - 0.05 * i:.2f}") for i, p in enumerate(images[2:])])
    selected = select_wsss_images(read_bag_score_csvs(tmp_path / "scores"))
    # positive: 0.85 >= 0.8 (0.2 < 0.8 is not); negative bag of 10 frames: 10 // 10 = 1 frame, the lowest score,
    # 0.9 - 0.05 * 9 = 0.45 of images[2 + 9] = images[11]
    assert selected == [{"image": str(images[0]), "label": 1}, {"image": str(images[11]), "label": 0}]
    lines = write_positive_list(selected, tmp_path / "pos.csv").read_text().splitlines()
    assert lines == ["img_path,label_name", f"{images[0]},00000.png"]


def test_positive_top_k_takes_the_best_frames_of_every_positive_bag():
    rows = rows_of("p1", 1, [0.2, 0.6, 0.4, 0.6]) + rows_of("p2", 1, [0.1]) + rows_of("n", 0, [0.9] * 10)
    picked = [r["image"] for r in select_wsss_images(rows, positive_top_k=2) if r["label"] == 1]
    # p1: scores 0.6 (row 1) and 0.6 (row 3) are the two highest (the tie kept in row order); p2 has one frame;
    # the 0.8 threshold would have kept none of them
    assert picked == [rows[1]["image"], rows[3]["image"], rows[4]["image"]]
    assert [r for r in select_wsss_images(rows) if r["label"] == 1] == []
    with pytest.raises(ValueError, match="positive_top_k"):
        select_wsss_images(rows, positive_top_k=0)
