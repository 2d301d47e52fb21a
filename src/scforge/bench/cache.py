"""On-disk caches of the experiment matrix: content fingerprints, embeddings and finished result parts.

Everything is keyed by content (sha256 of files and settings), so a changed model, dataset or setting
gets a new key and is recomputed, and an unchanged one is read back. Files are written to a temporary
name and renamed, so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex sha256 (first ``n`` characters) of ``obj``'s canonical JSON."""
    text = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def _file_sha(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)


def fingerprint(path: str | os.PathLike, memo: Path | None = None) -> str:
    """sha256 of a file's bytes, or of a folder's files (relative names and bytes, sorted). A folder's
    Markdown files (a model card, a README) are documentation and left out: editing them does not
    invalidate results. With ``memo`` (a JSON file), results are remembered by (path, size, mtime)
    so big files hash once."""
    p = Path(path).resolve()
    files = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix.lower() != ".md") if p.is_dir() else [p]
    stamp = [[str(q), q.stat().st_size, q.stat().st_mtime_ns] for q in files]
    key = stable_hash(stamp, 40)
    table: dict[str, str] = {}
    if memo is not None and memo.is_file():
        try:
            table = json.loads(memo.read_text())
        except (OSError, ValueError):
            table = {}
        if key in table:
            return table[key]
    h = hashlib.sha256()
    for q in files:
        h.update(str(q.relative_to(p) if p.is_dir() else q.name).encode())
        _file_sha(q, h)
    digest = h.hexdigest()
    if memo is not None:
        table[key] = digest
        atomic_write_text(memo, json.dumps(table, indent=0))
    return digest


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ArrayCache:
    """``.npy`` arrays (with a JSON note of what they are) under ``root``, by key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            return np.load(p, allow_pickle=False)
        except (OSError, ValueError):  # damaged entry: recompute
            return None

    def put(self, key: str, array: np.ndarray, note: dict[str, Any]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.{os.getpid()}.tmp.npy"
        np.save(tmp, np.ascontiguousarray(array), allow_pickle=False)
        os.replace(tmp, self.path(key))
        atomic_write_text(self.root / f"{key}.json", json.dumps(note, indent=1, default=str))


class PartStore:
    """Finished matrix units: one parquet file of tidy rows per unit id."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, unit_id: str) -> Path:
        return self.root / f"{unit_id}.parquet"

    def has(self, unit_id: str) -> bool:
        return self.path(unit_id).is_file()

    def read(self, unit_id: str) -> pd.DataFrame:
        return pd.read_parquet(self.path(unit_id))

    def write(self, unit_id: str, rows: pd.DataFrame) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{unit_id}.{os.getpid()}.tmp.parquet"
        rows.to_parquet(tmp, index=False)
        os.replace(tmp, self.path(unit_id))
