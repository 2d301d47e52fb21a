"""Moving between padded ``[B, L, ...]`` batches and packed ``[T, ...]`` tokens with ``cu_seqlens``."""

from __future__ import annotations

import torch


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """``[0, l0, l0+l1, ...]`` (int64) from per-sequence lengths."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    out = torch.zeros(lengths.numel() + 1, dtype=torch.int64, device=lengths.device)
    torch.cumsum(lengths, 0, out=out[1:])
    return out


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Sequence index of every packed token."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)


def pack_padded(x: torch.Tensor, padding_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real tokens of a padded batch (``padding_mask`` True = pad) and their ``cu_seqlens``.

    Padding must be at the end of each row (as every scforge collator makes it)."""
    keep = ~padding_mask
    return x[keep], cu_seqlens_from_lengths(keep.sum(1))


def unpack_to_padded(x: torch.Tensor, cu_seqlens: torch.Tensor, pad_value: float = 0.0) -> torch.Tensor:
    """Packed tokens back to ``[B, max_len, ...]``, padded at the end with ``pad_value``."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    n, max_len = lengths.numel(), int(lengths.max()) if lengths.numel() else 0
    out = x.new_full((n, max_len, *x.shape[1:]), pad_value)
    mask = torch.arange(max_len, device=x.device)[None, :] < lengths[:, None]
    out[mask] = x
    return out
