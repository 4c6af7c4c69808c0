"""Few-label evaluation and inference handlers of Sparsam, driven by real MONAI evaluators over synthetic features.

Modules: common/handlers/label_budget_report.py (LabelBudgetReport, write_budget_rows, report_budget_sweep),
common/handlers/class_probability_writer.py (ClassProbabilityWriter) and common/transforms/feature_classifier.py
(FeatureClassifierd, read_class_names). The "backbone" is ``nn.Identity`` over 4-d feature vectors: class ``c`` is
``((5 + noise) e_c, c)`` and every other coordinate is exactly 0, so the classes are separated on every coordinate
(the per-feature power transform and PCA of the protocol cannot mix them) and every classifier is perfect.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import DataLoader
from monai.engines import SupervisedEvaluator
from monai.transforms import Compose
from torch import nn

from common.handlers.class_probability_writer import ClassProbabilityWriter
from common.handlers.label_budget_report import (
    CLASSES_FILE,
    CLASSIFIER_FILE,
    LabelBudgetReport,
    report_budget_sweep,
    write_budget_rows,
)
from common.transforms.feature_classifier import FeatureClassifierd, read_class_names

CLASS_NAMES = ["alpha", "beta", "gamma"]
ROW_HEADER = ["classifier", "n_per_class", "n_train", "draw", "seed", "balanced_accuracy"]


def features(label: int, rng: np.random.Generator) -> torch.Tensor:
    """A 4-d feature vector of class ``label`` (0, 1, 2): ``(5 + N(0, 0.1^2)) e_label`` with ``label`` as 4th value."""
    vector = np.zeros(4, np.float32)
    vector[label] = 5.0 + rng.normal(0.0, 0.1)
    vector[3] = label
    return torch.from_numpy(vector)


def items(n_per_class: int, role: str, rng: np.random.Generator, start: int = 0) -> list[dict]:
    return [{"image": features(c, rng), "label": c, "role": role, "id": f"{role}{start + c * n_per_class + i:03d}"}
            for c in range(3) for i in range(n_per_class)]


def evaluator(data: list[dict], handlers: list, postprocessing=None, batch_size: int = 4) -> SupervisedEvaluator:
    return SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=DataLoader(data, batch_size=batch_size),
                               network=nn.Identity(), postprocessing=postprocessing, val_handlers=handlers)


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluation (6 train / 3 test images per class) with a hand-written baseline CSV already in place."""
    root = tmp_path_factory.mktemp("budget")
    output_dir, ckpt_dir = root / "eval", root / "models"
    output_dir.mkdir()
    # second source: balanced accuracies 0.5 and 0.7 at n=1 (mean 0.6, population std 0.1), 0.9 at n=6
    (output_dir / "budget_rows_supervised.csv").write_text(
        "classifier,n_per_class,n_train,draw,seed,balanced_accuracy\n"
        "supervised,1,3,0,0,0.5\nsupervised,1,3,1,1,0.7\nsupervised,6,18,0,0,0.9\n")
    rng = np.random.default_rng(0)
    data = items(6, "train", rng) + items(3, "test", rng)
    report = LabelBudgetReport(output_dir, ckpt_dir, CLASS_NAMES, budgets=(1, 2, 10), n_draws=2, seed=3,
                               source="ssl", title="synthetic")
    engine = evaluator(data, [report])
    engine.run()
    engine.run()  # a second run starts from empty feature lists (n_train below stays 18, not 36)
    return {"output_dir": output_dir, "ckpt_dir": ckpt_dir, "report": report, "rng": rng}


# ------------------------------------------------------------------------------------------------ evaluation


def test_rows_of_the_ssl_source(evaluated):
    rows = read_csv(evaluated["output_dir"] / "budget_rows_ssl.csv")
    assert rows[0] == ROW_HEADER
    body = rows[1:]
    # budgets (1, 2, 10) with largest class 6 -> 1, 2 and "every image" 6; 3 classifiers x 3 budgets x 2 draws = 18
    assert len(body) == 18
    assert {r[0] for r in body} == {"svm", "knn", "logreg"}
    # n_train = 3 classes x min(6, n): 3, 6, 18; draw d uses seed 3 + d
    assert {(int(r[1]), int(r[2])) for r in body} == {(1, 3), (2, 6), (6, 18)}
    assert {(int(r[3]), int(r[4])) for r in body} == {(0, 3), (1, 4)}
    # classes apart on every coordinate: every classifier is perfect at every budget
    assert all(float(r[5]) == 1.0 for r in body)
    assert not list(evaluated["output_dir"].glob(".*.tmp"))


