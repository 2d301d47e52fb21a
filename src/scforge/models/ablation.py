"""The no-pretraining ablation of sc-foundation-eval: the same architecture, randomly initialised."""

from __future__ import annotations

import copy
from typing import Any

import torch

from scforge.errors import ConfigError


def untrained_copy(model: Any, seed: int = 0) -> Any:
    """A copy of ``model`` (any scforge family) with the same architecture and configuration but freshly
    initialised weights (seeded; the family's own initialisation).

    Parameters the family never trains (``requires_grad=False``, e.g. scBERT's gene2vec positions)
    keep their values, as sc-foundation-eval's scBERT ablation keeps gene2vec; buffers (e.g. scBERT's
    random-feature projections) are redrawn. ``model`` is not modified."""
    module = getattr(model, "module", None)
    config = getattr(module, "config", None)
    if module is None or config is None:
        raise ConfigError(f"untrained_copy needs an scforge model (scforge.load(...)), got {type(model).__name__}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = type(module)(config)
    state = fresh.state_dict()
    for name, p in module.named_parameters():
        if not p.requires_grad:
            state[name] = p.detach().clone()
    twin = copy.deepcopy(model)
    twin.module.load_state_dict(state)
    twin.module.train(module.training)
    if hasattr(twin, "source"):
        twin.source = f"untrained copy (seed {seed}) of {model.source or 'a new model'}"
    return twin


def embedding_prefixes(model: Any) -> tuple[str, ...]:
    """Parameter-name prefixes of ``model``'s input embedding tables (gene and value encoders)."""
    from scforge.tasks.annotate import backend_of

    declared = backend_of(model).embedding_prefixes
    names = [n for n, _ in model.module.named_parameters()]
    prefixes = tuple(p for p in declared if any(n.startswith(p) for n in names))  # e.g. no flag_encoder
    if not prefixes:
        raise ConfigError(f"{type(model).__name__} does not declare its embedding parameters.")
    return prefixes
