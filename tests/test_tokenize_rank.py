"""Geneformer rank value tokenizer: hand-computed examples, real dictionaries, properties."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from scforge.errors import InputDataError
from scforge.genes import GeneformerDictionaries, GeneVocab, load_geneformer_dictionaries
from scforge.tokenize import RankValueTokenizer

GENES = [f"ENSG{i:011d}" for i in range(1, 9)]


def toy_dictionaries(version: str = "V1") -> GeneformerDictionaries:
    specials = ["<pad>", "<mask>"] + (["<cls>", "<eos>"] if version == "V2" else [])
    roles = {"<pad>": "pad", "<mask>": "mask", "<cls>": "cls", "<eos>": "eos"}
    vocab = GeneVocab(tokens=specials + GENES, specials={roles[t]: t for t in specials})
    medians = {g: m for g, m in zip(GENES, [1.0, 2.0, 0.5, 4.0, 1.0, 1.0, 3.0, 2.0])}
    return GeneformerDictionaries(vocab=vocab, medians=medians, name_to_id=None, ensembl_mapping=None, version=version)


def toy_adata(x: np.ndarray, genes=GENES, n_counts=None) -> ad.AnnData:
    adata = ad.AnnData(sp.csr_matrix(x.astype(np.float32)))
    adata.var_names = list(genes)
    if n_counts is not None:
        adata.obs["n_counts"] = n_counts
    return adata


def test_hand_computed_ranking_v1():
    d = toy_dictionaries("V1")
    # counts of 8 genes in one cell; n_counts 100 (other genes exist in the cell)
    x = np.array([[10, 10, 0, 40, 5, 0, 30, 1]])
    cells = RankValueTokenizer(d, n_counts_key="n_counts").tokenize(toy_adata(x, n_counts=[100.0]))
    # x/100*1e4/median: g1 1000, g2 500, g4 1000, g5 500, g7 1000, g8 50
    # ties (g1, g4, g7 = 1000; g2, g5 = 500) ordered by ascending token id
    tok = d.vocab.lookup
    expected = tok([GENES[0], GENES[3], GENES[6], GENES[1], GENES[4], GENES[7]])
    assert np.array_equal(cells[0][0], expected)
    assert cells.values is None


def test_hand_computed_v2_specials_and_truncation():
    d = toy_dictionaries("V2")
    x = np.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    cells = RankValueTokenizer(d, model_input_size=5).tokenize(toy_adata(x))
    genes = cells[0][0]
    assert len(genes) == 5
    assert genes[0] == d.vocab.special_id("cls") and genes[-1] == d.vocab.special_id("eos")
    # n_counts computed = 36; scores: count/median -> g1 1, g2 1, g3 6, g4 1, g5 5, g6 6, g7 2.33, g8 4
    assert np.array_equal(genes[1:-1], d.vocab.lookup([GENES[2], GENES[5], GENES[4]]))


def test_duplicate_ids_are_summed():
    d = toy_dictionaries("V1")
    x = np.array([[3, 3, 5]])
    adata = toy_adata(x, genes=[GENES[0], GENES[0], GENES[1]])  # g1 twice: 6 total vs g2 5/2
    cells = RankValueTokenizer(d).tokenize(adata)
    assert np.array_equal(cells[0][0], d.vocab.lookup([GENES[0], GENES[1]]))


def test_result_does_not_depend_on_gene_order():
    d = toy_dictionaries("V1")
    rng = np.random.default_rng(0)
    x = rng.poisson(2.0, size=(30, 8))
    perm = rng.permutation(8)
    a = RankValueTokenizer(d).tokenize(toy_adata(x))
    b = RankValueTokenizer(d).tokenize(toy_adata(x[:, perm], genes=[GENES[p] for p in perm]))
    assert np.array_equal(a.gene_ids, b.gene_ids) and np.array_equal(a.offsets, b.offsets)


def test_log_transformed_input_is_refused(ifnb_small, shared_data):
    d = load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v1")
    with pytest.raises(InputDataError, match="raw integer counts.*log-transformed"):
        RankValueTokenizer(d).tokenize(ifnb_small[:50], layer="lognorm")


@pytest.mark.parametrize("folder,version,size", [("geneformer_v1", "V1", 2048), ("geneformer_v2_gc95M", "V2", 4096)])
def test_real_dictionaries_on_ifnb(ifnb_small, shared_data, folder, version, size):
    d = load_geneformer_dictionaries(shared_data / "genes" / folder)
    assert d.version == version
    tok = RankValueTokenizer(d)
    cells = tok.tokenize(ifnb_small[:300])
    assert cells.lengths.max() <= size
    assert np.all((cells.gene_ids >= 0) & (cells.gene_ids < len(d.vocab)))
    if version == "V2":
        starts = cells.gene_ids[cells.offsets[:-1]]
        ends = cells.gene_ids[cells.offsets[1:] - 1]
        assert np.all(starts == d.vocab.special_id("cls")) and np.all(ends == d.vocab.special_id("eos"))
    # the first gene of each cell has the highest normalized value among its expressed genes
    x = ifnb_small[:300].X.tocsr()
    totals = np.asarray(x.sum(1)).ravel()
    names = ifnb_small.var_names
    cov = tok.coverage(ifnb_small[:300])
    assert cov.n_matched > 5000
    chunked = RankValueTokenizer(d, chunk_size=64, n_jobs=2).tokenize(ifnb_small[:300])
    assert np.array_equal(chunked.gene_ids, cells.gene_ids)
    assert totals.min() > 0 and len(names) == x.shape[1]


# ---- properties on random sparse count matrices ------------------------------------------------
@st.composite
def count_matrices(draw):
    n_cells = draw(st.integers(1, 12))
    density = draw(st.floats(0.0, 1.0))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.poisson(3.0, size=(n_cells, len(GENES))) * (rng.random((n_cells, len(GENES))) < density)
    return x


@settings(max_examples=60, deadline=None)
@given(x=count_matrices(), size=st.integers(3, 10), chunk=st.integers(1, 5))
def test_properties(x, size, chunk):
    d = toy_dictionaries("V2")
    adata = toy_adata(x)
    whole = RankValueTokenizer(d, model_input_size=size).tokenize(adata)
    chunked = RankValueTokenizer(d, model_input_size=size, chunk_size=chunk, n_jobs=1).tokenize(adata)
    assert np.array_equal(whole.gene_ids, chunked.gene_ids)
    medians = np.array([d.medians[g] for g in GENES])
    totals = x.sum(1)
    for i in range(x.shape[0]):
        genes = whole[i][0]
        assert len(genes) <= size and genes[0] == d.vocab.special_id("cls") and genes[-1] == d.vocab.special_id("eos")
        body = genes[1:-1]
        assert len(set(body.tolist())) == len(body)  # a permutation of distinct genes
        expressed = np.flatnonzero(x[i] > 0)
        assert len(body) == min(len(expressed), size - 2)
        pos = body - d.vocab.special_id("eos") - 1  # toy token id -> gene column
        assert set(pos.tolist()) <= set(expressed.tolist())
        scores = x[i, pos] / totals[i] * 1e4 / medians[pos]
        assert np.all(np.diff(scores) <= 1e-9)  # descending normalized value
        if len(expressed) > len(body):  # nothing left out outranks what was kept
            left_out = np.setdiff1d(expressed, pos)
            assert scores.min() >= (x[i, left_out] / totals[i] * 1e4 / medians[left_out]).max() - 1e-9


def test_n_counts_column_is_used_and_validated():
    d = toy_dictionaries("V1")
    x = np.array([[4, 1, 0, 0, 0, 0, 0, 0]])
    bad = toy_adata(x, n_counts=[np.nan])
    with pytest.raises(InputDataError, match="n_counts"):
        RankValueTokenizer(d).tokenize(bad)
    df = pd.DataFrame({"n_counts": [50.0]})
    good = toy_adata(x)
    good.obs = df.set_index(good.obs_names)
    assert np.array_equal(RankValueTokenizer(d).tokenize(good)[0][0], d.vocab.lookup([GENES[0], GENES[1]]))


def test_scores_one_ulp_apart_are_ranked_exactly():
    """The compiled sort keys drop the scores' lowest bits; near-equal scores are put in exact order."""
    d = toy_dictionaries("V1")
    medians = dict(d.medians)
    medians[GENES[7]] = 1.0  # the higher token id gets the slightly higher score
    medians[GENES[0]] = float(np.nextafter(1.0, 2.0))
    d = GeneformerDictionaries(vocab=d.vocab, medians=medians, name_to_id=None, ensembl_mapping=None, version="V1")
    x = np.array([[1, 0, 0, 0, 0, 0, 0, 1], [3, 0, 0, 0, 0, 0, 0, 3]])
    cells = RankValueTokenizer(d).tokenize(toy_adata(x))
    for i in range(2):
        assert np.array_equal(cells[i][0], d.vocab.lookup([GENES[7], GENES[0]]))


