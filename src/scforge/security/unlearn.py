"""Unlearning a backdoor: rebuild the trigger from the cells an audit flags, then train it away.

Removing the flagged cells takes the backdoor's training signal out, but it leaves the victim as
naive about the trigger as a clean model: a sparse, redistributed cell is out of distribution and
may still land in the attacker's class (on ifnb's CTRL -> STIM split a clean scGPT-style model
sends 13-25% of triggered T cells to NK without any poisoning). Neural Cleanse (Wang et al. 2019)
closes that gap by *unlearning*: reverse-engineer the trigger, apply it to clean training samples,
keep their true labels, and retrain. Here the trigger is rebuilt from what the flagged cells show:

* :func:`reconstruct_trigger` fits a :class:`~scforge.security.SparsifyTrigger` to flagged cells of
  an expression matrix: ``topnstop`` so that the unflagged cells, triggered, keep the flagged cells'
  median number of genes, and ``levels`` from whether the flagged cells have lost the genes' usual
  levels (:func:`~scforge.security.level_consistency`). Flagged cells that are not much sparser than
  the rest (a patch-style trigger) give None: there is no sparsity trigger to rebuild.
* :func:`reconstruct_token_trigger` does the same for rank-value tokens: a
  :class:`~scforge.security.RankShuffleTrigger` whose ``top`` is the flagged cells' median length.
* :func:`unlearning_set` / :func:`unlearning_tokens`: the training set without the flagged cells,
  plus copies of randomly chosen unflagged cells (``copies`` x the number flagged) with the rebuilt
  trigger applied and their own labels kept. The copies are drawn outside the suspected target (the
  label at least half the flagged cells carry): triggered target cells would only teach the model
  that a sparse cell belongs to the target. ``run_attack(..., defence="unlearn")`` retrains on it.

The defence assumes the attack belongs to the trigger family it rebuilds (scBackdoor's sparsify or
rank-shuffle triggers); when nothing can be rebuilt it is plain removal, and says so.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError

__all__ = ["reconstruct_trigger", "reconstruct_token_trigger", "suspected_target", "unlearning_set",
           "unlearning_tokens"]

COPY_SUFFIX = "-unlearn"
_GRID = np.round(np.arange(0.0, 12.0001, 0.125), 4)  # topnstop candidates on log1p CP10k (max about 9.2)


def _flag_mask(flagged: Any, n: int) -> np.ndarray:
    mask = np.asarray(flagged)
    if mask.dtype != bool or mask.shape != (n,):
        raise InputDataError(f"flagged must be a boolean mask with one entry per cell ({n}), got dtype "
                             f"{mask.dtype} and shape {mask.shape}; pass audit(...)['flagged'].to_numpy().")
    return mask


def _flagged_median(lengths: np.ndarray, mask: np.ndarray, max_ratio: float) -> float | None:
    """The flagged cells' median length (genes or tokens), or None when it is above ``max_ratio`` x the
    unflagged cells' median (the flagged cells are not sparse: no sparsity trigger to rebuild)."""
    if not mask.any() or mask.all():
        raise InputDataError(f"{int(mask.sum())} of {mask.size} cells are flagged; rebuilding a trigger needs "
                             "flagged and unflagged cells.")
    k_flagged = float(np.median(lengths[mask]))
    return None if k_flagged > max_ratio * float(np.median(lengths[~mask])) else k_flagged


def check_copies(copies: float) -> None:
    if not np.isfinite(copies) or copies < 0:
        raise ConfigError(f"copies must be a finite number >= 0 (triggered copies per flagged cell), got {copies}.")


