"""Batch-integration scores of cell embeddings on scib-metrics, plus the scGPT paper's AvgBIO / AvgBATCH.

One call scores several embeddings of the same cells. scib-metrics' ``Benchmarker`` computes the
neighbour graph of each embedding once (90 neighbours; the 15- and 50-neighbour graphs are its
first columns) and then every metric from it:

- bio conservation: NMI and ARI of k-means (k = number of labels) or Leiden clusters against the
  labels, ``silhouette_label`` ((s + 1) / 2), cLISI, isolated labels;
- batch correction: BRAS, iLISI, kBET per label, graph connectivity, PCR comparison (only with an
  ``unintegrated`` embedding to compare against), and ``silhouette_batch`` (scib's 1 - |s| per label;
  computed beside the Benchmarker, it needs no neighbours);
- ``avg_bio`` = mean(NMI, ARI, silhouette_label) and ``avg_batch`` = mean(silhouette_batch, graph
  connectivity), as defined by scGPT (Cui et al. 2024);
- scib-metrics' own unscaled aggregates: ``bio_conservation`` / ``batch_correction`` (means of their
  metrics, ``silhouette_batch`` not included, NaN metrics skipped) and ``total`` = 0.4 batch + 0.6 bio.

scib-metrics (with jax) is imported only when scores are computed.
"""

from __future__ import annotations

import gc
import logging
import math
import numbers
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from scforge._inputs import as_embedding, as_labels
from scforge.errors import ConfigError, InputDataError

__all__ = ["IntegrationReport", "avg_batch", "avg_bio", "integration_metrics", "integration_metrics_adata"]

#: Columns of ``IntegrationReport.table``, in order.
METRIC_COLUMNS = (
    "nmi", "ari", "silhouette_label", "clisi", "isolated_labels",
    "bras", "ilisi", "kbet", "graph_connectivity", "pcr", "silhouette_batch",
    "avg_bio", "avg_batch", "bio_conservation", "batch_correction", "total",
)
#: The largest neighbour count Benchmarker uses (LISI); the graph needs more cells than this.
MAX_NEIGHBORS = 90
MIN_CELLS = MAX_NEIGHBORS + 1
CLUSTERINGS = ("kmeans", "leiden")
NEIGHBOR_METHODS = ("pynndescent", "exact")

# scib-metrics' raw result names (get_results(clean_names=False)) -> ours
_SCIB_NAMES = {
    "isolated_labels": "isolated_labels", "silhouette_label": "silhouette_label", "clisi_knn": "clisi",
    "nmi_ari_cluster_labels_kmeans_nmi": "nmi", "nmi_ari_cluster_labels_kmeans_ari": "ari",
    "nmi_ari_cluster_labels_leiden_nmi": "nmi", "nmi_ari_cluster_labels_leiden_ari": "ari",
    "bras": "bras", "ilisi_knn": "ilisi", "kbet_per_label": "kbet", "graph_connectivity": "graph_connectivity",
    "pcr_comparison": "pcr", "Bio conservation": "bio_conservation", "Batch correction": "batch_correction",
    "Total": "total",
}


