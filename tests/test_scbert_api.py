"""The user-facing ScBERT: embeddings, predictions and input checks on real ifnb cells."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import scforge
from scforge.errors import ConfigError, GeneIdentityError, InputDataError
from scforge.models.scbert import ScBERT
from scbert_helpers import ifnb_cells, random_gene2vec  # noqa: F401 - fixture

pytestmark = pytest.mark.shared_data
TINY = {"dim": 16, "depth": 2, "heads": 2, "dim_head": 8, "nb_features": 12}


def _model(panel, classes=None, seed=0) -> ScBERT:
    return ScBERT.new(panel, gene2vec=random_gene2vec(len(panel), 16, seed), seed=seed, classes=classes, **TINY)


def test_embed_is_the_mean_of_final_hidden_states(ifnb_cells):  # noqa: F811
    adata, panel = ifnb_cells
    adata = adata[:40].copy()
    before = adata.X.copy()
    model = _model(panel)
    emb = model.embed(adata, progress=False, precision="fp32")
    assert emb.shape == (40, 16) and np.isfinite(emb).all()
    assert (adata.X != before).nnz == 0 and adata.obsm["X_scBERT"] is emb
    tokens = torch.from_numpy(model.token_matrix(model.tokenizer().tokenize(adata)).astype(np.int64))
    with torch.no_grad():
        expected = model.module.encode(tokens).mean(1).numpy()
    assert np.allclose(emb, expected, atol=1e-5)
    again = model.embed(adata, key_added="", batch_size=7, progress=False, precision="fp32")
    assert np.allclose(again, emb, atol=1e-6)  # batch size does not change the result
    assert not np.allclose(emb[0], emb[1])


def test_log_data_and_missing_panel_genes_are_rejected(ifnb_cells, caplog):  # noqa: F811
    adata, panel = ifnb_cells
    model = _model(panel)
    with pytest.raises(InputDataError, match="raw counts"):
        model.embed(adata, layer="lognorm", progress=False)
    few = adata[:, [g for g in adata.var_names if g not in set(panel[50:])]].copy()
    with caplog.at_level(logging.WARNING, logger="scforge"):
        assert model.check_input(few) == 50
    assert "only 50 of the 299 panel genes" in caplog.text
    none = adata[:, [g for g in adata.var_names if g not in set(panel)]].copy()
    with pytest.raises(GeneIdentityError, match="0 of"):
        model.check_input(none)


def test_predict_softmax_and_unassigned_threshold(ifnb_cells):  # noqa: F811
    adata, panel = ifnb_cells
    adata = adata[:30].copy()
    model = _model(panel, classes=["B", "Mono", "T"])
    proba = model.predict_proba(adata, progress=False, precision="fp32")
    assert proba.shape == (30, 3) and np.allclose(proba.sum(1), 1, atol=1e-5)
    names = np.array(["B", "Mono", "T"], dtype=object)
    assert (model.predict(adata, progress=False, precision="fp32") == names[proba.argmax(1)]).all()
    cut = float(np.median(proba.max(1)))
    labels = model.predict(adata, unassign_threshold=cut, progress=False, precision="fp32")
    low = proba.max(1) < cut
    assert low.any() and (labels[low] == "Unassigned").all() and (labels[~low] == names[proba.argmax(1)][~low]).all()
    assert (adata.obs["scbert_pred"].to_numpy() == labels).all()
    with pytest.raises(ConfigError, match="unassign_threshold"):
        model.predict(adata, unassign_threshold=1.5)
    with pytest.raises(ConfigError, match="no classification head"):
        _model(panel).predict_proba(adata, progress=False)


def test_conv1_pooling_is_the_heads_per_gene_scores(ifnb_cells):  # noqa: F811
    adata, panel = ifnb_cells
    adata = adata[:10].copy()
    model = _model(panel, classes=["a", "b"])
    emb = model.embed(adata, pooling="conv1", progress=False, precision="fp32")
    assert emb.shape == (10, len(panel) + 1) and (emb >= 0).all()
    tokens = torch.from_numpy(model.token_matrix(model.tokenizer().tokenize(adata)).astype(np.int64))
    with torch.no_grad():
        h = model.module.encode(tokens)
        expected = torch.relu((h * model.module.to_out.conv1.weight[0, 0, 0]).sum(-1)
                              + model.module.to_out.conv1.bias).numpy()
    assert np.allclose(emb, expected, atol=1e-5)
    with pytest.raises(ConfigError, match="conv1"):
        _model(panel).embed(adata, pooling="conv1", progress=False)


def test_new_needs_gene2vec_and_scforge_load_finds_both_formats(ifnb_cells, tmp_path):  # noqa: F811
    _, panel = ifnb_cells
    with pytest.raises(ConfigError, match="gene2vec"):
        ScBERT.new(panel, **TINY)
    model = _model(panel, classes=["x", "y"])
    model.save(tmp_path / "folder")
    loaded = scforge.load(tmp_path / "folder")
    assert isinstance(loaded, ScBERT) and loaded.classes == ["x", "y"]
    model.save_published(tmp_path / "m.pth")
    (tmp_path / "panel.txt").write_text("\n".join(panel) + "\n")
    again = scforge.load(tmp_path / "m.pth", gene_panel=tmp_path / "panel.txt")
    x = torch.randint(0, 7, (2, len(panel) + 1))
    with torch.no_grad():
        assert torch.allclose(again.module(x), model.module(x), atol=1e-6)
