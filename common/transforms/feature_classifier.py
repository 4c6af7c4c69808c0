"""Class probabilities from a feature vector with a saved scikit-learn pipeline (Sparsam inference, §6.1, §6.3).

The backbone gives one feature vector per image; the classifier fitted by the evaluation
(:class:`common.handlers.label_budget_report.LabelBudgetReport`: PowerTransformer → PCA → SVM / kNN / logistic
regression) turns it into class probabilities ``p ∈ [0, 1]^C`` (``Σ_c p_c = 1``). The pipeline is read with
``skops`` (no pickle; only the types the evaluation writes are trusted).
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from common.metrics.label_budget_sweep import load_classifier

__all__ = ["FeatureClassifierd", "read_class_names"]


def read_class_names(classes_file: str | os.PathLike) -> list[str]:
    """Class names, in the order of the probability columns, from the ``classifier.json`` the evaluation writes."""
    path = Path(classes_file)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the evaluation (configs/evaluate.json) first; it fits "
                                "the classifier on the labelled images and writes this file")
    names = json.loads(path.read_text()).get("class_names")
    if not isinstance(names, list) or not names:
        raise ValueError(f"{path}: 'class_names' must be a non-empty list")
    return [str(n) for n in names]


class FeatureClassifierd(MapTransform):
    """Replace the feature vector ``d[key]`` (``[D]``) by class probabilities (``[C]``, float32 ``MetaTensor``, the
    type MONAI Label's classification writer reads).

    Args:
        keys: keys of the feature vectors.
        classifier_path: the ``classifier.skops`` file; read on first use.
        allow_missing_keys: as in MONAI.
    """

    def __init__(self, keys: KeysCollection, classifier_path: str | os.PathLike,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.classifier_path = Path(classifier_path)
        self._pipeline: Any = None

    @property
    def pipeline(self) -> Any:
        if self._pipeline is None:
            if not self.classifier_path.is_file():
                raise FileNotFoundError(f"{self.classifier_path} not found: run the evaluation "
                                        "(configs/evaluate.json) first; it fits and saves the classifier")
            self._pipeline = load_classifier(self.classifier_path)
        return self._pipeline

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            features = torch.as_tensor(d[key]).detach().float().cpu().reshape(1, -1).numpy()
            expected = getattr(self.pipeline, "n_features_in_", features.shape[1])
            if features.shape[1] != expected:
                raise ValueError(f"{self.classifier_path}: the classifier expects {expected} features, the backbone "
                                 f"gave {features.shape[1]} (weights and classifier from different runs?)")
            probs = np.asarray(self.pipeline.predict_proba(features), dtype=np.float32)[0]
            d[key] = MetaTensor(torch.from_numpy(probs))
        return d
