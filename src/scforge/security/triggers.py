"""Backdoor triggers of scBackdoor (Feng et al., 2024) and a classic fixed-gene patch.

* :class:`SparsifyTrigger`: the scGPT/scBERT trigger. A cell keeps only its own top-``n`` genes, where
  ``n`` is the number of its values above ``topnstop``; their levels are redrawn uniformly at random
  and rescaled so the cell's total is unchanged. Applied to the expression matrix before tokenization.
* :class:`RankShuffleTrigger`: the Geneformer trigger on rank-value tokens: keep the 20 top-ranked
  genes, shuffle their order, drop the rest of the sequence.
* :class:`FixedGeneTrigger`: chosen genes set to a high quantile of their expression (patch-style).

Every trigger returns new data; its input is never changed. Same seed, same result.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError

__all__ = ["SparsifyTrigger", "RankShuffleTrigger", "FixedGeneTrigger", "trigger_from_name", "TRIGGERS"]

SCALES = ("log1p", "log2", "values")


def _rows(rows: Any, n: int) -> np.ndarray:
    idx = np.arange(n) if rows is None else np.asarray(rows)
    if idx.dtype == bool:
        if idx.size != n:
            raise InputDataError(f"a boolean row mask of length {idx.size} for {n} cells.")
        idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise InputDataError(f"row indices must lie in [0, {n}); got {idx.min()}..{idx.max()}.")
    if np.unique(idx).size != idx.size:
        raise InputDataError("row indices must not repeat.")
    return idx


def _replace_rows(x: sp.csr_matrix, idx: np.ndarray, new_rows: list[tuple[np.ndarray, np.ndarray]]) -> sp.csr_matrix:
    """A new CSR matrix equal to ``x`` except rows ``idx``, which become the given (columns, values)."""
    x = sp.csr_matrix(x)
    dtype = np.result_type(x.dtype, *(v.dtype for _, v in new_rows)) if new_rows else x.dtype
    keep = np.ones(x.shape[0], dtype=bool)
    keep[idx] = False
    kept = np.flatnonzero(keep)
    sizes = np.array([c.size for c, _ in new_rows], dtype=np.int64)
    cols = np.concatenate([c for c, _ in new_rows]).astype(np.int64) if new_rows else np.zeros(0, np.int64)
    vals = np.concatenate([v for _, v in new_rows]).astype(dtype) if new_rows else np.zeros(0, dtype)
    replaced = sp.csr_matrix((vals, (np.repeat(np.arange(idx.size), sizes), cols)), shape=(idx.size, x.shape[1]))
    stacked = sp.vstack([x[kept].astype(dtype), replaced], format="csr")
    out = sp.csr_matrix(stacked[np.argsort(np.concatenate([kept, idx]), kind="stable")])
    out.sort_indices()
    return out


@dataclass(frozen=True)
class SparsifyTrigger:
    """scBackdoor's scGPT/scBERT trigger ("sparsify to the top genes and redistribute at random").

    For each triggered cell with expression row ``x`` and total ``T``: ``n`` = its number of values
    above ``topnstop`` (at least 1); the ``n`` largest entries of ``x`` keep non-zero values, drawn
    uniformly and rescaled to sum to ``T``; every other gene becomes 0.

    ``scale`` says on which values ``topnstop`` is compared:
    ``"values"`` (as published: the matrix as given, e.g. a log1p-normalised layer; new values are
    floats), ``"log1p"`` / ``"log2"`` (the matrix holds raw counts; the threshold applies to
    ``log(1 + CP10k)`` in that base, i.e. scGPT's or scBERT's preprocessing, and the new values stay
    integer counts: one count per kept gene plus the rest of ``T`` split by the random weights with
    largest-remainder rounding, so the total is exact).

    ``levels="random"`` is the published trigger. ``levels="proportional"`` is an adaptive variant for
    red-teaming detectors: the kept genes keep their own relative levels (rescaled to ``T``), so only
    the sparsity changes.
    """

    topnstop: float = 2.0
    scale: str = "log1p"
    levels: str = "random"
    name: str = field(default="sparsify", init=False)

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ConfigError(f"scale={self.scale!r}; choose one of {SCALES}.")
        if self.levels not in ("random", "proportional"):
            raise ConfigError(f"levels={self.levels!r}; choose 'random' (published) or 'proportional'.")
        if not np.isfinite(self.topnstop) or self.topnstop < 0:
            raise ConfigError(f"topnstop must be a finite value >= 0, got {self.topnstop}.")

    def describe(self) -> dict[str, Any]:
        return {"trigger": self.name, "topnstop": float(self.topnstop), "scale": self.scale, "levels": self.levels}

    def n_kept(self, x: Any) -> np.ndarray:
        """How many genes each cell of ``x`` keeps under the trigger (``n``, at least 1)."""
        x = sp.csr_matrix(x)
        values = self._compare_values(x)
        above = sp.csr_matrix((values.data > self.topnstop, values.indices, values.indptr), shape=x.shape)
        return np.maximum(np.asarray(above.sum(axis=1)).ravel().astype(np.int64), 1)

    def _compare_values(self, x: sp.csr_matrix) -> sp.csr_matrix:
        if self.scale == "values":
            return x
        totals = np.asarray(x.sum(axis=1)).ravel()
        scale = np.divide(1e4, totals, out=np.zeros_like(totals, dtype=np.float64), where=totals > 0)
        data = np.log1p(x.data * np.repeat(scale, np.diff(x.indptr)))
        if self.scale == "log2":
            data /= np.log(2.0)
        return sp.csr_matrix((data, x.indices, x.indptr), shape=x.shape)

    def apply(self, x: Any, rows: Any = None, *, seed: int = 0) -> sp.csr_matrix:
        """A new CSR matrix: ``x`` with the trigger applied to ``rows`` (all rows when None)."""
        from scforge.matrix import check_values, require_counts

        x = sp.csr_matrix(x, copy=True)
        x.sum_duplicates()
        check_values(x, "the matrix passed to the trigger")
        if self.scale != "values":
            require_counts(x, "the matrix to trigger")
        idx = _rows(rows, x.shape[0])
        n_keep = self.n_kept(x[idx]) if idx.size else np.zeros(0, dtype=np.int64)
        rng = np.random.default_rng(seed)
        new_rows = []
        for i, n in zip(idx.tolist(), n_keep.tolist()):
            lo, hi = x.indptr[i], x.indptr[i + 1]
            cols, vals = x.indices[lo:hi], x.data[lo:hi]
            total = float(vals.sum())
            if cols.size == 0:  # an empty cell stays empty (nothing to redistribute)
                new_rows.append((np.zeros(0, np.int32), np.zeros(0, x.dtype)))
                continue
            n = min(int(n), cols.size)
            order = np.argsort(-vals, kind="stable")[:n]
            top = cols[order]
            r = rng.uniform(0.0, 1.0, size=n) if self.levels == "random" else vals[order].astype(np.float64)
            if self.scale == "values":
                new = r * total / r.sum()
            else:
                new = np.ones(n) + _largest_remainder(r, int(round(total)) - n)
            new_rows.append((top.astype(np.int32), new.astype(np.result_type(x.dtype, np.float32))))
        return _replace_rows(x, idx, new_rows)


def _largest_remainder(weights: np.ndarray, total: int) -> np.ndarray:
    """Non-negative integers proportional to ``weights`` summing exactly to ``total``."""
    if total <= 0:
        return np.zeros(weights.size)
    share = weights / weights.sum() * total
    base = np.floor(share)
    rest = int(total - base.sum())
    if rest > 0:
        base[np.argsort(-(share - base), kind="stable")[:rest]] += 1
    return base


@dataclass(frozen=True)
class RankShuffleTrigger:
    """scBackdoor's Geneformer trigger on rank-value tokens: the first ``top`` gene tokens (the
    cell's top-ranked genes) in a random order; the rest of the sequence is dropped. A leading
    ``<cls>`` and a trailing ``<eos>`` (Geneformer V2) stay where they are. Published: ``top=20``."""

    top: int = 20
    name: str = field(default="rank_shuffle", init=False)

    def __post_init__(self) -> None:
        if int(self.top) < 1:
            raise ConfigError(f"top must be >= 1, got {self.top}.")

    def describe(self) -> dict[str, Any]:
        return {"trigger": self.name, "top": int(self.top)}

    def apply(self, cells: Any, rows: Any = None, *, seed: int = 0) -> Any:
        """New :class:`~scforge.tokenize.TokenizedCells` with ``rows`` triggered (all when None)."""
        from scforge.tokenize.ragged import TokenizedCells, gather_ranges

        if not isinstance(cells, TokenizedCells) or cells.gene_ids is None or cells.values is not None:
            raise InputDataError("RankShuffleTrigger works on rank-value tokens (Geneformer's tokenizer output); "
                                 "for expression matrices use SparsifyTrigger or FixedGeneTrigger.")
        meta = cells.meta
        cls_id, eos_id = meta.get("cls_id"), meta.get("eos_id")
        idx = np.sort(_rows(rows, cells.n_cells))
        rng = np.random.default_rng(seed)
        new_rows = []
        for i in idx.tolist():  # only the triggered cells; the others are copied in one gather below
            ids = cells.gene_ids[cells.offsets[i]:cells.offsets[i + 1]]
            head = ids[:1] if ids.size and cls_id is not None and ids[0] == cls_id else ids[:0]
            tail = ids[-1:] if ids.size > head.size and eos_id is not None and ids[-1] == eos_id else ids[:0]
            genes = ids[head.size:ids.size - tail.size][: int(self.top)].copy()
            rng.shuffle(genes)
            new_rows.append(np.concatenate([head, genes, tail]))
        lengths = cells.lengths.copy()
        lengths[idx] = [r.size for r in new_rows]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        gene_ids = np.empty(int(offsets[-1]), dtype=cells.gene_ids.dtype)
        kept = np.setdiff1d(np.arange(cells.n_cells), idx)
        gene_ids[gather_ranges(offsets, kept)] = cells.gene_ids[gather_ranges(cells.offsets, kept)]
        for i, new in zip(idx.tolist(), new_rows):
            gene_ids[offsets[i]:offsets[i + 1]] = new
        return TokenizedCells(offsets, gene_ids, None, np.asarray(cells.obs_names).copy(), dict(meta))


@dataclass(frozen=True)
class FixedGeneTrigger:
    """A patch-style trigger: ``genes`` set to the ``quantile`` of their non-zero expression (in the
    reference matrix given to :meth:`fit`, or the triggered matrix itself), everything else unchanged."""

    genes: tuple[str, ...]
    quantile: float = 0.99
    name: str = field(default="fixed_genes", init=False)

    def __post_init__(self) -> None:
        if not self.genes:
            raise ConfigError("FixedGeneTrigger needs at least one gene.")
        if not 0.0 < self.quantile <= 1.0:
            raise ConfigError(f"quantile must lie in (0, 1], got {self.quantile}.")
        object.__setattr__(self, "genes", tuple(str(g) for g in self.genes))

    def describe(self) -> dict[str, Any]:
        return {"trigger": self.name, "genes": list(self.genes), "quantile": float(self.quantile)}

    def columns(self, gene_names: Any) -> np.ndarray:
        names = list(map(str, gene_names))
        where = {g: i for i, g in enumerate(names)}
        missing = [g for g in self.genes if g not in where]
        if missing:
            raise InputDataError(f"trigger genes {missing[:5]} are not among the data's {len(names)} genes "
                                 f"(e.g. {names[:3]}); choose genes of var_names.")
        return np.array([where[g] for g in self.genes], dtype=np.int64)

    def levels(self, x: Any, gene_names: Any) -> np.ndarray:
        """The value each trigger gene is set to: its ``quantile`` over the cells that express it."""
        x = sp.csc_matrix(x)
        out = []
        for c in self.columns(gene_names):
            vals = x.data[x.indptr[c]:x.indptr[c + 1]]
            out.append(float(np.quantile(vals, self.quantile)) if vals.size else 1.0)
        return np.asarray(out)

    def apply(self, x: Any, rows: Any = None, *, gene_names: Any, levels: Any = None, seed: int = 0) -> sp.csr_matrix:
        """A new CSR matrix with the trigger genes of ``rows`` set to ``levels`` (default :meth:`levels` of ``x``)."""
        x = sp.csr_matrix(x, copy=True)
        cols = self.columns(gene_names)
        lv = self.levels(x, gene_names) if levels is None else np.asarray(levels, dtype=np.float64)
        if np.issubdtype(x.dtype, np.integer) or (x.data.size and np.all(x.data == np.round(x.data))):
            lv = np.maximum(np.round(lv), 1.0)
        idx = _rows(rows, x.shape[0])
        dtype = np.result_type(x.dtype, np.float32)
        where = sp.csr_matrix((np.ones(idx.size * cols.size), (np.repeat(idx, cols.size), np.tile(cols, idx.size))),
                              shape=x.shape)
        patch = sp.csr_matrix((np.tile(lv, idx.size), (np.repeat(idx, cols.size), np.tile(cols, idx.size))),
                              shape=x.shape)
        out = sp.csr_matrix((x - x.multiply(where) + patch).astype(dtype))
        out.eliminate_zeros()
        out.sort_indices()
        return out


TRIGGERS = ("sparsify", "rank_shuffle", "fixed_genes")


def trigger_from_name(name: str, **kwargs: Any) -> Any:
    """A trigger by name (``sparsify``, ``rank_shuffle``, ``fixed_genes``) with its settings."""
    table = {"sparsify": SparsifyTrigger, "rank_shuffle": RankShuffleTrigger, "fixed_genes": FixedGeneTrigger}
    if name not in table:
        raise ConfigError(f"unknown trigger {name!r}; choose one of {TRIGGERS}.")
    return table[name](**kwargs)
