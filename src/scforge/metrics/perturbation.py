"""Perturbation-prediction metrics on mean profiles (GEARS / scGPT definitions; Ahlmann-Eltze L2).

All metrics compare a predicted mean profile with the observed mean of a group's cells, relative to
the control mean of the group's context (all control cells when there is one context, as GEARS):

* ``mse``, ``pearson``: prediction vs truth over all genes (absolute expression);
* ``pearson_delta``: Pearson(pred - control, truth - control);
* ``*_de``: the same on the top DE genes, plus ``direction_accuracy_de`` (GEARS
  ``frac_correct_direction_20``: fraction of DE genes where sign(pred - ctrl) == sign(truth - ctrl));
* ``*_top20_de_non_dropout``: on GEARS' non-dropout top DE genes;
* ``l2_top<k>``: Euclidean distance on the ``k`` most expressed genes (Ahlmann-Eltze et al., k = 1000).

A Pearson correlation with a constant vector is NaN (GEARS replaces it by 0 in its non-dropout
analysis; here it stays NaN and summaries skip it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.data.perturbation import PerturbationData, PerturbationSplit, column_means
from scforge.data.profiles import Group
from scforge.errors import ConfigError

TABLE_COLUMNS = ["method", "condition", "context", "subgroup", "seed", "metric", "value"]


def _vector(x: Any, name: str, size: int | None = None) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or (size is not None and v.size != size):
        want = f"({size},)" if size is not None else "1-D"
        raise ConfigError(f"{name} must be a {want} vector over genes; got shape {v.shape}")
    return v


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN (without a warning) when either vector is constant or too short."""
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    a0, b0 = a - a.mean(), b - b.mean()
    return float(np.clip(a0 @ b0 / np.sqrt((a0 @ a0) * (b0 @ b0)), -1.0, 1.0))


