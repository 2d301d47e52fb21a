"""scBERT's side of the annotation task (:class:`~scforge.tasks.annotate.AnnotationBackend`).

The published fine-tuning recipe (``finetune.py``): the pretrained weights are copied, the
pretraining head is replaced by the classification head (``conv1`` -> ``fc1`` -> ``fc2`` ->
``fc3``), and only the final ``norm``, the second-to-last Performer layer and the new head are
trained (cross-entropy on the class logits; the frozen gene2vec positions stay frozen). Input:
the full panel, log2 bins of counts normalised to 1e4 (there is no ``max_length``: every panel
gene is a position). Linear probing uses :meth:`ScBERT.embed` (mean of the final hidden states).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from scforge.errors import ConfigError, InputDataError
from scforge.tasks.annotate import AnnotationBackend
from scforge.tokenize.ragged import TokenizedCells


class ScBERTAnnotationBackend(AnnotationBackend):
    family = "scbert"
    n_special = 0
    embedding_prefixes = ("token_emb.", "pos_emb.")

    @property
    def embedding_dim(self) -> int:
        return int(self.model.config.dim)

    @property
    def n_classes(self) -> int | None:
        return self.model.config.n_classes

    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        c = self.model.config
        if max_length is not None and max_length != c.max_seq_len:
            raise ConfigError(f"scBERT reads every panel gene ({c.max_seq_len} positions); max_length={max_length} "
                              "cannot be used. Leave max_length=None.")
        return {"tokenizer": "scbert-logbins", "max_bin": c.max_bin, "target_sum": 1e4, "log_base": 2.0,
                "seq_len": c.max_seq_len, "seed": int(seed)}

    def check_input(self, adata: Any, layer: str | None) -> None:
        self.model.check_input(adata, layer)

    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> TokenizedCells:
        cells = self.model.tokenize(adata, layer, check_input=False, progress=progress)
        tokens = self.model.token_matrix(cells)
        empty = np.flatnonzero(~tokens.any(axis=1))
        if empty.size:
            names = [str(cells.obs_names[i]) for i in empty[:5]]
            raise InputDataError(f"{empty.size} of {cells.n_cells} cells express no gene of scBERT's panel (e.g. "
                                 f"{names}); they cannot be annotated. Remove them first.")
        return cells

    def classifier_copy(self, n_classes: int, seed: int, source: str) -> Any:
        from scforge.models.scbert.api import ScBERT
        from scforge.models.scbert.checkpoint import load_state_into
        from scforge.models.scbert.model import ScBERTModel

        if n_classes < 2:
            raise ConfigError(f"a classifier needs at least 2 classes, got {n_classes}")
        config = dataclasses.replace(self.model.config, n_classes=n_classes)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = ScBERTModel(config)
        state = {k: v for k, v in self.model.module.state_dict().items() if not k.startswith("to_out.")}
        state.update({k: v for k, v in module.state_dict().items() if k.startswith("to_out.")})
        load_state_into(module, state, source=source)
        return ScBERT(module, copy.deepcopy(self.model.panel), source=source)

    def training_module(self, optim: Any, class_weights: tuple[float, ...] | None) -> Any:
        from scforge.models.scbert.training import ScBERTClassifierModule, finetune_frozen_prefixes
        from scforge.train import OptimConfig

        optim = optim or OptimConfig()
        frozen = tuple(dict.fromkeys((*optim.freeze, *finetune_frozen_prefixes(self.model.module))))
        return ScBERTClassifierModule(self.model.module, dataclasses.replace(optim, freeze=frozen),
                                      class_weights=class_weights)

    def collate(self, cells: TokenizedCells, labels: np.ndarray, seed: int) -> Any:
        from scforge.models.scbert.training import LabelledTokenCollator

        return LabelledTokenCollator(self.model.token_matrix(cells), labels)

    def proba(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto", precision: str = "auto",
              progress: bool = False) -> np.ndarray:
        return self.model.proba_tokens(cells, batch_size=batch_size, device=device, precision=precision,
                                       progress=progress)

    def embed(self, adata: Any, layer: str | None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, seed: int = 0, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        self.settings(max_length, seed)  # rejects a max_length scBERT cannot honour
        return self.model.embed(adata, layer, batch_size=batch_size, key_added="", device=device,
                                precision=precision, check_input=check_input, progress=progress)
