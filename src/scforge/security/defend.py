"""Fine-pruning (Liu, Dolan-Gavitt and Garg, 2018) for fine-tuned scforge classifiers.

A backdoor often lives in units of the classifier that clean cells leave dormant. Fine-pruning runs
trusted clean cells through the model, removes the ``fraction`` of the classification layer's input
units with the smallest mean activation (their weights are set to zero and kept there), and then
fine-tunes the pruned model on the trusted cells for a few steps to recover clean accuracy.

>>> pruned = fine_prune(annotator, trusted_cells, "cell_type", fraction=0.3, epochs=1)
>>> pruned.predict(query)

Works for every family whose classifier ends in a ``Linear`` layer with one output per class (scGPT's
``cls_decoder``, Geneformer's ``classifier``, scBERT's head).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from scforge.errors import ConfigError, InputDataError

__all__ = ["fine_prune", "classifier_layer"]

logger = logging.getLogger("scforge")


def classifier_layer(module: nn.Module, n_classes: int) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` of ``module`` with ``n_classes`` outputs (the classification layer)."""
    found = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.out_features == n_classes]
    if not found:
        raise ConfigError(f"the model has no Linear layer with {n_classes} outputs; fine-pruning needs a fine-tuned "
                          "classifier (an Annotator from fine_tune).")
    return found[-1]


def _unit_activity(annotator: Any, cells: Any, layer: nn.Linear, batch_size: int) -> np.ndarray:
    """Mean absolute input activation of each unit of ``layer`` over ``cells``."""
    total = torch.zeros(layer.in_features, dtype=torch.float64)
    count = [0]

    def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().float().reshape(-1, layer.in_features)
        total.add_(x.abs().sum(0).double().cpu())
        count[0] += x.shape[0]

    handle = layer.register_forward_pre_hook(hook)
    try:
        annotator.backend.proba(cells, batch_size=batch_size, precision="fp32")
    finally:
        handle.remove()
    return (total / max(count[0], 1)).numpy()


def fine_prune(
    annotator: Any,
    trusted: Any,
    label_key: str | None = None,
    *,
    layer: str | None = None,
    fraction: float = 0.2,
    epochs: int = 1,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    precision: str = "auto",
) -> Any:
    """A pruned and re-tuned copy of a fine-tuned :class:`~scforge.tasks.Annotator` (it is not changed).

    ``trusted``: clean, labelled cells (AnnData, raw counts in ``layer``) the user vouches for;
    ``fraction``: share of the classification layer's input units to prune (least active first);
    ``epochs``: fine-tuning epochs on the trusted cells afterwards (0: prune only). The returned
    annotator's ``info["fine_pruning"]`` records the pruned units and settings."""
    from scforge.tasks.annotate import Annotator, _label_column, backend_of
    from scforge.train import OptimConfig, TrainConfig, fit_module

    if getattr(annotator, "mode", None) != "fine_tune":
        raise ConfigError("fine-pruning needs a fine-tuned Annotator (scforge.tasks.annotate.fine_tune).")
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"fraction must lie in (0, 1), got {fraction}.")
    if epochs < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}.")
    key = label_key or annotator.label_key
    text = _label_column(trusted.obs, key).astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(annotator.classes)}
    keep = np.flatnonzero([t in lookup for t in text])
    if keep.size == 0:
        raise InputDataError(f"none of the trusted cells has a label among the annotator's classes "
                             f"{annotator.classes[:10]}; fine-pruning needs labelled clean cells.")
    model = copy.deepcopy(annotator.model)
    pruned_ann = Annotator(model, annotator.classes, annotator.label_key, "fine_tune", settings=annotator.settings,
                           info=dict(annotator.info))
    backend = backend_of(model)
    cells = backend.tokenize(trusted, layer, annotator.settings, False).select(keep)
    y = np.array([lookup[t] for t in text[keep]], dtype=np.int64)
    name, lin = classifier_layer(model.module, len(annotator.classes))
    activity = _unit_activity(pruned_ann, cells, lin, batch_size)
    n_prune = int(round(fraction * lin.in_features))
    units = np.sort(np.argsort(activity, kind="stable")[:n_prune])
    mask = torch.ones(lin.in_features)
    mask[torch.as_tensor(units, dtype=torch.long)] = 0.0
    with torch.no_grad():
        lin.weight.mul_(mask.to(lin.weight.device, lin.weight.dtype))
    if epochs > 0:
        handle = lin.weight.register_hook(lambda g: g * mask.to(g.device, g.dtype))
        try:
            model.module.train()
            module = backend.training_module(OptimConfig(lr=lr, warmup_steps=1, schedule="cosine"), None)
            fit_module(module, backend.collate(cells, y, seed), cells.n_cells,
                       config=TrainConfig(max_epochs=epochs, batch_size=batch_size, val_fraction=0.0, seed=seed,
                                          precision=precision, progress=False),
                       labels=y, val_idx=np.zeros(0, dtype=np.int64))
        finally:
            handle.remove()
        with torch.no_grad():  # weight decay may nudge pruned weights off zero
            lin.weight.mul_(mask.to(lin.weight.device, lin.weight.dtype))
    model.module.eval()
    pruned_ann.info["fine_pruning"] = {"layer": name, "fraction": float(fraction), "n_pruned": int(n_prune),
                                       "units": units.tolist(), "epochs": int(epochs), "lr": float(lr),
                                       "n_trusted_cells": int(keep.size)}
    logger.info("fine-pruning: %d of %d input units of %s pruned, %d epoch(s) on %d trusted cells", n_prune,
                lin.in_features, name, epochs, keep.size)
    return pruned_ann