@dataclass
class IntegrationReport:
    """Scores per embedding. ``table``: one row per embedding (index = its name), one column per
    metric (``METRIC_COLUMNS``; all higher-is-better, unscaled across embeddings). A metric that was
    not computed is NaN and ``notes`` says why (e.g. ``pcr`` without ``unintegrated``)."""

    table: pd.DataFrame
    n_cells: int
    n_labels: int
    n_batches: int
    clustering: str
    neighbors: str
    unintegrated: str | None
    notes: list[str] = field(default_factory=list)

    def tidy(self) -> pd.DataFrame:
        """Long form: columns ``embedding``, ``metric``, ``value`` (embeddings in input order)."""
        long = self.table.rename_axis("embedding").reset_index().melt(
            id_vars="embedding", var_name="metric", value_name="value")
        order = {name: i for i, name in enumerate(self.table.index)}
        metric_order = {name: i for i, name in enumerate(self.table.columns)}
        long = long.sort_values(by=["embedding", "metric"],
                                key=lambda s: s.map(order) if s.name == "embedding" else s.map(metric_order))
        long["value"] = long["value"].astype(float)
        return long.reset_index(drop=True)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: settings, ``notes`` and ``metrics`` {embedding: {metric: value}}
        (non-finite values -> None)."""
        return {
            "n_cells": int(self.n_cells), "n_labels": int(self.n_labels), "n_batches": int(self.n_batches),
            "clustering": self.clustering, "neighbors": self.neighbors, "unintegrated": self.unintegrated,
            "notes": list(self.notes),
            "metrics": {str(emb): {m: _finite(v) for m, v in row.items()} for emb, row in self.table.iterrows()},
        }

    def __str__(self) -> str:
        head = (f"{self.n_cells} cells, {self.n_labels} labels, {self.n_batches} batches; "
                f"{self.clustering} clustering, {self.neighbors} neighbours")
        cols = ["avg_bio", "avg_batch", "bio_conservation", "batch_correction", "total"]
        return "\n".join([head, self.table[cols].to_string(float_format=lambda v: f"{v:.3f}"), *self.notes])


def _finite(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _number(value: Any, name: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r} ({type(value).__name__}).")
    x = float(value)
    if math.isfinite(x) and not low - 1e-6 <= x <= high + 1e-6:  # slack for float32 scores
        raise ConfigError(f"{name} = {x} is outside [{low}, {high}]; pass the score in scib's scaled form "
                          "(silhouettes as (s + 1) / 2 for labels, 1 - |s| for batches).")
    return x


def avg_bio(nmi: float, ari: float, asw_label: float) -> float:
    """scGPT's AvgBIO: mean of NMI, ARI and ASW_cell (label silhouette scaled to 0..1 as (s + 1) / 2).
    NaN in, NaN out."""
    parts = (_number(nmi, "nmi", 0.0, 1.0), _number(ari, "ari", -1.0, 1.0),
             _number(asw_label, "asw_label", 0.0, 1.0))
    return float(sum(parts) / 3.0)


def avg_batch(asw_batch: float, graph_connectivity: float) -> float:
    """scGPT's AvgBATCH: mean of ASW_batch (scib's batch silhouette, 1 - |s| per label) and graph
    connectivity. NaN in, NaN out."""
    parts = (_number(asw_batch, "asw_batch", 0.0, 1.0), _number(graph_connectivity, "graph_connectivity", 0.0, 1.0))
    return float(sum(parts) / 2.0)


# ---------------------------------------------------------------- input checks

def _per_cell(values: Any, name: str) -> np.ndarray:
    """One value per cell as integer codes (sorted order of the values); rejects missing values."""
    if values is None:
        raise ConfigError(f"{name} is None; pass one {name[:-1] if name.endswith('es') else name} value per cell.")
    arr = as_labels(values, what=name, hint=f"subset to the cells that have a {name[:-1] if name.endswith('s') else name} "
                    "first, e.g. adata[adata.obs[key].notna()]")
    # codes in the sorted order of the values, so scib-metrics loops over labels in the same order as when
    # called on the values themselves (its kbet_per_label result depends on that order)
    uniques = list(pd.unique(arr))
    try:
        ordered = sorted(uniques)
    except TypeError:  # mixed types: order by their text
        ordered = sorted(uniques, key=lambda v: (str(v), type(v).__name__))
    code = {v: i for i, v in enumerate(ordered)}
    return np.fromiter((code[v] for v in arr), dtype=np.int64, count=arr.size)


def _check_inputs(embeddings: Any, labels: Any, batches: Any, unintegrated: str | None,
                  clustering: str, neighbors: str, n_jobs: Any, seed: Any
                  ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    if clustering not in CLUSTERINGS:
        raise ConfigError(f"clustering must be one of {CLUSTERINGS}, got {clustering!r}.")
    if neighbors not in NEIGHBOR_METHODS:
        raise ConfigError(f"neighbors must be one of {NEIGHBOR_METHODS}, got {neighbors!r}.")
    if isinstance(n_jobs, bool) or not isinstance(n_jobs, numbers.Integral) or not (n_jobs >= 1 or n_jobs == -1):
        raise ConfigError(f"n_jobs must be a positive integer or -1 (all cores), got {n_jobs!r}.")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}.")
    if not isinstance(embeddings, Mapping):
        raise ConfigError("embeddings must be a mapping {name: [cells, dims] array}, got "
                          f"{type(embeddings).__name__}; e.g. {{'scGPT': emb}}.")
    if len(embeddings) == 0:
        raise ConfigError("embeddings is empty; pass at least one {name: [cells, dims] array}.")
    for key in embeddings:
        if not isinstance(key, str) or not key:
            raise ConfigError(f"embedding names must be non-empty strings, got {key!r}.")
    if unintegrated is not None and unintegrated not in embeddings:
        raise ConfigError(f"unintegrated={unintegrated!r} is not one of the embeddings {list(embeddings)}; name "
                          "the entry holding the pre-integration embedding (e.g. PCA of the log-normalised data), "
                          "or pass None to skip PCR comparison.")
    # float32 copies: the caller's arrays are never handed to scib-metrics, whose k-means centres its input
    # in place
    embs = {key: as_embedding(value, what=f"embedding {key!r}", dtype=np.float32)
            for key, value in embeddings.items()}
    sizes = {key: x.shape[0] for key, x in embs.items()}
    if len(set(sizes.values())) > 1:
        raise InputDataError(f"embeddings have different numbers of cells: {sizes}; every embedding must hold "
                             "the same cells in the same order.")
    n = next(iter(sizes.values()))
    lab = _per_cell(labels, "labels")
    bat = _per_cell(batches, "batches")
    for name, arr in (("labels", lab), ("batches", bat)):
        if arr.size != n:
            raise InputDataError(f"{name} has {arr.size} values but the embeddings have {n} cells; give one "
                                 "per cell, in the embeddings' order.")
    if n < MIN_CELLS:
        raise InputDataError(f"{n} cells is too few: scib-metrics' Benchmarker builds a {MAX_NEIGHBORS}-neighbour "
                             f"graph (LISI), which needs at least {MIN_CELLS} cells.")
    if np.unique(lab).size < 2:
        raise InputDataError("labels has a single distinct value; bio-conservation metrics (NMI, ARI, "
                             "silhouettes, cLISI) need at least two cell types.")
    if np.unique(bat).size < 2:
        raise InputDataError("batches has a single distinct value; batch-correction metrics need at least two "
                             "batches.")
    pairs = pd.DataFrame({"label": lab, "batch": bat})
    per_label = pairs.groupby("label").agg(n_cells=("batch", "size"), n_batches=("batch", "nunique"))
    usable = (per_label["n_batches"] > 1) & (per_label["n_batches"] < per_label["n_cells"])
    if not usable.any():
        raise InputDataError(
            "no label occurs in two batches (with more cells than batches): labels and batches are confounded, "
            "so the within-label batch metrics (BRAS, silhouette_batch, kBET) are undefined. Score data where "
            "at least one cell type is present in several batches.")
    return embs, lab, bat


# ---------------------------------------------------------------- scoring

def _neighbor_computer(method: str, seed: int, n_jobs: int):
    """``f(X, k) -> NeighborsResults`` (self included as the first neighbour)."""
    from scib_metrics.nearest_neighbors import NeighborsResults, pynndescent

    if method == "pynndescent":
        def compute(x: np.ndarray, k: int) -> NeighborsResults:
            return pynndescent(x, n_neighbors=k, random_state=seed, n_jobs=n_jobs)
    else:
        from sklearn.neighbors import NearestNeighbors

        def compute(x: np.ndarray, k: int) -> NeighborsResults:
            x = np.asarray(x, dtype=np.float32)  # the embedding's own values (Benchmarker holds float64 copies)
            dist, idx = NearestNeighbors(n_neighbors=k, n_jobs=n_jobs).fit(x).kneighbors(x)
            return NeighborsResults(indices=idx, distances=dist.astype(np.float32))
    return compute


@contextmanager
def _scib_session(quiet: bool) -> Iterator[None]:
    """Around a Benchmarker run: silence scib-metrics' INFO lines (one per label kBET skips) unless
    progress is wanted, and numpy's warning for an all-NaN kBET; freeze the objects alive now out of
    the garbage collector. Benchmarker calls ``gc.collect()`` before every metric; in a process holding
    jax/scanpy (~600k objects) each call takes ~0.4 s, more than the neighbour search it saves on a few
    thousand cells. Objects created during the run are still collected. No freeze if the caller already
    uses ``gc.freeze``."""
    logger = logging.getLogger("scib_metrics")
    old = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.collect()
        gc.freeze()
    try:
        with warnings.catch_warnings():
            # kBET of an embedding where no label can be tested: NaN, reported in the notes instead
            warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
            yield
    finally:
        if freeze:
            gc.unfreeze()
        logger.setLevel(old)


def integration_metrics(embeddings: Mapping[str, Any], labels: Sequence[Any] | np.ndarray | pd.Series,
                        batches: Sequence[Any] | np.ndarray | pd.Series, *, unintegrated: str | None = None,
                        clustering: str = "kmeans", neighbors: str = "pynndescent", n_jobs: int = 1,
                        seed: int = 0, progress: bool = False, score_unintegrated: bool = True) -> IntegrationReport:
    """Score embeddings of the same cells for batch integration (scib-metrics) and scGPT's AvgBIO/AvgBATCH.

    ``embeddings``: {name: [cells, dims]}, same cells in the same order; ``labels`` (cell types) and
    ``batches``: one per cell, no missing values. ``unintegrated`` names the entry of ``embeddings``
    that is the pre-integration embedding, used by PCR comparison (without it ``pcr`` is NaN and a note
    says so); ``score_unintegrated=False`` uses it for PCR only and leaves its own row out (no metrics
    are computed for it, e.g. when its scores are already known). ``clustering``: "kmeans" (scib-metrics' jax k-means, k = number of labels, its fixed seed
    0) or "leiden" (best NMI over 10 resolutions, seeded by ``seed``). ``neighbors``: "pynndescent"
    (Benchmarker's default, approximate, seeded by ``seed``) or "exact" (scikit-learn). Each embedding's
    neighbour graph is computed once. Embeddings are scored as float32 copies; labels and batches as
    codes in the sorted order of their values, so every score equals scib-metrics' function called on
    the same arrays (its kBET per label depends on the label order: after the first label with fewer
    than 101 cells it keeps that label's smaller number of diffusion components for the labels after)."""
    embs, lab, bat = _check_inputs(embeddings, labels, batches, unintegrated, clustering, neighbors, n_jobs, seed)
    import anndata as ad
    import scib_metrics
    from scib_metrics.benchmark import BatchCorrection, Benchmarker, BioConservation

    keys = {name: f"emb{i}" for i, name in enumerate(embs)}
    names = [name for name in embs if score_unintegrated or name != unintegrated]
    if not names:
        raise ConfigError("score_unintegrated=False leaves no embedding to score; add the embeddings to compare.")
    n = lab.size
    adata = ad.AnnData(obs=pd.DataFrame({"label": lab, "batch": bat}, index=[str(i) for i in range(n)]))
    # float64 copies of the float32 values: every scib-metrics step converts them back to float32 (same
    # numbers), and its k-means, which centres a float32 C-ordered input in place, then works on a copy
    for name, x in embs.items():
        adata.obsm[keys[name]] = x.astype(np.float64)
    leiden = {"n_jobs": n_jobs, "seed": int(seed)} if clustering == "leiden" else False
    bio = BioConservation(nmi_ari_cluster_labels_kmeans=clustering == "kmeans", nmi_ari_cluster_labels_leiden=leiden)
    batch = BatchCorrection(pcr_comparison=unintegrated is not None)
    # PCR's pre-integration embedding; without PCR it is unused, but naming one stops Benchmarker's PCA
    pre_key = keys[unintegrated] if unintegrated is not None else keys[names[0]]
    notes = []
    if unintegrated is None:
        notes.append("pcr: not computed (PCR comparison needs the pre-integration embedding; pass unintegrated=).")
    with _scib_session(quiet=not progress):
        sil_batch = {name: float(scib_metrics.silhouette_batch(embs[name], lab, bat)) for name in names}
        bench = Benchmarker(adata, batch_key="batch", label_key="label",
                            embedding_obsm_keys=[keys[name] for name in names],
                            bio_conservation_metrics=bio, batch_correction_metrics=batch,
                            pre_integrated_embedding_obsm_key=pre_key, n_jobs=n_jobs, progress_bar=progress)
        bench.prepare(neighbor_computer=_neighbor_computer(neighbors, int(seed), n_jobs))
        bench.benchmark()
        raw = bench.get_results(min_max_scale=False, clean_names=False)
    raw = raw.drop(index="Metric Type").rename(columns=_SCIB_NAMES)
    table = pd.DataFrame(index=pd.Index(names, name="embedding"), columns=list(METRIC_COLUMNS), dtype=float)
    for name in names:
        row = raw.loc[keys[name]]
        for col in raw.columns:
            if col in table.columns:
                table.loc[name, col] = float(row[col])
        table.loc[name, "silhouette_batch"] = sil_batch[name]
        table.loc[name, "avg_bio"] = avg_bio(table.loc[name, "nmi"], table.loc[name, "ari"],
                                             table.loc[name, "silhouette_label"])
        table.loc[name, "avg_batch"] = avg_batch(sil_batch[name], table.loc[name, "graph_connectivity"])
    for name in names:
        if math.isnan(table.loc[name, "kbet"]):
            notes.append(f"kbet: NaN for {name!r} (no label had >= 10 cells from several batches); scib-metrics' "
                         "batch_correction averages the other batch metrics.")
    return IntegrationReport(table=table, n_cells=int(n), n_labels=int(np.unique(lab).size),
                             n_batches=int(np.unique(bat).size), clustering=clustering, neighbors=neighbors,
                             unintegrated=unintegrated, notes=notes)


def integration_metrics_adata(adata: Any, obsm_keys: Sequence[str], label_key: str, batch_key: str,
                              **kwargs: Any) -> IntegrationReport:
    """:func:`integration_metrics` on ``adata.obsm[k]`` for each of ``obsm_keys``, with labels and batches
    from ``adata.obs[label_key]`` / ``adata.obs[batch_key]``; ``unintegrated`` (in ``kwargs``) names one of
    ``obsm_keys``. ``adata`` is not modified."""
    if not hasattr(adata, "obsm") or not hasattr(adata, "obs"):
        raise ConfigError(f"adata must be an AnnData, got {type(adata).__name__}.")
    if isinstance(obsm_keys, str):
        obsm_keys = [obsm_keys]
    obsm_keys = list(obsm_keys)
    if not obsm_keys:
        raise ConfigError("obsm_keys is empty; name the adata.obsm embeddings to score.")
    if len(set(obsm_keys)) != len(obsm_keys):
        raise ConfigError(f"obsm_keys has duplicates: {obsm_keys}.")
    missing = [k for k in obsm_keys if k not in adata.obsm]
    if missing:
        raise ConfigError(f"adata.obsm has no {missing}; it holds {list(adata.obsm.keys())}.")
    for what, key in (("label_key", label_key), ("batch_key", batch_key)):
        if key not in adata.obs.columns:
            raise ConfigError(f"{what}={key!r} is not a column of adata.obs; columns: {list(adata.obs.columns)}.")
    unintegrated = kwargs.get("unintegrated")
    if unintegrated is not None and unintegrated not in obsm_keys:
        raise ConfigError(f"unintegrated={unintegrated!r} must be one of obsm_keys {obsm_keys}; add it there "
                          "(it is then scored too, as the baseline row).")
    embeddings = {k: adata.obsm[k] for k in obsm_keys}
    return integration_metrics(embeddings, adata.obs[label_key], adata.obs[batch_key], **kwargs)
