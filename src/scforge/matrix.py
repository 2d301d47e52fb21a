"""Read expression matrices in CSR row chunks, from memory or backed storage, and check them.

This is the lowest data layer: genes (coverage), tokenizers and datasets all read cells through
:func:`iter_row_chunks`, so memory is bounded by the chunk size whatever the storage is. Nothing here
modifies the caller's object: every conversion makes a new array.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.errors import GeneIdentityError, InputDataError

DEFAULT_CHUNK_SIZE = 2048


@dataclass(frozen=True)
class ExpressionSource:
    """A cells x genes matrix to read in row chunks, with its gene table and cell names.

    Build one with :func:`as_source` from an AnnData (in memory or ``backed="r"``), an ``.h5ad``
    path (streamed: cell names and obs columns are read per chunk, so memory does not grow with
    the number of cells), or a bare matrix (numpy, any scipy sparse format) plus gene names.
    """

    matrix: Any
    var: pd.DataFrame
    obs: pd.DataFrame | None
    where: str
    h5_obs: Any = None  # the obs group of an .h5ad opened by path (read lazily)
    _columns: dict = field(default_factory=dict, repr=False, compare=False)
    names_reader: Any = None  # (lo, hi) -> cell names, when they are read another way (e.g. a fresh handle)
    column_reader: Any = None  # key -> an obs column or None, likewise

    def obs_names_range(self, lo: int, hi: int) -> np.ndarray:
        """Names of cells ``lo..hi-1``."""
        if self.names_reader is not None:
            return self.names_reader(lo, hi)
        if self.obs is not None:
            return np.asarray(self.obs.index[lo:hi])
        if self.h5_obs is not None:
            names = self.h5_obs[self.h5_obs.attrs["_index"]]
            return np.asarray(names.asstr()[lo:hi] if names.dtype.kind in "OS" else names[lo:hi]).astype(object)
        return np.arange(lo, hi)

    def obs_column(self, key: str) -> np.ndarray | None:
        """A per-cell column of obs (e.g. ``n_counts``) as an array, or None when absent (cached)."""
        if key not in self._columns:
            self._columns[key] = self._read_obs_column(key)
        return self._columns[key]

    def _read_obs_column(self, key: str) -> np.ndarray | None:
        if self.column_reader is not None:
            return self.column_reader(key)
        if self.obs is not None:
            return np.asarray(self.obs[key]) if key in self.obs.columns else None
        if self.h5_obs is not None and key in self.h5_obs and key != self.h5_obs.attrs["_index"]:
            from anndata.io import read_elem

            return np.asarray(read_elem(self.h5_obs[key]))
        return None

    @property
    def n_obs(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.matrix.shape[1])

    def gene_names(self, gene_col: str | None = None) -> np.ndarray:
        """Gene identifiers: ``var_names`` or the column ``gene_col`` of ``var``, as strings."""
        if gene_col is None:
            return np.asarray(self.var.index.astype(str))
        if gene_col not in self.var.columns:
            cols = ", ".join(map(repr, self.var.columns[:20])) or "(none)"
            raise GeneIdentityError(
                f"Gene column {gene_col!r} is not in var of {self.where}. Available columns: "
                f"{cols}. Pass gene_col=None to use var_names, or one of the columns above."
            )
        values = self.var[gene_col]
        if values.isna().any():
            n = int(values.isna().sum())
            raise GeneIdentityError(
                f"Gene column {gene_col!r} of {self.where} has {n} missing values. Fill them or "
                "drop those genes before tokenizing."
            )
        return np.asarray(values.astype(str))


def as_source(
    data: Any,
    *,
    layer: str | None = None,
    var_names: Sequence[str] | None = None,
    use_raw: bool = False,
) -> ExpressionSource:
    """Wrap an AnnData or a bare matrix as an :class:`ExpressionSource` (no copy is made).

    ``layer`` picks ``adata.layers[layer]`` instead of ``X``; ``use_raw`` picks ``adata.raw``.
    A bare matrix needs ``var_names`` (one per column).
    """
    import anndata as ad

    if isinstance(data, (str, os.PathLike)):
        return _h5ad_source(Path(data), layer=layer, use_raw=use_raw)
    if isinstance(data, ad.AnnData):
        where = "the AnnData"
        if use_raw:
            if data.raw is None:
                raise InputDataError(
                    "use_raw=True but the AnnData has no .raw. Pass use_raw=False (and layer= "
                    "if the counts are in a layer)."
                )
            if layer is not None:
                raise InputDataError("Give either use_raw=True or layer=..., not both.")
            matrix, var = data.raw.X, data.raw.var
            where = "adata.raw"
        elif layer is not None:
            if layer not in data.layers:
                have = ", ".join(map(repr, data.layers.keys())) or "(none)"
                raise InputDataError(
                    f"Layer {layer!r} is not in the AnnData. Layers present: {have}. "
                    "Pass layer=None to use adata.X."
                )
            matrix, var = data.layers[layer], data.var
            where = f"adata.layers[{layer!r}]"
        else:
            matrix, var = data.X, data.var
            where = "adata.X"
        if matrix is None:
            raise InputDataError(f"{where} is empty (None). Load the expression matrix first.")
        source = ExpressionSource(matrix=matrix, var=var, obs=data.obs, where=where)
    else:
        if var_names is None:
            raise InputDataError(
                "A bare matrix was given without var_names. Pass var_names=[...] (one gene id "
                "per column) or pass an AnnData."
            )
        if not (isinstance(data, np.ndarray) or sp.issparse(data)):
            raise InputDataError(
                f"Expected an AnnData, a numpy array or a scipy sparse matrix, got "
                f"{type(data).__name__}."
            )
        if data.ndim != 2:
            raise InputDataError(f"Expected a 2-d cells x genes matrix, got shape {data.shape}.")
        names = pd.Index(np.asarray(var_names).astype(str))
        if len(names) != data.shape[1]:
            raise InputDataError(
                f"var_names has {len(names)} entries but the matrix has {data.shape[1]} columns."
            )
        source = ExpressionSource(
            matrix=data,
            var=pd.DataFrame(index=names),
            obs=None,  # cells are numbered 0..n-1
            where="the matrix",
        )
    if source.n_obs == 0 or source.n_vars == 0:
        raise InputDataError(
            f"{source.where} is empty ({source.n_obs} cells x {source.n_vars} genes); there is "
            "nothing to tokenize."
        )
    return source


def _h5ad_source(path: Path, *, layer: str | None, use_raw: bool) -> ExpressionSource:
    """Open an .h5ad for streaming: the matrix stays on disk, obs is read per chunk."""
    import h5py
    from anndata.io import read_elem

    try:
        from anndata.io import sparse_dataset
    except ImportError:  # anndata < 0.11
        from anndata.experimental import sparse_dataset

    if not path.exists():
        raise InputDataError(f"File {str(path)!r} not found. Give the path of an .h5ad file.")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputDataError(f"{str(path)!r} is not a readable .h5ad (HDF5) file: {exc}") from exc
    if "X" not in f or "var" not in f or "obs" not in f:
        raise InputDataError(f"{str(path)!r} is not an AnnData .h5ad file (no X/obs/var).")
    group, var_group, where = f, f["var"], f"{path.name}:X"
    if use_raw:
        if "raw" not in f:
            raise InputDataError(f"use_raw=True but {path.name} has no raw. Pass use_raw=False.")
        group, var_group, where = f["raw"], f["raw"]["var"], f"{path.name}:raw.X"
    element = group["X"]
    if layer is not None:
        layers = f["layers"] if "layers" in f else {}
        if layer not in layers:
            have = ", ".join(map(repr, layers.keys())) or "(none)"
            raise InputDataError(f"Layer {layer!r} is not in {path.name}. Layers present: {have}.")
        element, where = layers[layer], f"{path.name}:layers[{layer!r}]"
    kind = element.attrs.get("encoding-type", "array") if isinstance(element, h5py.Group) else "array"
    matrix = sparse_dataset(element) if kind in ("csr_matrix", "csc_matrix") else element
    source = ExpressionSource(matrix=matrix, var=read_elem(var_group), obs=None, where=where, h5_obs=f["obs"])
    if source.n_obs == 0 or source.n_vars == 0:
        raise InputDataError(f"{where} is empty ({source.n_obs} cells x {source.n_vars} genes).")
    return source


def _to_csr(block: Any) -> sp.csr_matrix:
    """Convert one row block (already a new object: a slice) to canonical float32/float64 CSR."""
    if sp.issparse(block):
        # a row slice is already a new object (scipy and anndata's backed datasets copy)
        csr = block if block.format == "csr" else sp.csr_matrix(block)
    else:  # numpy (or a backed dense slice): float16 and ints go to float32 before scipy sees them
        dense = np.asarray(block)
        if dense.dtype not in (np.float32, np.float64):
            dense = dense.astype(np.float32)
        csr = sp.csr_matrix(dense)
    if csr.dtype not in (np.float32, np.float64):
        # int counts, float16, bool: float32 is exact for counts < 2**24
        csr = csr.astype(np.float32)
    csr.sum_duplicates()
    csr.eliminate_zeros()  # canonical: sorted indices, no duplicate entries (COO input)
    return csr


def iter_row_chunks(
    source: ExpressionSource,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[int, int, sp.csr_matrix]]:
    """Yield ``(start, stop, csr)`` row blocks; only one block is in memory at a time.

    Blocks are canonical float CSR without stored zeros. For an in-memory canonical CSR matrix
    they are read-only views (no copy); otherwise private copies. Never write into a block.
    """
    if chunk_size < 1:
        raise InputDataError(f"chunk_size must be >= 1, got {chunk_size}.")
    stop = source.n_obs if stop is None else min(stop, source.n_obs)
    matrix = source.matrix
    if sp.issparse(matrix) and matrix.format not in ("csr", "csc"):
        # COO/DOK/LIL cannot be row-sliced cheaply; one conversion of the caller's matrix (a copy)
        matrix = matrix.tocsr()
    viewable = (
        sp.issparse(matrix) and matrix.format == "csr" and matrix.dtype in (np.float32, np.float64)
        and _is_canonical(matrix)
    )
    for lo in range(start, stop, chunk_size):
        hi = min(lo + chunk_size, stop)
        block = _csr_view(matrix, lo, hi) if viewable else None
        yield lo, hi, block if block is not None else _to_csr(matrix[lo:hi])


def _is_canonical(matrix: sp.csr_matrix) -> bool:
    """Sorted, duplicate-free indices. scipy's C check; it caches the answer as a flag on the
    matrix object (as scipy's own operations do), the data are not touched."""
    return bool(matrix.has_canonical_format)


def _csr_view(matrix: sp.csr_matrix, lo: int, hi: int) -> sp.csr_matrix | None:
    """Rows ``lo..hi-1`` as a read-only CSR view, or None when stored zeros need removing."""
    a, b = int(matrix.indptr[lo]), int(matrix.indptr[hi])
    data = matrix.data[a:b]
    if data.size and not data.all():
        return None
    data = data.view()
    indices = matrix.indices[a:b].view()
    data.flags.writeable = False
    indices.flags.writeable = False
    indptr = (matrix.indptr[lo : hi + 1] - a).astype(np.int64)
    view = sp.csr_matrix((data, indices, indptr), shape=(hi - lo, matrix.shape[1]), copy=False)
    view.has_sorted_indices = True
    view.has_canonical_format = True
    return view


def _first_entry(csr: sp.csr_matrix, mask: np.ndarray, first_row: int) -> str:
    """'cell i, gene column j' of the first True entry of ``mask``."""
    pos = int(np.flatnonzero(mask)[0])
    row = int(np.searchsorted(csr.indptr, pos, side="right")) - 1
    return f"first at cell {first_row + row}, gene column {int(csr.indices[pos])}"


def check_values(csr: sp.csr_matrix, where: str, rows: tuple[int, int] | None = None) -> None:
    """Raise :class:`InputDataError` for NaN, infinite or negative entries, naming the first one."""
    data = csr.data
    if data.size == 0:
        return
    first_row = rows[0] if rows else 0
    finite = np.isfinite(data)
    if not finite.all():
        raise InputDataError(
            f"{where} has {int((~finite).sum())} NaN or infinite values "
            f"({_first_entry(csr, ~finite, first_row)}). Expression must be finite: remove or "
            "impute them (e.g. np.nan_to_num) first."
        )
    if data.min() < 0:
        raise InputDataError(
            f"{where} has negative values (min {data.min():.4g}, "
            f"{_first_entry(csr, data < 0, first_row)}). Expression must be non-negative "
            "(counts or normalized/log1p counts), not scaled or centred data: use the raw counts "
            "layer (layer=... or use_raw=True)."
        )


def looks_like_counts(csr: sp.csr_matrix) -> bool:
    """True when every stored value is a non-negative integer."""
    data = csr.data
    return bool(data.size == 0 or np.all(data == np.floor(data)))


def require_counts(csr: sp.csr_matrix, where: str, rows: tuple[int, int] | None = None) -> None:
    """Raise when the values are not raw counts, saying whether they look log-transformed."""
    if looks_like_counts(csr):
        return
    data = csr.data
    span = f" (cells {rows[0]}..{rows[1] - 1})" if rows else ""
    frac = float(np.mean(data != np.floor(data)))
    hint = (
        f"They look log-transformed (max {float(data.max()):.3g})"
        if data.max() < 30
        else "They look normalized"
    )
    raise InputDataError(
        f"{where}{span} must hold raw integer counts, but {frac:.1%} of the non-zero values are "
        f"not integers. {hint}. Pass the raw counts (e.g. layer='counts' or use_raw=True)."
    )


def column_sums(source: ExpressionSource, chunk_size: int = DEFAULT_CHUNK_SIZE) -> np.ndarray:
    """Total of each column (float64), read in chunks."""
    out = np.zeros(source.n_vars, dtype=np.float64)
    for _, _, csr in iter_row_chunks(source, chunk_size):
        out += np.bincount(csr.indices, weights=csr.data.astype(np.float64), minlength=source.n_vars)
    return out
