"""Shared transformer core: attention (padded and padding-free), encoder layers, precision helpers.

Every model family builds on these pieces: scGPT and Geneformer use :class:`EncoderLayer` with the
default :class:`SelfAttention`; scBERT passes its Performer attention through the same ``attention=``
slot. Inputs are either padded ``[batch, length, d]`` with ``key_padding_mask`` (True = padding), or
packed ``[tokens, d]`` with ``cu_seqlens`` (cumulative sequence lengths), where padding costs nothing.
"""

from scforge.nn.attention import SelfAttention, varlen_attention
from scforge.nn.layers import EncoderLayer, TransformerEncoder
from scforge.nn.packing import cu_seqlens_from_lengths, pack_padded, segment_ids, unpack_to_padded
from scforge.nn.precision import autocast, cpu_has_fast_bf16, resolve_device, resolve_precision

__all__ = [
    "EncoderLayer",
    "SelfAttention",
    "TransformerEncoder",
    "autocast",
    "cpu_has_fast_bf16",
    "cu_seqlens_from_lengths",
    "pack_padded",
    "resolve_device",
    "resolve_precision",
    "segment_ids",
    "unpack_to_padded",
    "varlen_attention",
]
