"""scGPT binned tokenizer: parity with scGPT's own code on real data, options, and invariants."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import scipy.sparse as sp

from scforge.genes import GeneVocab
from scforge.tokenize import BinnedTokenizer, mask_values, select_hvg

N_BINS = 51


@pytest.fixture(scope="module")
def scgpt_vocab(shared_data) -> GeneVocab:
    return GeneVocab.from_scgpt_json(shared_data / "genes" / "scgpt_default_census_vocab.json")


@pytest.fixture(scope="module")
def ifnb_in_vocab(ifnb_small, scgpt_vocab):
    """The 2,000 ifnb cells restricted to vocabulary genes, as scGPT's tutorials do first."""
    keep = scgpt_vocab.lookup(list(ifnb_small.var_names)) >= 0
    return ifnb_small[:, keep].copy()


@pytest.fixture(scope="module")
def reference_binned(ifnb_in_vocab):
    """scGPT's Preprocessor (normalize_total 1e4, log1p, 51 bins) run on a copy."""
    from scforge.testing.scgpt_reference import load_scgpt_reference

    ref = load_scgpt_reference()
    work = ifnb_in_vocab.copy()
    np.random.seed(0)
    ref.Preprocessor(normalize_total=1e4, log1p=True, binning=N_BINS, result_binned_key="X_binned")(work)
    return work


def _row_digitize(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.digitize(values, edges), np.digitize(values, edges, right=True)


def test_bin_edges_identical_to_scgpt_for_every_cell(ifnb_in_vocab, reference_binned, scgpt_vocab):
    ours = BinnedTokenizer(scgpt_vocab).bin_edges(ifnb_in_vocab)
    ref_edges = reference_binned.obsm["bin_edges"][:, 1:]  # the reference prepends a 0
    assert ours.shape == ref_edges.shape == (2000, N_BINS - 1)
    # identical where both sides use the same log1p; NumPy's AVX-512 log1p (SVML port) can differ from
    # the C library's, which the compiled kernel calls, in the last bit
    np.testing.assert_array_max_ulp(ours.astype(np.float32), ref_edges.astype(np.float32), maxulp=1)


def test_bins_match_scgpt_where_no_tie_and_distribution_where_ties(ifnb_in_vocab, reference_binned, scgpt_vocab):
    tok = BinnedTokenizer(scgpt_vocab, seed=3)
    cells = tok.tokenize(ifnb_in_vocab)
    ref_binned = sp.csr_matrix(reference_binned.layers["X_binned"])
    norm = reference_binned.layers["X_log1p"]
    norm = sp.csr_matrix(norm)
    edges = reference_binned.obsm["bin_edges"][:, 1:]
    gene_ids = scgpt_vocab.lookup(list(ifnb_in_vocab.var_names))
    ours_tied, ref_tied = [], []
    n_untied = 0
    for i in range(0, 2000, 7):  # every 7th cell keeps the test fast; edges are checked for all
        genes, values = cells[i]
        lo, hi = norm.indptr[i], norm.indptr[i + 1]
        cols, x = norm.indices[lo:hi], norm.data[lo:hi]
        left, right = _row_digitize(x, edges[i])
        ref_row = ref_binned[i].toarray().ravel()[cols]
        assert np.array_equal(genes[1:], gene_ids[cols])  # same genes, same order, <cls> first
        ours_row = values[1:]
        untied = left == right
        n_untied += int(untied.sum())
        np.testing.assert_array_equal(ours_row[untied], ref_row[untied])
        np.testing.assert_array_equal(ours_row[untied], left[untied])
        tied = ~untied
        # a tied value's bin lies in (right, left] under both implementations
        assert np.all((ours_row[tied] > right[tied]) & (ours_row[tied] <= left[tied]))
        assert np.all((ref_row[tied] > right[tied]) & (ref_row[tied] <= left[tied]))
        ours_tied.append(ours_row[tied])
        ref_tied.append(ref_row[tied])
    assert n_untied > 1000
    ours_hist = np.bincount(np.concatenate(ours_tied).astype(int), minlength=N_BINS) / sum(map(len, ours_tied))
    ref_hist = np.bincount(np.concatenate(ref_tied).astype(int), minlength=N_BINS) / sum(map(len, ref_tied))
    total_variation = 0.5 * np.abs(ours_hist - ref_hist).sum()
    assert total_variation < 0.01, total_variation


def test_tokens_match_tokenize_and_pad_batch(ifnb_in_vocab, reference_binned, scgpt_vocab):
    from scforge.testing.scgpt_reference import load_scgpt_reference, vocab_stand_in

    ref = load_scgpt_reference()
    sub = reference_binned[:200]
    gene_ids = scgpt_vocab.lookup(list(sub.var_names))
    mapping = {"<pad>": scgpt_vocab.pad_id, "<cls>": scgpt_vocab.cls_id}
    padded = ref.tokenize_and_pad_batch(
        np.asarray(sub.layers["X_binned"]), gene_ids, max_len=5000, vocab=vocab_stand_in(mapping),
        pad_token="<pad>", pad_value=-2, append_cls=True, include_zero_gene=False,
    )
    ours = BinnedTokenizer(scgpt_vocab, ties="left").tokenize(ifnb_in_vocab[:200]).pad()
    assert ours["genes"].shape == padded["genes"].shape
    assert np.array_equal(ours["genes"].numpy(), padded["genes"].numpy())
    assert np.array_equal(ours["padding_mask"].numpy(), padded["genes"].numpy() == scgpt_vocab.pad_id)
    ref_values = padded["values"].numpy()
    assert np.all(ours["values"].numpy()[:, 0] == 0)  # <cls> value as in tokenize_and_pad_batch
    assert np.all(ours["values"].numpy()[ours["padding_mask"].numpy()] == -2)
    # untied positions carry the same bin; tied ones may differ by the random draw only
    same = ours["values"].numpy() == ref_values
    assert same.mean() > 0.05 and np.all(same[ours["padding_mask"].numpy()])


def test_ties_left_is_numpy_digitize(ifnb_in_vocab, scgpt_vocab):
    data = ifnb_in_vocab[:50]
    tok = BinnedTokenizer(scgpt_vocab, ties="left")
    cells = tok.tokenize(data)
    edges = tok.bin_edges(data)
    continuous = BinnedTokenizer(scgpt_vocab, n_bins=None).tokenize(data)
    for i in range(50):
        expected = np.digitize(continuous[i][1][1:], edges[i])
        np.testing.assert_array_equal(cells[i][1][1:], expected)


def test_same_seed_same_result_and_chunking_threads_do_not_matter(ifnb_in_vocab, scgpt_vocab):
    data = ifnb_in_vocab[:300]
    a = BinnedTokenizer(scgpt_vocab, seed=7, max_len=300, chunk_size=2048, n_jobs=1).tokenize(data)
    b = BinnedTokenizer(scgpt_vocab, seed=7, max_len=300, chunk_size=37, n_jobs=2).tokenize(data)
    c = BinnedTokenizer(scgpt_vocab, seed=8, max_len=300).tokenize(data)
    assert np.array_equal(a.offsets, b.offsets)
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.values, b.values)
    assert not np.array_equal(a.values, c.values)


