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
    from scforge.tokenize import BinnedTokenizer

    if objective not in ("generative", "mask"):
        raise ConfigError(f"objective={objective!r}; choose 'generative' or 'mask'")
    if vocab is None:
        import anndata as ad

        names = (ad.read_h5ad(data, backed="r") if isinstance(data, (str, os.PathLike)) else data).var_names
        vocab = vocab_from_genes(list(names))
    model = ScGPT.new(vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_hid=d_hid, dropout=dropout,
                      max_seq_len=max_length, do_mvc=True, use_generative=objective == "generative")
    tok = BinnedTokenizer(vocab, normalize_total=None, log1p=False, cls_value=model.config.pad_value,
                          max_len=max_length, seed=seed)
    cells = tok.tokenize(data, layer=layer, progress=progress)
    keep = np.flatnonzero(cells.lengths > 2)
    if keep.size < cells.n_cells:
        logger.info("pretrain: %d cells with fewer than 2 vocabulary genes left out", cells.n_cells - keep.size)
        cells = cells.select(keep)
    ratio = tuple(mask_ratio) if isinstance(mask_ratio, (tuple, list)) else float(mask_ratio)
    result = fit(
        model.module, cells,
        objectives=Objectives(gep=True, mvc=True),
        corruption=Corruption(objective, ratio),
        optim=OptimConfig(lr=lr, warmup_steps=warmup_steps, schedule="cosine", min_lr_ratio=0.05),
        config=TrainConfig(max_epochs=epochs, max_steps=max_steps, batch_size=batch_size, val_fraction=val_fraction,
                           seed=seed, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                           log_dir=None if log_dir is None else str(log_dir), precision=precision, progress=progress),
    )
    n_val = int(round(cells.n_cells * val_fraction)) if val_fraction else 0
    return PretrainResult(model, result.metrics, cells.n_cells - n_val, n_val)