@pytest.mark.parametrize("folder,size,with_counts", [("geneformer_v1", 2048, False), ("geneformer_v2_gc95M", 4096, True),
                                                     ("geneformer_v2_gc95M", 300, False)])
def test_whole_matrix_kernel_equals_chunk_and_numpy_paths(ifnb_small, shared_data, monkeypatch, folder, size, with_counts):
    from scforge.tokenize import rank

    d = load_geneformer_dictionaries(shared_data / "genes" / folder)
    data = ifnb_small[:400].copy()
    x = data.X.tocsr().astype(np.float32)
    x.data[::97] = 0.0  # stored zeros are not expressed genes
    data.X = x
    if with_counts:
        data.obs["n_counts"] = np.asarray(x.sum(1)).ravel() + 17.0
    before = data.X.copy()
    tok = RankValueTokenizer(d, model_input_size=size, n_counts_key="n_counts")
    whole = tok.tokenize(data)
    assert (data.X != before).nnz == 0 and data.X.nnz == before.nnz  # the caller's matrix is untouched
    from scforge.matrix import as_source

    source = as_source(data)
    assert tok._tokenize_whole(source, tok._plan(source, None)) is not None  # the compiled whole-matrix path ran
    chunked = type(whole).concat(list(RankValueTokenizer(d, model_input_size=size, chunk_size=77).iter_chunks(data)))
    monkeypatch.setattr(rank, "USE_COMPILED", False)
    slow = RankValueTokenizer(d, model_input_size=size, n_counts_key="n_counts").tokenize(data)
    for other in (chunked, slow):
        assert np.array_equal(whole.offsets, other.offsets)
        assert np.array_equal(whole.gene_ids, other.gene_ids)
    assert whole.lengths.max() <= size


@pytest.mark.parametrize("extra_index_bits,compiled", [(0, True), (40, True), (41, False)])
def test_packed_entry_layout_keeps_the_exact_order(ifnb_small, shared_data, monkeypatch, extra_index_bits, compiled):
    """Wider index fields leave the compiled sort fewer key bits (24 at the limit of 40): the order stays
    exact; past the limit the NumPy path ranks the cells, with the same result."""
    from scforge.matrix import as_source
    from scforge.tokenize import rank

    d = load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v2_gc95M")
    data = ifnb_small[:300].copy()
    expected = RankValueTokenizer(d).tokenize(data)
    layout = rank._entry_layout
    monkeypatch.setattr(rank, "_entry_layout", lambda max_row, vocab: (
        max(layout(max_row, vocab)[0], extra_index_bits - layout(max_row, vocab)[1]), layout(max_row, vocab)[1]))
    tok = RankValueTokenizer(d)
    source = as_source(data)
    assert (tok._tokenize_whole(source, tok._plan(source, None)) is not None) == compiled
    got = tok.tokenize(data)
    assert np.array_equal(got.offsets, expected.offsets) and np.array_equal(got.gene_ids, expected.gene_ids)
