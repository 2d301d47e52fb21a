"""The binning kernels: both strategies agree with NumPy exactly, on real and random data."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from scforge.tokenize import _kernels as K


def _numpy_reference(csr: sp.csr_matrix, n_edges: int, factors, log1p):
    rows = K.row_index(csr.indptr)
    x = K.scale_values(csr.data, rows, factors, log1p)
    edges, left, right = [], [], []
    for i in range(csr.shape[0]):
        v = x[csr.indptr[i]:csr.indptr[i + 1]]
        e = np.quantile(v, np.linspace(0, 1, n_edges)) if v.size else np.zeros(n_edges)
        edges.append(e)
        left.append(np.digitize(v, e))
        right.append(np.digitize(v, e, right=True))
    return np.concatenate(left), np.concatenate(right), np.array(edges)


def _both_paths(csr, n_edges, factors, log1p):
    rows = K.row_index(csr.indptr)
    counts = K._bin_limits_counts(csr.data.astype(np.int32), csr.dtype, rows, csr.indptr, n_edges, factors, log1p, max_table=10**9)
    if counts is None:  # an empty chunk: only the sort path handles it
        assert csr.nnz == 0
        counts = K.bin_limits(csr.data, csr.indptr, n_edges, factors=factors, log1p=log1p)
    if csr.nnz == 0:
        return counts, counts
    sorted_ = K._bin_limits_sorted(csr.data, rows, csr.indptr, n_edges, factors, log1p)
    return counts, sorted_


@pytest.mark.parametrize("log1p,normalize", [(True, True), (False, False), (False, True)])
def test_histogram_and_sort_paths_equal_numpy_on_ifnb(ifnb_small, log1p, normalize):
    csr = ifnb_small.X[:300].tocsr()
    factors = K.row_factors(csr.data, csr.indptr, 1e4) if normalize else None
    counts, sorted_ = _both_paths(csr, 50, factors, log1p)
    ref = _numpy_reference(csr, 50, factors, log1p)
    for got in (counts, sorted_):
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


@st.composite
def count_chunks(draw):
    n_rows = draw(st.integers(1, 30))
    n_cols = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    lam = rng.uniform(0.2, 30)
    x = rng.poisson(lam, (n_rows, n_cols)) * (rng.random((n_rows, n_cols)) < rng.uniform(0, 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    return sp.csr_matrix(x.astype(dtype))


@settings(max_examples=80, deadline=None)
@given(csr=count_chunks(), n_edges=st.integers(2, 60), log1p=st.booleans(), normalize=st.booleans())
def test_paths_agree_on_random_counts(csr, n_edges, log1p, normalize):
    csr.eliminate_zeros()
    factors = K.row_factors(csr.data, csr.indptr, 1e4) if normalize else None
    counts, sorted_ = _both_paths(csr, n_edges, factors, log1p)
    ref = _numpy_reference(csr, n_edges, factors, log1p)
    for got in (counts, sorted_):
        for a, b in zip(got, ref):
            np.testing.assert_array_equal(a, b)


def test_non_integer_values_use_sort_path_and_match_numpy(ifnb_small):
    csr = ifnb_small.layers["lognorm"][:100].tocsr()
    left, right, edges = K.bin_limits(csr.data, csr.indptr, 50, factors=None, log1p=False)
    ref = _numpy_reference(csr, 50, None, False)
    for a, b in zip((left, right, edges), ref):
        np.testing.assert_array_equal(a, b)


def test_row_hash_uniform_is_uniform_and_keyed():
    indptr = np.array([0, 50_000, 100_000])
    genes = np.tile(np.arange(50_000), 2)
    r = K.row_hash_uniform(0, 0, 10, indptr, genes)
    assert r.min() >= 0 and r.max() < 1
    hist = np.histogram(r, bins=20, range=(0, 1))[0] / r.size
    assert np.abs(hist - 0.05).max() < 0.005
    # the same (cell, gene) gives the same draw whatever the chunk it comes in
    alone = K.row_hash_uniform(0, 0, 11, np.array([0, 50_000]), genes[50_000:])
    assert np.array_equal(alone, r[50_000:])
    assert not np.array_equal(K.row_hash_uniform(1, 0, 10, indptr, genes), r)
    assert abs(np.corrcoef(r[:-1], r[1:])[0, 1]) < 0.02  # neighbouring genes are not correlated


# ---- compiled (numba) kernels against the NumPy kernels ------------------------------------------
def _compiled_bins(csr, n_edges, normalize, log1p, seed=3, first_cell=10):
    from scforge.tokenize import _compiled

    column_tokens = np.arange(csr.shape[1], dtype=np.int64)
    edges = np.empty((csr.shape[0], n_edges))
    out = np.empty(csr.nnz, dtype=np.float32)
    _compiled.bin_chunk(csr.indptr, csr.data, csr.indices, column_tokens, np.linspace(0, 1, n_edges), 1e4,
                        normalize, log1p, True, np.uint64(K.hash_salt(seed, 0)), first_cell, edges, out,
                        np.empty(0, dtype=np.int32), 0)
    return out, edges


def _numpy_bins(csr, n_edges, normalize, log1p, seed=3, first_cell=10):
    factors = K.row_factors(csr.data, csr.indptr, 1e4) if normalize else None
    left, right, edges = K.bin_limits(csr.data, csr.indptr, n_edges, factors=factors, log1p=log1p)
    r = K.row_hash_uniform(seed, 0, first_cell, csr.indptr, csr.indices)
    return (left - np.floor(r * (left - right)).astype(np.int64)).astype(np.float32), edges


@settings(max_examples=80, deadline=None)
@given(csr=count_chunks(), n_edges=st.integers(2, 60), log1p=st.booleans(), normalize=st.booleans(),
       scale=st.sampled_from([1.0, 0.37, 1000.0]))
def test_compiled_bins_equal_numpy_bins(csr, n_edges, log1p, normalize, scale):
    csr.eliminate_zeros()
    csr.data *= csr.dtype.type(scale)  # integer counts (1, 1000) and non-integer values (0.37)
    a, ea = _compiled_bins(csr, n_edges, normalize, log1p)
    b, eb = _numpy_bins(csr, n_edges, normalize, log1p)
    np.testing.assert_array_equal(a, b)
    # bins are exact; edges are too, except that NumPy's AVX-512 log1p may differ from libm's by 1 ulp
    np.testing.assert_array_max_ulp(ea.astype(csr.dtype), eb.astype(csr.dtype), maxulp=4)  # in the data dtype; quantiles of 1-ulp log1p values


@settings(max_examples=60, deadline=None)
@given(csr=count_chunks(), n_edges=st.integers(2, 60), log1p=st.booleans(), normalize=st.booleans(),
       drop_every=st.integers(2, 7))
def test_compiled_bins_skip_stored_zeros_and_unmatched_genes(csr, n_edges, log1p, normalize, drop_every):
    """Rows with stored zeros or unmatched columns take the compacting path; the kept entries get
    the bins the NumPy kernel gives the matrix without them."""
    from scforge.tokenize import _compiled

    column_tokens = np.arange(csr.shape[1], dtype=np.int64)
    column_tokens[::drop_every] = -1
    edges = np.empty((csr.shape[0], n_edges))
    out = np.full(csr.nnz, -7.0, dtype=np.float32)
    genes = np.full(csr.nnz, -7, dtype=np.int32)
    _compiled.bin_chunk(csr.indptr, csr.data, csr.indices, column_tokens, np.linspace(0, 1, n_edges), 1e4,
                        normalize, log1p, True, np.uint64(K.hash_salt(3, 0)), 10, edges, out, genes, 0)
    kept = csr[:, np.flatnonzero(column_tokens >= 0)].tocsr()
    kept.eliminate_zeros()
    kept_tokens = column_tokens[column_tokens >= 0][kept.indices]
    factors = K.row_factors(kept.data, kept.indptr, 1e4) if normalize else None
    left, right, ref_edges = K.bin_limits(kept.data, kept.indptr, n_edges, factors=factors, log1p=log1p)
    r = K.row_hash_uniform(3, 0, 10, kept.indptr, kept_tokens)
    ref = (left - np.floor(r * (left - right)).astype(np.int64)).astype(np.float32)
    for row in range(csr.shape[0]):
        lo, n = csr.indptr[row], kept.indptr[row + 1] - kept.indptr[row]
        np.testing.assert_array_equal(out[lo : lo + n], ref[kept.indptr[row] : kept.indptr[row + 1]])
        np.testing.assert_array_equal(genes[lo : lo + n], kept_tokens[kept.indptr[row] : kept.indptr[row + 1]])
        want = ref_edges[row] if n else np.zeros(n_edges)
        np.testing.assert_array_max_ulp(edges[row].astype(csr.dtype), want.astype(csr.dtype), maxulp=4)  # a quantile interpolates two 1-ulp log1p values


def test_compiled_bins_report_bad_values():
    from scforge.tokenize import _compiled

    csr = sp.csr_matrix(np.array([[1.0, 2.0, 0.0], [3.0, -1.0, 2.0], [np.nan, 1.0, 1.0]], dtype=np.float32))
    written, bad = np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int8)
    offsets = np.array([0, 3, 7, 11])
    values, genes = np.zeros(11, dtype=np.float32), np.zeros(11, dtype=np.int32)
    _compiled.bin_matrix(csr.indptr, csr.data, csr.indices, np.arange(3, dtype=np.int64), np.linspace(0, 1, 4),
                         1e4, True, True, True, np.uint64(1), np.uint64(2), 100, offsets, True, 9, -2.0,
                         values, genes, np.empty((3, 4)), 2, 3, written, bad)
    assert bad.tolist() == [0, 1, 1]
    assert written[0] == 2 and genes[0] == 9 and values[0] == -2.0  # <cls> written by the kernel


@pytest.mark.parametrize("layer", [None, "lognorm"])
def test_compiled_and_numpy_tokenizers_agree_on_ifnb(ifnb_small, monkeypatch, layer):
    from scforge.genes import builtin
    from scforge.tokenize import BinnedTokenizer, RankValueTokenizer, binned, rank

    data = ifnb_small[:400]
    settings_list = [dict(), dict(ties="left"), dict(max_len=300, seed=5), dict(include_zero_gene=True, genes=list(data.var_names[:300]))]
    if layer is not None:
        settings_list = [dict(log1p=False, normalize_total=None)]
    vocab = builtin.builtin_vocab("scgpt-human")
    for kw in settings_list:
        fast = BinnedTokenizer(vocab, **kw).tokenize(data, layer=layer)
        monkeypatch.setattr(binned, "USE_COMPILED", False)
        slow = BinnedTokenizer(vocab, **kw).tokenize(data, layer=layer)
        monkeypatch.setattr(binned, "USE_COMPILED", True)
        assert np.array_equal(fast.gene_ids, slow.gene_ids), kw
        assert np.array_equal(fast.values, slow.values), kw
    if layer is None:
        gf = RankValueTokenizer(builtin.builtin_geneformer("geneformer-v1"))
        fast = gf.tokenize(data)
        monkeypatch.setattr(rank, "USE_COMPILED", False)
        slow = gf.tokenize(data)
        assert np.array_equal(fast.gene_ids, slow.gene_ids) and np.array_equal(fast.offsets, slow.offsets)


def test_whole_matrix_binning_with_unmatched_genes_equals_numpy(ifnb_small, monkeypatch):
    """Unmatched genes and stored zeros: the whole-matrix kernel sizes its output by what each cell
    keeps, routes cells with entries to drop through scratch buffers, and equals the NumPy path."""
    from scforge.genes import align_genes, builtin
    from scforge.matrix import as_source
    from scforge.tokenize import BinnedTokenizer, binned

    vocab = builtin.builtin_vocab("scgpt-human")
    ids = align_genes(list(ifnb_small.var_names), vocab).token_ids
    _, first = np.unique(ids, return_index=True)
    no_merges = np.zeros(ids.size, dtype=bool)
    no_merges[first] = True
    no_merges |= ids < 0  # every unmatched gene stays; of genes sharing a token, the first
    data = ifnb_small[:300, no_merges].copy()
    x = data.X.tocsr()
    x.data[::53] = 0.0
    data.X = x
    assert (ids[no_merges] < 0).sum() > 100
    for kw in (dict(), dict(max_len=200, seed=3)):
        tok = BinnedTokenizer(vocab, **kw)
        source = as_source(data)
        assert tok._tokenize_whole(source, tok._plan(source, None)) is not None
        fast = tok.tokenize(data)
        monkeypatch.setattr(binned, "USE_COMPILED", False)
        slow = BinnedTokenizer(vocab, **kw).tokenize(data)
        monkeypatch.setattr(binned, "USE_COMPILED", True)
        assert np.array_equal(fast.offsets, slow.offsets)
        assert np.array_equal(fast.gene_ids, slow.gene_ids) and np.array_equal(fast.values, slow.values)
