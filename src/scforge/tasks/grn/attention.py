"""Attention networks (scGPT's attention-GRN recipe), aggregated over cells in one streaming pass.

For the cells of a state, every gene of a gene list is tokenized in every cell (zeros included,
``<cls>`` first, scGPT's value bins). For each chosen layer the raw attention scores ``q @ k^T`` of
every head are recomputed from that layer's input (no softmax and no scaling, as the tutorial; a
flash kernel never returns them). Each cell's gene x gene map (the ``<cls>`` row and column left
out) is rank-normalised by rows, then by columns (rank / G, ties broken by position), averaged over
heads and layers, and added to a running [G, G] sum: no cell's map outlives its batch.

Unlike the tutorial's loop, the first cell of each condition is counted (the tutorial starts its
running sum at zeros and skips that cell's map).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.data.network import state_cells
from scforge.errors import ConfigError, GeneIdentityError
from scforge.data.network import GeneNetwork

logger = logging.getLogger("scforge")


def rank_normalize(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores [..., G, G]`` within each row, then ranks of those within each column, divided
    by G (values 0 .. (G-1)/G; equal values are ranked by position, as a stable sort)."""
    g = scores.shape[-1]
    return _ranks(_ranks(scores, -1), -2) / g


def _ranks(x: torch.Tensor, dim: int) -> torch.Tensor:
    order = torch.argsort(x, dim=dim, stable=True)
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    positions = torch.arange(x.shape[dim], device=x.device).view(shape).expand_as(order)
    ranks = torch.empty_like(order)
    ranks.scatter_(dim, order, positions)
    return ranks.to(torch.float32)


def _check_model(model: Any) -> Any:
    module = getattr(model, "module", None)
    layers = getattr(getattr(module, "transformer_encoder", None), "layers", None)
    if module is None or layers is None or not hasattr(module, "embed_tokens") or not hasattr(model, "vocab"):
        raise ConfigError(f"attention networks need an scGPT-family model (scforge.load(...)); got "
                          f"{type(model).__name__}.")
    if not all(hasattr(layer.self_attn, "qkv") for layer in layers):
        raise ConfigError("this model's attention does not expose q and k (e.g. Performer attention); attention "
                          "networks need softmax attention layers.")
    c = module.config
    if c.use_batch_labels or c.domain_spec_batchnorm:
        raise ConfigError("this model needs batch labels (use_batch_labels / DSBN); attention networks support "
                          "models without them.")
    return module


