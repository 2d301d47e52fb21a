"""Id-type detection and gene-name alignment on real data (ifnb, HGNC/MGI tables, model vocabs)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from scforge.errors import GeneIdentityError
from scforge.genes import (
    GeneVocab,
    align_genes,
    detect_id_type,
    load_geneformer_dictionaries,
    map_ensembl_to_symbols,
    map_symbols_to_ensembl,
    mouse_to_human,
    strip_version,
)
from scforge.genes.mapping import human_to_mouse


@pytest.fixture(scope="module")
def scgpt(shared_data: Path) -> GeneVocab:
    return GeneVocab.from_scgpt_json(shared_data / "genes" / "scgpt_default_census_vocab.json")


@pytest.fixture(scope="module")
def gf1(shared_data: Path):
    return load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v1")


@pytest.fixture(scope="module")
def gf2(shared_data: Path):
    return load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v2_gc95M")


@pytest.fixture(scope="module")
def ifnb_genes(shared_data: Path) -> np.ndarray:
    import anndata as ad

    adata = ad.read_h5ad(shared_data / "ifnb" / "ifnb_sub_2000.h5ad", backed="r")
    genes = np.asarray(adata.var_names)
    adata.file.close()
    return genes


@pytest.fixture(scope="module")
def hgnc(shared_data: Path) -> pd.DataFrame:
    return pd.read_parquet(shared_data / "genes" / "hgnc_human_gene_table.parquet")


@pytest.fixture(scope="module")
def mgi(shared_data: Path) -> pd.DataFrame:
    return pd.read_parquet(shared_data / "genes" / "mgi_mouse_gene_table.parquet")


MOUSE_GENES = ["Gapdh", "Actb", "Cd4", "Cd8a", "Ptprc", "Ms4a1", "Cd74", "Cd3e", "Cd14", "mt-Co1"]


# ---- detection -------------------------------------------------------------------------------------
def test_detect_ifnb_symbols(ifnb_genes: np.ndarray) -> None:
    guess = detect_id_type(ifnb_genes)
    assert guess.id_type == "symbol" and guess.species == "human"
    assert guess.fraction > 0.9  # 92% of the hg19-era names are in today's HGNC table
    assert guess.examples[:2] == ["LINC00115", "NOC2L"]
    assert not guess.has_version_suffix


def test_detect_ensembl_with_and_without_version(gf1) -> None:
    ids = gf1.vocab.gene_tokens[:500]
    plain = detect_id_type(ids)
    assert (plain.id_type, plain.species, plain.fraction, plain.has_version_suffix) == ("ensembl", "human", 1.0, False)
    versioned = detect_id_type([f"{g}.{i % 9 + 1}" for i, g in enumerate(ids)])
    assert versioned.id_type == "ensembl" and versioned.has_version_suffix
    assert versioned.examples[0] == "ENSG00000000003.1"


def test_detect_mouse_symbols_and_ids(mgi: pd.DataFrame, ifnb_genes: np.ndarray) -> None:
    guess = detect_id_type(MOUSE_GENES)
    assert (guess.id_type, guess.species, guess.fraction) == ("mouse_symbol", "mouse", 1.0)
    # a whole mouse-like gene list: ifnb genes turned into their mouse orthologs
    mouse = [g for g in human_to_mouse(ifnb_genes) if g is not None]
    assert len(mouse) > 10_000
    assert detect_id_type(mouse).id_type == "mouse_symbol"
    # upper-cased mouse symbols read as human
    assert detect_id_type([g.upper() for g in MOUSE_GENES]).id_type == "symbol"
    ids = mgi.loc[mgi["ensembl_id"].notna(), "ensembl_id"].head(200).tolist()
    assert detect_id_type(ids).id_type == "mouse_ensembl"


def test_detect_numeric_and_unknown() -> None:
    assert detect_id_type(["7157", "672", "1956", "3845"]).id_type == "entrez"
    positional = detect_id_type([str(i) for i in range(50)])
    assert positional.id_type == "unknown" and "positional" in positional.note
    junk = detect_id_type(["foo", "bar", "qux"])
    assert junk.id_type == "unknown" and junk.fraction == 0.0
    assert detect_id_type([]).id_type == "unknown"


def test_strip_version() -> None:
    out = strip_version(["ENSG00000141510.17", "ENSMUSG00000057666.19", "ENSG00000182378.14_PAR_Y",
                         "GAPDH", "RP11-34P13.7", "ENSG00000141510"])
    assert out.tolist() == ["ENSG00000141510", "ENSMUSG00000057666", "ENSG00000182378_PAR_Y",
                            "GAPDH", "RP11-34P13.7", "ENSG00000141510"]
    assert strip_version("ENSG00000141510.3") == "ENSG00000141510"


# ---- symbols -> symbol vocabulary ---------------------------------------------------------------
def _unambiguous_previous_symbols(hgnc: pd.DataFrame) -> dict[str, str]:
    """Oracle from the raw HGNC parquet: previous symbol -> approved, when it names one gene only."""
    approved = set(hgnc["symbol"])
    owners: dict[str, set[str]] = defaultdict(set)
    previous: dict[str, str] = {}
    for sym, prev, alias in zip(hgnc["symbol"], hgnc["prev_symbols"], hgnc["alias_symbols"]):
        for name in filter(None, (prev or "").split("|")):
            owners[name].add(sym)
            previous[name] = sym
        for name in filter(None, (alias or "").split("|")):
            owners[name].add(sym)
    return {k: v for k, v in previous.items() if len(owners[k]) == 1 and k not in approved}


def test_previous_symbols_map_to_current_symbols_in_vocab(scgpt: GeneVocab, hgnc: pd.DataFrame) -> None:
    prev = _unambiguous_previous_symbols(hgnc)
    # real examples: old symbol absent from the scGPT vocabulary, its approved symbol present
    cases = {old: new for old, new in sorted(prev.items()) if old not in scgpt and new in scgpt}
    assert prev["SEPT7"] == "SEPTIN7" and "SEPTIN7" in cases.values()
    sample = dict(list(cases.items())[:: max(1, len(cases) // 300)])
    al = align_genes(list(sample), scgpt)
    got = [scgpt.token(i) if i >= 0 else None for i in al.token_ids]
    assert got == list(sample.values())
    assert set(al.method) == {"previous"}
    strict = align_genes(list(sample), scgpt, use_synonyms=False)
    assert strict.n_matched == 0


def test_known_alias_previous_and_reverse_direction(scgpt: GeneVocab) -> None:
    genes = ["SEPT7", "TCEB1", "SEP15", "MLK4", "BLTP2", "GAPDH"]
    al = align_genes(genes, scgpt)
    assert [scgpt.token(i) for i in al.token_ids] == ["SEPTIN7", "ELOC", "SELENOF", "MAP3K21", "KIAA0100", "GAPDH"]
    # BLTP2 is the current symbol; the scGPT vocab still uses its previous symbol KIAA0100
    assert al.method.tolist() == ["previous", "previous", "alias", "alias", "previous", "exact"]


def test_ambiguous_and_out_of_vocab_synonyms_stay_unmatched(scgpt: GeneVocab, hgnc: pd.DataFrame) -> None:
    owners = hgnc[hgnc["alias_symbols"].str.split("|").apply(lambda a: "MDR1" in a)
                  | hgnc["prev_symbols"].str.split("|").apply(lambda a: "MDR1" in a)]["symbol"]
    assert len(set(owners)) > 1  # MDR1 names ABCB1 and TBC1D9 in HGNC
    assert "MDR1" not in scgpt
    al = align_genes(["MDR1", "ABCB1"], scgpt)
    assert al.token_ids[0] == -1 and al.method[0] == "unmatched"
    # a weak synonym never joins a gene the data already hold under its current name
    al = align_genes(["SEPTIN7", "SEPT7"], scgpt)
    assert al.method.tolist() == ["exact", "unmatched"] and al.n_duplicates == 0


def test_case_and_version_steps(scgpt: GeneVocab, gf1) -> None:
    al = align_genes(["C2ORF15", "gapdh"], scgpt)
    assert [scgpt.token(i) for i in al.token_ids] == ["C2orf15", "GAPDH"]
    assert set(al.method) == {"case"}
    al = align_genes(["ENSG00000000003.14", "ensg00000000005", "ENSG00000000419"], gf1.vocab)
    assert al.token_ids.tolist() == [2, 3, 4]
    assert al.method.tolist() == ["version", "case", "exact"]


def test_ifnb_against_scgpt(scgpt: GeneVocab, ifnb_genes: np.ndarray) -> None:
    al = align_genes(ifnb_genes, scgpt)
    strict = align_genes(ifnb_genes, scgpt, use_synonyms=False)
    # 11,921 of 13,215 by name; synonyms (mostly hg19 -> current symbols) add ~750
    assert strict.n_matched == 11_921
    assert al.n_matched > strict.n_matched + 700
    counts = al.method_counts()
    assert counts["previous"] > 600 and counts["alias"] > 10 and counts["exact"] == 11_919
    assert al.n_matched + al.n_unmatched == ifnb_genes.size == 13_215


# ---- symbols <-> Ensembl ------------------------------------------------------------------------------
def test_ifnb_symbols_against_geneformer_v1(gf1, ifnb_genes: np.ndarray) -> None:
    al = align_genes(ifnb_genes, gf1.vocab)
    print(f"ifnb vs Geneformer V1: {al.n_matched} of {al.n_genes} matched, {al.method_counts()}")
    assert al.detected.id_type == "symbol" and al.vocab_id_type == "ensembl"
    assert 11_500 < al.n_matched < 12_500  # 11,791 with the shipped tables
    assert set(al.method_counts()) == {"symbol_to_ensembl", "unmatched"}
    cd14 = int(np.flatnonzero(ifnb_genes == "CD14")[0])
    assert gf1.vocab.token(al.token_ids[cd14]) == "ENSG00000170458"
    # summed duplicates stay rare: two old symbols of one current gene (FAM21A/B -> WASHC2A)
    assert al.n_duplicates <= 2
    # without synonyms symbols are not converted: a zero overlap, explained
    with pytest.raises(GeneIdentityError) as info:
        align_genes(ifnb_genes, gf1.vocab, use_synonyms=False).require_overlap(where="adata.X")
    msg = str(info.value)
    assert "0 of 13215 genes of adata.X matched" in msg
    assert "human gene symbols" in msg and "LINC00115" in msg
    assert "Ensembl" in msg and "ENSG00000000003" in msg
    assert "gene_col=" in msg and "use_synonyms=True" in msg


def test_ensembl_mapping_dict_collapses_like_geneformer(gf2, ifnb_genes: np.ndarray) -> None:
    al = align_genes(ifnb_genes, gf2.vocab, use_synonyms=False, ensembl_mapping=gf2.ensembl_mapping)
    counts = al.method_counts()
    assert counts["mapping_dict"] > 11_000  # the V2 mapping also holds upper-cased symbols
    assert al.n_duplicates > 0  # ids collapsed onto one token, to be summed
    ids = align_genes(["ENSG00000000003.4"], gf2.vocab, ensembl_mapping=gf2.ensembl_mapping).token_ids
    assert ids[0] == gf2.vocab["ENSG00000000003"]


def test_ensembl_data_against_symbol_vocab(scgpt: GeneVocab, gf2) -> None:
    ids = gf2.vocab.gene_tokens[:300]
    al = align_genes([f"{g}.7" for g in ids], scgpt)
    assert al.n_matched > 270
    assert set(al.method_counts()) <= {"ensembl_to_symbol", "unmatched"}
    symbols = map_ensembl_to_symbols(ids)
    ok = [i for i, s in enumerate(symbols) if s is not None and s in scgpt]
    assert all(scgpt.token(al.token_ids[i]) == symbols[i] for i in ok)


def test_symbol_ensembl_helpers(hgnc: pd.DataFrame) -> None:
    row = hgnc[hgnc["symbol"] == "TP53"].iloc[0]
    ens = map_symbols_to_ensembl(["TP53", "SEPT7", "NOT_A_GENE", "MDR1"])
    assert ens[0] == row["ensembl_id"]
    assert ens[1] == hgnc.loc[hgnc["symbol"] == "SEPTIN7", "ensembl_id"].iloc[0]
    assert ens[2] is None and ens[3] is None
    assert map_symbols_to_ensembl(["SEPT7"], use_synonyms=False)[0] is None
    assert map_ensembl_to_symbols([row["ensembl_id"] + ".9", "ENSG99999999999"]).tolist() == ["TP53", None]
    with pytest.raises(GeneIdentityError, match="species"):
        map_symbols_to_ensembl(["TP53"], species="rat")


# ---- mouse -> human ------------------------------------------------------------------------------
def test_mouse_to_human(mgi: pd.DataFrame) -> None:
    human = mouse_to_human(MOUSE_GENES + ["NotAGene", "Lyz2"])
    # Lyz2 has no human ortholog in the Ensembl 105 table (LYZ is paired with 9530003J23Rik only)
    assert human.tolist() == ["GAPDH", "ACTB", "CD4", "CD8A", "PTPRC", "MS4A1", "CD74", "CD3E", "CD14", "MT-CO1",
                              None, None]
    gapdh = mgi.loc[mgi["symbol"] == "Gapdh", "ensembl_id"].iloc[0]
    assert mouse_to_human([gapdh, gapdh + ".3"]).tolist() == ["GAPDH", "GAPDH"]


def test_mouse_genes_align_through_orthologs(scgpt: GeneVocab, gf1, mgi: pd.DataFrame) -> None:
    al = align_genes(MOUSE_GENES, scgpt)
    assert al.detected.species == "mouse"
    assert set(al.method) == {"ortholog"}
    assert [scgpt.token(i) for i in al.token_ids][:3] == ["GAPDH", "ACTB", "CD4"]
    ids = mgi.set_index("symbol").loc[MOUSE_GENES[:5], "ensembl_id"].tolist()
    al = align_genes(ids, gf1.vocab)
    assert al.n_matched == 5 and set(al.method) == {"ortholog"}
    assert gf1.vocab.token(al.token_ids[0]) == map_symbols_to_ensembl(["GAPDH"])[0]
    # no case-insensitive shortcut across species, and no orthologs without synonyms
    assert align_genes(MOUSE_GENES, scgpt, use_synonyms=False).n_matched == 0
    # species='mouse' forces symbols to be read as mouse
    forced = align_genes(["Cd4", "Foxp3"], scgpt, species="mouse")
    assert [scgpt.token(i) for i in forced.token_ids] == ["CD4", "FOXP3"]


# ---- error messages ---------------------------------------------------------------------------------
def test_zero_overlap_messages(scgpt: GeneVocab, gf1) -> None:
    with pytest.raises(GeneIdentityError) as info:
        align_genes([str(i) for i in range(100)], scgpt).require_overlap()
    msg = str(info.value)
    assert "0 of 100 genes matched" in msg and "positional integer index" in msg and "gene_col" in msg

    ens = align_genes(["ENSG00000000003", "ENSG00000000005"], scgpt, use_synonyms=False)
    with pytest.raises(GeneIdentityError, match="gene symbols") as info:
        ens.require_overlap(where="the AnnData")
    assert "human Ensembl gene ids" in str(info.value)

    align_genes(["GAPDH"], scgpt).require_overlap()  # no error when something matched
    with pytest.raises(GeneIdentityError, match="needs a GeneVocab"):
        align_genes(["GAPDH"], ["GAPDH"])  # type: ignore[arg-type]
    with pytest.raises(GeneIdentityError, match="species"):
        align_genes(["GAPDH"], scgpt, species="fish")


def test_alignment_properties(scgpt: GeneVocab) -> None:
    al = align_genes(["GAPDH", "nope1", "SEPT7", "GAPDH", "nope2"], scgpt)
    assert al.n_genes == 5 and al.n_matched == 3 and al.n_unmatched == 2
    assert al.n_duplicates == 1  # the second GAPDH
    assert al.unmatched_examples == ["nope1", "nope2"]
    assert al.method_counts() == {"exact": 2, "previous": 1, "unmatched": 2}
    assert al.token_ids.dtype == np.int64


def test_whole_vocabulary_alignment_is_fast_enough(scgpt: GeneVocab, gf2) -> None:
    import time

    start = time.perf_counter()
    al = align_genes(scgpt.gene_tokens, gf2.vocab)  # 60,694 symbols -> 20,271 Ensembl tokens
    elapsed = time.perf_counter() - start
    assert al.n_matched > 19_000
    assert elapsed < 10  # vectorised: well under a second on a laptop
