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
from numba import types
from numba.extending import intrinsic

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
    lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties, cell_key,
    box, hist, distinct, scaled_of, left_of, edges_row, row_vals, row_tokens, row_digits,
):
    """Bins of one cell's expressed, matched genes (CSR entries ``lo..hi-1``).

    Entries with value 0 or ``column_tokens[column] < 0`` are skipped. Writes the kept entries'
    tokens and bins, in CSR order, to ``row_tokens[:n]`` / ``row_digits[:n]`` and the cell's
    quantile edges to ``edges_row``; returns ``n``, or -1 when a value is negative or not finite.
    Counting path (integer counts below ``hist.size``): ``hist`` counts each value and is all
    zeros again on return; ``distinct`` lists the cell's distinct counts, whose bins are computed
    once each: ``left_of`` packs the left digitize result (low 16 bits) and the tie width, left -
    right digitize (bits 16 and up).
    The loops over entries are branch-free where they can be (the work is per stored value).
    """
    n_edges = q.size
    # 1. the common case first: every entry positive, finite and matched (checks free of branches)
    n = hi - lo
    clean = True
    for i in range(lo, hi):
        v = data[i]
        clean &= (v > 0) & (v < np.inf)
    for i in range(lo, hi):
        token = column_tokens[indices[i]]
        row_tokens[i - lo] = token
        clean &= token >= 0
    if clean:
        values = data[lo:hi]
    else:  # keep expressed, matched entries: written unconditionally, kept by advancing n
        n = 0
        bad = False
        for i in range(lo, hi):
            v = data[i]
            token = column_tokens[indices[i]]
            bad |= not (v >= 0 and v < np.inf)
            row_vals[n] = v
            row_tokens[n] = token
            n += (v != 0) & (token >= 0)
        if bad:
            return -1  # negative, NaN or infinite: the caller reports it
        values = row_vals[:n]
    if n == 0:
        for j in range(n_edges):
            edges_row[j] = 0.0
        return 0
    # 2. total and whether the counting path applies; integer totals are exact in any order, so
    # four partial sums are used for them; other values are summed again in entry order
    t0 = 0.0
    t1 = 0.0
    t2 = 0.0
    t3 = 0.0
    whole = True
    top = values[0]
    quads = n - n % 4
    for j in range(0, quads, 4):
        t0 += values[j]
        t1 += values[j + 1]
        t2 += values[j + 2]
        t3 += values[j + 3]
    for j in range(quads, n):
        t0 += values[j]
    for j in range(n):
        v = values[j]
        whole &= np.floor(v) == v
        top = max(top, v)
    total = (t0 + t1) + (t2 + t3)
    if not (whole and total < 2.0**53):
        total = 0.0
        for j in range(n):
            total += values[j]
    # few, large counts: sorting is cheaper than walking the histogram
    use_hist = whole and top < hist.size and top <= 8 * n + 64
    factor = values[0]  # unused unless normalize
    if normalize:
        factor = _cast(total, box) / _cast(target_sum, box)
    n_distinct = 0
    if use_hist:  # each distinct count is scaled once
        for j in range(n):
            hist[int(values[j])] += 1
        for c in range(int(top) + 1):  # top <= 8 n + 64: a walk of the size of the cell
            if hist[c] != 0:
                distinct[n_distinct] = c
                n_distinct += 1
                scaled_of[c] = _scale(_cast(c, box), factor, normalize, log1p)
    else:
        xs = np.empty(n, dtype=data.dtype)
        for j in range(n):
            xs[j] = _scale(values[j], factor, normalize, log1p)
        xs.sort()
    # 3. quantile edges, as np.quantile(..., method="linear"); positions only increase with j
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
            while below + hist[walk] <= pa:
                below += hist[walk]
                walk += 1
            vb = walk
            upto = below + hist[vb]
            while upto <= pb:
                vb += 1
                upto += hist[vb]
            a = scaled_of[walk]
            b = scaled_of[vb]
        else:
            a = xs[pa]
            b = xs[pb]
        edges_row[j] = _edge(a, b, gamma)
    # 4. digitize: ties get left - floor(r * width), which is left itself where width is 0
    if use_hist:
        for k in range(n_distinct):  # digitize each distinct count once, and clear the histogram
            c = distinct[k]
            hist[c] = 0
            left = _count_le(edges_row, scaled_of[c])
            left_of[c] = left | ((left - _count_lt(edges_row, scaled_of[c])) << 16)
        if random_ties:
            for j in range(n):
                packed = left_of[int(values[j])]
                row_digits[j] = (packed & 0xFFFF) - _tie_draw(cell_key, row_tokens[j], packed >> 16)
        else:
            for j in range(n):
                row_digits[j] = left_of[int(values[j])] & 0xFFFF
        return n
    for j in range(n):
        x = _scale(values[j], factor, normalize, log1p)
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
    """box, hist, distinct, scaled_of, left_of, row_vals, row_tokens, row_digits."""
    return (
        np.empty(1, dtype=dtype_like.dtype),
        np.zeros(size, dtype=np.int64),
        np.empty(min(size, max(max_row, 1)), dtype=np.int64),
        np.zeros(size, dtype=dtype_like.dtype),
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
    box, hist, distinct, scaled_of, left_of, row_vals, row_tokens, row_digits = _scratch(
        data, max_row, _table_size(data)
    )
    write_genes = out_genes.size > 0
    for row in range(n_rows):
        cell_key = _mix32(np.uint64(first_cell + row) ^ salt)
        n = _bin_row(
            indptr[row], indptr[row + 1], data, indices, column_tokens, q, target_sum, normalize, log1p,
            random_ties, cell_key, box, hist, distinct, scaled_of, left_of,
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
    subsample_salt, limit, offsets, append_cls, cls_id, cls_value, out_values, out_genes, edges, n_blocks,
    max_row, written, bad,
):
    """The whole in-memory matrix in one call: cells split in ``n_blocks`` parallel blocks, bins
    and tokens written straight into the ragged arrays at ``offsets``, after a ``<cls>`` slot
    (``cls_id``, ``cls_value``) when ``append_cls``; the threads also touch the output pages first.
    A cell's room may be its stored entries or exactly what it keeps (see :func:`kept_lengths`);
    cells with entries to drop go through scratch buffers when the room is exact.
    ``written[r]`` receives the number of genes written for cell ``r`` and ``bad[r]`` 1 when the
    cell has a negative or non-finite value (its output is then meaningless). Cells with more than
    ``limit`` genes keep the ``limit`` genes with the smallest (seed, cell, gene) subsample hash,
    listed in data order (as ``take_first_k_per_row``)."""
    n_rows = indptr.size - 1
    extra = 1 if append_cls else 0
    size = _table_size(data)
    for block in numba.prange(n_blocks):
        r0 = block * n_rows // n_blocks
        r1 = (block + 1) * n_rows // n_blocks
        box, hist, distinct, scaled_of, left_of, row_vals, row_tokens, row_digits = (
            _scratch(data, max_row, size)
        )
        keys = np.empty(max(max_row, 1), dtype=np.int64)
        for row in range(r0, r1):
            cell_key = _mix32(np.uint64(row) ^ tie_salt)
            lo = indptr[row]
            hi = indptr[row + 1]
            pos = offsets[row]
            if append_cls:
                out_genes[pos] = cls_id
                out_values[pos] = cls_value
            pos += extra
            if hi - lo <= limit and offsets[row + 1] - pos == hi - lo:  # room for every entry, none to drop:
                # write straight into the output
                n = _bin_row(
                    lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties,
                    cell_key, box, hist, distinct, scaled_of, left_of, edges[row],
                    row_vals, out_genes[pos : pos + (hi - lo)], out_values[pos : pos + (hi - lo)],
                )
                bad[row] = 1 if n < 0 else 0
                written[row] = max(n, 0)
                continue
            n = _bin_row(
                lo, hi, data, indices, column_tokens, q, target_sum, normalize, log1p, random_ties, cell_key,
                box, hist, distinct, scaled_of, left_of, edges[row], row_vals,
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


@intrinsic
def _float64_bits(typingctx, x):
    """The bits of a float64 as a uint64 (a register move, no memory round trip)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint64))
    return types.uint64(types.float64), codegen


@numba.njit(cache=True, inline="always")
def _descending_key(x, key_bits) -> np.uint64:
    """The upper ``key_bits`` bits of a positive float64, complemented: ascending keys, descending values."""
    return ~(_float64_bits(np.float64(x)) >> np.uint64(64 - key_bits)) & ((np.uint64(1) << np.uint64(key_bits)) - np.uint64(1))


@numba.njit(cache=True, fastmath={"reassoc"})
def _row_stats(data, lo, hi):
    """(all of ``data[lo:hi]`` finite and >= 0, all whole numbers, their sum). The sum may be taken in any
    order, which is exact for whole numbers below 2**53, the only rows whose sum is used; it vectorises."""
    not_finite = False
    not_whole = False
    total = 0.0
    for i in range(lo, hi):
        v = data[i]
        not_finite |= not ((v >= 0) & (v < np.inf))
        not_whole |= np.floor(v) != v
        total += v
    return not not_finite, not not_whole, total


@numba.njit(cache=True, inline="always")
def _entry_value(x, index_bits, lo, span, data, indices, shared_values, shared_where):
    """(value, median column) of a packed entry: its low ``index_bits`` bits index the row's stored entries,
    or, from ``span`` on, the summed genes of shared tokens."""
    idx = np.int64(x & ((np.uint64(1) << np.uint64(index_bits)) - np.uint64(1)))
    if idx < span:
        return np.float64(data[lo + idx]), np.int64(indices[lo + idx])
    return shared_values[idx - span], shared_where[idx - span]


@numba.njit(cache=True, inline="always")
def _entry_token(x, index_bits, token_mask):
    """The token of a packed entry."""
    return np.int64((x >> np.uint64(index_bits)) & token_mask)


@numba.njit(cache=True, nogil=True)
def _rank_row(lo, hi, data, indices, column_tokens, column_medians, column_inverse, summed, shared_values, shared_where, shared_tokens, packed, spare, counts, index_bits, key_shift,
              key_bits):
    """Geneformer order of one cell, up to near-ties: its expressed, matched genes sorted by key (see
    below), which ``_write_ranked`` turns into the exact order (score ``count / n_counts * target_sum /
    median`` descending, equal scores by ascending token). Returns ``(entries, n)``: ``entries[:n]``, each
    packed as ``key << key_shift | token << index_bits | index`` (see ``_entry_value``). A column whose
    ``column_tokens`` entry is ``-2 - token`` shares ``token`` with other columns; their counts are summed
    first in ``summed`` (indexed by token; all zeros between calls).

    Sort: a stable byte-wise radix sort on 16-bit keys: the upper ``key_bits`` (at most 32) bits of each
    gene's ``count / median`` (the cell's constant factors do not change the order; positive floats order
    like their bits), complemented for descending order, less the cell's smallest, scaled to 16 bits; then
    an insertion pass on the packed entries (the radix sort left only equal 16-bit keys unordered).
    Genes whose full keys differ by 2 or more differ by far more than rounding, so their order is
    certain; runs of equal or consecutive keys get exact scores in ``_write_ranked``.
    """
    n = 0
    n_shared = 0
    low = (np.uint64(1) << np.uint64(key_bits)) - np.uint64(1)
    high = np.uint64(0)
    span = hi - lo
    for i in range(lo, hi):
        v = data[i]
        col = indices[i]
        token = column_tokens[col]
        if v != 0 and token >= 0:
            key = _descending_key(v * column_inverse[col], key_bits)
            packed[n] = (key << key_shift) | (np.uint64(token) << index_bits) | np.uint64(i - lo)
            low = min(low, key)
            high = max(high, key)
            n += 1
        elif v != 0 and token < -1:  # a column sharing token -2 - token with others: summed first
            token = -2 - token
            if summed[token] == 0:
                shared_tokens[n_shared] = token
                n_shared += 1
            summed[token] += v
    for j in range(n_shared):
        token = shared_tokens[j]
        shared_values[j] = summed[token]
        shared_where[j] = column_medians.size - 1 - token
        summed[token] = 0.0
        key = _descending_key(shared_values[j] * column_inverse[shared_where[j]], key_bits)
        packed[n] = (key << key_shift) | (np.uint64(token) << index_bits) | np.uint64(span + j)
        low = min(low, key)
        high = max(high, key)
        n += 1
    if n < 2:
        return packed, n
    top = 0  # bits of the cell's key range
    while top < key_bits and ((high - low) >> np.uint64(top)) != 0:
        top += 1
    drop = np.uint64(max(0, top - 16))
    counts[:] = 0
    for j in range(n):  # both digits' histograms in one pass
        d = ((packed[j] >> key_shift) - low) >> drop
        counts[d & np.uint64(0xFF)] += 1
        counts[256 + ((d >> np.uint64(8)) & np.uint64(0xFF))] += 1
    src, dst = packed, spare
    for p in range(2 if top > 8 else 1):
        base = 256 * p
        shift = drop + np.uint64(8 * p)
        total = 0
        for d in range(base, base + 256):
            c = counts[d]
            counts[d] = total
            total += c
        for j in range(n):
            x = src[j]
            d = base + ((((x >> key_shift) - low) >> shift) & np.uint64(0xFF))
            dst[counts[d]] = x
            counts[d] += 1
        src, dst = dst, src
    if drop > 0:  # order by the full keys: the radix sort left only equal 16-bit keys unsorted
        for a in range(1, n):
            cur = src[a]
            b = a - 1
            while b >= 0 and src[b] > cur:
                src[b + 1] = src[b]
                b -= 1
            src[b + 1] = cur
    return src, n


@numba.njit(cache=True, inline="always")
def _write_ranked(src, n, k, out, pos, lo, span, data, indices, column_medians, shared_values, shared_where,
                  n_counts, target_sum, scores, run, run_entries, index_bits, key_shift, token_mask):
    """Write the tokens of the first ``k`` of ``n`` entries sorted by key to ``out[pos:]``. Runs of equal or
    consecutive keys are first put in the exact order: score descending, then token ascending."""
    start = 0
    for stop in range(1, n + 1):
        if stop < n and (src[stop] >> key_shift) - (src[stop - 1] >> key_shift) <= np.uint64(1):
            continue
        m = stop - start
        if m > 1:
            for a in range(m):
                v, w = _entry_value(src[start + a], index_bits, lo, span, data, indices, shared_values, shared_where)
                scores[a] = v / n_counts * target_sum / column_medians[w]
                run[a] = _entry_token(src[start + a], index_bits, token_mask)
                run_entries[a] = src[start + a]
            for a in range(1, m):  # insertion sort of (score, token, entry) triples
                sc, t, x = scores[a], run[a], run_entries[a]
                b = a - 1
                while b >= 0 and (scores[b] < sc or (scores[b] == sc and run[b] > t)):
                    scores[b + 1], run[b + 1], run_entries[b + 1] = scores[b], run[b], run_entries[b]
                    b -= 1
                scores[b + 1], run[b + 1], run_entries[b + 1] = sc, t, x
            for a in range(min(m, k - start)):
                out[pos + start + a] = run[a]
        elif start < k:
            out[pos + start] = _entry_token(src[start], index_bits, token_mask)
        start = stop
        if start >= k:
            return


@numba.njit(cache=True, parallel=True)
def rank_matrix(
    indptr, data, indices, column_tokens, column_medians, column_inverse, n_counts, have_counts, target_sum, limit,
    offsets, special, cls_id, eos_id, out, written, bad, n_blocks, max_row, vocab_size, index_bits, token_bits,
):
    """Geneformer rank value tokens of a whole in-memory CSR matrix, cells in ``n_blocks`` parallel
    blocks, written straight into the ragged output at ``offsets`` (``<cls>`` first and ``<eos>``
    last when ``special``): at most ``limit`` tokens a cell, ``written[r]`` of them.

    ``n_counts[r]`` is the cell's total (``have_counts``) or the sum of its stored values.
    ``column_tokens``: each column's token, -1 when unmatched, ``-2 - token`` when the column shares its
    token with others (their counts are summed). ``column_medians`` holds each column's gene median,
    followed by the medians of shared tokens at ``-1 - token`` (``column_inverse``: their inverses).
    Token ids are below ``vocab_size`` and ``2 ** token_bits``; an entry's index within its row (shared tokens
    counted after the row's entries) is below ``2 ** index_bits``; the two take at most 40 bits, and the
    sort key the rest, at most 32. ``bad[r]``: 1 negative or non-finite value, 2 a value that is not a whole
    number, 3 expressed genes with a total <= 0 (the cell's output is then meaningless).
    """
    n_rows = indptr.size - 1
    shift = 1 if special else 0
    any_shared = column_tokens.size > 0 and column_tokens.min() < -1
    key_shift = np.uint64(index_bits + token_bits)
    key_bits = min(32, 64 - index_bits - token_bits)
    token_mask = (np.uint64(1) << np.uint64(token_bits)) - np.uint64(1)
    for block in numba.prange(n_blocks):
        r0 = block * n_rows // n_blocks
        r1 = (block + 1) * n_rows // n_blocks
        width = max(max_row, 1)
        packed = np.empty(width, dtype=np.uint64)
        spare = np.empty(width, dtype=np.uint64)
        shared_values = np.empty(width, dtype=np.float64)
        shared_where = np.empty(width, dtype=np.int64)
        shared_tokens = np.empty(width, dtype=np.int64)
        scores = np.empty(width, dtype=np.float64)
        run = np.empty(width, dtype=np.int64)
        run_entries = np.empty(width, dtype=np.uint64)
        counts = np.empty(512, dtype=np.int64)
        summed = np.zeros(vocab_size if any_shared else 1, dtype=np.float64)
        for row in range(r0, r1):
            lo = indptr[row]
            hi = indptr[row + 1]
            written[row] = 0
            finite, whole, total = _row_stats(data, lo, hi)
            bad[row] = 0 if finite and whole else (1 if not finite else 2)
            cell_total = n_counts[row] if have_counts else total
            if bad[row] != 0:
                continue
            ranked, n = _rank_row(lo, hi, data, indices, column_tokens, column_medians, column_inverse,
                                  summed, shared_values, shared_where, shared_tokens, packed, spare, counts, np.uint64(index_bits),
                                  key_shift, key_bits)
            if n > 0 and not cell_total > 0:
                bad[row] = 3
                continue
            k = min(n, limit)
            pos = offsets[row]
            if special:
                out[pos] = cls_id
                out[pos + shift + k] = eos_id
            _write_ranked(ranked, n, k, out, pos + shift, lo, hi - lo, data, indices, column_medians, shared_values,
                          shared_where, cell_total, target_sum, scores, run, run_entries, index_bits, key_shift,
                          token_mask)
            written[row] = k


@numba.njit(cache=True, parallel=True)
def compact_rows(src: np.ndarray, src_offsets: np.ndarray, lengths: np.ndarray, dst_offsets: np.ndarray,
                 dst: np.ndarray, n_blocks: int) -> None:
    """Copy the first ``lengths[r]`` items of every row ``r`` of a ragged array (rows at
    ``src_offsets``) to ``dst`` at ``dst_offsets``: removes the gaps a kernel left, rows in parallel."""
    n_rows = lengths.size
    for block in numba.prange(n_blocks):
        for row in range(block * n_rows // n_blocks, (block + 1) * n_rows // n_blocks):
            a = src_offsets[row]
            b = dst_offsets[row]
            for j in range(lengths[row]):
                dst[b + j] = src[a + j]


@numba.njit(cache=True, parallel=True)
def kept_lengths(indptr: np.ndarray, data: np.ndarray, indices: np.ndarray, column_tokens: np.ndarray,
                 vocab_size: int, max_row: int, n_blocks: int, out: np.ndarray) -> None:
    """Number of distinct tokens each row expresses: entries with a non-zero value and a matched
    column (``column_tokens`` >= 0), columns marked ``-2 - token`` (sharing ``token``) counted once per
    token. Sizes outputs exactly, so kernels need no second, compacted copy."""
    n_rows = indptr.size - 1
    any_shared = column_tokens.size > 0 and column_tokens.min() < -1
    kept_column = column_tokens >= 0  # a small table: stays in the first-level cache
    for block in numba.prange(n_blocks):
        seen = np.zeros(vocab_size if any_shared else 1, dtype=np.bool_)
        met = np.empty(max(1, max_row), dtype=np.int64)
        for row in range(block * n_rows // n_blocks, (block + 1) * n_rows // n_blocks):
            n = 0
            if not any_shared:  # branch-free
                for i in range(indptr[row], indptr[row + 1]):
                    n += (data[i] != 0) & kept_column[indices[i]]
                out[row] = n
                continue
            n_met = 0
            for i in range(indptr[row], indptr[row + 1]):
                col = indices[i]
                token = column_tokens[col]
                if data[i] != 0 and token >= 0:
                    n += 1
                elif data[i] != 0 and token < -1:
                    token = -2 - token
                    if not seen[token]:
                        seen[token] = True
                        met[n_met] = token
                        n_met += 1
            for j in range(n_met):
                seen[met[j]] = False
            out[row] = n + n_met
