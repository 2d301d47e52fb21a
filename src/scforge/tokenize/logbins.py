"""scBERT input: log2 expression bins over a fixed, ordered gene panel.

As in scBERT's ``preprocess.py`` and datasets: counts are placed in the panel's gene order (genes
absent from the data stay 0), normalized to 10,000 over the panel genes, ``log2(1 + x)``, and the
token is ``floor(min(x, 5))``; a trailing 0 is appended (the extra 16,907th position). Token 6 is
``<mask>``. scBERT also drops cells with fewer than 200 genes; a tokenizer never drops cells, so
this one only warns about them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError
from scforge.genes import GeneVocab
from scforge.matrix import ExpressionSource, check_values, require_counts
from scforge.tokenize import _kernels as K
from scforge.tokenize._base import ChunkTokenizer, GenePlan, plan_genes
from scforge.tokenize.ragged import TokenizedCells

logger = logging.getLogger("scforge")


class LogBinTokenizer(ChunkTokenizer):
    """Tokenize raw counts for scBERT over a fixed gene panel.

    Parameters
    ----------
    gene_panel
        The ordered panel (16,906 symbols for the published model): a :class:`GeneVocab` without
        specials, a list of symbols, or a file (one gene per line, or any vocab format).
    max_bin
        Highest expression token (5 in scBERT, i.e. ``CLASS - 2``).
    target_sum, log_base
        Normalization target and logarithm base (10,000 and 2 in scBERT).
    append_zero
        Append the trailing position with token 0 (scBERT's sequence length is panel + 1).
    min_genes
        Warn about cells with fewer expressed panel genes (scBERT filters them out).
    """

    name = "scbert-logbins"

    def __init__(
        self,
        gene_panel: GeneVocab | Sequence[str] | str | Path,
        *,
        max_bin: int = 5,
        target_sum: float = 1e4,
        log_base: float = 2.0,
        append_zero: bool = True,
        mask_id: int | None = None,
        min_genes: int = 200,
        species: str = "auto",
        use_synonyms: bool = True,
        chunk_size: int = 1024,
        n_jobs: int | None = None,
    ) -> None:
        super().__init__(species=species, use_synonyms=use_synonyms, chunk_size=chunk_size, n_jobs=n_jobs)
        if isinstance(gene_panel, GeneVocab):
            self.vocab = gene_panel
        elif isinstance(gene_panel, (str, Path)):
            self.vocab = GeneVocab.from_file(gene_panel)
        else:
            self.vocab = GeneVocab.from_gene_list(list(gene_panel))
        if self.vocab.specials:
            raise ConfigError(
                "scBERT's gene panel is a plain ordered gene list; this vocabulary has special "
                f"tokens {sorted(self.vocab.specials)}. Pass the panel genes only."
            )
        if not 1 <= max_bin <= 254:
            raise ConfigError(f"max_bin must be in 1..254, got {max_bin}")
        self.max_bin = int(max_bin)
        self.target_sum = float(target_sum)
        self.log_base = float(log_base)
        self.append_zero = append_zero
        self.mask_id = self.max_bin + 1 if mask_id is None else int(mask_id)
        self.min_genes = int(min_genes)

    @property
    def seq_len(self) -> int:
        return len(self.vocab) + (1 if self.append_zero else 0)

    def settings(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "max_bin": self.max_bin,
            "num_tokens": self.max_bin + 2,
            "mask_id": self.mask_id,
            "pad_id": self.mask_id,
            "pad_value": self.mask_id,
            "target_sum": self.target_sum,
            "log_base": self.log_base,
            "append_zero": self.append_zero,
            "seq_len": self.seq_len,
            "panel_size": len(self.vocab),
        }

    def _plan(self, source: ExpressionSource, gene_col: str | None) -> GenePlan:
        return plan_genes(self._align(source, gene_col), token_space=len(self.vocab))

    def _tokenize_chunk(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix
    ) -> TokenizedCells:
        check_values(csr, source.where, (lo, hi))
        require_counts(csr, source.where, (lo, hi))
        m = K.remap_columns(csr, plan.colmap, plan.n_out, plan.needs_sort)
        x = K.normalize_total_csr(m, self.target_sum)
        np.log1p(x, out=x)
        np.divide(x, np.log(self.log_base), out=x)  # scanpy's log1p(base=...) arithmetic
        tokens = np.floor(np.minimum(x, self.max_bin)).astype(np.uint8)
        n_rows = hi - lo
        lengths = np.diff(m.indptr)
        few = int(np.sum(lengths < self.min_genes))
        if few:
            logger.warning(
                "%d of %d cells (from index %d) express fewer than %d panel genes; scBERT's "
                "preprocessing drops such cells.", few, n_rows, lo, self.min_genes,
            )
        width = self.seq_len
        dense = np.zeros((n_rows, width), dtype=np.uint8)
        dense[K.row_index(m.indptr), m.indices] = tokens
        return TokenizedCells(
            offsets=np.arange(n_rows + 1, dtype=np.int64) * width,
            gene_ids=None,
            values=dense.ravel(),
            obs_names=source.obs_names_range(lo, hi),
            meta=self.settings(),
        )
