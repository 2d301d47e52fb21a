"""Batch integration: scGPT's integration fine-tuning recipe, zero-shot embeddings, evaluation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import scforge
from scforge.genes import align_genes
from scforge.errors import ConfigError, InputDataError
from scforge.tasks.integrate import (
    IntegrationModel,
    IntegrationSettings,
    batch_codes,
    evaluate_integration,
    fine_tune_integration,
    integrate,
    integration_genes,
    zero_shot_integration,
)

TINY = {"d_model": 32, "n_heads": 4, "d_hid": 48, "n_layers": 2, "dropout": 0.1}
RECIPE = {"n_hvg": 48, "epochs": 1, "batch_size": 16}


@pytest.fixture(scope="module")
def cells(ifnb_small):
    """80 CTRL + 80 STIM cells of the labelled ifnb subset."""
    stim = ifnb_small.obs["stim"].to_numpy()
    pick = np.r_[np.flatnonzero(stim == "CTRL")[:80], np.flatnonzero(stim == "STIM")[:80]]
    return ifnb_small[pick].copy()


@pytest.fixture(scope="module")
def tiny():
    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT

    torch.manual_seed(0)
    return ScGPT.new(builtin_vocab("scgpt-human"), **TINY)


@pytest.fixture(scope="module")
def tuned(tiny, cells):
    data = cells.copy()
    before = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    model = integrate(tiny, data, "stim", seed=0, progress=False, **RECIPE)
    return model, data, before


def test_integration_genes_are_variable_vocabulary_genes_in_data_order(tiny, cells):
    genes = integration_genes(tiny, cells, "stim", n_hvg=100)
    names = list(cells.var_names)
    assert len(genes) == 100 and len(set(genes)) == 100
    positions = [names.index(g) for g in genes]
    assert positions == sorted(positions)  # data order
    assert (np.asarray(align_genes(genes, tiny.vocab).token_ids) >= 0).all()  # symbols, aliases included
    totals = np.asarray(cells[:, genes].X.sum(0)).ravel()
    assert totals.min() >= 3
    # variable genes, not just any: their mean dispersion beats the average gene with >= 3 counts
    x = cells.X.toarray()
    keep = np.asarray(x.sum(0) >= 3).ravel()
    disp = x.var(0) / np.maximum(x.mean(0), 1e-9)
    assert disp[positions].mean() > 2 * disp[keep].mean()
    assert integration_genes(tiny, cells, "stim", n_hvg=100) == genes  # deterministic
    few = cells[:, :300].copy()
    all_kept = integration_genes(tiny, few, "stim", n_hvg=5000)
    expected = [g for g, t, i in zip(few.var_names, np.asarray(few.X.sum(0)).ravel(), align_genes(
        list(few.var_names), tiny.vocab).token_ids) if t >= 3 and i >= 0]
    assert all_kept == expected


def test_batch_codes_and_their_errors(cells):
    batches, codes = batch_codes(cells, "stim")
    assert batches == ["CTRL", "STIM"]
    np.testing.assert_array_equal(codes, (cells.obs["stim"].to_numpy() == "STIM").astype(int))
    with pytest.raises(InputDataError, match="no column 'batch'"):
        batch_codes(cells, "batch")
    one = cells[cells.obs["stim"] == "CTRL"]
    with pytest.raises(InputDataError, match="one batch"):
        batch_codes(one, "stim")
    with pytest.raises(InputDataError, match="not trained on"):
        batch_codes(cells, "stim", ["CTRL", "OTHER"])
    holes = cells.copy()
    holes.obs["stim"] = holes.obs["stim"].astype(object)
    holes.obs.iloc[3, holes.obs.columns.get_loc("stim")] = None
    with pytest.raises(InputDataError, match="missing for 1 cells"):
        batch_codes(holes, "stim")


def test_fine_tuned_model_has_the_recipe_parts_and_leaves_inputs_alone(tuned, cells):
    model, data, before = tuned
    c = model.config
    assert c.use_batch_labels and c.domain_spec_batchnorm == "dsbn" and c.do_dab and c.do_mvc
    assert c.explicit_zero_prob and c.ecs_threshold == 0.8 and c.num_batch_labels == 2
    assert len(model.genes) == RECIPE["n_hvg"] and model.batches == ["CTRL", "STIM"]
    # every objective of the recipe was trained: GEP and GEPC/MVC with zero terms, ECS (x10), DAR
    for term in ("gep", "gep_zero", "mvc", "mvc_zero", "ecs", "dar"):
        assert np.isfinite(model.history[f"train/{term}"]), term
    assert 0 < model.history["train/ecs"] <= 10.0
    # only obsm (and the run record in uns) changed on the data; the source model is untouched
    assert set(data.obsm) - set(cells.obsm) == {"X_scGPT_integrated"}
    np.testing.assert_array_equal(data.X.data, cells.X.data)
    emb = data.obsm["X_scGPT_integrated"]
    assert emb.shape == (cells.n_obs, 32) and np.isfinite(emb).all()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_source_model_is_unchanged(tiny, tuned):
    _, _, before = tuned
    for k, v in tiny.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not tiny.config.use_batch_labels


def test_backbone_starts_from_the_pretrained_weights(tiny, cells):
    from scforge.tasks.integrate import _integration_copy

    module = _integration_copy(tiny, 2, 48, IntegrationSettings(), seed=0)
    src = tiny.module.state_dict()
    for key, value in module.state_dict().items():
        if key.startswith(("encoder.", "value_encoder.", "transformer_encoder.")):
            assert torch.equal(value, src[key]), key
    # with batch embeddings concatenated, the decoder's first layer takes 2 x d_model (re-initialised)
    assert module.decoder.fc[0].weight.shape == (32, 64)


def test_embeddings_use_each_cells_own_batch_and_do_not_depend_on_neighbours(tuned):
    model, data, _ = tuned
    full = data.obsm["X_scGPT_integrated"]
    # a prefix (the tokenizer's seeded tie-breaking follows the cell's row) in other minibatches
    part = model.embed(data[:100].copy(), key_added=None, batch_size=7)
    np.testing.assert_allclose(part, full[:100], atol=1e-5)
    # the same cell labelled with the other batch gets a different embedding (DSBN statistics per batch)
    swapped = data[:20].copy()
    swapped.obs["stim"] = np.where(swapped.obs["stim"] == "CTRL", "STIM", "CTRL")
    other = model.embed(swapped, key_added=None)
    assert np.abs(other - full[:20]).max() > 1e-3


def test_same_seed_same_model_and_save_load_round_trip(tiny, tuned, cells, tmp_path):
    model, data, _ = tuned
    again = fine_tune_integration(tiny, cells, "stim", seed=0, progress=False, **RECIPE)
    for k, v in model.module.state_dict().items():
        torch.testing.assert_close(again.module.state_dict()[k], v, rtol=0, atol=0)
    path = model.save(tmp_path / "integrated")
    loaded = scforge.load(path)
    assert isinstance(loaded, IntegrationModel) and loaded.genes == model.genes and loaded.batches == model.batches
    np.testing.assert_allclose(loaded.embed(cells.copy(), key_added=None), data.obsm["X_scGPT_integrated"], atol=1e-6)


def test_clear_errors(tiny, cells):
    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.api import Geneformer

    gf = Geneformer.new(GeneformerConfig.v1_10m(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=64), "geneformer-v1")
    with pytest.raises(ConfigError, match="zero_shot_integration"):
        fine_tune_integration(gf, cells, "stim")
    logged = cells.copy()
    logged.X = logged.X.copy()
    logged.X.data = np.log1p(logged.X.data) + 0.1
    with pytest.raises(InputDataError, match="raw counts"):
        fine_tune_integration(tiny, logged, "stim", **RECIPE)
    with pytest.raises(ConfigError, match="mask_ratio"):
        IntegrationSettings(mask_ratio=1.5)
    with pytest.raises(TypeError):
        fine_tune_integration(tiny, cells, "stim", not_a_setting=1)


def test_zero_shot_for_other_families_and_evaluation(tiny, tuned, cells):
    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.api import Geneformer

    _, data, _ = tuned
    data = data.copy()
    gf = Geneformer.new(GeneformerConfig.v1_10m(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                                intermediate_size=64, max_position_embeddings=64), "geneformer-v1")
    emb = zero_shot_integration(gf, data, max_length=64)
    assert data.obsm["X_geneformer_zeroshot"] is emb and emb.shape == (data.n_obs, 32)
    np.testing.assert_allclose(emb, gf.embed(cells.copy(), max_length=64, key_added=None), atol=1e-5)
    table = evaluate_integration(data, ["X_scGPT_integrated", "X_geneformer_zeroshot"], "seurat_annotations", "stim",
                                 n_top_genes=20000, n_comps=20)  # all genes: too few cells for seurat_v3
    assert list(table.index) == ["pca", "harmony", "X_scGPT_integrated", "X_geneformer_zeroshot"]
    assert table[["avg_bio", "avg_batch"]].notna().all().all()
    # the batch metrics see the batches: Harmony mixes CTRL and STIM more than the unintegrated PCA
    assert table.loc["harmony", "ilisi"] > table.loc["pca", "ilisi"]
    assert np.isnan(table.loc["pca", "pcr"]) or table.loc["pca", "pcr"] == 0
    with pytest.raises(ConfigError, match="baselines"):
        evaluate_integration(data, ["X_scGPT_integrated"], "seurat_annotations", "stim", baselines=("scvi",))


def test_recipe_defaults_are_the_tutorials():
    s = IntegrationSettings()
    assert (s.n_hvg, s.mask_ratio, s.epochs, s.batch_size, s.lr, s.ecs_threshold, s.ecs_weight, s.dar_weight) == \
        (1200, 0.4, 15, 64, 1e-4, 0.8, 10.0, 1.0)
    assert s.dsbn and s.mvc and s.explicit_zero_prob and s.gamma == 0.9


def test_unlabelled_adata_types_are_refused():
    with pytest.raises(InputDataError):
        batch_codes(np.zeros((3, 3)), "stim")


def test_zero_shot_works_for_every_family(cells):
    """scGPT, Geneformer, scBERT and scCello each give one finite row per cell, in input order."""
    from scforge.genes.builtin import builtin_vocab
    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.api import Geneformer
    from scforge.models.scbert.api import ScBERT
    from scforge.models.sccello.api import ScCello
    from scforge.models.scgpt import ScGPT

    small = cells[::4].copy()
    totals = np.asarray(small.X.sum(0)).ravel()
    panel = [str(g) for g in small.var_names[np.argsort(-totals, kind="stable")[:99]]]
    torch.manual_seed(0)
    models = {
        "scgpt": ScGPT.new(builtin_vocab("scgpt-human"), d_model=16, n_heads=2, d_hid=32, n_layers=1),
        "geneformer": Geneformer.new(GeneformerConfig.v1_10m(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                                             intermediate_size=32, max_position_embeddings=64),
                                     "geneformer-v1"),
        "scbert": ScBERT.new(panel, gene2vec=np.random.default_rng(0).normal(size=(99, 16)).astype(np.float32),
                             seed=0, dim=16, depth=1, heads=2, dim_head=8, nb_features=12),
        "sccello": ScCello.new([], num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                               max_position_embeddings=64, seed=0),
    }
    for family, model in models.items():
        data = small.copy()
        emb = zero_shot_integration(model, data, max_length=None if family == "scbert" else 48)
        assert emb.shape[0] == small.n_obs and np.isfinite(emb).all(), family
        assert data.obsm[f"X_{model.family}_zeroshot"] is emb
        length = None if family == "scbert" else 48
        if family == "scgpt":  # seeded per-row gene subsampling and tie-breaking: same input, same rows
            np.testing.assert_array_equal(zero_shot_integration(model, small.copy(), max_length=length), emb)
            continue
        # rows follow the input order: embedding the cells reversed reverses the rows
        back = zero_shot_integration(model, small[::-1].copy(), max_length=length)
        np.testing.assert_allclose(back[::-1], emb, atol=1e-4, err_msg=family)
