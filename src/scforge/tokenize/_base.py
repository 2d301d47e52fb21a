"""What the three tokenizers share: gene planning, chunked execution, threads and progress."""

from __future__ import annotations

import functools

import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError
from scforge.genes import CoverageReport, GeneAlignment, GeneVocab, align_genes, coverage_report
from scforge.matrix import DEFAULT_CHUNK_SIZE, ExpressionSource, as_source, column_sums, iter_row_chunks
from scforge.tokenize.ragged import TokenizedCells

logger = logging.getLogger("scforge")


@dataclass(frozen=True)
class GenePlan:
    """How the data's columns become token columns.

    ``colmap[j]`` is the output column of data column ``j`` (-1: dropped); output column ``k``
    holds token ``out_tokens[k]``. Several data columns mapped to one token are summed.
    """

    alignment: GeneAlignment
    colmap: np.ndarray
    out_tokens: np.ndarray
    needs_sort: bool

    @property
    def n_out(self) -> int:
        return int(self.out_tokens.size)

    @functools.cached_property
    def merges_columns(self) -> bool:
        """True when two data columns map to the same output column (their counts are summed)."""
        mapped = self.colmap[self.colmap >= 0]
        return bool(np.unique(mapped).size < mapped.size)


def plan_genes(
    alignment: GeneAlignment,
    *,
    order: str = "data",
    keep: np.ndarray | None = None,
    token_space: int | None = None,
) -> GenePlan:
    """Build a :class:`GenePlan` from a gene alignment.

    ``order="data"`` keeps the data's gene order (first occurrence of each token), ``"token"``
    sorts output columns by token id. ``keep`` masks data columns to use (e.g. HVGs). With
    ``token_space=N`` the output columns are the token ids themselves (a fixed panel of N genes).
    """
    token_ids = np.asarray(alignment.token_ids, dtype=np.int64).copy()
    if keep is not None:
        token_ids[~keep] = -1
    matched = np.flatnonzero(token_ids >= 0)
    colmap = np.full(token_ids.size, -1, dtype=np.int64)
    if token_space is not None:
        colmap[matched] = token_ids[matched]
        out_tokens = np.arange(token_space, dtype=np.int64)
        ids = token_ids[matched]
        needs_sort = bool(ids.size and (np.any(np.diff(ids) <= 0)))
        return GenePlan(alignment, colmap, out_tokens, needs_sort)
    ids = token_ids[matched]
    if order == "data" and ids.size and np.bincount(ids).max() == 1:  # common: no two genes share a token
        colmap[matched] = np.arange(ids.size)
        return GenePlan(alignment, colmap, ids, False)
    uniq, first, inverse = np.unique(ids, return_index=True, return_inverse=True)
    if order == "data":
        rank = np.empty(uniq.size, dtype=np.int64)
        rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
        out_tokens = uniq[np.argsort(first, kind="stable")]
        colmap[matched] = rank[inverse]
    elif order == "token":
        out_tokens = uniq
        colmap[matched] = inverse
    else:
        raise ConfigError(f"order must be 'data' or 'token', got {order!r}")
    mapped = colmap[matched]
    needs_sort = bool(mapped.size and np.any(np.diff(mapped) <= 0))
    return GenePlan(alignment, colmap, out_tokens.astype(np.int64), needs_sort)


def resolve_n_jobs(n_jobs: int | None) -> int:
    """``None``/``-1``: all cores (at most 8); otherwise the number given (>= 1)."""
    if n_jobs is None or n_jobs == -1:
        return max(1, min(8, os.cpu_count() or 1))
    if n_jobs < 1:
        raise ConfigError(f"n_jobs must be >= 1, -1 or None, got {n_jobs}")
    return int(n_jobs)


