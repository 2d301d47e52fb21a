"""Checks of per-cell inputs shared by the metrics, baselines and the experiment matrix: labels (one
value per cell, none missing) and embeddings (a finite numeric [cells, dims] array)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from scforge.errors import InputDataError


def as_labels(values: Any, *, n: int | None = None, what: str = "labels",
              hint: str = "drop those cells or fill them in first") -> np.ndarray:
    """``values`` as a 1-d object array (values kept as they are); :class:`InputDataError` for a shape
    other than one value per cell, a length other than ``n``, or missing values (NaN/None)."""
    if isinstance(values, (pd.Series, pd.Index, pd.Categorical)):
        arr = pd.Series(values).to_numpy(dtype=object)
    else:
        arr = np.asarray(values, dtype=object)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise InputDataError(f"{what} must be one value per cell (1-d), got shape {arr.shape}.")
    if n is not None and arr.size != n:
        raise InputDataError(f"{arr.size} {what} for {n} cells; give exactly one per cell, in cell order.")
    missing = np.flatnonzero(pd.isna(arr))
    if missing.size:
        raise InputDataError(f"{what} holds {missing.size} missing labels (NaN/None) out of {arr.size} cells "
                             f"(first at positions {missing[:5].tolist()}); {hint}.")
    return arr


def as_text_labels(values: Any, *, n: int | None = None, what: str = "labels") -> np.ndarray:
    """:func:`as_labels`, each value as its ``str`` (an object array), so labels compare as text."""
    return np.array([str(v) for v in as_labels(values, n=n, what=what)], dtype=object)


def as_embedding(value: Any, *, what: str = "the embedding", width: int | None = None,
                 dtype: Any = np.float64) -> np.ndarray:
    """A finite C-ordered ``dtype`` copy ``[cells, dims]`` of ``value`` (dense, sparse or a DataFrame), or
    :class:`InputDataError` saying what is wrong; ``width``: the dims it must have."""
    import scipy.sparse as sp

    if sp.issparse(value):
        value = value.toarray()
    if isinstance(value, pd.DataFrame):
        value = value.to_numpy()
    try:
        arr = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputDataError(f"{what} is not a numeric [cells, dims] array ({exc}).") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise InputDataError(f"{what} is not numeric (dtype {arr.dtype}); pass a [cells, dims] float array.")
    if np.iscomplexobj(arr):
        raise InputDataError(f"{what} is complex; pass a real [cells, dims] array.")
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise InputDataError(f"{what} must be a non-empty 2-d array [cells, dims], got shape {arr.shape}.")
    if width is not None and arr.shape[1] != width:
        raise InputDataError(f"{what} has {arr.shape[1]} dimensions but the classifier was fitted on {width}; "
                             "embed the cells with the same model (and settings) as the training cells.")
    x = np.array(arr, dtype=dtype, order="C", copy=True)
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        overflow = f" (values too large for {np.dtype(dtype).name})" if np.isfinite(arr).all() else ""
        raise InputDataError(f"{what} has {int(bad.sum())} non-finite values (NaN/inf){overflow} in {rows.size} "
                             f"cells (first rows {rows[:5].tolist()}); drop or fix those cells.")
    return x


def obs_labels(adata: Any, key: str, *, what: str) -> np.ndarray:
    """``adata.obs[key]`` as an object array of str, for a step (``what``) that needs every cell labelled:
    a clear :class:`InputDataError` for a missing column or missing labels."""
    if key not in adata.obs.columns:
        raise InputDataError(f"obs has no column {key!r}; columns are {list(adata.obs.columns)[:20]}.")
    column = adata.obs[key]
    if column.isna().any():
        raise InputDataError(f"obs[{key!r}] has {int(column.isna().sum())} missing labels; {what} needs every cell "
                             "labelled. Drop the unlabelled cells or fill them first.")
    return column.astype(str).to_numpy(dtype=object)
