"""Detectors of poisoned training cells. Every detector returns one score per cell, higher = more
suspicious, so scores can be ranked, thresholded and compared by AUROC.

Data level (before fine-tuning), on log1p CP10k of the counts:

* :func:`anomaly_ensemble`: scBackdoor's ``detect_tools.get_abnormal_cells``: mean |z| over genes,
  distance to the nearest class centroid and an IsolationForest score. ``combine="published"`` adds
  the three raw scores as the original does; the default ``"rank"`` averages their percentile ranks,
  which does not let the largest-scaled score decide alone. Computed sparse: no dense cells x genes
  z-matrix is ever built.
* :func:`sparsity_scores`: genes detected and Gini coefficient, each as a robust z-score within the
  cell's labelled class (triggered cells are far sparser than their label's cells).
* :func:`complexity_scores`: genes detected against the cell's total, class-free: how far a cell falls
  below the log-log line that genes detected follow with total counts across the whole set (the
  novelty/complexity QC of scRNA-seq). The sparsify trigger keeps a cell's total and drops its genes,
  and needs no labels, so it still works when the target class is mostly poisoned cells.
* :func:`knn_label_disagreement`: the share of a cell's neighbours (PCA or any embedding) whose label
  differs from its own (dirty-label poisons carry the target label among their source class).

Token level (a rank-value tokenized fine-tuning set, Geneformer's input):

* :func:`rank_consistency`: how well the order of a cell's gene tokens follows the genes' usual
  positions across the set (Spearman correlation); scBackdoor's shuffled top-20 trigger destroys it.
* :func:`gene_token_counts`: gene tokens per cell (the trigger leaves exactly ``top``).

Model level (after fine-tuning), on a model's cell embeddings grouped by label/predicted class:

* :func:`spectral_signature_scores` (Tran et al., 2018), :func:`activation_clustering_scores`
  (Chen et al., 2018), :func:`strip_entropy` (Gao et al., 2019).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

from scforge._inputs import as_embedding, as_text_labels
from scforge.errors import ConfigError, InputDataError

__all__ = [
    "mean_abs_z", "centroid_distance", "isolation_scores", "anomaly_ensemble", "sparsity_scores",
    "complexity_scores", "knn_label_disagreement", "spectral_signature_scores", "activation_clustering_scores", "strip_entropy",
    "robust_z", "percentile_rank", "detection_metrics", "top_variance_pca", "rank_consistency", "gene_token_counts",
]


# ---- helpers ------------------------------------------------------------------------------------
def _labels(labels: Any, n: int) -> np.ndarray:
    return as_text_labels(labels, n=n)


def percentile_rank(score: np.ndarray) -> np.ndarray:
    """Ranks of ``score`` scaled to (0, 1] (ties share their mean rank)."""
    from scipy.stats import rankdata

    score = np.asarray(score, dtype=np.float64)
    return rankdata(score, method="average") / max(score.size, 1)


def robust_z(values: np.ndarray, groups: np.ndarray | None = None, *, min_scale: float = 0.0,
             trim: float | None = None) -> np.ndarray:
    """``(v - median) / max(1.4826 * MAD, min_scale)`` of ``values``, within each group when ``groups``
    is given. A group whose scale is 0 uses its standard deviation (and 1 if that is 0 too).

    ``trim`` (for scores where only high values are suspect): the scale is the MAD of the values below
    the median, and the median and scale are re-estimated without the values above ``trim`` (in z)
    until the kept set stops changing, keeping at least half of the group. A group that is a third
    poisoned (the target class after a label flip) otherwise inflates its own MAD and hides them."""
    if trim is not None and not trim > 0:
        raise ConfigError(f"trim must be a z-score > 0, got {trim}.")
    values = np.asarray(values, dtype=np.float64)
    out = np.zeros_like(values)
    keys = np.zeros(values.size, dtype=np.int64) if groups is None else np.unique(groups, return_inverse=True)[1]
    for k in np.unique(keys):
        m = keys == k
        v = values[m]
        ref = v
        for _ in range(1 if trim is None else 20):
            med = np.median(ref)
            spread = np.abs(ref - med) if trim is None else med - ref[ref <= med]  # trimmed: the clean side
            scale = max(1.4826 * np.median(spread), min_scale)
            if not scale > 0:
                scale = ref.std() if ref.std() > 0 else 1.0
            z = (v - med) / scale
            if trim is None:
                break
            kept = v[z <= trim]
            if kept.size == ref.size or 2 * kept.size < v.size:
                break
            ref = kept
        out[m] = z
    return out


# ---- data level ---------------------------------------------------------------------------------
def mean_abs_z(x: Any) -> np.ndarray:
    """Mean over genes of |z| for each cell, z-scoring each gene across cells (population sd; genes
    with sd 0 contribute 0), as ``detect_tools`` does, computed from the sparse matrix exactly."""
    x = sp.csr_matrix(x, dtype=np.float64)
    n, g = x.shape
    mean = np.asarray(x.mean(axis=0)).ravel()
    sq = np.asarray(x.multiply(x).mean(axis=0)).ravel()
    sd = np.sqrt(np.maximum(sq - mean**2, 0.0))
    inv = np.divide(1.0, sd, out=np.zeros_like(sd), where=sd > 0)
    zero_part = np.abs(mean) * inv  # |z| of a zero entry
    base = zero_part.sum()
    cols = x.indices
    delta = np.abs(x.data - mean[cols]) * inv[cols] - zero_part[cols]
    rows = np.repeat(np.arange(n), np.diff(x.indptr))
    return (base + np.bincount(rows, weights=delta, minlength=n)) / g


def centroid_distance(x: Any, labels: Any) -> np.ndarray:
    """Euclidean distance from each cell to the nearest class centroid (per-class means of ``x``)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    y = _labels(labels, x.shape[0])
    classes, codes = np.unique(y, return_inverse=True)
    onehot = sp.csr_matrix((np.ones(y.size), (codes, np.arange(y.size))), shape=(classes.size, y.size))
    centroids = np.asarray((onehot @ x).todense()) / np.bincount(codes)[:, None]
    sq_cells = np.asarray(x.multiply(x).sum(axis=1)).ravel()
    d2 = sq_cells[:, None] - 2.0 * np.asarray(x @ centroids.T) + (centroids**2).sum(1)[None, :]
    return np.sqrt(np.maximum(d2.min(axis=1), 0.0))


