"""Pretrain an scGPT-family model from scratch on raw counts (scGPT's generative objective)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from scforge.errors import ConfigError
from scforge.genes import GeneVocab
from scforge.models.scgpt import ScGPT
from scforge.train import Corruption, Objectives, OptimConfig, TrainConfig, fit

logger = logging.getLogger("scforge")
SPECIALS = ["<pad>", "<cls>", "<eoc>"]


@dataclass
class PretrainResult:
    """The pretrained model and its held-out losses (``val/gep``: masked MSE of generated genes)."""

    model: ScGPT
    metrics: dict[str, float]
    n_train_cells: int
    n_val_cells: int


def vocab_from_genes(genes: list[str], name: str = "scforge") -> GeneVocab:
    """A model vocabulary of these genes (in order, duplicates dropped) plus ``<pad>``, ``<cls>``, ``<eoc>``."""
    unique = list(dict.fromkeys(str(g) for g in genes))
    return GeneVocab.from_gene_list(unique, SPECIALS, name=name)


def pretrain_tokenizer(vocab: GeneVocab, max_length: int = 256, seed: int = 0, n_jobs: int | None = None) -> Any:
    """The tokenizer of scGPT pretraining: raw counts binned per cell (51 bins; binning is per-cell
    quantiles, so normalising first would not change a bin), ``<cls>`` with the pad value, at most
    ``max_length`` tokens. Shards meant for :func:`pretrain_stream` are written with it
    (``scforge shard --for-pretraining``)."""
    from scforge.tokenize import BinnedTokenizer

    return BinnedTokenizer(vocab, normalize_total=None, log1p=False, cls_value=-2.0, max_len=max_length, seed=seed,
                           n_jobs=n_jobs)


def _check_objective(objective: str) -> None:
    if objective not in ("generative", "mask"):
        raise ConfigError(f"objective={objective!r}; choose 'generative' or 'mask'")


def _new_model(vocab: GeneVocab, d_model: int, n_layers: int, n_heads: int, d_hid: int, dropout: float,
               max_length: int, objective: str) -> ScGPT:
    return ScGPT.new(vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_hid=d_hid, dropout=dropout,
                     max_seq_len=max_length, do_mvc=True, use_generative=objective == "generative")


def _recipe(objective: str, mask_ratio: tuple[float, ...] | float, lr: float, warmup_steps: int) -> dict[str, Any]:
    """The objectives, corruption and optimiser of scGPT pretraining, shared by both entry points."""
    ratio = tuple(mask_ratio) if isinstance(mask_ratio, (tuple, list)) else float(mask_ratio)
    return {
        "objectives": Objectives(gep=True, mvc=True),
        "corruption": Corruption(objective, ratio),
        "optim": OptimConfig(lr=lr, warmup_steps=warmup_steps, schedule="cosine", min_lr_ratio=0.05),
    }


def pretrain(
    data: Any,
    *,
    vocab: GeneVocab | None = None,
    layer: str | None = None,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    d_hid: int = 256,
    dropout: float = 0.1,
    max_length: int = 256,
    objective: str = "generative",
    mask_ratio: tuple[float, ...] | float = (0.25, 0.5, 0.75),
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 5e-4,
    warmup_steps: int = 100,
    val_fraction: float = 0.05,
    seed: int = 0,
    checkpoint_dir: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    progress: bool = True,
    max_steps: int = -1,
) -> PretrainResult:
    """Pretrain a new scGPT model on ``data`` (raw counts; AnnData or ``.h5ad`` path).

    ``objective="generative"`` is scGPT's pretraining: a share of each cell's genes (drawn from
    ``mask_ratio``) become generated tokens whose values are predicted from the others (GEP + MVC);
    ``"mask"`` masks values in place instead (faster: padding-free batches). The vocabulary defaults
    to the data's genes. Cells keep at most ``max_length`` tokens (seeded gene subsample)."""
    _check_objective(objective)
    if vocab is None:
        import anndata as ad

        names = (ad.read_h5ad(data, backed="r") if isinstance(data, (str, os.PathLike)) else data).var_names
        vocab = vocab_from_genes(list(names))
    model = _new_model(vocab, d_model, n_layers, n_heads, d_hid, dropout, max_length, objective)
    tok = pretrain_tokenizer(vocab, max_length, seed)
    cells = tok.tokenize(data, layer=layer, progress=progress)
    keep = np.flatnonzero(cells.lengths > 2)
    if keep.size < cells.n_cells:
        logger.info("pretrain: %d cells with fewer than 2 vocabulary genes left out", cells.n_cells - keep.size)
        cells = cells.select(keep)
    result = fit(
        model.module, cells, **_recipe(objective, mask_ratio, lr, warmup_steps),
        config=TrainConfig(max_epochs=epochs, max_steps=max_steps, batch_size=batch_size, val_fraction=val_fraction,
                           seed=seed, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                           log_dir=None if log_dir is None else str(log_dir), precision=precision, progress=progress),
    )
    n_val = int(round(cells.n_cells * val_fraction)) if val_fraction else 0
    return PretrainResult(model, result.metrics, cells.n_cells - n_val, n_val)


