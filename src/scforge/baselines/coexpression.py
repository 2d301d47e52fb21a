"""Co-expression networks: the baseline for model-derived gene networks.

Pearson or Spearman correlation between genes over cells, on log1p CP10k of raw counts (totals over
all genes of the data), restricted to a gene list and optionally to the cells of one state. The
result is a :class:`~scforge.data.network.GeneNetwork`, so edges, programs (Leiden on the correlation
kNN graph) and outputs work as for the model networks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import ConfigError, GeneIdentityError

METHODS = ("pearson", "spearman")


def correlation_matrix(x: np.ndarray, method: str = "pearson") -> np.ndarray:
    """Gene x gene correlation of the columns of ``x [cells, genes]``; genes with no variance get 0
    off the diagonal and 1 on it. Spearman ranks each column first (ties get their average rank)."""
    from scipy.stats import rankdata

    if method not in METHODS:
        raise ConfigError(f"method={method!r}; choose one of {METHODS}.")
    x = np.asarray(x, dtype=np.float64)
    if method == "spearman":
        x = rankdata(x, axis=0)
    centred = x - x.mean(axis=0)
    norms = np.linalg.norm(centred, axis=0)
    unit = np.divide(centred, norms, out=np.zeros_like(centred), where=norms > 0)
    corr = np.clip(unit.T @ unit, -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)
    return corr


def coexpression_network(
    adata: Any,
    genes: Sequence[str],
    *,
    method: str = "pearson",
    state_key: str | None = None,
    state: Any | None = None,
    layer: str | None = None,
):
    """Undirected correlation network of ``genes`` over the cells with ``obs[state_key] == state`` (or all).

    ``adata`` (or ``layer``) holds raw counts; they are log1p-CP10k normalised (over all genes) first."""
    from scforge.baselines.logistic import log1p_cp10k, read_matrix
    from scforge.data.network import state_cells
    from scforge.data.network import GeneNetwork

    if method not in METHODS:
        raise ConfigError(f"method={method!r}; choose one of {METHODS}.")
    if isinstance(genes, str) or len(genes) < 2:
        raise ConfigError("genes must be a list of at least 2 gene names (e.g. the data's HVGs).")
    names = list(dict.fromkeys(str(g) for g in genes))
    cells = state_cells(adata, state_key, state)
    x, var, _ = read_matrix(adata, layer, counts=True, what="coexpression_network")
    var = pd.Index(var.astype(str))
    absent = [g for g in names if g not in var]
    if absent:
        raise GeneIdentityError(f"{len(absent)} genes are not in the data's var_names: {absent[:10]}.")
    columns = var.get_indexer(names)
    dense = log1p_cp10k(x[cells])[:, columns].toarray()
    corr = correlation_matrix(dense, method)
    index = pd.Index(names, name="gene")
    info = {"n_cells": int(cells.size), "state_key": state_key, "state": None if state is None else str(state),
            "n_genes": len(names), "correlation": method}
    return GeneNetwork(pd.DataFrame(corr, index=index, columns=index), f"coexpression-{method}", info=info)


def coexpression_difference(adata: Any, key: str, a: Any, b: Any, genes: Sequence[str], *, method: str = "pearson",
                            layer: str | None = None):
    """Correlation in state ``a`` minus correlation in state ``b`` (e.g. STIM - CTRL), same genes."""
    net_a = coexpression_network(adata, genes, method=method, state_key=key, state=a, layer=layer)
    net_b = coexpression_network(adata, genes, method=method, state_key=key, state=b, layer=layer)
    return net_a - net_b
