"""Geneformer input: rank value encoding of raw counts.

For each cell: ``x = counts / n_counts * 10,000 / median[gene]`` over the genes of the token
dictionary (duplicates of one Ensembl id summed first), non-zero genes sorted by ``x`` descending,
then the top 2,048 tokens (V1) or ``<cls>`` + top 4,094 + ``<eos>`` (V2).

Tie rule (the reference leaves it to NumPy's unstable quicksort): genes with exactly equal ``x``
are ordered by ascending token id, so the result does not depend on the data's gene order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError, VocabularyError
from scforge.genes import GeneformerDictionaries, load_geneformer_dictionaries
from scforge.matrix import ExpressionSource, check_values, require_counts
from scforge.tokenize import _kernels as K
from scforge.tokenize._base import ChunkTokenizer, GenePlan, plan_genes
from scforge.tokenize.ragged import TokenizedCells, compact

# compiled per-cell kernels (numba); the NumPy path gives identical results (tests switch)
USE_COMPILED = True


class RankValueTokenizer(ChunkTokenizer):
    """Tokenize raw counts for Geneformer (``TranscriptomeTokenizer`` semantics).

    Parameters
    ----------
    dictionaries
        :class:`~scforge.genes.GeneformerDictionaries` or a folder holding the token, median and
        mapping pickles (V1 or V2; read with a restricted unpickler).
    model_input_size
        Longest sequence including special tokens: 2,048 (V1) or 4,096 (V2) by default.
    special_tokens
        Wrap in ``<cls>`` ... ``<eos>``; default True for V2 dictionaries, False for V1.
    collapse_gene_ids
        Map ids through the dictionary's Ensembl mapping and sum duplicates (the reference default).
    n_counts_key
        ``obs`` column with each cell's total counts over all genes; computed from the data
        when the column is absent.
    target_sum
        Normalization target (10,000 in Geneformer).
    """

    name = "geneformer-rank"
    gene_order = "token"

    def __init__(
        self,
        dictionaries: GeneformerDictionaries | str | Path,
        *,
        model_input_size: int | None = None,
        special_tokens: bool | None = None,
        collapse_gene_ids: bool = True,
        n_counts_key: str | None = "n_counts",
        target_sum: float = 10_000.0,
        species: str = "auto",
        use_synonyms: bool = True,
        chunk_size: int = 2048,
        n_jobs: int | None = None,
    ) -> None:
        super().__init__(species=species, use_synonyms=use_synonyms, chunk_size=chunk_size, n_jobs=n_jobs)
        if not isinstance(dictionaries, GeneformerDictionaries):
            dictionaries = load_geneformer_dictionaries(dictionaries)
        self.dictionaries = dictionaries
        self.vocab = dictionaries.vocab
        v2 = dictionaries.version == "V2"
        self.special_tokens = v2 if special_tokens is None else bool(special_tokens)
        self.model_input_size = int(model_input_size or (4096 if v2 else 2048))
        n_special = 2 if self.special_tokens else 0
        if self.model_input_size <= n_special:
            raise ConfigError(f"model_input_size must exceed {n_special}, got {self.model_input_size}")
        self.cls_id = self.vocab.special_id("cls") if self.special_tokens else None
        self.eos_id = self.vocab.special_id("eos") if self.special_tokens else None
        self.pad_id = self.vocab.special_id("pad")
        self.collapse_gene_ids = collapse_gene_ids
        self.n_counts_key = n_counts_key
        self.target_sum = float(target_sum)
        self._medians = self._median_table()

    def _median_table(self) -> np.ndarray:
        """Median of every token id (NaN for specials)."""
        medians = np.full(len(self.vocab), np.nan)
        ids = self.vocab.lookup(list(self.dictionaries.medians.keys()))
        vals = np.fromiter(self.dictionaries.medians.values(), dtype=np.float64, count=ids.size)
        ok = ids >= 0
        medians[ids[ok]] = vals[ok]
        genes = self.vocab.lookup(self.vocab.gene_tokens)
        missing = genes[~np.isfinite(medians[genes]) | (medians[genes] <= 0)]
        if missing.size:
            raise VocabularyError(
                f"{missing.size} genes of the Geneformer token dictionary have no positive median "
                f"in the median dictionary (e.g. {self.vocab.token(int(missing[0]))}). Use the "
                "median file that belongs to this token dictionary (same V1/V2 version)."
            )
        return medians

    def settings(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "version": self.dictionaries.version,
            "model_input_size": self.model_input_size,
            "special_tokens": self.special_tokens,
            "collapse_gene_ids": self.collapse_gene_ids,
            "target_sum": self.target_sum,
            "pad_id": self.pad_id,
            "cls_id": self.cls_id,
            "eos_id": self.eos_id,
            "vocab_size": len(self.vocab),
        }

    def _ensembl_mapping(self) -> dict[str, str] | None:
        return self.dictionaries.ensembl_mapping if self.collapse_gene_ids else None

    def _plan(self, source: ExpressionSource, gene_col: str | None) -> GenePlan:
        n_counts = source.obs_column(self.n_counts_key) if self.n_counts_key is not None else None
        if n_counts is not None:
            n_counts = np.asarray(n_counts, dtype=np.float64)
            if not np.all(np.isfinite(n_counts)) or np.any(n_counts < 0):
                raise InputDataError(
                    f"obs[{self.n_counts_key!r}] has missing, infinite or negative totals. Recompute "
                    "it as the sum of raw counts over all genes, or pass n_counts_key=None."
                )
        return plan_genes(self._align(source, gene_col), order=self.gene_order)

    def _tokenize_whole(self, source: ExpressionSource, plan: GenePlan) -> TokenizedCells | None:
        """In-memory CSR: one parallel compiled call over all cells, straight into the output."""
        matrix = source.matrix
        if not (USE_COMPILED and sp.issparse(matrix) and matrix.format == "csr" and matrix.has_canonical_format
                and _compiled_dtype(matrix)):
            return None
        column = source.obs_column(self.n_counts_key) if self.n_counts_key is not None else None
        n_counts = None if column is None else np.asarray(column, dtype=np.float64)
        return self._rank_compiled(source, plan, matrix, 0, n_counts, self.n_jobs)

    def _rank_compiled(
        self, source: ExpressionSource, plan: GenePlan, csr: sp.csr_matrix, lo: int, n_counts: np.ndarray | None,
        n_jobs: int,
    ) -> TokenizedCells | None:
        """Rank the cells of a canonical CSR block (cells ``lo``...) in one compiled call, straight into an
        output sized exactly beforehand; None when a cell is refused here but not by the NumPy path."""
        import numba

        from scforge.tokenize import _compiled

        n_rows = csr.shape[0]
        column_tokens = np.where(plan.colmap >= 0, plan.out_tokens[np.maximum(plan.colmap, 0)], -1).astype(np.int32)
        # medians of each column's token, then those of shared tokens at -1 - token
        column_medians = np.concatenate([
            np.where(column_tokens >= 0, self._medians[np.maximum(column_tokens, 0)], np.nan),
            self._medians[::-1] if plan.merges_columns else np.zeros(0),
        ])
        if plan.merges_columns:  # columns sharing a token are marked -2 - token: the kernels sum them
            matched = column_tokens >= 0
            counts = np.bincount(column_tokens[matched], minlength=len(self.vocab))
            shared = matched & (counts[np.maximum(column_tokens, 0)] > 1)
            column_tokens[shared] = -2 - column_tokens[shared]
        n_special = 2 if self.special_tokens else 0
        limit = self.model_input_size - n_special
        max_row = int(np.diff(csr.indptr).max(initial=0))
        index_bits, token_bits = _entry_layout(max_row, len(self.vocab))
        if index_bits + token_bits > 40:  # sort keys would be too coarse: the NumPy path ranks such data
            return None
        threads = max(1, min(n_jobs, numba.config.NUMBA_NUM_THREADS))
        n_blocks = max(1, min(n_rows, threads * 4))
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            # exact lengths first: fresh memory is costly to touch, so the output is allocated once
            kept = np.empty(n_rows, dtype=np.int64)
            _compiled.kept_lengths(csr.indptr, csr.data, csr.indices, column_tokens, len(self.vocab), max_row,
                                   n_blocks, kept)
            reserved = np.minimum(kept, limit) + n_special
            offsets = np.zeros(n_rows + 1, dtype=np.int64)
            np.cumsum(reserved, out=offsets[1:])
            out = np.empty(int(offsets[-1]), dtype=np.int32)
            written = np.empty(n_rows, dtype=np.int64)
            bad = np.empty(n_rows, dtype=np.int8)
            _compiled.rank_matrix(
                csr.indptr, csr.data, csr.indices, column_tokens, column_medians, 1.0 / column_medians,
                np.zeros(0) if n_counts is None else n_counts, n_counts is not None,
                self.target_sum, limit, offsets, self.special_tokens, -1 if self.cls_id is None else self.cls_id,
                -1 if self.eos_id is None else self.eos_id, out, written, bad, n_blocks, max_row, len(self.vocab),
                index_bits, token_bits,
            )
        finally:
            numba.set_num_threads(previous)
        if bad.any():  # the NumPy path raises the precise error for the first offending cell
            r = int(np.flatnonzero(bad)[0])
            self._rank_numpy(source, plan, lo + r, lo + r + 1, sp.csr_matrix(csr[r : r + 1]))
            return None  # the NumPy path accepts the cell: let it tokenize everything
        self._warn_empty_cells(written, lo, "<cls> <eos> only" if self.special_tokens else "an empty sequence")
        if not np.array_equal(written + n_special, reserved):  # a safety net: the kernel writes what was counted
            offsets, out = compact(offsets, written + n_special, out, n_jobs=threads)
        return TokenizedCells(
            offsets=offsets, gene_ids=out, values=None, obs_names=source.obs_names_range(lo, lo + n_rows),
            meta=self.settings(),
        )

    def _tokenize_chunk(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix
    ) -> TokenizedCells:
        if USE_COMPILED and _compiled_dtype(csr):  # chunks already run in parallel threads: one thread each
            if not csr.has_canonical_format:
                csr = csr.copy()  # never the caller's matrix
                csr.sum_duplicates()
            column = source.obs_column(self.n_counts_key) if self.n_counts_key is not None else None
            n_counts = None if column is None else np.asarray(column[lo:hi], dtype=np.float64)
            ranked = self._rank_compiled(source, plan, csr, lo, n_counts, 1)
            if ranked is not None:
                return ranked
        return self._rank_numpy(source, plan, lo, hi, csr)

    def _rank_numpy(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix
    ) -> TokenizedCells:
        """The NumPy path (the readable reference of the compiled one; it also words the errors)."""
        check_values(csr, source.where, (lo, hi))
        require_counts(csr, source.where, (lo, hi))
        column = source.obs_column(self.n_counts_key) if self.n_counts_key is not None else None
        if column is not None:
            n_counts = np.asarray(column[lo:hi], dtype=np.float64)
        else:  # over all genes of the data, as Geneformer asks of its users
            n_counts = np.asarray(csr.sum(axis=1, dtype=np.float64)).ravel()
        # ties are ordered by token id in _rank, so entries need sorting only to sum duplicate genes
        m = K.remap_columns(csr, plan.colmap, plan.n_out, plan.merges_columns)
        if m.nnz and not m.data.all():  # stored zeros are not expressed genes (never the caller's matrix)
            m = m.copy()
            m.eliminate_zeros()
        lengths = np.diff(m.indptr)
        if np.any((n_counts <= 0) & (lengths > 0)):
            bad = lo + int(np.flatnonzero((n_counts <= 0) & (lengths > 0))[0])
            raise InputDataError(
                f"Cell {bad} of {source.where} has expressed genes but n_counts <= 0. Fix "
                f"obs[{self.n_counts_key!r}] (total raw counts per cell) or drop the column."
            )
        tokens = plan.out_tokens[m.indices]
        n_special = 2 if self.special_tokens else 0
        limit = self.model_input_size - n_special
        ranked, kept = self._rank(m, tokens, n_counts, limit)
        self._warn_empty_cells(kept, lo, "<cls> <eos> only" if self.special_tokens else "an empty sequence")
        n_rows = hi - lo
        offsets = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(kept + n_special, out=offsets[1:])
        out = np.empty(int(offsets[-1]), dtype=np.int32)
        shift = 1 if self.special_tokens else 0
        dest = np.arange(ranked.size, dtype=np.int64) + np.repeat(np.arange(n_rows, dtype=np.int64) * n_special + shift, kept)
        out[dest] = ranked
        if self.special_tokens:
            out[offsets[:-1]] = self.cls_id
            out[offsets[1:] - 1] = self.eos_id
        return TokenizedCells(
            offsets=offsets,
            gene_ids=out,
            values=None,
            obs_names=source.obs_names_range(lo, hi),
            meta=self.settings(),
        )

    def _rank(
        self, m: sp.csr_matrix, tokens: np.ndarray, n_counts: np.ndarray, limit: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Tokens of every cell in rank order, the first ``limit`` per cell, and their counts.

        Score ``counts / n_counts * target_sum / median``; descending; equal scores in ascending
        token id, whatever the order of the entries.
        """
        lengths = np.diff(m.indptr)
        rows = K.row_index(m.indptr)
        x = m.data.astype(np.float64) / np.repeat(n_counts, lengths) * self.target_sum / self._medians[tokens]
        order = np.lexsort((tokens, -x, rows))  # equal scores: ascending token id
        rank = np.arange(order.size, dtype=np.int64) - np.repeat(m.indptr[:-1].astype(np.int64), lengths)
        keep = rank < limit
        return tokens[order][keep], np.minimum(lengths, limit)


def _entry_layout(max_row: int, vocab_size: int) -> tuple[int, int]:
    """Bits of a packed entry of the compiled ranker for its index within the cell (shared tokens come after
    the cell's stored entries, so below ``2 * max_row``) and for its token; the sort key gets the rest."""
    return max(1, (2 * max_row).bit_length()), max(1, (vocab_size - 1).bit_length())


def _compiled_dtype(csr: sp.csr_matrix) -> bool:
    """Whether the compiled kernels take this matrix's values (integers, float32 and float64)."""
    return csr.dtype.kind in "iu" or csr.dtype in (np.float32, np.float64)
