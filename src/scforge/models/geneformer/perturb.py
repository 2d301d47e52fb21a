"""In-silico perturbation in the manner of Geneformer's ``InSilicoPerturber`` and ``InSilicoPerturberStats``.

``delete`` removes the gene's token from the rank encoding; ``overexpress`` moves it to the front (right
after ``<cls>`` when the dictionary has one), inserting it when the cell does not express it and
truncating to the model's input size. Genes are perturbed one at a time or, with ``combine=True``,
together. Outputs (pandas DataFrames, no pickles):

* per cell and perturbation: cosine similarity of the original and perturbed cell embeddings;
* optionally per affected gene: cosine similarity of each other gene's embedding before and after (the
  perturbed genes removed before comparing, genes matched by identity).

:func:`perturbation_stats` aggregates per perturbation (mean/median/std, cells) and compares each against a
null of random-gene perturbations (Wilcoxon rank-sum, Benjamini-Hochberg FDR), like ``vs_null``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from scforge.errors import ConfigError, InputDataError
from scforge.tokenize.ragged import TokenizedCells

PERTURB_TYPES = ("delete", "overexpress")


@dataclass
class PerturbationResult:
    """``cell_shifts``: one row per (cell, perturbation): ``cell``, ``cell_index``, ``perturbed`` (token(s),
    ``+``-joined), ``n_perturbed_present``, ``cosine_similarity``. ``gene_shifts`` (when asked): one row per
    (cell, perturbation, affected gene) with ``affected_gene`` and ``cosine_similarity``."""

    cell_shifts: pd.DataFrame
    gene_shifts: pd.DataFrame | None
    perturb_type: str


def _gene_span(model, seq: np.ndarray) -> tuple[int, int]:
    return (1, len(seq) - 1) if model.has_cls else (0, len(seq))


def perturbed_sequence(model, seq: np.ndarray, ids: np.ndarray, perturb_type: str, input_size: int) -> np.ndarray:
    """One cell's rank encoding after deleting or overexpressing the tokens ``ids``."""
    lo, hi = _gene_span(model, seq)
    genes = seq[lo:hi]
    rest = genes[~np.isin(genes, ids)]
    if perturb_type == "delete":
        new = rest
    else:
        new = np.concatenate([ids.astype(seq.dtype), rest])[: input_size - (2 if model.has_cls else 0)]
    return np.concatenate([seq[:lo], new, seq[hi:]]) if model.has_cls else new


def _plan(model, cells: TokenizedCells, targets: list[np.ndarray] | None, perturb_type: str, input_size: int):
    """(cell index, perturbed ids, number present, new sequence) for every perturbation to run."""
    plan = []
    for c in range(cells.n_cells):
        seq = cells.cell(c)[0]
        lo, hi = _gene_span(model, seq)
        groups = [np.asarray([g]) for g in seq[lo:hi]] if targets is None else targets
        for ids in groups:
            present = int(np.isin(ids, seq[lo:hi]).sum())
            if perturb_type == "delete" and present == 0:
                continue  # the reference only perturbs cells that express the gene
            new = perturbed_sequence(model, seq, ids, perturb_type, input_size)
            if new.size <= (2 if model.has_cls else 0):
                continue  # deleting every gene leaves nothing to embed
            plan.append((c, ids, present, new))
    return plan


