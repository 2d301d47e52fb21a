"""Vectorized CSR kernels shared by the tokenizers.

No function here loops over cells in Python: per-cell work is expressed as operations on the CSR
``data``/``indices``/``indptr`` arrays of a row chunk, with segmented sorts done through one global
integer sort of ``(row << 32) | monotone_code(value)`` keys.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def row_index(indptr: np.ndarray) -> np.ndarray:
    """Row number of every stored entry (int64)."""
    counts = np.diff(indptr)
    return np.repeat(np.arange(counts.size, dtype=np.int64), counts)


# --------------------------------------------------------------------------------------------
# Counter-based randomness: the same (seed, cell, gene) always gives the same number, so results
# do not depend on chunk size, cell order within a chunk or which other genes are present.
# --------------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    x += np.uint64(0x9E3779B97F4A7C15)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def hash_uniform(seed: int, stream: int, cells: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) keyed by (seed, stream, cell, gene); float64, same shape as cells."""
    salt = _splitmix64(np.array([(seed & 0xFFFFFFFF) << 8 | (stream & 0xFF)], dtype=np.uint64))[0]
    key = (cells.astype(np.uint64) << np.uint64(32)) | (genes.astype(np.uint64) & np.uint64(0xFFFFFFFF))
    bits = _splitmix64(key ^ salt)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)


# --------------------------------------------------------------------------------------------
# Monotone integer codes for positive floats, and per-row sorting through them
# --------------------------------------------------------------------------------------------


class ValueCodes:
    """Integer codes that order positive values exactly, plus edge codes for exact comparisons.

    float32 values use their IEEE bit pattern (monotone for positive floats). float64 values use
    their rank among the distinct values of the chunk. For an edge ``e`` (float64),
    ``x >= e  <=>  code(x) >= ceil_code(e)`` and ``x > e  <=>  code(x) > floor_code(e)``.
    """

    def __init__(self, data: np.ndarray) -> None:
        self.dtype = data.dtype
        if data.dtype == np.float32:
            self.codes = data.view(np.uint32).astype(np.int64)
            self._unique = None
        else:
            self._unique, inverse = np.unique(data, return_inverse=True)
            self.codes = inverse.astype(np.int64)

    def ceil_code(self, edges: np.ndarray) -> np.ndarray:
        if self._unique is None:
            f = edges.astype(np.float32)
            f = np.where(f.astype(np.float64) < edges, np.nextafter(f, np.float32(np.inf)), f)
            return f.view(np.uint32).astype(np.int64)
        return np.searchsorted(self._unique, edges, side="left").astype(np.int64)

    def floor_code(self, edges: np.ndarray) -> np.ndarray:
        if self._unique is None:
            f = edges.astype(np.float32)
            f = np.where(f.astype(np.float64) > edges, np.nextafter(f, np.float32(0)), f)
            return f.view(np.uint32).astype(np.int64)
        return np.searchsorted(self._unique, edges, side="right").astype(np.int64) - 1


