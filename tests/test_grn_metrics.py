"""GRN validation (scforge.metrics.grn): GO gene sets, hypergeometric enrichment with BH FDR, gene-set recovery."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from scipy.stats import hypergeom
from sklearn.metrics import roc_auc_score

from scforge.errors import ConfigError, InputDataError
from scforge.metrics.grn import (
    best_terms,
    gene_set_recovery,
    go_descendants,
    go_gene_sets,
    go_term_names,
    interferon_genes,
    n_enriched_programs,
    program_enrichment,
)


def _tsv(path, header, rows):
    with gzip.open(path, "wt") as fh:
        fh.write("\t".join(header) + "\n")
        for r in rows:
            fh.write("\t".join(r) + "\n")


@pytest.fixture()
def go_dir(tmp_path):
    """A tiny GO: T1 <- T2 (is_a) <- T3 (part of); T4 regulates T1 (not propagated); T5 is MF."""
    _tsv(tmp_path / "go_terms_GOdb_2022-07.tsv.gz", ["go_id", "term", "ontology"],
         [["T1", "root process", "BP"], ["T2", "child", "BP"], ["T3", "grandchild", "BP"], ["T4", "regulator", "BP"],
          ["T5", "binding", "MF"]])
    _tsv(tmp_path / "go_parents_GOdb_2022-07.tsv.gz", ["go_id", "parent_go_id", "relationship"],
         [["T2", "T1", "isa"], ["T3", "T2", "part of"], ["T4", "T1", "regulates"]])
    _tsv(tmp_path / "human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz",
         ["entrez_id", "symbol", "go_id", "evidence", "aspect"],
         [["1", "A", "T3", "IDA", "BP"], ["2", "B", "T2", "IEA", "BP"], ["3", "C", "T1", "TAS", "BP"],
          ["4", "D", "T4", "IDA", "BP"], ["5", "E", "T5", "IDA", "MF"], ["6", "F", "T1", "ND", "BP"],
          ["1", "A", "T2", "IMP", "BP"]])
    return tmp_path


def test_go_gene_sets_propagate_to_ancestors(go_dir):
    sets = go_gene_sets(go_dir, "BP", min_size=1, max_size=10)
    assert sets == {"T1": {"A", "B", "C"}, "T2": {"A", "B"}, "T3": {"A"}, "T4": {"D"}}
    assert go_gene_sets(go_dir, "BP", min_size=1, propagate=False)["T1"] == {"C"}
    assert go_gene_sets(go_dir, "BP", min_size=2, max_size=2) == {"T2": {"A", "B"}}
    assert go_gene_sets(go_dir, "BP", min_size=1, universe=["A", "C"]) == {"T1": {"A", "C"}, "T2": {"A"},
                                                                            "T3": {"A"}}
    assert go_gene_sets(go_dir, "MF", min_size=1) == {"T5": {"E"}}
    assert go_descendants(go_dir, ["T1"]) == {"T1", "T2", "T3"} and go_descendants(go_dir, ["T2"]) == {"T2", "T3"}
    assert interferon_genes(go_dir, terms=["T2"]) == {"A", "B"}
    assert interferon_genes(go_dir, terms=["T1"], universe=["B", "Z"]) == {"B"}
    assert go_term_names(go_dir)["T3"] == "grandchild"
    with pytest.raises(ConfigError, match="aspect"):
        go_gene_sets(go_dir, "XX")
    with pytest.raises(InputDataError, match="does not exist"):
        go_gene_sets(go_dir / "missing")


def _bh(p):
    p = np.asarray(p, dtype=float)
    order = np.argsort(p)
    m = p.size
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(adj, 1)
    return out


def test_program_enrichment_matches_scipy_by_hand():
    universe = [f"g{i}" for i in range(20)]
    programs = pd.DataFrame({"program": [0] * 5 + [1] * 4, "gene": [f"g{i}" for i in range(5)] + ["g10", "g11",
                                                                                                  "g12", "x"],
                             "size": 0})
    sets = {"S1": {"g0", "g1", "g2", "g3", "g15"}, "S2": {"g10", "g4", "g19"}, "S3": {"nope"}}
    table = program_enrichment(programs, sets, universe, term_names={"S1": "first"})
    # tests: (0,S1) k=4 N=5 n=5; (0,S2) k=1 N=5 n=3; (1,S1) k=0; (1,S2) k=1 N=3 n=3 (x is outside the universe)
    p = [hypergeom.sf(3, 20, 5, 5), hypergeom.sf(0, 20, 3, 5), 1.0, hypergeom.sf(0, 20, 3, 3)]
    fdr = _bh(p)
    assert table[["program", "term", "overlap", "program_size", "term_size"]].values.tolist() == [
        [0, "S1", 4, 5, 5], [0, "S2", 1, 5, 3], [1, "S2", 1, 3, 3]]
    np.testing.assert_allclose(table["p_value"], [p[0], p[1], p[3]], rtol=1e-12)
    np.testing.assert_allclose(table["fdr"], [fdr[0], fdr[1], fdr[3]], rtol=1e-12)
    assert table.loc[0, "name"] == "first" and table.loc[0, "genes"] == "g0,g1,g2,g3"
    assert table.loc[0, "expected"] == pytest.approx(5 * 5 / 20) and table.loc[0, "fold"] == pytest.approx(4 / 1.25)
    assert best_terms(table)["term"].tolist() == ["S1", "S2"]
    assert n_enriched_programs(table, 0.05) == 1 and n_enriched_programs(table, 1.01) == 2
    same = program_enrichment({0: [f"g{i}" for i in range(5)], 1: ["g10", "g11", "g12"]}, sets, universe)
    np.testing.assert_allclose(same["p_value"], table["p_value"])
    with pytest.raises(InputDataError, match="nothing to test"):
        program_enrichment(programs, {"S": {"zz"}}, universe)


def test_gene_set_recovery_by_hand():
    scores = pd.Series([5.0, 4.0, 3.0, 3.0, 1.0, 0.5], index=list("abcdef"))
    out = gene_set_recovery(scores, {"a", "c", "f", "zz"})
    labels = np.isin(list("abcdef"), ["a", "c", "f"])
    assert out["auroc"] == pytest.approx(roc_auc_score(labels, scores.to_numpy()))
    assert out["precision_at_k"] == pytest.approx(2 / 3) and out["k"] == 3 and out["n_positives"] == 3
    assert gene_set_recovery(scores, {"a", "b"}, k=2)["precision_at_k"] == 1.0
    assert gene_set_recovery(scores, {"a", "b"})["auroc"] == 1.0
    with pytest.raises(InputDataError, match="positives"):
        gene_set_recovery(scores, {"zz"})


def test_real_go_interferon_genes(shared_data):
    go = shared_data / "genes" / "go"
    isg = interferon_genes(go)
    assert {"ISG15", "IFIT1", "MX1", "IRF7", "STAT1"} <= isg and "CD3E" not in isg
    sets = go_gene_sets(go, "BP", min_size=5, max_size=500, universe=sorted(isg | {"CD3E", "MS4A1", "LYZ"}))
    assert "ISG15" in sets["GO:0034340"] and "IFIT1" in sets["GO:0034340"]  # IFIT1 via a child term