def isolation_scores(features: np.ndarray, *, contamination: float = 0.1, seed: int = 0) -> np.ndarray:
    """IsolationForest anomaly score (``-score_samples``: higher = more anomalous)."""
    from sklearn.ensemble import IsolationForest

    forest = IsolationForest(contamination=contamination, random_state=seed, n_jobs=1)
    return -forest.fit(features).score_samples(features)


def top_variance_pca(x: Any, n_components: int, seed: int, n_top_genes: int = 2000) -> np.ndarray:
    """Principal components of ``x`` over its ``n_top_genes`` most variable genes (dense, randomized
    SVD; seeded, with deterministic signs)."""
    from sklearn.decomposition import PCA

    x = sp.csr_matrix(x, dtype=np.float64)
    mean = np.asarray(x.mean(axis=0)).ravel()
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - mean**2
    genes = np.sort(np.argsort(-var, kind="stable")[: min(n_top_genes, x.shape[1])])
    dense = x[:, genes].toarray()
    k = max(1, min(n_components, dense.shape[0] - 1, dense.shape[1]))
    pcs = PCA(k, svd_solver="randomized", random_state=seed).fit_transform(dense)
    return pcs * np.sign(pcs[np.abs(pcs).argmax(axis=0), np.arange(k)])


def anomaly_ensemble(x: Any, labels: Any, *, combine: str = "rank", top_percent: float = 10.0,
                     n_pcs: int | None = 50, features: np.ndarray | None = None, seed: int = 0
                     ) -> dict[str, np.ndarray]:
    """The three ``detect_tools`` scores and their combination (see the module docstring).

    ``x``: cells x genes, as the detector should see it (e.g. log1p CP10k). IsolationForest runs on
    the top ``n_pcs`` principal components, or on ``features`` when given (``n_pcs=None``: on ``x``
    densified, as published).
    Returns ``{"mean_abs_z", "centroid_distance", "isolation", "anomaly"}``."""
    if combine not in ("rank", "published"):
        raise ConfigError(f"combine={combine!r}; choose 'rank' or 'published'.")
    if not 0 < top_percent < 100:
        raise ConfigError(f"top_percent must lie in (0, 100), got {top_percent}.")
    x = sp.csr_matrix(x, dtype=np.float64)
    z = mean_abs_z(x)
    dist = centroid_distance(x, labels)
    if features is not None:
        feats = np.asarray(features, dtype=np.float64)
    else:
        feats = x.toarray() if n_pcs is None else top_variance_pca(x, n_pcs, seed)
    iso = isolation_scores(feats, contamination=top_percent / 100.0, seed=seed)
    if combine == "published":
        combined = (z + dist + iso) / 3.0
    else:
        combined = (percentile_rank(z) + percentile_rank(dist) + percentile_rank(iso)) / 3.0
    return {"mean_abs_z": z, "centroid_distance": dist, "isolation": iso, "anomaly": combined}


