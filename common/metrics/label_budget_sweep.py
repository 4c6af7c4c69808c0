"""Few-label evaluation of frozen features: classical classifiers fitted on n labelled images per class.

Nielsen et al., "Self-Supervision for Medical Image Classification: State-of-the-Art Performance with ~100
Labeled Training Samples per Class", Bioengineering 10(8):895, 2023 (specs/sparsam.md §6, §7, §9).

Protocol, for features ``X_train [N, D]`` / ``X_test [M, D]`` of the frozen SSL teacher:

* for each budget ``n`` (labelled images per class) and draw ``r``, the labelled subset is drawn with
  :func:`common.data.label_budget.subsample_per_class` (seed ``seed + r``; a class with fewer than ``n`` images
  contributes all of them), so ``n_train = sum_c min(n, N_c)``;
* every classifier is a ``Pipeline``: ``PowerTransformer()`` (Yeo-Johnson + standardisation) → ``PCA()`` (all
  ``min(n_train, D)`` components, no whitening; test features are projected onto the span of the centred
  training features) → classifier (:func:`build_classifier`);
* prediction ``ŷ = classes[argmax_c p(c | x)]`` (:func:`predict_argmax`); metric = balanced accuracy
  ``BA = (1/C) sum_c TP_c / (TP_c + FN_c)`` (macro-averaged recall, ``sklearn.metrics.balanced_accuracy_score``).

Rows are plain dicts ``{classifier, n_per_class, n_train, draw, seed, balanced_accuracy}`` so rows computed
elsewhere (the supervised deep-learning baseline, :func:`budget_row`) concatenate with the sweep's rows before
:func:`summarise`, :func:`write_budget_table`, :func:`format_budget_table` and :func:`plot_budget_curves`.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import skops.io as sio
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.calibration import CalibratedClassifierCV
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.model_selection import StratifiedKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import PowerTransformer
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted, validate_data

from common.data.label_budget import subsample_per_class
from common.utils.files import write_csv

__all__ = [
    "CLASSIFIERS",
    "ROW_KEYS",
    "TRUSTED_TYPES",
    "PlattSVC",
    "build_classifier",
    "predict_argmax",
    "budget_row",
    "sweep_label_budgets",
    "summarise",
    "write_budget_table",
    "format_budget_table",
    "plot_budget_curves",
    "save_classifier",
    "load_classifier",
]

logger = logging.getLogger(__name__)

CLASSIFIERS = ("svm", "knn", "logreg")
ROW_KEYS = ("classifier", "n_per_class", "n_train", "draw", "seed", "balanced_accuracy")
SUMMARY_KEYS = ("classifier", "n_per_class", "n_draws", "n_train_mean", "balanced_accuracy_mean",
                "balanced_accuracy_std")
PLATT_FOLDS = 5
KNN_NEIGHBOURS_PER_CLASS = 5

#: Every type a fitted pipeline of :func:`build_classifier` stores that skops does not trust by default; nothing
#: else is ever loaded by :func:`load_classifier`.
TRUSTED_TYPES = (
    "common.metrics.label_budget_sweep.PlattSVC",
    "sklearn.calibration._CalibratedClassifier",
    "sklearn.calibration._SigmoidCalibration",
    "sklearn.metrics._dist_metrics.EuclideanDistance64",
    "sklearn.model_selection._split.StratifiedKFold",
    "sklearn.neighbors._ball_tree.BallTree",
    "sklearn.neighbors._kd_tree.KDTree",
)


class PlattSVC(ClassifierMixin, BaseEstimator):
    """RBF-SVM with Platt-scaled probabilities, or a decision-function argmax when a class is too small.

    Settings of sparsam's ``reproducability/parameter.py`` (specs/sparsam.md §6.3):
    ``SVC(kernel="rbf", C=1, gamma="scale", class_weight="balanced", break_ties=True)``. ``SVC(probability=True)``
    is deprecated in scikit-learn 1.9; its documented replacement is used:
    ``CalibratedClassifierCV(SVC(...), method="sigmoid", ensemble=False, cv=5 folds)``, i.e. the SVC is fitted on
    all samples and one sigmoid per class, ``p_c(x) = 1 / (1 + exp(A_c f_c(x) + B_c))`` (normalised over the
    classes), is fitted on 5-fold out-of-fold decision values ``f_c``. The folds are a shuffled
    ``StratifiedKFold(5, random_state=random_state)``, as libsvm shuffles its internal Platt folds.

    When any class has fewer than 5 training samples the folds cannot be stratified (spec §6.3 note (c), e.g.
    1 image per class): then the plain SVC is fitted and ``predict_proba`` returns the **one-hot** vector of
    ``argmax_c f_c(x)`` (not a probability; ``calibrated_`` is False), so ``argmax(predict_proba)`` is the
    decision-function argmax.

    Args:
        random_state: seed of the shuffled calibration folds.
    """

    def __init__(self, random_state: int | None = None) -> None:
        self.random_state = random_state

    def _svc(self) -> SVC:
        return SVC(kernel="rbf", C=1.0, gamma="scale", class_weight="balanced", break_ties=True)

    def fit(self, x: np.ndarray, y: np.ndarray) -> PlattSVC:
        """Fit on ``x [n, d]`` and labels ``y [n]`` (at least 2 classes)."""
        x, y = validate_data(self, x, y)
        self.classes_, counts = np.unique(y, return_counts=True)
        if len(self.classes_) < 2:
            raise ValueError(f"PlattSVC needs at least 2 classes in the training labels, got {self.classes_.tolist()}")
        self.calibrated_ = bool(counts.min() >= PLATT_FOLDS)
        if self.calibrated_:
            folds = StratifiedKFold(PLATT_FOLDS, shuffle=True, random_state=self.random_state)
            self.estimator_ = CalibratedClassifierCV(self._svc(), method="sigmoid", cv=folds, ensemble=False)
        else:
            logger.info("PlattSVC: smallest class has %d < %d samples; using the decision-function argmax",
                        counts.min(), PLATT_FOLDS)
            self.estimator_ = self._svc()
        self.estimator_.fit(x, y)
        return self

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """``[m, C]`` Platt probabilities, or one-hot decision-function argmax in the fallback (see class doc)."""
        check_is_fitted(self)
        x = validate_data(self, x, reset=False)
        if self.calibrated_:
            return self.estimator_.predict_proba(x)
        scores = self.estimator_.decision_function(x)
        if scores.ndim == 1:  # binary: f(x) > 0 means classes_[1]
            winner = (scores > 0).astype(int)
        else:
            winner = scores.argmax(axis=1)
        return np.eye(len(self.classes_))[winner]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """``classes_[argmax predict_proba]``, shape ``[m]``."""
        return self.classes_[self.predict_proba(x).argmax(axis=1)]


def build_classifier(name: str, n_classes: int, n_train: int, seed: int) -> Pipeline:
    """Unfitted ``PowerTransformer() → PCA() → classifier`` pipeline (specs/sparsam.md §6.3).

    Args:
        name: ``"svm"`` (:class:`PlattSVC`), ``"knn"`` (``KNeighborsClassifier(weights="distance")`` with
            ``k = min(5 * n_classes, n_train)``, spec note (a)) or ``"logreg"``
            (``LogisticRegression(class_weight="balanced", C=2.5, max_iter=10000)``, no ``n_jobs``, note (d)).
        n_classes: number of classes ``C`` of the task (sets kNN's ``k``).
        n_train: number of labelled training samples the pipeline will be fitted on.
        seed: random state of the SVM's calibration folds.
    """
    if name not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; valid names: {', '.join(CLASSIFIERS)}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    if name == "svm":
        classifier = PlattSVC(random_state=seed)
    elif name == "knn":
        k = min(KNN_NEIGHBOURS_PER_CLASS * n_classes, n_train)
        classifier = KNeighborsClassifier(n_neighbors=k, weights="distance")
    else:
        classifier = LogisticRegression(class_weight="balanced", C=2.5, max_iter=10000)
    return Pipeline([("power", PowerTransformer()), ("pca", PCA()), ("classifier", classifier)])


def predict_argmax(pipeline: Pipeline, features: np.ndarray) -> np.ndarray:
    """``ŷ = classes_[argmax_c predict_proba(x)_c]`` for ``features [m, D]``; returns ``[m]`` labels."""
    return pipeline.classes_[np.asarray(pipeline.predict_proba(features)).argmax(axis=1)]


def budget_row(classifier: str, n_per_class: int, n_train: int, draw: int, seed: int,
               balanced_accuracy: float) -> dict:
    """One result row (the schema of :data:`ROW_KEYS`), e.g. for the supervised baseline trained elsewhere."""
    return {"classifier": str(classifier), "n_per_class": int(n_per_class), "n_train": int(n_train),
            "draw": int(draw), "seed": int(seed), "balanced_accuracy": float(balanced_accuracy)}


def _check_split(features: np.ndarray, labels: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    features, labels = np.asarray(features), np.asarray(labels)
    if features.ndim != 2:
        raise ValueError(f"{split}_features must be 2-D [N, D], got shape {features.shape}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise ValueError(f"{split}_labels has shape {labels.shape} but {split}_features has {len(features)} rows")
    return features, labels


def sweep_label_budgets(train_features: np.ndarray, train_labels: np.ndarray, test_features: np.ndarray,
                        test_labels: np.ndarray, budgets: Sequence[int], n_draws: int,
                        classifiers: Sequence[str] = CLASSIFIERS, seed: int = 0) -> list[dict]:
    """Balanced accuracy of each classifier for each label budget and draw.

    Args:
        train_features: ``[N, D]`` features of the whole labelled training split.
        train_labels: ``[N]`` class labels (any sortable type).
        test_features: ``[M, D]`` features of the fixed test split.
        test_labels: ``[M]`` labels; every test class must occur in training.
        budgets: requested labelled images per class, each >= 1 (spec: 1, 5, 10, 25, 50, 100, 250, 500, 1000).
        n_draws: number of random labelled subsets per budget; draw ``r`` uses seed ``seed + r``.
        classifiers: names accepted by :func:`build_classifier`.
        seed: seed of draw 0.

    Returns:
        ``len(classifiers) * len(budgets) * n_draws`` rows ``{classifier, n_per_class (requested),
        n_train (actual), draw, seed, balanced_accuracy}``, ordered by budget, draw, classifier.
    """
    train_features, train_labels = _check_split(train_features, train_labels, "train")
    test_features, test_labels = _check_split(test_features, test_labels, "test")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dimensions, test features "
                         f"{test_features.shape[1]}")
    bad_budgets = [b for b in budgets if int(b) != b or b < 1]
    if not budgets or bad_budgets:
        raise ValueError(f"budgets must be a non-empty list of integers >= 1, got {list(budgets)}")
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    unknown = [c for c in classifiers if c not in CLASSIFIERS]
    if not classifiers or unknown:
        raise ValueError(f"unknown classifier(s) {unknown or list(classifiers)}; valid names: {', '.join(CLASSIFIERS)}")
    train_classes = np.unique(train_labels)
    missing = np.setdiff1d(np.unique(test_labels), train_classes)
    if len(missing):
        raise ValueError(f"test labels contain class(es) {missing.tolist()} absent from the training labels")
    n_classes = len(train_classes)

    rows = []
    for budget in budgets:
        for draw in range(n_draws):
            draw_seed = seed + draw
            index = np.asarray(subsample_per_class(train_labels, int(budget), draw_seed))
            x, y = train_features[index], train_labels[index]
            for name in classifiers:
                pipeline = build_classifier(name, n_classes, len(index), draw_seed).fit(x, y)
                score = balanced_accuracy_score(test_labels, predict_argmax(pipeline, test_features))
                rows.append(budget_row(name, budget, len(index), draw, draw_seed, score))
                logger.debug("%s n=%d draw %d: balanced accuracy %.4f", name, budget, draw, score)
    return rows


def summarise(rows: Iterable[dict]) -> list[dict]:
    """Mean and population standard deviation (``ddof=0``) of balanced accuracy per (classifier, n_per_class).

    Returns rows ``{classifier, n_per_class, n_draws, n_train_mean, balanced_accuracy_mean,
    balanced_accuracy_std}``, classifiers in order of first appearance, budgets ascending.
    """
    groups: dict[str, dict[int, list[dict]]] = {}
    for i, row in enumerate(rows):
        missing = [k for k in ROW_KEYS if k not in row]
        if missing:
            raise ValueError(f"row {i} lacks key(s) {missing}; rows need {list(ROW_KEYS)}")
        groups.setdefault(str(row["classifier"]), {}).setdefault(int(row["n_per_class"]), []).append(row)
    summary = []
    for name, by_budget in groups.items():
        for budget in sorted(by_budget):
            scores = np.array([r["balanced_accuracy"] for r in by_budget[budget]], dtype=float)
            summary.append({"classifier": name, "n_per_class": budget, "n_draws": len(scores),
                            "n_train_mean": float(np.mean([r["n_train"] for r in by_budget[budget]])),
                            "balanced_accuracy_mean": float(scores.mean()),
                            "balanced_accuracy_std": float(scores.std())})
    return summary


def write_budget_table(rows: Sequence[dict], csv_path: str | Path) -> tuple[Path, Path]:
    """Write the raw rows to ``csv_path`` and :func:`summarise` to ``<stem>_summary.csv`` beside it.

    Returns ``(raw_csv, summary_csv)``; parent folders are created.
    """
    csv_path = Path(csv_path)
    summary = summarise(rows)
    summary_path = csv_path.with_name(f"{csv_path.stem}_summary.csv")
    write_csv(csv_path, ROW_KEYS, rows)
    write_csv(summary_path, SUMMARY_KEYS, summary)
    return csv_path, summary_path


def format_budget_table(summary: Sequence[dict]) -> str:
    """Plain-text table, one line per classifier, one column per budget, cells ``mean ± std`` (``-`` if absent)."""
    budgets = sorted({int(s["n_per_class"]) for s in summary})
    names = list(dict.fromkeys(s["classifier"] for s in summary))
    cells = {(s["classifier"], int(s["n_per_class"])):
             f"{s['balanced_accuracy_mean']:.3f} ± {s['balanced_accuracy_std']:.3f}" for s in summary}
    header = ["classifier \\ n/class", *map(str, budgets)]
    body = [[name, *(cells.get((name, b), "-") for b in budgets)] for name in names]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
                     for line in [header, *body])


def plot_budget_curves(summary: Sequence[dict], png_path: str | Path, title: str = "") -> Path:
    """Balanced accuracy vs labelled images per class (log x-axis), one line and ±std band per classifier."""
    if not summary:
        raise ValueError(f"nothing to plot into {png_path}: the summary is empty")
    figure = Figure(figsize=(6.0, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for name in dict.fromkeys(s["classifier"] for s in summary):
        points = sorted((s["n_per_class"], s["balanced_accuracy_mean"], s["balanced_accuracy_std"])
                        for s in summary if s["classifier"] == name)
        n, mean, std = (np.array(v, dtype=float) for v in zip(*points))
        (line,) = axes.plot(n, mean, marker="o", label=name)
        axes.fill_between(n, mean - std, mean + std, color=line.get_color(), alpha=0.2)
    axes.set_xscale("log")
    axes.set_xlabel("labelled images per class")
    axes.set_ylabel("balanced accuracy")
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    figure.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(png_path, format="png")
    return png_path


def save_classifier(pipeline: Pipeline, path: str | Path) -> Path:
    """Persist a fitted pipeline with ``skops.io.dump`` (no pickle); parent folders are created."""
    check_is_fitted(pipeline)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.dump(pipeline, path)
    return path


def load_classifier(path: str | Path) -> Pipeline:
    """Load a pipeline written by :func:`save_classifier`, trusting only :data:`TRUSTED_TYPES`.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a skops archive, or stores a type outside the allow-list (named).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier file {path} not found")
    try:
        untrusted = sio.get_untrusted_types(file=path)
    except zipfile.BadZipFile as error:
        raise ValueError(f"{path} is not a skops file: {error}") from error
    refused = sorted(set(untrusted) - set(TRUSTED_TYPES))
    if refused:
        raise ValueError(f"{path} stores type(s) outside the trusted allow-list, refusing to load: {refused}")
    return sio.load(path, trusted=list(untrusted))
