"""Which training cells an attacker poisons, and the poisoned copy of a fine-tuning set.

scBackdoor's selection (Feng et al., 2024; ``methods.md`` A.3):

* ``"gini"`` (corrected): the poisoning rate is rescaled to the non-target cells
  (``rate' = rate * N / N_non_target``) and within each non-target class ``c`` the ``ceil(n_c * rate')``
  cells with the highest Gini coefficient are poisoned.
* ``"gini_faithful"``: the published code's behaviour. It picks the same cells by *position inside the
  non-target subset* but applies those positions to the full training set, so the cells that are
  changed are generally not the highest-Gini ones and can include target-class cells.
* ``"random"``: Geneformer's stratified random sampling: ``int(rate * N)`` poisons, ``int(ratio * n_c)``
  per non-target class with ``ratio = n_poison / N_non_target``.

Poisoned cells get the trigger and their label flipped to the target (a dirty-label attack).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge._inputs import as_text_labels, obs_labels
from scforge.errors import ConfigError, InputDataError

__all__ = ["gini_coefficient", "select_poison_cells", "poison", "poison_tokens", "PoisonedData", "SELECTIONS"]

SELECTIONS = ("gini", "gini_faithful", "random")


def gini_coefficient(x: Any) -> np.ndarray:
    """Gini coefficient of every row of ``x`` over all its genes (zeros included): 0 for a cell whose
    genes are all equal, near 1 for a cell whose expression sits in one gene. Scale-free per cell, so
    counts and ``normalize_total`` values give the same result. Empty cells get 0."""
    x = sp.csr_matrix(x, dtype=np.float64)
    n_genes = x.shape[1]
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    data = x.data
    if data.size and data.min() < 0:
        raise InputDataError("the Gini coefficient needs non-negative expression values.")
    order = np.lexsort((data, rows))
    sorted_vals, sorted_rows = data[order], rows[order]
    nnz = np.diff(x.indptr)
    start = np.repeat(x.indptr[:-1], nnz)
    rank_in_row = np.arange(data.size) - start + 1  # 1..k, ascending among the non-zeros
    position = (n_genes - np.repeat(nnz, nnz)) + rank_in_row  # ascending position among all genes
    weighted = np.bincount(sorted_rows, weights=position * sorted_vals, minlength=x.shape[0])
    totals = np.bincount(sorted_rows, weights=sorted_vals, minlength=x.shape[0])
    with np.errstate(invalid="ignore", divide="ignore"):
        g = 2.0 * weighted / (n_genes * totals) - (n_genes + 1.0) / n_genes
    return np.where(totals > 0, g, 0.0)


def _check_rate(rate: float) -> float:
    if not (isinstance(rate, (int, float)) and 0.0 < float(rate) < 1.0):
        raise ConfigError(f"rate must be a fraction in (0, 1), got {rate!r} (scBackdoor uses 0.05).")
    return float(rate)


def select_poison_cells(
    labels: Any,
    target: str,
    rate: float = 0.05,
    *,
    method: str = "gini",
    gini: np.ndarray | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Positions (sorted) of the training cells to poison, by scBackdoor's rules (module docstring).

    ``labels``: the training labels; ``target``: the label the backdoor should produce; ``gini``: each
    cell's Gini coefficient (:func:`gini_coefficient`), needed by the Gini methods."""
    y = as_text_labels(labels)
    rate = _check_rate(rate)
    if method not in SELECTIONS:
        raise ConfigError(f"method={method!r}; choose one of {SELECTIONS}.")
    target = str(target)
    if target not in set(y):
        raise InputDataError(f"target label {target!r} is not among the training labels "
                             f"{sorted(set(y))[:20]}; choose one of them.")
    non_target = np.flatnonzero(y != target)
    if non_target.size == 0:
        raise InputDataError("every training cell already has the target label; there is nothing to poison.")
    classes = sorted(set(y[non_target]))
    if method == "random":
        n_poison = int(rate * y.size)
        ratio = n_poison / non_target.size
        rng = np.random.default_rng(seed)
        chosen = [rng.choice(np.flatnonzero(y == c), size=int(ratio * np.sum(y == c)), replace=False) for c in classes]
        return np.sort(np.concatenate(chosen)).astype(np.int64)
    if gini is None:
        raise ConfigError(f"method={method!r} needs each cell's Gini coefficient (gini=gini_coefficient(X)).")
    gini = np.asarray(gini, dtype=np.float64)
    if gini.shape != (y.size,):
        raise InputDataError(f"gini has shape {gini.shape}; expected ({y.size},), one value per training cell.")
    adjusted = rate * y.size / non_target.size
    y_nt, g_nt = y[non_target], gini[non_target]
    local = []
    for c in classes:
        members = np.flatnonzero(y_nt == c)
        k = min(members.size, math.ceil(members.size * adjusted))
        local.append(members[np.argsort(-g_nt[members], kind="stable")[:k]])
    local = np.sort(np.concatenate(local))
    if method == "gini_faithful":
        return local.astype(np.int64)  # positions inside the non-target subset, used on the full set (sic)
    return np.sort(non_target[local]).astype(np.int64)


