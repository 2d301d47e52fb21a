"""The demo runs offline on scanpy's bundled data with the shipped vocabularies."""

from __future__ import annotations

import numpy as np
import scanpy as sc

from scforge.demo import recover_counts, run_demo, tokenizer_overview


def test_recovered_counts_are_integers_and_consistent():
    adata = sc.datasets.pbmc68k_reduced()
    raw_before = adata.raw.X.copy()
    counts = recover_counts(adata)
    assert (adata.raw.X != raw_before).nnz == 0  # input untouched
    x = counts.X
    assert np.all(x.data == np.round(x.data)) and x.data.min() >= 1
    assert counts.uns["count_recovery_max_deviation"] < 0.25
    # renormalizing the recovered counts gives back the stored log-normalized values
    lognorm = np.log1p(x.toarray() * (1e4 / adata.obs["n_counts"].to_numpy()[:, None]))
    np.testing.assert_allclose(lognorm, adata.raw.X.toarray(), atol=2e-3)


def test_tokenizer_overview_covers_every_family(capsys):
    rows = tokenizer_overview()
    out = capsys.readouterr().out
    assert [r["model"].split()[0] for r in rows] == ["scGPT", "Geneformer", "scBERT"]
    assert all(r["cells"] == 700 for r in rows)
    assert "genes matched" in out and "Geneformer V2" in out
    matched = {r["model"].split()[0]: int(r["genes matched"].split("/")[0]) for r in rows}
    assert matched["scGPT"] > 700 and matched["Geneformer"] > 650


def test_annotation_demo_writes_report(tmp_path, capsys):
    """The demo's whole path on a tiny model (the shipped default model runs in `make demo`)."""
    import json

    import torch

    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT

    torch.manual_seed(0)
    model = ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_heads=4, d_hid=48, n_layers=1, max_seq_len=64)
    folder = model.save(tmp_path / "tiny")
    results = run_demo(str(tmp_path / "report"), model=str(folder), epochs=1, progress=False)
    out = capsys.readouterr().out
    assert list(results["methods"]) == ["logistic regression (L1, log1p CP10k)", "default model, linear probe",
                                        "default model, fine-tuned"]
    assert results["n_train"] == 560 and results["n_test"] == 140
    assert results["methods"]["logistic regression (L1, log1p CP10k)"]["accuracy"] > 0.6
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    assert saved["best"] in saved["methods"]
    html = (tmp_path / "report" / "index.html").read_text()
    assert "<table>" in html and "umap.png" in html
    for name in ("umap.png", "confusion_0.png", "confusion_1.png", "confusion_2.png"):
        assert (tmp_path / "report" / name).stat().st_size > 10_000
    assert "Summary (test cells" in out