def _as_cells(sequences: list[np.ndarray], meta: dict) -> TokenizedCells:
    lengths = np.asarray([s.size for s in sequences], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ids = np.concatenate(sequences).astype(np.int32) if sequences else np.zeros(0, np.int32)
    return TokenizedCells(offsets=offsets, gene_ids=ids, values=None,
                          obs_names=np.arange(len(sequences)).astype(str), meta=meta)


def in_silico_perturb(
    model,
    data: Any,
    genes: Sequence[str] | None = None,
    *,
    perturb_type: str = "delete",
    combine: bool = False,
    cells: Sequence[int] | None = None,
    layer: str | None = None,
    emb_layer: int = -1,
    mode: str = "auto",
    gene_shifts: bool = False,
    batch_size: int = 64,
    device: Any = "auto",
    precision: str = "auto",
    max_length: int | None = None,
    progress: bool = False,
) -> PerturbationResult:
    """Perturb ``genes`` (names or Ensembl ids; ``None``: every gene of each cell, one at a time) in
    ``data`` (raw counts or :class:`TokenizedCells` from ``model.tokenize``), optionally only in the cells at
    positions ``cells``. ``model`` is a :class:`~scforge.models.geneformer.Geneformer`; ``emb_layer`` and
    ``mode`` as in :meth:`Geneformer.embed`. Perturbed sequences run in packed, length-sorted batches."""
    if perturb_type not in PERTURB_TYPES:
        raise ConfigError(f"perturb_type={perturb_type!r}; choose one of {PERTURB_TYPES}.")
    if genes is None and combine:
        raise ConfigError("combine=True needs genes= (the set to perturb together).")
    mode = model.resolve_mode(mode)
    tokenized = data if isinstance(data, TokenizedCells) else model.tokenize(data, layer, max_length=max_length)
    if cells is not None:
        tokenized = tokenized.select(np.asarray(cells, dtype=np.int64))
    positions = np.arange(tokenized.n_cells) if cells is None else np.asarray(cells, dtype=np.int64)
    model.require_genes(tokenized)
    input_size = int(tokenized.meta.get("model_input_size") or model.config.max_position_embeddings)
    targets = None
    if genes is not None:
        ids = model.gene_ids(list(genes))
        targets = [ids] if combine else [np.asarray([i]) for i in ids]
    plan = _plan(model, tokenized, targets, perturb_type, input_size)
    if not plan:
        raise InputDataError("None of the cells expresses the genes to delete; there is nothing to perturb.")
    run = dict(emb_layer=emb_layer, batch_size=batch_size, device=device, precision=precision, progress=progress)

    original = np.zeros((tokenized.n_cells, model.config.hidden_size), dtype=np.float32)
    states: dict[int, np.ndarray] = {}
    for idx, b, h in model.hidden_batches(tokenized, desc="original cells", **run):
        original[idx] = model.pool(h, b["cu_seqlens"], mode).cpu().numpy()
        if gene_shifts:
            cu = b["cu_seqlens"].numpy()
            for j, c in enumerate(idx):
                states[int(c)] = h[cu[j]:cu[j + 1]].float().cpu().numpy()

    perturbed = _as_cells([p[3] for p in plan], tokenized.meta)
    cosine = np.zeros(len(plan), dtype=np.float32)
    gene_rows: list[pd.DataFrame] = []
    for idx, b, h in model.hidden_batches(perturbed, desc=f"{perturb_type} perturbations", **run):
        emb = model.pool(h, b["cu_seqlens"], mode)
        cells_of = torch.as_tensor(np.asarray([plan[i][0] for i in idx]))
        cosine[idx] = F.cosine_similarity(emb, torch.from_numpy(original)[cells_of].to(emb.device), dim=-1).cpu().numpy()
        if gene_shifts:
            cu = b["cu_seqlens"].numpy()
            hidden = h.float().cpu().numpy()
            for j, p in enumerate(idx):
                gene_rows.append(_gene_shift_rows(model, tokenized, plan[p], states, hidden[cu[j]:cu[j + 1]],
                                                  positions))
    names = np.asarray(tokenized.obs_names).astype(str)
    label = [_label(model, p[1]) for p in plan]
    cell_shifts = pd.DataFrame({
        "cell": names[[p[0] for p in plan]], "cell_index": positions[[p[0] for p in plan]], "perturbed": label,
        "n_perturbed_present": [p[2] for p in plan], "cosine_similarity": cosine,
    })
    genes_df = None
    if gene_shifts:
        genes_df = pd.concat(gene_rows, ignore_index=True) if gene_rows else pd.DataFrame(
            columns=["cell", "cell_index", "perturbed", "affected_gene", "cosine_similarity"])
    return PerturbationResult(cell_shifts, genes_df, perturb_type)


def _label(model, ids: np.ndarray) -> str:
    return "+".join(model.vocab.token(int(i)) for i in ids)


def _gene_shift_rows(model, cells: TokenizedCells, item, states, hidden: np.ndarray, positions) -> pd.DataFrame:
    """Cosine similarity of every other gene's embedding before/after, matched by gene identity."""
    c, ids, _, new = item
    seq = cells.cell(c)[0]
    lo, hi = _gene_span(model, seq)
    new_lo, new_hi = _gene_span(model, new)
    before = {int(g): k for k, g in enumerate(seq[lo:hi], start=lo)}
    after_pos = np.arange(new_lo, new_hi)
    after_pos = after_pos[~np.isin(new[after_pos], ids)]
    after_pos = np.asarray([k for k in after_pos if int(new[k]) in before], dtype=np.int64)
    before_pos = np.asarray([before[int(new[k])] for k in after_pos], dtype=np.int64)
    a, b = states[c][before_pos], hidden[after_pos]
    cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    return pd.DataFrame({
        "cell": str(np.asarray(cells.obs_names)[c]), "cell_index": int(positions[c]), "perturbed": _label(model, ids),
        "affected_gene": [model.vocab.token(int(g)) for g in new[after_pos]], "cosine_similarity": cos.astype(np.float32),
    })


def random_expressed_genes(cells: TokenizedCells, n: int, *, seed: int = 0, exclude: Sequence[int] = (),
                           special_ids: Sequence[int] = (0, 1, 2, 3)) -> np.ndarray:
    """``n`` distinct token ids drawn (seeded) from the genes the cells express: a null set for
    :func:`perturbation_stats` (perturb them with ``genes=[vocab.token(i) for i in ids]``)."""
    expressed = np.unique(cells.gene_ids)
    expressed = expressed[~np.isin(expressed, np.asarray(list(special_ids) + list(exclude)))]
    if n > expressed.size:
        raise ConfigError(f"only {expressed.size} genes are expressed; cannot draw {n} null genes.")
    return np.sort(np.random.default_rng(seed).choice(expressed, size=n, replace=False))


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order."""
    p = np.asarray(p, dtype=np.float64)
    n = p.size
    if n == 0:
        return p
    order = np.argsort(p)
    scaled = p[order] * n / np.arange(1, n + 1)
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(n)
    out[order] = np.minimum(q, 1.0)
    return out


def perturbation_stats(result: PerturbationResult | pd.DataFrame, null: PerturbationResult | pd.DataFrame | None = None
                       ) -> pd.DataFrame:
    """Per perturbation: ``n_cells``, ``cosine_sim_mean``/``median``/``std`` and ``shift_mean`` (1 - mean
    similarity), like ``InSilicoPerturberStats(mode="aggregate_data")``. With ``null`` (random-gene
    perturbations of the same cells), also ``null_cosine_sim_mean``, ``p_value`` (two-sided Wilcoxon
    rank-sum of the perturbation's similarities against the null's) and ``fdr`` (Benjamini-Hochberg), like
    ``mode="vs_null"``; rows sorted by ``p_value``. Otherwise sorted by ``shift_mean``, largest first."""
    from scipy.stats import ranksums

    df = result.cell_shifts if isinstance(result, PerturbationResult) else result
    grouped = df.groupby("perturbed", sort=True)["cosine_similarity"]
    stats = pd.DataFrame({"n_cells": grouped.size(), "cosine_sim_mean": grouped.mean(),
                          "cosine_sim_median": grouped.median(), "cosine_sim_std": grouped.std(ddof=1)})
    stats["shift_mean"] = 1.0 - stats["cosine_sim_mean"]
    if null is None:
        return stats.sort_values("shift_mean", ascending=False)
    null_df = null.cell_shifts if isinstance(null, PerturbationResult) else null
    null_values = null_df["cosine_similarity"].to_numpy(dtype=np.float64)
    if null_values.size < 2:
        raise ConfigError("the null needs at least 2 perturbed cells; perturb more random genes.")
    stats["null_cosine_sim_mean"] = float(null_values.mean())
    stats["p_value"] = [float(ranksums(values.to_numpy(dtype=np.float64), null_values).pvalue)
                        for _, values in grouped]
    stats["fdr"] = benjamini_hochberg(stats["p_value"].to_numpy())
    return stats.sort_values("p_value")
