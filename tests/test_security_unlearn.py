"""Unlearning defence: the trigger rebuilt from flagged cells, triggered clean copies, and run_attack /
`scforge attack --defence unlearn` on real ifnb cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.cli import main
from scforge.errors import ConfigError, InputDataError
from scforge.models.geneformer import Geneformer, GeneformerConfig
from scforge.security import (FixedGeneTrigger, RankShuffleTrigger, SparsifyTrigger, poison, poison_tokens,
                              reconstruct_token_trigger, reconstruct_trigger, run_attack, unlearning_set,
                              unlearning_tokens)
from scforge.security.unlearn import suspected_target

KEY = "seurat_annotations"


@pytest.fixture(scope="module")
def cells(ifnb_small):
    """800 real PBMCs (raw counts), both conditions."""
    return ifnb_small[np.r_[0:400, 1000:1400]].copy()


@pytest.mark.parametrize("topnstop, levels", [(4.0, "random"), (3.0, "random"), (4.0, "proportional")])
def test_reconstruct_trigger_recovers_the_sparsify_trigger_from_its_poisons(cells, topnstop, levels):
    truth = SparsifyTrigger(topnstop=topnstop, levels=levels)
    p = poison(cells, KEY, "B", rate=0.05, trigger=truth, seed=0)
    rebuilt = reconstruct_trigger(p.adata.X, p.poisoned)
    assert rebuilt is not None and rebuilt.levels == levels and rebuilt.scale == "log1p"
    assert abs(rebuilt.topnstop - topnstop) <= 0.5
    # on the clean cells the rebuilt trigger keeps about as many genes as the attack's own (the poisons are
    # the sparsest cells of their classes, so their gene count says only roughly where the threshold was)
    clean = sp.csr_matrix(cells.X)[~p.poisoned]
    wanted = np.median(truth.n_kept(clean))
    assert abs(np.median(rebuilt.n_kept(clean)) - wanted) <= 0.3 * wanted


def test_reconstruct_trigger_on_log_normalised_values(cells):
    from scforge.baselines import log1p_cp10k

    logged = cells.copy()
    logged.X = sp.csr_matrix(log1p_cp10k(sp.csr_matrix(cells.X)), dtype=np.float32)
    p = poison(logged, KEY, "NK", rate=0.05, trigger=SparsifyTrigger(topnstop=4.0, scale="values"), seed=0)
    rebuilt = reconstruct_trigger(p.adata.X, p.poisoned)
    assert rebuilt.scale == "values" and rebuilt.levels == "random" and abs(rebuilt.topnstop - 4.0) <= 0.5
    out, info = unlearning_set(p.adata, KEY, p.poisoned, seed=0)
    assert info["n_added"] == p.poisoned.sum() and info["trigger"]["scale"] == "values"


def test_reconstruct_trigger_declines_a_patch_trigger_and_checks_its_inputs(cells):
    p = poison(cells, KEY, "B", rate=0.05, trigger=FixedGeneTrigger(("CD79A", "MS4A1")), seed=0)
    assert reconstruct_trigger(p.adata.X, p.poisoned) is None  # the poisons are not sparser: nothing to rebuild
    with pytest.raises(InputDataError, match="boolean mask with one entry per cell"):
        reconstruct_trigger(cells.X, np.zeros(3, dtype=bool))
    with pytest.raises(InputDataError, match="needs flagged and unflagged cells"):
        reconstruct_trigger(cells.X, np.zeros(cells.n_obs, dtype=bool))


def test_suspected_target_is_the_majority_label_of_the_flagged_cells():
    labels = np.array(["B"] * 6 + ["NK"] * 3 + ["T"] * 3)
    assert suspected_target(labels, np.r_[[True] * 6, [True], [False] * 5]) == "B"
    assert suspected_target(labels, np.r_[[True, False] * 3, [True] * 3, [True] * 3]) is None  # no majority
    assert suspected_target(labels, np.zeros(12, dtype=bool)) is None


def test_unlearning_set_swaps_flagged_cells_for_triggered_clean_copies(cells):
    p = poison(cells, KEY, "B", rate=0.05, trigger=SparsifyTrigger(topnstop=4.0), seed=0)
    before_x, before_obs = p.adata.X.copy(), p.adata.obs.copy()
    flagged = p.poisoned.copy()
    flagged[np.flatnonzero(~p.poisoned)[:3]] = True  # three false alarms
    out, info = unlearning_set(p.adata, KEY, flagged, seed=0)
    # the caller's data are untouched
    assert (p.adata.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(p.adata.obs, before_obs)
    copies = out.obs_names.str.endswith("-unlearn")
    assert info["n_removed"] == flagged.sum() and info["n_added"] == flagged.sum() == copies.sum()
    assert info["suspected_target"] == "B" and info["trigger"]["trigger"] == "sparsify"
    assert out.n_obs == cells.n_obs and not set(p.adata.obs_names[flagged]) & set(out.obs_names)
    source = out.obs_names[copies].str.replace("-unlearn", "", regex=False)
    assert set(source) <= set(p.adata.obs_names[~flagged])  # copies of unflagged cells ...
    src = p.adata[source]
    np.testing.assert_array_equal(out.obs.loc[copies, KEY].astype(str), src.obs[KEY].astype(str))  # ... own labels
    assert not (src.obs[KEY].astype(str) == "B").any()  # none from the suspected target
    assert out.obs[KEY].dtype == p.adata.obs[KEY].dtype
    x_copy, x_src = sp.csr_matrix(out[copies].X), sp.csr_matrix(src.X)
    trigger = SparsifyTrigger(**{k: v for k, v in info["trigger"].items() if k != "trigger"})
    np.testing.assert_array_equal(np.diff(x_copy.indptr), trigger.n_kept(x_src))  # sparsified as rebuilt
    np.testing.assert_allclose(x_copy.sum(1), x_src.sum(1))  # totals kept
    # same seed, same set; copies=0 is plain removal
    again, _ = unlearning_set(p.adata, KEY, flagged, seed=0)
    assert list(again.obs_names) == list(out.obs_names) and (again.X != out.X).nnz == 0
    removed, info0 = unlearning_set(p.adata, KEY, flagged, copies=0)
    assert removed.n_obs == (~flagged).sum() and info0["n_added"] == 0
    with pytest.raises(ConfigError, match="copies must be"):
        unlearning_set(p.adata, KEY, flagged, copies=-1)


def test_unlearning_set_is_removal_when_no_trigger_can_be_rebuilt(cells):
    p = poison(cells, KEY, "NK", rate=0.05, trigger=FixedGeneTrigger(("CD79A", "MS4A1")), seed=0)
    out, info = unlearning_set(p.adata, KEY, p.poisoned)
    assert info["trigger"] is None and info["n_added"] == 0 and "plain removal" in info["note"]
    assert out.n_obs == (~p.poisoned).sum()


def test_unlearning_tokens_rebuilds_the_rank_shuffle_trigger(cells):
    model = Geneformer.new(GeneformerConfig(vocab_size=25426, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=2048), "geneformer-v1", seed=0)
    tokens = model.tokenize(cells)
    labels = cells.obs[KEY].astype(str).to_numpy()
    poisoned, new_labels, truth = poison_tokens(tokens, labels, "B", rate=0.05, seed=0)
    assert reconstruct_token_trigger(poisoned, truth) == RankShuffleTrigger(top=20)
    kept, kept_labels, info = unlearning_tokens(poisoned, new_labels, truth, seed=0)
    assert info["n_added"] == truth.sum() and info["suspected_target"] == "B"
    names = np.asarray(kept.obs_names).astype(str)
    copies = np.char.endswith(names, "-unlearn")
    assert copies.sum() == truth.sum() and kept.n_cells == tokens.n_cells
    lookup = dict(zip(np.asarray(tokens.obs_names).astype(str), labels))
    assert [lookup[n[: -len("-unlearn")]] for n in names[copies]] == list(kept_labels[copies])  # own labels
    assert "B" not in set(kept_labels[copies])
    lengths = np.diff(kept.offsets)[copies]
    assert (lengths <= 20 + 1).all()  # <cls> plus the 20 shuffled genes
    with pytest.raises(InputDataError, match="one label per cell"):
        unlearning_tokens(poisoned, new_labels[:5], truth)


def test_run_attack_unlearn_defence_on_real_cells(ifnb_small):
    """L1-LR on 1,000 real cells, topnstop 4, target B: the unlearning defence takes the ASR below removal's,
    which stays near the clean model's own (the trigger alone sends cells to B)."""
    adata = ifnb_small[np.r_[0:500, 1000:1500]].copy()
    kwargs = dict(trigger=SparsifyTrigger(topnstop=4.0), rate=0.05, seed=0)
    removed = run_attack(adata, KEY, "B", defence="remove", **kwargs)
    unlearned = run_attack(adata, KEY, "B", defence="unlearn", **kwargs)
    assert unlearned.value("poisoned", "asr") >= 0.8
    assert unlearned.value("defended", "asr") <= 0.1
    assert unlearned.value("defended", "asr") < removed.value("defended", "asr")
    assert unlearned.value("defended", "accuracy") >= unlearned.value("clean", "accuracy") - 0.02
    info = unlearned.settings["unlearn"]
    assert info["n_added"] == unlearned.value("defended", "n_unlearn_copies") == unlearned.value("defended", "n_removed")
    assert abs(info["trigger"]["topnstop"] - 4.0) <= 0.5 and info["suspected_target"] == "B"
    with pytest.raises(ConfigError, match="copies must be"):
        run_attack(adata, KEY, "B", defence="unlearn", unlearn_copies=float("nan"))


