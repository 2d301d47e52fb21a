"""Value masking for masked expression pretraining (scGPT's ``random_mask_value``), vectorized."""

from __future__ import annotations

import numpy as np
import torch

from scforge.errors import ConfigError


def mask_values(
    values: torch.Tensor | np.ndarray,
    *,
    mask_ratio: float = 0.15,
    mask_value: float = -1.0,
    pad_value: float = -2.0,
    keep_first: int = 1,
    generator: torch.Generator | None = None,
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask ``int(n * mask_ratio)`` non-padding positions of every row, chosen without replacement.

    Returns ``(masked_values, mask)`` as new tensors (the input is never changed); ``mask`` is True
    where a value was replaced by ``mask_value``. Positions equal to ``pad_value`` are never masked
    and do not count in ``n``. ``keep_first`` leading positions (the ``<cls>`` token) are also
    exempt; scGPT's ``random_mask_value`` has no such exemption (``keep_first=0`` reproduces it,
    which can mask ``<cls>``).
    """
    if not 0.0 <= mask_ratio <= 1.0:
        raise ConfigError(f"mask_ratio must be in [0, 1], got {mask_ratio}")
    if keep_first < 0:
        raise ConfigError(f"keep_first must be >= 0, got {keep_first}")
    x = torch.as_tensor(values).detach().clone().float()
    if x.ndim != 2:
        raise ConfigError(f"values must be a 2-d [cells, positions] batch, got shape {tuple(x.shape)}")
    if generator is None:
        generator = torch.Generator().manual_seed(0 if seed is None else int(seed))
    eligible = x != pad_value
    eligible[:, :keep_first] = False
    n_mask = torch.floor(eligible.sum(dim=1).double() * mask_ratio).long()
    scores = torch.rand(x.shape, generator=generator)
    scores[~eligible] = 2.0  # never picked before an eligible position
    ranks = scores.argsort(dim=1).argsort(dim=1)
    mask = (ranks < n_mask[:, None]) & eligible
    x[mask] = mask_value
    return x, mask
