"""scBERT configuration: the arguments of the reference ``PerformerLM`` as scBERT instantiates it."""

from __future__ import annotations

import math
from dataclasses import dataclass

from scforge.models._config import DictConfig
from scforge.errors import ConfigError


def default_nb_features(dim_head: int) -> int:
    """Performer's default number of random features, ``int(dim_head * ln(dim_head))`` (266 for 64)."""
    return int(dim_head * math.log(dim_head))


@dataclass
class ScBERTConfig(DictConfig):
    """Architecture of an scBERT model (defaults: the published model).

    ``num_tokens``: expression bins 0..5 plus ``<mask>`` (6, also the ignore id of the loss).
    ``max_seq_len``: gene panel + the trailing zero position (16,906 + 1). ``dim_head`` is
    independent of ``dim / heads`` (Performer's default 64). ``nb_features``: random features per
    head (None: ``int(dim_head * ln dim_head)``). ``g2v_position_emb``: add the frozen gene2vec
    embedding of each position (False: no positional input, the reference's other choice).
    ``feature_redraw_interval``: optimizer steps between redraws of the random features during
    pretraining (None: fixed); inference and loading never redraw. ``n_classes``: None for the
    pretraining head ``to_out`` (Linear(dim, num_tokens)), else the published classifier
    (``conv1`` -> ``fc1`` [max_seq_len -> head_hidden1] -> ``fc2`` [-> head_hidden2] -> ``fc3``).
    ``projection_seed`` seeds the random-feature draws of new models. ``attention_chunk``: sequence
    positions per chunk in FAVOR+ (bounds the [chunk, nb_features] feature maps; None: one chunk).
    """

    num_tokens: int = 7
    dim: int = 200
    depth: int = 6
    heads: int = 10
    dim_head: int = 64
    nb_features: int | None = None
    ff_mult: int = 4
    max_seq_len: int = 16907
    g2v_position_emb: bool = True
    dropout: float = 0.0
    feature_redraw_interval: int | None = 1000
    n_classes: int | None = None
    head_hidden1: int = 512
    head_hidden2: int = 128
    head_dropout: float = 0.0
    projection_seed: int = 0
    attention_chunk: int | None = 4096
    expected_input: str = "counts"

    def __post_init__(self) -> None:
        if self.nb_features is None:
            self.nb_features = default_nb_features(self.dim_head)
        positive = ("num_tokens", "dim", "depth", "heads", "dim_head", "nb_features", "ff_mult", "max_seq_len",
                    "head_hidden1", "head_hidden2")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"ScBERTConfig: {name} must be a positive integer, got {value!r}.")
        if self.num_tokens < 2:
            raise ConfigError(f"ScBERTConfig: num_tokens must be >= 2 (bins and <mask>), got {self.num_tokens}.")
        if self.n_classes is not None and (not isinstance(self.n_classes, int) or self.n_classes < 1):
            raise ConfigError(f"ScBERTConfig: n_classes must be None or a positive integer, got {self.n_classes!r}.")
        if self.feature_redraw_interval is not None and self.feature_redraw_interval < 1:
            raise ConfigError("ScBERTConfig: feature_redraw_interval must be None (fixed features) or >= 1, got "
                              f"{self.feature_redraw_interval}.")
        if self.attention_chunk is not None and self.attention_chunk < 1:
            raise ConfigError(f"ScBERTConfig: attention_chunk must be None or >= 1, got {self.attention_chunk}.")
        for name in ("dropout", "head_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"ScBERTConfig: {name} must be in [0, 1), got {getattr(self, name)}.")
        if self.expected_input not in ("counts",):
            raise ConfigError("ScBERTConfig: expected_input must be 'counts' (scBERT normalises and log2-bins "
                              f"raw counts itself), got {self.expected_input!r}.")

    @property
    def mask_token_id(self) -> int:
        """``<mask>``: the last token id (6 in scBERT); also the padding / ignore id."""
        return self.num_tokens - 1

    @property
    def max_bin(self) -> int:
        """Highest expression bin (5 in scBERT)."""
        return self.num_tokens - 2

    @property
    def panel_size(self) -> int:
        """Genes in the panel: every position but the trailing zero one."""
        return self.max_seq_len - 1

