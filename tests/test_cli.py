"""The scforge command line: help, coverage, tokenize, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from scforge.cli import main
from scforge.tokenize import TokenizedCells


def test_help_lists_commands(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    for cmd in ("genes", "tokenize", "embed", "pretrain", "finetune", "predict", "demo"):
        assert cmd in out
    proc = subprocess.run([sys.executable, "-m", "scforge.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "tokenize" in proc.stdout


def test_genes_coverage_on_real_file(shared_data, capsys):
    path = shared_data / "ifnb" / "ifnb_sub_2000.h5ad"
    assert main(["genes", "coverage", str(path), "--vocab", "geneformer-v1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_genes"] == 13215
    assert 0 < report["n_matched"] < report["n_genes"]
    assert 0.5 < report["count_fraction"] <= 1.0


def test_tokenize_writes_file(shared_data, tmp_path, capsys):
    path = shared_data / "ifnb" / "ifnb_sub_2000.h5ad"
    out = tmp_path / "tokens.npz"
    assert main(["tokenize", str(path), "--model", "scgpt", "--max-len", "600", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out)
    cells = TokenizedCells.load(out)
    assert summary["cells"] == cells.n_cells == 2000
    assert cells.lengths.max() == 600 and np.all(cells.values[cells.offsets[:-1]] == 0)


def test_errors_are_clear_not_tracebacks(tmp_path, shared_data, capsys):
    assert main(["tokenize", str(tmp_path / "missing.h5ad"), "--model", "scgpt"]) == 2
    assert "not found" in capsys.readouterr().err
    path = shared_data / "ifnb" / "ifnb_sub_2000.h5ad"
    assert main(["tokenize", str(path), "--model", "geneformer", "--layer", "lognorm"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("scforge: error:") and "raw integer counts" in err
    assert main(["genes", "coverage", str(path), "--gene-col", "nope"]) == 2
    assert "Gene column 'nope'" in capsys.readouterr().err
    assert main(["tokenize", str(path), "--model", "scbert"]) == 2
    assert "gene panel" in capsys.readouterr().err
