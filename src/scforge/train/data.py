"""Training data: tokenized cells -> seeded, resumable minibatches with scGPT's input corruptions.

:class:`EpochBatchSampler` yields minibatches from a permutation that depends only on ``(seed,
epoch)`` (optionally one batch label per minibatch, for domain-specific batch norm), sharded across
processes, and can skip the minibatches a resumed run already consumed. :class:`CellCollator` turns
a minibatch into model inputs; its random choices (masked positions, generative splits) come from
a generator seeded by ``(seed, epoch, first cell)``, so they do not depend on any global RNG state
and a resumed run sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from scforge.errors import ConfigError
from scforge.tokenize.ragged import TokenizedCells


def batch_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (e.g. seed, epoch, first cell, batch size): collators seed
    their generator with it, so their draws never depend on global RNG state."""
    digest = hashlib.blake2b(np.asarray(parts, dtype=np.int64).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class EpochBatchSampler(torch.utils.data.Sampler):
    """Minibatches of cell indices, reshuffled per epoch from ``(seed, epoch)``.

    ``groups`` (one integer per cell, e.g. batch labels) makes every minibatch come from a single
    group (scGPT's per-batch sampling for DSBN). With ``world_size > 1`` each rank takes every
    ``world_size``-th minibatch of the same global order (equal counts on every rank: the list is
    truncated to a multiple of ``world_size``), so ranks never share or miss cells of a step.
    """

    def __init__(self, n_cells: int, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_last: bool = False, groups: Sequence[int] | np.ndarray | None = None,
                 rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.n_cells, self.batch_size, self.shuffle, self.seed = n_cells, batch_size, shuffle, seed
        self.drop_last = drop_last
        self.groups = None if groups is None else np.asarray(groups)
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._skip = 0  # minibatches of the current epoch already consumed (resume)
        self._yielded = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self._skip = 0
        self.epoch = epoch

    def set_distributed(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size

    def global_batches(self) -> list[np.ndarray]:
        rng = np.random.default_rng(batch_seed(self.seed, self.epoch))
        if self.groups is None:
            order = rng.permutation(self.n_cells) if self.shuffle else np.arange(self.n_cells)
            batches = [order[i : i + self.batch_size] for i in range(0, self.n_cells, self.batch_size)]
        else:
            batches = []
            for g in np.unique(self.groups):
                members = np.flatnonzero(self.groups == g)
                if self.shuffle:
                    members = rng.permutation(members)
                batches += [members[i : i + self.batch_size] for i in range(0, members.size, self.batch_size)]
            if self.shuffle:
                batches = [batches[i] for i in rng.permutation(len(batches))]
        if self.drop_last:
            batches = [b for b in batches if b.size == self.batch_size]
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        mine = self.global_batches()[self.rank :: self.world_size]
        skip, self._skip = self._skip, 0
        self._yielded = skip
        for batch in mine[skip:]:
            self._yielded += 1
            yield [(self.epoch, int(i)) for i in batch]

    def __len__(self) -> int:
        return len(self.global_batches()) // self.world_size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch = int(state["epoch"])
        self._skip = int(state["consumed"])


class _IndexDataset(torch.utils.data.Dataset):
    """Passes ``(epoch, cell)`` pairs through to the collator."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, item):
        return item


@dataclass
class Corruption:
    """How inputs are corrupted for the expression objectives.

    ``mode``: ``"none"`` (classification only), ``"mask"`` (values replaced by ``mask_value`` at
    ``mask_ratio``, scGPT's GEP/MLM) or ``"generative"`` (scGPT pretraining: a share of genes drawn
    from ``mask_ratio`` becomes generated tokens at the end of the sequence). ``mask_ratio`` is a
    float or a tuple to draw from per cell."""

    mode: str = "mask"
    mask_ratio: float | tuple[float, ...] = 0.15

    def __post_init__(self) -> None:
        if self.mode not in ("none", "mask", "generative"):
            raise ConfigError(f"corruption mode {self.mode!r}; choose 'none', 'mask' or 'generative'")
        ratios = self.mask_ratio if isinstance(self.mask_ratio, tuple) else (self.mask_ratio,)
        if not all(0.0 <= r < 1.0 for r in ratios):
            raise ConfigError(f"mask_ratio values must be in [0, 1), got {self.mask_ratio}")


class CellCollator:
    """Minibatch of ``(epoch, cell)`` pairs -> tensors for :class:`scforge.models.scgpt.ScGPTModel`.

    Output keys: ``genes``, ``values`` (model input), ``target`` (true values), ``predict`` (bool:
    positions scored by GEP/MVC), and either ``cu_seqlens`` + ``max_seqlen`` (packed; ``"none"`` and
    ``"mask"``) or ``padding_mask`` + ``gen_mask`` (padded; ``"generative"``), plus ``labels``,
    ``batch_labels`` and ``cells`` (indices) when given. The ``<cls>`` token (position 0) is never
    corrupted. With ``cells=None`` only :meth:`collate` is used, on cells given with each call.
    """

    def __init__(self, cells: TokenizedCells | None, *, corruption: Corruption, seed: int = 0,
                 labels: np.ndarray | None = None, batch_labels: np.ndarray | None = None,
                 mask_value: float = -1.0, pad_value: float = -2.0, pad_id: int = 0) -> None:
        if cells is not None and (cells.values is None or cells.gene_ids is None):
            raise ConfigError("training needs tokenized cells with gene ids and values (scGPT tokenizer output)")
        self.cells, self.corruption, self.seed = cells, corruption, seed
        self.labels, self.batch_labels = labels, batch_labels
        self.mask_value, self.pad_value, self.pad_id = mask_value, pad_value, pad_id

    def _ratio(self, rng: np.random.Generator) -> float:
        r = self.corruption.mask_ratio
        return float(rng.choice(r)) if isinstance(r, tuple) else float(r)

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        idx = np.asarray([i for _, i in items], dtype=np.int64)
        return self.collate(self.cells, idx, idx, items[0][0])

    def collate(self, cells: TokenizedCells, rows: np.ndarray, idx: np.ndarray, epoch: int) -> dict[str, torch.Tensor]:
        """Rows ``rows`` of ``cells``, which are the cells numbered ``idx`` (they seed the corruption and
        pick labels), in epoch ``epoch``."""
        rng = np.random.default_rng(batch_seed(self.seed, epoch, int(idx[0]), idx.size))
        offsets = cells.offsets
        genes_list, values_list, target_list, predict_list, gen_list = [], [], [], [], []
        for i in rows:
            lo, hi = offsets[i], offsets[i + 1]
            g = cells.gene_ids[lo:hi].astype(np.int64)
            v = cells.values[lo:hi].astype(np.float32)
            predict = np.zeros(g.size, dtype=bool)
            gen = np.zeros(g.size, dtype=bool)
            n_genes = g.size - 1
            if self.corruption.mode != "none" and n_genes > 0:
                k = int(n_genes * self._ratio(rng))
                chosen = 1 + rng.choice(n_genes, size=k, replace=False) if k else np.zeros(0, dtype=np.int64)
                if self.corruption.mode == "mask":
                    predict[chosen] = True
                else:  # generative: chosen genes move to the end, after the known ("perception") ones
                    keep = np.ones(g.size, dtype=bool)
                    keep[chosen] = False
                    order = np.concatenate([np.flatnonzero(keep), np.sort(chosen)])
                    g, v = g[order], v[order]
                    gen[g.size - k :] = True
                    predict = gen.copy()
            target = v.copy()
            inp = v.copy()
            if self.corruption.mode == "mask":
                inp[predict] = self.mask_value
            genes_list.append(g)
            values_list.append(inp)
            target_list.append(target)
            predict_list.append(predict)
            gen_list.append(gen)
        lengths = np.asarray([g.size for g in genes_list], dtype=np.int64)
        out: dict[str, torch.Tensor] = {"cells": torch.from_numpy(idx)}
        if self.corruption.mode == "generative":
            width = int(lengths.max())
            pad = np.arange(width)[None, :] >= lengths[:, None]

            def padded(parts, fill, dtype):
                arr = np.full((idx.size, width), fill, dtype=dtype)
                arr[~pad] = np.concatenate(parts)
                return torch.from_numpy(arr)

            out.update(genes=padded(genes_list, self.pad_id, np.int64), values=padded(values_list, self.pad_value,
                       np.float32), target=padded(target_list, self.pad_value, np.float32),
                       predict=padded(predict_list, False, bool), gen_mask=padded(gen_list, False, bool),
                       padding_mask=torch.from_numpy(pad))
        else:
            cu = np.zeros(idx.size + 1, dtype=np.int64)
            np.cumsum(lengths, out=cu[1:])
            out.update(genes=torch.from_numpy(np.concatenate(genes_list)),
                       values=torch.from_numpy(np.concatenate(values_list)),
                       target=torch.from_numpy(np.concatenate(target_list)),
                       predict=torch.from_numpy(np.concatenate(predict_list)), cu_seqlens=torch.from_numpy(cu),
                       max_seqlen=torch.tensor(int(lengths.max())))
        if self.labels is not None:
            out["labels"] = torch.as_tensor(self.labels[idx], dtype=torch.long)
        if self.batch_labels is not None:
            out["batch_labels"] = torch.as_tensor(self.batch_labels[idx], dtype=torch.long)
        return out


def make_loader(cells: TokenizedCells, *, batch_size: int, corruption: Corruption, seed: int = 0,
                shuffle: bool = True, labels: np.ndarray | None = None, batch_labels: np.ndarray | None = None,
                per_batch: bool = False, mask_value: float = -1.0, pad_value: float = -2.0, pad_id: int = 0,
                drop_last: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader over tokenized cells with :class:`EpochBatchSampler` and :class:`CellCollator`."""
    if per_batch and batch_labels is None:
        raise ConfigError("per-batch minibatches (DSBN) need batch labels")
    sampler = EpochBatchSampler(cells.n_cells, batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                groups=batch_labels if per_batch else None)
    collate = CellCollator(cells, corruption=corruption, seed=seed, labels=labels, batch_labels=batch_labels,
                           mask_value=mask_value, pad_value=pad_value, pad_id=pad_id)
    return torch.utils.data.DataLoader(_IndexDataset(cells.n_cells), batch_sampler=sampler, collate_fn=collate)
