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
def _count_le(edges: np.ndarray, x: float) -> int:
    """Number of edges <= x in a sorted row (np.digitize(x, edges))."""
    lo, hi = 0, edges.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] <= x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@numba.njit(cache=True, inline="always")
def _count_lt(edges: np.ndarray, x: float) -> int:
    """Number of edges < x in a sorted row (np.digitize(x, edges, right=True))."""
    lo, hi = 0, edges.shape[0]
    while lo < hi:
        mid = (lo + hi) >> 1
        if edges[mid] < x:
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


@numba.njit(cache=True, inline="always")
def _mix_gene(cell_key: np.uint64, token) -> np.uint64:
    """The (cell, gene) hash bits (as ``_kernels.row_hash_uniform``)."""
    gene = (np.uint64(token) * np.uint64(0x27D4EB2F)) & np.uint64(0xFFFFFFFF)
    return _mix32(cell_key ^ gene)


@numba.njit(cache=True, inline="always")
def _tie_draw(cell_key: np.uint64, token, width) -> int:
    """``floor(r * width)`` for ``r = hash / 2**32`` in [0, 1): in integers, ``hash * width >> 32``
    (exact, so equal to the float64 product of the NumPy kernel, which is exact below 2**53)."""
    return np.int64((_mix_gene(cell_key, token) * np.uint64(width)) >> np.uint64(32))


@numba.njit(cache=True, nogil=True, error_model="numpy")
def _bin_row(
    lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties, cell_key, tag,
    box, stamp, hist, distinct, scaled_of, left_of, width_of, edges_row, row_vals, row_tokens, row_digits,
):
    """Bins of one cell's expressed, matched genes (CSR entries ``lo..hi-1``).

    Entries with value 0 or ``column_tokens[column] < 0`` are skipped. Writes the kept entries'
    tokens and bins, in CSR order, to ``row_tokens[:n]`` / ``row_digits[:n]`` and the cell's
    quantile edges to ``edges_row``; returns ``n``, or -1 when a value is negative or not finite.
    Counting path: ``hist`` is indexed by count value and valid where ``stamp`` equals ``tag``
    (unique per cell), so it is never cleared; ``distinct`` lists the cell's distinct counts, whose
    bins (``left_of``, and ``width_of`` = left - right digitize for ties) are computed once each.
    """
    n_edges = q.size
    n = 0
    n_distinct = 0
    total = 0.0
    use_hist = True
    max_c = 0
    for i in range(lo, hi):
        v = data[i]
        if not (v >= 0 and v < np.inf):
            return -1  # negative, NaN or infinite: the caller reports it
        if v == 0:
            continue
        token = column_tokens[indices[i]]
        if token < 0:
            continue
        row_vals[n] = v
        row_tokens[n] = token
        n += 1
        total += v
        if use_hist:  # a histogram of counts while the values are small positive integers
            if v < stamp.size and int(v) == v:
                c = int(v)
                if stamp[c] != tag:
                    stamp[c] = tag
                    hist[c] = 0
                    distinct[n_distinct] = c
                    n_distinct += 1
                hist[c] += 1
                if c > max_c:
                    max_c = c
            else:
                use_hist = False
    if n == 0:
        for j in range(n_edges):
            edges_row[j] = 0.0
        return 0
    if use_hist and max_c > 8 * n + 64:  # few, large counts: sorting is cheaper than the walk
        use_hist = False
    factor = row_vals[0]  # unused unless normalize
    if normalize:
        factor = _cast(total, box) / _cast(target_sum, box)
    if use_hist:  # each distinct count is scaled once
        for k in range(n_distinct):
            c = distinct[k]
            scaled_of[c] = _scale(_cast(c, box), factor, normalize, log1p)
    else:
        xs = np.empty(n, dtype=data.dtype)
        for j in range(n):
            xs[j] = _scale(row_vals[j], factor, normalize, log1p)
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
            while below + (hist[walk] if stamp[walk] == tag else 0) <= pa:
                below += hist[walk] if stamp[walk] == tag else 0
                walk += 1
            va = walk
            vb = walk
            upto = below + hist[vb]
            while upto <= pb:
                vb += 1
                upto += hist[vb] if stamp[vb] == tag else 0
            a = scaled_of[va]
            b = scaled_of[vb]
        else:
            a = xs[pa]
            b = xs[pb]
        edges_row[j] = _edge(a, b, gamma)
    if use_hist:
        for k in range(n_distinct):  # digitize each distinct count once
            c = distinct[k]
            left = _count_le(edges_row, scaled_of[c])
            left_of[c] = left
            width_of[c] = left - _count_lt(edges_row, scaled_of[c])
        for j in range(n):
            c = int(row_vals[j])
            left = left_of[c]
            width = width_of[c]
            if random_ties and width != 0:
                left = left - _tie_draw(cell_key, row_tokens[j], width)
            row_digits[j] = left
        return n
    for j in range(n):
        x = _scale(row_vals[j], factor, normalize, log1p)
        left = _count_le(edges_row, x)
        width = left - _count_lt(edges_row, x)
        if random_ties and width != 0:
            left = left - _tie_draw(cell_key, row_tokens[j], width)
        row_digits[j] = left
    return n