def test_max_len_subsamples_genes_and_keeps_cls(ifnb_in_vocab, scgpt_vocab):
    data = ifnb_in_vocab[:100]
    full = BinnedTokenizer(scgpt_vocab, seed=1).tokenize(data)
    capped = BinnedTokenizer(scgpt_vocab, seed=1, max_len=200).tokenize(data)
    assert capped.lengths.max() == 200
    assert np.array_equal(capped.lengths, np.minimum(full.lengths, 200))
    for i in range(100):
        g_full, v_full = full[i]
        g_cap, v_cap = capped[i]
        assert g_cap[0] == scgpt_vocab.cls_id
        lookup = dict(zip(g_full[1:].tolist(), v_full[1:].tolist()))
        assert all(lookup[g] == v for g, v in zip(g_cap[1:].tolist(), v_cap[1:].tolist()))
        assert len(set(g_cap[1:].tolist())) == len(g_cap) - 1
    # different cells keep different random subsets (not a fixed prefix)
    long_cells = np.flatnonzero(full.lengths > 400)
    assert long_cells.size >= 2
    kept_first = capped[long_cells[0]][0][1:]
    assert not np.array_equal(kept_first, full[long_cells[0]][0][1:200])


def test_include_zero_gene_emits_every_gene(ifnb_in_vocab, scgpt_vocab):
    genes = list(ifnb_in_vocab.var_names[:500])
    cells = BinnedTokenizer(scgpt_vocab, include_zero_gene=True, genes=genes).tokenize(ifnb_in_vocab[:20])
    assert np.all(cells.lengths == 501)
    x = ifnb_in_vocab[:20, genes].X.toarray()
    for i in range(20):
        g, v = cells[i]
        assert np.array_equal(g[1:], scgpt_vocab.lookup(genes))
        assert np.array_equal(v[1:] == 0, x[i] == 0)


def test_continuous_values_without_bins(ifnb_in_vocab, scgpt_vocab):
    cells = BinnedTokenizer(scgpt_vocab, n_bins=None).tokenize(ifnb_in_vocab[:5])
    x = ifnb_in_vocab[:5].X.tocsr()
    row = x[0].data
    expected = np.log1p(row / np.float32(row.sum(dtype=np.float64)) * np.float32(1e4))
    np.testing.assert_allclose(cells[0][1][1:], expected, rtol=1e-6)


def test_backed_equals_in_memory(shared_data, ifnb_small, scgpt_vocab):
    import anndata as ad

    backed = ad.read_h5ad(shared_data / "ifnb" / "ifnb_sub_2000.h5ad", backed="r")
    tok = BinnedTokenizer(scgpt_vocab, chunk_size=500)
    a = tok.tokenize(backed)
    b = tok.tokenize(ifnb_small)
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.values, b.values)
    assert list(a.obs_names) == list(ifnb_small.obs_names)