def test_summary_merges_both_sources_and_plots(evaluated):
    output_dir = evaluated["output_dir"]
    rows = read_csv(output_dir / "budget_summary.csv")
    header, body = rows[0], [dict(zip(rows[0], r)) for r in rows[1:]]
    assert header == ["classifier", "n_per_class", "n_draws", "n_train_mean", "balanced_accuracy_mean",
                      "balanced_accuracy_std"]
    # 3 ssl classifiers x 3 budgets + supervised at n=1 and n=6 = 11 rows; ssl (file sorted first) before supervised
    assert [(r["classifier"], int(r["n_per_class"])) for r in body] == [
        *((c, n) for c in ("svm", "knn", "logreg") for n in (1, 2, 6)), ("supervised", 1), ("supervised", 6)]
    supervised = {int(r["n_per_class"]): r for r in body if r["classifier"] == "supervised"}
    # n=1: mean (0.5 + 0.7) / 2 = 0.6, std sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 2) = 0.1, 2 draws
    assert float(supervised[1]["balanced_accuracy_mean"]) == pytest.approx(0.6)
    assert float(supervised[1]["balanced_accuracy_std"]) == pytest.approx(0.1)
    assert int(supervised[1]["n_draws"]) == 2 and float(supervised[1]["n_train_mean"]) == 3.0
    assert float(supervised[6]["balanced_accuracy_mean"]) == pytest.approx(0.9)
    assert float(supervised[6]["balanced_accuracy_std"]) == 0.0
    ssl = [r for r in body if r["classifier"] != "supervised"]
    assert all(float(r["balanced_accuracy_mean"]) == 1.0 and float(r["balanced_accuracy_std"]) == 0.0 for r in ssl)
    assert len(evaluated["report"].summary) == 11
    assert (output_dir / "balanced_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_saved_classifier_reloads_and_classifies(evaluated):
    ckpt_dir = evaluated["ckpt_dir"]
    info = json.loads((ckpt_dir / CLASSES_FILE).read_text())
    # 6 train images x 3 classes = 18, feature dimension 4; the second run did not double the features
    assert info == {"classifier": "svm", "class_names": CLASS_NAMES, "n_train": 18, "feature_dim": 4}
    assert read_class_names(ckpt_dir / CLASSES_FILE) == CLASS_NAMES
    transform = FeatureClassifierd(keys="pred", classifier_path=ckpt_dir / CLASSIFIER_FILE)
    rng = np.random.default_rng(1)
    for label in range(3):
        out = transform({"pred": features(label, rng), "id": "x"})
        probs = out["pred"]
        assert probs.dtype == torch.float32 and probs.shape == (3,)
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-6)
        assert int(probs.argmax()) == label
        assert out["id"] == "x"


def test_feature_dimension_mismatch_names_the_file(evaluated):
    path = evaluated["ckpt_dir"] / CLASSIFIER_FILE
    transform = FeatureClassifierd(keys="pred", classifier_path=path)
    with pytest.raises(ValueError, match=r"classifier\.skops.*expects 4 features.*gave 5"):
        transform({"pred": torch.zeros(5)})


def test_missing_classifier_file_says_what_to_run(tmp_path):
    transform = FeatureClassifierd(keys="pred", classifier_path=tmp_path / "nothing.skops")  # read lazily
    with pytest.raises(FileNotFoundError, match=r"nothing\.skops not found: run the evaluation"):
        transform({"pred": torch.zeros(4)})


def test_read_class_names_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"classifier\.json not found: run the evaluation"):
        read_class_names(tmp_path / "classifier.json")
    (tmp_path / "empty.json").write_text(json.dumps({"class_names": []}))
    with pytest.raises(ValueError, match=r"empty\.json: 'class_names' must be a non-empty list"):
        read_class_names(tmp_path / "empty.json")


def test_missing_test_role_is_an_error(tmp_path):
    report = LabelBudgetReport(tmp_path / "eval", None, CLASS_NAMES, budgets=(1,), n_draws=1)
    engine = evaluator(items(2, "train", np.random.default_rng(0)), [report])
    with pytest.raises(ValueError, match="saw no 'test' image"):
        engine.run()
    assert not (tmp_path / "eval").exists()


def test_no_checkpoint_folder_saves_no_classifier(tmp_path):
    rng = np.random.default_rng(0)
    report = LabelBudgetReport(tmp_path / "eval", None, CLASS_NAMES, budgets=(1,), n_draws=1, classifiers=("knn",))
    evaluator(items(2, "train", rng) + items(1, "test", rng), [report]).run()
    # one classifier x budget 1 (within the largest class, 2: nothing dropped, nothing added) x 1 draw = 1 row
    assert len(read_csv(tmp_path / "eval" / "budget_rows_ssl.csv")) == 1 + 1
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "balanced_accuracy.png", "budget_rows_ssl.csv", "budget_summary.csv"]


