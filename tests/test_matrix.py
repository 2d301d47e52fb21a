"""Reading expression in row chunks: AnnData (memory, backed), .h5ad paths, bare matrices."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from scforge.errors import InputDataError
from scforge.genes import builtin
from scforge.matrix import as_source, column_sums, iter_row_chunks, require_counts
from scforge.tokenize import BinnedTokenizer, RankValueTokenizer


@pytest.fixture()
def small_h5ad(tmp_path, ifnb_small):
    adata = ifnb_small[:300].copy()
    adata.obs["n_counts"] = np.asarray(adata.X.sum(1)).ravel() * 2.0  # deliberately not the row sums
    path = tmp_path / "small.h5ad"
    adata.write_h5ad(path)
    return path, adata


def test_path_source_streams_like_anndata(small_h5ad):
    path, adata = small_h5ad
    tok = BinnedTokenizer(builtin.builtin_vocab("scgpt-human"), chunk_size=64)
    from_path = tok.tokenize(str(path))
    from_adata = tok.tokenize(adata)
    assert np.array_equal(from_path.values, from_adata.values)
    assert list(from_path.obs_names) == list(adata.obs_names)
    layer = tok.tokenize(path, layer="lognorm")
    assert layer.n_cells == 300


def test_path_source_reads_obs_columns_lazily(small_h5ad):
    path, adata = small_h5ad
    source = as_source(path)
    assert source.obs is None  # nothing per-cell loaded up front
    np.testing.assert_array_equal(source.obs_column("n_counts"), adata.obs["n_counts"].to_numpy())
    assert source.obs_column("missing") is None
    rank = RankValueTokenizer(builtin.builtin_geneformer("geneformer-v1"))
    assert np.array_equal(rank.tokenize(path).gene_ids, rank.tokenize(adata).gene_ids)


def test_path_errors(tmp_path, small_h5ad):
    path, _ = small_h5ad
    with pytest.raises(InputDataError, match="not found"):
        as_source(tmp_path / "nope.h5ad")
    (tmp_path / "bad.h5ad").write_text("not hdf5")
    with pytest.raises(InputDataError, match="not a readable"):
        as_source(tmp_path / "bad.h5ad")
    with pytest.raises(InputDataError, match="Layer 'counts'.*'lognorm'"):
        as_source(path, layer="counts")
    with pytest.raises(InputDataError, match="no raw"):
        as_source(path, use_raw=True)


def test_chunks_cover_every_row_once_and_copy(ifnb_small):
    x = ifnb_small.X[:257]
    source = as_source(x, var_names=list(ifnb_small.var_names))
    seen = []
    for lo, hi, csr in iter_row_chunks(source, chunk_size=50):
        assert (csr != x[lo:hi]).nnz == 0
        try:  # chunks are read-only views or private copies: the source never changes
            csr.data[:] = -1
        except ValueError:
            assert not csr.data.flags.writeable
        seen.extend(range(lo, hi))
    assert seen == list(range(257)) and x.data.min() >= 0
    unsorted = sp.csr_matrix((np.array([1.0, 2.0], dtype=np.float32), np.array([1, 0]), np.array([0, 2])), shape=(1, 2))
    _, _, block = next(iter_row_chunks(as_source(unsorted, var_names=["a", "b"])))
    assert block.indices.tolist() == [0, 1] and unsorted.indices.tolist() == [1, 0]
    np.testing.assert_allclose(column_sums(source, 64), np.asarray(x.sum(0)).ravel())


def test_require_counts_message(ifnb_small):
    logged = sp.csr_matrix(ifnb_small.layers["lognorm"][:10])
    with pytest.raises(InputDataError, match="log-transformed"):
        require_counts(logged, "adata.layers['lognorm']")
    require_counts(sp.csr_matrix(ifnb_small.X[:10]), "adata.X")


def test_bare_matrix_needs_names_and_2d():
    with pytest.raises(InputDataError, match="var_names"):
        as_source(np.ones((2, 2)))
    with pytest.raises(InputDataError, match="2-d"):
        as_source(np.ones(3), var_names=["a", "b", "c"])
    with pytest.raises(InputDataError, match="2 entries but the matrix has 3 columns"):
        as_source(np.ones((2, 3)), var_names=["a", "b"])
    with pytest.raises(InputDataError, match="Expected an AnnData"):
        as_source([[1, 2]], var_names=["a", "b"])
    assert list(as_source(np.ones((2, 1)), var_names=["a"]).obs_names_range(0, 2)) == [0, 1]