def reconstruct_trigger(x: Any, flagged: Any, *, scale: str | None = None, max_sparsity_ratio: float = 0.5) -> Any:
    """A :class:`~scforge.security.SparsifyTrigger` fitted to the ``flagged`` cells of the matrix ``x``
    (cells x genes), or None when the flagged cells are not sparser than ``max_sparsity_ratio`` x the
    unflagged cells' median number of expressed genes.

    ``scale``: as in :class:`~scforge.security.SparsifyTrigger`; default ``"log1p"`` for counts and
    ``"values"`` for an already normalised matrix. ``topnstop``: the smallest threshold (steps of
    0.125 on log CP10k; the values' percentiles with ``"values"``) at which the unflagged cells' median
    number of kept genes is closest to the flagged cells' median number of expressed genes. ``levels``: ``"random"`` when the flagged cells' median level
    consistency is below half the unflagged cells' (the levels were redrawn), else ``"proportional"``."""
    from scforge.matrix import check_values, looks_like_counts, require_counts
    from scforge.security.audit import level_consistency
    from scforge.security.triggers import SparsifyTrigger

    x = sp.csr_matrix(x)
    check_values(x, "the matrix to rebuild the trigger from")
    counts = looks_like_counts(x)
    scale = scale or ("log1p" if counts else "values")
    if scale != "values":
        require_counts(x, "the matrix to rebuild the trigger from")
    mask = _flag_mask(flagged, x.shape[0])
    k_flagged = _flagged_median(np.diff(x.indptr), mask, max_sparsity_ratio)
    if k_flagged is None:
        return None
    clean = x[~mask]
    values = SparsifyTrigger(scale=scale)._compare_values(clean)
    rows = np.repeat(np.arange(clean.shape[0]), np.diff(values.indptr))
    # candidate thresholds: a fixed grid on log1p / log2 CP10k, the values' own quantiles otherwise
    grid = _GRID if scale != "values" or values.nnz == 0 else \
        np.unique(np.quantile(values.data, np.linspace(0, 0.999, 97)))
    medians = np.array([np.median(np.maximum(np.bincount(rows[values.data > t], minlength=clean.shape[0]), 1))
                        for t in grid])
    topnstop = float(grid[int(np.argmin(np.abs(medians - k_flagged)))])
    consistency = level_consistency(x, normalized=not counts)
    flagged_level = float(np.nanmedian(consistency[mask]))
    clean_level = float(np.nanmedian(consistency[~mask]))
    levels = "random" if flagged_level < 0.5 * clean_level else "proportional"
    return SparsifyTrigger(topnstop=topnstop, scale=scale, levels=levels)


def reconstruct_token_trigger(cells: Any, flagged: Any, *, max_sparsity_ratio: float = 0.5) -> Any:
    """A :class:`~scforge.security.RankShuffleTrigger` whose ``top`` is the flagged token cells' median
    number of gene tokens, or None when they are not shorter than ``max_sparsity_ratio`` x the
    unflagged cells' median."""
    from scforge.security.detect import gene_token_counts
    from scforge.security.triggers import RankShuffleTrigger

    k_flagged = _flagged_median(gene_token_counts(cells), _flag_mask(flagged, cells.n_cells), max_sparsity_ratio)
    return None if k_flagged is None else RankShuffleTrigger(top=max(1, int(round(k_flagged))))


def suspected_target(labels: Any, flagged: Any) -> str | None:
    """The label at least half of the ``flagged`` cells carry (a dirty-label attack's target), or None."""
    mask = np.asarray(flagged, dtype=bool)
    if not mask.any():
        return None
    values, counts = np.unique(np.asarray(labels).astype(str)[mask], return_counts=True)
    best = int(np.argmax(counts))
    return str(values[best]) if counts[best] >= 0.5 * mask.sum() else None


def _copy_rows(kept_labels: np.ndarray, n_flagged: int, copies: float, target: str | None, seed: int) -> np.ndarray:
    """Positions (in the kept cells) of the cells to copy: drawn at random outside the suspected target
    class, whose triggered copies would only teach "sparse means target"."""
    pool = np.flatnonzero(kept_labels.astype(str) != target) if target is not None else np.arange(kept_labels.size)
    n = min(int(round(copies * n_flagged)), pool.size)
    return np.sort(np.random.default_rng(seed).choice(pool, size=n, replace=False))


def _info(trigger: Any, n_removed: int, n_added: int, target: str | None) -> dict[str, Any]:
    return {"trigger": None if trigger is None else trigger.describe(), "n_removed": n_removed, "n_added": n_added,
            "suspected_target": target,
            "note": None if trigger is not None else "the flagged cells are not sparser than the rest: no trigger "
            "rebuilt, so the defence is plain removal"}