# ------------------------------------------------------------------------------------------------ CSV helpers


def test_write_budget_rows_header_extra_keys_and_overwrite(tmp_path):
    row = {"classifier": "knn", "n_per_class": 1, "n_train": 3, "draw": 0, "seed": 0, "balanced_accuracy": 0.25,
           "ignored": "x"}
    path = write_budget_rows([row], tmp_path / "out", "baseline")
    assert path == tmp_path / "out" / "budget_rows_baseline.csv"
    assert read_csv(path) == [ROW_HEADER, ["knn", "1", "3", "0", "0", "0.25"]]
    write_budget_rows([dict(row, balanced_accuracy=0.5)], tmp_path / "out", "baseline")
    assert read_csv(path)[1][-1] == "0.5"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["budget_rows_baseline.csv"]  # no temp file


def test_report_budget_sweep_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no budget_rows_\\*.csv in .*run an evaluation first"):
        report_budget_sweep(tmp_path)
    (tmp_path / "budget_rows_a.csv").write_text(",".join(ROW_HEADER) + "\n")
    with pytest.raises(ValueError, match="the budget rows are empty"):
        report_budget_sweep(tmp_path)
    (tmp_path / "budget_rows_b.csv").write_text("classifier,n_per_class,n_train\nknn,1,3\n")
    with pytest.raises(ValueError, match=r"budget_rows_b\.csv: budget rows lack the columns \['balanced_accuracy', "
                                         r"'draw', 'seed'\]"):
        report_budget_sweep(tmp_path)


# ------------------------------------------------------------------------------------------------ probabilities


def test_probability_writer_rows_sorted_with_header(tmp_path):
    data = [{"image": torch.tensor(p), "id": i} for i, p in
            [("img2", [0.2, 0.7, 0.1]), ("img10", [0.6, 0.3, 0.1]), ("img1", [0.25, 0.25, 0.5])]]
    writer = ClassProbabilityWriter(tmp_path / "pred", CLASS_NAMES)
    evaluator(data, [writer], batch_size=2).run()
    # ids sorted as text: img1 < img10 < img2; predicted = name of the largest probability
    assert read_csv(tmp_path / "pred" / "predictions.csv") == [
        ["id", "alpha", "beta", "gamma", "predicted"],
        ["img1", "0.250000", "0.250000", "0.500000", "gamma"],
        ["img10", "0.600000", "0.300000", "0.100000", "alpha"],
        ["img2", "0.200000", "0.700000", "0.100000", "beta"],
    ]
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["predictions.csv"]  # no temp file left


def test_inference_chain_features_to_probabilities(evaluated, tmp_path):
    rng = np.random.default_rng(2)
    data = [{"image": features(c, rng), "id": f"cell{c}"} for c in (2, 0, 1)]
    post = Compose([FeatureClassifierd(keys="pred", classifier_path=evaluated["ckpt_dir"] / CLASSIFIER_FILE)])
    writer = ClassProbabilityWriter(tmp_path, CLASS_NAMES, filename="p.csv")
    evaluator(data, [writer], postprocessing=post, batch_size=2).run()
    rows = read_csv(tmp_path / "p.csv")
    assert rows[0] == ["id", *CLASS_NAMES, "predicted"]
    assert [(r[0], r[-1]) for r in rows[1:]] == [("cell0", "alpha"), ("cell1", "beta"), ("cell2", "gamma")]
    for r in rows[1:]:
        assert sum(map(float, r[1:4])) == pytest.approx(1.0, abs=3e-6)  # 3 values rounded to 1e-6


def test_probability_count_mismatch_names_the_image(tmp_path):
    data = [{"image": torch.tensor([0.5, 0.5]), "id": "two_values"}]
    writer = ClassProbabilityWriter(tmp_path, CLASS_NAMES)
    with pytest.raises(ValueError, match=r"2 probabilities for 3 classes \(two_values\)"):
        evaluator(data, [writer]).run()
    assert not list(tmp_path.iterdir())


def test_previous_csv_survives_a_failed_run(tmp_path):
    (tmp_path / "predictions.csv").write_text("old\n")
    writer = ClassProbabilityWriter(tmp_path, CLASS_NAMES)
    with pytest.raises(ValueError, match="probabilities for 3 classes"):
        evaluator([{"image": torch.ones(4), "id": "a"}], [writer]).run()
    assert (tmp_path / "predictions.csv").read_text() == "old\n"


def test_empty_run_is_an_error(tmp_path):
    engine = Engine(lambda e, batch: [])  # one iteration over a batch of no item
    ClassProbabilityWriter(tmp_path, CLASS_NAMES).attach(engine)
    with pytest.raises(ValueError, match="the inference saw no image"):
        engine.run([[]])
    assert not list(tmp_path.iterdir())
