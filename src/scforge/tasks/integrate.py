"""Batch integration: scGPT's integration fine-tuning recipe, zero-shot embeddings of any family, and
the scib-metrics comparison against unintegrated PCA and Harmony.

>>> integrated = integrate(scforge.load("default"), adata, batch_key="stim")  # obsm["X_scGPT_integrated"]
>>> integrated.save("ifnb_integrated/"); integrated.embed(more_cells, batch_key="stim")
>>> zero_shot_integration(geneformer, adata, key_added="X_geneformer")      # any family, no training
>>> report = evaluate_integration(adata, ["X_scGPT_integrated"], "cell_type", "stim")

The fine-tuning follows scGPT's integration tutorial (``examples/finetune_integration.py``): raw counts
normalised to 1e4 and log1p, the ``n_hvg`` most variable genes (seurat_v3 on counts, per batch) of
those in the vocabulary with >= 3 counts, every one of them tokenized for every cell, zeros included
(``<cls>`` first with value 0, ``n_hvg + 1`` tokens), per-cell value bins; 40% of the gene values
masked and predicted (GEP, from the token outputs, and GEPC/MVC, from the cell embedding, each with
its zero-probability term), elastic cell similarity (ECS, weight 10, threshold 0.8), the batch
discriminator behind gradient reversal (DAR, weight 1), domain-specific batch norm (DSBN) with every
minibatch drawn from one batch, batch embeddings concatenated to the decoders' input; Adam without
weight decay, lr 1e-4 x 0.9 each epoch, gradient clipping 1.0, the epoch with the lowest validation
loss kept. Documented differences: the ``<cls>`` position is never masked (the reference can mask it),
and cell embeddings are computed one batch at a time, so DSBN always normalises a cell with its own
batch's statistics (the reference's ``encode_batch`` uses the first cell's batch for each chunk).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.errors import CheckpointError, ConfigError, InputDataError
from scforge.tokenize.ragged import TokenizedCells

logger = logging.getLogger("scforge")

FAMILY = "scgpt-integration"
DEFAULT_KEY = "X_scGPT_integrated"


@dataclass
class IntegrationSettings:
    """The recipe's settings; the defaults are those of scGPT's integration tutorial."""

    n_hvg: int = 1200
    min_gene_counts: int = 3
    mask_ratio: float = 0.4
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-4
    gamma: float = 0.9
    ecs_threshold: float = 0.8
    ecs_weight: float = 10.0
    dar_weight: float = 1.0
    mvc: bool = True
    dsbn: bool = True
    explicit_zero_prob: bool = True
    dropout: float = 0.2
    val_fraction: float = 0.1
    grad_clip: float | None = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.n_hvg >= 2, f"n_hvg must be >= 2, got {self.n_hvg}"),
            (self.min_gene_counts >= 0, f"min_gene_counts must be >= 0, got {self.min_gene_counts}"),
            (0.0 < self.mask_ratio < 1.0, f"mask_ratio must be in (0, 1), got {self.mask_ratio}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (ECS compares cells of a minibatch), got {self.batch_size}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (min(self.ecs_weight, self.dar_weight) >= 0, "ecs_weight and dar_weight must be >= 0"),
            (0 <= self.dropout < 1, f"dropout must be in [0, 1), got {self.dropout}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"IntegrationSettings: {message}.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- inputs ------------------------------------------------------------------------------------
def batch_codes(adata: Any, batch_key: str, categories: list[str] | None = None) -> tuple[list[str], np.ndarray]:
    """Batch categories (sorted, as str) and one integer code per cell from ``adata.obs[batch_key]``.

    With ``categories`` (a trained model's batches) every cell's batch must be one of them."""
    obs = getattr(adata, "obs", None)
    if obs is None:
        raise InputDataError(f"integration needs an AnnData with the batch in obs, got {type(adata).__name__}.")
    if batch_key not in obs.columns:
        raise InputDataError(f"obs has no column {batch_key!r} with the batches; columns: {list(obs.columns)[:15]}.")
    column = obs[batch_key]
    if column.isna().any():
        raise InputDataError(f"obs[{batch_key!r}] is missing for {int(column.isna().sum())} cells; every cell needs "
                             "a batch. Fill them in or drop those cells (on a copy).")
    text = column.astype(str).to_numpy()
    if categories is None:
        categories = sorted(set(text))
        if len(categories) < 2:
            raise InputDataError(f"obs[{batch_key!r}] has one batch ({categories}); integration needs >= 2.")
    lookup = {c: i for i, c in enumerate(categories)}
    unknown = sorted(set(text) - set(lookup))
    if unknown:
        raise InputDataError(f"obs[{batch_key!r}] has batches {unknown[:5]} the model was not trained on; its "
                             f"domain-specific batch norm knows {categories}. Fine-tune on data with these batches.")
    return list(categories), np.array([lookup[t] for t in text], dtype=np.int64)


def integration_genes(model: Any, adata: Any, batch_key: str | None, *, n_hvg: int = 1200, layer: str | None = None,
                      min_counts: int = 3) -> list[str]:
    """The genes the recipe tokenizes: of the data's genes in ``model``'s vocabulary with at least
    ``min_counts`` counts in total, the ``n_hvg`` most variable (seurat_v3 on raw counts, ranked
    across batches by ``batch_key``), in the data's order. Fewer genes left than ``n_hvg``: all of them."""
    from scforge.genes import align_genes
    from scforge.matrix import as_source, column_sums
    from scforge.tokenize.hvg import select_hvg

    source = as_source(adata, layer=layer)
    names = np.asarray(source.gene_names(None)).astype(str)
    ids = np.asarray(align_genes(list(names), model.vocab).token_ids)
    totals = column_sums(source)
    keep = (ids >= 0) & (totals >= min_counts)
    # one data column per token (the first), as the tokenizer keeps
    _, first = np.unique(np.where(keep, ids, -1), return_index=True)
    unique = np.zeros(keep.size, dtype=bool)
    unique[first] = True
    keep &= unique
    if keep.sum() < 2:
        raise InputDataError(f"only {int(keep.sum())} genes of the data are in the model's vocabulary with >= "
                             f"{min_counts} counts; integration needs more. Check the gene names (var_names).")
    if keep.sum() <= n_hvg:
        return names[keep].tolist()
    try:
        chosen = select_hvg(adata[:, keep], n_hvg, flavor="seurat_v3", layer=layer, batch_key=batch_key)
    except ValueError as exc:  # skmisc's loess fails on genes seen in a handful of cells of a batch
        detected = _detected_in_every_batch(source.matrix, adata, batch_key) & keep
        logger.warning("seurat_v3 HVG selection failed (%s); retrying on the %d genes detected in >= 3 cells of "
                       "every batch.", exc, int(detected.sum()))
        if detected.sum() <= n_hvg:
            return names[detected].tolist()
        try:
            chosen = select_hvg(adata[:, detected], n_hvg, flavor="seurat_v3", layer=layer, batch_key=batch_key)
        except ValueError as exc2:
            raise InputDataError(f"scanpy's highly_variable_genes(flavor='seurat_v3') failed on {source.where}: "
                                 f"{exc2}. Use more cells per batch or a smaller n_hvg.") from None
    chosen = set(chosen)
    return [g for g in names[keep] if g in chosen]


def _detected_in_every_batch(matrix: Any, adata: Any, batch_key: str | None) -> np.ndarray:
    """Genes with a non-zero value in at least 3 cells of every batch."""
    groups = [np.arange(matrix.shape[0])] if batch_key is None else \
        [np.flatnonzero(adata.obs[batch_key].to_numpy() == b) for b in adata.obs[batch_key].unique()]
    ok = np.ones(matrix.shape[1], dtype=bool)
    for rows in groups:
        ok &= np.asarray((matrix[rows] > 0).sum(axis=0)).ravel() >= 3
    return ok


def _check_counts(adata: Any, layer: str | None) -> None:
    """The recipe normalises, log-transforms and selects HVGs itself: it starts from raw counts."""
    from scforge.matrix import as_source, iter_row_chunks, require_counts

    source = as_source(adata, layer=layer)
    first = next(iter(iter_row_chunks(source, 2048)), None)
    if first is None:
        raise InputDataError(f"{source.where} has no cells.")
    require_counts(first[2], f"integration fine-tuning input {source.where}" + (f" layer {layer!r}" if layer else ""))


# ---- the fine-tuned model ----------------------------------------------------------------------
class IntegrationModel:
    """An scGPT model fine-tuned for batch integration, with its genes and batches.

    ``module`` is the :class:`~scforge.models.scgpt.ScGPTModel` (batch embeddings, DSBN, MVC, DAR).
    :meth:`embed` gives the integrated cell embeddings of cells from the trained batches."""

    family = FAMILY

    def __init__(self, module: Any, vocab: Any, genes: list[str], batches: list[str], batch_key: str,
                 settings: IntegrationSettings, *, seed: int = 0, source: str | None = None,
                 history: dict[str, float] | None = None) -> None:
        self.module, self.vocab = module, vocab
        self.genes, self.batches, self.batch_key = list(genes), list(batches), batch_key
        self.settings, self.seed, self.source = settings, int(seed), source
        self.history = dict(history or {})

    def __repr__(self) -> str:
        return (f"IntegrationModel(scGPT {self.config.n_layers}x{self.config.d_model}, {len(self.genes)} genes, "
                f"batches {self.batches} of obs[{self.batch_key!r}])")

    @property
    def config(self):
        return self.module.config

    def tokenizer(self):
        """The recipe's tokenizer: every integration gene for every cell, ``<cls>`` first with value 0."""
        from scforge.tokenize import BinnedTokenizer

        c = self.config
        return BinnedTokenizer(self.vocab, n_bins=c.n_bins, normalize_total=1e4, log1p=True, cls_value=0.0,
                               include_zero_gene=True, genes=self.genes, max_len=len(self.genes) + 1, seed=self.seed,
                               pad_value=c.pad_value, mask_value=c.mask_value)

    def tokenize(self, adata: Any, layer: str | None = None, progress: bool = False) -> TokenizedCells:
        from scforge.matrix import as_source

        names = set(np.asarray(as_source(adata, layer=layer).gene_names(None)).astype(str))
        absent = [g for g in self.genes if g not in names]
        if len(absent) > 0.5 * len(self.genes):
            raise InputDataError(f"{len(absent)} of the model's {len(self.genes)} integration genes are not in the "
                                 f"data ({absent[:5]}...); embed data measured on the same genes.")
        if absent:
            logger.warning("%d of %d integration genes are not in the data; those tokens are left out.", len(absent),
                           len(self.genes))
        return self.tokenizer().tokenize(adata, layer=layer, progress=progress)

    def embed(self, adata: Any, layer: str | None = None, *, batch_key: str | None = None,
              key_added: str | None = DEFAULT_KEY, batch_size: int = 64, device: str | torch.device = "auto",
              precision: str = "auto", progress: bool = False) -> np.ndarray:
        """L2-normalised ``<cls>`` embeddings ``[cells, d_model]`` in input order; writes ``obsm[key_added]``
        (``None``: nothing written). Cells are run one batch at a time (DSBN uses each batch's statistics)."""
        _check_counts(adata, layer)
        _, codes = batch_codes(adata, batch_key or self.batch_key, self.batches)
        cells = self.tokenize(adata, layer)
        emb = self.embed_cells(cells, codes, batch_size=batch_size, device=device, precision=precision,
                               progress=progress)
        if key_added:
            adata.obsm[key_added] = emb
            adata.uns.setdefault("scforge", {})[key_added] = {
                "model": self.source or "scforge", "family": FAMILY, "genes": len(self.genes),
                "batch_key": batch_key or self.batch_key, "layer": layer}
        return emb

    def embed_cells(self, cells: TokenizedCells, codes: np.ndarray, *, batch_size: int = 64,
                    device: str | torch.device = "auto", precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Embeddings of tokenized cells with their batch codes (see :meth:`embed`)."""
        from tqdm.auto import tqdm

        from scforge.nn import autocast, resolve_device, resolve_precision

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        emb = np.zeros((cells.n_cells, self.config.d_model), dtype=np.float32)
        chunks = []
        for code in np.unique(codes):
            members = np.flatnonzero(codes == code)
            chunks += [(int(code), members[i : i + batch_size]) for i in range(0, members.size, batch_size)]
        with torch.inference_mode(), autocast(dev, dtype):
            for code, idx in tqdm(chunks, desc="scGPT integrate", unit="batch", disable=not progress, leave=False):
                b = cells.pack(idx)
                values = b["values"].to(dev)
                cu = b["cu_seqlens"].to(dev, torch.int64)
                labels = torch.full((idx.size,), code, dtype=torch.long, device=dev)
                h = module.encode(b["genes"].to(dev), values, cu_seqlens=cu, max_seqlen=b["max_seqlen"],
                                  batch_labels=labels)
                emb[idx] = module.cell_embedding(h, values, cu_seqlens=cu).float().cpu().numpy()
        emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        return emb

    # ---- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """scforge's folder format; ``config.json`` also holds the genes, batches and settings."""
        from scforge.hub import save_model_folder

        config = {"model": self.config.to_dict(), "genes": self.genes, "batches": self.batches,
                  "batch_key": self.batch_key, "settings": self.settings.to_dict(), "seed": self.seed,
                  "history": self.history}
        card = "\n".join([
            "# scGPT fine-tuned for batch integration (scforge)", "",
            f"- batches: {self.batches} (obs[{self.batch_key!r}])", f"- genes: {len(self.genes)} HVGs, zeros included",
            f"- architecture: {self.config.n_layers} layers x {self.config.d_model}, DSBN={self.settings.dsbn}",
            f"- started from: {self.source or 'random initialisation'}", ""])
        return save_model_folder(path, family=FAMILY, config=config, state_dict=self.module.state_dict(),
                                 vocab=self.vocab, card=card, overwrite=overwrite)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> IntegrationModel:
        from scforge.hub import load_model_folder
        from scforge.models.scgpt import ScGPTConfig, ScGPTModel

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not an integration model; use scforge.load.")
        cfg = folder.config
        missing = [k for k in ("model", "genes", "batches", "batch_key", "settings") if k not in cfg]
        if missing:
            raise CheckpointError(f"{path}/config.json lacks {missing}; it was not written by IntegrationModel.save.")
        module = ScGPTModel(ScGPTConfig.from_dict(cfg["model"]))
        module.load_state_dict(folder.state_dict, strict=True)
        return cls(module.eval(), folder.vocab, cfg["genes"], cfg["batches"], cfg["batch_key"],
                   IntegrationSettings(**cfg["settings"]), seed=int(cfg.get("seed", 0)), source=str(path),
                   history=cfg.get("history"))

    load = from_folder


# ---- fine-tuning -------------------------------------------------------------------------------
def _integration_copy(model: Any, n_batches: int, n_genes: int, s: IntegrationSettings, seed: int) -> Any:
    """A new ScGPTModel with the recipe's heads; the backbone (and any head of matching shape) copied."""
    from scforge.models.scgpt import ScGPTModel
    from scforge.models.scgpt.checkpoint import load_state_into

    config = dataclasses.replace(
        model.config, use_batch_labels=True, num_batch_labels=n_batches, domain_spec_batchnorm="dsbn" if s.dsbn else False,
        do_dab=s.dar_weight > 0, do_mvc=s.mvc, explicit_zero_prob=s.explicit_zero_prob, ecs_threshold=s.ecs_threshold,
        dropout=s.dropout, max_seq_len=n_genes + 1, expected_input="counts")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = ScGPTModel(config)
    report = load_state_into(module, model.module.state_dict(), source=str(getattr(model, "source", None) or "the model"))
    if report.mismatched:  # e.g. decoder.fc.0 is twice as wide with batch embeddings, as in the reference
        logger.info("integration copy: %d tensors re-initialised (new shape): %s", len(report.mismatched),
                    [k for k, *_ in report.mismatched][:6])
    return module


def fine_tune_integration(model: Any, adata: Any, batch_key: str, *, layer: str | None = None,
                          settings: IntegrationSettings | None = None, seed: int = 0, precision: str = "auto",
                          accelerator: str = "auto", progress: bool = True, **overrides: Any) -> IntegrationModel:
    """Fine-tune a copy of an scGPT ``model`` with scGPT's integration recipe on the raw counts of
    ``adata`` (``layer``), with ``obs[batch_key]`` as the batches. ``settings`` (or keyword
    ``overrides`` of its fields, e.g. ``epochs=5``) change the recipe. The caller's model and AnnData
    are not changed."""
    from scforge.models.scgpt import ScGPT
    from scforge.train import Corruption, Objectives, OptimConfig, TrainConfig, fit, split_indices

    if not isinstance(model, ScGPT):
        raise ConfigError(f"integration fine-tuning is scGPT's recipe and needs an scGPT model, got "
                          f"{type(model).__name__}. For other families use zero_shot_integration(model, adata).")
    s = dataclasses.replace(settings or IntegrationSettings(), **overrides)
    _check_counts(adata, layer)
    batches, codes = batch_codes(adata, batch_key)
    genes = integration_genes(model, adata, batch_key, n_hvg=s.n_hvg, layer=layer, min_counts=s.min_gene_counts)
    module = _integration_copy(model, len(batches), len(genes), s, seed)
    result = IntegrationModel(module, copy.deepcopy(model.vocab), genes, batches, batch_key, s, seed=seed,
                              source=getattr(model, "source", None))
    cells = result.tokenize(adata, layer, progress=progress)
    _, val_idx = split_indices(cells.n_cells, s.val_fraction, seed, codes)
    train_codes = np.delete(codes, val_idx)
    per_epoch = int(sum(-(-int((train_codes == b).sum()) // s.batch_size) for b in np.unique(train_codes))) \
        if s.dsbn else -(-train_codes.size // s.batch_size)
    objectives = Objectives(gep=True, mvc=s.mvc, ecs_weight=s.ecs_weight, ecs_threshold=s.ecs_threshold,
                            dar_weight=s.dar_weight)
    optim = OptimConfig(lr=s.lr, weight_decay=0.0, schedule="step", gamma=s.gamma, step_every=max(per_epoch, 1))
    with tempfile.TemporaryDirectory(prefix="scforge-integrate-") as tmp:
        cfg = TrainConfig(max_epochs=s.epochs, batch_size=s.batch_size, grad_clip=s.grad_clip, precision=precision,
                          accelerator=accelerator, val_fraction=s.val_fraction, seed=seed, progress=progress,
                          checkpoint_dir=tmp if val_idx.size else None, log_dir=tmp)
        out = fit(module, cells, objectives=objectives, corruption=Corruption("mask", s.mask_ratio), optim=optim,
                  config=cfg, batch_labels=codes, per_batch=s.dsbn, val_idx=val_idx)
    result.history = {k: round(v, 5) for k, v in out.metrics.items()}
    result.module = out.module.model.eval()
    return result


def integrate(model: Any, adata: Any, batch_key: str, *, layer: str | None = None, key_added: str = DEFAULT_KEY,
              settings: IntegrationSettings | None = None, seed: int = 0, precision: str = "auto",
              progress: bool = True, **overrides: Any) -> IntegrationModel:
    """Fine-tune with :func:`fine_tune_integration`, then write the integrated embeddings of ``adata``'s
    cells to ``adata.obsm[key_added]`` (the only change to ``adata``); returns the fine-tuned model."""
    tuned = fine_tune_integration(model, adata, batch_key, layer=layer, settings=settings, seed=seed,
                                  precision=precision, progress=progress, **overrides)
    tuned.embed(adata, layer, key_added=key_added, precision=precision, progress=progress)
    return tuned


def zero_shot_integration(model: Any, adata: Any, *, layer: str | None = None, key_added: str | None = None,
                          batch_size: int = 64, max_length: int | None = None, progress: bool = False) -> np.ndarray:
    """The frozen embedding of any family (no training, batches unused) as an integration baseline;
    written to ``obsm[key_added]`` (default ``X_<family>_zeroshot``) when ``adata`` is an AnnData."""
    from scforge.tasks.embed import embed_cells

    emb = embed_cells(model, adata, layer=layer, batch_size=batch_size, max_length=max_length, progress=progress)
    if hasattr(adata, "obsm"):
        key = key_added or f"X_{getattr(model, 'family', 'model')}_zeroshot"
        adata.obsm[key] = emb
    return emb


# ---- evaluation --------------------------------------------------------------------------------
def evaluate_integration(adata: Any, obsm_keys: list[str], label_key: str, batch_key: str, *,
                         layer: str | None = None, baselines: tuple[str, ...] = ("pca", "harmony"),
                         n_top_genes: int = 2000, n_comps: int = 50, seed: int = 0,
                         labelled_only: bool = True) -> pd.DataFrame:
    """scib-metrics table (AvgBIO, AvgBATCH and their parts; one row per embedding) of ``obsm_keys``
    next to the baselines: ``"pca"`` (HVG+PCA of the counts, unintegrated; PCR's reference) and
    ``"harmony"`` (Harmony on those PCs). Baselines are fitted on all cells; scores use the cells with
    a label (``labelled_only``). ``adata`` is not modified."""
    from scforge.baselines import harmony_integrate, hvg_pca
    from scforge.metrics import integration_metrics

    unknown = sorted(set(baselines) - {"pca", "harmony"})
    if unknown:
        raise ConfigError(f"baselines {unknown} unknown; choose from 'pca', 'harmony'.")
    missing = [k for k in obsm_keys if k not in adata.obsm]
    if missing:
        raise ConfigError(f"adata.obsm has no {missing}; it holds {list(adata.obsm.keys())}.")
    if label_key not in adata.obs.columns:
        raise InputDataError(f"obs has no label column {label_key!r}; columns: {list(adata.obs.columns)[:15]}.")
    _, codes = batch_codes(adata, batch_key)
    embs: dict[str, np.ndarray] = {}
    pcs = hvg_pca(adata, n_top_genes=n_top_genes, n_comps=n_comps, layer=layer, seed=seed)
    embs["pca"] = pcs
    if "harmony" in baselines:
        embs["harmony"] = harmony_integrate(pcs, codes, seed=seed)
    for key in obsm_keys:
        embs[key] = np.asarray(adata.obsm[key], dtype=np.float32)
    labels = adata.obs[label_key]
    keep = np.flatnonzero(labels.notna().to_numpy()) if labelled_only else np.arange(adata.n_obs)
    report = integration_metrics({k: v[keep] for k, v in embs.items()}, labels.iloc[keep].astype(str).to_numpy(),
                                 codes[keep], unintegrated="pca", seed=seed, score_unintegrated="pca" in baselines)
    return report.table
