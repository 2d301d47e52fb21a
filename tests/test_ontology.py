"""Cell Ontology loading, lookups, scCello's PPR similarity levels (vs networkx) and ancestor mask."""

from __future__ import annotations

import json
import sys
import types

import networkx as nx
import numpy as np
import pytest
import scipy.sparse as sp
import zstandard

from scforge.errors import ConfigError, DependencyError, InputDataError
from scforge.ontology import (
    cell_type_relations,
    load_cell_ontology,
    ontology_graph,
    personalized_pagerank,
    similarity_levels,
)

CL_FILE = "genes/ontology/CL-ontology-v2026-03-26.json.zst"


@pytest.fixture(scope="module")
def cl(shared_data):
    return load_cell_ontology(shared_data / CL_FILE)


@pytest.fixture(scope="module")
def graph(cl):
    return ontology_graph(cl)


def test_load_counts_and_lookups(cl):
    assert len(cl) == 3596 and len(cl.term_ids()) == 3324 and cl.release == "v2026-03-26"
    assert cl.label("CL:0000236") == "B cell"
    assert cl.find("b cell") == ["CL:0000236"]
    assert cl.find("B lymphocyte") == ["CL:0000236"]  # a synonym
    assert cl.find("B lymphocyte", synonyms=False) == []
    assert "CL:0000785" in cl.children("CL:0000236") or "CL:0000785" in cl.descendants("CL:0000236")
    assert cl.parents("CL:0000788") == ["CL:0000785"]  # naive B cell is_a mature B cell
    assert {"CL:0000236", "CL:0000000"} <= cl.ancestors("CL:0000788")
    assert "CL:0000788" in cl.descendants("CL:0000236")
    assert cl.ancestors("CL:0000236", include_self=True) >= {"CL:0000236"}
    with pytest.raises(InputDataError, match="CL:9999999"):
        cl.label("CL:9999999")


def test_children_and_descendants_invert_parents_and_ancestors(cl):
    for term in cl.term_ids()[:400]:
        for parent in cl.parents(term):
            assert term in cl.children(parent)
        for anc in cl.ancestors(term):
            assert term in cl.descendants(anc)


def test_edges_are_direct_parents_among_current_terms(cl, graph):
    edges = cl.edges()
    assert len(edges) == 4633  # the figure recorded for this release in the reference notes
    assert all(not cl[c].deprecated and not cl[p].deprecated for c, p in edges)
    assert graph.adjacency.nnz == 2 * len(set(frozenset(e) for e in edges))
    assert (graph.adjacency != graph.adjacency.T).nnz == 0


def test_uncompressed_json_and_bad_files(tmp_path, shared_data):
    raw = zstandard.ZstdDecompressor().stream_reader(open(shared_data / CL_FILE, "rb")).read()
    plain = tmp_path / "CL-ontology-v2026-03-26.json"
    plain.write_bytes(raw)
    assert len(load_cell_ontology(plain)) == 3596
    with pytest.raises(InputDataError, match="does not exist"):
        load_cell_ontology(tmp_path / "missing.json.zst")
    garbage = tmp_path / "x.json.zst"
    garbage.write_bytes(b"not zstd")
    with pytest.raises(InputDataError, match="Could not read"):
        load_cell_ontology(garbage)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"CL:1": {"name": "x"}}))
    with pytest.raises(InputDataError, match="label"):
        load_cell_ontology(wrong)


