"""GeneVocab formats (scGPT JSON, Geneformer pickles, gene lists, own JSON) and Geneformer dictionaries."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scforge.errors import UnsafeFileError, VocabularyError
from scforge.genes import GeneformerDictionaries, GeneVocab, load_geneformer_dictionaries
from scforge.safe_pickle import safe_load_pickle


@pytest.fixture(scope="module")
def scgpt_vocab(shared_data: Path) -> GeneVocab:
    return GeneVocab.from_scgpt_json(shared_data / "genes" / "scgpt_default_census_vocab.json")


# ---- scGPT ---------------------------------------------------------------------------------------
def test_scgpt_vocab_specials_are_appended(scgpt_vocab: GeneVocab) -> None:
    assert len(scgpt_vocab) == 60_697
    assert scgpt_vocab["<pad>"] == 60_694
    assert scgpt_vocab["<cls>"] == 60_695
    assert scgpt_vocab["<eoc>"] == 60_696
    assert (scgpt_vocab.pad_id, scgpt_vocab.cls_id, scgpt_vocab.special_id("eoc")) == (60_694, 60_695, 60_696)
    assert scgpt_vocab.mask_id is None and scgpt_vocab.eos_id is None
    assert scgpt_vocab.specials == {"pad": "<pad>", "cls": "<cls>", "eoc": "<eoc>"}
    assert len(scgpt_vocab.gene_tokens) == 60_694
    assert scgpt_vocab.id_type == "symbol"


def test_scgpt_vocab_keeps_file_ids(shared_data: Path, scgpt_vocab: GeneVocab) -> None:
    raw = json.loads((shared_data / "genes" / "scgpt_default_census_vocab.json").read_text())
    sample = list(raw.items())[::997]
    assert all(scgpt_vocab[tok] == i for tok, i in sample)
    assert all(scgpt_vocab.token(i) == tok for tok, i in sample)


def test_scgpt_vocab_without_specials(shared_data: Path) -> None:
    vocab = GeneVocab.from_scgpt_json(shared_data / "genes" / "scgpt_default_census_vocab.json", add_specials=False)
    assert len(vocab) == 60_694
    assert vocab.pad_id is None
    with pytest.raises(VocabularyError, match="no 'pad' special token"):
        vocab.special_id("pad")


def test_scgpt_round_trip(tmp_path: Path, scgpt_vocab: GeneVocab) -> None:
    out = tmp_path / "vocab.json"
    scgpt_vocab.to_scgpt_json(out)
    written = json.loads(out.read_text())
    assert written["<pad>"] == 60_694 and len(written) == 60_697
    again = GeneVocab.from_scgpt_json(out)  # specials already present: nothing appended
    assert again == scgpt_vocab
    assert GeneVocab.from_file(out) == scgpt_vocab
    assert GeneVocab.from_file(tmp_path) == scgpt_vocab  # a checkpoint folder with vocab.json


def test_lookup_is_vectorised_with_minus_one(scgpt_vocab: GeneVocab) -> None:
    ids = scgpt_vocab.lookup(["GAPDH", "not-a-gene", "<cls>", "CD4"])
    assert ids.dtype == np.int64
    assert ids[1] == -1 and ids[2] == 60_695
    assert ids[0] == scgpt_vocab["GAPDH"] and ids[3] == scgpt_vocab["CD4"]
    assert scgpt_vocab.lookup(np.array([], dtype=object)).shape == (0,)


def test_missing_token_error_is_vocabulary_and_key_error(scgpt_vocab: GeneVocab) -> None:
    with pytest.raises(VocabularyError, match="'NOT_A_GENE' is not in the vocabulary"):
        scgpt_vocab["NOT_A_GENE"]
    with pytest.raises(KeyError):
        scgpt_vocab["NOT_A_GENE"]
    assert "NOT_A_GENE" not in scgpt_vocab and "GAPDH" in scgpt_vocab
    assert scgpt_vocab.get("NOT_A_GENE") is None
    with pytest.raises(VocabularyError, match="out of range"):
        scgpt_vocab.token(60_697)


# ---- Geneformer ------------------------------------------------------------------------------------
def test_geneformer_v1_dictionaries(shared_data: Path) -> None:
    d = load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v1")
    assert isinstance(d, GeneformerDictionaries)
    assert d.version == "V1"
    assert len(d.vocab) == 25_426
    assert d.vocab.pad_id == 0 and d.vocab.mask_id == 1
    assert d.vocab.cls_id is None and d.vocab.eos_id is None
    assert d.vocab["ENSG00000000003"] == 2 and type(d.vocab["ENSG00000000003"]) is int
    assert d.vocab.token(25_425) == "ENSGR0000265658"
    assert d.vocab.id_type == "ensembl"
    assert len(d.medians) == 25_424
    values = np.fromiter(d.medians.values(), dtype=float)
    assert all(type(v) is float for v in list(d.medians.values())[:10])
    assert 0.09 < values.min() < 0.1 and 634 < values.max() < 635  # range quoted in the reference notes
    assert len(d.name_to_id) == 40_248
    assert d.ensembl_mapping is not None and d.ensembl_mapping["ENSG00000000003"] == "ENSG00000000003"
    assert d.files["ensembl_mapping_dict"].endswith("ensembl_mapping_dict_gc30M.pkl")


def test_geneformer_v2_dictionaries_read_special_ids_from_file(shared_data: Path) -> None:
    folder = shared_data / "genes" / "geneformer_v2_gc95M"
    d = load_geneformer_dictionaries(folder)
    raw = safe_load_pickle(folder / "token_dictionary_gc95M.pkl")
    assert d.version == "V2"
    assert len(d.vocab) == 20_275
    for role, token in [("pad", "<pad>"), ("mask", "<mask>"), ("cls", "<cls>"), ("eos", "<eos>")]:
        assert d.vocab.special_id(role) == int(raw[token])
    assert sorted(d.vocab.specials) == ["cls", "eos", "mask", "pad"]
    assert len(d.vocab.gene_tokens) == 20_271
    assert len(d.medians) == 42_005
    assert len(d.name_to_id) == 63_675
    assert len(d.ensembl_mapping) == 173_697
    # every gene token has a positive median
    assert all(d.medians[g] > 0 for g in d.vocab.gene_tokens[:2000])


def test_geneformer_token_path_and_version_checks(shared_data: Path, tmp_path: Path) -> None:
    token_path = shared_data / "genes" / "geneformer_v2_gc95M" / "token_dictionary_gc95M.pkl"
    d = load_geneformer_dictionaries(token_path)
    assert d.version == "V2" and d.files["gene_median_dictionary"].endswith("_gc95M.pkl")
    with pytest.raises(VocabularyError, match="version='V1' was requested"):
        load_geneformer_dictionaries(token_path, version="V1")
    with pytest.raises(VocabularyError, match="No Geneformer token dictionary"):
        load_geneformer_dictionaries(tmp_path)
    # a token dictionary without its medians
    (tmp_path / "token_dictionary_gc104M.pkl").write_bytes(token_path.read_bytes())
    with pytest.raises(VocabularyError, match="No gene median dictionary"):
        load_geneformer_dictionaries(tmp_path)


def test_geneformer_pickle_via_from_file(shared_data: Path) -> None:
    vocab = GeneVocab.from_file(shared_data / "genes" / "geneformer_v1" / "token_dictionary.pkl")
    assert len(vocab) == 25_426 and vocab.specials == {"pad": "<pad>", "mask": "<mask>"}


def test_malicious_token_dictionary_is_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch '{tmp_path / 'pwned'}'",))

    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({"<pad>": 0, "X": Evil()}))
    with pytest.raises(UnsafeFileError, match="token_dictionary.pkl"):
        GeneVocab.from_file(path)
    assert not (tmp_path / "pwned").exists()


# ---- other formats -------------------------------------------------------------------------------
def test_gene_list_and_text_files(tmp_path: Path) -> None:
    panel = GeneVocab.from_gene_list(["CD3E", "CD4", "MS4A1"])
    assert len(panel) == 3 and panel.specials == {} and panel["MS4A1"] == 2
    assert panel.pad_id is None

    with_specials = GeneVocab.from_gene_list(["CD3E", "CD4"], specials=["<pad>", "<cls>"])
    assert with_specials.tokens == ["CD3E", "CD4", "<pad>", "<cls>"]
    assert with_specials.cls_id == 3 and with_specials.gene_tokens == ["CD3E", "CD4"]

    txt = tmp_path / "panel.txt"
    txt.write_text("CD3E\nCD4\nMS4A1\n")
    assert GeneVocab.from_file(txt).tokens == ["CD3E", "CD4", "MS4A1"]
    txt.write_text("CD3E\n\nCD4\n")
    with pytest.raises(VocabularyError, match="empty line"):
        GeneVocab.from_file(txt)


def test_constructor_keywords_used_by_builtin_vocabs() -> None:
    vocab = GeneVocab(tokens=["A1BG", "<pad>"], specials={"pad": "<pad>"})
    assert vocab.pad_id == 1 and vocab.gene_tokens == ["A1BG"]
    with pytest.raises(VocabularyError, match="Unknown special-token role"):
        GeneVocab(tokens=["A", "<x>"], specials={"start": "<x>"})
    with pytest.raises(VocabularyError, match="not among the tokens"):
        GeneVocab(tokens=["A"], specials={"pad": "<pad>"})


def test_own_json_round_trip_keeps_id_type(tmp_path: Path) -> None:
    vocab = GeneVocab.from_gene_list(["ENSG00000141510", "ENSG00000000003"], specials={"pad": "<pad>"})
    out = tmp_path / "v.json"
    vocab.save(out)
    payload = json.loads(out.read_text())
    assert payload["format"] == "scforge.GeneVocab" and payload["version"] == 1
    assert payload["id_type"] == "ensembl"
    again = GeneVocab.from_file(out)
    assert again == vocab and again.id_type == "ensembl" and again.pad_id == 2
    payload["version"] = 99
    out.write_text(json.dumps(payload))
    with pytest.raises(VocabularyError, match="version 99"):
        GeneVocab.from_json(out)


@pytest.mark.parametrize(
    "content, message",
    [
        ({"A": 0, "B": 2}, "consecutive ids"),
        ({"A": 0, "B": 0}, "same id 0"),
        ({"A": 0, "B": "1"}, "ids must be integers"),
        ({"A": 0, "B": True}, "ids must be integers"),
        ({}, "empty"),
        (["A", "A"], "duplicate tokens"),
    ],
)
def test_bad_json_vocabularies(tmp_path: Path, content: object, message: str) -> None:
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(content))
    with pytest.raises(VocabularyError, match=message) as info:
        GeneVocab.from_file(path)
    assert "vocab.json" in str(info.value) or message == "duplicate tokens"


def test_bad_pickled_and_unreadable_vocabularies(tmp_path: Path) -> None:
    path = tmp_path / "token_dictionary.pkl"
    path.write_bytes(pickle.dumps({1: 0, "B": 1}))
    with pytest.raises(VocabularyError, match="non-string token 1"):
        GeneVocab.from_file(path)
    path.write_bytes(b"garbage")
    with pytest.raises(VocabularyError, match="Cannot read the Geneformer token dictionary"):
        GeneVocab.from_file(path)
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{not json")
    with pytest.raises(VocabularyError, match="Cannot parse"):
        GeneVocab.from_file(bad_json)
    with pytest.raises(VocabularyError, match="does not exist"):
        GeneVocab.from_file(tmp_path / "nope.json")


_token = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp")), min_size=1, max_size=12
).filter(lambda t: t not in ("<pad>", "<cls>", "<eoc>", "<mask>", "<eos>"))


@settings(max_examples=40, deadline=None)
@given(tokens=st.lists(_token, min_size=1, max_size=30, unique=True))
def test_formats_round_trip_property(tmp_path_factory: pytest.TempPathFactory, tokens: list[str]) -> None:
    vocab = GeneVocab.from_gene_list(tokens, id_type="unknown")
    folder = tmp_path_factory.mktemp("rt")
    vocab.save(folder / "own.json")
    vocab.to_scgpt_json(folder / "scgpt.json")
    assert GeneVocab.from_json(folder / "own.json") == vocab
    assert GeneVocab.from_scgpt_json(folder / "scgpt.json", add_specials=False) == vocab
    ids = vocab.lookup(tokens)
    assert ids.tolist() == list(range(len(tokens)))
