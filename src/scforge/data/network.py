"""Gene networks: a square gene x gene weight table and what every GRN method derives from it.

:class:`GeneNetwork` holds the weights (cosine similarity of gene embeddings, rank-normalised
attention, correlation, or a difference of two of them). From it come an edge list (weights above a
threshold or the top-k per gene), gene programs (Leiden clusters of the kNN graph of the weights),
weighted degrees, and the outputs: ``uns`` of an AnnData, a CSV file, geneRNIB's prediction format.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError

logger = logging.getLogger("scforge")

EDGE_COLUMNS = ["source", "target", "weight"]
PROGRAM_COLUMNS = ["program", "gene", "size"]


@dataclass(frozen=True)
class GeneNetwork:
    """Weights between genes: ``weights.loc[a, b]`` is the edge a -> b (``directed``) or a -- b.

    ``method`` names how it was built; ``info`` holds run details (cells used, genes dropped...)."""

    weights: pd.DataFrame
    method: str
    directed: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = self.weights
        if not isinstance(w, pd.DataFrame) or w.shape[0] != w.shape[1] or w.shape[0] < 2:
            raise InputDataError(f"a gene network needs a square gene x gene DataFrame of at least 2 genes; got "
                                 f"{type(w).__name__} of shape {getattr(w, 'shape', None)}.")
        if not w.index.equals(w.columns) or not w.index.is_unique:
            raise InputDataError("the weights' rows and columns must be the same unique gene names, in the same "
                                 "order.")
        if not np.isfinite(w.to_numpy(dtype=np.float64)).all():
            raise InputDataError(f"the {self.method} network holds NaN or inf weights; drop those genes first.")

    @property
    def genes(self) -> list[str]:
        return [str(g) for g in self.weights.index]

    def __repr__(self) -> str:
        kind = "directed" if self.directed else "undirected"
        return f"GeneNetwork({self.method!r}, {len(self.genes)} genes, {kind})"

    def __sub__(self, other: GeneNetwork) -> GeneNetwork:
        """``self - other`` over the same genes (e.g. STIM - CTRL)."""
        if not isinstance(other, GeneNetwork):
            return NotImplemented
        if self.genes != other.genes:
            raise ConfigError("the two networks hold different genes (or a different order); build both on the "
                              "same gene list.")
        return GeneNetwork(self.weights - other.weights, f"{self.method} difference",
                           directed=self.directed or other.directed, info={"a": self.info, "b": other.info})

    def edges(self, *, threshold: float | None = None, top_k: int | None = None, absolute: bool = False,
              ) -> pd.DataFrame:
        """Edge list ``source, target, weight`` sorted by strength (``|weight|`` when ``absolute``).

        ``threshold`` keeps edges stronger than it; ``top_k`` keeps each gene's ``top_k`` strongest
        edges (of its row: outgoing edges when directed); both may be given. Undirected networks
        list each pair once and directed ones each ordered pair; self-edges are never listed."""
        if threshold is None and top_k is None:
            raise ConfigError("give threshold= (e.g. 0.4, scGPT's tutorial) and/or top_k= (edges per gene).")
        w = self.weights.to_numpy(dtype=np.float64)
        score = np.abs(w) if absolute else w.copy()
        n = score.shape[0]
        keep = ~np.eye(n, dtype=bool)
        if threshold is not None:
            keep &= score > float(threshold)
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
                raise ConfigError(f"top_k must be an integer >= 1, got {top_k!r}")
            masked = np.where(keep, score, -np.inf)
            order = np.argsort(-masked, axis=1, kind="stable")[:, : min(int(top_k), n - 1)]
            chosen = np.zeros_like(keep)
            np.put_along_axis(chosen, order, True, axis=1)
            keep &= chosen
        if not self.directed:
            keep = np.triu(keep | keep.T, k=1)
        rows, cols = np.nonzero(keep)
        order = np.lexsort((cols, rows, -score[rows, cols]))
        rows, cols = rows[order], cols[order]
        genes = np.asarray(self.genes, dtype=object)
        return pd.DataFrame({"source": genes[rows], "target": genes[cols], "weight": w[rows, cols]})

    def weighted_degree(self, *, absolute: bool = True) -> pd.Series:
        """Sum of each gene's edge weights (in + out for directed networks; no self-edges), ``|w|`` by default."""
        w = self.weights.to_numpy(dtype=np.float64).copy()
        np.fill_diagonal(w, 0.0)
        if absolute:
            w = np.abs(w)
        degree = w.sum(axis=1) + (w.sum(axis=0) if self.directed else 0.0)
        return pd.Series(degree, index=pd.Index(self.genes, name="gene"), name="weighted_degree")

    def programs(self, *, n_neighbors: int = 15, resolution: float = 1.0, min_size: int = 5, seed: int = 0,
                 ) -> pd.DataFrame:
        """Gene programs: Leiden clusters (``resolution``, seeded) of the kNN graph of the weights.

        Each gene links to its ``n_neighbors`` most similar genes (directed weights are averaged
        with their transpose first; only positive weights become edges). Clusters of at least
        ``min_size`` genes are kept, numbered 0, 1, ... from the largest. Columns ``program, gene, size``."""
        return leiden_programs(self.weights, n_neighbors=n_neighbors, resolution=resolution, min_size=min_size,
                               seed=seed, symmetrise=self.directed)


