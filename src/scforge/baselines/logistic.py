"""L1 logistic regression on log-normalised expression: sc-foundation-eval's annotation baseline.

>>> base = LogisticBaseline(C=0.1, seed=0).fit(train, train.obs["cell_type"])      # scBERT's fixed C
>>> base = LogisticBaseline(C="cv", transform="none", seed=1).fit(train_lognorm, y)  # scGPT datasets: C by 5-fold CV
>>> base.predict(test); base.C_, base.cv_scores_

Also the helpers the other baselines share: count checks, label checks and gene alignment.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier

from scforge._inputs import as_text_labels
from scforge.errors import ConfigError, InputDataError
from scforge.matrix import as_source, require_counts

logger = logging.getLogger("scforge")

TRANSFORMS = ("log1p_cp10k", "log2_cp10k", "none")
DEFAULT_C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)


# ---- shared helpers ------------------------------------------------------------------------------
def log1p_cp10k(x: Any) -> sp.csr_matrix:
    """``log1p(counts / cell total * 1e4)`` (natural log) as a new CSR matrix (cells with no counts stay zero)."""
    m = sp.csr_matrix(x, dtype=np.float64, copy=True)
    totals = np.asarray(m.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    m.data *= np.repeat(scale, np.diff(m.indptr))
    np.log1p(m.data, out=m.data)
    return m


def log2_cp10k(x: Any) -> sp.csr_matrix:
    """``log2(1 + counts / cell total * 1e4)`` as a new CSR matrix: scBERT's preprocessing
    (``normalize_total(target_sum=1e4)`` then ``log1p(base=2)``)."""
    m = log1p_cp10k(x)
    m.data /= np.log(2.0)
    return m


def read_matrix(adata: Any, layer: str | None, *, counts: bool, what: str) -> tuple[sp.csr_matrix, pd.Index, Any]:
    """The expression matrix of ``adata`` (``layer`` or X) as a new float64 CSR matrix, its gene names and
    the :class:`~scforge.matrix.ExpressionSource`; raises :class:`InputDataError` for no cells, non-finite
    values, and (``counts=True``) anything but non-negative integer counts. ``what`` names the caller."""
    source = as_source(adata, layer=layer)
    if source.n_obs == 0 or source.n_vars == 0:
        raise InputDataError(f"{source.where} has shape {source.n_obs} x {source.n_vars}; {what} needs at least "
                             "one cell and one gene.")
    x = sp.csr_matrix(source.matrix, dtype=np.float64, copy=True)
    bad = ~np.isfinite(x.data)
    if bad.any():
        rows = np.unique(np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))[bad])
        raise InputDataError(f"{source.where} holds {int(bad.sum())} NaN/inf values (in {rows.size} cells, e.g. "
                             f"cells {rows[:5].tolist()}); {what} needs finite expression values. Drop or fix "
                             "those cells.")
    if counts:
        if x.data.size and x.data.min() < 0:
            raise InputDataError(f"{source.where} holds negative values (min {x.data.min():.3g}); {what} needs raw "
                                 "counts. Pass the raw counts (e.g. layer='counts').")
        require_counts(x, source.where)
    return x, pd.Index(source.gene_names(None)), source


def align_genes(x: sp.csr_matrix, names: pd.Index, genes: pd.Index, where: str = "the data") -> sp.csr_matrix:
    """Columns of ``x`` (named ``names``) rearranged to ``genes``; genes absent from ``names`` are zero."""
    if names.equals(genes):
        return x
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InputDataError(f"{where} has duplicated gene names (e.g. {dup}), so its genes cannot be matched to "
                             "the fitted ones. Call adata.var_names_make_unique() or drop the duplicates.")
    pos = names.get_indexer(genes)
    found = pos >= 0
    if not found.any():
        raise InputDataError(f"none of the {len(genes)} genes the model was fitted on (e.g. {genes[:3].tolist()}) "
                             f"is among the {len(names)} genes of {where} (e.g. {names[:3].tolist()}); check that "
                             "both use the same gene identifiers (symbols vs Ensembl ids).")
    if found.mean() < 0.5:
        logger.warning("%s has only %d of the %d fitted genes; the missing ones count as zero.", where,
                       int(found.sum()), len(genes))
    select = sp.csr_matrix((np.ones(int(found.sum())), (pos[found], np.flatnonzero(found))),
                           shape=(len(names), len(genes)))
    out = sp.csr_matrix(x @ select)
    out.sort_indices()
    return out


def as_labels(labels: Any, n: int | None = None, what: str = "labels") -> np.ndarray:
    """``labels`` as a 1-d object array of str (:func:`scforge._inputs.as_labels` checks them first)."""
    return as_text_labels(labels, n=n, what=what)


def _require_classes(y: np.ndarray, what: str = "labels") -> np.ndarray:
    classes = np.unique(y)
    if classes.size < 2:
        raise ConfigError(f"{what} have {classes.size} distinct value(s) {classes.tolist()}; a classifier needs at "
                          "least 2 classes.")
    return classes


def l1_liblinear(C: float, seed: int = 0, max_iter: int = 1000) -> LogisticRegression:  # noqa: N803
    """``LogisticRegression(penalty="l1", solver="liblinear", C=C, random_state=seed)``, spelt
    ``l1_ratio=1`` on scikit-learn >= 1.8 where ``penalty`` is deprecated (same model, no warning)."""
    if inspect.signature(LogisticRegression).parameters["penalty"].default == "deprecated":
        return LogisticRegression(l1_ratio=1.0, solver="liblinear", C=C, random_state=seed, max_iter=max_iter)
    return LogisticRegression(penalty="l1", solver="liblinear", C=C, random_state=seed, max_iter=max_iter)


def _check_C(C: Any, name: str = "C") -> float:  # noqa: N802
    if isinstance(C, bool) or not isinstance(C, (int, float, np.integer, np.floating)) or not math.isfinite(C) \
            or C <= 0:
        raise ConfigError(f"{name} must be a finite number > 0, got {C!r}")
    return float(C)


# ---- the baseline --------------------------------------------------------------------------------
class LogisticBaseline:
    """``LogisticRegression(penalty="l1", solver="liblinear", C=C, random_state=seed)``, one-vs-rest, on
    transformed expression: the sc-foundation-eval annotation baseline.

    ``transform``: ``"log1p_cp10k"`` (natural log1p of counts per 10k; needs raw counts), ``"log2_cp10k"``
    (scBERT's log2(1 + CP10k); needs raw counts) or ``"none"`` (the matrix as given, e.g. already
    log-normalised data as in the scGPT datasets). ``C="cv"`` picks C from ``C_grid`` by ``cv_folds``-fold
    stratified CV accuracy (``cross_validate(model, X, y, cv=5)`` as the reference) and refits on all
    cells. After :meth:`fit`: ``C_`` (the C used), ``cv_scores_`` (C -> mean CV accuracy, or None),
    ``classes_``, ``genes`` and ``clf``. Query cells are normalised by their own totals, then aligned
    to the training genes (missing genes count as zero)."""

    def __init__(self, C: float | str = 0.1, *, transform: str = "log1p_cp10k",  # noqa: N803
                 C_grid: Sequence[float] = DEFAULT_C_GRID, cv_folds: int = 5, seed: int = 0,  # noqa: N803
                 max_iter: int = 1000) -> None:
        if isinstance(C, str):
            if C != "cv":
                raise ConfigError(f"C must be a number > 0 or 'cv' (choose C by cross-validation), got {C!r}")
        else:
            C = _check_C(C)
        if transform not in TRANSFORMS:
            raise ConfigError(f"transform={transform!r}; choose one of {TRANSFORMS} ('none' for a matrix that is "
                              "already normalised).")
        grid = tuple(_check_C(c, "every value of C_grid") for c in C_grid)
        if not grid:
            raise ConfigError("C_grid is empty; give at least one C, e.g. (0.01, 0.1, 1).")
        if isinstance(cv_folds, bool) or not isinstance(cv_folds, (int, np.integer)) or cv_folds < 2:
            raise ConfigError(f"cv_folds must be an integer >= 2, got {cv_folds!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
            raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
        self.C, self.transform, self.C_grid = C, transform, grid
        self.cv_folds, self.seed, self.max_iter = int(cv_folds), seed, int(max_iter)
        self.C_: float | None = None
        self.cv_scores_: dict[float, float] | None = None
        self.classes_: list[str] | None = None
        self.genes: pd.Index | None = None
        self.clf: OneVsRestClassifier | None = None

    def __repr__(self) -> str:
        fitted = f", fitted on {len(self.genes)} genes, C_={self.C_}" if self.genes is not None else ""
        return f"LogisticBaseline(C={self.C!r}, transform={self.transform!r}, seed={self.seed}{fitted})"

    def _model(self, C: float) -> OneVsRestClassifier:  # noqa: N803
        return OneVsRestClassifier(l1_liblinear(C, self.seed, self.max_iter))

    def _features(self, adata: Any, layer: str | None) -> tuple[sp.csr_matrix, pd.Index, Any]:
        x, names, source = read_matrix(adata, layer, counts=self.transform != "none",
                                       what=f"the logistic baseline (transform={self.transform!r})")
        if self.transform == "log1p_cp10k":
            x = log1p_cp10k(x)
        elif self.transform == "log2_cp10k":
            x = log2_cp10k(x)
        if self.genes is not None:
            x = align_genes(x, names, self.genes, source.where)
        return x, names, source

    def _choose_C(self, x: sp.csr_matrix, y: np.ndarray) -> tuple[float, dict[float, float]]:  # noqa: N802
        from sklearn.model_selection import StratifiedKFold, cross_validate

        classes, counts = np.unique(y, return_counts=True)
        small = counts < self.cv_folds
        if small.any():
            named = ", ".join(f"{c!r} ({n} cells)" for c, n in zip(classes[small], counts[small]))
            raise ConfigError(f"C='cv' with cv_folds={self.cv_folds} needs at least {self.cv_folds} cells per class, "
                              f"but {named} have fewer. Use a fixed C (e.g. LogisticBaseline(C=0.1), the "
                              "sc-foundation-eval choice), fewer folds, or drop those classes.")
        folds = StratifiedKFold(n_splits=self.cv_folds)  # what cross_validate(model, X, y, cv=k) uses
        scores = {c: float(np.mean(cross_validate(self._model(c), x, y, cv=folds)["test_score"]))
                  for c in self.C_grid}
        best = max(self.C_grid, key=lambda c: scores[c])  # ties: the first in the grid
        logger.info("LogisticBaseline: C=%g chosen by %d-fold CV (mean accuracy %.4f)", best, self.cv_folds,
                    scores[best])
        return best, scores

    def fit(self, adata: Any, labels: Any, *, layer: str | None = None) -> LogisticBaseline:
        """Fit on ``adata`` (``layer`` or X; raw counts unless ``transform="none"``) and one label per cell."""
        self.genes = None
        x, names, _ = self._features(adata, layer)
        y = as_labels(labels, x.shape[0])
        _require_classes(y)
        if self.C == "cv":
            C, scores = self._choose_C(x, y)
        else:
            C, scores = float(self.C), None
        clf = self._model(C).fit(x, y)
        self.C_, self.cv_scores_, self.clf = C, scores, clf
        self.classes_ = [str(c) for c in clf.classes_]
        self.genes = names
        return self

    def predict_proba(self, adata: Any, *, layer: str | None = None) -> pd.DataFrame:
        """Class probabilities (rows: cells, named by obs names; columns: :attr:`classes_`)."""
        if self.clf is None:
            raise ConfigError("this LogisticBaseline is not fitted yet; call fit() first.")
        x, _, source = self._features(adata, layer)
        p = self.clf.predict_proba(x)
        index = source.obs.index if source.obs is not None else None
        return pd.DataFrame(p, index=index, columns=list(self.classes_))

    def predict(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        """The most probable class of each cell."""
        proba = self.predict_proba(adata, layer=layer)
        return proba.columns.to_numpy()[proba.to_numpy().argmax(1)]
