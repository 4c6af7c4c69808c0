"""Few-label evaluation of specs/sparsam.md §6 / §10 item 10: pipelines, sweep, summary, tables, figure, skops."""

import csv
import os
import pickle

import numpy as np
import pytest
import skops.io as sio
from PIL import Image
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.decomposition import PCA
from sklearn.metrics import balanced_accuracy_score, classification_report
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, PowerTransformer

import common.metrics.label_budget_sweep as sweep_module
from common.metrics.label_budget_sweep import (
    PlattSVC,
    budget_row,
    build_classifier,
    format_budget_table,
    load_classifier,
    plot_budget_curves,
    predict_argmax,
    save_classifier,
    summarise,
    sweep_label_budgets,
    write_budget_table,
)


def blobs(n_per_class, n_classes=4, dim=20, seed=0):
    """Gaussian blobs: centres ~ N(0, 3^2) per axis (pairwise distance ~ 3 sqrt(2 * 20) = 19), unit noise."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 3.0, (n_classes, dim))
    sizes = [n_per_class] * n_classes if np.isscalar(n_per_class) else list(n_per_class)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return centres[labels] + rng.normal(0.0, 1.0, (len(labels), dim)), labels


@pytest.fixture(scope="module")
def train_test():
    x, y = blobs(50, seed=0)  # 50 train + 50 test per class, same centres (same seed), split alternately
    return x[::2], y[::2], x[1::2], y[1::2]


@pytest.mark.parametrize("name", ["svm", "knn", "logreg"])
def test_pipelines_separate_blobs(train_test, name):
    x_train, y_train, x_test, y_test = train_test
    pipeline = build_classifier(name, n_classes=4, n_train=len(y_train), seed=0).fit(x_train, y_train)
    assert [type(step).__name__ for _, step in pipeline.steps[:2]] == ["PowerTransformer", "PCA"]
    assert pipeline.named_steps["power"].method == "yeo-johnson" and pipeline.named_steps["power"].standardize
    assert pipeline.named_steps["pca"].n_components_ == 20  # PCA(): all min(100, 20) components
    assert balanced_accuracy_score(y_test, predict_argmax(pipeline, x_test)) > 0.9


def test_classifier_settings_of_spec_table():
    knn = build_classifier("knn", n_classes=4, n_train=100, seed=0).named_steps["classifier"]
    assert knn.n_neighbors == 20 and knn.weights == "distance"  # 5 * 4 classes, not clamped by 100
    logreg = build_classifier("logreg", 4, 100, 0).named_steps["classifier"]
    assert (logreg.C, logreg.class_weight, logreg.max_iter, logreg.n_jobs) == (2.5, "balanced", 10000, None)
    x, y = blobs(6, n_classes=3, dim=4)
    svm = build_classifier("svm", 3, 18, seed=7).fit(x, y).named_steps["classifier"]
    assert svm.calibrated_  # 6 >= 5 per class
    calibrated = svm.estimator_
    assert (calibrated.method, calibrated.ensemble) == ("sigmoid", False)
    assert isinstance(calibrated.cv, StratifiedKFold) and calibrated.cv.n_splits == 5
    assert calibrated.cv.shuffle and calibrated.cv.random_state == 7
    svc = calibrated.estimator
    assert (svc.kernel, svc.C, svc.gamma, svc.class_weight, svc.break_ties) == ("rbf", 1.0, "scale", "balanced", True)


def test_knn_k_clamped_at_one_image_per_class():
    x, y = blobs(1)  # 4 classes x 1 image: n_train = 4
    pipeline = build_classifier("knn", n_classes=4, n_train=4, seed=0)
    assert pipeline.named_steps["classifier"].n_neighbors == 4  # min(5 * 4 = 20, 4)
    pipeline.fit(x, y)  # k = 20 > 4 samples would raise in kneighbors
    # distance weights: a training point is its own nearest neighbour at distance 0 -> it wins its vote
    np.testing.assert_array_equal(predict_argmax(pipeline, x), y)


def test_balanced_accuracy_is_macro_recall_by_hand():
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 0, 2])
    # recall_0 = 2/3, recall_1 = 1/2, recall_2 = 1/1 -> (4/6 + 3/6 + 6/6) / 3 = 13/18 = 0.7222 (accuracy 4/6)
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    assert report["macro avg"]["recall"] == pytest.approx(13 / 18)
    assert balanced_accuracy_score(y_true, y_pred) == pytest.approx(13 / 18)


def test_predict_argmax_maps_to_string_classes():
    x, y = blobs(10, n_classes=3)
    names = np.array(["BAS", "EOS", "LYT"])[y]
    pipeline = build_classifier("logreg", 3, 30, 0).fit(x, names)
    # classes_ sorted: BAS, EOS, LYT -> the argmax column index is mapped back to the name
    assert predict_argmax(pipeline, x[[0, 10, 20]]).tolist() == ["BAS", "EOS", "LYT"]


def test_svm_fallback_below_five_per_class_binary_by_hand():
    x = np.array([[0.0], [1.0], [2.0], [10.0], [11.0], [12.0]])
    svm = PlattSVC(random_state=0).fit(x, np.array([0, 0, 0, 1, 1, 1]))  # 3 < 5 per class
    assert not svm.calibrated_
    # binary decision f(x) > 0 -> class 1: 1.5 lies in class 0's cluster, 10.5 in class 1's -> one-hot rows
    np.testing.assert_array_equal(svm.predict_proba(np.array([[1.5], [10.5]])), [[1.0, 0.0], [0.0, 1.0]])
    assert svm.predict(np.array([[1.5], [10.5]])).tolist() == [0, 1]


def test_svm_fallback_is_one_hot_decision_argmax_and_threshold_at_five():
    x, y = blobs([5, 5, 4], n_classes=3, dim=6)  # smallest class 4 < 5 -> fallback
    svm = PlattSVC(random_state=0).fit(x, y)
    assert not svm.calibrated_
    proba = svm.predict_proba(x)
    assert set(np.unique(proba)) == {0.0, 1.0} and np.all(proba.sum(axis=1) == 1.0)
    np.testing.assert_array_equal(proba.argmax(axis=1), svm.estimator_.decision_function(x).argmax(axis=1))
    x5, y5 = blobs(5, n_classes=3, dim=6)  # 5 per class: Platt scaling on 5 stratified folds
    calibrated = PlattSVC(random_state=0).fit(x5, y5)
    assert calibrated.calibrated_
    p = calibrated.predict_proba(x5)
    assert np.all((p > 0) & (p < 1)) and np.allclose(p.sum(axis=1), 1.0)


def test_sweep_rows_counts_seeds_and_reproducible(monkeypatch):
    x, y = blobs([3, 6, 10], n_classes=3, dim=8, seed=1)
    x_test, y_test = blobs(5, n_classes=3, dim=8, seed=1)  # same centres (same seed)
    calls = []
    real = sweep_module.subsample_per_class

    def recording(labels, n_per_class, seed):
        calls.append((n_per_class, seed))
        return real(labels, n_per_class, seed)

    monkeypatch.setattr(sweep_module, "subsample_per_class", recording)
    rows = sweep_label_budgets(x, y, x_test, y_test, budgets=[1, 5], n_draws=2,
                               classifiers=["svm", "knn", "logreg"], seed=7)
    assert len(rows) == 12  # 3 classifiers x 2 budgets x 2 draws
    assert calls == [(1, 7), (1, 8), (5, 7), (5, 8)]  # draw seed = 7 + draw index
    assert all(set(r) == {"classifier", "n_per_class", "n_train", "draw", "seed", "balanced_accuracy"} for r in rows)
    # n_train = sum_c min(n, N_c): n=1 -> 1 + 1 + 1 = 3; n=5 -> min(5, 3) + 5 + 5 = 13
    assert {r["n_per_class"]: r["n_train"] for r in rows} == {1: 3, 5: 13}
    assert [(r["draw"], r["seed"]) for r in rows[:6]] == [(0, 7)] * 3 + [(1, 8)] * 3
    assert all(0.0 <= r["balanced_accuracy"] <= 1.0 for r in rows)
    again = sweep_label_budgets(x, y, x_test, y_test, budgets=[1, 5], n_draws=2,
                                classifiers=["svm", "knn", "logreg"], seed=7)
    assert again == rows


def hand_rows():
    return [budget_row("svm", 1, 4, 0, 0, 0.5), budget_row("svm", 1, 4, 1, 1, 0.7),
            budget_row("knn", 5, 20, 0, 0, 0.8), budget_row("knn", 5, 18, 1, 1, 0.9),
            budget_row("svm", 5, 20, 0, 0, 0.9), budget_row("svm", 5, 20, 1, 1, 0.9)]


def test_summarise_mean_std_by_hand_with_supervised_rows():
    supervised = [{"classifier": "supervised", "n_per_class": 1, "n_train": 4, "draw": 0, "seed": 0,
                   "balanced_accuracy": 0.3}]  # computed elsewhere, plain dict, concatenated
    summary = summarise(hand_rows() + supervised)
    assert [(s["classifier"], s["n_per_class"]) for s in summary] == [("svm", 1), ("svm", 5), ("knn", 5),
                                                                       ("supervised", 1)]
    svm1, svm5, knn5, sup = summary
    # svm n=1: mean (0.5 + 0.7) / 2 = 0.6; std sqrt(((-0.1)^2 + 0.1^2) / 2) = 0.1
    assert svm1["balanced_accuracy_mean"] == pytest.approx(0.6) and svm1["balanced_accuracy_std"] == pytest.approx(0.1)
    # knn n=5: mean 0.85, std sqrt((0.05^2 + 0.05^2) / 2) = 0.05; n_train (20 + 18) / 2 = 19
    assert knn5["balanced_accuracy_mean"] == pytest.approx(0.85)
    assert knn5["balanced_accuracy_std"] == pytest.approx(0.05)
    assert knn5["n_train_mean"] == 19.0 and knn5["n_draws"] == 2
    assert svm5["balanced_accuracy_std"] == pytest.approx(0.0) and sup["n_draws"] == 1
    with pytest.raises(ValueError, match="row 0 lacks key"):
        summarise([{"classifier": "svm"}])


def test_format_budget_table():
    text = format_budget_table(summarise(hand_rows()))
    lines = text.splitlines()
    assert len(lines) == 3 and lines[0].split()[-2:] == ["1", "5"]  # header + svm + knn
    assert lines[1].startswith("svm") and "0.600 ± 0.100" in lines[1] and "0.900 ± 0.000" in lines[1]
    assert lines[2].startswith("knn") and "0.850 ± 0.050" in lines[2] and " - " in lines[2]  # knn has no n=1


def test_csv_and_png_written(tmp_path):
    rows = hand_rows()
    raw, summary_csv = write_budget_table(rows, tmp_path / "out" / "budgets.csv")
    assert summary_csv == tmp_path / "out" / "budgets_summary.csv"
    with open(raw, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 6 and read[1]["balanced_accuracy"] == "0.7" and read[3]["n_train"] == "18"
    with open(summary_csv, newline="") as f:
        read = list(csv.DictReader(f))
    assert [(r["classifier"], r["n_per_class"]) for r in read] == [("svm", "1"), ("svm", "5"), ("knn", "5")]
    assert float(read[0]["balanced_accuracy_mean"]) == pytest.approx(0.6)
    png = plot_budget_curves(summarise(rows), tmp_path / "curves.png", title="synthetic")
    assert os.path.getsize(png) > 5000
    with Image.open(png) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape[0] >= 300 and pixels.shape[1] >= 400 and pixels.std() > 10  # 6x4 in at 120 dpi, not blank


@pytest.mark.parametrize("name, n_per_class, dim", [("svm", 25, 20), ("svm", 1, 20), ("knn", 1, 20),
                                                    ("knn", 25, 8), ("logreg", 25, 20)])
def test_skops_round_trip_predicts_identically(tmp_path, name, n_per_class, dim):
    x, y = blobs(50, dim=dim)
    x_train, y_train, x_test = x[::2], y[::2], x[1::2]
    keep = np.concatenate([np.flatnonzero(y_train == c)[:n_per_class] for c in range(4)])
    pipeline = build_classifier(name, 4, len(keep), seed=3).fit(x_train[keep], y_train[keep])
    if (name, dim) == ("knn", 8):  # 8 dims <= 15 and k = 20 < 100 / 2: scikit-learn's "auto" builds a KD-tree
        assert pipeline.named_steps["classifier"]._fit_method == "kd_tree"
    loaded = load_classifier(save_classifier(pipeline, tmp_path / f"{name}.skops"))
    assert isinstance(loaded, Pipeline)
    np.testing.assert_array_equal(predict_argmax(loaded, x_test), predict_argmax(pipeline, x_test))
    np.testing.assert_array_equal(loaded.predict_proba(x_test), pipeline.predict_proba(x_test))


class PickleOnly(BaseEstimator, TransformerMixin):
    """A type outside the allow-list (skops can only store it as a generic object)."""

    def fit(self, x, y=None):
        return self

    def transform(self, x):
        return x


def test_load_refuses_types_outside_allow_list(tmp_path):
    x, y = blobs(5, n_classes=2, dim=3)
    evil = Pipeline([("power", PowerTransformer()), ("trojan", PickleOnly()), ("pca", PCA())]).fit(x, y)
    path = tmp_path / "evil.skops"
    sio.dump(evil, path)
    with pytest.raises(ValueError, match=r"evil\.skops.*PickleOnly"):
        load_classifier(path)
    calls_os = Pipeline([("f", FunctionTransformer(os.system))])
    sio.dump(calls_os, tmp_path / "os.skops")
    with pytest.raises(ValueError, match=r"os\.skops.*system"):
        load_classifier(tmp_path / "os.skops")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"a": 1}, f)
    with pytest.raises(ValueError, match=r"plain\.pkl is not a skops file"):
        load_classifier(tmp_path / "plain.pkl")
    with pytest.raises(FileNotFoundError, match="missing.skops"):
        load_classifier(tmp_path / "missing.skops")


def test_bad_input_raises_clear_errors():
    x, y = blobs(5, n_classes=2, dim=3)
    with pytest.raises(ValueError, match="train_labels has shape"):
        sweep_label_budgets(x, y[:-1], x, y, [1], 1)
    with pytest.raises(ValueError, match="test_labels has shape"):
        sweep_label_budgets(x, y, x, y[:3], [1], 1)
    with pytest.raises(ValueError, match=r"budgets .* >= 1"):
        sweep_label_budgets(x, y, x, y, [5, 0], 1)
    with pytest.raises(ValueError, match="unknown classifier.*'rf'.*svm, knn, logreg"):
        sweep_label_budgets(x, y, x, y, [1], 1, classifiers=["svm", "rf"])
    with pytest.raises(ValueError, match="unknown classifier 'rf'; valid names: svm, knn, logreg"):
        build_classifier("rf", 2, 10, 0)
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] absent from the training labels"):
        sweep_label_budgets(x, y, x[:2], np.array([0, 7]), [1], 1)
    with pytest.raises(ValueError, match="n_draws"):
        sweep_label_budgets(x, y, x, y, [1], 0)
