"""The demo runs offline on scanpy's bundled data with the shipped vocabularies."""

from __future__ import annotations

import numpy as np
import scanpy as sc

from scforge.demo import recover_counts, run_demo


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


def test_demo_tokenizes_every_family(capsys):
    rows = run_demo()
    out = capsys.readouterr().out
    assert [r["model"].split()[0] for r in rows] == ["scGPT", "Geneformer", "scBERT"]
    assert all(r["cells"] == 700 for r in rows)
    assert "genes matched" in out and "Geneformer V2" in out
    matched = {r["model"].split()[0]: int(r["genes matched"].split("/")[0]) for r in rows}
    assert matched["scGPT"] > 700 and matched["Geneformer"] > 650
