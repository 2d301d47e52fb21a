"""Timing of ``scforge.metrics.integration_metrics`` against scib-metrics' functions called one by one.

Imported by the main benchmark (``from _scib_timing import time_metrics``); ``python
benchmarks/_scib_timing.py`` runs a quick check on the 2,000-cell ifnb subset.

- scforge: :func:`scforge.metrics.integration.integration_metrics` (scib-metrics' Benchmarker: one
  90-neighbour pynndescent graph per embedding, its first 15 / 50 columns reused), plus silhouette_batch.
- peer: the same metric set, each scib_metrics function called on its own as a user would, every
  kNN-based metric computing its own neighbours with ``scib_metrics.nearest_neighbors.pynndescent``
  (what Benchmarker uses, same seed): cLISI and iLISI with 90 neighbours, kBET with 50, graph
  connectivity (and Leiden) with 15 (``peer_neighbors="own_k"``, the default). With
  ``peer_neighbors="k90"`` each of them computes 90 neighbours and keeps the first k, exactly as
  Benchmarker does, so the values must agree to float rounding; with "own_k" the kNN metrics can
  differ slightly because an approximate 15-neighbour search is not the first 15 columns of a
  90-neighbour one (on ifnb 2,000: 0.4% of the 15-NN entries differ).

jax and numba compile per process (and jax per array shape): a warm-up run of each side on the same
inputs, untimed, comes first, so both are timed warm (scib's k-means still recompiles on every call,
~1.3 s per embedding, on both sides). Then the two alternate
``repeats`` times; medians reported.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the stdlib `tokenize` when this folder is on the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
if __name__ == "__main__":
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Mapping, Sequence  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402

KNN_METRICS = ("clisi", "ilisi", "kbet", "graph_connectivity")


def peer_metrics(embeddings: Mapping[str, np.ndarray], labels: Sequence[Any], batches: Sequence[Any],
                 unintegrated: str | None, *, clustering: str = "kmeans", seed: int = 0, n_jobs: int = 1,
                 peer_neighbors: str = "own_k") -> tuple[dict[str, dict[str, float]], float]:
    """Every metric of ``integration_metrics`` from scib_metrics' functions one by one, each kNN metric
    with its own neighbour search. Returns ({embedding: {metric: value}}, seconds spent in pynndescent)."""
    import scib_metrics as sm
    from scib_metrics.nearest_neighbors import pynndescent

    if peer_neighbors not in ("own_k", "k90"):
        raise ValueError(f"peer_neighbors must be 'own_k' or 'k90', got {peer_neighbors!r}")
    labels, batches = np.asarray(labels), np.asarray(batches)
    nn_seconds = 0.0

    def neighbours(x: np.ndarray, k: int):
        nonlocal nn_seconds
        t0 = time.perf_counter()
        if peer_neighbors == "own_k":
            out = pynndescent(x, n_neighbors=k, random_state=seed, n_jobs=n_jobs)
        else:
            out = pynndescent(x, n_neighbors=90, random_state=seed, n_jobs=n_jobs).subset_neighbors(k)
        nn_seconds += time.perf_counter() - t0
        return out

    pre = None if unintegrated is None else np.array(embeddings[unintegrated], dtype=np.float32)
    results: dict[str, dict[str, float]] = {}
    for name, emb in embeddings.items():
        x = np.array(emb, dtype=np.float32)  # own copy: scib's k-means centres its input in place
        if clustering == "kmeans":
            nmi_ari = sm.nmi_ari_cluster_labels_kmeans(x.copy(), labels)
        else:
            nmi_ari = sm.nmi_ari_cluster_labels_leiden(neighbours(x, 15), labels, seed=seed, n_jobs=n_jobs)
        results[name] = {
            "nmi": nmi_ari["nmi"], "ari": nmi_ari["ari"],
            "silhouette_label": sm.silhouette_label(x, labels),
            "clisi": sm.clisi_knn(neighbours(x, 90), labels),
            "isolated_labels": sm.isolated_labels(x, labels, batches),
            "bras": sm.bras(x, labels, batches),
            "ilisi": sm.ilisi_knn(neighbours(x, 90), batches),
            "kbet": sm.kbet_per_label(neighbours(x, 50), batches, labels),
            "graph_connectivity": sm.graph_connectivity(neighbours(x, 15), labels),
            "pcr": float("nan") if pre is None else sm.pcr_comparison(pre, x, batches, categorical=True),
            "silhouette_batch": sm.silhouette_batch(x, labels, batches),
        }
        results[name] = {k: float(v) for k, v in results[name].items()}
    return results, nn_seconds


def time_metrics(embeddings: Mapping[str, np.ndarray], labels: Sequence[Any], batches: Sequence[Any],
                 unintegrated: str | None, *, clustering: str = "kmeans", seed: int = 0, n_jobs: int = 1,
                 repeats: int = 1, peer_neighbors: str = "own_k") -> dict[str, Any]:
    """Seconds of ``integration_metrics`` (neighbours once per embedding) and of the one-by-one peer,
    the speedup (peer / scforge) and the largest absolute difference between their values (overall,
    per metric, and over the non-kNN metrics)."""
    from scforge.metrics.integration import integration_metrics

    kwargs = dict(unintegrated=unintegrated, clustering=clustering, seed=seed, n_jobs=n_jobs)
    peer_kwargs = dict(clustering=clustering, seed=seed, n_jobs=n_jobs, peer_neighbors=peer_neighbors)
    t0 = time.perf_counter()
    # warm-up of both sides: jax (per shape) and numba compilation; the peer's neighbour searches with
    # 15 / 50 neighbours still compile numba code after a Benchmarker run
    integration_metrics(embeddings, labels, batches, **kwargs)
    peer_metrics(embeddings, labels, batches, unintegrated, **peer_kwargs)
    warmup = time.perf_counter() - t0
    ours_s, peer_s, peer_nn_s = [], [], []
    report = peer = None
    for _ in range(max(1, int(repeats))):
        t0 = time.perf_counter()
        peer, nn_s = peer_metrics(embeddings, labels, batches, unintegrated, **peer_kwargs)
        peer_s.append(time.perf_counter() - t0)
        peer_nn_s.append(nn_s)
        t0 = time.perf_counter()
        report = integration_metrics(embeddings, labels, batches, **kwargs)
        ours_s.append(time.perf_counter() - t0)
    diffs: dict[str, float] = {}
    for name, values in peer.items():
        for metric, value in values.items():
            got = float(report.table.loc[name, metric])
            if np.isnan(got) and np.isnan(value):
                continue
            diffs[metric] = max(diffs.get(metric, 0.0), abs(got - value) if np.isfinite(got - value) else np.inf)
    ours, theirs = statistics.median(ours_s), statistics.median(peer_s)
    return {
        "n_cells": int(report.n_cells), "n_embeddings": len(embeddings), "clustering": clustering,
        "peer_neighbors": peer_neighbors, "repeats": len(ours_s),
        "scforge_s": ours, "peer_s": theirs, "speedup": theirs / ours,
        "peer_neighbor_search_s": statistics.median(peer_nn_s), "warmup_s": warmup,
        "scforge_runs_s": ours_s, "peer_runs_s": peer_s,
        "max_abs_diff": max(diffs.values()), "max_abs_diff_by_metric": diffs,
        "max_abs_diff_non_knn": max(v for k, v in diffs.items() if k not in KNN_METRICS),
        "table": report.table,
    }


def _ifnb_quick() -> None:  # pragma: no cover - manual check
    import json
    from pathlib import Path

    import anndata as ad
    import scanpy as sc

    path = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
    adata = ad.read_h5ad(path)
    lognorm = ad.AnnData(adata.layers["lognorm"].copy())
    sc.pp.pca(lognorm, n_comps=30, random_state=0)
    pca = np.asarray(lognorm.obsm["X_pca"], dtype=np.float32)
    stim = adata.obs["stim"].to_numpy().astype(str)
    centred = pca.copy()
    for b in np.unique(stim):
        centred[stim == b] -= pca[stim == b].mean(axis=0) - pca.mean(axis=0)
    embs = {"pca": pca, "centred": centred,
            "random": np.random.default_rng(0).normal(size=pca.shape).astype(np.float32)}
    labels = adata.obs["seurat_annotations"].to_numpy().astype(str)
    for mode in ("own_k", "k90"):
        out = time_metrics(embs, labels, stim, "pca", peer_neighbors=mode)
        table = out.pop("table")
        print(json.dumps(out, indent=1, default=float))
    print(table.T.to_string())


if __name__ == "__main__":
    _ifnb_quick()