def knn_graph(similarity: np.ndarray, n_neighbors: int) -> sp.csr_matrix:
    """Symmetric kNN graph: each row's ``n_neighbors`` largest off-diagonal similarities (positive ones only),
    weighted by the similarity; an edge kept by either end is kept (the larger weight)."""
    s = np.asarray(similarity, dtype=np.float64)
    n = s.shape[0]
    if isinstance(n_neighbors, bool) or not isinstance(n_neighbors, (int, np.integer)) or not 1 <= n_neighbors < n:
        raise ConfigError(f"n_neighbors must be an integer in 1..{n - 1} for {n} genes, got {n_neighbors!r}")
    masked = s.copy()
    np.fill_diagonal(masked, -np.inf)
    cols = np.argsort(-masked, axis=1, kind="stable")[:, :n_neighbors]
    rows = np.repeat(np.arange(n), n_neighbors)
    vals = masked[rows, cols.ravel()]
    pos = vals > 0
    graph = sp.csr_matrix((vals[pos], (rows[pos], cols.ravel()[pos])), shape=(n, n))
    return graph.maximum(graph.T).tocsr()


def leiden_programs(similarity: pd.DataFrame, *, n_neighbors: int = 15, resolution: float = 1.0, min_size: int = 5,
                    seed: int = 0, symmetrise: bool = False) -> pd.DataFrame:
    """Programs of a gene x gene similarity table (see :meth:`GeneNetwork.programs`)."""
    import anndata as ad
    import scanpy as sc

    if not resolution > 0:
        raise ConfigError(f"resolution must be > 0, got {resolution!r}")
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 1:
        raise ConfigError(f"min_size must be an integer >= 1, got {min_size!r}")
    s = similarity.to_numpy(dtype=np.float64)
    if symmetrise:
        s = (s + s.T) / 2.0
    graph = knn_graph(s, n_neighbors)
    genes = pd.Index([str(g) for g in similarity.index])
    holder = ad.AnnData(obs=pd.DataFrame(index=genes))
    sc.tl.leiden(holder, adjacency=graph, resolution=float(resolution), random_state=seed, flavor="igraph",
                 n_iterations=2, directed=False, key_added="_program")
    labels = holder.obs["_program"].astype(str).to_numpy()
    sizes = pd.Series(labels).value_counts()
    first = {lab: i for i, lab in reversed(list(enumerate(labels)))}
    kept = sorted((lab for lab, n in sizes.items() if n >= min_size), key=lambda lab: (-sizes[lab], first[lab]))
    number = {lab: i for i, lab in enumerate(kept)}
    rows = [(number[lab], g) for g, lab in zip(genes, labels) if lab in number]
    table = pd.DataFrame(rows, columns=["program", "gene"]).sort_values("program", kind="stable")
    table["size"] = table["program"].map(table["program"].value_counts()).astype(int)
    logger.info("gene programs: %d clusters, %d with >= %d genes (%d of %d genes)", sizes.size, len(kept), min_size,
                len(table), len(genes))
    return table.reset_index(drop=True)[PROGRAM_COLUMNS]


def programs_as_dict(programs: pd.DataFrame | dict) -> dict[Any, list[str]]:
    """``{program: [genes]}`` from a programs table (``program, gene``) or such a dict."""
    if isinstance(programs, dict):
        return {p: [str(g) for g in genes] for p, genes in programs.items()}
    if not isinstance(programs, pd.DataFrame) or not {"program", "gene"} <= set(programs.columns):
        raise InputDataError("programs must be a table with columns 'program' and 'gene' (GeneNetwork.programs()) "
                             "or a {program: [genes]} dict.")
    return {p: [str(g) for g in grp["gene"]] for p, grp in programs.groupby("program", sort=True)}


