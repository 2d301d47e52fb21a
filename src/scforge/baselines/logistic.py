"""L1 logistic regression on log1p(CP10k) expression, as sc-foundation-eval's annotation baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from scforge.errors import ConfigError
from scforge.matrix import as_source, require_counts


def log1p_cp10k(x: Any) -> sp.csr_matrix:
    """``log1p(counts / cell total * 1e4)`` as a new CSR matrix (cells with no counts stay zero)."""
    m = sp.csr_matrix(x, dtype=np.float64, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    m.data *= np.repeat(scale, np.diff(m.indptr))
    np.log1p(m.data, out=m.data)
    return m


class LogisticBaseline:
    """``LogisticRegression(penalty="l1", solver="liblinear", C=C)`` (one-vs-rest) on log1p CP10k of raw
    counts: the sc-foundation-eval annotation baseline (C=0.1 fixed there)."""

    def __init__(self, C: float = 0.1, seed: int = 0, max_iter: int = 1000) -> None:
        if C <= 0:
            raise ConfigError(f"C must be > 0, got {C}")
        self.C, self.seed, self.max_iter = C, seed, max_iter
        self.genes: pd.Index | None = None
        self.clf: OneVsRestClassifier | None = None

    def _features(self, adata: Any, layer: str | None) -> sp.csr_matrix:
        source = as_source(adata, layer=layer)
        x = sp.csr_matrix(source.matrix)
        require_counts(x, source.where)
        names = pd.Index(source.gene_names(None))
        if self.genes is not None and not names.equals(self.genes):
            pos = names.get_indexer(self.genes)
            cols = sp.csr_matrix(x)[:, np.maximum(pos, 0)].tolil()
            cols[:, pos < 0] = 0
            x = sp.csr_matrix(cols)
        return log1p_cp10k(x)

    def fit(self, adata: Any, labels: Any, *, layer: str | None = None) -> LogisticBaseline:
        y = np.asarray(labels).astype(str)
        if np.unique(y).size < 2:
            raise ConfigError("the logistic baseline needs at least 2 classes")
        self.genes = None
        x = self._features(adata, layer)
        self.genes = pd.Index(as_source(adata, layer=layer).gene_names(None))
        self.clf = OneVsRestClassifier(LogisticRegression(penalty="l1", solver="liblinear", C=self.C,
                                                          random_state=self.seed, max_iter=self.max_iter))
        self.clf.fit(x, y)
        return self

    def predict_proba(self, adata: Any, *, layer: str | None = None) -> pd.DataFrame:
        if self.clf is None:
            raise ConfigError("call fit() first")
        p = self.clf.predict_proba(self._features(adata, layer))
        return pd.DataFrame(p, columns=list(self.clf.classes_))

    def predict(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        proba = self.predict_proba(adata, layer=layer)
        return proba.columns.to_numpy()[proba.to_numpy().argmax(1)]
