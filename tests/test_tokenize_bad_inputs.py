"""Bad inputs for every tokenizer: each gets a clear scforge error or documented handling, and the
caller's AnnData is never modified."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.errors import GeneIdentityError, InputDataError, ScforgeError
from scforge.genes import builtin, map_symbols_to_ensembl
from scforge.tokenize import BinnedTokenizer, LogBinTokenizer, RankValueTokenizer

GENES = ["CD3E", "MS4A1", "LYZ", "GNLY", "NKG7", "CD14", "FCGR3A", "PPBP"]


def make_tokenizer(kind: str):
    if kind == "scgpt":
        return BinnedTokenizer(builtin.builtin_vocab("scgpt-human"))
    if kind == "geneformer":
        return RankValueTokenizer(builtin.builtin_geneformer("geneformer-v2"))
    return LogBinTokenizer(GENES, min_genes=0)


KINDS = ["scgpt", "geneformer", "scbert"]


def counts_adata(x=None) -> ad.AnnData:
    if x is None:
        rng = np.random.default_rng(0)
        x = rng.poisson(3.0, size=(6, len(GENES))).astype(np.float32)
        x[2] = 0  # an all-zero cell
        x[:, 4] = 0  # an all-zero gene
    adata = ad.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=[f"c{i}" for i in range(len(x))]))
    adata.var_names = GENES[: x.shape[1]]
    adata.layers["counts"] = adata.X.copy()
    return adata


def snapshot(adata: ad.AnnData) -> dict:
    return {
        "X": adata.X.toarray().copy(),
        "layers": {k: v.toarray().copy() for k, v in adata.layers.items()},
        "var": adata.var.copy(),
        "obs": adata.obs.copy(),
        "var_names": list(adata.var_names),
    }


def assert_unchanged(adata: ad.AnnData, before: dict) -> None:
    assert np.array_equal(adata.X.toarray(), before["X"])
    assert adata.layers.keys() == before["layers"].keys()
    for k, v in before["layers"].items():
        assert np.array_equal(adata.layers[k].toarray(), v)
    pd.testing.assert_frame_equal(adata.var, before["var"])
    pd.testing.assert_frame_equal(adata.obs, before["obs"])
    assert list(adata.var_names) == before["var_names"]


@pytest.mark.parametrize("kind", KINDS)
def test_caller_anndata_is_never_modified(kind):
    adata = counts_adata()
    before = snapshot(adata)
    tok = make_tokenizer(kind)
    tok.tokenize(adata)
    tok.tokenize(adata, layer="counts")
    tok.coverage(adata)
    assert_unchanged(adata, before)


@pytest.mark.parametrize("kind", KINDS)
def test_negative_values(kind):
    x = counts_adata().X.toarray()
    x[1, 0] = -1
    with pytest.raises(InputDataError, match="negative values.*first at cell 1, gene column 0"):
        make_tokenizer(kind).tokenize(counts_adata(x))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_and_inf(kind, bad):
    x = counts_adata().X.toarray()
    x[3, 1] = bad
    with pytest.raises(InputDataError, match="NaN or infinite.*first at cell 3, gene column 1"):
        make_tokenizer(kind).tokenize(counts_adata(x))


@pytest.mark.parametrize("kind", ["geneformer", "scbert"])
def test_log_transformed_where_counts_required(kind):
    x = np.log1p(counts_adata().X.toarray())
    with pytest.raises(InputDataError, match="raw integer counts.*log-transformed"):
        make_tokenizer(kind).tokenize(counts_adata(x))
    with pytest.raises(InputDataError, match="normalized"):
        make_tokenizer(kind).tokenize(counts_adata(counts_adata().X.toarray() * 1e4 / 7.0 + 0.5))


def test_binned_accepts_log_input_and_warns(caplog):
    x = np.log1p(counts_adata().X.toarray())
    with caplog.at_level(logging.WARNING, logger="scforge"):
        cells = make_tokenizer("scgpt").tokenize(counts_adata(x))
    assert "log-transformed already" in caplog.text
    # quantile bins do not change under the monotone log1p (up to ties)
    raw = BinnedTokenizer(builtin.builtin_vocab("scgpt-human"), ties="left").tokenize(counts_adata())
    logged = BinnedTokenizer(builtin.builtin_vocab("scgpt-human"), ties="left", log1p=False,
                             normalize_total=None).tokenize(counts_adata(x))
    assert np.array_equal(raw.gene_ids, logged.gene_ids) and np.array_equal(raw.values, logged.values)
    assert cells.n_cells == 6


@pytest.mark.parametrize("kind", KINDS)
def test_all_zero_cells_and_genes(kind, caplog):
    adata = counts_adata()
    with caplog.at_level(logging.WARNING, logger="scforge"):
        cells = make_tokenizer(kind).tokenize(adata)
    assert cells.n_cells == 6
    g, v = cells[2]
    if kind == "scgpt":
        assert len(g) == 1 and v[0] == 0  # <cls> only
        assert "no expressed" in caplog.text
    elif kind == "geneformer":
        assert len(g) == 2  # <cls> <eos>
        assert "no expressed" in caplog.text
    else:
        assert np.all(v == 0) and len(v) == len(GENES) + 1
    # the all-zero gene (NKG7, column 4) never appears as an expressed token
    if kind == "scbert":
        assert np.all(cells.pad()["values"].numpy()[:, 4] == 0)
    else:
        token = "NKG7" if kind == "scgpt" else str(map_symbols_to_ensembl(["NKG7"])[0])
        nkg7 = make_tokenizer(kind).vocab[token]
        assert nkg7 not in set(cells.gene_ids.tolist())
        other = make_tokenizer(kind).vocab["CD3E" if kind == "scgpt" else str(map_symbols_to_ensembl(["CD3E"])[0])]
        assert other in set(cells.gene_ids.tolist())


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_var_names_are_summed(kind):
    x = counts_adata().X.toarray()[:, :4]
    adata = counts_adata(x)
    dup = ad.AnnData(sp.csr_matrix(np.concatenate([x, x[:, :1]], axis=1)))
    dup.var_names = GENES[:4] + [GENES[0]]  # CD3E twice
    summed = x.copy()
    summed[:, 0] *= 2
    expected = make_tokenizer(kind).tokenize(counts_adata(summed))
    got = make_tokenizer(kind).tokenize(dup)
    assert np.array_equal(got.values if got.values is not None else got.gene_ids,
                          expected.values if expected.values is not None else expected.gene_ids)
    assert adata.n_vars == 4
    assert make_tokenizer(kind).coverage(dup).n_duplicates_collapsed == 1


@pytest.mark.parametrize("kind", KINDS)
def test_input_formats(kind):
    x = counts_adata().X.toarray()
    base = make_tokenizer(kind).tokenize(counts_adata(x))
    key = "values" if base.values is not None else "gene_ids"
    for matrix in (x, sp.csc_matrix(x), x.astype(np.int64), x.astype(np.float16), x.astype(np.float64)):
        adata = ad.AnnData(matrix)
        adata.var_names = GENES
        got = make_tokenizer(kind).tokenize(adata)
        assert np.array_equal(getattr(got, key), getattr(base, key)), type(matrix)
    coo = make_tokenizer(kind).tokenize(sp.coo_matrix(x), var_names=GENES)
    assert np.array_equal(getattr(coo, key), getattr(base, key))


@pytest.mark.parametrize("kind", KINDS)
def test_empty_anndata(kind):
    with pytest.raises(InputDataError, match="empty"):
        make_tokenizer(kind).tokenize(ad.AnnData(sp.csr_matrix((0, len(GENES)), dtype=np.float32),
                                                 var=pd.DataFrame(index=GENES)))
    with pytest.raises(InputDataError, match="empty"):
        make_tokenizer(kind).tokenize(ad.AnnData(sp.csr_matrix((3, 0), dtype=np.float32)))


@pytest.mark.parametrize("kind", KINDS)
def test_missing_gene_column_and_layer(kind):
    adata = counts_adata()
    with pytest.raises(GeneIdentityError, match="Gene column 'ensembl_id'.*Available columns"):
        make_tokenizer(kind).tokenize(adata, gene_col="ensembl_id")
    with pytest.raises(InputDataError, match="Layer 'raw'.*Layers present: 'counts'"):
        make_tokenizer(kind).tokenize(adata, layer="raw")


@pytest.mark.parametrize("kind", KINDS)
def test_zero_vocabulary_overlap(kind):
    adata = counts_adata()
    adata.var_names = [f"gene_{i}" for i in range(len(GENES))]
    with pytest.raises(GeneIdentityError, match="0 of 8") as info:
        make_tokenizer(kind).tokenize(adata)
    assert "vocabulary" in str(info.value)
    assert isinstance(info.value, ScforgeError)


def test_backed_anndata_for_rank_and_logbins(tmp_path):
    adata = counts_adata()
    path = tmp_path / "cells.h5ad"
    adata.write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    for kind in ("geneformer", "scbert"):
        a = make_tokenizer(kind).tokenize(backed)
        b = make_tokenizer(kind).tokenize(adata)
        key = "values" if a.values is not None else "gene_ids"
        assert np.array_equal(getattr(a, key), getattr(b, key))


@pytest.mark.parametrize("kind", KINDS)
def test_explicit_zeros_are_ignored_and_left_in_place(kind):
    x = counts_adata().X.toarray()
    stored = sp.csr_matrix(x)
    stored.data[0] = 0.0  # an explicitly stored zero in the caller's matrix
    adata = ad.AnnData(stored.copy())
    adata.var_names = GENES
    nnz_before = adata.X.nnz
    got = make_tokenizer(kind).tokenize(adata)
    clean = stored.copy()
    clean.eliminate_zeros()
    expected = make_tokenizer(kind).tokenize(counts_adata(clean.toarray()))
    key = "values" if got.values is not None else "gene_ids"
    assert np.array_equal(getattr(got, key), getattr(expected, key))
    assert adata.X.nnz == nnz_before and adata.X.data[0] == 0.0  # caller's structure untouched
