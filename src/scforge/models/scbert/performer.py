"""FAVOR+ linear attention (Performer, non-causal softmax kernel), as scBERT uses it.

:class:`FavorSelfAttention` plugs into :class:`scforge.nn.EncoderLayer`'s ``attention=`` slot. It
keeps the reference's tensors: ``to_q`` / ``to_k`` / ``to_v`` (no bias; ``heads * dim_head`` wide,
``dim_head`` independent of ``dim / heads``), ``to_out`` (with bias) and the random-feature matrix
``projection_matrix`` [nb_features, dim_head], a buffer loaded from checkpoints and never redrawn
on load or in inference.

The kernel follows performer-pytorch's ``softmax_kernel``: with ``c = dim_head ** -0.25`` and
``P`` the projection, the features of a row ``x`` are
``m ** -0.5 * (exp(c x P^T - c^2 |x|^2 / 2 - stabiliser) + 1e-4)``, where the stabiliser is the
row's own maximum of ``c x P^T`` for queries and the maximum over all positions and features of
the sequence (per head) for keys; the stabiliser is excluded from gradients. Attention is then
``phi(q) (phi(k)^T v) / (phi(q) . sum_n phi(k_n))``, linear in sequence length.

Keys and queries are processed in chunks of ``chunk_size`` positions (fewer for large batches, so
a chunk's feature map stays under :data:`FEATURE_BUDGET` floats), so the largest temporary is
``[batch, heads, chunk, nb_features]`` instead of the whole sequence's feature map; the key pass
rescales its running sums when a later chunk raises the maximum (the same trick as online
softmax), which gives the reference's result up to float rounding. The kernel runs in float32
even under bf16/fp16 autocast (the exponentials and the sums over 16,907 positions need it); the
four linear projections follow the autocast dtype.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from scforge.errors import ConfigError

KERNEL_EPS = 1e-4
#: feature-map elements per chunk (batch x heads x positions x features): 2**26 floats = 256 MiB
FEATURE_BUDGET = 1 << 26


def gaussian_orthogonal_random_matrix(
    nb_rows: int, nb_columns: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Performer's random features ``[nb_rows, nb_columns]``: blocks of orthonormal rows (QR of a
    Gaussian matrix), rows scaled by the norms of Gaussian vectors (the reference's ``scaling=0``)."""
    blocks = []
    for start in range(0, nb_rows, nb_columns):
        gaussian = torch.randn(nb_columns, nb_columns, generator=generator)
        q, _ = torch.linalg.qr(gaussian, mode="reduced")
        blocks.append(q.T[: min(nb_columns, nb_rows - start)])
    rows = torch.cat(blocks)
    norms = torch.randn(nb_rows, nb_columns, generator=generator).norm(dim=1)
    return norms[:, None] * rows


