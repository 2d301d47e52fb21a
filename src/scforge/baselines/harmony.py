"""Harmony batch correction (harmonypy) of an embedding, and the HVG + PCA + Harmony baseline.

>>> corrected = harmony_integrate(pcs, adata.obs["batch"], seed=0)
>>> corrected = harmony_pca(adata, "batch", n_comps=50)      # hvg_pca, then Harmony
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from scforge._inputs import as_embedding
from scforge.baselines.logistic import as_labels
from scforge.baselines.pca import hvg_pca
from scforge.errors import ConfigError, DependencyError, InputDataError


def harmony_integrate(embedding: np.ndarray, batches: Any, *, seed: int = 0, max_iter: int = 10,
                      theta: float = 2.0) -> np.ndarray:
    """Harmony-corrected copy ``[cells, dims]`` of ``embedding`` (e.g. PCs), one batch label per cell.

    ``harmonypy.run_harmony(..., theta=theta, max_iter_harmony=max_iter, random_state=seed)`` with
    harmonypy's other defaults (nclust = min(cells / 30, 100), sigma 0.1, lambda estimated); the same
    seed gives the same result. The inputs are not modified."""
    x = as_embedding(embedding)
    b = as_labels(batches, x.shape[0], what="batch labels")
    levels = np.unique(b)
    if levels.size < 2:
        raise InputDataError(f"all {x.shape[0]} cells are in one batch ({levels.tolist()}); Harmony needs at "
                             "least 2 batches to integrate.")
    if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) or max_iter < 1:
        raise ConfigError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.integer, np.floating)) \
            or not math.isfinite(theta) or theta < 0:
        raise ConfigError(f"theta (Harmony's diversity penalty) must be a finite number >= 0, got {theta!r}")
    if round(x.shape[0] / 30.0) < 1:
        raise InputDataError(f"Harmony needs at least 16 cells (it uses cells / 30 clusters), got {x.shape[0]}.")
    try:
        import harmonypy
    except ImportError as exc:
        raise DependencyError(f"harmony_integrate needs harmonypy: pip install harmonypy ({exc}).") from None
    meta = pd.DataFrame({"batch": pd.Categorical(b)})
    try:
        # dims x cells, so harmonypy cannot misread the orientation when dims == cells
        out = harmonypy.run_harmony(np.ascontiguousarray(x.T), meta, "batch", theta=float(theta),
                                    max_iter_harmony=int(max_iter), random_state=int(seed), verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise InputDataError(f"harmonypy failed on the {x.shape[0]} x {x.shape[1]} embedding: {exc}") from None
    z = np.asarray(out.Z_corr, dtype=np.float64)
    n, d = x.shape
    if z.shape == (n, d) and (n != d or np.allclose(np.asarray(out.Z_orig), x)):
        return z  # harmonypy >= 2: cells x dims
    return np.ascontiguousarray(z.T)  # older harmonypy: dims x cells


def harmony_pca(adata: Any, batch_key: str, *, n_top_genes: int = 2000, n_comps: int = 50, layer: str | None = None,
                seed: int = 0) -> np.ndarray:
    """:func:`~scforge.baselines.pca.hvg_pca` of the raw counts, then :func:`harmony_integrate` over
    ``obs[batch_key]``: the HVG + PCA + Harmony integration baseline ``[cells, n_comps]``."""
    obs = getattr(adata, "obs", None)
    if obs is None:
        raise InputDataError(f"harmony_pca needs an AnnData, got {type(adata).__name__}.")
    if batch_key not in obs.columns:
        shown = ", ".join(map(repr, list(obs.columns)[:15])) or "(none)"
        raise InputDataError(f"obs has no column {batch_key!r} with the batches. Columns present: {shown}.")
    batches = as_labels(obs[batch_key], obs.shape[0], what=f"obs[{batch_key!r}]")
    if np.unique(batches).size < 2:
        raise InputDataError(f"obs[{batch_key!r}] has a single batch {np.unique(batches).tolist()}; Harmony needs "
                             "at least 2.")
    pcs = hvg_pca(adata, n_top_genes, n_comps, layer=layer, seed=seed)
    return harmony_integrate(pcs, batches, seed=seed)
