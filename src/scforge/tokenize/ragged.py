"""Ragged token storage for tokenized cells, and padded / packed batches for the models."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scforge.errors import ConfigError, InputDataError


@dataclass
class TokenizedCells:
    """Variable-length token sequences of many cells, stored flat with offsets (CSR-like).

    ``gene_ids[offsets[i]:offsets[i+1]]`` are cell ``i``'s token ids and ``values[...]`` its values
    (expression bins for scGPT, log bins for scBERT; ``None`` for Geneformer where the order is the
    value). ``gene_ids`` is ``None`` for fixed-panel inputs (scBERT), where the position is the gene.
    ``meta`` records the tokenizer and its settings, including ``pad_id`` and ``pad_value``.
    """

    offsets: np.ndarray
    gene_ids: np.ndarray | None
    values: np.ndarray | None
    obs_names: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        total = int(self.offsets[-1]) if self.offsets.size else 0
        for name in ("gene_ids", "values"):
            arr = getattr(self, name)
            if arr is not None and arr.shape[0] != total:
                raise ConfigError(f"{name} has {arr.shape[0]} entries but offsets end at {total}.")
        if len(self.obs_names) != self.n_cells:
            raise ConfigError(f"{len(self.obs_names)} obs_names for {self.n_cells} cells.")

    # ---- basic access -----------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        return int(self.offsets.size - 1)

    def __len__(self) -> int:
        return self.n_cells

    @property
    def lengths(self) -> np.ndarray:
        """Number of tokens of every cell (special tokens included)."""
        return np.diff(self.offsets)

    @property
    def n_tokens(self) -> int:
        return int(self.offsets[-1])

    def cell(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Token ids and values of cell ``i`` (views, not copies)."""
        if not -self.n_cells <= i < self.n_cells:
            raise IndexError(f"cell {i} out of range for {self.n_cells} cells")
        i %= self.n_cells
        lo, hi = self.offsets[i], self.offsets[i + 1]
        genes = self.gene_ids[lo:hi] if self.gene_ids is not None else np.arange(hi - lo)
        values = self.values[lo:hi] if self.values is not None else None
        return genes, values

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.cell(i)

    def select(self, indices: Sequence[int] | np.ndarray) -> TokenizedCells:
        """A new TokenizedCells with the given cells, in the given order."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < -self.n_cells or idx.max() >= self.n_cells):
            raise IndexError(f"cell indices out of range for {self.n_cells} cells")
        idx %= max(self.n_cells, 1)
        flat = gather_ranges(self.offsets, idx)
        lengths = self.lengths[idx]
        offsets = np.zeros(idx.size + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return TokenizedCells(
            offsets=offsets,
            gene_ids=None if self.gene_ids is None else self.gene_ids[flat],
            values=None if self.values is None else self.values[flat],
            obs_names=np.asarray(self.obs_names)[idx],
            meta=dict(self.meta),
        )

    @staticmethod
    def concat(parts: Sequence[TokenizedCells]) -> TokenizedCells:
        """Join chunks tokenized with the same settings, in order."""
        if not parts:
            raise ConfigError("concat needs at least one TokenizedCells")
        first = parts[0]
        for p in parts[1:]:
            if (p.gene_ids is None) != (first.gene_ids is None) or (p.values is None) != (
                first.values is None
            ):
                raise ConfigError("cannot concat TokenizedCells with different fields")
        shift = np.cumsum([0] + [p.n_tokens for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shift)])
        return TokenizedCells(
            offsets=offsets,
            gene_ids=None if first.gene_ids is None else np.concatenate([p.gene_ids for p in parts]),
            values=None if first.values is None else np.concatenate([p.values for p in parts]),
            obs_names=np.concatenate([np.asarray(p.obs_names) for p in parts]),
            meta=dict(first.meta),
        )

    # ---- batches for models -----------------------------------------------------------------
    def pad(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        *,
        max_len: int | None = None,
        pad_id: int | None = None,
        pad_value: float | None = None,
        as_torch: bool = True,
    ) -> dict[str, Any]:
        """Padded batch: ``genes`` [B, L] int64, ``values`` [B, L] float32, ``padding_mask`` [B, L].

        ``padding_mask`` is True at padded positions (PyTorch's key-padding convention). ``L`` is the
        longest selected cell, capped by ``max_len`` (longer cells are cut at the end: tokenizers
        already subsample, so cutting here only applies to explicit caps).
        """
        idx = np.arange(self.n_cells) if indices is None else np.asarray(indices, dtype=np.int64)
        pad_id = self.meta.get("pad_id", 0) if pad_id is None else pad_id
        pad_value = self.meta.get("pad_value", 0.0) if pad_value is None else pad_value
        lengths = self.lengths[idx]
        width = int(lengths.max()) if idx.size else 0
        if max_len is not None:
            width = min(width, int(max_len))
            lengths = np.minimum(lengths, width)
        padding_mask = np.arange(width)[None, :] >= lengths[:, None]
        flat = gather_ranges(self.offsets, idx, lengths)  # token positions, row-major
        dest = np.arange(flat.size, dtype=np.int64) + np.repeat(
            np.arange(idx.size, dtype=np.int64) * width - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths
        )
        genes = np.full((idx.size, width), pad_id, dtype=np.int64)
        if self.gene_ids is not None:
            genes.ravel()[dest] = self.gene_ids[flat]
        else:
            genes.ravel()[dest] = flat - np.repeat(self.offsets[idx], lengths)
        batch: dict[str, Any] = {"genes": genes, "padding_mask": padding_mask}
        if self.values is not None:
            dtype = np.float32 if np.issubdtype(self.values.dtype, np.floating) else np.int64
            values = np.full((idx.size, width), pad_value, dtype=dtype)
            values.ravel()[dest] = self.values[flat]
            batch["values"] = values
        if as_torch:
            import torch

            batch = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}
        return batch

    def pack(self, indices: Sequence[int] | np.ndarray | None = None, *, as_torch: bool = True) -> dict[str, Any]:
        """Padding-free batch: all tokens of the selected cells concatenated.

        Returns ``genes`` [T], ``values`` [T] (when present), ``cu_seqlens`` [B+1] int32 (cumulative
        lengths, the varlen-attention convention) and ``max_seqlen``.
        """
        sub = self if indices is None else self.select(indices)
        genes = sub.gene_ids.astype(np.int64) if sub.gene_ids is not None else _positions(sub.offsets)
        batch: dict[str, Any] = {
            "genes": genes,
            "cu_seqlens": sub.offsets.astype(np.int32),
            "max_seqlen": int(sub.lengths.max()) if sub.n_cells else 0,
        }
        if sub.values is not None:
            floating = np.issubdtype(sub.values.dtype, np.floating)
            batch["values"] = sub.values.astype(np.float32 if floating else np.int64)
        if as_torch:
            import torch

            batch = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
        return batch

    def save(self, path: str | Path) -> Path:
        """Write to a ``.npz`` file (no pickles: ``meta`` is stored as JSON)."""
        path = Path(path)
        arrays: dict[str, np.ndarray] = {
            "offsets": self.offsets,
            "obs_names": np.asarray(self.obs_names).astype(str),
            "meta": np.array(json.dumps(self.meta, default=_json_default)),
        }
        if self.gene_ids is not None:
            arrays["gene_ids"] = self.gene_ids
        if self.values is not None:
            arrays["values"] = self.values
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **arrays)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TokenizedCells:
        """Read a file written by :meth:`save` (never unpickles)."""
        try:
            with np.load(Path(path), allow_pickle=False) as f:
                return cls(
                    offsets=f["offsets"],
                    gene_ids=f["gene_ids"] if "gene_ids" in f else None,
                    values=f["values"] if "values" in f else None,
                    obs_names=f["obs_names"],
                    meta=json.loads(str(f["meta"])),
                )
        except (OSError, KeyError, ValueError) as exc:
            raise ConfigError(f"{path} is not a tokenized-cells file written by scforge: {exc}") from exc

    def summary(self) -> dict[str, Any]:
        """Counts a person wants to see after tokenizing."""
        lengths = self.lengths
        out: dict[str, Any] = {
            "tokenizer": self.meta.get("tokenizer"),
            "cells": self.n_cells,
            "tokens": self.n_tokens,
            "tokens_per_cell_median": float(np.median(lengths)) if lengths.size else 0.0,
            "tokens_per_cell_min": int(lengths.min()) if lengths.size else 0,
            "tokens_per_cell_max": int(lengths.max()) if lengths.size else 0,
        }
        if self.values is not None and self.values.size:
            out["value_min"] = float(self.values.min())
            out["value_max"] = float(self.values.max())
        return out


def gather_ranges(offsets: np.ndarray, idx: np.ndarray, lengths: np.ndarray | None = None) -> np.ndarray:
    """Flat positions of the first ``lengths`` tokens (default: all) of cells ``idx``, vectorized."""
    starts = offsets[idx]
    if lengths is None:
        lengths = offsets[idx + 1] - starts
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    seg_start = np.zeros(idx.size, dtype=np.int64)
    np.cumsum(lengths[:-1], out=seg_start[1:])
    return np.arange(total, dtype=np.int64) - np.repeat(seg_start - starts, lengths)


def _positions(offsets: np.ndarray) -> np.ndarray:
    lengths = np.diff(offsets)
    return np.arange(int(offsets[-1]), dtype=np.int64) - np.repeat(offsets[:-1], lengths)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def require_expressed_cells(cells: TokenizedCells, consequence: str, n_special: int = 0) -> None:
    """Raise :class:`InputDataError` when a tokenized cell holds no gene token (only its ``n_special``
    special tokens, e.g. scGPT's ``<cls>``): no gene of the model's vocabulary is expressed."""
    empty = np.flatnonzero(cells.lengths <= n_special)
    if empty.size:
        names = [str(cells.obs_names[i]) for i in empty[:5]]
        raise InputDataError(
            f"{empty.size} of {cells.n_cells} cells express no gene of the model's vocabulary (e.g. {names}); "
            f"{consequence}. Remove them first, e.g. sc.pp.filter_cells(adata, min_genes=1) after "
            "restricting to matched genes."
        )


def compact(offsets: np.ndarray, lengths: np.ndarray, *arrays: np.ndarray, n_jobs: int = 1) -> tuple[np.ndarray, ...]:
    """Keep the first ``lengths[r]`` items of each row of ragged ``arrays`` laid out at ``offsets``.

    Returns the new offsets followed by the compacted arrays (new arrays; the inputs are unchanged).
    """
    from scforge.tokenize import _compiled

    lengths = np.asarray(lengths, dtype=np.int64)
    new_offsets = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=new_offsets[1:])
    blocks = max(1, min(lengths.size, 4 * n_jobs))
    out = []
    for array in arrays:
        dst = np.empty(int(new_offsets[-1]), dtype=array.dtype)
        _compiled.compact_rows(array, offsets, lengths, new_offsets, dst, blocks)
        out.append(dst)
    return (new_offsets, *out)