@numba.njit(cache=True, nogil=True)
def _table_size(data: np.ndarray) -> int:
    """Size of the per-count scratch tables: the largest integer count + 1, at most _HIST_LIMIT."""
    top = 0.0
    for v in data:
        if v > top:
            top = v
    return int(min(top, _HIST_LIMIT - 1)) + 1


@numba.njit(cache=True, nogil=True)
def _scratch(dtype_like: np.ndarray, max_row: int, size: int):
    """box, stamp, hist, distinct, scaled_of, left_of, width_of, row_vals, row_tokens, row_digits."""
    return (
        np.empty(1, dtype=dtype_like.dtype),
        np.full(size, -1, dtype=np.int64),
        np.zeros(size, dtype=np.int64),
        np.empty(min(size, max(max_row, 1)), dtype=np.int64),
        np.zeros(size, dtype=dtype_like.dtype),
        np.zeros(size, dtype=np.int64),
        np.zeros(size, dtype=np.int64),
        np.empty(max(max_row, 1), dtype=dtype_like.dtype),
        np.empty(max(max_row, 1), dtype=np.int64),
        np.empty(max(max_row, 1), dtype=np.int64),
    )


@numba.njit(cache=True, nogil=True)
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
    """scGPT value bins for every entry of a CSR chunk whose entries are all expressed and matched.

    Entry ``i`` of row ``r`` gets its bin in ``out[i + shift * (r + 1)]`` and, when ``out_genes``
    is not empty, its token ``column_tokens[indices[i]]`` there too (``shift=1`` leaves room for a
    ``<cls>`` before every cell). ``edges`` [rows, len(q)] receives each cell's quantile edges.
    With ``random_ties`` a value on tied edges gets ``left - floor(r * (left - right))``, ``r`` the
    (seed, cell, gene) hash; otherwise ``left`` (the ``np.digitize`` result).
    """
    n_rows = indptr.size - 1
    max_row = 0
    for row in range(n_rows):
        max_row = max(max_row, indptr[row + 1] - indptr[row])
    box, stamp, hist, distinct, scaled_of, left_of, width_of, row_vals, row_tokens, row_digits = _scratch(
        data, max_row, _table_size(data)
    )
    write_genes = out_genes.size > 0
    for row in range(n_rows):
        cell_key = _mix32(np.uint64(first_cell + row) ^ salt)
        n = _bin_row(
            indptr[row], indptr[row + 1], data, indices, column_tokens, q, target_sum, normalize, log1p,
            random_ties, cell_key, row, box, stamp, hist, distinct, scaled_of, left_of, width_of,
            edges[row], row_vals, row_tokens, row_digits,
        )
        base = indptr[row] + shift * (row + 1)
        for j in range(max(n, 0)):  # the caller validated the values (n < 0 cannot happen)
            out[base + j] = row_digits[j]
            if write_genes:
                out_genes[base + j] = row_tokens[j]