def _feature_logits(x: torch.Tensor, projection: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``c x P^T`` [..., n, m] and ``c^2 |x|^2 / 2`` [..., n, 1] with ``c = d ** -0.25``."""
    c = x.shape[-1] ** -0.25
    logits = torch.matmul(x * c, projection.T)
    half_sq_norm = (x * x).sum(-1, keepdim=True) * (c * c / 2)
    return logits, half_sq_norm


def favor_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    projection: torch.Tensor,
    *,
    key_padding_mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    eps: float = KERNEL_EPS,
) -> torch.Tensor:
    """Non-causal FAVOR+ attention. ``q, k, v``: ``[B, H, N, dh]``; ``projection``: ``[m, dh]``;
    ``key_padding_mask`` ``[B, N]`` (True = padding: excluded from the keys and their maximum).
    Returns ``[B, H, N, dh]`` in float32."""
    q, k, v, projection = q.float(), k.float(), v.float(), projection.float()
    n = k.shape[-2]
    step = n if chunk_size is None else max(1, int(chunk_size))
    ratio = projection.shape[0] ** -0.5
    keep = None if key_padding_mask is None else ~key_padding_mask[:, None, :, None]  # [B, 1, N, 1]

    # keys: running maximum M, sum_n exp(.. - M) v_n and sum_n exp(.. - M), rescaled when M grows
    running_max = torch.full((*k.shape[:2], 1, 1), torch.finfo(torch.float32).min, device=k.device)
    kv = k.new_zeros((*k.shape[:2], projection.shape[0], v.shape[-1]))
    k_sum = k.new_zeros((*k.shape[:2], projection.shape[0]))
    v_sum = v.new_zeros((*v.shape[:2], v.shape[-1]))
    n_keys = torch.full((k.shape[0], 1, 1), float(n), device=k.device)
    for lo in range(0, n, step):
        logits, half_sq_norm = _feature_logits(k[..., lo : lo + step, :], projection)
        v_chunk = v[..., lo : lo + step, :]
        if keep is not None:
            chunk_keep = keep[:, :, lo : lo + step]
            logits_for_max = logits.masked_fill(~chunk_keep, float("-inf"))
            v_chunk = v_chunk * chunk_keep
        else:
            logits_for_max = logits
        new_max = torch.maximum(running_max, logits_for_max.detach().amax(dim=(-1, -2), keepdim=True))
        features = torch.exp(logits - half_sq_norm - new_max)
        if keep is not None:
            features = features * chunk_keep
        rescale = torch.exp(running_max - new_max)
        kv = kv * rescale + torch.matmul(features.transpose(-1, -2), v_chunk)
        k_sum = k_sum * rescale[..., 0] + features.sum(-2)
        v_sum = v_sum + v_chunk.sum(-2)
        running_max = new_max
    if keep is not None:
        n_keys = keep.sum(dim=2, dtype=torch.float32)  # [B, 1, 1]
    context = ratio * (kv + eps * v_sum[..., None, :])  # sum_n phi(k_n) v_n^T   [B, H, m, dh]
    normaliser = ratio * (k_sum + eps * n_keys)  # sum_n phi(k_n)              [B, H, m]

    outputs = []
    for lo in range(0, n, step):
        logits, half_sq_norm = _feature_logits(q[..., lo : lo + step, :], projection)
        stabiliser = logits.detach().amax(dim=-1, keepdim=True)
        features = ratio * (torch.exp(logits - half_sq_norm - stabiliser) + eps)
        numerator = torch.matmul(features, context)
        denominator = torch.matmul(features, normaliser[..., None])
        outputs.append(numerator / denominator)
    return torch.cat(outputs, dim=-2) if len(outputs) > 1 else outputs[0]


class FavorSelfAttention(nn.Module):
    """Performer self-attention for :class:`scforge.nn.EncoderLayer` (``attention=`` slot).

    Input ``x [B, N, dim]`` (padded form; ``key_padding_mask`` [B, N], True = padding). The packed
    form (``cu_seqlens``) and ``attn_mask`` are not supported: scBERT's inputs all have the panel's
    length and FAVOR+ has no attention matrix to mask."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int = 64,
        nb_features: int | None = None,
        *,
        qkv_bias: bool = False,
        out_bias: bool = True,
        chunk_size: int | None = 4096,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        nb_features = nb_features or int(dim_head * math.log(dim_head))
        inner = heads * dim_head
        self.heads, self.dim_head, self.nb_features = heads, dim_head, nb_features
        self.chunk_size = chunk_size
        self.to_q = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(dim, inner, bias=qkv_bias)
        self.to_out = nn.Linear(inner, dim, bias=out_bias)
        self.register_buffer("projection_matrix", gaussian_orthogonal_random_matrix(
            nb_features, dim_head, generator=generator))

    @torch.no_grad()
    def redraw_projection(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in place (pretraining only; loading never calls this)."""
        fresh = gaussian_orthogonal_random_matrix(self.nb_features, self.dim_head, generator=generator)
        self.projection_matrix.copy_(fresh.to(self.projection_matrix))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, self.dim_head)).transpose(1, 2)  # [B, H, N, dh]

    def forward(
        self,
        x: torch.Tensor,
        *,
        key_padding_mask: torch.Tensor | None = None,
        attn_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
    ) -> torch.Tensor:
        if cu_seqlens is not None or attn_mask is not None:
            raise ConfigError("FAVOR+ attention takes padded input [batch, length, dim] with an optional "
                              "key_padding_mask; packed input (cu_seqlens) and attn_mask are not supported.")
        if x.dim() != 3:
            raise ConfigError(f"FAVOR+ attention expects [batch, length, dim] input, got shape {tuple(x.shape)}.")
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        chunk = self.chunk_size
        if chunk is not None:  # smaller chunks for big batches: the feature maps stay within FEATURE_BUDGET
            chunk = min(chunk, max(128, FEATURE_BUDGET // (x.shape[0] * self.heads * self.nb_features)))
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = favor_attention(q, k, v, self.projection_matrix, key_padding_mask=key_padding_mask,
                                  chunk_size=chunk)
        out = out.transpose(1, 2).flatten(-2)
        return self.to_out(out.to(self.to_out.weight.dtype))