def _expression(counts: Any, *, what: str) -> sp.csr_matrix:
    """``counts`` as CSR, refusing negative or non-finite values (a genes-detected count means nothing there)."""
    from scforge.matrix import check_values

    x = sp.csr_matrix(counts)
    check_values(x, f"the matrix passed to {what}")
    return x


def sparsity_scores(counts: Any, labels: Any) -> dict[str, np.ndarray]:
    """Robust z-scores within each labelled class of ``-log(genes detected)`` and of the Gini
    coefficient, and their maximum (``"sparsity"``). Works on counts or any non-negative matrix.
    The class references are trimmed at z 3 (:func:`robust_z`), so poisons flipped into the target
    class, which can make up a third of it, do not set its own median and MAD."""
    from scforge.security.poison import gini_coefficient

    x = _expression(counts, what="the sparsity score")
    y = _labels(labels, x.shape[0])
    n_genes = np.diff(x.indptr).astype(np.float64)
    g = gini_coefficient(x)
    z_genes = robust_z(-np.log1p(n_genes), y, trim=3.0)
    z_gini = robust_z(g, y, trim=3.0)
    return {"n_genes": n_genes, "gini": g, "z_few_genes": z_genes, "z_gini": z_gini,
            "sparsity": np.maximum(z_genes, z_gini)}


def complexity_scores(counts: Any) -> dict[str, np.ndarray]:
    """Class-free low-complexity score: ``log(1 + genes detected)`` against ``log(1 + total)`` over all
    cells, fitted with a Huber (outlier-robust) line; ``"complexity"`` is the robust z (trimmed at 3,
    :func:`robust_z`) of how far each cell falls below that line. Works on counts or any non-negative
    matrix. Unlike :func:`sparsity_scores` it uses no labels, so a class that is mostly poisoned
    cells (a small target class after the label flip) cannot hide them."""
    from sklearn.linear_model import HuberRegressor

    x = _expression(counts, what="the complexity score")
    if x.shape[0] < 3:
        raise InputDataError(f"the complexity score needs at least 3 cells; the data has {x.shape[0]}.")
    log_genes = np.log1p(np.diff(x.indptr).astype(np.float64))
    log_total = np.log1p(np.asarray(x.sum(axis=1), dtype=np.float64).ravel())
    if np.ptp(log_total) > 0:
        fit = HuberRegressor().fit(log_total[:, None], log_genes)
        expected = fit.predict(log_total[:, None])
    else:  # every cell has the same total: compare genes detected alone
        expected = np.full_like(log_genes, np.median(log_genes))
    deficit = expected - log_genes
    return {"log_genes_deficit": deficit, "complexity": robust_z(deficit, trim=3.0)}


def knn_label_disagreement(embedding: Any, labels: Any, *, n_neighbors: int = 15) -> np.ndarray:
    """Share of each cell's ``n_neighbors`` nearest neighbours (Euclidean, the cell itself excluded)
    whose label differs from the cell's."""
    from sklearn.neighbors import NearestNeighbors

    emb = as_embedding(embedding, what="the embedding")
    y = _labels(labels, emb.shape[0])
    if n_neighbors < 1:
        raise ConfigError(f"n_neighbors must be >= 1, got {n_neighbors}.")
    k = min(n_neighbors, emb.shape[0] - 1)
    if k < 1:
        raise InputDataError("kNN label consistency needs at least 2 cells.")
    _, nbrs = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb)
    nbrs = nbrs[:, 1:]
    return (y[nbrs] != y[:, None]).mean(axis=1)


