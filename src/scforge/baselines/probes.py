"""Classifiers on cell embeddings (any model's, or HVG+PCA): kNN majority vote and a logistic-regression probe.

>>> probe = EmbeddingClassifier("knn", n_neighbors=10).fit(train_emb, train_labels)
>>> probe.predict(test_emb); probe.predict_proba(test_emb)      # DataFrame, one column per class
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scforge._inputs import as_embedding
from scforge.baselines.logistic import _check_C, _require_classes, as_labels
from scforge.errors import ConfigError

KINDS = ("knn", "logistic")


def l2_normalized(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (zero rows stay zero), as ``scforge.tasks.annotate``'s linear probe."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class EmbeddingClassifier:
    """A classifier on cell embeddings ``[cells, dims]``.

    ``kind="knn"``: scikit-learn ``KNeighborsClassifier`` (majority vote of ``n_neighbors``, capped at the
    number of training cells, under ``metric``). ``kind="logistic"``: ``LogisticRegression(C=C,
    solver="lbfgs")`` (multinomial), as :func:`scforge.tasks.annotate.linear_probe`. With ``l2_normalize``
    every row is divided by its L2 norm first (both kinds; it does not change cosine neighbours).
    After :meth:`fit`: ``classes_`` (sorted str labels), ``n_features_in_``, ``model`` (the sklearn estimator)."""

    def __init__(self, kind: str = "knn", *, n_neighbors: int = 10, metric: str = "cosine", C: float = 1.0,  # noqa: N803
                 l2_normalize: bool = True, seed: int = 0, max_iter: int = 1000) -> None:
        from sklearn.neighbors import VALID_METRICS

        if kind not in KINDS:
            raise ConfigError(f"kind={kind!r}; choose one of {KINDS}.")
        if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or n_neighbors < 1:
            raise ConfigError(f"n_neighbors must be an integer >= 1, got {n_neighbors!r}")
        if kind == "knn" and metric not in VALID_METRICS["brute"]:
            raise ConfigError(f"metric={metric!r} is not a scikit-learn neighbour metric; use e.g. 'cosine', "
                              "'euclidean' or 'manhattan'.")
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.kind, self.n_neighbors, self.metric = kind, int(n_neighbors), metric
        self.C, self.l2_normalize, self.seed, self.max_iter = _check_C(C), bool(l2_normalize), seed, int(max_iter)
        self.model: Any = None
        self.classes_: list[str] | None = None
        self.n_features_in_: int | None = None

    def __repr__(self) -> str:
        detail = f"n_neighbors={self.n_neighbors}, metric={self.metric!r}" if self.kind == "knn" else f"C={self.C}"
        return f"EmbeddingClassifier({self.kind!r}, {detail}, l2_normalize={self.l2_normalize})"

    def _prepare(self, embedding: Any, width: int | None = None) -> np.ndarray:
        x = as_embedding(embedding, width=width)
        return l2_normalized(x) if self.l2_normalize else x

    def fit(self, embedding: Any, labels: Any) -> EmbeddingClassifier:
        """Fit on ``embedding`` ``[cells, dims]`` and one label per cell (no missing labels, >= 2 classes)."""
        x = self._prepare(embedding)
        y = as_labels(labels, x.shape[0])
        _require_classes(y)
        if self.kind == "knn":
            from sklearn.neighbors import KNeighborsClassifier

            model = KNeighborsClassifier(n_neighbors=min(self.n_neighbors, x.shape[0]), metric=self.metric)
        else:
            from sklearn.linear_model import LogisticRegression

            model = LogisticRegression(C=self.C, solver="lbfgs", max_iter=self.max_iter, random_state=self.seed)
        self.model = model.fit(x, y)
        self.classes_ = [str(c) for c in model.classes_]
        self.n_features_in_ = x.shape[1]
        return self

    def predict_proba(self, embedding: Any) -> pd.DataFrame:
        """Class probabilities (kNN: fraction of neighbours) ``[cells, classes_]``."""
        if self.model is None:
            raise ConfigError("this EmbeddingClassifier is not fitted yet; call fit() first.")
        x = self._prepare(embedding, self.n_features_in_)
        return pd.DataFrame(self.model.predict_proba(x), columns=list(self.classes_))

    def predict(self, embedding: Any) -> np.ndarray:
        """The most probable class of each cell (kNN: the majority of the neighbours; ties: first class)."""
        proba = self.predict_proba(embedding)
        return proba.columns.to_numpy()[proba.to_numpy().argmax(1)]
