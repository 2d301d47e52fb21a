"""Coverage reports: gene counts, count-weighted coverage, zero-overlap errors; data left untouched."""

from __future__ import annotations

import json
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.errors import GeneIdentityError, InputDataError
from scforge.genes import (
    CoverageReport,
    GeneVocab,
    align_genes,
    coverage_report,
    gene_coverage,
    load_geneformer_dictionaries,
)
from scforge.matrix import as_source

GENES = ["CD4", "SEPT7", "NOT_A_GENE", "GAPDH", "MS4A1"]
VOCAB = GeneVocab.from_gene_list(["GAPDH", "CD4", "SEPTIN7", "CD3E"], specials={"pad": "<pad>"})


def _small_adata() -> ad.AnnData:
    counts = np.array(
        [
            [1, 2, 10, 0, 3],
            [0, 4, 5, 6, 0],
            [7, 0, 0, 1, 8],
        ],
        dtype=np.float32,
    )
    var = pd.DataFrame({"ensembl": ["ENSG00000010610", "ENSG00000122545", "ENSG00000000000",
                                    "ENSG00000111640", "ENSG00000156738"]}, index=GENES)
    return ad.AnnData(X=sp.csr_matrix(counts), var=var, layers={"dense": counts.copy()})


def test_count_fraction_on_a_hand_made_anndata() -> None:
    adata = _small_adata()
    x_before, var_before = adata.X.copy(), adata.var.copy()
    report = gene_coverage(adata, VOCAB)
    # totals per gene: CD4 8, SEPT7 6, NOT_A_GENE 15, GAPDH 7, MS4A1 11 -> matched 8+6+7 of 47
    assert report.n_genes == 5 and report.n_matched == 3 and report.n_unmatched == 2
    assert report.count_fraction == pytest.approx(21 / 47)
    assert report.unmatched_examples == ["NOT_A_GENE", "MS4A1"]
    assert report.methods == {"exact": 2, "previous": 1, "unmatched": 2}
    assert report.n_duplicates_collapsed == 0
    assert report.detected_id_type == "symbol" and report.vocab_id_type == "symbol"
    # the AnnData is not modified
    assert (adata.X != x_before).nnz == 0 and adata.X.dtype == np.float32
    pd.testing.assert_frame_equal(adata.var, var_before)
    assert list(adata.var_names) == GENES and not adata.is_view


def test_layer_gene_col_and_source_inputs() -> None:
    adata = _small_adata()
    dense = gene_coverage(adata, VOCAB, layer="dense")
    assert dense.count_fraction == pytest.approx(21 / 47)
    # Ensembl ids from a var column against the same symbol vocabulary
    by_col = gene_coverage(adata, VOCAB, gene_col="ensembl")
    assert by_col.n_matched == 3 and by_col.methods.get("ensembl_to_symbol") == 3
    assert by_col.count_fraction == pytest.approx(21 / 47)
    with pytest.raises(GeneIdentityError, match="not in var"):
        gene_coverage(adata, VOCAB, gene_col="symbol")
    source = as_source(adata)
    assert gene_coverage(source, VOCAB).count_fraction == pytest.approx(21 / 47)
    assert "gene_col" not in adata.var and list(adata.var.columns) == ["ensembl"]


def test_backed_anndata(tmp_path: Path) -> None:
    path = tmp_path / "small.h5ad"
    _small_adata().write_h5ad(path)
    backed = ad.read_h5ad(path, backed="r")
    try:
        report = gene_coverage(backed, VOCAB)
    finally:
        backed.file.close()
    assert report.n_matched == 3 and report.count_fraction == pytest.approx(21 / 47)


def test_zero_overlap_raises_or_reports() -> None:
    adata = _small_adata()
    other = GeneVocab.from_gene_list(["ENSG00000000003", "ENSG00000000005"])
    with pytest.raises(GeneIdentityError, match="0 of 5 genes of adata.X matched"):
        gene_coverage(adata, other, use_synonyms=False)
    report = gene_coverage(adata, other, use_synonyms=False, raise_on_zero=False)
    assert report.n_matched == 0 and report.count_fraction == 0.0


def test_report_text_and_dict() -> None:
    report = gene_coverage(_small_adata(), VOCAB)
    text = str(report)
    assert "matched:           3 (60.0% of genes)" in text
    assert "44.7% of all expression counts" in text
    assert "NOT_A_GENE" in text and "previous 1" in text
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["gene_fraction"] == pytest.approx(0.6)


def test_coverage_report_from_an_alignment() -> None:
    al = align_genes(["CD4", "CD4", "X"], VOCAB)
    report = coverage_report(al, np.array([2.0, 3.0, 5.0]), vocab_name="tiny")
    assert isinstance(report, CoverageReport)
    assert report.n_duplicates_collapsed == 1 and report.count_fraction == pytest.approx(0.5)
    assert "duplicates" in str(report) and "'tiny'" in str(report)
    assert coverage_report(al).count_fraction is None
    assert coverage_report(al, np.zeros(3)).count_fraction is None  # no counts at all
    with pytest.raises(InputDataError, match="one total per data gene"):
        coverage_report(al, np.ones(4))


def test_ifnb_coverage_scgpt_and_geneformer(shared_data: Path, ifnb_small: ad.AnnData) -> None:
    genes_before = ifnb_small.var_names.copy()
    x_sum_before = float(ifnb_small.X.sum())
    scgpt = GeneVocab.from_file(shared_data / "genes" / "scgpt_default_census_vocab.json")
    with_syn = gene_coverage(ifnb_small, scgpt)
    without = gene_coverage(ifnb_small, scgpt, use_synonyms=False)
    assert with_syn.vocab_name == "scgpt_default_census_vocab.json"
    assert with_syn.n_matched > without.n_matched == 11_921
    assert with_syn.count_fraction > 0.99 > without.count_fraction > 0.96

    gf2 = load_geneformer_dictionaries(shared_data / "genes" / "geneformer_v2_gc95M")
    report = gene_coverage(ifnb_small, gf2)  # dictionaries: their ensembl_mapping is used
    assert report.methods.get("mapping_dict", 0) > 11_000
    assert 0.93 < report.count_fraction < 0.96
    assert report.n_duplicates_collapsed > 0
    assert ifnb_small.var_names.equals(genes_before) and float(ifnb_small.X.sum()) == x_sum_before
