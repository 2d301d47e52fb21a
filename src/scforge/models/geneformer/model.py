"""Geneformer (HF BERT, post-LN) as pure torch modules on the shared core.

Equivalent to ``transformers.BertForMaskedLM`` / ``BertForSequenceClassification`` in evaluation
mode. Inputs are padded (``input_ids [B, L]`` with ``attention_mask [B, L]``, 1 = token, the HF
convention) or packed (``input_ids [T]`` with ``cu_seqlens [B+1]``; positions restart at 0 for every
cell), where padding costs nothing. Module names follow the shared core (``encoder.layers.{i}``
with a fused ``Wqkv``); :mod:`scforge.models.geneformer.checkpoint` maps them to and from HF names.
"""

from __future__ import annotations

import torch
from torch import nn

from scforge.errors import InputDataError
from scforge.models.geneformer.config import GeneformerConfig
from scforge.nn import EncoderLayer, SelfAttention, TransformerEncoder, cu_seqlens_from_lengths, segment_ids
from scforge.nn.layers import _ACTIVATIONS


def init_bert_weights(module: nn.Module, std: float) -> None:
    """HF BERT initialisation: normal(0, std) weights, zero biases and padding rows, LayerNorm 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, 0.0, std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def packed_positions(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Position of every packed token within its own sequence (restarting at 0)."""
    return torch.arange(n_tokens, device=cu_seqlens.device) - cu_seqlens[:-1][segment_ids(cu_seqlens)]


class BertEmbeddings(nn.Module):
    """word + absolute position + token type (always 0 in Geneformer) -> LayerNorm -> dropout."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        c = config
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=c.pad_token_id)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        if token_type_ids is None:
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.dropout(self.LayerNorm(x))


def _bert_layer(c: GeneformerConfig) -> EncoderLayer:
    layer = EncoderLayer(
        c.hidden_size, c.num_attention_heads, c.intermediate_size, c.hidden_dropout_prob, c.hidden_act, "post",
        c.layer_norm_eps,
        attention=SelfAttention(c.hidden_size, c.num_attention_heads, c.attention_probs_dropout_prob),
    )
    layer.dropout = nn.Identity()  # BERT has no dropout between the two feed-forward linears
    return layer


class BertBackbone(nn.Module):
    """BERT encoder (``embeddings`` + ``encoder.layers``) returning hidden states."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = TransformerEncoder(lambda: _bert_layer(config), config.num_hidden_layers)
        init_bert_weights(self, config.initializer_range)

    def _check_length(self, longest: int) -> None:
        limit = self.config.max_position_embeddings
        if longest > limit:
            raise InputDataError(
                f"A sequence has {longest} tokens but the model has {limit} positions. Truncate the input "
                f"(the tokenizer's max_length={limit})."
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        token_type_ids: torch.Tensor | None = None,
        return_layers: bool = False,
        num_layers: int | None = None,
    ):
        """Last hidden states (``[B, L, H]`` padded or ``[T, H]`` packed); with ``return_layers`` also the
        list of all hidden states, the embedding output first (HF ``hidden_states``). ``num_layers`` runs
        only the first layers (e.g. the penultimate layer's output needs all but the last)."""
        if cu_seqlens is not None:
            if input_ids.dim() != 1:
                raise InputDataError(f"Packed input_ids must be 1-D [tokens], got shape {tuple(input_ids.shape)}.")
            cu_seqlens = cu_seqlens.to(device=input_ids.device, dtype=torch.int64)
            if max_seqlen is None:
                max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
            self._check_length(int(max_seqlen))
            positions = packed_positions(cu_seqlens, input_ids.shape[0])
            attn_kwargs = {"cu_seqlens": cu_seqlens, "max_seqlen": int(max_seqlen)}
        else:
            if input_ids.dim() != 2:
                raise InputDataError(f"Padded input_ids must be 2-D [batch, length], got {tuple(input_ids.shape)}.")
            self._check_length(input_ids.shape[1])
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
            attn_kwargs = {}
            if attention_mask is not None:
                attn_kwargs["key_padding_mask"] = attention_mask.to(input_ids.device) == 0
        x = self.embeddings(input_ids, positions, token_type_ids)
        states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x, **attn_kwargs)
            if return_layers:
                states.append(x)
        return (x, states) if return_layers else x


class BertMLMHead(nn.Module):
    """``cls.predictions``: dense -> activation -> LayerNorm -> decoder (tied to the word embeddings) + bias."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(self.activation(self.dense(hidden)))) + self.bias


class GeneformerForMaskedLM(nn.Module):
    """``BertForMaskedLM``: :class:`BertBackbone` (``.bert``) + :class:`BertMLMHead` (``.mlm_head``)."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        self.config = config
        self.bert = BertBackbone(config)
        self.mlm_head = BertMLMHead(config)
        init_bert_weights(self.mlm_head, config.initializer_range)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the decoder weight with the word embeddings (as HF ``tie_word_embeddings``)."""
        self.mlm_head.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        token_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """MLM logits for every token (``[B, L, V]`` / ``[T, V]``), or only for the tokens selected by
        ``token_index`` (a boolean mask or indices into the flattened tokens; saves the decoder's cost)."""
        hidden = self.bert(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        if token_index is not None:
            hidden = hidden.reshape(-1, hidden.shape[-1])[token_index.reshape(-1) if token_index.dtype == torch.bool
                                                          else token_index]
        return self.mlm_head(hidden)


def first_token_states(hidden: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Hidden state of each sequence's first token (``<cls>`` in V2) from padded or packed states."""
    if cu_seqlens is None:
        return hidden[:, 0]
    return hidden[cu_seqlens[:-1].to(hidden.device)]


class GeneformerForSequenceClassification(nn.Module):
    """``BertForSequenceClassification``: backbone, pooler (dense + tanh on the first token), dropout,
    classifier. HF's ``bert.pooler`` is ``pooler`` here."""

    def __init__(self, config: GeneformerConfig) -> None:
        super().__init__()
        if not config.num_labels:
            raise ValueError("GeneformerForSequenceClassification needs config.num_labels")
        self.config = config
        self.bert = BertBackbone(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_bert_weights(self.pooler, config.initializer_range)
        init_bert_weights(self.classifier, config.initializer_range)

    def pooled(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return torch.tanh(self.pooler(first_token_states(hidden, cu_seqlens)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                cu_seqlens: torch.Tensor | None = None, max_seqlen: int | None = None) -> torch.Tensor:
        """Class logits ``[B, num_labels]``."""
        pooled = self.pooled(input_ids, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen)
        return self.classifier(self.dropout(pooled))


def pack_sequences(sequences: list, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, int]:
    """Concatenate token-id sequences into packed ``input_ids``, ``cu_seqlens`` and ``max_seqlen``."""
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    ids = torch.cat([torch.as_tensor(s, dtype=torch.int64) for s in sequences]) if sequences else \
        torch.zeros(0, dtype=torch.int64)
    return ids.to(device), cu_seqlens_from_lengths(lengths).to(device), int(lengths.max()) if len(lengths) else 0