# ---- token level --------------------------------------------------------------------------------
def _gene_tokens(cells: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(rows, gene_ids, positions)`` of every gene token of rank-value tokenized ``cells``: its cell,
    its id and its 0-based position among the cell's gene tokens (``<cls>``/``<eos>``/``<pad>`` left out)."""
    from scforge.tokenize.ragged import TokenizedCells

    if not isinstance(cells, TokenizedCells) or cells.gene_ids is None or cells.values is not None:
        raise InputDataError("the token detectors read rank-value tokens (Geneformer's tokenizer output, values "
                             f"None); got {type(cells).__name__}. For expression matrices use audit().")
    specials = [cells.meta.get(k) for k in ("cls_id", "eos_id", "pad_id")]
    rows = np.repeat(np.arange(cells.n_cells), cells.lengths)
    keep = ~np.isin(cells.gene_ids, [int(v) for v in specials if v is not None])
    rows, genes = rows[keep], cells.gene_ids[keep].astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=cells.n_cells))[:-1]])
    return rows, genes, np.arange(rows.size) - starts[rows]


def gene_token_counts(cells: Any) -> np.ndarray:
    """Number of gene tokens of every cell of rank-value tokenized ``cells`` (special tokens left out)."""
    rows, _, _ = _gene_tokens(cells)
    return np.bincount(rows, minlength=cells.n_cells)


def _average_ranks(rows: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """0-based ranks of ``values`` within each row (ties share their mean rank)."""
    order = np.lexsort((values, rows))
    r, v = rows[order], values[order]
    starts = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=n))[:-1]])
    within = (np.arange(r.size) - starts[r]).astype(np.float64)
    group = np.cumsum(np.r_[True, (r[1:] != r[:-1]) | (v[1:] != v[:-1])]) - 1
    mean = np.bincount(group, weights=within) / np.bincount(group)
    out = np.empty(r.size)
    out[order] = mean[group]
    return out


def _row_pearson(rows: np.ndarray, a: np.ndarray, b: np.ndarray, n: int) -> np.ndarray:
    """Pearson correlation of ``a`` and ``b`` within each row (0 where either is constant or empty)."""
    size = np.maximum(np.bincount(rows, minlength=n), 1).astype(np.float64)

    def mean(w: np.ndarray) -> np.ndarray:
        return np.bincount(rows, weights=w, minlength=n) / size

    ma, mb = mean(a), mean(b)
    cov = mean(a * b) - ma * mb
    sd = np.sqrt(np.maximum(mean(a * a) - ma**2, 0.0) * np.maximum(mean(b * b) - mb**2, 0.0))
    return np.divide(cov, sd, out=np.zeros(n), where=sd > 1e-12)


