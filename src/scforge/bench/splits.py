"""Few-shot splits shared by every method: one fixed stratified test set, and per (fraction, seed) a
stratified subsample of the remaining training pool.

Stratification is per class and never empties a class: the test set takes ``round(test_size * n)``
cells of each class with at least 2 cells (at least one stays for training), and a fraction ``f`` keeps
``max(1, round(f * n))`` training cells of each class. Everything is drawn with numpy's seeded
generator from the labels alone, so the same labels, fractions and seeds give the same splits for
every method, model and run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from scforge._inputs import as_labels
from scforge.errors import ConfigError, InputDataError


@dataclass(frozen=True)
class Split:
    """Row positions (into the labelled cells) of one few-shot training set and the shared test set."""

    fraction: float
    seed: int
    train: np.ndarray
    test: np.ndarray


def _labels(labels: Any) -> np.ndarray:
    y = as_labels(labels, hint="select the labelled cells first")
    if y.size == 0:
        raise InputDataError("no cells to split.")
    return y.astype(str)


def holdout_split(labels: Any, test_size: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train_pool, test)`` sorted positions: a stratified test set of ``test_size`` per class."""
    if not 0 < test_size < 1:
        raise ConfigError(f"test_size must lie in (0, 1), got {test_size}")
    y = _labels(labels)
    rng = np.random.default_rng(seed)
    test = []
    for cls in np.unique(y):
        idx = np.flatnonzero(y == cls)
        if idx.size < 2:
            continue
        k = min(max(int(round(test_size * idx.size)), 1), idx.size - 1)
        test.append(rng.choice(idx, size=k, replace=False))
    test_idx = np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)
    if test_idx.size == 0:
        raise InputDataError("no class has 2 or more cells, so nothing can be held out for testing.")
    pool = np.setdiff1d(np.arange(y.size), test_idx)
    return pool, test_idx


def subsample(labels: Any, pool: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted positions of a stratified ``fraction`` of ``pool`` (every class keeps at least one cell)."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"fractions must lie in (0, 1], got {fraction}")
    y = _labels(labels)
    pool = np.asarray(pool, dtype=np.int64)
    if fraction == 1:
        return np.sort(pool)
    rng = np.random.default_rng([seed, int(round(fraction * 1e6))])
    keep = []
    for cls in np.unique(y[pool]):
        idx = pool[y[pool] == cls]
        k = min(max(int(round(fraction * idx.size)), 1), idx.size)
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def few_shot_splits(labels: Any, fractions: Sequence[float] = (0.1, 0.25, 0.5, 0.75, 1.0),
                    seeds: Sequence[int] = (0, 1, 2), *, test_size: float = 0.2, split_seed: int = 0) -> list[Split]:
    """Every (fraction, seed) training set over one fixed test set (see the module docstring)."""
    pool, test = holdout_split(labels, test_size, split_seed)
    return [Split(float(f), int(s), subsample(labels, pool, f, s), test) for f in fractions for s in seeds]