def test_no_path_needs_the_optional_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cellxgene_ontology_guide", None)  # import fails
    with pytest.raises(DependencyError, match="pass|install"):
        load_cell_ontology()
    package = tmp_path / "cellxgene_ontology_guide"
    (package / "data").mkdir(parents=True)
    tiny = {"CL:0000000": {"label": "cell", "deprecated": False, "ancestors": {}},
            "CL:0000001": {"label": "child", "deprecated": False, "ancestors": {"CL:0000000": 1}}}
    for release in ("v2025-02-13", "v2026-03-26"):
        data = zstandard.ZstdCompressor().compress(json.dumps(tiny).encode())
        (package / "data" / f"CL-ontology-{release}.json.zst").write_bytes(data)
    fake = types.ModuleType("cellxgene_ontology_guide")
    fake.__file__ = str(package / "__init__.py")
    monkeypatch.setitem(sys.modules, "cellxgene_ontology_guide", fake)
    found = load_cell_ontology()
    assert found.release == "v2026-03-26" and found.parents("CL:0000001") == ["CL:0000000"]


def test_ppr_equals_networkx(graph):
    g = graph.to_networkx()
    picks = [graph.nodes.index(t) for t in ("CL:0000236", "CL:0000784", "CL:0000000")] + [7]
    ours = personalized_pagerank(graph.adjacency, picks, alpha=0.9)
    for row, u in zip(ours, picks):
        ref = nx.pagerank(g, alpha=0.9, personalization={graph.nodes[u]: 1})
        expected = np.array([ref[n] for n in graph.nodes])
        np.testing.assert_allclose(row, expected, atol=1e-6, rtol=0)
        assert row.sum() == pytest.approx(1.0, abs=1e-9)


def test_ppr_with_dangling_node_matches_networkx():
    # path 0-1-2 plus an isolated node 3 (dangling: its mass returns to the personalisation node)
    adj = sp.csr_matrix(np.array([[0, 1, 0, 0], [1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=float))
    g = nx.Graph([(0, 1), (1, 2)])
    g.add_node(3)
    ours = personalized_pagerank(adj, [0, 2])
    for row, u in zip(ours, [0, 2]):
        ref = nx.pagerank(g, alpha=0.9, personalization={u: 1})
        np.testing.assert_allclose(row, [ref[i] for i in range(4)], atol=1e-6)
    with pytest.raises(nx.PowerIterationFailedConvergence):  # networkx fails here too
        nx.pagerank(g, alpha=0.9, personalization={3: 1})
    with pytest.raises(ConfigError, match="did not converge"):
        personalized_pagerank(adj, [3])


def test_similarity_levels_by_hand():
    ppr = np.array([0.0, 5e-5, 1e-4, 3.5e-4, 0.01, 0.5])
    # 1e-4 -> log2(2)=1; 3.5e-4 -> floor(log2(4.5))=2; 0.01 -> floor(log2(101))=6; 0.5 -> floor(log2(5001))=12
    assert similarity_levels(ppr).tolist() == [1, 1, 1, 2, 6, 12]


def test_cell_type_relations_restrict_and_mark_ancestors(cl, graph):
    ids = ["CL:0001054", "CL:0002396", "CL:0000236", "CL:0000785", "CL:0000784"]
    rel = cell_type_relations(cl, ids, graph=graph)
    full = personalized_pagerank(graph.adjacency, graph.index(ids))
    np.testing.assert_array_equal(rel.ppr, full[:, graph.index(ids)])
    np.testing.assert_array_equal(rel.levels, similarity_levels(rel.ppr))
    assert (np.diag(rel.levels) == rel.levels.max(axis=1)).all()  # each type is most similar to itself
    assert rel.ancestor[1, 0] and not rel.ancestor[0, 1]  # CD14-positive monocyte is a parent of CD14-low CD16+
    assert rel.ancestor[3, 2] and not rel.ancestor[2, 3]  # B cell is an ancestor of mature B cell
    assert not rel.ancestor.diagonal().any()
    # B cell is closer to mature B cell than to a monocyte
    assert rel.levels[2, 3] > rel.levels[2, 0]
    assert rel.index(["CL:0000784", "CL:0001054"]).tolist() == [4, 0]
    with pytest.raises(InputDataError, match="not nodes"):
        cell_type_relations(cl, ["CL:0000236", "CL:9999999"], graph=graph)
