"""Audit a fine-tuning set (and optionally a model) for poisoned cells.

>>> table = audit(adata, label_key="cell_type")                  # data-level detectors
>>> table = audit(adata, label_key="cell_type", model=annotator)  # + model-level detectors
>>> table.loc[table.flagged, ["score", "reasons"]]

Each detector's raw score is turned into a robust z-score (median / MAD; within the cell's class
for the class-relative ones); the combined ``score`` is the largest of the data-level ones, so one
detector that sees a cell as far out is enough. The model-level scores are reported next to them
and join the combined score only when asked (``combine=``): on ifnb with a weak fine-tuned model
they ranked poisoned cells worse than the data-level detectors and tripled the false alarms
(docs/results.md), and a small target class can be half poisoned, which hides the poison from
per-class methods. A cell is flagged when ``score > threshold`` (default 5 robust
standard deviations); ``reasons`` lists the detectors above it.

Detectors (see :mod:`scforge.security.detect`):

* ``level``: how well a cell's expressed-gene levels follow those genes' typical levels (Pearson
  correlation of log expression; scBackdoor's redistribution trigger destroys it). scforge's own.
* ``sparsity``: genes detected and Gini coefficient against the cell's class.
* ``complexity``: genes detected against the cell's total counts, over all cells (no labels), so
  poisons that outnumber the clean cells of their (target) class still stand out.
* ``anomaly``: the published ensemble (mean |z|, centroid distance, IsolationForest), rank-combined.
* ``knn``: share of the cell's PCA neighbours with another label.
* with a model: ``spectral`` (spectral signatures) and ``clusters`` (activation clustering) on the
  model's cell embeddings, grouped by the model's predicted class (or the label for a base model).

:func:`audit_tokens` audits a rank-value tokenized set (Geneformer's input, where scBackdoor's
Geneformer trigger lives) with the same table layout: ``rank`` (the order of a cell's gene tokens
against the genes' usual positions), ``length`` (far fewer gene tokens than the set's cells) and,
given an embedding of the cells, ``knn``.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge._inputs import obs_labels
from scforge.errors import ConfigError, InputDataError

__all__ = ["audit", "audit_tokens", "level_consistency", "DATA_DETECTORS", "MODEL_DETECTORS", "TOKEN_DETECTORS",
           "audit_summary"]

logger = logging.getLogger("scforge")

DATA_DETECTORS = ("level", "sparsity", "complexity", "anomaly", "knn")
MODEL_DETECTORS = ("spectral", "clusters")
TOKEN_DETECTORS = ("rank", "length", "knn")
_REASONS = {
    "level": "expression levels unlike the genes' usual levels",
    "sparsity": "far fewer genes / far more concentrated expression than its class",
    "complexity": "far fewer genes detected than cells with the same total",
    "anomaly": "outlier in the anomaly ensemble (mean |z|, centroid distance, IsolationForest)",
    "knn": "label disagrees with its expression neighbours",
    "spectral": "spectral signature of the model's embeddings within its class",
    "clusters": "in a small separate cluster of the model's embeddings within its class",
    "rank": "gene order unlike the genes' usual rank positions",
    "length": "far fewer gene tokens than the set's cells",
}


def level_consistency(x: Any, *, normalized: bool = False) -> np.ndarray:
    """Per cell: Pearson correlation, over the genes it expresses, between its log expression and the
    log of those genes' mean expression across all cells. Clean cells follow the usual levels (about
    0.8 on PBMCs); a redistributed cell does not (about 0). ``x``: counts (normalised to CP10k and
    log1p here) or, with ``normalized=True``, values already log-normalised."""
    from scforge.baselines import log1p_cp10k

    counts = sp.csr_matrix(x, dtype=np.float64)
    return _level_consistency(counts if normalized else log1p_cp10k(counts), normalized=normalized)


def _level_consistency(ln: sp.csr_matrix, *, normalized: bool) -> np.ndarray:
    """:func:`level_consistency` of the log-normalised matrix ``ln`` (log1p CP10k unless ``normalized``)."""
    gene_ref = np.asarray(ln.mean(axis=0)).ravel() if normalized else np.log1p(
        np.asarray(np.expm1(ln).mean(axis=0)).ravel())
    n = ln.shape[0]
    rows = np.repeat(np.arange(n), np.diff(ln.indptr))
    v, r = ln.data, gene_ref[ln.indices]
    size = np.maximum(np.bincount(rows, minlength=n), 1).astype(np.float64)

    def mean(w: np.ndarray) -> np.ndarray:
        return np.bincount(rows, weights=w, minlength=n) / size

    mv, mr = mean(v), mean(r)
    cov = mean(v * r) - mv * mr
    sd = np.sqrt(np.maximum(mean(v * v) - mv**2, 0.0) * np.maximum(mean(r * r) - mr**2, 0.0))
    return np.divide(cov, sd, out=np.zeros(n), where=sd > 1e-12)


def _expression(adata: Any, layer: str | None) -> tuple[sp.csr_matrix, bool]:
    from scforge.matrix import check_values, looks_like_counts

    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"layer {layer!r} not found; the AnnData has layers {list(adata.layers)}.")
    m = sp.csr_matrix(adata.layers[layer] if layer is not None else adata.X, dtype=np.float64)
    if m.shape[0] < 3:
        raise InputDataError(f"the audit needs at least 3 cells; the data has {m.shape[0]}.")
    check_values(m, f"the audit's expression ({'layer ' + repr(layer) if layer is not None else 'X'})")
    return m, looks_like_counts(m)


def _model_embedding(model: Any, adata: Any, layer: str | None, labels: np.ndarray, batch_size: int,
                     progress: bool) -> tuple[np.ndarray, np.ndarray]:
    """Cell embeddings of ``model`` (an Annotator or an scforge model) and the groups to score within."""
    from scforge.tasks.annotate import Annotator, backend_of

    if isinstance(model, Annotator):
        emb = model.backend.embed(adata, layer, batch_size=batch_size, progress=progress,
                                  max_length=model.settings.get("max_length"), seed=model.settings.get("seed", 0))
        if model.mode == "fine_tune":
            proba = model._proba(adata, layer=layer, batch_size=batch_size, progress=progress, device="auto",
                                 precision="auto", check_input=True)  # no writes into adata
            groups = proba.argmax(1)
            return emb, np.asarray(model.classes, dtype=object)[groups]
        return emb, labels
    if hasattr(model, "victim_embedding"):  # a security Victim (e.g. the logistic baseline)
        emb, groups = model.victim_embedding(adata, layer)
        return emb, groups
    emb = backend_of(model).embed(adata, layer, batch_size=batch_size, progress=progress)
    return emb, labels


def audit(
    adata: Any,
    label_key: str,
    *,
    layer: str | None = None,
    model: Any = None,
    detectors: tuple[str, ...] | None = None,
    threshold: float = 5.0,
    n_pcs: int = 50,
    n_neighbors: int = 15,
    embedding: Any = None,
    combine: tuple[str, ...] | None = None,
    batch_size: int = 64,
    progress: bool = False,
    seed: int = 0,
) -> pd.DataFrame:
    """Score every cell of ``adata`` for signs of poisoning; one row per cell (index: ``obs_names``).

    Columns: ``label``; for each detector ``D``, ``D`` (raw score, higher = more suspicious) and
    ``D_z`` (robust z); ``score`` (the largest z), ``flagged`` (``score > threshold``) and
    ``reasons``. ``model``: an :class:`~scforge.tasks.Annotator`, an scforge model, or a security
    victim, adding the model-level detectors. ``layer``: raw counts (or log-normalised values).
    ``combine``: the detectors whose z-scores make up ``score`` (default: the data-level ones; the
    model-level scores are still reported, see the module docstring). ``embedding``: the space of
    the ``knn`` detector, an ``obsm`` key or an array (default: 50 PCs of
    log1p CP10k).
    ``adata`` is not modified. ``table.attrs["summary"]`` holds per-class counts and settings."""
    from scforge.security.detect import (activation_clustering_scores, anomaly_ensemble, complexity_scores,
                                         knn_label_disagreement, robust_z, sparsity_scores,
                                         spectral_signature_scores, top_variance_pca)

    if not threshold > 0:
        raise ConfigError(f"threshold must be > 0, got {threshold}.")
    wanted = tuple(detectors) if detectors is not None else DATA_DETECTORS + (MODEL_DETECTORS if model else ())
    unknown = [d for d in wanted if d not in DATA_DETECTORS + MODEL_DETECTORS]
    if unknown:
        raise ConfigError(f"unknown detectors {unknown}; choose from {DATA_DETECTORS + MODEL_DETECTORS}.")
    if any(d in MODEL_DETECTORS for d in wanted) and model is None:
        raise ConfigError(f"detectors {MODEL_DETECTORS} need a model (model=...).")
    combine = check_combine(combine, wanted)
    labels = obs_labels(adata, label_key, what="the audit (it scores a labelled fine-tuning set)")
    x, is_counts = _expression(adata, layer)
    from scforge.baselines import log1p_cp10k

    logx = log1p_cp10k(x) if is_counts else x
    table = pd.DataFrame({"label": labels}, index=pd.Index(adata.obs_names.copy(), name="cell"))
    zs: dict[str, np.ndarray] = {}
    if "level" in wanted:
        table["level"] = -_level_consistency(logx, normalized=not is_counts)
        zs["level"] = robust_z(table["level"].to_numpy())
    if "sparsity" in wanted:
        sparse = sparsity_scores(x, labels)
        table["n_genes"], table["gini"] = sparse["n_genes"], sparse["gini"]
        table["sparsity"] = sparse["sparsity"]
        zs["sparsity"] = sparse["sparsity"]  # already robust z within class
    if "complexity" in wanted:
        cx = complexity_scores(x)
        table["complexity"] = cx["log_genes_deficit"]
        zs["complexity"] = cx["complexity"]  # already robust z over all cells
    pcs = top_variance_pca(logx, n_pcs, seed) if ("anomaly" in wanted or "knn" in wanted) else None
    if "anomaly" in wanted:
        ens = anomaly_ensemble(logx, labels, features=pcs, seed=seed)
        table["mean_abs_zscore"] = ens["mean_abs_z"]  # the ensemble's raw parts
        table["centroid_distance"], table["isolation"] = ens["centroid_distance"], ens["isolation"]
        table["anomaly"] = ens["anomaly"]
        zs["anomaly"] = robust_z(ens["anomaly"])
    if "knn" in wanted:
        space = pcs
        if embedding is not None:
            from scforge._inputs import as_embedding

            if isinstance(embedding, str):
                if embedding not in adata.obsm:
                    raise InputDataError(f"obsm has no {embedding!r}; keys are {list(adata.obsm)}.")
                embedding = adata.obsm[embedding]
            space = as_embedding(embedding, what="the kNN embedding")
            if space.shape[0] != adata.n_obs:
                raise InputDataError(f"the kNN embedding has {space.shape[0]} rows for {adata.n_obs} cells.")
        table["knn"] = knn_label_disagreement(space, labels, n_neighbors=n_neighbors)
        zs["knn"] = robust_z(table["knn"].to_numpy(), labels, min_scale=0.15)
    if any(d in MODEL_DETECTORS for d in wanted):
        emb, groups = _model_embedding(model, adata, layer, labels, batch_size, progress)
        table["model_group"] = groups
        if "spectral" in wanted:
            table["spectral"] = spectral_signature_scores(emb, groups)
            zs["spectral"] = robust_z(table["spectral"].to_numpy(), groups)
        if "clusters" in wanted:
            ac = activation_clustering_scores(emb, groups, seed=seed)
            table["clusters"], table["clusters_small"] = ac["score"], ac["flag"]
            # only classes with a small separate cluster count: elsewhere a 2-means split means nothing
            zs["clusters"] = np.where(_qualifies(ac["flag"], groups), robust_z(ac["score"], groups), 0.0)
    for name, z in zs.items():
        table[f"{name}_z"] = z
    names = [d for d in (combine if combine is not None else DATA_DETECTORS) if d in zs]
    if not names:
        names = list(zs)
    zmat = np.column_stack([zs[k] for k in names])
    table["score"] = zmat.max(axis=1)
    table["flagged"] = table["score"] > threshold
    table["reasons"] = ["; ".join(_REASONS[names[j]] for j in np.flatnonzero(row > threshold)) for row in zmat]
    table.attrs["summary"] = audit_summary(table, threshold=threshold, detectors=list(zs), label_key=label_key)
    table.attrs["summary"]["combined"] = names
    return table


def check_combine(combine: Any, wanted: tuple[str, ...]) -> tuple[str, ...] | None:
    """``combine`` as a tuple (None stays None), or :class:`ConfigError` when it is empty, a bare string
    or names a detector outside ``wanted`` (the detectors that will run), before any of them runs."""
    if combine is None:
        return None
    if isinstance(combine, str) or not len(combine):
        raise ConfigError(f"combine={combine!r}; give a list of detector names, e.g. ('level', 'complexity').")
    missing = sorted(set(combine) - set(wanted))
    if missing:
        hint = (" (the model-level ones need a model: model=..., or run_attack(model_level=True))"
                if set(missing) <= set(MODEL_DETECTORS) else "")
        raise ConfigError(f"combine={list(combine)} names detectors that are not run: {missing}{hint}; "
                          f"the run detectors are {list(wanted)}.")
    return tuple(combine)


def _qualifies(flag: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """True for the cells of groups where activation clustering found a small cluster."""
    hit = {g for g in np.unique(groups) if flag[groups == g].any()}
    return np.isin(groups, list(hit))


def audit_summary(table: pd.DataFrame, *, threshold: float, detectors: list[str], label_key: str) -> dict[str, Any]:
    """JSON-ready summary of an audit table: settings, totals and per-class counts."""
    per_class = table.groupby("label", observed=True).agg(n_cells=("flagged", "size"), n_flagged=("flagged", "sum"),
                                                          median_score=("score", "median"))
    per_class["share_flagged"] = per_class["n_flagged"] / per_class["n_cells"]
    by_reason = {d: int((table[f"{d}_z"] > threshold).sum()) for d in detectors}
    return {"label_key": label_key, "threshold": float(threshold), "detectors": detectors,
            "n_cells": int(len(table)), "n_flagged": int(table["flagged"].sum()), "flagged_by_detector": by_reason,
            "per_class": {str(k): {kk: (float(vv) if kk != "n_cells" and kk != "n_flagged" else int(vv))
                                   for kk, vv in row.items()} for k, row in per_class.iterrows()}}


def audit_tokens(
    cells: Any,
    labels: Any,
    *,
    detectors: tuple[str, ...] | None = None,
    embedding: Any = None,
    threshold: float = 5.0,
    n_neighbors: int = 15,
    min_cells: int = 5,
    length_scale: float = 0.1,
    label_key: str = "label",
) -> pd.DataFrame:
    """Score every cell of a rank-value tokenized fine-tuning set (a
    :class:`~scforge.tokenize.TokenizedCells` of Geneformer's tokenizer) for signs of poisoning; one row
    per cell (index: the cells' ``obs_names``), laid out as :func:`audit`'s table.

    Detectors: ``rank`` (minus :func:`~scforge.security.detect.rank_consistency`, robust z over the set),
    ``length`` (minus the log number of gene tokens, robust z over the set with a scale of at least
    ``length_scale``, so a set whose cells all reach ``max_length`` still has a scale) and ``knn``
    (:func:`~scforge.security.detect.knn_label_disagreement` in ``embedding``, an array with one row
    per cell, e.g. PCs of the cells' expression; robust z within the label). Default: all that can
    run (``knn`` only with an embedding). ``labels``: the set's labels, one per cell. Columns: ``label``,
    ``n_genes``, for each detector ``D`` its raw score and ``D_z``, ``score`` (the largest z),
    ``flagged`` (``score > threshold``), ``reasons``. ``table.attrs["summary"]`` as in :func:`audit`.
    Nothing is modified."""
    from scforge._inputs import as_embedding, as_text_labels
    from scforge.security.detect import gene_token_counts, knn_label_disagreement, rank_consistency, robust_z

    if not threshold > 0:
        raise ConfigError(f"threshold must be > 0, got {threshold}.")
    if not length_scale > 0:
        raise ConfigError(f"length_scale must be > 0, got {length_scale}.")
    wanted = tuple(detectors) if detectors is not None else TOKEN_DETECTORS[:2] + (("knn",) if embedding is not None
                                                                                   else ())
    unknown = [d for d in wanted if d not in TOKEN_DETECTORS]
    if unknown or not wanted:
        raise ConfigError(f"detectors={detectors}; choose one or more of {TOKEN_DETECTORS}.")
    if "knn" in wanted and embedding is None:
        raise ConfigError("the 'knn' detector needs an embedding of the cells (embedding=..., e.g. 50 PCs of "
                          "their log1p CP10k expression).")
    n_genes = gene_token_counts(cells)  # also checks that these are rank-value tokens
    if cells.n_cells < 3:
        raise InputDataError(f"the token audit needs at least 3 cells; the set has {cells.n_cells}.")
    y = as_text_labels(labels, n=cells.n_cells)
    table = pd.DataFrame({"label": y, "n_genes": n_genes},
                         index=pd.Index(np.asarray(cells.obs_names).astype(str), name="cell"))
    zs: dict[str, np.ndarray] = {}
    if "rank" in wanted:
        table["rank"] = -rank_consistency(cells, min_cells=min_cells)
        zs["rank"] = robust_z(table["rank"].to_numpy())
    if "length" in wanted:
        table["length"] = -np.log(np.maximum(n_genes, 1))
        zs["length"] = robust_z(table["length"].to_numpy(), min_scale=length_scale)
    if "knn" in wanted:
        space = as_embedding(embedding, what="the kNN embedding")
        if space.shape[0] != cells.n_cells:
            raise InputDataError(f"the kNN embedding has {space.shape[0]} rows for {cells.n_cells} cells.")
        table["knn"] = knn_label_disagreement(space, y, n_neighbors=n_neighbors)
        zs["knn"] = robust_z(table["knn"].to_numpy(), y, min_scale=0.15)
    names = list(zs)
    for name in names:
        table[f"{name}_z"] = zs[name]
    zmat = np.column_stack([zs[k] for k in names])
    table["score"] = zmat.max(axis=1)
    table["flagged"] = table["score"] > threshold
    table["reasons"] = ["; ".join(_REASONS[names[j]] for j in np.flatnonzero(row > threshold)) for row in zmat]
    table.attrs["summary"] = audit_summary(table, threshold=threshold, detectors=names, label_key=label_key)
    table.attrs["summary"]["combined"] = names
    table.attrs["summary"]["input"] = "rank-value tokens"
    return table