class ChunkTokenizer:
    """Base class: subclasses implement :meth:`_plan` and :meth:`_tokenize_chunk`."""

    name = "base"
    vocab: GeneVocab
    gene_order = "data"

    def __init__(
        self,
        *,
        species: str = "auto",
        use_synonyms: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        n_jobs: int | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
        self.species = species
        self.use_synonyms = use_synonyms
        self.chunk_size = int(chunk_size)
        self.n_jobs = resolve_n_jobs(n_jobs)

    # ---- to override ---------------------------------------------------------------------
    def _ensembl_mapping(self) -> dict[str, str] | None:
        """Id -> canonical id mapping applied before vocabulary lookup (Geneformer's collapse)."""
        return None

    def _align(self, source: ExpressionSource, gene_col: str | None) -> GeneAlignment:
        alignment = align_genes(
            source.gene_names(gene_col),
            self.vocab,
            species=self.species,
            use_synonyms=self.use_synonyms,
            ensembl_mapping=self._ensembl_mapping(),
        )
        alignment.require_overlap(where=source.where)
        return alignment

    def _plan(self, source: ExpressionSource, gene_col: str | None) -> GenePlan:
        return plan_genes(self._align(source, gene_col), order=self.gene_order)

    def _tokenize_chunk(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix
    ) -> TokenizedCells:
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Tokenizer settings recorded in every output's ``meta``."""
        return {"tokenizer": self.name}

    # ---- public --------------------------------------------------------------------------
    def iter_chunks(
        self,
        data: Any,
        *,
        layer: str | None = None,
        gene_col: str | None = None,
        use_raw: bool = False,
        var_names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Iterator[TokenizedCells]:
        """Tokenize chunk by chunk (memory bounded by ``chunk_size``), yielding results in order.

        ``data`` is an AnnData (in memory or ``backed="r"``) or a matrix with ``var_names``.
        """
        source = as_source(data, layer=layer, var_names=var_names, use_raw=use_raw)
        yield from self._run_chunks(source, self._plan(source, gene_col), progress)

    def _run_chunks(self, source: ExpressionSource, plan: GenePlan, progress: bool) -> Iterator[TokenizedCells]:
        chunks: Iterator[tuple[int, int, sp.csr_matrix]] = iter_row_chunks(source, self.chunk_size)
        if progress:
            from tqdm.auto import tqdm

            total = -(-source.n_obs // self.chunk_size)
            chunks = iter(tqdm(chunks, total=total, desc=f"tokenize ({self.name})", unit="chunk"))
        if self.n_jobs == 1:
            for lo, hi, csr in chunks:
                yield self._tokenize_chunk(source, plan, lo, hi, csr)
            return
        # threads: the compiled kernels and numpy's sorts release the GIL; at most n_jobs+1 chunks in flight
        with ThreadPoolExecutor(self.n_jobs) as pool:
            pending: deque = deque()
            for lo, hi, csr in chunks:
                pending.append(pool.submit(self._tokenize_chunk, source, plan, lo, hi, csr))
                if len(pending) > self.n_jobs:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    def _tokenize_whole(self, source: ExpressionSource, plan: GenePlan) -> TokenizedCells | None:
        """A one-call path for a whole in-memory matrix, or None to go chunk by chunk."""
        return None

    def tokenize(
        self,
        data: Any,
        *,
        layer: str | None = None,
        gene_col: str | None = None,
        use_raw: bool = False,
        var_names: Sequence[str] | None = None,
        progress: bool = False,
    ) -> TokenizedCells:
        """Tokenize every cell; returns one :class:`TokenizedCells` (cells in input order)."""
        source = as_source(data, layer=layer, var_names=var_names, use_raw=use_raw)
        plan = self._plan(source, gene_col)
        whole = self._tokenize_whole(source, plan)
        if whole is not None:
            return whole
        return TokenizedCells.concat(list(self._run_chunks(source, plan, progress)))

    def coverage(
        self,
        data: Any,
        *,
        layer: str | None = None,
        gene_col: str | None = None,
        use_raw: bool = False,
        var_names: Sequence[str] | None = None,
    ) -> CoverageReport:
        """How the data's genes match this tokenizer's vocabulary (reads the data once for totals)."""
        source = as_source(data, layer=layer, var_names=var_names, use_raw=use_raw)
        alignment = align_genes(
            source.gene_names(gene_col), self.vocab, species=self.species, use_synonyms=self.use_synonyms,
            ensembl_mapping=self._ensembl_mapping(),
        )
        totals = column_sums(source, self.chunk_size)
        report = coverage_report(alignment, totals, vocab_name=self.vocab.name or self.name)
        return report

    # ---- helpers for subclasses ------------------------------------------------------------
    def _warn_empty_cells(self, lengths: np.ndarray, lo: int, what: str) -> None:
        empty = np.flatnonzero(lengths == 0)
        if empty.size:
            logger.warning(
                "%d cell(s) starting at index %d have no expressed %s (e.g. cell %d); they get %s.",
                empty.size,
                lo,
                "vocabulary genes",
                lo + int(empty[0]),
                what,
            )
