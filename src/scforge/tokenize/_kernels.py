"""Vectorized CSR kernels shared by the tokenizers.

No function here loops over cells in Python: per-cell work is expressed as operations on the CSR
``data``/``indices``/``indptr`` arrays of a row chunk, with segmented sorts done through one global
integer sort of ``(row << 32) | monotone_code(value)`` keys.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

def row_index(indptr: np.ndarray) -> np.ndarray:
    """Row number of every stored entry (int64)."""
    counts = np.diff(indptr)
    return np.repeat(np.arange(counts.size, dtype=np.int64), counts)


# --------------------------------------------------------------------------------------------
# Counter-based randomness: the same (seed, cell, gene) always gives the same number, so results
# do not depend on chunk size, cell order within a chunk or which other genes are present.
# --------------------------------------------------------------------------------------------


def _lowbias32(x: np.ndarray) -> np.ndarray:
    """A strong 32-bit integer mixer (Wellons' lowbias32); in place on a uint32 array."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x7FEB352D)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x846CA68B)
    x ^= x >> np.uint32(16)
    return x


def hash_salt(seed: int, stream: int) -> np.uint32:
    """The mixed (seed, stream) part of :func:`row_hash_uniform`'s key."""
    return _lowbias32(np.array([(seed * 0x9E3779B1 + stream * 0x85EBCA77) & 0xFFFFFFFF], dtype=np.uint32))[0]


def row_hash_uniform(seed: int, stream: int, first_cell: int, indptr: np.ndarray, genes: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per CSR entry, keyed by (seed, stream, cell, gene).

    Two rounds of a 32-bit mixer: one over (seed, stream, cell index), one over that and the gene
    token. A pure function of its inputs, so chunking and threads cannot change the draws.
    """
    n_rows = indptr.size - 1
    salt = hash_salt(seed, stream)
    cells = np.arange(first_cell, first_cell + n_rows, dtype=np.int64).astype(np.uint32)
    cell_key = np.repeat(_lowbias32(cells ^ salt), np.diff(indptr))
    cell_key ^= genes.astype(np.uint32) * np.uint32(0x27D4EB2F)
    return _lowbias32(cell_key) * (1.0 / 4294967296.0)


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
            self.codes = inverse.astype(np.int64) + 1  # 0 stays free for "below every value"

    def ceil_code(self, edges: np.ndarray) -> np.ndarray:
        if self._unique is None:
            f = edges.astype(np.float32)
            f = np.where(f.astype(np.float64) < edges, np.nextafter(f, np.float32(np.inf)), f)
            return f.view(np.uint32).astype(np.int64)
        return np.searchsorted(self._unique, edges, side="left").astype(np.int64) + 1

    def floor_code(self, edges: np.ndarray) -> np.ndarray:
        if self._unique is None:
            f = edges.astype(np.float32)
            f = np.where(f.astype(np.float64) > edges, np.nextafter(f, np.float32(0)), f)
            return f.view(np.uint32).astype(np.int64)
        return np.searchsorted(self._unique, edges, side="right").astype(np.int64)


def sort_within_rows(rows: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Stable permutation ordering entries by (row, code) ascending, and the sorted keys."""
    keys = (rows << np.int64(32)) | codes
    perm = np.argsort(keys, kind="stable")
    return perm, keys[perm]


# --------------------------------------------------------------------------------------------
# scGPT value binning
# --------------------------------------------------------------------------------------------


def _quantile_plan(lengths: np.ndarray, n_edges: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Positions and weights of ``np.quantile(row, linspace(0, 1, n_edges))`` for rows of ``lengths``.

    Returns ``(filled, prev_i, next_i, gamma)`` for the non-empty rows, following NumPy's 'linear'
    method exactly: virtual index ``(n - 1) * q`` in float64; at or above the last index both
    neighbours are the last element.
    """
    filled = lengths > 0
    q = np.linspace(0, 1, n_edges)
    n = lengths[filled].astype(np.int64)[:, None]
    virtual = (n - 1) * q
    prev = np.floor(virtual)
    above = virtual >= (n - 1)
    gamma = virtual - np.where(above, -1.0, prev)
    prev_i = np.where(above, n - 1, prev.astype(np.int64))
    next_i = np.where(above, n - 1, prev_i + 1)
    return filled, prev_i, next_i, gamma


def _lerp(a: np.ndarray, b: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    """NumPy's two-sided lerp: ``b - a`` in the data dtype, then float64 with ``gamma``."""
    diff = b - a
    low = np.add(a, diff * gamma)
    high = np.subtract(b, diff * (1 - gamma))
    return np.where(gamma >= 0.5, high, low)


def quantile_edges(sorted_values: np.ndarray, indptr: np.ndarray, n_edges: int) -> np.ndarray:
    """Per-row ``np.quantile(row_nonzeros, np.linspace(0, 1, n_edges))``, bit for bit.

    ``sorted_values`` are the stored values sorted within each row. Rows without entries get zeros.
    """
    lengths = np.diff(indptr)
    edges = np.zeros((lengths.size, n_edges), dtype=np.float64)
    filled, prev_i, next_i, gamma = _quantile_plan(lengths, n_edges)
    if filled.any():
        start = indptr[:-1][filled][:, None]
        edges[filled] = _lerp(sorted_values[start + prev_i], sorted_values[start + next_i], gamma)
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


def row_factors(data: np.ndarray, indptr: np.ndarray, target_sum: float) -> np.ndarray:
    """scanpy ``normalize_total`` size factors: row totals (summed in float64, stored in the data
    dtype) divided by ``target_sum``."""
    lengths = np.diff(indptr)
    totals64 = np.bincount(row_index(indptr), weights=data.astype(np.float64), minlength=lengths.size)
    return totals64.astype(data.dtype) / target_sum


def scale_values(data: np.ndarray, rows: np.ndarray, factors: np.ndarray | None, log1p: bool) -> np.ndarray:
    """``data / factor[row]`` then optionally ``log1p``, with scanpy's arithmetic (a new array)."""
    out = data / factors[rows] if factors is not None else data.copy()
    if log1p:
        np.log1p(out, out=out)
    return out


def normalize_total_csr(csr: sp.csr_matrix, target_sum: float) -> np.ndarray:
    """Return ``data`` scaled like ``sc.pp.normalize_total(target_sum=...)`` on this CSR chunk."""
    return scale_values(csr.data, row_index(csr.indptr), row_factors(csr.data, csr.indptr, target_sum), False)


# --------------------------------------------------------------------------------------------
# Binning dispatch: sort path (any values) and histogram path (integer counts)
# --------------------------------------------------------------------------------------------


def bin_limits(
    data: np.ndarray,
    indptr: np.ndarray,
    n_edges: int,
    *,
    factors: np.ndarray | None,
    log1p: bool,
    rows: np.ndarray | None = None,
    max_table: int = 8_000_000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row quantile edges of the scaled values and each entry's two ``np.digitize`` results.

    Values are ``scale_values(data, ...)``. Returns ``(left, right, edges)``: ``left`` counts
    edges <= x, ``right`` edges < x, ``edges`` is ``[rows, n_edges]`` float64. Integer data
    (raw counts) with few distinct values take a histogram path that never sorts the entries;
    anything else sorts within rows. Both give identical results (tested).
    """
    rows = row_index(indptr) if rows is None else rows
    if data.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.copy(), np.zeros((indptr.size - 1, n_edges), dtype=np.float64)
    if data.max() < 2**31:
        counts = data.astype(np.int32)
        if np.array_equal(counts, data):  # integer counts
            result = _bin_limits_counts(counts, data.dtype, rows, indptr, n_edges, factors, log1p, max_table)
            if result is not None:
                return result
    return _bin_limits_sorted(data, rows, indptr, n_edges, factors, log1p)


def _bin_limits_sorted(data, rows, indptr, n_edges, factors, log1p):
    x = scale_values(data, rows, factors, log1p)
    codes = ValueCodes(x)
    perm, sorted_keys = sort_within_rows(rows, codes.codes)
    edges = quantile_edges(x[perm], indptr, n_edges)
    left, right = digitize_rows(codes, rows, indptr, edges, perm=perm, sorted_keys=sorted_keys)
    return left, right, edges


def _bin_limits_counts(counts, dtype, rows, indptr, n_edges, factors, log1p, max_table):
    """Histogram path: per row, how many entries hold each distinct count.

    Scaling is monotone within a row, so the sorted scaled row is the scaled sorted counts: the
    quantile neighbours are found in cumulative histograms and only those counts are scaled (with
    the same elementwise arithmetic as the sort path, hence the same floats). Each (row, distinct
    count) cell is digitized once and entries look their result up.
    """
    n_rows = indptr.size - 1
    if counts.size == 0:
        return None
    present = np.zeros(int(counts.max()) + 1, dtype=bool)
    present[counts] = True
    values = np.flatnonzero(present)  # distinct counts in the chunk, ascending
    n_values = values.size
    if n_rows * n_values > max_table:
        return None
    code_of = np.zeros(present.size, dtype=np.int32)
    code_of[values] = np.arange(n_values, dtype=np.int32)
    cell = code_of[counts]  # (row, distinct count) of every entry, as one int32 index
    cell += rows.astype(np.int32) * np.int32(n_values)
    hist = np.bincount(cell, minlength=n_rows * n_values).reshape(n_rows, n_values)
    cum = np.cumsum(hist, axis=1)
    lengths = cum[:, -1]
    span = int(lengths.max()) + 1
    cum_flat = (cum + (np.arange(n_rows, dtype=np.int64) * span)[:, None]).ravel()  # globally sorted

    def scaled(row_ids: np.ndarray, value_codes: np.ndarray) -> np.ndarray:
        v = values[value_codes].astype(dtype)
        return scale_values(v, row_ids, factors, log1p)

    edges = np.zeros((n_rows, n_edges), dtype=np.float64)
    filled, prev_i, next_i, gamma = _quantile_plan(lengths, n_edges)
    if filled.any():
        frows = np.flatnonzero(filled)[:, None]

        def value_code_at(position: np.ndarray) -> np.ndarray:  # d with cum[r, d-1] <= k < cum[r, d]
            found = np.searchsorted(cum_flat, frows * span + position, side="right")
            return found - frows * n_values

        rr = np.broadcast_to(frows, prev_i.shape)
        a = scaled(rr, value_code_at(prev_i))
        b = scaled(rr, value_code_at(next_i))
        edges[filled] = _lerp(a, b, gamma)
    cell_rows, cell_codes = np.nonzero(hist)  # row-major: by row, then ascending value
    x = scaled(cell_rows, cell_codes)
    codes = ValueCodes(x)
    edge_rows = np.repeat(np.arange(n_rows, dtype=np.int64), n_edges)
    flat_edges = edges.ravel()
    ceil_keys = (edge_rows << np.int64(32)) | codes.ceil_code(flat_edges)
    floor_keys = (edge_rows << np.int64(32)) | codes.floor_code(flat_edges)
    x_keys = (cell_rows.astype(np.int64) << np.int64(32)) | codes.codes
    base = cell_rows.astype(np.int64) * n_edges
    table_left = np.zeros(n_rows * n_values, dtype=np.int32)
    table_right = np.zeros(n_rows * n_values, dtype=np.int32)
    flat_cell = cell_rows.astype(np.int64) * n_values + cell_codes
    table_left[flat_cell] = np.searchsorted(ceil_keys, x_keys, side="right") - base  # edges <= x
    table_right[flat_cell] = np.searchsorted(floor_keys, x_keys, side="left") - base  # edges < x
    return table_left[cell].astype(np.int64), table_right[cell].astype(np.int64), edges


def remap_columns(csr: sp.csr_matrix, colmap: np.ndarray, n_out: int, sort: bool) -> sp.csr_matrix:
    """Keep columns with ``colmap >= 0``, renumber them, and sum columns mapped together."""
    if not sort and colmap.size == n_out and np.array_equal(colmap, np.arange(n_out)):
        return csr  # already in output space
    new_cols = colmap[csr.indices]
    keep = new_cols >= 0
    kept_before = np.zeros(keep.size + 1, dtype=np.int64)
    np.cumsum(keep, out=kept_before[1:])
    indptr = kept_before[csr.indptr]
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
