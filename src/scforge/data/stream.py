"""Streaming tokenized cells from data that does not fit in memory, with block shuffling.

:class:`CellStream` is a torch ``IterableDataset`` over one or many sources: ``.h5ad`` files (read
backed), AnnData zarr stores, AnnData objects, or pre-tokenized shards (:mod:`scforge.data.shards`).
Every epoch it

1. cuts each source into contiguous blocks of ``block_size`` cells (reading a block is one
   contiguous slice of the matrix: fast on disk);
2. orders all blocks by a permutation drawn from ``(seed, epoch)``;
3. deals block ``k`` of that order to consumer ``k mod C``, where the consumers are the
   ``world_size`` DDP ranks times the DataLoader workers of each rank (so every cell goes to exactly
   one consumer, once per epoch);
4. reads ``buffer_blocks`` blocks at a time, tokenizes them inside the stream (the tokenizer's
   seeded rules, keyed by each cell's row, so a cell's tokens do not depend on the order), shuffles
   the cells of the buffer (seeded by seed, epoch, consumer and buffer) and yields minibatches.

Memory is bounded by the buffer, never the data. Each minibatch is a dict with ``cells`` (global
cell indices: source offset + row) and ``tokens`` (:class:`~scforge.tokenize.ragged.TokenizedCells`).
``state_dict`` / ``load_state_dict`` resume mid-epoch: the remaining minibatches are those an
uninterrupted run would have yielded.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scforge.errors import ConfigError, InputDataError
from scforge.tokenize.ragged import TokenizedCells
from scforge.train.data import batch_seed


@dataclass
class _Source:
    """One source: how many cells, and how to read rows ``lo..hi`` as tokenized cells."""

    name: str
    n_obs: int
    expression: Any = None  # ExpressionSource (h5ad / zarr / AnnData)
    shards: Any = None  # TokenShards
    plan: Any = None


def _open_zarr(path: Path, layer: str | None) -> Any:
    import zarr
    from anndata.io import read_elem, sparse_dataset

    from scforge.matrix import ExpressionSource

    group = zarr.open_group(str(path), mode="r")
    element = group["X"] if layer is None else group["layers"][layer]
    kind = dict(element.attrs).get("encoding-type", "array")
    matrix = sparse_dataset(element) if kind in ("csr_matrix", "csc_matrix") else element
    obs = read_elem(group["obs"])
    return ExpressionSource(matrix=matrix, var=read_elem(group["var"]), obs=obs, where=f"{path.name}:X")


def _open_source(spec: Any, tokenizer: Any, layer: str | None, gene_col: str | None, i: int) -> _Source:
    from scforge.data.shards import TokenShards
    from scforge.matrix import as_source

    if isinstance(spec, TokenShards):
        if tokenizer is not None:
            TokenShards.open(spec.path, tokenizer=tokenizer)  # refuses other settings / vocabulary
        return _Source(str(spec.path), spec.n_cells, shards=spec)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.exists():
            raise InputDataError(f"source {i} ({path}) does not exist; give .h5ad files, .zarr stores or shard "
                                 "folders.")
        if (path / "manifest.json").is_file():
            return _open_source(TokenShards.open(path, tokenizer=tokenizer), None, layer, gene_col, i)
        expression = _open_zarr(path, layer) if path.is_dir() else as_source(path, layer=layer)
        name = str(path)
    else:
        expression, name = as_source(spec, layer=layer), f"source {i} ({type(spec).__name__})"
    if tokenizer is None:
        raise ConfigError(f"{name} holds expression values: pass tokenizer= to tokenize it inside the stream.")
    plan = tokenizer._plan(expression, gene_col)
    return _Source(name, expression.n_obs, expression=expression, plan=plan)


class CellStream(torch.utils.data.IterableDataset):
    """Block-shuffled, rank- and worker-sharded minibatches of tokenized cells (see the module doc)."""

    def __init__(self, sources: Sequence[Any] | Any, tokenizer: Any = None, *, batch_size: int = 32,
                 block_size: int = 256, buffer_blocks: int = 16, shuffle: bool = True, seed: int = 0,
                 layer: str | None = None, gene_col: str | None = None, rank: int | None = None,
                 world_size: int | None = None, drop_last: bool = False) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("block_size", block_size), ("buffer_blocks", buffer_blocks)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
        if not isinstance(sources, (list, tuple)):
            sources = [sources]
        if not sources:
            raise ConfigError("CellStream needs at least one source.")
        self.tokenizer = tokenizer
        self.sources = [_open_source(s, tokenizer, layer, gene_col, i) for i, s in enumerate(sources)]
        self.offsets = np.concatenate([[0], np.cumsum([s.n_obs for s in self.sources])]).astype(np.int64)
        self.batch_size, self.block_size, self.buffer_blocks = int(batch_size), int(block_size), int(buffer_blocks)
        self.shuffle, self.seed, self.drop_last = shuffle, int(seed), drop_last
        self._rank, self._world = rank, world_size
        self.epoch = 0
        self._skip = 0  # minibatches of this epoch already consumed (resume), per consumer

    @property
    def n_cells(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:  # a DataLoader worker gets the stream without the thread pool
        state = dict(self.__dict__)
        state.pop("_pool", None)
        return state

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        """Epoch and minibatches consumed (of this consumer) so far, for :meth:`load_state_dict`."""
        return {"epoch": self.epoch, "consumed": getattr(self, "_yielded", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self._skip = int(state["epoch"]), int(state["consumed"])

    # ---- partitioning ------------------------------------------------------------------------
    def _distributed(self) -> tuple[int, int]:
        if self._rank is not None:
            return int(self._rank), int(self._world or 1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def consumer(self) -> tuple[int, int]:
        """``(index, count)`` of this iterator among all ranks x DataLoader workers."""
        rank, world = self._distributed()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        return rank * workers + worker, world * workers

    def blocks(self) -> list[tuple[int, int, int]]:
        """All ``(source, lo, hi)`` blocks of the epoch, in the epoch's order."""
        blocks = [(i, lo, min(lo + self.block_size, s.n_obs)) for i, s in enumerate(self.sources)
                  for lo in range(0, s.n_obs, self.block_size)]
        if self.shuffle:
            order = np.random.default_rng(batch_seed(self.seed, self.epoch)).permutation(len(blocks))
            blocks = [blocks[k] for k in order]
        return blocks

    # ---- reading -----------------------------------------------------------------------------
    def _read(self, block: tuple[int, int, int]) -> tuple[np.ndarray, TokenizedCells]:
        from scforge.matrix import iter_row_chunks

        i, lo, hi = block
        src = self.sources[i]
        if src.shards is not None:
            tokens = src.shards.cells(np.arange(lo, hi))
        else:
            _, _, csr = next(iter_row_chunks(src.expression, hi - lo, start=lo, stop=hi))
            tokens = self.tokenizer._tokenize_chunk(src.expression, src.plan, lo, hi, csr)
        return self.offsets[i] + np.arange(lo, hi, dtype=np.int64), tokens

    def _read_all(self, group: list[tuple[int, int, int]]) -> list[tuple[np.ndarray, TokenizedCells]]:
        """Read and tokenize a buffer's blocks, on the tokenizer's threads (its kernels release the GIL)."""
        threads = int(getattr(self.tokenizer, "n_jobs", 1) or 1)
        if threads == 1 or len(group) == 1:
            return [self._read(b) for b in group]
        if getattr(self, "_pool", None) is None or self._pool_pid != os.getpid():  # one pool per worker process
            from concurrent.futures import ThreadPoolExecutor

            self._pool, self._pool_pid = ThreadPoolExecutor(threads), os.getpid()
        return list(self._pool.map(self._read, group))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        me, count = self.consumer()
        mine = self.blocks()[me::count]
        skip, self._skip = self._skip, 0
        self._yielded = 0
        for g in range(0, len(mine), self.buffer_blocks):
            group = mine[g : g + self.buffer_blocks]
            n = sum(hi - lo for _, lo, hi in group)
            n_batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
            if self._yielded + n_batches <= skip:  # resumed past this buffer: not even read
                self._yielded += n_batches
                continue
            read = self._read_all(group)
            cells = np.concatenate([c for c, _ in read])
            tokens = TokenizedCells.concat([t for _, t in read])
            order = np.arange(cells.size)
            if self.shuffle:
                order = np.random.default_rng(batch_seed(self.seed, self.epoch, me, g)).permutation(cells.size)
            for start in range(0, order.size, self.batch_size):
                pick = order[start : start + self.batch_size]
                if self.drop_last and pick.size < self.batch_size:
                    break
                self._yielded += 1
                if self._yielded <= skip:
                    continue
                yield {"cells": cells[pick], "tokens": tokens.select(pick)}