def rank_consistency(cells: Any, *, min_cells: int = 5) -> np.ndarray:
    """Per cell: Spearman correlation between the positions of its gene tokens and those genes' median
    positions over the cells of the set that carry them. Rank-value encoding puts a gene at a similar
    position in most cells (clean PBMCs: about 0.6); a shuffled top-20 (scBackdoor's Geneformer
    trigger) gives about 0. Genes carried by fewer than ``min_cells`` cells are left out (their median
    is mostly the cell's own position); a cell with fewer than 3 usable genes gets 0."""
    if min_cells < 1:
        raise ConfigError(f"min_cells must be >= 1, got {min_cells}.")
    rows, genes, pos = _gene_tokens(cells)
    n = cells.n_cells
    if genes.size == 0:
        return np.zeros(n)
    order = np.lexsort((pos, genes))
    ids, first, counts = np.unique(genes[order], return_index=True, return_counts=True)
    sorted_pos = pos[order].astype(np.float64)
    median = (sorted_pos[first + (counts - 1) // 2] + sorted_pos[first + counts // 2]) / 2.0
    where = np.searchsorted(ids, genes)
    usable = counts[where] >= min_cells
    rows, pos, ref = rows[usable], pos[usable].astype(np.float64), median[where[usable]]
    corr = _row_pearson(rows, _average_ranks(rows, pos, n), _average_ranks(rows, ref, n), n)
    return np.where(np.bincount(rows, minlength=n) >= 3, corr, 0.0)


# ---- model level --------------------------------------------------------------------------------
def _by_class(embedding: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    emb = as_embedding(embedding, what="the model's cell embeddings").astype(np.float64)
    return emb, _labels(labels, emb.shape[0])


def spectral_signature_scores(embedding: Any, labels: Any) -> np.ndarray:
    """Spectral signatures: within each class, the absolute projection of the centred embeddings on
    their top singular vector (Tran et al. rank by its square; the order is the same), divided by the
    class's median so classes are comparable."""
    emb, y = _by_class(embedding, labels)
    out = np.zeros(y.size)
    for c in np.unique(y):
        m = y == c
        if m.sum() < 3:
            continue
        centred = emb[m] - emb[m].mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = np.abs(centred @ vt[0])
        med = np.median(proj)
        out[m] = proj / med if med > 0 else proj
    return out


def activation_clustering_scores(embedding: Any, labels: Any, *, n_components: int = 10,
                                 max_small_fraction: float = 0.35, seed: int = 0) -> dict[str, np.ndarray]:
    """Activation clustering: within each class, PCA to ``n_components`` and 2-means. Returns
    ``"score"`` (how much closer a cell is to the smaller cluster's centre than to the larger one's,
    in units of the class's median distance) and ``"flag"`` (in a smaller cluster holding at most
    ``max_small_fraction`` of its class)."""
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA

    emb, y = _by_class(embedding, labels)
    score, flag = np.zeros(y.size), np.zeros(y.size, dtype=bool)
    for c in np.unique(y):
        m = np.flatnonzero(y == c)
        if m.size < 6:
            continue
        k = min(n_components, m.size - 1, emb.shape[1])
        red = PCA(k, random_state=seed).fit_transform(emb[m])
        km = KMeans(2, n_init=10, random_state=seed).fit(red)
        sizes = np.bincount(km.labels_, minlength=2)
        small = int(np.argmin(sizes))
        d = np.linalg.norm(red[:, None, :] - km.cluster_centers_[None], axis=2)
        scale = np.median(d.min(axis=1)) or 1.0
        score[m] = (d[:, 1 - small] - d[:, small]) / scale
        if sizes[small] / m.size <= max_small_fraction:
            flag[m] = km.labels_ == small
    return {"score": score, "flag": flag}


def strip_entropy(predict_proba: Callable[[Any], np.ndarray], x: Any, clean_pool: Any, *, n_blends: int = 16,
                  alpha: float = 0.5, seed: int = 0) -> np.ndarray:
    """STRIP: blend every cell of ``x`` with ``n_blends`` random cells of ``clean_pool``
    (``(1 - alpha) * x + alpha * clean``, same genes) and return minus the mean prediction entropy
    (higher = the prediction survives blending = suspicious). ``predict_proba`` maps a cells x genes
    matrix to class probabilities."""
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha}.")
    x, pool = sp.csr_matrix(x, dtype=np.float64), sp.csr_matrix(clean_pool, dtype=np.float64)
    if x.shape[1] != pool.shape[1]:
        raise InputDataError(f"x has {x.shape[1]} genes but the clean pool {pool.shape[1]}; use the same genes.")
    rng = np.random.default_rng(seed)
    entropy = np.zeros(x.shape[0])
    for _ in range(n_blends):
        partners = pool[rng.integers(0, pool.shape[0], size=x.shape[0])]
        p = np.clip(np.asarray(predict_proba((1 - alpha) * x + alpha * partners), dtype=np.float64), 1e-12, 1.0)
        entropy += -(p * np.log(p)).sum(axis=1)
    return -entropy / n_blends


# ---- scoring detections ---------------------------------------------------------------------------
def detection_metrics(scores: np.ndarray, truth: np.ndarray, flagged: np.ndarray | None = None) -> dict[str, float]:
    """AUROC and average precision of ``scores`` against the known poisoned cells ``truth``, and
    precision / recall / F1 of the boolean ``flagged`` when given."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    truth = np.asarray(truth, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    out: dict[str, float] = {}
    if truth.any() and not truth.all():
        out["auroc"] = float(roc_auc_score(truth, scores))
        out["average_precision"] = float(average_precision_score(truth, scores))
    if flagged is not None:
        flagged = np.asarray(flagged, dtype=bool)
        tp = int((flagged & truth).sum())
        out["n_flagged"] = float(flagged.sum())
        out["precision"] = tp / flagged.sum() if flagged.any() else 0.0
        out["recall"] = tp / truth.sum() if truth.any() else 0.0
        p, r = out["precision"], out["recall"]
        out["f1"] = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return out
