"""`scforge attack` and `scforge audit` end to end on real cells."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from scforge.cli import main

KEY = "seurat_annotations"


@pytest.fixture(scope="module")
def h5ad(ifnb_small, tmp_path_factory):
    path = tmp_path_factory.mktemp("sec") / "cells.h5ad"
    sub = ifnb_small[np.r_[0:350, 1000:1350]].copy()
    counts = sub.obs[KEY].astype(str).value_counts()
    keep = sub.obs[KEY].astype(str).map(counts) >= 5
    sub[keep.to_numpy()].copy().write_h5ad(path)
    return path


def test_attack_command_writes_a_report(h5ad, tmp_path, capsys):
    before = h5ad.read_bytes()
    out = tmp_path / "attack"
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "--rate", "0.05", "--out", str(out)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert len(runs) == 1 and set(runs[0]["results"]) == {"clean", "poisoned", "defended"}
    saved = json.loads((out / "attack.json").read_text())
    assert saved["results"]["poisoned"]["asr"] == pytest.approx(runs[0]["results"]["poisoned"]["asr"], abs=1e-4)
    assert (out / "report.html").exists() and (out / "results.csv").exists()
    assert h5ad.read_bytes() == before  # the user's file is untouched


def test_attack_command_defends_with_the_chosen_detectors(h5ad, tmp_path, capsys):
    out = tmp_path / "combine"
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "--topnstop", "4", "--combine",
                 "complexity", "level", "--out", str(out)]) == 0
    runs = json.loads(capsys.readouterr().out)
    saved = json.loads((out / "attack.json").read_text())
    assert saved["settings"]["combine"] == ["complexity", "level"]
    audit_table = pd.read_csv(out / "audit.csv", index_col=0)
    assert runs[0]["results"]["defended"]["n_removed"] == int(audit_table["flagged"].sum())
    np.testing.assert_allclose(audit_table["score"], audit_table[["complexity_z", "level_z"]].max(axis=1))
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "--combine", "clusters",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "model_level=True" in capsys.readouterr().err


def test_attack_command_sweeps_targets(h5ad, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "NK", "--defence", "none",
                 "--out", str(out)]) == 0
    runs = json.loads(capsys.readouterr().out)
    assert [r["target"] for r in runs] == ["B", "NK"] and "defended" not in runs[0]["results"]
    assert (out / "sweep.csv").exists() and (out / "B_rate0.05" / "report.html").exists()


def test_audit_command_and_errors(h5ad, tmp_path, capsys):
    out = tmp_path / "audit"
    assert main(["audit", str(h5ad), "--label-key", KEY, "--out", str(out), "--no-umap"]) == 0
    printed = json.loads(capsys.readouterr().out)
    data = json.loads((out / "audit.json").read_text())
    assert len(data["cells"]) == printed["n_cells"] and len(data["flagged"]) == printed["n_flagged"]
    assert main(["audit", str(h5ad), "--label-key", "nope", "--out", str(out)]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "Martian", "--out", str(tmp_path / "x")]) == 2
    assert "Martian" in capsys.readouterr().err


def test_attack_command_runs_the_geneformer_token_trigger(h5ad, tmp_path, capsys):
    from scforge.models.geneformer import Geneformer, GeneformerConfig

    tiny = GeneformerConfig(vocab_size=25426, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=64)
    folder = Geneformer.new(tiny, "geneformer-v1", seed=0).save(tmp_path / "gf")
    out = tmp_path / "tokens"
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "--model", str(folder), "--trigger",
                 "rank_shuffle", "--epochs", "1", "--max-length", "64", "--no-progress", "--out", str(out)]) == 0
    run = json.loads(capsys.readouterr().out)[0]
    saved = json.loads((out / "attack.json").read_text())
    assert saved["settings"]["trigger"] == "rank_shuffle" and saved["settings"]["selection"] == "random"
    assert saved["settings"]["input"] == "rank-value tokens" and saved["settings"]["max_length"] == 64
    assert set(run["results"]) == {"clean", "poisoned", "defended"}
    assert run["detection"]["auroc"] >= 0.95  # a triggered cell keeps 20 genes: the token audit sees it
    # the logistic victim cannot take a token trigger: a clear error, exit code 2
    assert main(["attack", str(h5ad), "--label-key", KEY, "--target", "B", "--trigger", "rank_shuffle",
                 "--out", str(tmp_path / "x")]) == 2
    assert "Geneformer-family victim" in capsys.readouterr().err