def _inputs(pred: Any, truth: Any, control: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = _vector(truth, "truth")
    return _vector(pred, "pred", truth.size), truth, _vector(control, "control", truth.size)


def _positions(genes: Any, n_genes: int, name: str) -> np.ndarray:
    idx = np.asarray(genes, dtype=np.int64).ravel()
    if idx.size == 0 or idx.min() < 0 or idx.max() >= n_genes:
        raise ConfigError(f"{name} must be a non-empty array of gene positions in [0, {n_genes})")
    return idx


def pearson_delta(pred: Any, truth: Any, control: Any, genes: Any = None) -> float:
    """Pearson(pred - control, truth - control) over ``genes`` positions (all if None)."""
    pred, truth, control = _inputs(pred, truth, control)
    idx = slice(None) if genes is None else _positions(genes, truth.size, "genes")
    return _pearson(pred[idx] - control[idx], truth[idx] - control[idx])


def _on_genes(pred: np.ndarray, truth: np.ndarray, control: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    p, t, c = pred[idx], truth[idx], control[idx]
    return {"mse": float(np.mean((p - t) ** 2)), "pearson": _pearson(p, t), "pearson_delta": _pearson(p - c, t - c)}


def perturbation_metrics(pred: Any, truth: Any, control: Any, *, de: Any = None, de_non_dropout: Any = None,
                         top_expressed: Any = None) -> dict[str, float]:
    """GEARS-style metrics of one predicted mean profile (see the module docstring for the keys)."""
    pred, truth, control = _inputs(pred, truth, control)
    out = _on_genes(pred, truth, control, np.arange(truth.size))
    if de is not None:
        idx = _positions(de, truth.size, "de")
        out.update({f"{k}_de": v for k, v in _on_genes(pred, truth, control, idx).items()})
        same = np.sign(pred[idx] - control[idx]) == np.sign(truth[idx] - control[idx])
        out["direction_accuracy_de"] = float(np.mean(same))
    if de_non_dropout is not None:
        idx = _positions(de_non_dropout, truth.size, "de_non_dropout")
        vals = _on_genes(pred, truth, control, idx)
        out.update({f"{k}_top20_de_non_dropout": vals[k] for k in ("pearson_delta", "pearson", "mse")})
    if top_expressed is not None:
        idx = _positions(top_expressed, truth.size, "top_expressed")
        out[f"l2_top{idx.size}"] = float(np.linalg.norm(pred[idx] - truth[idx]))
    return out


def top_expressed_genes(data_or_matrix: PerturbationData | Any, n: int = 1000) -> np.ndarray:
    """Positions of the ``n`` genes with the highest mean expression over all cells (highest first;
    ties by position). A PerturbationData uses its X or layer; a matrix is cells x genes."""
    if n < 1:
        raise ConfigError(f"n must be >= 1; got {n}")
    if isinstance(data_or_matrix, PerturbationData):
        means = column_means(data_or_matrix.matrix)
    else:
        matrix = data_or_matrix if sp.issparse(data_or_matrix) else np.asarray(data_or_matrix)
        if matrix.ndim != 2:
            raise ConfigError(f"expected a cells x genes matrix; got shape {matrix.shape}")
        means = column_means(matrix)
    return np.argsort(-means, kind="stable")[:n].astype(np.int64)


def _as_group(key: Any) -> Group:
    return (key, None) if isinstance(key, str) else (key[0], key[1])


def _prediction(value: Any, n_genes: int, group: Group) -> np.ndarray:
    """A mean profile; a (cells x genes) prediction is averaged over cells, as GEARS does."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == n_genes:
        arr = arr.mean(axis=0)
    if arr.shape != (n_genes,):
        raise ConfigError(f"prediction for {group} has shape {np.shape(value)}; expected ({n_genes},) or "
                          f"(cells, {n_genes})")
    return arr


def evaluate_perturbations(predictions: Mapping[Group, Any], data: PerturbationData, *, method: str,
                           split: PerturbationSplit | None = None, seed: int | None = None, n_de: int = 20,
                           n_top_expressed: int = 1000) -> pd.DataFrame:
    """Tidy table (``method, condition, context, subgroup, seed, metric, value``) of
    :func:`perturbation_metrics` for each predicted group: truth = the group's mean, control = its
    context's control mean, DE genes from ``data.de_genes`` (top ``n_de``, "de" and "non_dropout"),
    subgroup from ``split`` ("all" without one)."""
    groups = [data._group(*_as_group(k)) for k in predictions]
    profiles = data.profiles(groups)
    top = top_expressed_genes(data, n_top_expressed)
    rows = []
    for key, group in zip(predictions, groups):
        pred = _prediction(predictions[key], data.n_genes, group)
        metrics = perturbation_metrics(
            pred, profiles.means[group], profiles.control_mean(group[1]),
            de=data.de_genes(*group, n=n_de), de_non_dropout=data.de_genes(*group, n=n_de, kind="non_dropout"),
            top_expressed=top)
        subgroup = "all" if split is None else split.subgroup_of(group[0])
        rows += [(method, group[0], group[1], subgroup, seed, name, value) for name, value in metrics.items()]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def summarize_perturbations(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and sd per method / subgroup / metric (plus an "all" subgroup over every condition).

    With one seed per method the sd is over conditions; with several it is over the seeds' means.
    NaN values (e.g. Pearson with a constant vector) are skipped. Columns: ``method, subgroup, metric,
    mean, sd, sd_over, n_conditions, n_seeds``."""
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise ConfigError(f"table lacks columns {missing}; expected the output of evaluate_perturbations")
    split_rows = table[table["subgroup"] != "all"]
    full = pd.concat([table, split_rows.assign(subgroup="all")]) if len(split_rows) else table
    keys = ["method", "subgroup", "metric"]
    per_seed = (full.groupby([*keys, "seed"], sort=False, dropna=False)["value"]
                .agg(seed_mean="mean", cond_sd="std", n="count").reset_index())
    out = (per_seed.groupby(keys, sort=False, dropna=False)
           .agg(mean=("seed_mean", "mean"), seeds_sd=("seed_mean", "std"), cond_sd=("cond_sd", "first"),
                n_conditions=("n", "max"), n_seeds=("seed_mean", "size")).reset_index())
    several = out["n_seeds"] > 1
    out["sd"] = np.where(several, out["seeds_sd"], out["cond_sd"])
    out["sd_over"] = np.where(several, "seeds", "conditions")
    return out[[*keys, "mean", "sd", "sd_over", "n_conditions", "n_seeds"]]