def pretrain_stream(
    sources: Any,
    *,
    vocab: GeneVocab | None = None,
    val_sources: Any = None,
    layer: str | None = None,
    d_model: int = 128,
    n_layers: int = 4,
    n_heads: int = 4,
    d_hid: int = 256,
    dropout: float = 0.1,
    max_length: int = 256,
    objective: str = "generative",
    mask_ratio: tuple[float, ...] | float = (0.25, 0.5, 0.75),
    epochs: int = 2,
    batch_size: int = 32,
    lr: float = 5e-4,
    warmup_steps: int = 100,
    seed: int = 0,
    block_size: int = 512,
    buffer_blocks: int = 8,
    num_workers: int = 0,
    devices: int = 1,
    num_nodes: int = 1,
    strategy: Any = "auto",
    accelerator: str = "auto",
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int | None = None,
    resume_from: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    progress: bool = True,
    max_steps: int = -1,
) -> PretrainResult:
    """Pretrain a new scGPT model on a corpus streamed from disk, never held in memory.

    ``sources``: ``.h5ad`` files, AnnData zarr stores, TileDB-SOMA experiments (raw counts, tokenized
    inside the stream) and shard folders written with :func:`pretrain_tokenizer` (same
    ``max_length``), in any mix; ``val_sources`` likewise, read in order for the validation loss.
    The objectives are :func:`pretrain`'s. ``devices`` / ``num_nodes`` / ``strategy`` (``"ddp"``,
    ``"fsdp"``) run on many processes; under ``torchrun`` or SLURM give the per-node process count as
    ``devices``. ``num_workers`` DataLoader workers per process read and tokenize. The vocabulary
    defaults to the ``vocab.json`` of a shard folder, else the genes of the first expression source."""
    from scforge.data.shards import ShardError
    from scforge.data.stream import CellStream
    from scforge.train import fit_stream

    _check_objective(objective)
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    vocab = vocab if vocab is not None else _default_vocab(sources, layer)
    tok = pretrain_tokenizer(vocab, max_length, seed)
    kw = {"batch_size": batch_size, "block_size": block_size, "buffer_blocks": buffer_blocks, "layer": layer}
    try:
        train = CellStream(sources, tok, seed=seed, **kw)
        val = None if val_sources is None else CellStream(val_sources, tok, shuffle=False, **kw)
    except ShardError as err:
        raise ShardError(f"{err} Shards for pretraining are written with scforge.tasks.pretrain.pretrain_tokenizer"
                         f"(vocab, max_length={max_length}) (`scforge shard --for-pretraining --max-len "
                         f"{max_length}`) and the same vocabulary.") from err
    model = _new_model(vocab, d_model, n_layers, n_heads, d_hid, dropout, max_length, objective)
    result = fit_stream(
        model.module, train, val=val, num_workers=num_workers, resume_from=resume_from,
        **_recipe(objective, mask_ratio, lr, warmup_steps),
        config=TrainConfig(max_epochs=epochs, max_steps=max_steps, seed=seed, val_fraction=0.0, devices=devices,
                           num_nodes=num_nodes, strategy=strategy, accelerator=accelerator,
                           checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                           checkpoint_every=checkpoint_every, log_dir=None if log_dir is None else str(log_dir),
                           precision=precision, progress=progress),
    )
    return PretrainResult(model, result.metrics, train.n_cells, 0 if val is None else val.n_cells)


def _default_vocab(sources: list[Any], layer: str | None) -> GeneVocab:
    """The ``vocab.json`` of the first shard folder that has one (``scforge shard --for-pretraining``),
    else the genes of the first source that holds expression values."""
    from pathlib import Path

    from scforge.data.stream import expression_source
    from scforge.matrix import as_source

    for spec in sources:
        if isinstance(spec, (str, os.PathLike)) and (Path(spec) / "manifest.json").is_file():
            if (Path(spec) / "vocab.json").is_file():
                return GeneVocab.from_file(Path(spec) / "vocab.json")
    for spec in sources:
        if isinstance(spec, (str, os.PathLike)):
            if not (Path(spec) / "manifest.json").is_file():
                return vocab_from_genes(list(expression_source(spec, layer).gene_names()))
        else:
            return vocab_from_genes(list(as_source(spec, layer=layer).gene_names()))
    raise ConfigError("the shard folders carry no vocab.json: pass vocab= (the vocabulary they were written with)")
