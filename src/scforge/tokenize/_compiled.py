"""Compiled per-cell kernels (numba) for the tokenizer hot paths.

Each kernel walks the cells of one CSR chunk in compiled code (never a Python loop) and reproduces
the NumPy reference kernels in ``_kernels.py`` bit for bit: the same float32/float64 operations in
the same order, the same hash for random draws. Tests check the two against each other and against
``np.quantile`` / ``np.digitize``. Kernels release the GIL, so chunk threads run them in parallel.

Binning uses a counting path for integer counts (a histogram per cell, no sort: O(n + max count))
and a sort path otherwise.
"""

from __future__ import annotations

import numba
import numpy as np

_HIST_LIMIT = 1 << 16  # largest count handled by the counting path


@numba.njit(cache=True, inline="always")
def _mix32(x: np.uint64) -> np.uint64:
    """lowbias32 on the low 32 bits (same as ``_kernels._lowbias32``)."""
    m = np.uint64(0xFFFFFFFF)
    x = x & m
    x ^= x >> np.uint64(16)
    x = (x * np.uint64(0x7FEB352D)) & m
    x ^= x >> np.uint64(15)
    x = (x * np.uint64(0x846CA68B)) & m
    x ^= x >> np.uint64(16)
    return x


@numba.njit(cache=True, inline="always")
def _count_le(edges: np.ndarray, row: int, x: float) -> int:
    """Number of edges <= x in a sorted row (np.digitize(x, edges))."""
    lo, hi = 0, edges.shape[1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[row, mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, inline="always")
def _count_lt(edges: np.ndarray, row: int, x: float) -> int:
    """Number of edges < x in a sorted row (np.digitize(x, edges, right=True))."""
    lo, hi = 0, edges.shape[1]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[row, mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, inline="always")
def _cast(value, like: np.ndarray):
    """``value`` converted to the dtype of ``like`` (as NumPy's astype)."""
    box = np.empty(1, dtype=like.dtype)
    box[0] = value
    return box[0]


@numba.njit(cache=True, inline="always")
def _scale(v, factor, normalize: bool, log1p: bool):
    """``v / factor`` then ``log1p`` in the data dtype, as ``_kernels.scale_values``."""
    x = v / factor if normalize else v
    if log1p:
        x = np.log1p(x)
    return x


@numba.njit(cache=True, inline="always")
def _edge(a, b, gamma: float) -> float:
    """NumPy's two-sided lerp: ``b - a`` in the data dtype, then float64 with ``gamma``."""
    diff = b - a
    if gamma >= 0.5:
        return b - diff * (1.0 - gamma)
    return a + diff * gamma


@numba.njit(cache=True, nogil=True)
def bin_chunk(
    indptr: np.ndarray,
    data: np.ndarray,
    tokens: np.ndarray,
    q: np.ndarray,
    target_sum: float,
    normalize: bool,
    log1p: bool,
    random_ties: bool,
    salt: np.uint64,
    first_cell: int,
    edges: np.ndarray,
    out: np.ndarray,
) -> None:
    """scGPT value bins for every entry of a CSR chunk, written to ``out`` (float32).

    ``edges`` [rows, len(q)] receives each cell's quantile edges. With ``random_ties`` a value on
    tied edges gets ``left - floor(r * (left - right))`` with ``r`` the (seed, cell, gene) hash,
    otherwise ``left`` (the ``np.digitize`` result).
    """
    n_rows = indptr.size - 1
    n_edges = q.size
    for row in range(n_rows):
        lo = indptr[row]
        hi = indptr[row + 1]
        n = hi - lo
        if n == 0:
            for j in range(n_edges):
                edges[row, j] = 0.0
            continue
        factor = data[lo]  # unused unless normalize
        if normalize:
            total = 0.0
            for i in range(lo, hi):
                total += data[i]
            factor = _cast(total, data) / _cast(target_sum, data)
        # counting path for integer counts, sort path otherwise
        max_v = data[lo]
        integral = True
        for i in range(lo, hi):
            v = data[i]
            if v > max_v:
                max_v = v
            if integral and v != np.floor(v):
                integral = False
        use_hist = integral and max_v < _HIST_LIMIT and max_v <= 8 * n + 64
        if use_hist:
            m = int(max_v) + 1
            cum = np.zeros(m, dtype=np.int64)
            for i in range(lo, hi):
                cum[int(data[i])] += 1
            for v in range(1, m):
                cum[v] += cum[v - 1]
        else:
            xs = np.empty(n, dtype=data.dtype)
            for i in range(n):
                xs[i] = _scale(data[lo + i], factor, normalize, log1p)
            xs.sort()
        # quantile edges, as np.quantile(..., method="linear")
        walk = 0  # histogram walk position (positions are visited in increasing order)
        for j in range(n_edges):
            virtual = (n - 1) * q[j]
            if virtual >= n - 1:
                pa = n - 1
                pb = n - 1
                gamma = virtual + 1.0
            else:
                prev = np.floor(virtual)
                pa = int(prev)
                pb = pa + 1
                gamma = virtual - prev
            if use_hist:
                while cum[walk] <= pa:
                    walk += 1
                va = walk
                vb = walk
                while cum[vb] <= pb:
                    vb += 1
                a = _scale(_cast(va, data), factor, normalize, log1p)
                b = _scale(_cast(vb, data), factor, normalize, log1p)
            else:
                a = xs[pa]
                b = xs[pb]
            edges[row, j] = _edge(a, b, gamma)
        cell_key = _mix32(np.uint64(first_cell + row) ^ salt)
        if use_hist:  # digitize each distinct count once
            left_of = np.full(m, -1, dtype=np.int64)
            right_of = np.zeros(m, dtype=np.int64)
        for i in range(lo, hi):
            if use_hist:
                c = int(data[i])
                if left_of[c] < 0:
                    x = _scale(data[i], factor, normalize, log1p)
                    left_of[c] = _count_le(edges, row, x)
                    right_of[c] = _count_lt(edges, row, x)
                left = left_of[c]
                right = right_of[c]
            else:
                x = _scale(data[i], factor, normalize, log1p)
                left = _count_le(edges, row, x)
                right = _count_lt(edges, row, x)
            if random_ties and left != right:
                gene = (np.uint64(tokens[i]) * np.uint64(0x27D4EB2F)) & np.uint64(0xFFFFFFFF)
                r = float(_mix32(cell_key ^ gene)) * (1.0 / 4294967296.0)
                left = left - int(np.floor(r * (left - right)))
            out[i] = left


@numba.njit(cache=True, nogil=True)
def rank_chunk(
    indptr: np.ndarray,
    data: np.ndarray,
    tokens: np.ndarray,
    n_counts: np.ndarray,
    medians: np.ndarray,
    target_sum: float,
    limit: int,
    out_lengths: np.ndarray,
    out_order: np.ndarray,
) -> None:
    """Geneformer rank value order of every cell of a CSR chunk.

    Score ``data / n_counts * target_sum / median[token]`` in float64; entries of each row sorted by
    score descending, ties kept in entry order (a stable sort; entries are in token order). Writes
    the first ``limit`` entry indices of row ``r`` to ``out_order[indptr[r]:]`` and their number
    to ``out_lengths[r]``.
    """
    n_rows = indptr.size - 1
    for row in range(n_rows):
        lo = indptr[row]
        hi = indptr[row + 1]
        n = hi - lo
        neg = np.empty(n, dtype=np.float64)
        for i in range(n):
            neg[i] = -(np.float64(data[lo + i]) / n_counts[row] * target_sum / medians[tokens[lo + i]])
        order = np.argsort(neg, kind="mergesort")
        k = min(n, limit)
        for i in range(k):
            out_order[lo + i] = lo + order[i]
        out_lengths[row] = k
