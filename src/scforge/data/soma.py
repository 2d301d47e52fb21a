"""TileDB-SOMA experiments as expression sources, read as a snapshot pinned at one timestamp.

:func:`soma_source` opens an Experiment read-only at ``timestamp`` (default: now; kept as
``source.matrix.timestamp_ms``). Every read of that source sees the experiment as it was then, so cells
appended while a run reads it change neither its cell count nor its contents; a source opened later
sees them. Rows are read by ``soma_joinid`` and returned as canonical float32 CSR, so
:func:`scforge.matrix.iter_row_chunks` and :class:`scforge.data.stream.CellStream` read it like any other
matrix. obs is not loaded (cells are numbered 0..n-1).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.errors import DependencyError, InputDataError
from scforge.matrix import ExpressionSource

logger = logging.getLogger("scforge")

FALLBACK_LAYER = "data"  # tiledbsoma.io's name for an AnnData's X
INDEX_KEY = "soma_dataframe_original_index_name"  # metadata where tiledbsoma.io records a named var index


def _tiledbsoma() -> Any:
    try:
        import tiledbsoma
    except ImportError as exc:
        raise DependencyError("Reading TileDB-SOMA experiments needs tiledbsoma: pip install tiledbsoma") from exc
    return tiledbsoma


def _local_path(uri: str) -> Path | None:
    """The local folder of a path or file:// URI, None for remote URIs (s3://, tiledb://, ...)."""
    if uri.startswith("file://"):
        return Path(uri[len("file://"):])
    return None if "://" in uri else Path(uri)


def is_soma_experiment(path_or_uri: str | os.PathLike) -> bool:
    """True when tiledbsoma recognises ``path_or_uri`` as an Experiment.

    A local folder that is not a TileDB group is refused without importing tiledbsoma. Errors while
    probing read as False; only a TileDB group without tiledbsoma installed raises DependencyError.
    """
    uri = str(path_or_uri)
    local = _local_path(uri)
    if local is not None and not ((local / "__tiledb_group.tdb").is_file() or (local / "__group").is_dir()):
        return False
    soma = _tiledbsoma()
    try:
        return bool(soma.Experiment.exists(uri))
    except Exception:  # any failure to probe means "not an experiment"
        return False


class SomaMatrix:
    """One sparse X layer at a pinned timestamp: ``.shape`` and ``m[lo:hi]`` -> float32 CSR of rows lo..hi-1.

    Each process makes its own native TileDB context (never tiledbsoma's process-global default), and
    each thread opens its own array handle, on first read; a forked child never uses (nor closes) the
    parent's, whose thread pools do not survive ``fork`` (reusing them deadlocks). A pickle carries no
    handle. So it works in forked DataLoader workers and pickles for ``spawn``.
    """

    def __init__(self, uri: str, shape: tuple[int, int], timestamp_ms: int) -> None:
        self.uri, self.shape, self.timestamp_ms = uri, shape, int(timestamp_ms)
        # handles of other processes (inherited by fork) are kept, never used or closed
        self._contexts: dict[int, Any] = {}  # pid -> SOMATileDBContext
        self._handles: dict[tuple[int, int], Any] = {}  # (pid, thread) -> open SparseNDArray

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_contexts": {}, "_handles": {}}

    def _array(self) -> Any:
        pid = os.getpid()
        key = (pid, threading.get_ident())
        if key not in self._handles:
            soma = _tiledbsoma()
            if pid not in self._contexts:  # a config makes a new native context, not tiledbsoma's global one
                self._contexts[pid] = soma.SOMATileDBContext(tiledb_config={})
            self._handles[key] = soma.SparseNDArray.open(self.uri, context=self._contexts[pid],
                                                          tiledb_timestamp=self.timestamp_ms)
        return self._handles[key]

    def __getitem__(self, rows: slice) -> sp.csr_matrix:
        if not isinstance(rows, slice):
            raise TypeError(f"SomaMatrix reads row slices (m[lo:hi]), got {rows!r}")
        lo, hi, step = rows.indices(self.shape[0])
        if step != 1:
            raise TypeError("SomaMatrix reads contiguous row slices only (step 1)")
        n = max(hi - lo, 0)
        if n == 0:
            return sp.csr_matrix((0, self.shape[1]), dtype=np.float32)
        # SOMA slices are inclusive; "auto" (storage) order is much faster than "row-major", rows sorted below
        table = self._array().read(coords=(slice(lo, hi - 1), None), result_order="auto").tables().concat()
        r = table["soma_dim_0"].to_numpy() - lo
        c = table["soma_dim_1"].to_numpy()
        d = table["soma_data"].to_numpy().astype(np.float32)  # a writable copy (callers canonicalize in place)
        if r.size > 1 and np.any(r[1:] < r[:-1]):
            order = np.argsort(r, kind="stable")
            r, c, d = r[order], c[order], d[order]
        indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
        return sp.csr_matrix((d, c.astype(np.int32), indptr), shape=(n, self.shape[1]))