def _layer_list(layers: Sequence[int] | None, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    chosen = sorted({int(i) % n_layers if -n_layers <= int(i) < n_layers else -1 for i in layers})
    if not chosen or chosen[0] < 0:
        raise ConfigError(f"layers={list(layers)!r}; give indices in 0..{n_layers - 1} (negative counts from the end).")
    return chosen


def tokenize_genes(model: Any, adata: Any, genes: Sequence[str], cells: np.ndarray, *, layer: str | None = None,
                   seed: int = 0) -> tuple[Any, list[str]]:
    """Tokens of ``genes`` (all of them, zeros included, ``<cls>`` first) for ``cells``, with the
    model's ``embed`` binning; returns the tokenized cells and the gene names in token order."""
    from scforge.tokenize import BinnedTokenizer

    if isinstance(genes, str) or len(genes) < 2:
        raise ConfigError("genes must be a list of at least 2 gene names (e.g. the data's HVGs).")
    names = list(dict.fromkeys(str(g) for g in genes))
    var = pd.Index(adata.var_names.astype(str))
    absent = [g for g in names if g not in var]
    if absent:
        raise GeneIdentityError(f"{len(absent)} genes are not in the data's var_names: {absent[:10]}.")
    ids = model._gene_ids(names, missing="drop")
    known = [(g, int(i)) for g, i in zip(names, ids) if i >= 0]
    if len(known) < 2:
        raise GeneIdentityError(f"only {len(known)} of {len(names)} genes are in the model's vocabulary; an attention "
                                "network needs at least 2.")
    if len(known) < len(names):
        logger.info("attention network: %d of %d genes are not in the vocabulary and are left out",
                    len(names) - len(known), len(names))
    sub = adata[cells][:, [g for g, _ in known]].copy()
    model._check_input(sub, layer, False)  # the same input check as embed()
    c = model.config
    tok = BinnedTokenizer(model.vocab, n_bins=c.n_bins, normalize_total=None, log1p=False, cls_value=c.pad_value,
                          include_zero_gene=True, seed=seed, pad_value=c.pad_value, mask_value=c.mask_value)
    tokens = tok.tokenize(sub, layer=layer, progress=False)
    name_of = {}
    for g, i in known:
        name_of.setdefault(i, g)
    order = [name_of[int(t)] for t in tokens.cell(0)[0][1:]]
    return tokens, order


def layer_inputs(module: Any, genes: torch.Tensor, values: torch.Tensor, layers: list[int]):
    """Yield ``(layer index, layer, attention input [B, L, d])`` for the chosen layers (padding-free batch)."""
    x, _ = module.embed_tokens(genes, values)
    last = max(layers)
    for i, block in enumerate(module.transformer_encoder.layers):
        if i in layers:
            yield i, block, (x if block.norm == "post" else block.norm1(x))
        if i == last:
            return
        x = block(x)


def raw_scores(block: Any, x: torch.Tensor) -> torch.Tensor:
    """``q @ k^T`` per head between gene positions (``<cls>`` at 0 left out): ``[B, H, G, G]``."""
    q, k, _ = block.self_attn.qkv(x)
    return torch.einsum("bihd,bjhd->bhij", q[:, 1:], k[:, 1:])


def attention_network(
    model: Any,
    adata: Any,
    genes: Sequence[str],
    *,
    state_key: str | None = None,
    state: Any | None = None,
    layers: Sequence[int] | None = None,
    layer: str | None = None,
    batch_size: int = 16,
    max_cells: int | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
) -> GeneNetwork:
    """Directed gene x gene network: the mean over cells (``obs[state_key] == state``, or all), heads
    and ``layers`` (default all) of rank-normalised raw attention scores, accumulated batch by batch.

    ``weights.loc[a, b]`` is how much gene a's token attends to gene b's. ``adata`` holds raw counts
    (``layer`` picks another matrix); ``max_cells`` draws a seeded subset of the state's cells."""
    from tqdm.auto import tqdm

    from scforge.nn import resolve_device

    module = _check_model(model)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    chosen = _layer_list(layers, len(module.transformer_encoder.layers))
    cells = state_cells(adata, state_key, state)
    if max_cells is not None and cells.size > max_cells:
        cells = np.sort(np.random.default_rng(seed).choice(cells, size=int(max_cells), replace=False))
    tokens, names = tokenize_genes(model, adata, genes, cells, layer=layer, seed=seed)
    dev = resolve_device(device)
    was_training = module.training
    module.to(dev).eval()
    g, width = len(names), len(names) + 1
    total = torch.zeros(g, g, dtype=torch.float64, device=dev)
    starts = range(0, tokens.n_cells, batch_size)
    try:
        with torch.inference_mode():
            for lo in tqdm(starts, desc="attention network", unit="batch", disable=not progress, leave=False):
                b = tokens.pack(np.arange(lo, min(lo + batch_size, tokens.n_cells)))
                ids = b["genes"].to(dev).view(-1, width)
                values = b["values"].to(dev).view(-1, width)
                for _, block, x in layer_inputs(module, ids, values, chosen):
                    total += rank_normalize(raw_scores(block, x)).mean(dim=1).sum(dim=0, dtype=torch.float64)
    finally:
        module.train(was_training)
    weights = (total / (tokens.n_cells * len(chosen))).cpu().numpy()
    index = pd.Index(names, name="gene")
    info = {"n_cells": int(tokens.n_cells), "layers": chosen, "state_key": state_key,
            "state": None if state is None else str(state), "n_genes": g}
    logger.info("attention network: %d cells, %d genes, layers %s", tokens.n_cells, g, chosen)
    return GeneNetwork(pd.DataFrame(weights, index=index, columns=index), "attention", directed=True, info=info)


def attention_difference(model: Any, adata: Any, key: str, a: Any, b: Any, genes: Sequence[str],
                         **kwargs: Any) -> GeneNetwork:
    """``attention_network(state a) - attention_network(state b)`` over the same genes (e.g. STIM - CTRL);
    ``kwargs`` as :func:`attention_network`."""
    net_a = attention_network(model, adata, genes, state_key=key, state=a, **kwargs)
    net_b = attention_network(model, adata, genes, state_key=key, state=b, **kwargs)
    return net_a - net_b
