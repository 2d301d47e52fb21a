"""Reports of the security module (audit / attack / sweep) on real ifnb cells."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from scforge.security import audit, poison, run_attack, sweep_attack
from scforge.security.report import write_attack_report, write_audit_report, write_sweep_report

LABEL = "seurat_annotations"


def _plain(v) -> bool:
    """True when ``v`` holds only plain JSON types (no numpy, no NaN)."""
    if isinstance(v, dict):
        return all(isinstance(k, str) and _plain(x) for k, x in v.items())
    if isinstance(v, list):
        return all(_plain(x) for x in v)
    if isinstance(v, float):
        return math.isfinite(v)
    return v is None or type(v) in (bool, int, str)


def _subset(adata, n: int):
    sub = adata[:n].copy()
    keep = sub.obs[LABEL].value_counts()
    sub = sub[sub.obs[LABEL].isin(keep[keep >= 5].index)].copy()  # drop classes too small to split
    sub.obs[LABEL] = sub.obs[LABEL].astype(str)
    return sub


@pytest.fixture(scope="module")
def poisoned_audit(ifnb_small):
    pdata = poison(_subset(ifnb_small, 300), LABEL, "B", rate=0.05, seed=0)
    return pdata, audit(pdata.adata, LABEL, seed=0)


@pytest.fixture(scope="module")
def attack_data(ifnb_small):
    return _subset(ifnb_small, 400)


def test_audit_report(poisoned_audit, tmp_path):
    pdata, table = poisoned_audit
    adata = pdata.adata
    table_before, x_before, obs_before = table.copy(), adata.X.copy(), adata.obs.copy()
    assert table["flagged"].any(), "the poisoned cells should be flagged"

    path = write_audit_report(table, tmp_path / "audit", adata=adata, seed=0)
    assert path == tmp_path / "audit" / "report.html"
    for name in ("audit.json", "audit.csv", "report.html"):
        assert (tmp_path / "audit" / name).is_file()

    doc = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert _plain(doc)
    assert doc["summary"] == json.loads(json.dumps(table.attrs["summary"]))
    assert list(doc["cells"]) == list(map(str, table.index))
    detectors = table.attrs["summary"]["detectors"]
    for name in table.index[:20]:
        cell = doc["cells"][name]
        assert cell["flagged"] == bool(table.loc[name, "flagged"])
        assert cell["score"] == pytest.approx(float(table.loc[name, "score"]))
        assert cell["reasons"] == table.loc[name, "reasons"]
        for d in detectors:
            assert cell[f"{d}_z"] == pytest.approx(float(table.loc[name, f"{d}_z"]))
            assert cell[d] == pytest.approx(float(table.loc[name, d]))
    flagged = [f["cell"] for f in doc["flagged"]]
    assert sorted(flagged) == sorted(map(str, table.index[table["flagged"]]))
    scores = [f["score"] for f in doc["flagged"]]
    assert scores == sorted(scores, reverse=True)

    csv = pd.read_csv(tmp_path / "audit" / "audit.csv", index_col="cell")
    assert list(csv.index) == list(table.index)
    np.testing.assert_allclose(csv["score"], table["score"])

    page = path.read_text()
    assert page.count("data:image/png;base64") >= 2  # histograms + UMAP
    assert "UMAP" in page
    for name in flagged[:50]:
        assert name in page

    pd.testing.assert_frame_equal(table, table_before)
    assert table.attrs == table_before.attrs
    assert (adata.X != x_before).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, obs_before)


def test_audit_report_without_umap(poisoned_audit, tmp_path):
    _, table = poisoned_audit
    path = write_audit_report(table, tmp_path / "a", title="<odd & title>")
    page = path.read_text()
    assert "&lt;odd &amp; title&gt;" in page and "<odd & title>" not in page
    assert "UMAP" not in page
    assert page.count("data:image/png;base64") == 1  # the histograms only


def test_attack_report(attack_data, tmp_path):
    x_before = attack_data.X.copy()
    result = run_attack(attack_data, LABEL, "B", victim="logistic", rate=0.05, seed=0)
    table_before = result.table.copy()
    path = write_attack_report(result, tmp_path / "attack")
    assert path == tmp_path / "attack" / "report.html"
    for name in ("attack.json", "results.csv", "audit.csv", "triggered.csv", "report.html"):
        assert (tmp_path / "attack" / name).is_file()
    per_cell = pd.read_csv(tmp_path / "attack" / "triggered.csv", index_col=0)
    assert per_cell.shape[0] == result.settings["n_triggered_test"]
    assert (per_cell["pred_poisoned"] == "B").mean() == pytest.approx(result.value("poisoned", "asr"))

    doc = json.loads((tmp_path / "attack" / "attack.json").read_text())
    assert _plain(doc)
    wide = result.wide()
    for stage, row in wide.iterrows():
        for metric, value in row.dropna().items():
            assert doc["results"][stage][metric] == pytest.approx(float(value))
    assert doc["settings"]["target"] == "B"
    assert set(doc["detection"]) == set(result.detection)

    csv = pd.read_csv(tmp_path / "attack" / "results.csv")
    np.testing.assert_allclose(csv["value"], result.table["value"])

    page = path.read_text()
    assert "data:image/png;base64" in page
    assert "ASR by true class" in page and "ASR by genes kept by the trigger" in page
    mono = [result.asr_by("label", stage).loc["CD14 Mono", "asr"] for stage in ("clean", "poisoned", "defended")]
    n_mono = int((per_cell.label == "CD14 Mono").sum())
    assert f"<td>CD14 Mono</td><td>{n_mono}</td>" + "".join(f"<td>{a:.3f}</td>" for a in mono) in page
    asr = wide["asr"]
    assert f"{asr['poisoned']:.2f} after poisoning -&gt; {asr['defended']:.2f} after the defence" in page
    assert "clean accuracy " + " -&gt; ".join(f"{wide.loc[s, 'accuracy']:.2f}" for s in
                                            ("clean", "poisoned", "defended")) in page
    pd.testing.assert_frame_equal(result.table, table_before)
    assert (attack_data.X != x_before).nnz == 0


def test_sweep_report(attack_data, tmp_path):
    sweep = sweep_attack(attack_data, LABEL, targets=["B", "CD4 Naive T"], rates=[0.03, 0.1], victim="logistic",
                         defence="remove", seed=0)
    before = sweep.copy()
    path = write_sweep_report(sweep, tmp_path / "sweep")
    assert (tmp_path / "sweep" / "sweep.csv").is_file()
    csv = pd.read_csv(tmp_path / "sweep" / "sweep.csv")
    assert len(csv) == len(sweep)
    page = path.read_text()
    assert "ASR against rate" in page and "ASR against topnstop" not in page  # topnstop has one value
    assert page.count("data:image/png;base64") == 1
    assert "CD4 Naive T" in page and "poisoned asr" in page and "defended asr" in page
    pd.testing.assert_frame_equal(sweep, before)
