"""HVG + PCA cell embedding of raw counts: the standard scanpy baseline that cell embeddings must beat.

>>> pca = HVGPCA(n_top_genes=2000, n_comps=50, seed=0)
>>> train_pcs = pca.fit_transform(train)          # highly_variable_genes -> log1p CP10k -> scale -> PCA
>>> query_pcs = pca.transform(query)              # the same genes, means, scales and components
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.baselines.logistic import align_genes, log1p_cp10k, read_matrix
from scforge.errors import ConfigError, DependencyError, InputDataError

logger = logging.getLogger("scforge")

FLAVORS = ("seurat_v3", "seurat_v3_paper", "seurat", "cell_ranger")
_COUNT_FLAVORS = ("seurat_v3", "seurat_v3_paper")  # the others rank genes on log-normalised data
MAX_VALUE = 10.0  # scanpy's scale(max_value=10)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


class HVGPCA:
    """Highly variable genes, log1p CP10k, scaling and PCA, fitted on raw counts and reusable on new cells.

    :meth:`fit` follows scanpy: ``highly_variable_genes(flavor=flavor, n_top_genes=...)`` (``seurat_v3``:
    on the counts), ``normalize_total(1e4)`` + ``log1p`` (cell totals over all genes), those genes kept,
    ``scale(max_value=10)`` (zero mean, unit variance with ddof=1, clipped to [-10, 10]) and
    ``PCA(svd_solver="arpack", random_state=seed)``. :meth:`transform` applies the fitted genes, means,
    scales and components to new cells (normalised by their own totals; missing genes count as zero).
    Fitted: ``genes_``, ``mean_``, ``std_``, ``center_`` (mean of the scaled data, PCA's centre),
    ``components_`` ``[n_comps, genes]``, ``explained_variance_ratio_``."""

    def __init__(self, n_top_genes: int = 2000, n_comps: int = 50, *, flavor: str = "seurat_v3",
                 seed: int = 0) -> None:
        self.n_top_genes = _positive_int(n_top_genes, "n_top_genes")
        self.n_comps = _positive_int(n_comps, "n_comps")
        if flavor not in FLAVORS:
            raise ConfigError(f"flavor={flavor!r}; choose one of {FLAVORS} (seurat_v3 ranks genes on raw counts).")
        self.flavor, self.seed = flavor, seed
        self.genes_: pd.Index | None = None
        self.mean_: np.ndarray | None = None
        self.std_: np.ndarray | None = None
        self.center_: np.ndarray | None = None
        self.components_: np.ndarray | None = None
        self.explained_variance_ratio_: np.ndarray | None = None

    def __repr__(self) -> str:
        return (f"HVGPCA(n_top_genes={self.n_top_genes}, n_comps={self.n_comps}, flavor={self.flavor!r}, "
                f"seed={self.seed}{', fitted' if self.genes_ is not None else ''})")

    def _hvg(self, counts: sp.csr_matrix, lognorm: sp.csr_matrix, names: pd.Index) -> np.ndarray:
        """Boolean mask of the highly variable genes (scanpy on a throwaway AnnData)."""
        if self.n_top_genes >= len(names):
            logger.info("HVGPCA: n_top_genes=%d >= %d genes; all genes are used.", self.n_top_genes, len(names))
            return np.ones(len(names), dtype=bool)
        x = counts if self.flavor in _COUNT_FLAVORS else lognorm
        try:
            return self._scanpy_hvg(x, names)
        except ValueError as exc:  # skmisc's loess: "reciprocal condition number ..." on small data sets
            detected = np.asarray((counts > 0).sum(axis=0)).ravel() >= 3
            if detected.all():
                raise self._hvg_error(counts, exc) from None
            logger.warning("HVGPCA: highly_variable_genes(flavor=%r) failed on all %d genes (%s); ranking the %d "
                           "genes detected in >= 3 cells instead (as after sc.pp.filter_genes(min_cells=3)).",
                           self.flavor, len(names), exc, int(detected.sum()))
            if self.n_top_genes >= int(detected.sum()):
                return detected
            try:
                inner = self._scanpy_hvg(x[:, np.flatnonzero(detected)], names[detected])
            except ValueError as exc2:
                raise self._hvg_error(counts, exc2) from None
            mask = np.zeros(len(names), dtype=bool)
            mask[np.flatnonzero(detected)[inner]] = True
            return mask

    def _scanpy_hvg(self, x: sp.csr_matrix, names: pd.Index) -> np.ndarray:
        import anndata as ad
        import scanpy as sc

        tmp = ad.AnnData(X=x.copy(), var=pd.DataFrame(index=names.astype(str)))
        try:
            sc.pp.highly_variable_genes(tmp, flavor=self.flavor, n_top_genes=self.n_top_genes)
        except ImportError as exc:
            raise DependencyError(f"highly_variable_genes(flavor={self.flavor!r}) needs scikit-misc: "
                                  f"pip install scikit-misc ({exc}).") from None
        except ZeroDivisionError as exc:
            raise ValueError(str(exc)) from None
        return tmp.var["highly_variable"].to_numpy(dtype=bool)

    def _hvg_error(self, counts: sp.csr_matrix, exc: Exception) -> InputDataError:
        return InputDataError(f"scanpy's highly_variable_genes(flavor={self.flavor!r}) failed on these "
                              f"{counts.shape[0]} cells x {counts.shape[1]} genes: {exc}. Use more cells, drop "
                              "rarely detected genes, or pass all genes (n_top_genes >= the number of genes).")

    def _fit(self, adata: Any, layer: str | None) -> np.ndarray:
        from sklearn.decomposition import PCA

        counts, names, source = read_matrix(adata, layer, counts=True, what="HVGPCA")
        _require_unique(names, source)
        n_cells = counts.shape[0]
        n_genes = min(self.n_top_genes, len(names))
        if self.n_comps >= min(n_cells, n_genes):
            raise ConfigError(f"n_comps={self.n_comps} must be < min(cells, genes) = min({n_cells}, {n_genes}) for "
                              f"an exact (arpack) PCA; use n_comps <= {min(n_cells, n_genes) - 1} or more "
                              "cells/genes.")
        lognorm = log1p_cp10k(counts)
        keep = self._hvg(counts, lognorm, names)
        if self.n_comps >= min(n_cells, int(keep.sum())):
            raise ConfigError(f"n_comps={self.n_comps} must be < the {int(keep.sum())} genes selected; use a smaller "
                              "n_comps.")
        x = lognorm[:, np.flatnonzero(keep)].toarray()
        mean = x.mean(axis=0)
        std = x.std(axis=0, ddof=1)
        std[std == 0] = 1.0  # scanpy's convention for constant genes
        z = np.clip((x - mean) / std, -MAX_VALUE, MAX_VALUE)
        pca = PCA(n_components=self.n_comps, svd_solver="arpack", random_state=self.seed).fit(z)
        self.genes_ = names[keep]
        self.mean_, self.std_ = mean, std
        self.center_ = pca.mean_
        self.components_ = pca.components_
        self.explained_variance_ratio_ = pca.explained_variance_ratio_
        return z

    def _project(self, z: np.ndarray) -> np.ndarray:
        return (z - self.center_) @ self.components_.T

    def fit(self, adata: Any, layer: str | None = None) -> HVGPCA:
        """Fit on the raw counts of ``adata`` (``layer`` or X). The AnnData is not modified."""
        self._fit(adata, layer)
        return self

    def fit_transform(self, adata: Any, layer: str | None = None) -> np.ndarray:
        """:meth:`fit`, then the PCs of the same cells ``[cells, n_comps]``."""
        return self._project(self._fit(adata, layer))

    def transform(self, adata: Any, layer: str | None = None) -> np.ndarray:
        """PCs ``[cells, n_comps]`` of new cells (raw counts) with the fitted genes, scaling and components."""
        if self.genes_ is None:
            raise ConfigError("this HVGPCA is not fitted yet; call fit() first.")
        counts, names, source = read_matrix(adata, layer, counts=True, what="HVGPCA.transform")
        x = align_genes(log1p_cp10k(counts), names, self.genes_, source.where).toarray()
        z = np.clip((x - self.mean_) / self.std_, -MAX_VALUE, MAX_VALUE)
        return self._project(z)


def hvg_pca(adata: Any, n_top_genes: int = 2000, n_comps: int = 50, *, layer: str | None = None,
            seed: int = 0) -> np.ndarray:
    """PCs ``[cells, n_comps]`` of raw counts: ``HVGPCA(n_top_genes, n_comps, seed=seed).fit_transform``."""
    return HVGPCA(n_top_genes, n_comps, seed=seed).fit_transform(adata, layer=layer)


def highly_variable_genes(adata: Any, n_top_genes: int = 2000, *, layer: str | None = None,
                          flavor: str = "seurat_v3") -> np.ndarray:
    """Boolean mask over ``adata.var`` of the ``n_top_genes`` highly variable genes, chosen as
    :class:`HVGPCA` chooses them (scanpy's ``highly_variable_genes``; ``seurat_v3`` on the raw counts of
    ``layer``, the others on log1p CP10k). All genes when ``n_top_genes`` >= the number of genes.
    The AnnData is not changed."""
    chooser = HVGPCA(n_top_genes, 1, flavor=flavor)
    counts, names, source = read_matrix(adata, layer, counts=True, what="highly_variable_genes")
    _require_unique(names, source)
    lognorm = None if flavor in _COUNT_FLAVORS else log1p_cp10k(counts)
    return chooser._hvg(counts, lognorm, names)


def _require_unique(names: pd.Index, source: Any) -> None:
    if not names.is_unique:
        dup = names[names.duplicated()].unique()[:5].tolist()
        raise InputDataError(f"{source.where} has duplicated gene names (e.g. {dup}); call "
                             "adata.var_names_make_unique() first.")