def test_input_formats_give_identical_tokens(ifnb_in_vocab, scgpt_vocab):
    import anndata as ad

    sub = ifnb_in_vocab[:40].copy()
    names = list(sub.var_names)
    tok = BinnedTokenizer(scgpt_vocab, seed=2)
    base = tok.tokenize(sub)
    dense = sub.X.toarray()
    variants = {
        "dense": ad.AnnData(dense, var=sub.var),
        "csc": ad.AnnData(sp.csc_matrix(dense), var=sub.var),
        "int": ad.AnnData(dense.astype(np.int32), var=sub.var),
        "float16": ad.AnnData(dense.astype(np.float16), var=sub.var),
    }
    for name, adata in variants.items():
        out = tok.tokenize(adata)
        assert np.array_equal(out.gene_ids, base.gene_ids), name
        assert np.array_equal(out.values, base.values), name
    coo = tok.tokenize(sp.coo_matrix(dense), var_names=names)
    assert np.array_equal(coo.values, base.values)


def test_mask_values_counts_and_leaves_padding(ifnb_in_vocab, scgpt_vocab):
    from scforge.testing.scgpt_reference import load_scgpt_reference

    batch = BinnedTokenizer(scgpt_vocab).tokenize(ifnb_in_vocab[:64]).pad()
    values = batch["values"]
    before = values.clone()
    masked, mask = mask_values(values, mask_ratio=0.4, pad_value=-2, seed=0)
    assert np.array_equal(values.numpy(), before.numpy())  # input untouched
    n_real = (~batch["padding_mask"]).sum(1).numpy()
    assert np.array_equal(mask.sum(1).numpy(), np.floor((n_real - 1) * 0.4).astype(int))
    assert not mask[:, 0].any() and not mask[batch["padding_mask"]].any()
    assert np.all(masked[mask].numpy() == -1)
    assert np.array_equal(masked[~mask].numpy(), values[~mask].numpy())
    # keep_first=0 reproduces random_mask_value's per-row counts
    ref = load_scgpt_reference().random_mask_value(values, mask_ratio=0.4, mask_value=-1, pad_value=-2)
    _, mask0 = mask_values(values, mask_ratio=0.4, pad_value=-2, keep_first=0, seed=1)
    assert np.array_equal(mask0.sum(1).numpy(), (ref.numpy() == -1).sum(1))
    again, _ = mask_values(values, mask_ratio=0.4, pad_value=-2, seed=0)
    assert np.array_equal(again.numpy(), masked.numpy())


def test_select_hvg_and_gene_subset(ifnb_in_vocab, scgpt_vocab):
    sub = ifnb_in_vocab.copy()
    x_before = sub.X.copy()
    hvg = select_hvg(sub, 300, flavor="seurat_v3")
    assert len(hvg) == 300 and set(hvg) <= set(sub.var_names)
    assert (sub.X != x_before).nnz == 0 and "highly_variable" not in sub.var
    cells = BinnedTokenizer(scgpt_vocab, genes=hvg).tokenize(sub)
    used = set(cells.gene_ids.tolist()) - {scgpt_vocab.cls_id}
    assert used <= set(scgpt_vocab.lookup(hvg).tolist())


def test_all_zero_cells_get_only_cls(scgpt_vocab, caplog):
    import anndata as ad

    x = sp.csr_matrix(np.array([[0, 0, 0], [1, 5, 0], [0, 0, 0]], dtype=np.float32))
    adata = ad.AnnData(x)
    adata.var_names = ["CD3E", "MS4A1", "GAPDH"]
    with caplog.at_level(logging.WARNING, logger="scforge"):
        cells = BinnedTokenizer(scgpt_vocab).tokenize(adata)
    assert list(cells.lengths) == [1, 3, 1]
    assert cells[0][0][0] == scgpt_vocab.cls_id
    assert "no expressed" in caplog.text


def test_meta_is_json_and_round_trips(tmp_path, ifnb_in_vocab, scgpt_vocab):
    cells = BinnedTokenizer(scgpt_vocab).tokenize(ifnb_in_vocab[:10])
    json.dumps(cells.meta)
    path = cells.save(tmp_path / "tokens.npz")
    back = type(cells).load(path)
    assert np.array_equal(back.values, cells.values) and back.meta == cells.meta


@pytest.mark.parametrize("kw", [dict(), dict(max_len=250, seed=4), dict(ties="left", normalize_total=None, log1p=False)])
def test_whole_matrix_path_equals_chunk_path(ifnb_small, scgpt_vocab, kw):
    """tokenize() on in-memory CSR runs one parallel call; iter_chunks() goes chunk by chunk."""
    data = ifnb_small[:500].copy()
    data.X = data.X.astype(np.float64)
    data.X.data[::97] = 0.0  # stored zeros are not expressed genes
    tok = BinnedTokenizer(scgpt_vocab, chunk_size=128, **kw)
    whole = tok.tokenize(data)
    chunked = type(whole).concat(list(tok.iter_chunks(data)))
    assert np.array_equal(whole.offsets, chunked.offsets)
    assert np.array_equal(whole.gene_ids, chunked.gene_ids) and np.array_equal(whole.values, chunked.values)
    assert data.X.data[0] == 0.0  # the caller's matrix keeps its stored zeros