@numba.njit(cache=True, parallel=True)
def bin_matrix(
    indptr, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties, tie_salt,
    subsample_salt, limit, offsets, append_cls, out_values, out_genes, edges, n_blocks, max_row, written, bad,
):
    """The whole in-memory matrix in one call: cells split in ``n_blocks`` parallel blocks, bins
    and tokens written straight into the ragged arrays at ``offsets`` (after the ``<cls>`` slot the
    caller fills when ``append_cls``). ``written[r]`` receives the number of genes written for cell
    ``r`` (fewer than reserved when genes are unmatched or stored zeros) and ``bad[r]`` 1 when the
    cell has a negative or non-finite value (its output is then meaningless). Cells with more than ``limit`` genes keep the ``limit`` genes with the smallest
    (seed, cell, gene) subsample hash, listed in data order (as ``take_first_k_per_row``)."""
    n_rows = indptr.size - 1
    extra = 1 if append_cls else 0
    size = _table_size(data)
    for block in numba.prange(n_blocks):
        r0 = block * n_rows // n_blocks
        r1 = (block + 1) * n_rows // n_blocks
        box, stamp, hist, distinct, scaled_of, left_of, width_of, row_vals, row_tokens, row_digits = (
            _scratch(data, max_row, size)
        )
        keys = np.empty(max(max_row, 1), dtype=np.int64)
        for row in range(r0, r1):
            cell_key = _mix32(np.uint64(row) ^ tie_salt)
            lo = indptr[row]
            hi = indptr[row + 1]
            pos = offsets[row] + extra
            if hi - lo <= limit:  # no subsampling possible: write straight into the output
                n = _bin_row(
                    lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties,
                    cell_key, row, box, stamp, hist, distinct, scaled_of, left_of, width_of, edges[row],
                    row_vals, out_genes[pos : pos + (hi - lo)], out_values[pos : pos + (hi - lo)],
                )
                bad[row] = 1 if n < 0 else 0
                written[row] = max(n, 0)
                continue
            n = _bin_row(
                lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties, cell_key,
                row, box, stamp, hist, distinct, scaled_of, left_of, width_of, edges[row], row_vals,
                row_tokens, row_digits,
            )
            if n < 0:
                bad[row] = 1
                written[row] = 0
                continue
            written[row] = min(n, limit)
            if n <= limit:
                for j in range(n):
                    out_values[pos + j] = row_digits[j]
                    out_genes[pos + j] = row_tokens[j]
                continue
            sub_key = _mix32(np.uint64(row) ^ subsample_salt)
            for j in range(n):
                keys[j] = np.int64(_mix_gene(sub_key, row_tokens[j]))
            order = np.argsort(keys[:n], kind="mergesort")
            threshold_rank = np.empty(n, dtype=np.int64)
            for rank in range(n):
                threshold_rank[order[rank]] = rank
            for j in range(n):
                if threshold_rank[j] < limit:
                    out_values[pos] = row_digits[j]
                    out_genes[pos] = row_tokens[j]
                    pos += 1


@numba.njit(cache=True, parallel=True)
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
    """Geneformer rank value order of every cell of a CSR chunk (rows in parallel).

    Score ``data / n_counts * target_sum / median[token]`` in float64; entries of each row sorted by
    score descending, equal scores by ascending token id (whatever the entry order). Writes the
    first ``limit`` entry indices of row ``r`` to ``out_order[indptr[r]:]`` and their number to
    ``out_lengths[r]``.
    """
    n_rows = indptr.size - 1
    for row in numba.prange(n_rows):
        lo = indptr[row]
        hi = indptr[row + 1]
        n = hi - lo
        neg = np.empty(n, dtype=np.float64)
        for i in range(n):
            neg[i] = -(np.float64(data[lo + i]) / n_counts[row] * target_sum / medians[tokens[lo + i]])
        order = np.argsort(neg)  # quicksort; runs of equal scores are put in token order below
        start = 0
        while start < n:
            stop = start + 1
            while stop < n and neg[order[stop]] == neg[order[start]]:
                stop += 1
            for a in range(start + 1, stop):  # insertion sort of a tie run (runs are short)
                cur = order[a]
                b = a - 1
                while b >= start and tokens[lo + order[b]] > tokens[lo + cur]:
                    order[b + 1] = order[b]
                    b -= 1
                order[b + 1] = cur
            start = stop
        k = min(n, limit)
        for i in range(k):
            out_order[lo + i] = lo + order[i]
        out_lengths[row] = k
