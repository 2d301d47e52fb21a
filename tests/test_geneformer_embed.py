"""Geneformer.embed / gene_embeddings against transformers (EmbExtractor semantics) on real ifnb cells,
input order, input checks."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from scforge.errors import ConfigError, GeneIdentityError, InputDataError
from scforge.models.geneformer import GeneformerConfig
from scforge.models.geneformer.api import Geneformer

# parity with fp32 reference code: "auto" precision must not pick bf16 on a bf16-capable CPU
pytestmark = pytest.mark.usefixtures("fp32_auto")

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=300)


def published(tmp_path, version: str):
    config = GeneformerConfig.v1_10m(**TINY) if version == "V1" else GeneformerConfig.v2_104m(**TINY)
    torch.manual_seed(0)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.1)
    hf.save_pretrained(tmp_path / version)
    return hf, Geneformer.from_published(tmp_path / version)


def hf_hidden(hf, cells, layer):
    out = []
    for i in range(cells.n_cells):
        ids = torch.from_numpy(cells.cell(i)[0].astype(np.int64))[None]
        with torch.no_grad():
            out.append(hf(input_ids=ids, output_hidden_states=True).hidden_states[layer][0].numpy())
    return out


@pytest.fixture
def adata(ifnb_small):
    return ifnb_small[:24].copy()


def test_v1_cell_embedding_matches_transformers(tmp_path, adata):
    hf, model = published(tmp_path, "V1")
    emb = model.embed(adata, batch_size=7)
    cells = model.tokenize(adata)
    assert cells.lengths.max() == 300  # truncated to the model's positions
    penultimate = hf_hidden(hf, cells, TINY["num_hidden_layers"] - 1)  # emb_layer=-1
    np.testing.assert_allclose(emb, np.stack([h.mean(0) for h in penultimate]), atol=1e-5)
    assert adata.obsm["X_geneformer"] is emb
    last = model.embed(adata, emb_layer=0, key_added=None)
    np.testing.assert_allclose(last, np.stack([h.mean(0) for h in hf_hidden(hf, cells, -1)]), atol=1e-5)
    order = np.random.default_rng(0).permutation(adata.n_obs)  # rows follow the input order
    np.testing.assert_allclose(model.embed(adata[order].copy(), key_added=None), emb[order], atol=1e-6)
    with pytest.raises(ConfigError, match="V1 dictionaries lack"):
        model.embed(adata, mode="cls")
    with pytest.raises(ConfigError, match="emb_layer"):
        model.embed(adata, emb_layer=-4)


def test_v2_cls_and_cell_modes_match_transformers(tmp_path, adata):
    hf, model = published(tmp_path, "V2")
    cells = model.tokenize(adata)
    assert np.all(cells.gene_ids[cells.offsets[:-1]] == 2)  # <cls>
    states = hf_hidden(hf, cells, TINY["num_hidden_layers"] - 1)
    np.testing.assert_allclose(model.embed(adata, key_added=None), np.stack([h[0] for h in states]), atol=1e-5)
    np.testing.assert_allclose(model.embed(adata, mode="cell", key_added=None),
                               np.stack([h[1:-1].mean(0) for h in states]), atol=1e-5)


def test_gene_embeddings(tmp_path, adata):
    hf, model = published(tmp_path, "V1")
    genes = ["CD74", "ENSG00000163736", "LYZ"]  # symbols and an Ensembl id (PPBP)
    per_cell = model.gene_embeddings(adata, genes, per_cell=True)
    cells = model.tokenize(adata)
    ids = model.gene_ids(genes)
    states = hf_hidden(hf, cells, TINY["num_hidden_layers"] - 1)
    for c in range(cells.n_cells):
        seq = cells.cell(c)[0]
        for j, g in enumerate(ids):
            hit = np.flatnonzero(seq == g)
            if hit.size:
                np.testing.assert_allclose(per_cell[c, j], states[c][hit[0]], atol=1e-5)
            else:
                assert np.isnan(per_cell[c, j]).all()
    mean = model.gene_embeddings(adata, genes)
    np.testing.assert_allclose(mean.to_numpy(), np.nanmean(per_cell, axis=0), atol=1e-5)
    everything = model.gene_embeddings(adata)
    assert everything.index.str.startswith("ENSG").all() and len(everything) > 1000
    np.testing.assert_allclose(everything.loc[model.vocab.token(int(ids[0]))], mean.iloc[0], atol=1e-5)
    with pytest.raises(GeneIdentityError, match="NOT_A_GENE"):
        model.gene_embeddings(adata, ["CD74", "NOT_A_GENE"])


def test_input_checks(tmp_path, adata):
    _, model = published(tmp_path, "V1")
    lognorm = adata.copy()
    lognorm.X = lognorm.layers["lognorm"]
    with pytest.raises(InputDataError, match="raw integer counts"):
        model.embed(lognorm)
    symbols = adata.copy()
    symbols.var_names = [f"gene_{i}" for i in range(symbols.n_vars)]
    with pytest.raises(GeneIdentityError):
        model.embed(symbols)
    empty = adata[:3].copy()
    empty.X = sp.csr_matrix(empty.X.shape, dtype=np.float32)
    with pytest.raises(InputDataError, match="express no gene"):
        model.embed(empty)
    untouched = adata.copy()
    model.embed(untouched, key_added=None)
    assert "X_geneformer" not in untouched.obsm and list(untouched.obs.columns) == list(adata.obs.columns)


def test_cli_embed_and_scforge_load_a_published_folder(tmp_path, adata, capsys):
    """`scforge embed` on a Hugging Face Geneformer folder (detected as such by scforge.load); options
    Geneformer does not take are refused, not dropped."""
    import anndata as ad

    import scforge
    from scforge.cli import main

    hf, model = published(tmp_path, "V1")
    loaded = scforge.load(tmp_path / "V1")
    assert type(loaded).__name__ == "Geneformer"
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    out = tmp_path / "emb.h5ad"
    assert main(["embed", str(data), "--model", str(tmp_path / "V1"), "--out", str(out), "--no-progress"]) == 0
    written = ad.read_h5ad(out)
    np.testing.assert_allclose(written.obsm["X_geneformer"], model.embed(adata, key_added=None), atol=1e-6)
    assert main(["embed", str(data), "--model", str(tmp_path / "V1"), "--out", str(tmp_path / "x.h5ad"),
                 "--no-normalize"]) != 0
    assert "--no-normalize" in capsys.readouterr().err