def sort_within_rows(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation ordering entries by (row, code) ascending, and the sorted keys."""
    keys = (rows << np.int64(32)) | codes
    perm = np.argsort(keys, kind="stable")
    return perm, keys[perm]


# --------------------------------------------------------------------------------------------
# scGPT value binning
# --------------------------------------------------------------------------------------------


def quantile_edges(sorted_values: np.ndarray, indptr: np.ndarray, n_edges: int) -> np.ndarray:
    """Per-row ``np.quantile(row_nonzeros, np.linspace(0, 1, n_edges))``, bit for bit.

    ``sorted_values`` are the stored values sorted within each row. Rows without entries get
    zeros. The arithmetic follows NumPy's 'linear' method exactly: virtual index ``(n-1)*q`` in
    float64, the difference ``b - a`` in the data dtype, and the two-sided lerp.
    """
    n_rows = indptr.size - 1
    lengths = np.diff(indptr)
    edges = np.zeros((n_rows, n_edges), dtype=np.float64)
    filled = lengths > 0
    if not filled.any():
        return edges
    q = np.linspace(0, 1, n_edges)
    n = lengths[filled].astype(np.int64)[:, None]
    virtual = (n - 1) * q  # float64, as numpy's _compute_virtual_index for 'linear'
    prev = np.floor(virtual)
    above = virtual >= (n - 1)
    gamma = virtual - np.where(above, -1.0, prev)
    prev_i = np.where(above, n - 1, prev.astype(np.int64))
    next_i = np.where(above, n - 1, prev_i + 1)
    start = indptr[:-1][filled][:, None]
    a = sorted_values[start + prev_i]
    b = sorted_values[start + next_i]
    diff = b - a  # data dtype (float32 for float32 input), as in numpy's _lerp
    low = np.add(a, diff * gamma)
    high = np.subtract(b, diff * (1 - gamma))
    edges[filled] = np.where(gamma >= 0.5, high, low)
    return edges


def digitize_rows(
    codes: ValueCodes,
    rows: np.ndarray,
    indptr: np.ndarray,
    edges: np.ndarray,
    *,
    perm: np.ndarray,
    sorted_keys: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Per entry: ``(np.digitize(x, row_edges), np.digitize(x, row_edges, right=True))``.

    Counts edges <= x and edges < x with one search of each row's edges into the row-sorted keys,
    then a segmented cumulative sum; results come back in the original entry order.
    """
    n_rows, n_edges = edges.shape
    nnz = sorted_keys.size
    row_of_edge = np.repeat(np.arange(n_rows, dtype=np.int64), n_edges)
    row_end = np.repeat(indptr[1:], n_edges)
    flat = edges.ravel()

    lengths = np.diff(indptr)
    row_start = indptr[:-1]

    def count_from(edge_keys: np.ndarray, side: str) -> np.ndarray:
        pos = np.searchsorted(sorted_keys, edge_keys, side=side)
        pos = pos[pos < row_end]  # an edge above every value of its row counts for none
        csum = np.cumsum(np.bincount(pos, minlength=nnz)[:nnz])
        base = np.where(row_start > 0, csum[np.maximum(row_start - 1, 0)], 0)
        return csum - np.repeat(base, lengths)

    ceil_keys = (row_of_edge << np.int64(32)) | codes.ceil_code(flat)
    floor_keys = (row_of_edge << np.int64(32)) | codes.floor_code(flat)
    # edges <= x  <=>  code(x) >= ceil_code(e): the first sorted position with key >= ceil key
    left_sorted = count_from(ceil_keys, "left")
    # edges < x   <=>  code(x) > floor_code(e): the first sorted position with key > floor key
    right_sorted = count_from(floor_keys, "right")
    left = np.empty(nnz, dtype=np.int64)
    right = np.empty(nnz, dtype=np.int64)
    left[perm] = left_sorted
    right[perm] = right_sorted
    return left, right


# --------------------------------------------------------------------------------------------
# Normalization (scanpy arithmetic) and CSR helpers
# --------------------------------------------------------------------------------------------


def normalize_total_csr(csr: sp.csr_matrix, target_sum: float) -> np.ndarray:
    """Return ``data`` scaled like ``sc.pp.normalize_total(target_sum=...)`` (no copy of indices).

    Per-cell totals are summed in float64 and stored in the data dtype, divided by the target,
    then each value is divided by its cell's factor, matching scanpy's CSR path.
    """
    data = csr.data
    lengths = np.diff(csr.indptr)
    # sequential float64 sums per row, as scanpy's numba loop; stored in the data dtype
    totals64 = np.bincount(row_index(csr.indptr), weights=data.astype(np.float64), minlength=lengths.size)
    totals = totals64.astype(data.dtype)
    factors = totals / target_sum
    return data / np.repeat(factors, lengths)


def remap_columns(csr: sp.csr_matrix, colmap: np.ndarray, n_out: int, sort: bool) -> sp.csr_matrix:
    """Keep columns with ``colmap >= 0``, renumber them, and sum columns mapped together."""
    new_cols = colmap[csr.indices]
    keep = new_cols >= 0
    rows = row_index(csr.indptr)[keep]
    counts = np.bincount(rows, minlength=csr.shape[0])
    indptr = np.zeros(csr.shape[0] + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    out = sp.csr_matrix((csr.data[keep], new_cols[keep], indptr), shape=(csr.shape[0], n_out))
    if sort:
        out.sum_duplicates()
    return out


def take_first_k_per_row(rows: np.ndarray, indptr: np.ndarray, order_codes: np.ndarray, k: int) -> np.ndarray:
    """Boolean mask keeping, in each row, the ``k`` entries with the smallest ``order_codes``."""
    perm, sorted_keys = sort_within_rows(rows, order_codes)
    rank = np.arange(sorted_keys.size, dtype=np.int64) - indptr[:-1][sorted_keys >> np.int64(32)]
    keep = np.empty(rows.size, dtype=bool)
    keep[perm] = rank < k
    return keep
