"""scGPT input: per-cell quantile value bins over non-zero genes, ``<cls>`` first.

Faithful to scGPT's ``Preprocessor`` (normalize_total, log1p, ``binning``) and
``tokenize_and_pad_batch``: bin edges are ``np.quantile(nonzeros, linspace(0, 1, n_bins - 1))``
per cell, bit for bit, and a value on tied edges gets a uniformly random bin between the two
``np.digitize`` results (``ties="random"``, the published rule) or the left one (``ties="left"``).
Randomness is keyed by (seed, cell, gene), so results do not depend on chunking or threads.
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
from scforge.matrix import ExpressionSource, check_values, looks_like_counts
from scforge.tokenize import _kernels as K
from scforge.tokenize._base import ChunkTokenizer, GenePlan, plan_genes
from scforge.tokenize.ragged import TokenizedCells, compact

logger = logging.getLogger("scforge")

_TIE_STREAM = 0
_SUBSAMPLE_STREAM = 1
# compiled per-cell kernels (numba); the NumPy kernels give identical results and are kept as the
# readable reference (tests switch between them)
USE_COMPILED = True


class BinnedTokenizer(ChunkTokenizer):
    """Tokenize expression for scGPT.

    Parameters
    ----------
    vocab
        The model's gene vocabulary (needs ``<cls>`` and ``<pad>`` specials), or a path to it.
    n_bins
        Number of bins including bin 0 for zeros (scGPT: 51). ``None`` keeps the continuous
        (normalized / log1p) values instead of bins, as scGPT's perturbation model uses.
    normalize_total
        Target sum for per-cell normalization before binning (``None`` to skip). Totals are taken
        over the genes that match the vocabulary, as in scGPT's tutorials.
    log1p
        Apply ``log1p`` after normalization. Binning is per-cell quantile based, so these two steps
        only change which values tie; they are kept for exact parity with the reference.
    cls_value
        Value of the ``<cls>`` token: 0 as in ``tokenize_and_pad_batch`` (fine-tuning tutorials),
        or the pad value -2 as in pretraining and ``embed_data``.
    include_zero_gene
        Emit every vocabulary gene of the data (zeros get bin 0), as scGPT's integration recipe.
    max_len
        Longest sequence including ``<cls>``; longer cells keep a seeded random subset of genes
        (listed in data order, unlike the reference which lists them in sampled order).
    ties
        ``"random"`` (the published rule) or ``"left"`` (deterministic: ``np.digitize`` result).
    genes
        Restrict to these gene names (e.g. HVGs from :func:`scforge.tokenize.select_hvg`).
    seed
        Seed of the tie-breaking and subsampling randomness.
    pad_value, mask_value
        Recorded in the output (``meta``) and used when padding batches.
    """

    name = "scgpt-binned"
    gene_order = "data"

    def __init__(
        self,
        vocab: GeneVocab | str | Path,
        *,
        n_bins: int | None = 51,
        normalize_total: float | None = 1e4,
        log1p: bool = True,
        cls_value: float = 0.0,
        append_cls: bool = True,
        include_zero_gene: bool = False,
        max_len: int | None = None,
        ties: str = "random",
        genes: Sequence[str] | None = None,
        seed: int = 0,
        pad_value: float = -2.0,
        mask_value: float = -1.0,
        species: str = "auto",
        use_synonyms: bool = True,
        chunk_size: int = 2048,
        n_jobs: int | None = None,
    ) -> None:
        super().__init__(species=species, use_synonyms=use_synonyms, chunk_size=chunk_size, n_jobs=n_jobs)
        self.vocab = vocab if isinstance(vocab, GeneVocab) else GeneVocab.from_file(vocab)
        if n_bins is not None and not 3 <= n_bins <= 1 << 16:
            raise ConfigError(f"n_bins must be between 3 (bin 0 is reserved for zeros) and 65,536, got {n_bins}")
        if ties not in ("random", "left"):
            raise ConfigError(f"ties must be 'random' or 'left', got {ties!r}")
        if normalize_total is not None and not normalize_total > 0:
            raise ConfigError(f"normalize_total must be > 0 or None, got {normalize_total}")
        min_len = 2 if append_cls else 1
        if max_len is not None and max_len < min_len:
            raise ConfigError(f"max_len must be >= {min_len}, got {max_len}")
        self.n_bins = n_bins
        self.normalize_total = normalize_total
        self.log1p = log1p
        self.cls_value = float(cls_value)
        self.append_cls = append_cls
        self.include_zero_gene = include_zero_gene
        self.max_len = max_len
        self.ties = ties
        self.genes = None if genes is None else list(genes)
        self.seed = int(seed)
        self.pad_value = float(pad_value)
        self.mask_value = float(mask_value)
        self.pad_id = self.vocab.special_id("pad")
        self.cls_id = self.vocab.special_id("cls") if append_cls else None

    def settings(self) -> dict[str, Any]:
        return {
            "tokenizer": self.name,
            "n_bins": self.n_bins,
            "normalize_total": self.normalize_total,
            "log1p": self.log1p,
            "cls_value": self.cls_value,
            "append_cls": self.append_cls,
            "include_zero_gene": self.include_zero_gene,
            "max_len": self.max_len,
            "ties": self.ties,
            "seed": self.seed,
            "pad_id": self.pad_id,
            "cls_id": self.cls_id,
            "pad_value": self.pad_value,
            "mask_value": self.mask_value,
            "vocab_size": len(self.vocab),
        }

    def _plan(self, source: ExpressionSource, gene_col: str | None) -> GenePlan:
        alignment = self._align(source, gene_col)
        keep = None
        if self.genes is not None:
            keep = np.isin(source.gene_names(gene_col), np.asarray(self.genes, dtype=str))
            if not keep.any():
                raise ConfigError(
                    f"None of the {len(self.genes)} genes given in genes=... is in {source.where}. "
                    "Pass names from the same gene column (gene_col) as the data."
                )
        plan = plan_genes(alignment, order=self.gene_order, keep=keep)
        if plan.n_out == 0:
            raise ConfigError(
                "No gene is left after restricting to genes=... and matching the vocabulary."
            )
        if self.log1p and source.n_obs:
            probe = next(iter(_probe(source)))
            if probe.data.size and not looks_like_counts(probe) and probe.data.max() <= 30:
                logger.warning(
                    "%s looks log-transformed already (non-integer values, max %.3g) and log1p=True "
                    "applies log1p again. Binning is per-cell quantile based, so bins barely change, "
                    "but pass log1p=False (and normalize_total=None) for normalized input.",
                    source.where,
                    float(probe.data.max()),
                )
        return plan

    # ---- the hot path ---------------------------------------------------------------------
    def _tokenize_whole(self, source: ExpressionSource, plan: GenePlan) -> TokenizedCells | None:
        """In-memory CSR: one parallel compiled call over all cells, straight into the output."""
        matrix = source.matrix
        if not (
            USE_COMPILED and self.n_bins is not None and not self.include_zero_gene and not plan.needs_sort
            and sp.issparse(matrix) and matrix.format == "csr" and matrix.dtype in (np.float32, np.float64)
            and matrix.has_canonical_format
        ):
            return None
        import numba

        from scforge.tokenize import _compiled

        column_tokens = np.where(plan.colmap >= 0, plan.out_tokens[np.maximum(plan.colmap, 0)], -1)
        n_rows = matrix.shape[0]
        extra = 1 if self.append_cls else 0
        limit = self._gene_limit()
        threads = max(1, min(self.n_jobs, numba.config.NUMBA_NUM_THREADS))
        lengths = np.diff(matrix.indptr).astype(np.int64)
        if np.any(plan.colmap < 0):  # unmatched genes: count what each cell keeps (touching fresh
            # output memory costs more than this pass; stored zeros, rare, leave gaps compacted below)
            reserved = np.empty(n_rows, dtype=np.int64)
            _compiled.kept_lengths(matrix.indptr, matrix.data, matrix.indices, column_tokens, 1,
                                   int(lengths.max(initial=0)), min(n_rows, threads * 4), reserved)
        else:
            reserved = lengths.copy()
        if limit is not None:
            np.minimum(reserved, limit, out=reserved)
        offsets, gene_out, value_out = self._output_arrays(reserved, write_cls=False)  # the kernel writes <cls>
        written = np.zeros(n_rows, dtype=np.int64)
        bad = np.zeros(n_rows, dtype=np.int8)
        edges = np.empty((n_rows, self.n_bins - 1), dtype=np.float64)
        previous = numba.get_num_threads()
        numba.set_num_threads(threads)
        try:
            _compiled.bin_matrix(
                matrix.indptr, matrix.data, matrix.indices, column_tokens, *self._kernel_settings(),
                np.uint64(K.hash_salt(self.seed, _SUBSAMPLE_STREAM)),
                np.iinfo(np.int64).max if limit is None else int(limit), offsets, self.append_cls,
                -1 if self.cls_id is None else self.cls_id, self.cls_value, value_out, gene_out, edges,
                min(n_rows, threads * 4), int(lengths.max(initial=0)), written, bad,
            )
        finally:
            numba.set_num_threads(previous)
        if bad.any():  # raise the precise error for the first offending cell
            first = int(np.flatnonzero(bad)[0])
            check_values(sp.csr_matrix(matrix[first : first + 1]), source.where, (first, first + 1))
        self._warn_empty_cells(written, 0, "only <cls>" if self.append_cls else "no tokens")
        if not np.array_equal(written, reserved):
            offsets, gene_out, value_out = compact(offsets, written + extra, gene_out, value_out, n_jobs=threads)
        return TokenizedCells(
            offsets=offsets, gene_ids=gene_out, values=value_out,
            obs_names=source.obs_names_range(0, n_rows), meta=self.settings(),
        )

    def _tokenize_chunk(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix
    ) -> TokenizedCells:
        m = self._aligned(source, plan, lo, hi, csr)
        indptr = m.indptr.astype(np.int64)
        lengths = np.diff(indptr)
        self._warn_empty_cells(lengths, lo, "only <cls>" if self.append_cls else "no tokens")
        limit = self._gene_limit()
        needs_subsample = limit is not None and lengths.max(initial=0) > limit
        if USE_COMPILED and self.n_bins is not None and not self.include_zero_gene and not needs_subsample:
            return self._tokenize_direct(source, plan, lo, hi, m, lengths)
        tokens = plan.out_tokens[m.indices]
        if self.n_bins is not None:
            values, _ = self._bins(m, lo, plan.out_tokens)
        else:
            values = K.scale_values(m.data, K.row_index(m.indptr), self._factors(m), self.log1p).astype(np.float32)
        if self.include_zero_gene:
            tokens, values, indptr = _with_zeros(plan, m, values)
            lengths = np.diff(indptr)
            needs_subsample = limit is not None and lengths.max(initial=0) > limit
        if needs_subsample:
            keep = self._subsample(indptr, lo, tokens, limit)
            tokens, values = tokens[keep], values[keep]
            lengths = np.minimum(lengths, limit)
        return self._assemble(source, lo, hi, tokens, values, lengths)

    def _tokenize_direct(
        self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, m: sp.csr_matrix, lengths: np.ndarray
    ) -> TokenizedCells:
        """Compiled kernel writing bins and tokens straight into the output (the common case)."""
        offsets, gene_out, value_out = self._output_arrays(lengths)
        self._run_bin_kernel(m, lo, plan.out_tokens, value_out, gene_out, 1 if self.append_cls else 0)
        return TokenizedCells(
            offsets=offsets, gene_ids=gene_out, values=value_out,
            obs_names=source.obs_names_range(lo, hi), meta=self.settings(),
        )

    def _output_arrays(self, lengths: np.ndarray, *, write_cls: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Offsets and output arrays for cells of ``lengths`` genes (and ``<cls>``, written here when
        ``write_cls``; the whole-matrix kernel writes it itself)."""
        extra = 1 if self.append_cls else 0
        offsets = np.zeros(lengths.size + 1, dtype=np.int64)
        np.cumsum(lengths + extra, out=offsets[1:])
        gene_out = np.empty(int(offsets[-1]), dtype=np.int32)
        value_out = np.empty(int(offsets[-1]), dtype=np.float32)
        if extra and write_cls:
            gene_out[offsets[:-1]] = self.cls_id
            value_out[offsets[:-1]] = self.cls_value
        return offsets, gene_out, value_out

    def _run_bin_kernel(
        self, m: sp.csr_matrix, lo: int, column_tokens: np.ndarray, values: np.ndarray, genes: np.ndarray, shift: int
    ) -> np.ndarray:
        """Run the compiled binning kernel on an aligned chunk; returns the cells' bin edges."""
        from scforge.tokenize import _compiled

        edges = np.empty((m.shape[0], self.n_bins - 1), dtype=np.float64)
        _compiled.bin_chunk(
            m.indptr, m.data, m.indices, column_tokens, *self._kernel_settings(), lo, edges, values, genes, shift,
        )
        return edges

    def _kernel_settings(self) -> tuple:
        """Arguments every compiled binning kernel takes: quantile levels, normalization, ties, salt."""
        return (
            np.linspace(0, 1, self.n_bins - 1), float(self.normalize_total or 0.0),
            self.normalize_total is not None, self.log1p, self.ties == "random",
            np.uint64(K.hash_salt(self.seed, _TIE_STREAM)),
        )

    def _gene_limit(self) -> int | None:
        """Most genes a cell keeps (``max_len`` minus the ``<cls>`` slot), or None."""
        return None if self.max_len is None else self.max_len - (1 if self.append_cls else 0)

    def _aligned(self, source: ExpressionSource, plan: GenePlan, lo: int, hi: int, csr: sp.csr_matrix) -> sp.csr_matrix:
        """Checked, vocabulary-aligned chunk."""
        check_values(csr, source.where, (lo, hi))
        return K.remap_columns(csr, plan.colmap, plan.n_out, plan.needs_sort)

    def _factors(self, m: sp.csr_matrix) -> np.ndarray | None:
        """Per-cell normalization factors (scanpy's normalize_total), or None."""
        if self.normalize_total is None:
            return None
        return K.row_factors(m.data, m.indptr, self.normalize_total)

    def _bins(self, m: sp.csr_matrix, lo: int, column_tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bin of every stored entry (float32) and each cell's edges ``[cells, n_bins - 1]``."""
        n_edges = self.n_bins - 1
        if USE_COMPILED:
            values = np.empty(m.data.size, dtype=np.float32)
            edges = self._run_bin_kernel(m, lo, column_tokens, values, np.empty(0, dtype=np.int32), 0)
            return values, edges
        tokens = column_tokens[m.indices]
        left, right, edges = K.bin_limits(m.data, m.indptr, n_edges, factors=self._factors(m), log1p=self.log1p)
        if self.ties == "random":
            # the reference's rule ceil(r * (right - left) + left), r ~ U[0, 1), written as
            # left - floor(r * (left - right)): untied values (left == right) stay exactly left
            r = K.row_hash_uniform(self.seed, _TIE_STREAM, lo, m.indptr, tokens)
            left -= np.floor(r * (left - right)).astype(np.int64)
        return left.astype(np.float32), edges

    def _subsample(self, indptr: np.ndarray, lo: int, tokens: np.ndarray, limit: int) -> np.ndarray:
        """Mask keeping a seeded random ``limit`` entries of every longer cell (data order kept)."""
        r = K.row_hash_uniform(self.seed, _SUBSAMPLE_STREAM, lo, indptr, tokens)
        order = (r * 4294967296.0).astype(np.int64)
        return K.take_first_k_per_row(K.row_index(indptr), indptr, order, limit)

    def _assemble(
        self,
        source: ExpressionSource,
        lo: int,
        hi: int,
        tokens: np.ndarray,
        values: np.ndarray,
        lengths: np.ndarray,
    ) -> TokenizedCells:
        n_rows = hi - lo
        extra = 1 if self.append_cls else 0
        offsets, gene_out, value_out = self._output_arrays(lengths)
        dest = np.arange(tokens.size, dtype=np.int64) + np.repeat(np.arange(n_rows, dtype=np.int64) * extra + extra, lengths)
        gene_out[dest] = tokens
        value_out[dest] = values
        return TokenizedCells(
            offsets=offsets,
            gene_ids=gene_out,
            values=value_out,
            obs_names=source.obs_names_range(lo, hi),
            meta=self.settings(),
        )

    def bin_edges(self, data: Any, *, layer: str | None = None, gene_col: str | None = None,
                  use_raw: bool = False, var_names: Sequence[str] | None = None) -> np.ndarray:
        """Per-cell bin edges ``[n_cells, n_bins - 1]`` (scGPT's ``obsm['bin_edges']`` without its leading 0)."""
        from scforge.matrix import as_source, iter_row_chunks

        if self.n_bins is None:
            raise ConfigError("bin_edges needs n_bins (this tokenizer keeps continuous values).")
        source = as_source(data, layer=layer, var_names=var_names, use_raw=use_raw)
        plan = self._plan(source, gene_col)
        out = np.zeros((source.n_obs, self.n_bins - 1), dtype=np.float64)
        for lo, hi, csr in iter_row_chunks(source, self.chunk_size):
            m = self._aligned(source, plan, lo, hi, csr)
            _, out[lo:hi] = self._bins(m, lo, plan.out_tokens)
        return out


def _probe(source: ExpressionSource):
    from scforge.matrix import iter_row_chunks

    for _, _, csr in iter_row_chunks(source, chunk_size=256, stop=256):
        yield csr


def _with_zeros(plan: GenePlan, m: sp.csr_matrix, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every output gene for every cell (data order), zeros where not expressed."""
    n_rows, n_out = m.shape
    dense_values = np.zeros(n_rows * n_out, dtype=values.dtype)
    dense_values[K.row_index(m.indptr) * n_out + m.indices] = values
    tokens = np.tile(plan.out_tokens, n_rows)
    indptr = np.arange(n_rows + 1, dtype=np.int64) * n_out
    return tokens, dense_values, indptr
