"""Frozen cell embeddings of any scforge model family, through one function."""

from __future__ import annotations

from typing import Any

import numpy as np

from scforge.errors import ConfigError


def supports_training(model: Any) -> bool:
    """Whether ``model``'s family can be fine-tuned for classification in scforge."""
    return callable(getattr(model, "annotation_backend", None))


def embed_cells(model: Any, adata: Any, *, layer: str | None = None, batch_size: int = 64,
                max_length: int | None = None, progress: bool = False) -> np.ndarray:
    """Frozen cell embeddings ``[cells, dims]`` of any scforge model (scGPT, Geneformer, scBERT, scCello),
    in input order, each family with its own published embedding recipe; ``adata`` is unchanged."""
    if supports_training(model):
        backend = model.annotation_backend()
        return backend.embed(adata, layer, batch_size=batch_size, max_length=max_length, seed=0, progress=progress)
    embed = getattr(model, "embed", None)
    if embed is None:
        raise ConfigError(f"{type(model).__name__} cannot embed cells; pass a model loaded with scforge.load().")
    return np.asarray(embed(adata, layer, batch_size=batch_size, max_length=max_length, key_added=None,
                            progress=progress))
