"""model.embed / gene_embeddings / contextual embeddings and `scforge embed` on real cells."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import scforge
from scforge.cli import main
from scgpt_helpers import PAD_ID, VOCAB, reference_model
from scforge.errors import GeneIdentityError, InputDataError
from scforge.models.scgpt import ScGPT, to_scforge_keys

# parity with fp32 reference code: "auto" precision must not pick bf16 on a bf16-capable CPU
pytestmark = pytest.mark.usefixtures("fp32_auto")


@pytest.fixture(scope="module")
def pair():
    """A tiny reference model and the scforge model with its weights (max_seq_len 300 keeps tests fast)."""
    torch.manual_seed(0)
    ref = reference_model(do_mvc=True)
    model = ScGPT.new(VOCAB, d_model=32, n_heads=4, d_hid=48, n_layers=2, max_seq_len=300)
    model.module.load_state_dict(to_scforge_keys(ref.state_dict()), strict=False)
    model.module.eval()
    return ref, model


@pytest.fixture()
def cells(ifnb_small):
    return ifnb_small[:40].copy()


def test_embed_matches_reference_on_same_tokens_and_keeps_data(pair, cells):
    ref, model = pair
    before_x = cells.X.copy()
    before_obs, before_var = cells.obs.copy(), cells.var.copy()
    emb = model.embed(cells, batch_size=7, progress=False, seed=3)
    assert emb.shape == (40, 32) and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    assert cells.obsm["X_scGPT"] is emb and cells.uns["scforge"]["X_scGPT"]["seed"] == 3
    assert (cells.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(cells.obs, before_obs)
    pd.testing.assert_frame_equal(cells.var, before_var)
    # the same tokens through the reference model, padded, in input order
    batch = model.tokenizer(seed=3).tokenize(cells).pad(pad_id=PAD_ID, pad_value=-2.0)
    with torch.no_grad():
        out = ref._encode(batch["genes"], batch["values"], batch["padding_mask"])[:, 0].numpy()
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    assert np.abs(out - emb).max() < 1e-5
    # same seed, same result; another seed subsamples other genes in long cells
    assert np.array_equal(model.embed(cells.copy(), batch_size=40, progress=False, seed=3), emb)
    assert not np.array_equal(model.embed(cells.copy(), progress=False, seed=4), emb)


def test_embed_drops_unknown_genes_and_reads_paths(pair, cells, tmp_path):
    _, model = pair
    extra = ad.AnnData(sp.random(40, 5, density=0.5, format="csr", random_state=0) * 10,
                       var=pd.DataFrame(index=[f"NOT_A_GENE_{i}" for i in range(5)]))
    extra.X.data = np.ceil(extra.X.data)
    extra.obs_names = cells.obs_names
    wider = ad.concat([cells, extra], axis=1)
    wider.obs = cells.obs.copy()
    a = model.embed(cells, progress=False, normalize=False)
    b = model.embed(wider, progress=False, normalize=False)
    assert np.allclose(a, b, atol=1e-6)  # unknown genes are not tokens
    path = tmp_path / "cells.h5ad"
    cells.write_h5ad(path)
    c = model.embed(str(path), progress=False, normalize=False)
    assert np.allclose(a, c, atol=1e-6)


def test_embed_bad_inputs(pair, cells):
    _, model = pair
    logged = cells.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data / 3.0)
    with pytest.raises(InputDataError, match="not integers"):
        model.embed(logged, progress=False)
    model.embed(logged, progress=False, check_input=False)  # the escape hatch works
    renamed = cells.copy()
    renamed.var_names = [f"zz_unknown_{i}" for i in range(renamed.n_vars)]
    with pytest.raises(GeneIdentityError):
        model.embed(renamed, progress=False)
    empty = cells.copy()
    x = empty.X.tolil()
    x[3] = 0
    empty.X = sp.csr_matrix(x)
    with pytest.raises(InputDataError, match="express no gene"):
        model.embed(empty, progress=False)
    lognorm_model = ScGPT(model.module, model.vocab)
    lognorm_model.module.config.expected_input = "log1p"
    try:
        with pytest.raises(InputDataError, match="log1p"):
            lognorm_model.embed(cells, progress=False)
    finally:
        lognorm_model.module.config.expected_input = "counts"


def test_gene_and_contextual_embeddings(pair, cells):
    _, model = pair
    genes = ["CD3E", "MS4A1", "LYZ"]
    table = model.gene_embeddings(genes)
    ids = torch.as_tensor(VOCAB.lookup(genes))
    with torch.no_grad():
        expected = model.module.encoder(ids).numpy()
    assert list(table.index) == genes and np.allclose(table.to_numpy(), expected)
    with pytest.raises(GeneIdentityError, match="ZZNOTAGENE"):
        model.gene_embeddings(["CD3E", "ZZNOTAGENE"])
    assert list(model.gene_embeddings(["CD3E", "ZZNOTAGENE"], missing="drop").index) == ["CD3E"]
    ctx = model.contextual_gene_embeddings(cells, genes, progress=False, max_length=2000)  # no subsampling
    assert ctx.shape == (40, 3, 32)
    expressed = np.asarray((cells[:, genes].X > 0).todense())
    assert np.array_equal(~np.isnan(ctx[:, :, 0]), expressed)
    tokens = model.tokenizer(max_length=2000).tokenize(cells[:1])
    with torch.no_grad():
        h = model.module.encode(torch.as_tensor(tokens.gene_ids, dtype=torch.long)[None],
                                torch.as_tensor(tokens.values)[None])[0].numpy()
    for j, gene_id in enumerate(ids.tolist()):
        where = np.flatnonzero(tokens.gene_ids == gene_id)
        if where.size:
            assert np.allclose(ctx[0, j], h[where[0]], atol=1e-5)


def test_cli_embed_writes_new_file(pair, cells, tmp_path, capsys):
    _, model = pair
    folder = model.save(tmp_path / "model")
    data = tmp_path / "in.h5ad"
    cells.write_h5ad(data)
    out = tmp_path / "out.h5ad"
    assert main(["embed", str(data), "--model", str(folder), "--out", str(out), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["cells"] == 40 and summary["dim"] == 32
    written = ad.read_h5ad(out)
    assert written.obsm["X_scGPT"].shape == (40, 32)
    assert "X_scGPT" not in ad.read_h5ad(data).obsm  # the input is untouched
    assert main(["embed", str(data), "--model", str(folder), "--out", str(data)]) == 2
    assert "never overwrites" in capsys.readouterr().err
    assert scforge.load(folder).config.max_seq_len == 300