def _pick_layer(ms: Any, layer: str, where: str) -> str:
    layers = sorted(ms.X.keys()) if "X" in ms else []
    if layer in layers:
        return layer
    have = ", ".join(map(repr, layers)) or "(none)"
    if layer == "raw" and FALLBACK_LAYER in layers:
        logger.warning("%s has no X layer 'raw'; reading %r (tiledbsoma.io's name for an AnnData's X). X layers "
                       "present: %s. Pass layer= to choose another.", where, FALLBACK_LAYER, have)
        return FALLBACK_LAYER
    raise InputDataError(f"X layer {layer!r} is not in {where}. X layers present: {have}. Pass layer= one of them.")


def _read_var(ms: Any, gene_col: str | None, where: str) -> pd.DataFrame:
    var = ms.var.read().concat().to_pandas().sort_values("soma_joinid")
    if not np.array_equal(var["soma_joinid"].to_numpy(), np.arange(len(var))):
        raise InputDataError(f"var soma_joinids of {where} are not 0..{len(var) - 1}; re-ingest the experiment.")
    recorded = json.loads(ms.var.metadata.get(INDEX_KEY, "null"))  # e.g. "gene_name" for a named index
    col = next((c for c in ("var_id", recorded, gene_col) if c is not None and c in var.columns), None)
    if col is None:
        cols = ", ".join(map(repr, [c for c in var.columns if c != "soma_joinid"][:20])) or "(none)"
        asked = f" nor {gene_col!r}" if gene_col else ""
        raise InputDataError(f"var of {where} has no 'var_id' column{asked} and no recorded index column. "
                             f"Columns: {cols}. Pass gene_col= the column holding gene ids.")
    var = var.drop(columns="soma_joinid")
    var.index = pd.Index(var[col].astype(str).to_numpy(), name=col)
    return var


def _n_obs(obs: Any, where: str) -> int:
    n = int(obs.count)
    if n == 0:
        raise InputDataError(f"{where} is empty (0 cells); there is nothing to read.")
    (low, high), = obs.non_empty_domain()
    if (int(low), int(high)) != (0, n - 1):
        raise InputDataError(f"obs soma_joinids of {where} run {low}..{high} for {n} cells, not 0..{n - 1}: "
                             "scforge reads cells by position. Export the cells you need to a new experiment "
                             "(e.g. tiledbsoma.io.to_anndata then from_anndata).")
    return n


def soma_source(uri: str | os.PathLike, *, measurement: str = "RNA", layer: str = "raw",
                gene_col: str | None = None, timestamp: Any = None) -> ExpressionSource:
    """An :class:`ExpressionSource` over X[``layer``] of ``measurement`` of the SOMA Experiment at ``uri``.

    ``timestamp`` (ms since the epoch or a datetime; default now) pins the snapshot read. ``layer``
    ``"raw"`` falls back to ``"data"`` (what ``tiledbsoma.io.from_anndata`` names X) with a warning. Genes
    are var's ``var_id`` column, else the column ingestion recorded as the AnnData's var index, else
    ``gene_col``. The source's ``where`` is ``soma:<uri>:<ms>/X/<layer>``.
    """
    uri = str(uri)
    local = _local_path(uri)
    if local is not None and not local.exists():
        raise InputDataError(f"SOMA experiment {uri!r} does not exist. Give the folder or URI of an Experiment.")
    if not is_soma_experiment(uri):
        raise InputDataError(f"{uri!r} is not a TileDB-SOMA Experiment. Give the Experiment's root folder "
                             "(made e.g. by tiledbsoma.io.from_anndata), not a measurement or array inside it.")
    with _tiledbsoma().Experiment.open(uri, mode="r", tiledb_timestamp=timestamp) as exp:
        if measurement not in exp.ms:
            have = ", ".join(map(repr, sorted(exp.ms.keys()))) or "(none)"
            raise InputDataError(f"SOMA experiment {uri!r} has no measurement {measurement!r}. "
                                 f"Measurements present: {have}.")
        ms = exp.ms[measurement]
        layer = _pick_layer(ms, layer, f"soma:{uri}:{measurement}")
        where = f"soma:{uri}:{measurement}/X/{layer}"
        array = ms.X[layer]
        if array.soma_type != "SOMASparseNDArray":
            raise InputDataError(f"{where} is a dense array; scforge reads sparse X layers (the default of "
                                 "tiledbsoma.io.from_anndata).")
        var = _read_var(ms, gene_col, where)
        matrix = SomaMatrix(array.uri, (_n_obs(exp.obs, where), len(var)), exp.tiledb_timestamp_ms)
    if len(var) == 0:
        raise InputDataError(f"{where} is empty (0 genes); there is nothing to read.")
    logger.info("%s: %d cells x %d genes, snapshot at timestamp %d ms", where, *matrix.shape, matrix.timestamp_ms)
    return ExpressionSource(matrix=matrix, var=var, obs=None, where=where)
