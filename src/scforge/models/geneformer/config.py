"""Geneformer configuration: the fields of the HF ``BertConfig`` that Geneformer checkpoints use."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from scforge.models._config import DictConfig
from scforge.errors import ConfigError

ACTIVATIONS = ("relu", "gelu", "gelu_tanh")
# HF spellings of the activations scforge's EncoderLayer supports
_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
_TO_HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}
V1_VOCAB_SIZE = 25_426
V2_VOCAB_SIZE = 20_275


@dataclass
class GeneformerConfig(DictConfig):
    """Architecture of a Geneformer (HF BERT, post-LN) model.

    Field names and defaults are those of ``transformers.BertConfig`` with Geneformer's choices
    (``hidden_act="relu"``, ``layer_norm_eps=1e-12``). ``num_labels`` is the size of a
    ``BertForSequenceClassification`` head (``None``: no head)."""

    vocab_size: int = V2_VOCAB_SIZE
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 4096
    hidden_act: str = "relu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    type_vocab_size: int = 2
    pad_token_id: int = 0
    initializer_range: float = 0.02
    num_labels: int | None = None
    classifier_dropout: float | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.hidden_act in ACTIVATIONS, f"hidden_act={self.hidden_act!r}; choose one of {ACTIVATIONS}"),
            (self.hidden_size % self.num_attention_heads == 0,
             f"hidden_size={self.hidden_size} must be divisible by num_attention_heads={self.num_attention_heads}"),
            (0 <= self.pad_token_id < self.vocab_size, f"pad_token_id={self.pad_token_id} outside the vocabulary"),
            (self.type_vocab_size >= 1, "type_vocab_size must be at least 1"),
            (self.num_labels is None or self.num_labels >= 1, "num_labels must be None or >= 1"),
            (min(self.vocab_size, self.hidden_size, self.num_hidden_layers, self.intermediate_size,
                 self.max_position_embeddings) >= 1, "sizes must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"GeneformerConfig: {message}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    # ---- (de)serialisation ---------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, data: dict[str, Any]) -> GeneformerConfig:
        """Config from a HF ``config.json`` (parsed). Fields outside BERT's architecture are ignored;
        settings scforge cannot reproduce (e.g. relative positions) raise :class:`ConfigError`."""
        model_type = data.get("model_type", "bert")
        if model_type != "bert":
            raise ConfigError(f"config.json has model_type={model_type!r}; Geneformer checkpoints are 'bert'.")
        position_type = data.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ConfigError(f"position_embedding_type={position_type!r} is not supported (Geneformer uses "
                              "'absolute').")
        act = data.get("hidden_act", "relu")
        if act not in _HF_ACTIVATIONS:
            raise ConfigError(f"hidden_act={act!r} is not supported; Geneformer uses 'relu'.")
        fields = {f.name for f in dataclasses.fields(cls)} - {"hidden_act", "num_labels"}
        values = {k: data[k] for k in fields if k in data}
        values["hidden_act"] = _HF_ACTIVATIONS[act]
        architectures = data.get("architectures") or []
        if any("SequenceClassification" in a for a in architectures):
            labels = data.get("num_labels") or len(data.get("id2label") or {}) or 2
            values["num_labels"] = int(labels)
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"config.json does not describe a BERT model: {exc}") from exc

    def to_hf_dict(self, architecture: str | None = None) -> dict[str, Any]:
        """HF ``config.json`` contents (``BertForMaskedLM``, or ``BertForSequenceClassification``
        when the config has ``num_labels``)."""
        if architecture is None:
            architecture = "BertForSequenceClassification" if self.num_labels else "BertForMaskedLM"
        out = {k: v for k, v in self.to_dict().items() if k not in ("num_labels",)}
        out["hidden_act"] = _TO_HF_ACTIVATIONS[self.hidden_act]
        out.update(model_type="bert", architectures=[architecture], position_embedding_type="absolute",
                   use_cache=True, torch_dtype="float32")
        if self.num_labels:
            out["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            out["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return out

    # ---- published shapes ----------------------------------------------------------------------
    @classmethod
    def v1_10m(cls, **overrides: Any) -> GeneformerConfig:
        """``Geneformer-V1-10M`` (gf-6L-30M-i2048): 6 layers, 256 hidden, 4 heads, 2048 positions."""
        base = dict(vocab_size=V1_VOCAB_SIZE, hidden_size=256, num_hidden_layers=6, num_attention_heads=4,
                    intermediate_size=512, max_position_embeddings=2048, hidden_dropout_prob=0.02,
                    attention_probs_dropout_prob=0.02)
        return cls(**{**base, **overrides})

    @classmethod
    def v2_104m(cls, **overrides: Any) -> GeneformerConfig:
        """``Geneformer-V2-104M``: 12 layers, 768 hidden, 12 heads, 4096 positions."""
        base = dict(vocab_size=V2_VOCAB_SIZE, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                    intermediate_size=3072, max_position_embeddings=4096)
        return cls(**{**base, **overrides})

    @classmethod
    def v2_316m(cls, **overrides: Any) -> GeneformerConfig:
        """``Geneformer-V2-316M`` (repository default since June 2025): 18 layers, 1152 hidden, 18 heads."""
        base = dict(vocab_size=V2_VOCAB_SIZE, hidden_size=1152, num_hidden_layers=18, num_attention_heads=18,
                    intermediate_size=4608, max_position_embeddings=4096)
        return cls(**{**base, **overrides})
