"""Multi-head self-attention on ``torch.nn.functional.scaled_dot_product_attention``.

One packed input projection ``Wqkv`` (rows: the q, k and v blocks, each head-major) and ``out_proj``:
the tensor layout of scGPT's flash-attn checkpoints and of ``nn.MultiheadAttention.in_proj_weight``.

Two input forms:

* padded ``x [B, L, d]`` with ``key_padding_mask [B, L]`` (True = padding) and optionally a boolean
  ``attn_mask [B, L, L]`` (True = may attend; scGPT's generative scheme uses it);
* packed ``x [T, d]`` with ``cu_seqlens [B+1]``: only real tokens exist, so padding costs nothing.
  :func:`varlen_attention` runs flash-attn's varlen kernel when that optional package is installed
  on a GPU, a padded SDPA call on other GPUs, and one SDPA call per sequence on CPU.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from torch import nn

from scforge.nn.packing import pack_padded, unpack_to_padded

_HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
# CPU: below this sequence length one padded call beats per-sequence calls (their fixed cost
# dominates); above it per-sequence calls win (padded + mask takes the math path over [B, H, L, L])
_CPU_PADDED_MAX_LEN = 256


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention within each packed sequence. ``q, k, v``: ``[T, H, dh]``; returns ``[T, H, dh]``.

    On CPU, batches whose longest sequence exceeds 256 tokens run one SDPA call per sequence (no
    padded position is computed; in training this also avoids the padded [B, H, L, L] scores that
    attention dropout forces), and shorter ones run one padded call, where per-call costs dominate.
    GPUs take flash-attn's varlen kernel when installed, else one padded call."""
    longest = int(max_seqlen) if max_seqlen is not None else int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    if q.is_cuda or longest <= _CPU_PADDED_MAX_LEN:
        if q.is_cuda and _HAS_FLASH_ATTN and q.dtype in (torch.float16, torch.bfloat16):
            from flash_attn import flash_attn_varlen_func

            cu = cu_seqlens.to(torch.int32)
            return flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, dropout_p=dropout_p)
        # padded SDPA: one call for the batch (GPU kernels are efficient; batches are length-sorted)
        lengths = cu_seqlens[1:] - cu_seqlens[:-1]
        qp, kp, vp = (unpack_to_padded(t, cu_seqlens).transpose(1, 2) for t in (q, k, v))
        keep = torch.arange(qp.shape[2], device=q.device)[None, :] < lengths[:, None]
        out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep[:, None, None, :], dropout_p=dropout_p)
        return pack_padded(out.transpose(1, 2), ~keep)[0]
    parts = []  # concatenated, not written into slices: differentiating slice writes copies the whole output
    bounds = cu_seqlens.tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi == lo:
            continue
        qs, ks, vs = (t[lo:hi].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout_p)[0].transpose(0, 1))
    return torch.cat(parts) if parts else q.new_zeros(q.shape)


class SelfAttention(nn.Module):
    """Multi-head self-attention (``Wqkv`` + ``out_proj``), padded or packed input."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.dropout = dropout
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as ``[..., L, H, dh]`` (before any transpose)."""
        parts = self.Wqkv(x).unflatten(-1, (3, self.n_heads, self.head_dim))
        return parts.unbind(-3)

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = self.qkv(x)
        if cu_seqlens is not None:
            if attn_mask is not None:
                raise ValueError("attn_mask needs padded input; packed input has no cross-sequence positions")
            out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, dropout_p=p)
            return self.out_proj(out.flatten(-2))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, dh]
        mask = None
        if key_padding_mask is not None:
            mask = (~key_padding_mask)[:, None, None, :]
        if attn_mask is not None:
            extra = attn_mask[:, None] if attn_mask.dim() == 3 else attn_mask
            mask = extra if mask is None else mask & extra
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        return self.out_proj(out.transpose(1, 2).flatten(-2))