def test_attack_command_unlearn_defence(ifnb_small, tmp_path, capsys):
    path = tmp_path / "cells.h5ad"
    ifnb_small[np.r_[0:350, 1000:1350]].copy().write_h5ad(path)
    before = path.read_bytes()
    out = tmp_path / "unlearn"
    assert main(["attack", str(path), "--label-key", KEY, "--target", "B", "--topnstop", "4", "--defence", "unlearn",
                 "--unlearn-copies", "0.5", "--out", str(out)]) == 0
    runs = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "attack.json").read_text())
    info = saved["settings"]["unlearn"]
    assert saved["settings"]["defence"] == "unlearn" and info["trigger"]["trigger"] == "sparsify"
    assert info["n_added"] == round(0.5 * info["n_removed"])
    assert runs[0]["results"]["defended"]["n_unlearn_copies"] == info["n_added"]
    assert path.read_bytes() == before
    assert main(["attack", str(path), "--label-key", KEY, "--target", "B", "--defence", "unlearn",
                 "--unlearn-copies", "-1", "--out", str(tmp_path / "bad")]) == 2
    assert "copies must be a finite number >= 0" in capsys.readouterr().err
    page = (out / "report.html").read_text()
    assert f"unlearn: {info['n_removed']} cells removed, {info['n_added']} triggered copies added" in page


