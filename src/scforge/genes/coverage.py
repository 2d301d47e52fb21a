"""Coverage report: how much of a dataset a model vocabulary can see.

The gene count alone can mislead (thousands of unmatched lncRNAs may carry almost no counts), so
the report also gives ``count_fraction``: the share of all expression counts that falls on
matched genes, computed in row chunks with :func:`scforge.matrix.column_sums`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from scforge.errors import InputDataError
from scforge.genes.mapping import GeneAlignment, align_genes
from scforge.genes.vocab import GeneVocab

__all__ = ["CoverageReport", "coverage_report", "gene_coverage"]

logger = logging.getLogger("scforge")


@dataclass
class CoverageReport:
    """Summary of a :class:`~scforge.genes.GeneAlignment` (see :func:`gene_coverage`)."""

    n_genes: int
    n_matched: int
    n_unmatched: int
    unmatched_examples: list[str]
    n_duplicates_collapsed: int
    count_fraction: float | None
    detected_id_type: str
    vocab_id_type: str
    methods: dict[str, int] = field(default_factory=dict)
    vocab_name: str | None = None

    @property
    def gene_fraction(self) -> float:
        """Share of the data's genes that matched."""
        return self.n_matched / self.n_genes if self.n_genes else 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python dict (JSON-serialisable)."""
        out = asdict(self)
        out["gene_fraction"] = self.gene_fraction
        return out

    def __str__(self) -> str:
        name = f" '{self.vocab_name}'" if self.vocab_name else ""
        lines = [
            f"Gene coverage against vocabulary{name}",
            f"  data genes:        {self.n_genes:,} ({self.detected_id_type})",
            f"  vocabulary ids:    {self.vocab_id_type}",
            f"  matched:           {self.n_matched:,} ({self.gene_fraction:.1%} of genes)",
        ]
        if self.count_fraction is not None:
            lines.append(f"  counts covered:    {self.count_fraction:.1%} of all expression counts")
        lines.append(f"  unmatched:         {self.n_unmatched:,}"
                     + (f" (e.g. {', '.join(self.unmatched_examples[:5])})" if self.unmatched_examples else ""))
        if self.n_duplicates_collapsed:
            lines.append(f"  duplicates:        {self.n_duplicates_collapsed:,} gene(s) share a token with "
                         "an earlier gene (tokenizers sum them)")
        matched_methods = {k: v for k, v in self.methods.items() if k != "unmatched"}
        if matched_methods:
            lines.append("  matched by:        " + ", ".join(f"{k} {v:,}" for k, v in matched_methods.items()))
        return "\n".join(lines)


def coverage_report(
    alignment: GeneAlignment,
    gene_totals: np.ndarray | None = None,
    vocab_name: str | None = None,
) -> CoverageReport:
    """Summarise an alignment; ``gene_totals`` (one total per data gene) gives ``count_fraction``."""
    count_fraction = None
    if gene_totals is not None:
        totals = np.asarray(gene_totals, dtype=np.float64).ravel()
        if totals.size != alignment.n_genes:
            raise InputDataError(
                f"gene_totals has {totals.size} entries but the alignment has {alignment.n_genes} "
                "genes; pass one total per data gene (e.g. scforge.matrix.column_sums(source))."
            )
        total = float(totals.sum())
        if total > 0 and np.isfinite(total):
            count_fraction = float(totals[alignment.token_ids >= 0].sum() / total)
    return CoverageReport(
        n_genes=alignment.n_genes,
        n_matched=alignment.n_matched,
        n_unmatched=alignment.n_unmatched,
        unmatched_examples=alignment.unmatched_examples,
        n_duplicates_collapsed=alignment.n_duplicates,
        count_fraction=count_fraction,
        detected_id_type=alignment.detected.id_type,
        vocab_id_type=alignment.vocab_id_type,
        methods=alignment.method_counts(),
        vocab_name=vocab_name,
    )


def gene_coverage(
    data: Any,
    vocab: Any,
    *,
    gene_col: str | None = None,
    layer: str | None = None,
    use_raw: bool = False,
    species: str = "auto",
    use_synonyms: bool = True,
    ensembl_mapping: Mapping[str, str] | None = None,
    raise_on_zero: bool = True,
) -> CoverageReport:
    """How the genes of ``data`` match ``vocab``, weighted by expression counts.

    ``data`` is an AnnData (in memory or backed) or a :class:`scforge.matrix.ExpressionSource`;
    ``vocab`` a :class:`GeneVocab`, a vocabulary file path, or
    :class:`~scforge.genes.GeneformerDictionaries` (whose ``ensembl_mapping`` is then used unless
    ``ensembl_mapping`` is given). Genes are read from ``var_names`` or ``var[gene_col]``. With
    ``raise_on_zero`` a :class:`~scforge.errors.GeneIdentityError` explains a zero overlap. The
    data are only read, never modified.
    """
    from scforge.genes.geneformer import GeneformerDictionaries
    from scforge.matrix import ExpressionSource, as_source, column_sums

    if isinstance(vocab, GeneformerDictionaries):
        if ensembl_mapping is None:
            ensembl_mapping = vocab.ensembl_mapping
        vocab = vocab.vocab
    elif not isinstance(vocab, GeneVocab):
        vocab = GeneVocab.from_file(vocab)
    source = data if isinstance(data, ExpressionSource) else as_source(data, layer=layer, use_raw=use_raw)
    alignment = align_genes(
        source.gene_names(gene_col), vocab, species=species, use_synonyms=use_synonyms,
        ensembl_mapping=ensembl_mapping,
    )
    if raise_on_zero:
        alignment.require_overlap(where=source.where)
    totals = column_sums(source)
    report = coverage_report(alignment, totals, vocab_name=vocab.name)
    if report.count_fraction is not None and report.count_fraction < 0.5:
        logger.warning(
            "Only %.1f%% of the expression counts of %s fall on genes of the vocabulary (%d of %d "
            "genes matched); model outputs may be unreliable. Check gene_col / species.",
            100 * report.count_fraction, source.where, report.n_matched, report.n_genes,
        )
    return report
