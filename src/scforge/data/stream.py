"""Streaming tokenized cells from data that does not fit in memory, with block shuffling.

:class:`CellStream` is a torch ``IterableDataset`` over one or many sources: ``.h5ad`` files (read
backed), AnnData zarr stores, TileDB-SOMA experiments (:mod:`scforge.data.soma`), AnnData objects, or
pre-tokenized shards (:mod:`scforge.data.shards`).
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


class _H5adRows:
    """Rows of an ``.h5ad`` matrix read through a fresh HDF5 handle per block.

    A handle kept open caches the file's metadata: if another process appends cells (possible where
    HDF5 file locking is off, as on many network disks), reads through it can fail or return garbage.
    A new handle per block sees the file as it is, and the rows a run started with never change on an
    append. The shape is the one at opening: cells appended later are not part of the run. A block
    that cannot be read (the writer is mid-write) is retried, then reported."""

    def __init__(self, path: Path, element: str, shape: tuple[int, int]) -> None:
        self.path, self.element, self.shape = path, element, shape

    def __getitem__(self, rows: slice) -> Any:
        from anndata.io import sparse_dataset

        def read(f):
            element = f[self.element]
            return element[rows] if hasattr(element, "shape") else sparse_dataset(element)[rows]

        return self._with_file(read, rows.start, rows.stop)

    def names(self, lo: int, hi: int) -> np.ndarray:
        def read(f):
            names = f["obs"][f["obs"].attrs["_index"]]
            return np.asarray(names.asstr()[lo:hi] if names.dtype.kind in "OS" else names[lo:hi]).astype(object)

        return self._with_file(read, lo, hi)

    def column(self, key: str) -> np.ndarray | None:
        from anndata.io import read_elem

        def read(f):
            obs = f["obs"]
            return np.asarray(read_elem(obs[key])) if key in obs and key != obs.attrs["_index"] else None

        return self._with_file(read, 0, self.shape[0])

    def _with_file(self, read: Any, lo: int, hi: int) -> Any:
        import time

        import h5py

        tries = 5
        for attempt in range(tries):
            try:
                with h5py.File(self.path, "r") as f:
                    return read(f)
            except (OSError, KeyError) as exc:
                error = exc
                if attempt < tries - 1:
                    time.sleep(0.2 * (attempt + 1))
        raise InputDataError(f"cells {lo}..{hi} of {self.path} could not be read ({error}); was the file being "
                             "rewritten? Keep files fixed while a run reads them, or write new cells to a new file "
                             "and add it as another source.")


def _h5ad_source(path: Path, layer: str | None) -> Any:
    import dataclasses

    from scforge.matrix import as_source

    source = as_source(path, layer=layer)
    rows = _H5adRows(path, "X" if layer is None else f"layers/{layer}", (source.n_obs, source.n_vars))
    # HDF5 shares one file object between the handles a process has open on a file, stale metadata
    # included: the opening handle is closed so that every read sees the file as it is
    source.h5_obs.file.close()
    return dataclasses.replace(source, matrix=rows, h5_obs=None, names_reader=rows.names, column_reader=rows.column)


def expression_source(path: str | os.PathLike, layer: str | None = None, gene_col: str | None = None) -> Any:
    """The :class:`~scforge.matrix.ExpressionSource` of an ``.h5ad`` file (read backed), an AnnData
    zarr store or a TileDB-SOMA experiment (``layer``: its X layer, ``"raw"`` by default; ``gene_col``:
    its var column of gene ids when var has no ``var_id``)."""
    from scforge.data.soma import is_soma_experiment, soma_source

    path = Path(path)
    if path.is_dir() and is_soma_experiment(path):
        return soma_source(path, layer=layer or "raw", gene_col=gene_col)
    return _open_zarr(path, layer) if path.is_dir() else _h5ad_source(path, layer)


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
            raise InputDataError(f"source {i} ({path}) does not exist; give .h5ad files, .zarr stores, TileDB-SOMA "
                                 "experiments or shard folders.")
        if (path / "manifest.json").is_file():
            return _open_source(TokenShards.open(path, tokenizer=tokenizer), None, layer, gene_col, i)
        expression, name = expression_source(path, layer, gene_col), str(path)
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
                 world_size: int | None = None, drop_last: bool = False, even_batches: bool = False,
                 loader_workers: int = 0) -> None:
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
        self.even_batches, self.loader_workers = even_batches, int(loader_workers)
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

    def set_distributed(self, rank: int, world_size: int, loader_workers: int = 0) -> None:
        """Read as DDP rank ``rank`` of ``world_size`` with ``loader_workers`` DataLoader workers
        (what a trainer calls; otherwise ``torch.distributed`` and the worker info are asked)."""
        self._rank, self._world, self.loader_workers = int(rank), int(world_size), int(loader_workers)

    def state_dict(self) -> dict[str, int]:
        """Epoch and minibatches consumed so far (when iterated in this process), for :meth:`load_state_dict`."""
        return {"epoch": self.epoch, "consumed": getattr(self, "_yielded", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume after ``state["consumed"]`` minibatches of ``state["epoch"]`` delivered to this rank. With
        DataLoader workers this is the rank's count (what the training loop saw): the workers' batches
        arrive in turn, so each worker works out its own share."""
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

    def _groups(self, mine: list[tuple[int, int, int]]) -> list[tuple[list[tuple[int, int, int]], int]]:
        """A consumer's buffers and the number of minibatches each yields."""
        out = []
        for g in range(0, len(mine), self.buffer_blocks):
            group = mine[g : g + self.buffer_blocks]
            n = sum(hi - lo for _, lo, hi in group)
            out.append((group, n // self.batch_size if self.drop_last else -(-n // self.batch_size)))
        return out

    def _counts(self, blocks: list[tuple[int, int, int]], count: int) -> list[int]:
        """Minibatches of each of ``count`` consumers in an epoch whose block order is ``blocks``."""
        return [sum(n for _, n in self._groups(blocks[c::count])) for c in range(count)]

    def _plan_epoch(self, count: int, workers: int) -> tuple[list[tuple[int, int, int]], list[int], list[int]]:
        """For ``count`` consumers, ``workers`` per rank: the epoch's blocks; minibatches per consumer;
        minibatches per consumer after padding (with ``even_batches`` each rank gets as many as the
        fullest rank, by repeating its own first ones)."""
        world = count // workers
        blocks = self.blocks()
        counts = self._counts(blocks, count)
        target = list(counts)
        if self.even_batches and world > 1:
            per_rank = [sum(counts[r * workers : (r + 1) * workers]) for r in range(world)]
            for r in range(world):
                extra = max(per_rank) - per_rank[r]
                for w in range(workers):
                    target[r * workers + w] += extra // workers + (w < extra % workers)
        return blocks, counts, target

    def __len__(self) -> int:
        """Minibatches this rank delivers in the current epoch, over the DataLoader workers it will read
        with (``loader_workers``, set by :meth:`set_distributed`)."""
        rank, world = self._distributed()
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info is not None else max(1, self.loader_workers)
        return sum(self._plan_epoch(world * workers, workers)[2][rank * workers : (rank + 1) * workers])

    @staticmethod
    def _resume_turns(consumed: int, per_worker: list[int]) -> tuple[list[int], int]:
        """Replay a DataLoader taking one minibatch from each worker still running, in turn: how many
        of the first ``consumed`` came from each worker, and whose turn is next."""
        taken = [0] * len(per_worker)
        active = [w for w in range(len(per_worker)) if per_worker[w] > 0]
        turn = 0
        while consumed > 0 and active:
            w = active[turn % len(active)]
            taken[w] += 1
            consumed -= 1
            if taken[w] == per_worker[w]:
                active.remove(w)
            else:
                turn += 1
            turn %= max(len(active), 1)
        following = active[turn % len(active)] if active else 0
        return taken, following

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
        info = torch.utils.data.get_worker_info()
        blocks, counts, target = self._plan_epoch(count, 1 if info is None else info.num_workers)
        skip, self._skip = self._skip, 0
        if info is not None and info.num_workers > 1 and skip:
            # a restarted DataLoader asks worker 0 first: the workers take over the roles rotated so
            # that worker 0 plays the one whose turn was next, and the rank's order goes on unchanged
            first, n = me - info.id, info.num_workers
            taken, following = self._resume_turns(skip, target[first : first + n])
            role = (following + info.id) % n
            me, skip = first + role, taken[role]
        self._yielded = 0
        mine = blocks[me::count]
        yield from self._batches(self._groups(mine), me, skip, counts[me])
        if target[me] > counts[me]:  # padding to the fullest rank: this consumer's (or the epoch's) first batches
            groups = self._groups(mine or blocks)
            yield from self._batches(groups, me, skip - counts[me], target[me] - counts[me])

    def _batches(self, groups: list[tuple[list[tuple[int, int, int]], int]], me: int, skip: int,
                 limit: int) -> Iterator[dict[str, Any]]:
        """Up to ``limit`` minibatches of these buffers, the first ``skip`` not yielded (nor read, when
        a whole buffer is skipped)."""
        done = 0
        for g, (group, n_batches) in enumerate(groups):
            if done >= limit:
                return
            if done + n_batches <= skip:  # resumed past this buffer: not even read
                done += n_batches
                self._yielded += n_batches
                continue
            read = self._read_all(group)
            cells = np.concatenate([c for c, _ in read])
            tokens = TokenizedCells.concat([t for _, t in read])
            order = np.arange(cells.size)
            if self.shuffle:
                order = np.random.default_rng(batch_seed(self.seed, self.epoch, me, g * self.buffer_blocks)
                                              ).permutation(cells.size)
            for start in range(0, n_batches * self.batch_size, self.batch_size):
                if done >= limit:
                    return
                pick = order[start : start + self.batch_size]
                done += 1
                self._yielded += 1
                if done <= skip:
                    continue
                yield {"cells": cells[pick], "tokens": tokens.select(pick), "epoch": self.epoch}
