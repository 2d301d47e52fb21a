"""Gene identity: model vocabularies, id-type detection, name mapping and coverage reports.

>>> from scforge.genes import GeneVocab, align_genes, gene_coverage   # doctest: +SKIP
>>> vocab = GeneVocab.from_file("vocab.json")                          # doctest: +SKIP
>>> print(gene_coverage(adata, vocab))                                 # doctest: +SKIP

Reference tables (HGNC, MGI, Ensembl 105 orthologs) ship in ``scforge/genes/tables`` and are read
on first use only.
"""

from __future__ import annotations

from scforge.genes.coverage import CoverageReport, coverage_report, gene_coverage
from scforge.genes.geneformer import GeneformerDictionaries, load_geneformer_dictionaries
from scforge.genes.idtypes import IdTypeGuess, detect_id_type
from scforge.genes.mapping import (
    GeneAlignment,
    align_genes,
    human_to_mouse,
    map_ensembl_to_symbols,
    map_symbols_to_ensembl,
    mouse_to_human,
    strip_version,
)
from scforge.genes.text import (
    GeneTextEmbeddings,
    default_text_model,
    embed_gene_texts,
    gene_texts,
    go_gene_embeddings,
    read_genept_pickle,
)
from scforge.genes.vocab import GeneVocab, TokenNotFoundError

__all__ = [
    "GeneVocab",
    "TokenNotFoundError",
    "GeneformerDictionaries",
    "load_geneformer_dictionaries",
    "IdTypeGuess",
    "detect_id_type",
    "GeneAlignment",
    "align_genes",
    "strip_version",
    "map_symbols_to_ensembl",
    "map_ensembl_to_symbols",
    "mouse_to_human",
    "human_to_mouse",
    "CoverageReport",
    "coverage_report",
    "gene_coverage",
    "GeneTextEmbeddings",
    "read_genept_pickle",
    "gene_texts",
    "embed_gene_texts",
    "go_gene_embeddings",
    "default_text_model",
]
