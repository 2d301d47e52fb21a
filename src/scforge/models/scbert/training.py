"""scBERT training: masked token prediction (``pretrain.py``) and the published fine-tuning recipe.

Both run through :func:`scforge.train.fit_module`: a collator turns ``(epoch, cell)`` pairs into
``[B, max_seq_len]`` token batches, drawing its randomness from a generator seeded with
:func:`scforge.train.batch_seed`, and a :class:`~scforge.train.TrainingModule` subclass computes
the loss.

Masking as scBERT's ``data_mask``: positions whose token is 0 (not expressed) or ``<mask>`` are
never masked; of the others, ``ceil(0.15 x eligible)`` per cell are chosen (top-k of uniform
random scores; the product is taken in float32 as torch does, so e.g. 100 eligible -> 16);
each chosen position becomes ``<mask>`` with probability 0.9 and keeps its token otherwise
(no random-token replacement). Targets are the original tokens at chosen positions and
``<mask>`` (6, the ignore index) elsewhere; the loss is cross-entropy over the ``num_tokens``
classes at the chosen positions (only those are decoded, which gives the same mean as the
reference's ``CrossEntropyLoss(ignore_index=6)`` over all positions).

Random features: ``ScBERTPretrainingModule`` redraws every layer's FAVOR+ projection each
``feature_redraw_interval`` optimizer steps from a generator seeded by (seed, step), so runs repeat
and resume exactly; the reference redraws every 1000 forward calls in training mode from the
global RNG. Fine-tuning keeps the features fixed (the reference also redraws the frozen layers'
features while fine-tuning, which changes what the frozen layers compute).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from scforge.errors import ConfigError
from scforge.models.scbert.model import ScBERTModel
from scforge.train import OptimConfig, TrainingModule, batch_seed


def mask_counts(n_eligible: np.ndarray, mask_prob: float) -> np.ndarray:
    """Positions to mask per cell: ``ceil(n_eligible * mask_prob)`` computed in float32 (as torch
    multiplies an integer tensor by a Python float)."""
    product = np.asarray(n_eligible, dtype=np.float32) * np.float32(mask_prob)
    return np.ceil(product).astype(np.int64)


def mask_tokens(tokens: np.ndarray, rng: np.random.Generator, *, mask_prob: float = 0.15, replace_prob: float = 0.9,
                mask_id: int = 6, ignore_ids: Sequence[int] = (0,)) -> tuple[np.ndarray, np.ndarray]:
    """scBERT's masking of a ``[B, N]`` token matrix; returns ``(inputs, targets)`` int64 (targets:
    the original token where chosen, ``mask_id`` elsewhere)."""
    if not 0.0 <= mask_prob <= 1.0 or not 0.0 <= replace_prob <= 1.0:
        raise ConfigError(f"mask_prob and replace_prob must be in [0, 1], got {mask_prob}, {replace_prob}")
    tokens = np.asarray(tokens, dtype=np.int64)
    eligible = ~np.isin(tokens, [*ignore_ids, mask_id])
    k = mask_counts(eligible.sum(1), mask_prob)
    scores = rng.random(tokens.shape)
    scores[~eligible] = -1.0
    order = np.argsort(-scores, axis=1, kind="stable")
    chosen = np.zeros(tokens.shape, dtype=bool)
    np.put_along_axis(chosen, order, np.arange(tokens.shape[1])[None, :] < k[:, None], axis=1)
    replace = chosen & (rng.random(tokens.shape) < replace_prob)
    inputs = np.where(replace, mask_id, tokens)
    targets = np.where(chosen, tokens, mask_id)
    return inputs, targets


class MaskedTokenCollator:
    """``(epoch, cell)`` pairs -> ``{"tokens", "targets", "cells"}`` with scBERT's masking.

    ``tokens``: the ``[cells, max_seq_len]`` token matrix (see :meth:`ScBERT.token_matrix`)."""

    def __init__(self, tokens: np.ndarray, *, seed: int = 0, mask_prob: float = 0.15, replace_prob: float = 0.9,
                 mask_id: int = 6) -> None:
        self.tokens, self.seed = tokens, int(seed)
        self.mask_prob, self.replace_prob, self.mask_id = mask_prob, replace_prob, mask_id

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        epoch = items[0][0]
        idx = np.asarray([i for _, i in items], dtype=np.int64)
        rng = np.random.default_rng(batch_seed(self.seed, epoch, int(idx[0]), idx.size))
        inputs, targets = mask_tokens(self.tokens[idx], rng, mask_prob=self.mask_prob,
                                      replace_prob=self.replace_prob, mask_id=self.mask_id)
        return {"tokens": torch.from_numpy(inputs), "targets": torch.from_numpy(targets),
                "cells": torch.from_numpy(idx)}


class LabelledTokenCollator:
    """``(epoch, cell)`` pairs -> ``{"tokens", "labels", "cells"}`` (no corruption; classification)."""

    def __init__(self, tokens: np.ndarray, labels: np.ndarray) -> None:
        if len(labels) != tokens.shape[0]:
            raise ConfigError(f"{len(labels)} labels for {tokens.shape[0]} cells")
        self.tokens, self.labels = tokens, np.asarray(labels, dtype=np.int64)

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        idx = np.asarray([i for _, i in items], dtype=np.int64)
        return {"tokens": torch.from_numpy(self.tokens[idx].astype(np.int64)),
                "labels": torch.from_numpy(self.labels[idx]), "cells": torch.from_numpy(idx)}


def _keep_positions_frozen(model: ScBERTModel, optim: OptimConfig | None) -> OptimConfig:
    """``optim`` with the gene2vec positions (``pos_emb.``) among the frozen prefixes."""
    optim = optim or OptimConfig()
    if model.pos_emb is None or "pos_emb." in optim.freeze:
        return optim
    return dataclasses.replace(optim, freeze=(*optim.freeze, "pos_emb."))


class ScBERTPretrainingModule(TrainingModule):
    """Masked token prediction for an :class:`ScBERTModel` with the pretraining head. Logs
    ``train/mlm`` and ``val/mlm``, ``val/accuracy`` (masked tokens predicted right). ``seed`` seeds
    the random-feature redraws (every ``model.config.feature_redraw_interval`` steps; None: never)."""

    def __init__(self, model: ScBERTModel, optim: OptimConfig | None = None, *, seed: int = 0,
                 total_steps: int | None = None) -> None:
        if model.has_classifier:
            raise ConfigError("pretraining needs the masked-token head (to_out: Linear(dim, num_tokens)); this model "
                              "has a classification head.")
        super().__init__(model, _keep_positions_frozen(model, optim), total_steps)
        self.seed = int(seed)
        self._redrawn_at: int | None = None

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model.encode(batch["tokens"])
        chosen = batch["targets"] != self.model.config.mask_token_id
        if not bool(chosen.any()):  # no expressed gene in the batch: nothing to predict
            loss = hidden.sum() * 0.0
            self._last = None
            return loss, {"mlm": loss.detach()}
        logits = self.model.to_out(hidden[chosen]).float()
        targets = batch["targets"][chosen]
        loss = F.cross_entropy(logits, targets)
        self._last = (logits.detach(), targets)
        return loss, {"mlm": loss.detach()}

    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        last = getattr(self, "_last", None)
        if last is None:
            return {}
        logits, targets = last
        return {"accuracy": (logits.argmax(-1) == targets).float().mean()}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        interval = self.model.config.feature_redraw_interval
        step = int(self.global_step)
        if not interval or step == 0 or self._redrawn_at == step:
            return
        if step % interval == 0:
            generator = torch.Generator().manual_seed(batch_seed(self.seed, step))
            self.model.redraw_projections(generator)
            self._redrawn_at = step
        self.model.calls_since_last_redraw.fill_(step % interval)


class ScBERTClassifierModule(TrainingModule):
    """Cross-entropy on ``batch["labels"]`` for an :class:`ScBERTModel` with the classification head
    (``class_weights``: optional per-class loss weights). Logs ``val/accuracy``."""

    def __init__(self, model: ScBERTModel, optim: OptimConfig | None = None, *,
                 class_weights: Sequence[float] | None = None, total_steps: int | None = None) -> None:
        if not model.has_classifier:
            raise ConfigError("classification needs a model with the classification head (n_classes set).")
        super().__init__(model, _keep_positions_frozen(model, optim), total_steps)
        weights = None if class_weights is None else torch.tensor(list(class_weights), dtype=torch.float32)
        self.register_buffer("class_weights", weights, persistent=False)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(batch["tokens"]).float()
        loss = F.cross_entropy(logits, batch["labels"], weight=self.class_weights)
        self._last = (logits.detach(), batch["labels"])
        return loss, {"cls": loss.detach()}

    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, labels = self._last
        return {"accuracy": (logits.argmax(-1) == labels).float().mean()}


def finetune_frozen_prefixes(model: ScBERTModel) -> tuple[str, ...]:
    """Parameter prefixes the published recipe freezes: everything except the final ``norm``, the
    second-to-last Performer layer (the only layer of a one-layer model) and the head ``to_out``."""
    trainable_layer = max(model.config.depth - 2, 0)
    frozen = ["token_emb."] + (["pos_emb."] if model.pos_emb is not None else [])
    frozen += [f"performer.layers.{i}." for i in range(model.config.depth) if i != trainable_layer]
    return tuple(frozen)


def pretrain(model, cells, *, optim: OptimConfig | None = None, config=None, mask_prob: float = 0.15,
             replace_prob: float = 0.9, val_idx: np.ndarray | None = None, resume_from=None):
    """Masked-token pretraining of ``model`` (an :class:`~scforge.models.scbert.ScBERT` with the
    pretraining head, trained in place) on tokenized ``cells`` through
    :func:`scforge.train.fit_module`. ``config``: :class:`scforge.train.TrainConfig` (its ``seed``
    seeds the split, the masking and the feature redraws). Returns the :class:`~scforge.train.FitResult`."""
    from scforge.train import TrainConfig, fit_module

    cfg = config or TrainConfig()
    tokens = model.token_matrix(cells)
    module = ScBERTPretrainingModule(model.module, optim, seed=cfg.seed)
    collate = MaskedTokenCollator(tokens, seed=cfg.seed, mask_prob=mask_prob, replace_prob=replace_prob,
                                  mask_id=model.config.mask_token_id)
    result = fit_module(module, collate, tokens.shape[0], config=cfg, val_idx=val_idx, resume_from=resume_from)
    model.module.eval()
    return result

