"""scBERT as a pure torch module: token + gene2vec position embeddings, Performer layers on the
shared :class:`scforge.nn.EncoderLayer` (pre-norm, GELU feed-forward, FAVOR+ attention), final
LayerNorm, and either the pretraining head or the published classification head."""

from __future__ import annotations

import torch
from torch import nn

from scforge.errors import ConfigError
from scforge.models.scbert.config import ScBERTConfig
from scforge.models.scbert.performer import FavorSelfAttention
from scforge.nn import EncoderLayer, TransformerEncoder


class GenePositionEmbedding(nn.Module):
    """Frozen per-position embedding (gene2vec rows in panel order plus a zero row): ``emb.weight``."""

    def __init__(self, n_positions: int, dim: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(n_positions, dim)
        self.emb.weight.requires_grad_(False)

    def forward(self, n: int) -> torch.Tensor:
        return self.emb.weight[:n]


class ClassificationHead(nn.Module):
    """scBERT's fine-tuning head: ``conv1`` (one scalar per position from its ``dim`` vector) ->
    ReLU -> ``fc1`` -> ReLU -> dropout -> ``fc2`` -> ReLU -> dropout -> ``fc3`` (class logits)."""

    def __init__(self, dim: int, seq_len: int, n_classes: int, hidden1: int = 512, hidden2: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 1, (1, dim))
        self.fc1 = nn.Linear(seq_len, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, n_classes)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)

    def position_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """``relu(conv1(hidden))``: one value per position, ``[B, seq_len]`` (the input of ``fc1``)."""
        return torch.relu(self.conv1(hidden[:, None]).flatten(1))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(self.position_scores(hidden)))
        x = torch.relu(self.fc2(self.dropout1(x)))
        return self.fc3(self.dropout2(x))


class ScBERTModel(nn.Module):
    """scBERT (``PerformerLM`` as scBERT configures it). Input: token ids ``[B, N]`` (0..5 expression
    bins, 6 = ``<mask>``), position ``i`` = gene ``i`` of the panel, ``N <= max_seq_len``
    (``N == max_seq_len`` with the classification head, whose ``fc1`` sees every position).

    Parameter names: ``token_emb``, ``pos_emb.emb``, ``performer.layers.{i}`` (``norm1``,
    ``self_attn.{to_q,to_k,to_v,to_out,projection_matrix}``, ``norm2``, ``linear1``, ``linear2``),
    ``norm``, ``to_out`` (``Linear`` or :class:`ClassificationHead`); :mod:`.checkpoint` maps them
    to the published names. ``forward`` never redraws the random features (see
    :meth:`redraw_projections`)."""

    def __init__(self, config: ScBERTConfig) -> None:
        super().__init__()
        self.config = c = config
        generator = torch.Generator().manual_seed(int(c.projection_seed))
        self.token_emb = nn.Embedding(c.num_tokens, c.dim)
        self.pos_emb = GenePositionEmbedding(c.max_seq_len, c.dim) if c.g2v_position_emb else None
        self.dropout = nn.Dropout(c.dropout)

        def make_layer() -> EncoderLayer:
            attention = FavorSelfAttention(c.dim, c.heads, c.dim_head, c.nb_features, qkv_bias=False,
                                           out_bias=True, chunk_size=c.attention_chunk, generator=generator)
            return EncoderLayer(c.dim, c.heads, c.dim * c.ff_mult, dropout=c.dropout, activation="gelu",
                                norm="pre", eps=1e-5, attention=attention)

        self.performer = TransformerEncoder(make_layer, c.depth)
        self.register_buffer("calls_since_last_redraw", torch.tensor(0))
        self.norm = nn.LayerNorm(c.dim)
        if c.n_classes is None:
            self.to_out: nn.Module = nn.Linear(c.dim, c.num_tokens)
        else:
            self.to_out = ClassificationHead(c.dim, c.max_seq_len, c.n_classes, c.head_hidden1, c.head_hidden2,
                                             c.head_dropout)

    @property
    def has_classifier(self) -> bool:
        return isinstance(self.to_out, ClassificationHead)

    def attention_modules(self) -> list[FavorSelfAttention]:
        return [layer.self_attn for layer in self.performer.layers]

    def set_attention_chunk(self, chunk_size: int | None) -> None:
        """Positions per FAVOR+ chunk in every layer (None: the whole sequence at once)."""
        for attention in self.attention_modules():
            attention.chunk_size = chunk_size

    @torch.no_grad()
    def redraw_projections(self, generator: torch.Generator | None = None) -> None:
        """New random features in every layer (pretraining); resets ``calls_since_last_redraw``."""
        for attention in self.attention_modules():
            attention.redraw_projection(generator)
        self.calls_since_last_redraw.zero_()

    def encode(self, tokens: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None,
               return_layers: bool = False):
        """Final-norm hidden states ``[B, N, dim]`` (and each layer's output with ``return_layers``)."""
        if tokens.dim() != 2:
            raise ConfigError(f"scBERT takes token ids [batch, positions], got shape {tuple(tokens.shape)}.")
        n = tokens.shape[1]
        if n > self.config.max_seq_len:
            raise ConfigError(f"{n} positions, but this scBERT model has {self.config.max_seq_len} "
                              "(gene panel + 1); tokenize with the model's own panel.")
        x = self.token_emb(tokens.long())
        if self.pos_emb is not None:
            x = x + self.pos_emb(n).to(x.dtype)
        x = self.dropout(x)
        out = self.performer(x, key_padding_mask=key_padding_mask, return_layers=return_layers)
        if return_layers:
            return self.norm(out[0]), out[1]
        return self.norm(out)

    def forward(self, tokens: torch.Tensor, *, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token logits ``[B, N, num_tokens]`` (pretraining head) or class logits ``[B, n_classes]``."""
        if self.has_classifier and tokens.shape[-1] != self.config.max_seq_len:
            raise ConfigError(f"the classification head needs all {self.config.max_seq_len} positions, got "
                              f"{tokens.shape[-1]}.")
        return self.to_out(self.encode(tokens, key_padding_mask=key_padding_mask))
