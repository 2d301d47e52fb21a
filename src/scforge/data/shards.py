"""Pre-tokenized shards: tokenize a corpus once, read it at disk speed for every pretraining epoch.

A shard folder holds ``manifest.json`` and, per shard, flat little-endian arrays (``*.offsets``
int64, ``*.genes`` int32, ``*.values`` float32) read back as memory maps, plus the shard's cell
names (``*.obs.npy``). The manifest records the format version, the source (path, shape, size), the
vocabulary (size and sha256 of its tokens in id order) and the tokenizer settings; opening a folder
checks every file's size, and, given the vocabulary or tokenizer it will be used with, refuses a
mismatch with a message that names what differs.

>>> write_shards(BinnedTokenizer(vocab, max_len=1200), "corpus.h5ad", "corpus.shards/")
>>> shards = TokenShards.open("corpus.shards/", tokenizer=BinnedTokenizer(vocab, max_len=1200))
>>> cells = shards.cells(np.arange(64))        # a TokenizedCells, as the tokenizer would give
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scforge.errors import ConfigError, InputDataError
from scforge.tokenize.ragged import TokenizedCells

FORMAT = "scforge-token-shards"
VERSION = 1
MANIFEST = "manifest.json"
_DTYPES = {"offsets": "<i8", "genes": "<i4", "values": "<f4"}


class ShardError(InputDataError):
    """A shard folder that is missing, damaged, of another version, or made for other settings."""


def vocab_digest(vocab: Any) -> str:
    """sha256 of a vocabulary's tokens in id order (two vocabularies with the same digest map alike)."""
    tokens = [vocab.token(i) for i in range(len(vocab))]
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()


def _source_record(data: Any) -> dict[str, Any]:
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        stat = path.stat()
        return {"path": str(path.resolve()), "bytes": int(stat.st_size)}
    shape = getattr(data, "shape", None)
    return {"path": None, "object": type(data).__name__, "shape": list(shape) if shape is not None else None}


class _ShardWriter:
    """Appends tokenized chunks to one shard's flat files."""

    def __init__(self, folder: Path, name: str, has_genes: bool, has_values: bool) -> None:
        self.name, self.folder = name, folder
        self.files = {"offsets": open(folder / f"{name}.offsets", "wb")}
        if has_genes:
            self.files["genes"] = open(folder / f"{name}.genes", "wb")
        if has_values:
            self.files["values"] = open(folder / f"{name}.values", "wb")
        self.files["offsets"].write(np.zeros(1, dtype=_DTYPES["offsets"]).tobytes())
        self.n_cells, self.n_tokens = 0, 0
        self.obs: list[np.ndarray] = []

    def add(self, cells: TokenizedCells) -> None:
        self.files["offsets"].write((cells.offsets[1:] + self.n_tokens).astype(_DTYPES["offsets"]).tobytes())
        if "genes" in self.files:
            self.files["genes"].write(np.ascontiguousarray(cells.gene_ids, dtype=_DTYPES["genes"]).tobytes())
        if "values" in self.files:
            self.files["values"].write(np.ascontiguousarray(cells.values, dtype=_DTYPES["values"]).tobytes())
        self.obs.append(np.asarray(cells.obs_names).astype(str))
        self.n_cells += cells.n_cells
        self.n_tokens += cells.n_tokens

    def close(self) -> dict[str, Any]:
        for f in self.files.values():
            f.flush()
            os.fsync(f.fileno())
            f.close()
        obs = np.concatenate(self.obs) if self.obs else np.zeros(0, dtype=str)
        np.save(self.folder / f"{self.name}.obs.npy", obs, allow_pickle=False)
        sizes = {kind: (self.folder / f"{self.name}.{kind}").stat().st_size for kind in self.files}
        return {"name": self.name, "n_cells": self.n_cells, "n_tokens": self.n_tokens, "bytes": sizes}


