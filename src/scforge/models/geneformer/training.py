"""Geneformer training on the shared engine: masked-LM pretraining and cell classification.

* :class:`GeneformerMLMCollator`: HF ``DataCollatorForLanguageModeling`` semantics (15% of the tokens,
  of which 80% become ``<mask>``, 10% a random gene, 10% stay), never selecting special tokens, seeded
  per batch; batches are packed (no padding).
* :class:`GeneformerMLMModule`: cross-entropy of the MLM logits at the selected tokens.
* :func:`pretrain_geneformer`: tokenize (or take tokenized cells) and fit.
* :class:`GeneformerAnnotationBackend`: ``BertForSequenceClassification`` fine-tuning (pooler dense + tanh
  on the first token, ``<cls>`` in V2 and the top-ranked gene in V1 as in HF, then the classifier) for
  :func:`scforge.tasks.annotate.fine_tune` / ``linear_probe``.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from scforge.errors import ConfigError
from scforge.models.geneformer.model import GeneformerForMaskedLM, GeneformerForSequenceClassification
from scforge.tasks.annotate import AnnotationBackend
from scforge.tokenize.ragged import TokenizedCells
from scforge.train import OptimConfig, TrainConfig, TrainingModule, batch_seed, fit_module

IGNORE_INDEX = -100


def mlm_corrupt(ids: np.ndarray, selectable: np.ndarray, rng: np.random.Generator, probability: float,
                mask_id: int, random_pool: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """BERT's masked-LM corruption of token ids: each ``selectable`` token is chosen with ``probability``;
    a chosen token becomes ``mask_id`` (80%), a token drawn from ``random_pool`` (10%) or stays (10%).
    Returns the corrupted inputs and the labels (the original id where chosen, else -100)."""
    selected = selectable & (rng.random(ids.size) < probability)
    labels = np.where(selected, ids, IGNORE_INDEX)
    action = rng.random(ids.size)
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = mask_id
    randomize = selected & (action >= 0.8) & (action < 0.9)
    inputs[randomize] = random_pool[rng.integers(0, random_pool.size, int(randomize.sum()))]
    return inputs, labels


class GeneformerMLMCollator:
    """Packed masked-LM batches from tokenized cells.

    Of every cell's non-special tokens, each is selected with probability ``mlm_probability``; a selected
    token becomes ``mask_id`` (80%), a random non-special token (10%) or stays (10%). ``special_ids`` are
    never selected (``<pad>``, ``<mask>``, ``<cls>``, ``<eos>``). Randomness comes from
    ``np.random.default_rng(batch_seed(seed, epoch, first_index, n_items))``, so a batch is the same
    whenever it is rebuilt. Returns ``input_ids [T]``, ``labels [T]`` (-100 where not selected),
    ``cu_seqlens [B+1]``, ``max_seqlen``, ``cells [B]``.
    """

    def __init__(self, cells: TokenizedCells, *, vocab_size: int, mask_id: int, special_ids: Sequence[int],
                 mlm_probability: float = 0.15, seed: int = 0, max_length: int | None = None) -> None:
        if not 0 < mlm_probability < 1:
            raise ConfigError(f"mlm_probability must be in (0, 1), got {mlm_probability}")
        self.cells = cells
        self.vocab_size = int(vocab_size)
        self.mask_id = int(mask_id)
        self.special = np.zeros(self.vocab_size, dtype=bool)
        self.special[np.asarray(list(special_ids), dtype=np.int64)] = True
        self.random_pool = np.flatnonzero(~self.special)
        self.mlm_probability = float(mlm_probability)
        self.seed = int(seed)
        self.max_length = max_length

    @classmethod
    def for_model(cls, model, cells: TokenizedCells, **kwargs: Any) -> GeneformerMLMCollator:
        """A collator with the model's vocabulary size and special tokens (``model``: :class:`Geneformer`)."""
        vocab = model.vocab
        specials = [vocab.special_id(role) for role in vocab.specials]
        return cls(cells, vocab_size=len(vocab), mask_id=vocab.special_id("mask"), special_ids=specials, **kwargs)

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        epochs = [int(e) for e, _ in items]
        idx = np.asarray([int(i) for _, i in items], dtype=np.int64)
        rng = np.random.default_rng(batch_seed(self.seed, epochs[0], int(idx[0]), len(items)))
        sub = self.cells.select(idx)
        lengths = sub.lengths
        if self.max_length is not None and lengths.max() > self.max_length:
            sub = TokenizedCells(offsets=np.concatenate([[0], np.cumsum(np.minimum(lengths, self.max_length))]),
                                 gene_ids=np.concatenate([sub.cell(i)[0][:self.max_length] for i in range(sub.n_cells)]),
                                 values=None, obs_names=sub.obs_names, meta=sub.meta)
        ids = sub.gene_ids.astype(np.int64)
        inputs, labels = mlm_corrupt(ids, ~self.special[ids], rng, self.mlm_probability, self.mask_id,
                                     self.random_pool)
        return {
            "input_ids": torch.from_numpy(inputs),
            "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.from_numpy(sub.offsets.astype(np.int64)),
            "max_seqlen": int(sub.lengths.max()),
            "cells": torch.from_numpy(idx),
        }


