"""scCello in the annotation task (:mod:`scforge.tasks.annotate`): full fine-tuning with a linear
classification head on the cell embedding (``cell_cls`` on the last layer's ``<cls>``), and linear probing
on the frozen cell embedding (scCello's cell type classification protocols). The backbone is Geneformer's,
so the Geneformer backend's input check, tokenization call, collation, prediction loop and embedding call
are reused."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch
from torch import nn

from scforge.errors import ConfigError
from scforge.models.geneformer.training import GeneformerAnnotationBackend
from scforge.models.sccello.model import ScCelloModel
from scforge.tasks.annotate import AnnotationBackend


class ScCelloClassifier(nn.Module):
    """``ScCelloModel.classify`` as a module's forward (what the shared classifier training module calls);
    its parameters are the scCello model's own."""

    def __init__(self, model: ScCelloModel) -> None:
        super().__init__()
        self.sccello = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        return self.sccello.classify(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)


class ScCelloAnnotationBackend(GeneformerAnnotationBackend):
    """scCello fine-tuning (cross-entropy through the whole model and the new head) and linear probing on
    :meth:`ScCello.embed`."""

    family = "sccello"

    def __init__(self, model: Any) -> None:
        AnnotationBackend.__init__(self, model)
        self.n_special = 1  # <cls>

    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        limit = self.model.config.max_position_embeddings
        if max_length is not None and not 2 <= max_length <= limit:
            raise ConfigError(f"max_length must be in 2..{limit} (the model's positions), got {max_length}.")
        return {"tokenizer": "sccello-rank", "max_length": int(max_length or limit), "seed": int(seed)}

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

    def _classifier(self) -> nn.Module:
        if not self.model.config.num_labels:
            raise ConfigError("this scCello model has no classification head; fine-tune it first.")
        return ScCelloClassifier(self.model.module)
