"""scCello as pure torch modules: Geneformer's BERT backbone with ``<cls>`` at position 0, the ``cls``
(gene-token) and ``cell_cls`` (cell) projection heads, learned cell-type prototypes
(``learned_centroid``) and ``affine_projection``. The cell embedding is ``cell_cls(h[<cls>])`` of
the last layer; fine-tuned models add ``classifier``, a linear layer on it."""

from __future__ import annotations

import torch
from torch import nn

from scforge.models.geneformer.model import BertBackbone, first_token_states, init_bert_weights
from scforge.models.sccello.config import ScCelloConfig


class ProjectionHead(nn.Module):
    """Linear -> LayerNorm -> ReLU -> Linear (hidden -> hidden), scCello's ``cls`` and ``cell_cls``."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=eps)
        self.out = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.norm(self.dense(x))))


class ScCelloModel(nn.Module):
    """Backbone (``bert``), heads (``cls``, ``cell_cls``), ``learned_centroid`` [n_types, H], ``affine_projection``."""

    def __init__(self, config: ScCelloConfig) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.bert = BertBackbone(config.backbone())
        self.cls = ProjectionHead(h, config.layer_norm_eps)
        self.cell_cls = ProjectionHead(h, config.layer_norm_eps)
        self.learned_centroid = nn.Parameter(torch.empty(config.n_cell_types, h))
        self.affine_projection = nn.Linear(h, h)
        init_bert_weights(self.cls, config.initializer_range)
        init_bert_weights(self.cell_cls, config.initializer_range)
        init_bert_weights(self.affine_projection, config.initializer_range)
        nn.init.normal_(self.learned_centroid, 0.0, config.initializer_range)
        if config.num_labels:
            self.classifier = nn.Linear(h, config.num_labels)
            init_bert_weights(self.classifier, config.initializer_range)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Last-layer hidden states (``[B, L, H]`` padded or ``[T, H]`` packed)."""
        return self.bert(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)

    def cell_outputs(self, hidden: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """``cell_cls`` applied to each cell's ``<cls>`` state (position 0): the cell embedding ``[B, H]``."""
        return self.cell_cls(first_token_states(hidden, cu_seqlens))

    def vocab_outputs(self) -> torch.Tensor:
        """The ``cls`` head applied to every input word embedding: L_MGP's targets ``[V, H]``."""
        return self.cls(self.bert.embeddings.word_embeddings.weight)

    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Class logits ``[B, num_labels]``: ``classifier`` on the cell embeddings."""
        if not self.config.num_labels:
            raise ValueError("this scCello model has no classification head (config.num_labels is None)")
        hidden = self.encode(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.classifier(self.cell_outputs(hidden, cu_seqlens))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> dict[str, torch.Tensor]:
        """``hidden`` states, ``token_outputs`` (``cls`` head per token) and ``cell_outputs``."""
        hidden = self.encode(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return {"hidden": hidden, "token_outputs": self.cls(hidden),
                "cell_outputs": self.cell_outputs(hidden, cu_seqlens)}