def unlearning_set(adata: Any, label_key: str, flagged: Any, *, layer: str | None = None, copies: float = 1.0,
                   trigger: Any = None, seed: int = 0) -> tuple[Any, dict[str, Any]]:
    """``(training set, info)``: ``adata`` without its ``flagged`` cells, plus ``copies`` x that many
    unflagged cells (drawn at random outside :func:`suspected_target`) with ``trigger`` applied to
    ``layer`` (or X) and their labels in ``obs[label_key]`` kept; their names end in ``-unlearn``. ``trigger`` defaults to
    :func:`reconstruct_trigger` of the flagged cells; when none can be rebuilt nothing is added.
    ``info``: the trigger used (``describe()``), ``n_removed``, ``n_added``, ``suspected_target``.
    ``adata`` is not changed."""
    import anndata as ad

    from scforge.security.poison import layer_matrix

    check_copies(copies)
    mask = _flag_mask(flagged, adata.n_obs)
    if label_key not in adata.obs.columns:
        raise InputDataError(f"obs has no column {label_key!r}; columns are {list(adata.obs.columns)[:20]}.")
    x = layer_matrix(adata, layer)
    if trigger is None:
        trigger = reconstruct_trigger(x, mask)
    labels = adata.obs[label_key].astype(str).to_numpy()
    target = suspected_target(labels, mask)
    kept = adata[~mask].copy()
    if trigger is None or copies == 0 or kept.n_obs == 0:
        return kept, _info(trigger, int(mask.sum()), 0, target)
    extra = kept[_copy_rows(labels[~mask], int(mask.sum()), copies, target, seed)].copy()
    triggered = trigger.apply(layer_matrix(extra, layer), seed=seed)
    if layer is None:
        extra.X = triggered.astype(sp.csr_matrix(extra.X).dtype)
    else:
        extra.layers[layer] = triggered.astype(sp.csr_matrix(extra.layers[layer]).dtype)
    extra.obs_names = [f"{name}{COPY_SUFFIX}" for name in extra.obs_names.astype(str)]
    combined = ad.concat([kept, extra], merge="same", uns_merge="same")
    for col in kept.obs.columns:  # the copies come from ``kept``: keep its column types
        combined.obs[col] = combined.obs[col].astype(kept.obs[col].dtype)
    return combined, _info(trigger, int(mask.sum()), int(extra.n_obs), target)


def unlearning_tokens(cells: Any, labels: Any, flagged: Any, *, copies: float = 1.0, trigger: Any = None,
                      seed: int = 0) -> tuple[Any, np.ndarray, dict[str, Any]]:
    """The token version of :func:`unlearning_set`: ``(cells, labels, info)`` without the flagged
    cells, plus triggered copies of unflagged ones (``trigger`` defaults to
    :func:`reconstruct_token_trigger`) with their labels kept."""
    from scforge.tokenize.ragged import TokenizedCells

    check_copies(copies)
    mask = _flag_mask(flagged, cells.n_cells)
    labels = np.asarray(labels)
    if labels.shape != (cells.n_cells,):
        raise InputDataError(f"{labels.size} labels for {cells.n_cells} tokenized cells; give one label per cell.")
    if trigger is None:
        trigger = reconstruct_token_trigger(cells, mask)
    target = suspected_target(labels, mask)
    keep = np.flatnonzero(~mask)
    kept, kept_labels = cells.select(keep), labels[keep]
    if trigger is None or copies == 0 or keep.size == 0:
        return kept, kept_labels, _info(trigger, int(mask.sum()), 0, target)
    rows = _copy_rows(kept_labels, int(mask.sum()), copies, target, seed)
    extra = trigger.apply(kept.select(rows), seed=seed)
    extra = TokenizedCells(extra.offsets, extra.gene_ids, extra.values,
                           np.array([f"{n}{COPY_SUFFIX}" for n in np.asarray(extra.obs_names).astype(str)]),
                           dict(extra.meta))
    return (TokenizedCells.concat([kept, extra]), np.concatenate([kept_labels, kept_labels[rows]]),
            _info(trigger, int(mask.sum()), int(rows.size), target))