class GeneformerMLMModule(TrainingModule):
    """Masked-LM training of a :class:`GeneformerForMaskedLM` (loss ``mlm``: mean cross-entropy over the
    selected tokens; the decoder runs on those tokens only)."""

    def __init__(self, model: GeneformerForMaskedLM, optim: OptimConfig | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, optim, total_steps)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        logits = self.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=int(batch["max_seqlen"]),
                            token_index=selected)
        loss = F.cross_entropy(logits.float(), labels[selected])
        return loss, {"mlm": loss.detach()}

    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        selected = labels != IGNORE_INDEX
        with torch.no_grad():
            logits = self.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                                max_seqlen=int(batch["max_seqlen"]), token_index=selected)
        return {"accuracy": (logits.argmax(-1) == labels[selected]).float().mean()}


def pretrain_geneformer(
    cells: Any,
    config: Any = None,
    *,
    dictionaries: Any = None,
    model: Any = None,
    train: TrainConfig | None = None,
    optim: OptimConfig | None = None,
    mlm_probability: float = 0.15,
    layer: str | None = None,
    max_length: int | None = None,
):
    """Masked-LM pretraining. ``cells``: tokenized cells or raw counts (AnnData / ``.h5ad``), tokenized
    with the model's dictionaries. Either ``model`` (a :class:`Geneformer` to continue from) or ``config``
    (a :class:`GeneformerConfig` for a new model, seeded with ``train.seed``) with ``dictionaries``.
    Returns ``(model, FitResult)``; the model is trained in place."""
    from scforge.models.geneformer.api import Geneformer

    train = train or TrainConfig()
    if model is None:
        if config is None:
            raise ConfigError("pass config= (a GeneformerConfig) for a new model, or model= to continue training.")
        model = Geneformer.new(config, dictionaries, seed=train.seed)
    if not isinstance(model.module, GeneformerForMaskedLM):
        raise ConfigError("masked-LM pretraining needs a masked-LM model, not a classifier.")
    if not isinstance(cells, TokenizedCells):
        cells = model.tokenize(cells, layer, max_length=max_length)
    model.require_genes(cells)
    collate = GeneformerMLMCollator.for_model(model, cells, mlm_probability=mlm_probability, seed=train.seed,
                                              max_length=model.config.max_position_embeddings)
    module = GeneformerMLMModule(model.module.train(), optim)
    result = fit_module(module, collate, cells.n_cells, config=train)
    model.module.eval()
    return model, result


# ---- cell classification -----------------------------------------------------------------------
class LabelledCellCollator:
    """Packed batches of whole cells with their labels (no corruption)."""

    def __init__(self, cells: TokenizedCells, labels: np.ndarray) -> None:
        self.cells = cells
        self.labels = np.asarray(labels, dtype=np.int64)

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        idx = np.asarray([int(i) for _, i in items], dtype=np.int64)
        b = self.cells.pack(idx)
        return {"input_ids": b["genes"], "cu_seqlens": b["cu_seqlens"].long(), "max_seqlen": b["max_seqlen"],
                "labels": torch.from_numpy(self.labels[idx]), "cells": torch.from_numpy(idx)}


