"""Label -> Cell Ontology mapping: the shipped ifnb table (re-checked against CL), fallbacks, and errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from importlib import resources

from scforge.errors import ConfigError, InputDataError
from scforge.ontology import load_cell_ontology, load_label_table, load_marker_table, map_labels

IFNB_LABELS = ["CD14 Mono", "CD4 Naive T", "CD4 Memory T", "CD16 Mono", "B", "CD8 T", "T activated", "NK", "DC",
               "B Activated", "Mk", "pDC", "Eryth"]


@pytest.fixture(scope="module")
def cl(shared_data):
    return load_cell_ontology(shared_data / "genes/ontology/CL-ontology-v2026-03-26.json.zst")


def test_shipped_table_ids_and_labels_match_the_ontology(cl):
    with resources.files("scforge.ontology").joinpath("tables", "ifnb_cell_ontology.tsv").open() as f:
        table = pd.read_csv(f, sep="\t", comment="#")
    assert sorted(table["label"]) == sorted(IFNB_LABELS)
    for _, row in table.iterrows():
        assert row["cl_id"] in cl and not cl[row["cl_id"]].deprecated, row["label"]
        assert cl.label(row["cl_id"]) == row["cl_label"], row["label"]
        assert isinstance(row["rationale"], str) and len(row["rationale"]) > 10
    assert len(set(table["cl_id"])) == len(table)  # distinct types stay distinct


def test_ifnb_labels_map_through_the_table(cl, ifnb_small):
    labels = ifnb_small.obs["seurat_annotations"]
    m = map_labels(labels, ontology=cl)
    assert m.unmapped == [] and m.n_missing == 0 and len(m.mapping) == 13
    assert set(m.how.values()) == {"table"}
    assert m.ids[int(np.flatnonzero(labels.astype(str) == "pDC")[0])] == "CL:0000784"
    assert len(m.ids) == len(labels)
    text = m.report(cl)
    assert "'B Activated' -> CL:0000785 (mature B cell) [table]" in text


def test_label_and_synonym_fallback_case_insensitive(cl):
    m = map_labels(["Natural Killer Cell", "B lymphocyte", "CD14 Mono", np.nan, None, ""], ontology=cl)
    assert m.ids == ["CL:0000623", "CL:0000236", "CL:0001054", None, None, None]
    assert m.how == {"Natural Killer Cell": "label", "B lymphocyte": "synonym", "CD14 Mono": "table"}
    assert m.n_missing == 3 and m.cell_type_ids == ["CL:0000236", "CL:0000623", "CL:0001054"]


def test_unmapped_labels_are_listed(cl):
    with pytest.raises(InputDataError, match=r"'Weird cells'"):
        map_labels(["B", "Weird cells"], ontology=cl)
    m = map_labels(["B", "Weird cells", "Weird cells"], ontology=cl, on_unmapped="warn")
    assert m.unmapped == ["Weird cells"] and m.ids == ["CL:0000236", None, None]
    assert "'Weird cells' -> not mapped" in m.report()
    with pytest.raises(ConfigError):
        map_labels(["B"], ontology=cl, on_unmapped="ignore")


def test_table_ids_missing_from_the_ontology_raise(cl, tmp_path):
    with pytest.raises(InputDataError, match=r"CL:9999999 \(not in the ontology\)"):
        map_labels(["T"], {"T": "CL:9999999"}, ontology=cl)
    deprecated = next(t for t in cl.terms.values() if t.deprecated)
    with pytest.raises(InputDataError, match="deprecated"):
        map_labels(["old"], {"old": deprecated.id}, ontology=cl)
    path = tmp_path / "table.tsv"
    path.write_text("# comment\nlabel\tcl_id\nmy T\tCL:0000084\n")
    assert map_labels(["my T"], path, ontology=cl).ids == ["CL:0000084"]
    assert load_label_table(path) == {"my T": "CL:0000084"}
    (tmp_path / "bad.tsv").write_text("name\tid\nx\ty\n")
    with pytest.raises(InputDataError, match="lacks the column"):
        load_label_table(tmp_path / "bad.tsv")


def test_marker_table_is_enriched_in_its_own_type(ifnb_small):
    """The review rule of pbmc_markers.tsv: every marker's mean log-normalised expression is highest
    in its own ifnb label."""
    markers = load_marker_table()
    assert sorted(markers) == sorted(IFNB_LABELS)
    lognorm = ifnb_small.layers["lognorm"]
    labels = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    for label, genes in markers.items():
        for gene in genes:
            assert gene in ifnb_small.var_names, gene
            x = np.asarray(lognorm[:, ifnb_small.var_names.get_loc(gene)].todense()).ravel()
            means = pd.Series(x).groupby(labels).mean()
            assert means.idxmax() == label, (label, gene)
