"""Zero-shot clustering scores of cell embeddings (scCello's / scGPT's protocol).

Neighbours on the embedding, Leiden clustering with the resolution swept (0.1 .. 2.0 by default)
keeping the clustering with the best NMI to the labels; then NMI, ARI, ASW_label =
(silhouette + 1) / 2 on the embedding with the labels, and AvgBio = their mean. Seeded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from scforge.errors import ConfigError, InputDataError

__all__ = ["ClusteringReport", "best_leiden", "clustering_metrics"]

DEFAULT_RESOLUTIONS = tuple(np.round(np.linspace(0.1, 2.0, 20), 2).tolist())


@dataclass
class ClusteringReport:
    """``nmi`` / ``ari`` of the best Leiden clustering, ``asw_label`` = (silhouette + 1) / 2,
    ``avg_bio`` = mean of the three, the chosen ``resolution`` and its ``n_clusters``."""

    nmi: float
    ari: float
    asw_label: float
    avg_bio: float
    resolution: float
    n_clusters: int
    n_cells: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check(emb: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(emb, dtype=np.float32)
    y = np.asarray(labels).astype(str)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise InputDataError(f"embeddings must be a finite 2-d array [cells, dims], got shape {x.shape}.")
    if y.shape != (x.shape[0],):
        raise InputDataError(f"{y.size} labels for {x.shape[0]} cells.")
    if np.unique(y).size < 2:
        raise InputDataError("clustering scores need at least two distinct labels.")
    return x, y


def best_leiden(emb: np.ndarray, labels: Sequence[Any], *, resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
                n_neighbors: int = 15, seed: int = 0) -> tuple[np.ndarray, float, float]:
    """The Leiden clustering (over ``resolutions``) with the highest NMI to ``labels``:
    ``(clusters, resolution, nmi)``."""
    import anndata as ad
    import scanpy as sc
    from sklearn.metrics import normalized_mutual_info_score

    x, y = _check(emb, labels)
    if not resolutions:
        raise ConfigError("resolutions is empty.")
    if not 2 <= n_neighbors < x.shape[0]:
        raise ConfigError(f"n_neighbors must be in 2..{x.shape[0] - 1}, got {n_neighbors}.")
    adata = ad.AnnData(np.zeros((x.shape[0], 0), dtype=np.float32))
    adata.obsm["X_emb"] = x
    sc.pp.neighbors(adata, use_rep="X_emb", n_neighbors=n_neighbors, random_state=seed)
    best: tuple[np.ndarray, float, float] | None = None
    for resolution in resolutions:
        sc.tl.leiden(adata, resolution=float(resolution), flavor="igraph", n_iterations=2, directed=False,
                     random_state=seed, key_added="_leiden")
        clusters = adata.obs["_leiden"].to_numpy().astype(str)
        nmi = float(normalized_mutual_info_score(y, clusters))
        if best is None or nmi > best[2]:
            best = (clusters, float(resolution), nmi)
    return best


def clustering_metrics(emb: np.ndarray, labels: Sequence[Any], *, resolutions: Sequence[float] = DEFAULT_RESOLUTIONS,
                       n_neighbors: int = 15, seed: int = 0) -> ClusteringReport:
    """NMI, ARI (best-NMI Leiden clustering), ASW_label and AvgBio of ``emb`` against ``labels``."""
    from sklearn.metrics import adjusted_rand_score, silhouette_score

    x, y = _check(emb, labels)
    clusters, resolution, nmi = best_leiden(x, y, resolutions=resolutions, n_neighbors=n_neighbors, seed=seed)
    ari = float(adjusted_rand_score(y, clusters))
    asw = (float(silhouette_score(x, y)) + 1.0) / 2.0
    return ClusteringReport(nmi=nmi, ari=ari, asw_label=asw, avg_bio=(nmi + ari + asw) / 3.0, resolution=resolution,
                            n_clusters=int(np.unique(clusters).size), n_cells=int(x.shape[0]))
