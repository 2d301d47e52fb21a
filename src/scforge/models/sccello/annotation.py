"""scCello in the annotation task (:mod:`scforge.tasks.annotate`): full fine-tuning with a linear
classification head on the cell embedding (``cell_cls`` on the last layer's ``<cls>``), and linear probing
on the frozen cell embedding (scCello's cell type classification protocols)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from scforge.errors import ConfigError
from scforge.models.geneformer.training import GeneformerClassifierModule, LabelledCellCollator
from scforge.models.sccello.model import ScCelloModel
from scforge.tasks.annotate import AnnotationBackend
from scforge.tokenize.ragged import TokenizedCells
from scforge.train import OptimConfig


class ScCelloClassifier(nn.Module):
    """``ScCelloModel.classify`` as a module's forward (what the shared classifier training module calls);
    its parameters are the scCello model's own."""

    def __init__(self, model: ScCelloModel) -> None:
        super().__init__()
        self.sccello = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        return self.sccello.classify(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


class ScCelloAnnotationBackend(AnnotationBackend):
    """scCello fine-tuning (cross-entropy through the whole model and the new head) and linear probing on
    :meth:`ScCello.embed`."""

    family = "sccello"
    n_special = 1  # <cls>
    embedding_prefixes = ("bert.embeddings.",)

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def n_classes(self) -> int | None:
        return self.model.config.num_labels

    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        limit = self.model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise ConfigError(f"max_length must be in 2..{limit} (the model's positions), got {max_length}.")
        return {"tokenizer": "sccello-rank", "max_length": int(max_length or limit), "seed": int(seed)}

    def check_input(self, adata: Any, layer: str | None) -> None:
        from scforge.matrix import as_source, iter_row_chunks, require_counts

        source = as_source(adata, layer=layer)
        for lo, hi, csr in iter_row_chunks(source, 2048):
            require_counts(csr, source.where, (lo, hi))
            break

    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> TokenizedCells:
        return self.model.tokenize(adata, layer, max_length=settings.get("max_length"), progress=progress)

    def classifier_copy(self, n_classes: int, seed: int, source: str) -> Any:
        from scforge.models.sccello.api import ScCello

        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        config = dataclasses.replace(self.model.config, num_labels=int(n_classes))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = ScCelloModel(config)
        state = {k: v for k, v in self.model.module.state_dict().items() if not k.startswith("classifier.")}
        state.update({k: v for k, v in module.state_dict().items() if k.startswith("classifier.")})
        module.load_state_dict({k: v.clone() for k, v in state.items()})
        return ScCello(module.eval(), copy.deepcopy(self.model.dictionaries), source=source)

    def training_module(self, optim: Any, class_weights: Sequence[float] | None) -> Any:
        return GeneformerClassifierModule(ScCelloClassifier(self.model.module.train()), optim or OptimConfig(),
                                          class_weights)

    def collate(self, cells: TokenizedCells, labels: np.ndarray, seed: int) -> Any:
        return LabelledCellCollator(cells, labels)

    def proba(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto", precision: str = "auto",
              progress: bool = False) -> np.ndarray:
        from scforge.nn import autocast, resolve_device, resolve_precision

        module = self.model.module
        if not module.config.num_labels:
            raise ConfigError("this scCello model has no classification head; fine-tune it first.")
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module.to(dev).eval()
        out = np.zeros((cells.n_cells, module.config.num_labels), dtype=np.float32)
        order = np.argsort(-cells.lengths, kind="stable")
        with torch.inference_mode(), autocast(dev, dtype):
            for start in range(0, order.size, batch_size):
                idx = order[start:start + batch_size]
                b = cells.pack(idx)
                logits = module.classify(b["genes"].to(dev), cu_seqlens=b["cu_seqlens"].to(dev, torch.int64),
                                         max_seqlen=b["max_seqlen"])
                out[idx] = torch.softmax(logits.float(), -1).cpu().numpy()
        return out

    def embed(self, adata: Any, layer: str | None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, seed: int = 0, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        return self.model.embed(adata, layer, batch_size=batch_size, device=device, precision=precision,
                                max_length=max_length, key_added=None, progress=progress)