class GeneformerClassifierModule(TrainingModule):
    """Cross-entropy of a :class:`GeneformerForSequenceClassification` on ``batch["labels"]``."""

    def __init__(self, model: GeneformerForSequenceClassification, optim: OptimConfig | None = None,
                 class_weights: Sequence[float] | None = None) -> None:
        super().__init__(model, optim)
        weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weight, persistent=False)

    def _logits(self, batch):
        return self.model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"], max_seqlen=int(batch["max_seqlen"]))

    def compute_losses(self, batch):
        loss = F.cross_entropy(self._logits(batch).float(), batch["labels"], weight=self.class_weights)
        return loss, {"ce": loss.detach()}

    def validation_metrics(self, batch):
        with torch.no_grad():
            return {"accuracy": (self._logits(batch).argmax(-1) == batch["labels"]).float().mean()}


class GeneformerAnnotationBackend(AnnotationBackend):
    """Geneformer in the annotation task: ``BertForSequenceClassification`` fine-tuning (Geneformer's
    ``Classifier``), linear probing on :meth:`Geneformer.embed` (``<cls>`` for V2, gene mean for V1)."""

    family = "geneformer"
    embedding_prefixes = ("bert.embeddings.",)

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.n_special = 2 if model.has_cls else 0

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_classes(self) -> int | None:
        return self.model.config.num_labels

    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        limit = self.model.config.max_position_embeddings
        if max_length is not None and not 0 < max_length <= limit:
            raise ConfigError(f"max_length must be in 1..{limit} (the model's positions), got {max_length}.")
        return {"tokenizer": "geneformer-rank", "version": self.model.dictionaries.version,
                "max_length": int(max_length or limit), "seed": int(seed)}

    def check_input(self, adata: Any, layer: str | None) -> None:
        from scforge.matrix import as_source, iter_row_chunks, require_counts

        source = as_source(adata, layer=layer)
        for lo, hi, csr in iter_row_chunks(source, 2048):
            require_counts(csr, source.where, (lo, hi))
            break

    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> TokenizedCells:
        return self.model.tokenize(adata, layer, max_length=settings.get("max_length"), progress=progress)

    def classifier_copy(self, n_classes: int, seed: int, source: str) -> Any:
        from scforge.models.geneformer.api import Geneformer
        from scforge.models.geneformer.checkpoint import load_state_into

        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        config = dataclasses.replace(self.model.config, num_labels=int(n_classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = GeneformerForSequenceClassification(config)
        state = {k: v for k, v in self.model.module.state_dict().items() if k.startswith("bert.")}
        state.update({k: v for k, v in module.state_dict().items() if not k.startswith("bert.")})
        load_state_into(module, {k: v.clone() for k, v in state.items()}, source=source)
        return Geneformer(module.eval(), copy.deepcopy(self.model.dictionaries), source=source)

    def _classifier(self) -> nn.Module:
        """The module whose forward gives class logits (refused without a classification head)."""
        module = self.model.module
        if not isinstance(module, GeneformerForSequenceClassification):
            raise ConfigError("this Geneformer model has no classification head; fine-tune it first.")
        return module

    def training_module(self, optim: Any, class_weights: tuple[float, ...] | None) -> Any:
        return GeneformerClassifierModule(self._classifier().train(), optim or OptimConfig(), class_weights)

    def collate(self, cells: TokenizedCells, labels: np.ndarray, seed: int) -> Any:
        return LabelledCellCollator(cells, labels)

    def proba(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto", precision: str = "auto",
              progress: bool = False) -> np.ndarray:
        from scforge.nn import autocast, resolve_device, resolve_precision

        module = self._classifier()
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module.to(dev).eval()
        out = np.zeros((cells.n_cells, self.n_classes), dtype=np.float32)
        order = np.argsort(-cells.lengths, kind="stable")
        with torch.inference_mode(), autocast(dev, dtype):
            for start in range(0, order.size, batch_size):
                idx = order[start:start + batch_size]
                b = cells.pack(idx)
                logits = module(b["genes"].to(dev), cu_seqlens=b["cu_seqlens"].to(dev, torch.int64),
                                max_seqlen=b["max_seqlen"])
                out[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
        return out

    def embed(self, adata: Any, layer: str | None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, seed: int = 0, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        return self.model.embed(adata, layer, batch_size=batch_size, device=device, precision=precision,
                                key_added=None, max_length=max_length, progress=progress)
