"""TileDB-SOMA experiments as a source: rows equal the AnnData ingested, CellStream over an experiment,
snapshot isolation against appends, and clear errors."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch

from scforge.data.soma import SomaMatrix, is_soma_experiment, soma_source
from scforge.data.stream import CellStream
from scforge.errors import InputDataError
from scforge.genes.builtin import builtin_vocab
from scforge.matrix import iter_row_chunks
from scforge.tokenize import BinnedTokenizer

tiledbsoma = pytest.importorskip("tiledbsoma")
soma_io = pytest.importorskip("tiledbsoma.io")


def tok():
    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=64, seed=0)


def part(adata, lo, hi, layers=False):
    """Cells lo..hi-1 as a new AnnData (raw counts in X; no obsm, which SOMA appends refuse)."""
    import anndata as ad

    extra = {"layers": {"lognorm": adata.layers["lognorm"][lo:hi].copy()}} if layers else {}
    return ad.AnnData(X=adata.X[lo:hi].copy(), obs=adata.obs.iloc[lo:hi][["stim"]].copy(), var=adata.var.copy(),
                      **extra)


def append(uri, adata):
    """The documented append path: register, resize the experiment, then ingest with the mapping."""
    rd = soma_io.register_anndatas(str(uri), [adata], measurement_name="RNA", obs_field_name="obs_id",
                                   var_field_name="var_id")
    rd.prepare_experiment(str(uri))
    soma_io.from_anndata(str(uri), adata, measurement_name="RNA", registration_mapping=rd)


def overwrite(array_uri, row, column, value):
    import pyarrow as pa

    with tiledbsoma.SparseNDArray.open(array_uri, "w") as x:
        x.write(pa.table({"soma_dim_0": pa.array([row], pa.int64()), "soma_dim_1": pa.array([column], pa.int64()),
                          "soma_data": pa.array([value], pa.float32())}))


@pytest.fixture(scope="module")
def experiment(ifnb_small, tmp_path_factory):
    uri = tmp_path_factory.mktemp("soma") / "exp"
    soma_io.from_anndata(str(uri), part(ifnb_small, 0, 300, layers=True), measurement_name="RNA")
    return uri, ifnb_small[:300]


def assert_same(a, b):
    assert a.shape == b.shape
    assert (a != b).nnz == 0


def test_rows_equal_the_anndata(experiment, caplog):
    uri, adata = experiment
    with caplog.at_level(logging.WARNING, logger="scforge"):
        source = soma_source(uri)  # no X layer "raw": falls back to "data", saying so
    assert "no X layer 'raw'; reading 'data'" in caplog.text and "'lognorm'" in caplog.text
    assert source.where == f"soma:{uri}:RNA/X/data"
    assert (source.n_obs, source.n_vars) == (300, adata.n_vars) and source.obs is None
    assert list(source.var.index) == list(adata.var_names)
    for lo, hi in [(0, 1), (0, 64), (100, 229), (250, 300), (299, 300), (298, 400)]:
        block = source.matrix[lo:hi]
        assert block.dtype == np.float32 and block.has_canonical_format
        assert_same(block, adata.X[lo:min(hi, 300)])
    assert source.matrix[300:300].shape == (0, adata.n_vars)
    chunks = list(iter_row_chunks(source, 77))
    assert [(lo, hi) for lo, hi, _ in chunks][-1] == (231, 300)
    for lo, hi, csr in chunks:
        assert_same(csr, adata.X[lo:hi])
    lognorm = soma_source(uri, layer="lognorm")
    assert_same(lognorm.matrix[10:90], adata.layers["lognorm"][10:90].astype(np.float32))
    # no open handle travels in a pickle (spawned DataLoader workers); the copy reads the same snapshot
    copy = pickle.loads(pickle.dumps(source.matrix))
    assert isinstance(copy, SomaMatrix) and copy.timestamp_ms == source.matrix.timestamp_ms
    assert_same(copy[200:260], adata.X[200:260])
    assert is_soma_experiment(uri) and is_soma_experiment(str(uri))


def test_cellstream_every_cell_once_over_ranks_and_workers_with_direct_tokens(experiment):
    uri, adata = experiment
    direct = tok().tokenize(adata.copy())
    seen = []
    for rank in range(2):
        stream = CellStream([str(uri)], tok(), batch_size=16, block_size=32, buffer_blocks=2, seed=1, rank=rank,
                            world_size=2)
        next(iter(stream))  # handles opened in this process first: the forked workers must open their own
        # a worker reusing the parent's TileDB thread pools deadlocks: time out instead of hanging
        for batch in torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2, timeout=60):
            seen.append(batch["cells"])
            for j, cell in enumerate(batch["cells"]):
                genes, values = batch["tokens"].cell(j)
                want_genes, want_values = direct.cell(int(cell))
                np.testing.assert_array_equal(genes, want_genes)
                np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(300))  # no duplicates, no omissions


def test_snapshot_isolation_against_appends(ifnb_small, tmp_path):
    uri = tmp_path / "exp"
    soma_io.from_anndata(str(uri), part(ifnb_small, 0, 200), measurement_name="RNA")
    source = soma_source(uri, layer="data")
    before = source.matrix[150:200]  # a handle is open before the append
    stream = CellStream([uri], tok(), batch_size=50, block_size=64, shuffle=False)
    append(uri, part(ifnb_small, 200, 260))
    overwrite(source.matrix.uri, row=150, column=int(before[0].indices[0]), value=12345.0)  # an existing cell
    assert source.n_obs == 200 and source.matrix.shape == (200, ifnb_small.n_vars)
    assert_same(source.matrix[150:260], before)  # the appended rows 200.. stay invisible
    # a handle opened after the writes (as in a new thread or worker) still reads the pinned snapshot
    fresh = SomaMatrix(source.matrix.uri, (200, ifnb_small.n_vars), source.matrix.timestamp_ms)
    assert_same(fresh[140:260], ifnb_small.X[140:200])
    np.testing.assert_array_equal(np.concatenate([b["cells"] for b in stream]), np.arange(200))
    later = soma_source(uri, layer="data")
    assert later.n_obs == 260 and later.matrix.timestamp_ms > source.matrix.timestamp_ms
    assert_same(later.matrix[180:260], ifnb_small.X[180:260])
    assert later.matrix[150:151][0, before[0].indices[0]] == 12345.0
    assert soma_source(uri, layer="data", timestamp=source.matrix.timestamp_ms).n_obs == 200  # reopen a snapshot


@pytest.mark.filterwarnings("ignore:Writing zarr v2")
def test_clear_errors(ifnb_small, experiment, tmp_path):
    uri, _ = experiment
    with pytest.raises(InputDataError, match="does not exist"):
        soma_source(tmp_path / "missing")
    zarr_store = tmp_path / "cells.zarr"
    part(ifnb_small, 0, 20).write_zarr(zarr_store)
    assert not is_soma_experiment(zarr_store) and not is_soma_experiment(tmp_path / "missing")
    assert not is_soma_experiment(uri / "ms" / "RNA")  # a measurement, not an experiment
    for bad in (zarr_store, uri / "ms" / "RNA"):
        with pytest.raises(InputDataError, match="is not a TileDB-SOMA Experiment"):
            soma_source(bad)
    with pytest.raises(InputDataError, match="no measurement 'ATAC'. Measurements present: 'RNA'"):
        soma_source(uri, measurement="ATAC")
    with pytest.raises(InputDataError, match="X layer 'counts' is not in .* X layers present: 'data', 'lognorm'"):
        soma_source(uri, layer="counts")
    empty = tmp_path / "empty"
    soma_io.from_anndata(str(empty), part(ifnb_small, 0, 20), measurement_name="RNA", ingest_mode="schema_only")
    with pytest.raises(InputDataError, match="is empty \\(0 cells\\)"):
        soma_source(empty)
    dense = tmp_path / "dense"
    soma_io.from_anndata(str(dense), part(ifnb_small, 0, 20), measurement_name="RNA", X_kind=tiledbsoma.DenseNDArray)
    with pytest.raises(InputDataError, match="RNA/X/data is a dense array; scforge reads sparse X layers"):
        soma_source(dense)
    genes = tmp_path / "genes"
    soma_io.from_anndata(str(genes), part(ifnb_small, 0, 20), measurement_name="RNA", var_id_name="gene")
    with pytest.raises(InputDataError, match="no 'var_id' column and no recorded index column. Columns: 'gene'. "
                                             "Pass gene_col="):
        soma_source(genes)
    assert list(soma_source(genes, gene_col="gene").var.index[:2]) == list(ifnb_small.var_names[:2])
    named = part(ifnb_small, 0, 20)
    named.var.index.name = "symbol"  # ingestion keeps a named index as that column and records its name
    soma_io.from_anndata(str(tmp_path / "named"), named, measurement_name="RNA")
    assert list(soma_source(tmp_path / "named").var.index) == list(ifnb_small.var_names)
    # cells 20..39 registered but never written: soma_joinids 0..19 and 40..59 are not positions
    gap = tmp_path / "gap"
    soma_io.from_anndata(str(gap), part(ifnb_small, 0, 20), measurement_name="RNA")
    rd = soma_io.register_anndatas(str(gap), [part(ifnb_small, 20, 40), part(ifnb_small, 40, 60)],
                                   measurement_name="RNA", obs_field_name="obs_id", var_field_name="var_id")
    rd.prepare_experiment(str(gap))
    soma_io.from_anndata(str(gap), part(ifnb_small, 40, 60), measurement_name="RNA", registration_mapping=rd)
    with pytest.raises(InputDataError, match="soma_joinids .* run 0..59 for 40 cells, not 0..39"):
        soma_source(gap)


def test_pretraining_from_a_soma_experiment(experiment):
    """scGPT's generative pretraining streamed from the experiment; the vocabulary is its genes."""
    from scforge.tasks.pretrain import pretrain_stream

    uri, adata = experiment
    result = pretrain_stream(str(uri), val_sources=str(uri), d_model=32, n_layers=1, n_heads=2, d_hid=32,
                             max_length=48, batch_size=32, epochs=1, progress=False, accelerator="cpu")
    assert result.n_train_cells == result.n_val_cells == 300
    assert len(result.model.vocab) == adata.n_vars + 3  # the genes plus <pad>, <cls>, <eoc>
    assert np.isfinite(result.metrics["val/gep"]) and np.isfinite(result.metrics["train/loss"])