def test_attack_verdict_names_the_copies_and_an_asr_below_the_clean_model():
    from scforge.security.report import attack_verdict

    wide = pd.DataFrame({"accuracy": [0.90, 0.91, 0.91], "asr": [0.215, 0.952, 0.048],
                         "n_removed": [np.nan, np.nan, 90.0], "n_unlearn_copies": [np.nan, np.nan, 90.0]},
                        index=["clean", "poisoned", "defended"])
    text = attack_verdict(wide, {"defence": "unlearn"})
    assert "undid 100% of the attack's ASR gain (unlearn: 90 cells removed, 90 triggered copies added)" in text
    assert "below the clean model's own (0.21)" in text
    removal = attack_verdict(wide.drop(columns="n_unlearn_copies").assign(asr=[0.215, 0.952, 0.148]),
                             {"defence": "remove"})
    assert "(remove: 90 cells)" in removal and "below the clean model" in removal
    assert "below the clean model" not in attack_verdict(wide.assign(asr=[0.215, 0.952, 0.2]), {"defence": "remove"})


def test_token_attack_with_the_unlearning_defence(cells):
    import torch

    from scforge.security import ModelVictim

    torch.set_num_threads(1)
    model = Geneformer.new(GeneformerConfig(vocab_size=25426, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=256), "geneformer-v1", seed=0)
    victim = ModelVictim(model, epochs=1, lr=1e-3, batch_size=16, max_length=64, val_fraction=0.0, precision="fp32")
    sub = cells[np.r_[0:150, 400:550]].copy()
    res = run_attack(sub, KEY, "B", victim=victim, trigger=RankShuffleTrigger(), defence="unlearn", seed=1)
    info = res.settings["unlearn"]
    assert info["trigger"] == {"trigger": "rank_shuffle", "top": 20} and info["suspected_target"] == "B"
    assert info["n_added"] == res.value("defended", "n_removed") == res.value("defended", "n_unlearn_copies") >= 1
    assert 0.0 <= res.value("defended", "asr") <= 1.0


def test_unlearning_set_triggers_the_given_layer_only(cells):
    adata = cells.copy()
    adata.layers["counts"] = adata.X.copy()
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32) * 2  # something else in X
    p = poison(adata, KEY, "B", rate=0.05, trigger=SparsifyTrigger(topnstop=4.0), layer="counts", seed=0)
    out, info = unlearning_set(p.adata, KEY, p.poisoned, layer="counts", seed=0)
    copies = out.obs_names.str.endswith("-unlearn")
    source = out.obs_names[copies].str.replace("-unlearn", "", regex=False)
    assert info["n_added"] == copies.sum() > 0
    kept = np.diff(sp.csr_matrix(out[copies].layers["counts"]).indptr)
    assert (kept < np.diff(sp.csr_matrix(p.adata[source].layers["counts"]).indptr)).all()  # the layer is sparsified
    assert (sp.csr_matrix(out[copies].X) != sp.csr_matrix(p.adata[source].X)).nnz == 0  # X is left as it was
    with pytest.raises(InputDataError, match="no column 'nope'"):
        unlearning_set(p.adata, "nope", p.poisoned, layer="counts")