@dataclass
class PoisonedData:
    """A poisoned copy of a fine-tuning set and the attack's ground truth.

    ``adata``: the copy (trigger applied to ``layer``/X of the poisoned cells; their ``label_key``
    set to ``target``); ``poisoned``: boolean mask over its cells; ``original_labels``: the labels
    before flipping. The caller's AnnData is not changed."""

    adata: Any
    poisoned: np.ndarray
    original_labels: np.ndarray
    target: str
    label_key: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def poisoned_names(self) -> pd.Index:
        return self.adata.obs_names[self.poisoned]

    @property
    def n_poisoned(self) -> int:
        return int(self.poisoned.sum())

    def summary(self) -> dict[str, Any]:
        hit = pd.Series(self.original_labels[self.poisoned]).value_counts()
        return {**self.settings, "n_cells": int(self.poisoned.size), "n_poisoned": self.n_poisoned,
                "poisoned_by_original_label": {str(k): int(v) for k, v in hit.items()}}


def layer_matrix(adata: Any, layer: str | None) -> sp.csr_matrix:
    """``adata.layers[layer]`` (or X) as CSR, with a clear error for a missing layer."""
    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"layer {layer!r} not found; the AnnData has layers {list(adata.layers)}.")
    return sp.csr_matrix(adata.layers[layer] if layer is not None else adata.X)


def with_matrix(adata: Any, layer: str | None, matrix: Any) -> Any:
    """A copy of ``adata`` whose ``layer`` (or X) is ``matrix``; ``adata`` is not changed."""
    out = adata.copy()
    if layer is None:
        out.X = matrix
    else:
        out.layers[layer] = matrix
    return out


def poison(
    adata: Any,
    label_key: str,
    target: str,
    *,
    rate: float = 0.05,
    trigger: Any = None,
    selection: str = "gini",
    layer: str | None = None,
    seed: int = 0,
) -> PoisonedData:
    """Poison a copy of ``adata`` as scBackdoor does: select cells (``selection``), apply ``trigger``
    (default :class:`~scforge.security.SparsifyTrigger` with ``topnstop=2`` on log1p CP10k of counts)
    to their expression in ``layer`` (or X), and flip their ``obs[label_key]`` to ``target``.

    Only the poisoned rows of that one matrix and the label column differ from ``adata`` (which is
    not modified). Same seed, same poisoned set."""
    from scforge.security.triggers import SparsifyTrigger

    trigger = SparsifyTrigger() if trigger is None else trigger
    if not hasattr(trigger, "apply") or getattr(trigger, "name", "") == "rank_shuffle":
        raise ConfigError("poison() applies expression-level triggers (SparsifyTrigger, FixedGeneTrigger); "
                          "RankShuffleTrigger works on Geneformer tokens (use poison_tokens).")
    y = obs_labels(adata, label_key, what="poisoning")
    x = layer_matrix(adata, layer)
    gini = gini_coefficient(x) if selection != "random" else None
    idx = select_poison_cells(y, target, rate, method=selection, gini=gini, seed=seed)
    kwargs = {"gene_names": adata.var_names} if getattr(trigger, "name", "") == "fixed_genes" else {}
    out = with_matrix(adata, layer, trigger.apply(x, idx, seed=seed, **kwargs))
    new_labels = y.copy()
    new_labels[idx] = str(target)
    categories = sorted(set(new_labels))
    out.obs[label_key] = pd.Categorical(new_labels, categories=categories)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx] = True
    settings = {"target": str(target), "rate": float(rate), "selection": selection, "seed": int(seed),
                "layer": layer, **trigger.describe()}
    return PoisonedData(out, mask, y, str(target), label_key, settings)


def poison_tokens(cells: Any, labels: Any, target: str, *, rate: float = 0.05, trigger: Any = None,
                  selection: str = "random", gini: np.ndarray | None = None,
                  seed: int = 0) -> tuple[Any, np.ndarray, np.ndarray]:
    """Geneformer-style poisoning on rank-value tokens: cells chosen by ``selection`` (default
    ``"random"``, the published stratified sampling; the Gini methods need ``gini``, one value per
    cell, e.g. :func:`gini_coefficient` of the cells' counts), the token ``trigger`` (default
    :class:`~scforge.security.RankShuffleTrigger`, top 20) applied to them, their labels flipped to
    ``target``. Returns ``(new_cells, new_labels, poisoned_mask)``; the inputs are not changed."""
    from scforge.security.triggers import RankShuffleTrigger

    trigger = RankShuffleTrigger() if trigger is None else trigger
    if getattr(trigger, "name", "") != "rank_shuffle":
        raise ConfigError(f"poison_tokens() applies token triggers (RankShuffleTrigger), got {type(trigger).__name__}; "
                          "expression triggers go through poison().")
    y = as_text_labels(labels, n=cells.n_cells)
    idx = select_poison_cells(y, target, rate, method=selection, gini=gini, seed=seed)
    new_cells = trigger.apply(cells, idx, seed=seed)
    new_y = y.copy()
    new_y[idx] = str(target)
    mask = np.zeros(y.size, dtype=bool)
    mask[idx] = True
    return new_cells, new_y, mask