def write_shards(tokenizer: Any, data: Any, path: str | os.PathLike, *, shard_cells: int = 100_000,
                 layer: str | None = None, gene_col: str | None = None, use_raw: bool = False,
                 overwrite: bool = False, progress: bool = False) -> TokenShards:
    """Tokenize ``data`` (AnnData, backed or in memory, or an ``.h5ad`` path) chunk by chunk with
    ``tokenizer`` into a shard folder at ``path``, ``shard_cells`` cells per shard; memory is bounded
    by the tokenizer's chunk size. The folder is built beside ``path`` and renamed into place."""
    if isinstance(shard_cells, bool) or not isinstance(shard_cells, (int, np.integer)) or shard_cells < 1:
        raise ConfigError(f"shard_cells must be an integer >= 1, got {shard_cells!r}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass overwrite=True (CLI: --overwrite) to replace it.")
    if path.exists() and not (path / MANIFEST).is_file():
        raise ConfigError(f"{path} exists and is not a shard folder; scforge will not replace it. Choose another path.")
    source = data
    if isinstance(data, (str, os.PathLike)):
        import anndata as ad

        if not Path(data).is_file():
            raise InputDataError(f"{data} does not exist; give an .h5ad file or an AnnData.")
        source = ad.read_h5ad(data, backed="r")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards: list[dict[str, Any]] = []
    writer: _ShardWriter | None = None
    meta: dict[str, Any] = {}
    try:
        for chunk in tokenizer.iter_chunks(source, layer=layer, gene_col=gene_col, use_raw=use_raw,
                                           progress=progress):
            meta = chunk.meta
            start = 0
            while start < chunk.n_cells:
                if writer is None:
                    writer = _ShardWriter(tmp, f"shard-{len(shards):05d}", chunk.gene_ids is not None,
                                          chunk.values is not None)
                take = min(chunk.n_cells - start, int(shard_cells) - writer.n_cells)
                writer.add(chunk.select(np.arange(start, start + take)) if take < chunk.n_cells else chunk)
                start += take
                if writer.n_cells == shard_cells:
                    shards.append(writer.close())
                    writer = None
        if writer is not None:
            shards.append(writer.close())
    finally:
        if isinstance(data, (str, os.PathLike)):
            source.file.close()
    manifest = {
        "format": FORMAT, "version": VERSION, "n_cells": sum(s["n_cells"] for s in shards),
        "n_tokens": sum(s["n_tokens"] for s in shards), "dtypes": _DTYPES, "shards": shards,
        "tokenizer": tokenizer.settings(), "meta": meta,
        "vocab": {"size": len(tokenizer.vocab), "sha256": vocab_digest(tokenizer.vocab)},
        "source": {**_source_record(data), "layer": layer, "gene_col": gene_col, "use_raw": use_raw},
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return TokenShards.open(path)


@dataclass
class TokenShards:
    """An opened shard folder: cells ``0 .. n_cells-1`` across its shards, read as memory maps."""

    path: Path
    manifest: dict[str, Any]
    _shards: list[TokenizedCells]
    _starts: np.ndarray

    @classmethod
    def open(cls, path: str | os.PathLike, *, vocab: Any = None, tokenizer: Any = None) -> TokenShards:
        """Open and check a folder written by :func:`write_shards`. ``tokenizer`` (or ``vocab``): what
        the tokens will be used with; its vocabulary and settings must equal those recorded."""
        path = Path(path)
        manifest = _read_manifest(path)
        if tokenizer is not None:
            vocab = tokenizer.vocab
            _same_settings(manifest["tokenizer"], tokenizer.settings(), path)
        if vocab is not None:
            digest, size = vocab_digest(vocab), len(vocab)
            if (size, digest) != (manifest["vocab"]["size"], manifest["vocab"]["sha256"]):
                raise ShardError(f"{path} was tokenized with another vocabulary ({manifest['vocab']['size']} tokens, "
                                 f"sha256 {manifest['vocab']['sha256'][:12]}) than the one given ({size} tokens, "
                                 f"sha256 {digest[:12]}); token ids would mean other genes. Re-shard with this "
                                 "vocabulary (scforge shard).")
        shards = [_open_shard(path, entry, manifest.get("meta", {})) for entry in manifest["shards"]]
        starts = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum([s.n_cells for s in shards], out=starts[1:])
        return cls(path, manifest, shards, starts)

    @property
    def n_cells(self) -> int:
        return int(self._starts[-1])

    def __len__(self) -> int:
        return self.n_cells

    @property
    def n_shards(self) -> int:
        return len(self._shards)

    def shard(self, i: int) -> TokenizedCells:
        """Shard ``i`` as memory-mapped :class:`TokenizedCells` (nothing read until used)."""
        return self._shards[i]

    def cells(self, indices: Sequence[int] | np.ndarray) -> TokenizedCells:
        """The cells at global ``indices`` (any order), copied into memory. A contiguous run of cells
        within a shard is read with plain file reads (the pages stay in the OS cache, not in this
        process's memory, so streaming an epoch keeps memory flat)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n_cells):
            raise ConfigError(f"cell indices must lie in 0..{self.n_cells - 1}")
        which = np.searchsorted(self._starts, idx, side="right") - 1
        parts, order = [], []
        for s in np.unique(which):
            mine = np.flatnonzero(which == s)
            local = idx[mine] - self._starts[s]
            if local.size and np.array_equal(local, np.arange(local[0], local[0] + local.size)):
                parts.append(self._read_range(int(s), int(local[0]), int(local[0]) + local.size))
            else:
                parts.append(self._shards[s].select(local))
            order.append(mine)
        if not parts:
            return self._shards[0].select(np.zeros(0, dtype=np.int64))
        joined = TokenizedCells.concat(parts)
        return joined.select(np.argsort(np.concatenate(order), kind="stable"))

    def _read_range(self, s: int, lo: int, hi: int) -> TokenizedCells:
        entry, shard = self.manifest["shards"][s], self._shards[s]
        stem = self.path / entry["name"]
        offsets = np.fromfile(f"{stem}.offsets", dtype=_DTYPES["offsets"], count=hi - lo + 1, offset=8 * lo)
        t0, t1 = int(offsets[0]), int(offsets[-1])

        def read(kind: str) -> np.ndarray | None:
            if kind not in entry["bytes"]:
                return None
            return np.fromfile(f"{stem}.{kind}", dtype=_DTYPES[kind], count=t1 - t0, offset=4 * t0)

        return TokenizedCells(offsets=offsets - t0, gene_ids=read("genes"), values=read("values"),
                              obs_names=np.asarray(shard.obs_names[lo:hi]), meta=shard.meta)

    def to_tokenized(self) -> TokenizedCells:
        """Every cell in one in-memory :class:`TokenizedCells`."""
        return self.cells(np.arange(self.n_cells))


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        raise ShardError(f"{path} has no {MANIFEST}: it is not a shard folder written by scforge shard (or the "
                         "write did not finish).")
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ShardError(f"{file} is not valid JSON ({exc}); the shard folder is damaged. Re-shard the data.") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(f"{file} is not a scforge token-shard manifest (format {manifest.get('format')!r}).")
    if manifest.get("version") != VERSION:
        raise ShardError(f"{path} is shard format version {manifest.get('version')}; this scforge reads version "
                         f"{VERSION}. Re-shard the data with this version (scforge shard).")
    return manifest


def _open_shard(path: Path, entry: dict[str, Any], meta: dict[str, Any]) -> TokenizedCells:
    arrays: dict[str, np.ndarray | None] = {"genes": None, "values": None}
    expected = {"offsets": 8 * (entry["n_cells"] + 1), "genes": 4 * entry["n_tokens"], "values": 4 * entry["n_tokens"]}
    for kind in entry["bytes"]:
        file = path / f"{entry['name']}.{kind}"
        size = file.stat().st_size if file.is_file() else -1
        if size != expected[kind] or size != entry["bytes"][kind]:
            state = "missing" if size < 0 else f"{size} bytes, expected {expected[kind]}"
            raise ShardError(f"shard file {file} is {state}: the folder is truncated or damaged. Re-shard the data.")
        arrays[kind] = np.memmap(file, dtype=_DTYPES[kind], mode="r", shape=(expected[kind] // 8 if kind == "offsets"
                                                                               else entry["n_tokens"],))
    try:
        obs = np.load(path / f"{entry['name']}.obs.npy", allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise ShardError(f"{path / (entry['name'] + '.obs.npy')} cannot be read ({exc}). Re-shard the data.") from None
    if obs.shape[0] != entry["n_cells"]:
        raise ShardError(f"{entry['name']}: {obs.shape[0]} cell names for {entry['n_cells']} cells. Re-shard the data.")
    offsets = np.asarray(arrays["offsets"])
    if offsets[0] != 0 or offsets[-1] != entry["n_tokens"] or np.any(np.diff(offsets) < 0):
        raise ShardError(f"{entry['name']}.offsets is inconsistent with the manifest. Re-shard the data.")
    return TokenizedCells(offsets=offsets, gene_ids=arrays["genes"], values=arrays["values"], obs_names=obs,
                          meta=dict(meta))


def _same_settings(recorded: dict[str, Any], given: dict[str, Any], path: Path) -> None:
    keys = sorted(set(recorded) | set(given))
    differ = [k for k in keys if json.dumps(recorded.get(k), default=str) != json.dumps(given.get(k), default=str)]
    if differ:
        shown = ", ".join(f"{k}: shards {recorded.get(k)!r} vs given {given.get(k)!r}" for k in differ[:6])
        raise ShardError(f"{path} was tokenized with other settings ({shown}). Use the same tokenizer settings, or "
                         "re-shard the data with these.")