# ---- program activity in cells ---------------------------------------------------------------
def program_scores(adata: Any, programs: pd.DataFrame | dict, *, layer: str | None = None, seed: int = 0,
                   ) -> pd.DataFrame:
    """Activity of each program in each cell (cells x programs): scanpy's ``score_genes`` on a copy of
    the cells (raw counts are log1p-CP10k normalised first; log-normalised values are used as they are)."""
    import anndata as ad
    import scanpy as sc

    from scforge.matrix import as_source, looks_like_counts

    sets = programs_as_dict(programs)
    if not sets:
        raise InputDataError("no programs to score; lower min_size or the resolution of programs().")
    source = as_source(adata, layer=layer)
    x = sp.csr_matrix(source.matrix, dtype=np.float64, copy=True)
    if looks_like_counts(x):
        from scforge.baselines.logistic import log1p_cp10k

        x = log1p_cp10k(x)
    work = ad.AnnData(X=x, obs=pd.DataFrame(index=source.obs_names_range(0, source.n_obs)))
    work.var_names = [str(g) for g in source.gene_names(None)]
    work.var_names_make_unique()
    out = {}
    for p, genes in sets.items():
        present = [g for g in genes if g in work.var_names]
        if not present:
            raise InputDataError(f"none of the genes of program {p} ({genes[:5]}...) is in {source.where}.")
        try:
            sc.tl.score_genes(work, present, score_name="_score", random_state=seed, use_raw=False)
        except RuntimeError as exc:  # too few genes to draw expression-matched control genes from
            raise InputDataError(f"scoring program {p} failed ({exc}); score_genes needs many more genes in the "
                                 "data than in the program (it draws control genes of matched expression).") from exc
        out[p] = work.obs["_score"].to_numpy()
    return pd.DataFrame(out, index=work.obs_names).rename_axis(columns="program")


def program_activity(adata: Any, programs: pd.DataFrame | dict, groupby: str, *, layer: str | None = None,
                     seed: int = 0) -> pd.DataFrame:
    """Mean program score (:func:`program_scores`) per ``obs[groupby]`` group (e.g. cell type): groups x programs."""
    if groupby not in adata.obs:
        raise InputDataError(f"obs has no column {groupby!r}; choose one of {list(adata.obs.columns)}.")
    groups = adata.obs[groupby]
    labelled = groups.notna().to_numpy()
    if not labelled.any():
        raise InputDataError(f"obs[{groupby!r}] has no labels (all missing).")
    scores = program_scores(adata[labelled] if not labelled.all() else adata, programs, layer=layer, seed=seed)
    return scores.groupby(groups[labelled].astype(str).to_numpy(), sort=True).mean().rename_axis(index=groupby)


# ---- outputs -------------------------------------------------------------------------------------
def _check_edges(edges: pd.DataFrame) -> pd.DataFrame:
    if not isinstance(edges, pd.DataFrame) or not set(EDGE_COLUMNS) <= set(edges.columns):
        raise InputDataError(f"edges must be a DataFrame with columns {EDGE_COLUMNS} (GeneNetwork.edges()); got "
                             f"{list(getattr(edges, 'columns', []))}.")
    return edges[EDGE_COLUMNS].reset_index(drop=True)


def add_network(adata: Any, edges: pd.DataFrame, *, key: str = "grn", inplace: bool = False) -> Any:
    """Store the edge list in ``uns[key]`` of a copy of ``adata`` (returned), or of ``adata`` itself with ``inplace``."""
    edges = _check_edges(edges)
    out = adata if inplace else adata.copy()
    out.uns[key] = edges.copy()
    return out


def write_edges_csv(edges: pd.DataFrame, path: str | os.PathLike) -> Path:
    """Write ``source,target,weight`` to a CSV file (no index)."""
    path = Path(path)
    _check_edges(edges).to_csv(path, index=False)
    return path


def to_generib(edges: pd.DataFrame, *, method_id: str, dataset_id: str, max_edges: int = 50_000) -> Any:
    """geneRNIB's prediction format: an AnnData without X whose ``uns`` holds ``method_id``, ``dataset_id``
    and ``prediction`` (``source, target, weight``, weights as strings as geneRNIB writes them), the
    ``max_edges`` strongest edges by ``|weight|`` (geneRNIB scores the top 50,000)."""
    import anndata as ad

    edges = _check_edges(edges)
    strongest = edges.loc[edges["weight"].abs().sort_values(ascending=False, kind="stable").index[:max_edges]]
    prediction = strongest.reset_index(drop=True).astype({"source": str, "target": str, "weight": str})
    return ad.AnnData(uns={"method_id": str(method_id), "dataset_id": str(dataset_id), "prediction": prediction})


def state_cells(adata: Any, key: str | None, state: Any | None) -> np.ndarray:
    """Positions of the cells with ``obs[key] == state`` (compared as text), all cells when ``key`` is None."""
    if key is None:
        if state is not None:
            raise ConfigError("state= needs state_key= (the obs column that holds the states).")
        return np.arange(adata.n_obs)
    if key not in adata.obs:
        raise InputDataError(f"obs has no column {key!r}; choose one of {list(adata.obs.columns)}.")
    if state is None:
        raise ConfigError(f"state_key={key!r} needs state= (one of its values).")
    values = adata.obs[key].astype(str).to_numpy()
    idx = np.flatnonzero(values == str(state))
    if idx.size == 0:
        raise InputDataError(f"no cell has obs[{key!r}] == {state!r}; its values are {sorted(set(values))[:10]}.")
    return idx
