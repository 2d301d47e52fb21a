"""scBackdoor's Geneformer attack end to end on rank-value tokens, and the token-level audit (scforge.security)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from scforge.errors import ConfigError, InputDataError
from scforge.models.geneformer import Geneformer, GeneformerConfig
from scforge.security import (ModelVictim, RankShuffleTrigger, SparsifyTrigger, audit_tokens, gene_token_counts,
                              poison_tokens, rank_consistency, run_attack, split_cells)
from scforge.security.detect import detection_metrics
from scforge.tokenize.ragged import TokenizedCells

KEY = "seurat_annotations"
TINY = dict(vocab_size=25426, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=256, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


@pytest.fixture(scope="module")
def model() -> Geneformer:
    """A tiny random Geneformer on the geneformer-v1 dictionaries."""
    return Geneformer.new(GeneformerConfig(**TINY), "geneformer-v1", seed=0)


@pytest.fixture(scope="module")
def cells(ifnb_small):
    """300 real PBMCs (raw counts) of both conditions, B cells among them."""
    return ifnb_small[np.r_[0:150, 1000:1150]].copy()


def _victim(model: Geneformer) -> ModelVictim:
    torch.set_num_threads(1)
    return ModelVictim(model, epochs=2, lr=1e-3, batch_size=16, max_length=64, val_fraction=0.0, precision="fp32")


# ---- the attack on tokens -----------------------------------------------------------------------
def test_token_attack_runs_end_to_end_on_real_cells(model, cells, monkeypatch):
    before_x, before_obs = cells.X.copy(), cells.obs.copy()
    seen_fit, seen_predict = [], []
    fit, predict = ModelVictim.fit_tokens, ModelVictim.predict_proba_tokens

    def spy_fit(self, tokens, labels, label_key="label"):
        seen_fit.append((tokens, np.asarray(labels)))
        return fit(self, tokens, labels, label_key)

    def spy_predict(self, tokens):
        seen_predict.append(tokens)
        return predict(self, tokens)

    monkeypatch.setattr(ModelVictim, "fit_tokens", spy_fit)
    monkeypatch.setattr(ModelVictim, "predict_proba_tokens", spy_predict)
    res = run_attack(cells, KEY, "B", victim=_victim(model), trigger=RankShuffleTrigger(top=20), rate=0.05, seed=0)

    wide = res.wide()
    assert list(wide.index) == ["clean", "poisoned", "defended"]
    for stage in wide.index:
        for metric in ("accuracy", "macro_f1", "kappa", "asr"):
            assert math.isfinite(res.value(stage, metric)), (stage, metric)
    assert res.settings["input"] == "rank-value tokens" and res.settings["selection"] == "random"
    assert res.settings["max_length"] == 64 and res.settings["n_poisoned"] >= 1
    # the caller's AnnData is unchanged
    assert (cells.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(cells.obs, before_obs)

    # the model was fine-tuned on tokens whose poisoned cells are triggered and relabelled
    train_idx, test_idx = split_cells(cells, KEY, seed=0)
    clean_train = _victim(model).tokenize(cells[train_idx].copy())
    poisoned_tokens, poisoned_labels = seen_fit[1]
    changed = np.array([not np.array_equal(poisoned_tokens.cell(i)[0], clean_train.cell(i)[0])
                        for i in range(clean_train.n_cells)])
    assert changed.sum() == res.settings["n_poisoned"]
    assert set(poisoned_labels[changed]) == {"B"}
    assert np.all(cells.obs[KEY].astype(str).to_numpy()[train_idx][changed] != "B")
    # the audit found them (the length of a triggered cell gives it away) and they were removed
    assert res.detection["auroc"] >= 0.95 and res.detection["recall"] == 1.0
    assert res.value("defended", "n_removed") == res.audit["flagged"].sum()
    assert seen_fit[2][0].n_cells == clean_train.n_cells - int(res.audit["flagged"].sum())

    # the triggered test tokens are the non-target test cells' top-20 genes, shuffled, and nothing else
    test = cells[test_idx].copy()
    clean_test = _victim(model).tokenize(test).select(np.flatnonzero(test.obs[KEY].astype(str) != "B"))
    triggered = seen_predict[1]
    assert triggered.n_cells == clean_test.n_cells == res.settings["n_triggered_test"]
    assert list(res.triggered.index) == list(test.obs_names[test.obs[KEY].astype(str) != "B"])
    for stage in ("clean", "poisoned", "defended"):
        assert (res.triggered[f"pred_{stage}"] == "B").mean() == pytest.approx(res.value(stage, "asr"))
    assert np.all(gene_token_counts(triggered) == 20)
    shuffled = 0
    for i in range(triggered.n_cells):
        got, top = triggered.cell(i)[0], clean_test.cell(i)[0][:20]
        assert sorted(got) == sorted(top)
        shuffled += not np.array_equal(got, top)
    assert shuffled >= 0.9 * triggered.n_cells


def test_token_attack_same_seed_same_result_and_relabel_defence(model, cells):
    kwargs = dict(victim=_victim(model), trigger=RankShuffleTrigger(), rate=0.05, seed=3, selection="gini")
    a = run_attack(cells, KEY, "NK", defence="relabel", **kwargs)
    b = run_attack(cells, KEY, "NK", defence=None, **kwargs)
    assert a.settings["selection"] == "gini"
    first = a.table[a.table.stage != "defended"].reset_index(drop=True)
    pd.testing.assert_frame_equal(first, b.table)
    assert a.value("defended", "n_relabelled") >= 1 and math.isfinite(a.value("defended", "asr"))


def test_token_attack_with_the_fine_pruning_defence(model, cells):
    res = run_attack(cells, KEY, "B", victim=_victim(model), trigger=RankShuffleTrigger(), defence="fine_prune",
                     trusted_fraction=0.3, seed=1)
    assert res.value("defended", "n_trusted") >= 60 and math.isfinite(res.value("defended", "asr"))
    assert "auroc" in res.detection  # the token audit still scores the poisoned set


def test_wrong_victim_or_trigger_combinations_raise_config_errors(model, cells):
    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT

    with pytest.raises(ConfigError, match="Geneformer-family victim.*SparsifyTrigger"):
        run_attack(cells, KEY, "B", victim="logistic", trigger=RankShuffleTrigger())
    scgpt = ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_layers=1, n_heads=4, d_hid=48, max_seq_len=64)
    with pytest.raises(ConfigError, match="scgpt model.*Geneformer-family victim"):
        run_attack(cells, KEY, "B", victim=ModelVictim(scgpt, epochs=1), trigger=RankShuffleTrigger())
    with pytest.raises(ConfigError, match="model_level, strip and combine"):
        run_attack(cells, KEY, "B", victim=_victim(model), trigger=RankShuffleTrigger(), model_level=True)
    with pytest.raises(ConfigError, match="model_level, strip and combine"):
        run_attack(cells, KEY, "B", victim=_victim(model), trigger=RankShuffleTrigger(), combine=("level",))
    with pytest.raises(ConfigError, match="token triggers"):
        poison_tokens(_victim(model).tokenize(cells[:20].copy()), ["B"] * 10 + ["NK"] * 10, "B",
                      trigger=SparsifyTrigger())


# ---- the token-level detector -------------------------------------------------------------------
def test_token_audit_finds_five_percent_triggered_real_cells(ifnb_small):
    adata = ifnb_small[np.r_[0:300, 1000:1300]].copy()
    tokens = _full_length(adata)
    ids_before = tokens.gene_ids.copy()
    labels = adata.obs[KEY].astype(str).to_numpy()
    poisoned, new_labels, truth = poison_tokens(tokens, labels, "B", rate=0.05, seed=0)
    assert 20 <= truth.sum() <= 0.05 * adata.n_obs  # int(rate * n_c) per non-target class

    consistency = rank_consistency(poisoned)
    assert np.median(consistency[~truth]) > 0.6 and np.median(consistency[truth]) < 0.25
    table = audit_tokens(poisoned, new_labels, label_key=KEY)
    assert list(table.index) == list(adata.obs_names) and table.index.name == "cell"
    for col in ("label", "n_genes", "rank", "rank_z", "length", "length_z", "score", "flagged", "reasons"):
        assert col in table.columns
    assert detection_metrics(table["score"].to_numpy(), truth)["auroc"] >= 0.95
    assert detection_metrics(table["rank_z"].to_numpy(), truth)["auroc"] >= 0.95  # the order alone
    found = detection_metrics(table["score"].to_numpy(), truth, table["flagged"].to_numpy())
    assert found["recall"] == 1.0 and found["precision"] >= 0.85
    assert all("gene tokens" in r for r in table.loc[truth, "reasons"])
    assert table.attrs["summary"]["n_flagged"] == int(table["flagged"].sum())
    # nothing is modified, and the clean set itself is quiet
    np.testing.assert_array_equal(tokens.gene_ids, ids_before)
    assert audit_tokens(tokens, labels)["flagged"].mean() < 0.02


def _full_length(adata) -> TokenizedCells:
    """Geneformer-v1 rank-value tokens of every expressed gene (the published 2,048-token input)."""
    return Geneformer.new(GeneformerConfig(**{**TINY, "max_position_embeddings": 2048}), "geneformer-v1",
                          seed=0).tokenize(adata)


def test_rank_consistency_on_hand_built_tokens_and_bad_inputs():
    order = np.arange(10, 40)
    rows = [order] * 6 + [order[::-1]]
    offsets = np.r_[0, np.cumsum([r.size for r in rows])]
    cells = TokenizedCells(offsets, np.concatenate(rows).astype(np.int32), None, np.array(list("abcdefg")), {})
    got = rank_consistency(cells)
    np.testing.assert_allclose(got[:6], 1.0)
    assert got[6] < 0  # the reversed cell goes against the genes' usual positions
    np.testing.assert_array_equal(gene_token_counts(cells), [30] * 7)
    binned = TokenizedCells(offsets, cells.gene_ids, np.ones(cells.n_tokens, np.float32), cells.obs_names, {})
    with pytest.raises(InputDataError, match="rank-value tokens"):
        audit_tokens(binned, ["x"] * 7)
    with pytest.raises(ConfigError, match="embedding"):
        audit_tokens(cells, ["x"] * 7, detectors=("knn",))
    with pytest.raises(ConfigError, match="detectors"):
        audit_tokens(cells, ["x"] * 7, detectors=("level",))
