"""Compiled per-cell kernels (numba) for the tokenizer hot paths.

Each kernel walks the cells of one CSR chunk in compiled code (never a Python loop) and reproduces
the NumPy reference kernels in ``_kernels.py`` bit for bit: the same float32/float64 operations in
the same order, the same hash for random draws. Tests check the two against each other and against
``np.quantile`` / ``np.digitize``. Kernels release the GIL, so chunk threads run them in parallel.

Binning uses a counting path for integer counts below 65,536 (a histogram per cell, no sort:
O(n + max count)) and a sort path otherwise.
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
def _cast(value, box: np.ndarray):
    """``value`` converted to the dtype of the one-element scratch array ``box`` (as astype)."""
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def bin_chunk(
    indptr: np.ndarray,
    data: np.ndarray,
    indices: np.ndarray,
    column_tokens: np.ndarray,
    q: np.ndarray,
    target_sum: float,
    normalize: bool,
    log1p: bool,
    random_ties: bool,
    salt: np.uint64,
    first_cell: int,
    edges: np.ndarray,
    out: np.ndarray,
    out_genes: np.ndarray,
    shift: int,
) -> None:
    """scGPT value bins for every entry of a CSR chunk.

    Entry ``i`` of row ``r`` (gene token ``column_tokens[indices[i]]``) gets its bin in
    ``out[i + shift * (r + 1)]`` and, when ``out_genes`` is not empty, its token there too
    (``shift=1`` leaves room for a ``<cls>`` before every cell; ``shift=0`` writes entry-aligned).
    ``edges`` [rows, len(q)] receives each cell's quantile edges. With ``random_ties`` a value on
    tied edges gets ``left - floor(r * (left - right))`` with ``r`` the (seed, cell, gene) hash,
    otherwise ``left`` (the ``np.digitize`` result).
    """
    write_genes = out_genes.size > 0
    n_rows = indptr.size - 1
    n_edges = q.size
    box = np.empty(1, dtype=data.dtype)  # for conversions to the data dtype without allocating
    # scratch tables indexed by count value, valid for a row where stamp == row (no clearing)
    stamp = np.full(_HIST_LIMIT, -1, dtype=np.int64)
    hist = np.zeros(_HIST_LIMIT, dtype=np.int64)
    done = np.full(_HIST_LIMIT, -1, dtype=np.int64)
    scaled_row = np.full(_HIST_LIMIT, -1, dtype=np.int64)
    scaled_of = np.zeros(_HIST_LIMIT, dtype=data.dtype)
    left_of = np.zeros(_HIST_LIMIT, dtype=np.int64)
    right_of = np.zeros(_HIST_LIMIT, dtype=np.int64)
    for row in range(n_rows):
        lo = indptr[row]
        hi = indptr[row + 1]
        n = hi - lo
        if n == 0:
            for j in range(n_edges):
                edges[row, j] = 0.0
            continue
        # one pass: total, and a histogram of counts while the values are small integers
        total = 0.0
        use_hist = True
        max_c = 0
        for i in range(lo, hi):
            v = data[i]
            total += v
            if use_hist:
                if v < _HIST_LIMIT and int(v) == v:
                    c = int(v)
                    if stamp[c] != row:
                        stamp[c] = row
                        hist[c] = 0
                    hist[c] += 1
                    if c > max_c:
                        max_c = c
                else:
                    use_hist = False
        if use_hist and max_c > 8 * n + 64:  # few, large counts: sorting is cheaper than the walk
            use_hist = False
        factor = data[lo]  # unused unless normalize
        if normalize:
            factor = _cast(total, box) / _cast(target_sum, box)
        if not use_hist:
            xs = np.empty(n, dtype=data.dtype)
            for i in range(n):
                xs[i] = _scale(data[lo + i], factor, normalize, log1p)
            xs.sort()
        # quantile edges, as np.quantile(..., method="linear"); positions only increase with j
        walk = 0  # smallest count value whose cumulative frequency exceeds the position
        below = 0  # entries with a count < walk
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
                while below + (hist[walk] if stamp[walk] == row else 0) <= pa:
                    below += hist[walk] if stamp[walk] == row else 0
                    walk += 1
                va = walk
                vb = walk
                upto = below + hist[vb]
                while upto <= pb:
                    vb += 1
                    upto += hist[vb] if stamp[vb] == row else 0
                if scaled_row[va] != row:  # each distinct count is scaled once per row
                    scaled_row[va] = row
                    scaled_of[va] = _scale(_cast(va, box), factor, normalize, log1p)
                if scaled_row[vb] != row:
                    scaled_row[vb] = row
                    scaled_of[vb] = _scale(_cast(vb, box), factor, normalize, log1p)
                a = scaled_of[va]
                b = scaled_of[vb]
            else:
                a = xs[pa]
                b = xs[pb]
            edges[row, j] = _edge(a, b, gamma)
        cell_key = _mix32(np.uint64(first_cell + row) ^ salt)
        offset = shift * (row + 1)
        for i in range(lo, hi):
            token = column_tokens[indices[i]]
            if use_hist:  # digitize each distinct count once per row
                c = int(data[i])
                if done[c] != row:
                    done[c] = row
                    if scaled_row[c] != row:
                        scaled_row[c] = row
                        scaled_of[c] = _scale(data[i], factor, normalize, log1p)
                    x = scaled_of[c]
                    left_of[c] = _count_le(edges, row, x)
                    right_of[c] = _count_lt(edges, row, x)
                left = left_of[c]
                right = right_of[c]
            else:
                x = _scale(data[i], factor, normalize, log1p)
                left = _count_le(edges, row, x)
                right = _count_lt(edges, row, x)
            if random_ties and left != right:
                gene = (np.uint64(token) * np.uint64(0x27D4EB2F)) & np.uint64(0xFFFFFFFF)
                r = np.float64(np.int64(_mix32(cell_key ^ gene))) * (1.0 / 4294967296.0)
                left = left - int(r * (left - right))  # r * d >= 0, so int() is floor
            out[i + offset] = left
            if write_genes:
                out_genes[i + offset] = token


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
