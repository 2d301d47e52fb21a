"""`scforge attack` and `scforge audit` end to end on real cells."""

from __future__ import annotations

import json

import numpy as np
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
