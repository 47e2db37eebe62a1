"""Routing's classifier as plain arrays: standardise, then a linear map to label probabilities.

scikit-learn fits it; once fitted it is five arrays, so it is kept in the artifact store and a rerun
predicts with numpy alone, without importing scikit-learn or refitting. Fresh and reloaded
classifiers predict through the same code, so a rerun routes every user exactly as the first run did.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from apm_bench.methods.blas import one_blas_thread

FILE = "router.npz"


@dataclass(frozen=True)
class LinearRouter:
    classes_: np.ndarray  # label ids, as scikit-learn orders them
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (labels, features); one row for two labels (logistic), none for a constant
    intercept: np.ndarray

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        if self.coef.shape[0] == 0:  # one label seen in training: it is always the answer
            return np.ones((len(features), 1))
        logits = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        if self.coef.shape[0] == 1:
            positive = 1.0 / (1.0 + np.exp(-logits[:, 0]))
            return np.stack([1.0 - positive, positive], axis=1)
        logits -= logits.max(axis=1, keepdims=True)
        weights = np.exp(logits)
        return weights / weights.sum(axis=1, keepdims=True)

    def save(self, folder: Path) -> None:
        np.savez(folder / FILE, classes=self.classes_, mean=self.mean, scale=self.scale, coef=self.coef,
                 intercept=self.intercept)

    @classmethod
    def load(cls, folder: Path) -> LinearRouter:
        with np.load(folder / FILE) as saved:
            return cls(saved["classes"], saved["mean"], saved["scale"], saved["coef"], saved["intercept"])


def fit_logistic(features: np.ndarray, targets: np.ndarray, strength: float, seed: int) -> LinearRouter:
    """Soft labels become weighted copies of each example, one per label with mass (exact soft-label CE)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    rows, labels = np.nonzero(targets > 1e-6)
    width = features.shape[1]
    if np.unique(labels).size == 1:  # logistic regression cannot fit one label; a constant can
        return LinearRouter(np.unique(labels), np.zeros(width), np.ones(width), np.zeros((0, width)), np.zeros(0))
    with one_blas_thread():
        scaler = StandardScaler().fit(features[rows])
        model = LogisticRegression(C=strength, max_iter=2000, random_state=seed)
        model.fit(scaler.transform(features[rows]), labels, sample_weight=targets[rows, labels])
    return LinearRouter(model.classes_, scaler.mean_, scaler.scale_, model.coef_, model.intercept_)
