"""Transformer encoder layers shared by every model family.

Attribute names follow ``torch.nn.TransformerEncoderLayer`` (``self_attn``, ``linear1``, ``linear2``,
``norm1``, ``norm2``) so published state dicts map by name. ``norm`` chooses the residual scheme:

* ``"post"``: ``x = norm1(x + attn(x)); x = norm2(x + ff(x))`` (scGPT, BERT/Geneformer);
* ``"pre"``: ``x = x + attn(norm1(x)); x = x + ff(norm2(x))`` (standard pre-LN);
* ``"scgpt_pre"``: scGPT's flash layer with ``pre_norm=True``, which normalises the residual
  stream itself: ``x = norm1(x); x = x + attn(x); x = norm2(x); x = x + ff(x)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from scforge.nn.attention import SelfAttention

_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
NORM_SCHEMES = ("post", "pre", "scgpt_pre")


class EncoderLayer(nn.Module):
    """Self-attention + feed-forward block. ``attention`` replaces the default
    :class:`SelfAttention` (e.g. scBERT's Performer); it must accept the same keyword arguments."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        dropout: float = 0.1,
        activation: str = "relu",
        norm: str = "post",
        eps: float = 1e-5,
        attention: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r}; choose one of {sorted(_ACTIVATIONS)}")
        if norm not in NORM_SCHEMES:
            raise ValueError(f"norm={norm!r}; choose one of {NORM_SCHEMES}")
        self.self_attn = attention if attention is not None else SelfAttention(d_model, n_heads, dropout)
        self.linear1 = nn.Linear(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ff, d_model)
        self.norm1 = nn.LayerNorm(d_model, eps=eps)
        self.norm2 = nn.LayerNorm(d_model, eps=eps)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation_name = activation
        self.activation = _ACTIVATIONS[activation]
        self.norm = norm

    def _ff(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear2(self.dropout(self.activation(self.linear1(x))))

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        if self.norm == "post":
            x = self.norm1(x + self.dropout1(self.self_attn(x, **attn_kwargs)))
            return self.norm2(x + self.dropout2(self._ff(x)))
        if self.norm == "pre":
            x = x + self.dropout1(self.self_attn(self.norm1(x), **attn_kwargs))
            return x + self.dropout2(self._ff(self.norm2(x)))
        x = self.norm1(x)
        x = x + self.dropout1(self.self_attn(x, **attn_kwargs))
        x = self.norm2(x)
        return x + self.dropout2(self._ff(x))


class TransformerEncoder(nn.Module):
    """A stack of :class:`EncoderLayer` (``layers.{i}``), optional final LayerNorm."""

    def __init__(self, make_layer: Callable[[], EncoderLayer], n_layers: int, final_norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList([make_layer() for _ in range(n_layers)])
        self.final_norm = final_norm

    def forward(self, x: torch.Tensor, *, return_layers: bool = False, **attn_kwargs):
        """Run every layer; with ``return_layers`` also return each layer's output (a list)."""
        outputs = []
        for layer in self.layers:
            x = layer(x, **attn_kwargs)
            if return_layers:
                outputs.append(x)
        if self.final_norm is not None:
            x = self.final_norm(x)
        return (x, outputs) if return_layers else x
