"""Concatenated per-modality PCA: the baseline every multi-omic cell embedding must beat.

>>> emb = concat_pca(data, n_comps_per_modality={"rna": 30, "adt": 10})

Each modality of a :class:`~scforge.tasks.multiomic.MultiOmicData` is reduced on its own, over the cells
that have it and the features every dataset measured:

* RNA: :class:`~scforge.baselines.pca.HVGPCA` (``seurat_v3`` HVGs, log1p CP10k, scaling, PCA);
* protein: CLR (``log1p(x)`` minus the cell's mean over the proteins), centred, PCA;
* ATAC: TF-IDF (``log1p(x / cell total * n_cells / peak total * 1e4)``) and truncated SVD (LSI),
  dropping the first component (it follows sequencing depth).

Each block is centred and divided by the square root of its total variance (unit total variance per
modality, so no modality dominates by its number of components or its scale), then the blocks are
concatenated. Cells without a modality get zeros (the block's mean) in its block.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError


def concat_pca(data: Any, n_comps_per_modality: int | Mapping[str, int] = 20, *, n_top_genes: int = 2000,
               seed: int = 0) -> np.ndarray:
    """Concatenated per-modality embeddings ``[cells, sum of components]`` of a ``MultiOmicData``
    (order: the data's modalities). ``n_comps_per_modality``: one number, or ``{kind: number}``."""
    blocks = []
    for kind, mod in data.modalities.items():
        n_comps = n_comps_per_modality if isinstance(n_comps_per_modality, int) else n_comps_per_modality.get(kind)
        if not isinstance(n_comps, int) or isinstance(n_comps, bool) or n_comps < 1:
            raise ConfigError(f"n_comps_per_modality gives {n_comps!r} for {kind!r}; need an integer >= 1 per modality")
        rows = np.flatnonzero(mod.present)
        x = mod.counts[rows][:, np.flatnonzero(mod.shared)]
        limit = min(x.shape) - 1 - (kind == "atac")
        if n_comps > limit:
            raise ConfigError(f"{kind}: n_comps={n_comps} is too many for {x.shape[0]} cells x {x.shape[1]} measured "
                              f"features; use at most {max(limit, 0)}")
        if kind == "rna":
            z = _rna(x, mod.features[mod.shared], n_comps, n_top_genes, seed)
        elif kind == "adt":
            z = _pca(clr(x), n_comps, seed)
        else:
            z = lsi(x, n_comps, seed)
        block = np.zeros((data.n_obs, n_comps), dtype=np.float64)
        block[rows] = unit_total_variance(z)
        blocks.append(block)
    return np.concatenate(blocks, axis=1).astype(np.float32)


def clr(x: Any) -> np.ndarray:
    """Centred log-ratio per cell: ``log1p(x) - mean(log1p(x))`` over the cell's features (dense)."""
    logx = np.log1p(x.toarray() if sp.issparse(x) else np.asarray(x, dtype=np.float64))
    return logx - logx.mean(axis=1, keepdims=True)


def tfidf(x: Any) -> sp.csr_matrix:
    """``log1p(tf * idf * 1e4)``: tf = count / cell total, idf = n_cells / peak total (Signac's method 1).
    Cells without counts stay zero."""
    m = sp.csr_matrix(x, dtype=np.float64, copy=True)
    m.eliminate_zeros()
    cell = np.asarray(m.sum(axis=1)).ravel()
    peak = np.asarray(m.sum(axis=0)).ravel()
    m.data /= np.repeat(cell, np.diff(m.indptr))
    m.data *= m.shape[0] / peak[m.indices] * 1e4
    np.log1p(m.data, out=m.data)
    return m


def lsi(x: Any, n_comps: int, seed: int = 0) -> np.ndarray:
    """TF-IDF then truncated SVD with ``n_comps + 1`` components; the first (depth) is dropped."""
    from sklearn.decomposition import TruncatedSVD

    svd = TruncatedSVD(n_components=n_comps + 1, algorithm="arpack", random_state=seed)
    return svd.fit_transform(tfidf(x))[:, 1:]


def unit_total_variance(z: np.ndarray) -> np.ndarray:
    """``z`` centred and scaled so the variances of its columns sum to 1."""
    z = np.asarray(z, dtype=np.float64) - np.mean(z, axis=0)
    total = float(z.var(axis=0).sum())
    return z / np.sqrt(total) if total > 0 else z


def _pca(x: np.ndarray, n_comps: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=n_comps, svd_solver="full", random_state=seed).fit_transform(x)


def _rna(x: sp.csr_matrix, genes: Any, n_comps: int, n_top_genes: int, seed: int) -> np.ndarray:
    import anndata as ad
    import pandas as pd

    from scforge.baselines.pca import HVGPCA

    adata = ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), var=pd.DataFrame(index=pd.Index(genes).astype(str)))
    return HVGPCA(n_top_genes=n_top_genes, n_comps=n_comps, seed=seed).fit_transform(adata)


__all__ = ["clr", "concat_pca", "lsi", "tfidf", "unit_total_variance"]
