"""scCello pre-training: the masking collator, the Lightning module computing
``L = L_MGP + L_Inter + L_Intra + L_Reg`` (or L_MGP alone, the ablation), and :func:`pretrain`.

Masking follows Geneformer's HF collator: each gene token is chosen with probability 0.15 (never
``<cls>`` or padding); chosen tokens become ``<mask>`` (80%), a random gene token (10%) or stay
(10%), and only chosen positions have labels (-100 elsewhere). Cells without a cell type label
(-100) contribute only to L_MGP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from scforge.errors import ConfigError, InputDataError
from scforge.models.geneformer.training import mlm_corrupt
from scforge.models.sccello.losses import (
    cell_type_coherence_loss,
    masked_gene_prediction_loss,
    ontology_alignment_loss,
    prototype_regulariser,
)
from scforge.models.sccello.model import ScCelloModel
from scforge.ontology import CellTypeRelations
from scforge.tokenize.ragged import TokenizedCells
from scforge.train import OptimConfig, TrainConfig, TrainingModule, batch_seed, fit_module

UNLABELLED = -100


@dataclass
class ScCelloCollator:
    """Packed, masked minibatches: ``input_ids`` [T], ``labels`` [T], ``cu_seqlens``, ``max_seqlen``,
    ``cell_types`` [B] (prototype index or -100) and ``cells`` [B]. Deterministic given ``seed`` and the
    ``(epoch, cell_index)`` pairs."""

    cells: TokenizedCells
    cell_types: np.ndarray
    mask_id: int
    cls_id: int
    gene_id_range: tuple[int, int]
    seed: int = 0
    mlm_probability: float = 0.15

    def __post_init__(self) -> None:
        self.cell_types = np.asarray(self.cell_types, dtype=np.int64)
        if self.cell_types.shape != (self.cells.n_cells,):
            raise ConfigError(f"{self.cell_types.size} cell type entries for {self.cells.n_cells} cells.")
        if not 0 <= self.mlm_probability <= 1:
            raise ConfigError(f"mlm_probability must be in [0, 1], got {self.mlm_probability}")

    def __call__(self, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        epoch = int(pairs[0][0])
        idx = np.array([cell for _, cell in pairs], dtype=np.int64)
        rng = np.random.default_rng(batch_seed(self.seed, epoch, int(idx[0]), idx.size))
        batch = self.cells.pack(idx, as_torch=False)
        ids = batch["genes"]
        masked, labels = mlm_corrupt(ids, ids != self.cls_id, rng, self.mlm_probability, self.mask_id,
                                     np.arange(*self.gene_id_range))
        return {
            "input_ids": torch.from_numpy(masked), "labels": torch.from_numpy(labels),
            "cu_seqlens": torch.from_numpy(batch["cu_seqlens"].astype(np.int64)), "max_seqlen": batch["max_seqlen"],
            "cell_types": torch.from_numpy(self.cell_types[idx]), "cells": torch.from_numpy(idx),
        }


class ScCelloTrainingModule(TrainingModule):
    """Trains an :class:`ScCelloModel`. ``relations`` (levels and ancestor mask over the model's
    ``cell_types``, same order) are needed when ``ontology_losses`` is on.

    ``mgp_candidates``: token ids L_MGP contrasts against (default: the whole vocabulary, as scCello);
    a smaller set (e.g. the genes present in the corpus) saves compute and must hold every label."""

    def __init__(self, model: ScCelloModel, relations: CellTypeRelations | None = None, optim: OptimConfig | None = None,
                 *, ontology_losses: bool = True, total_steps: int | None = None,
                 mgp_candidates: np.ndarray | None = None) -> None:
        super().__init__(model, optim, total_steps)
        self.ontology_losses = ontology_losses
        self.tau = model.config.tau
        self.register_buffer("candidates", None, persistent=False)
        if mgp_candidates is not None:
            ids = np.unique(np.asarray(mgp_candidates, dtype=np.int64))
            if ids.size == 0 or ids[0] < 0 or ids[-1] >= model.config.vocab_size:
                raise ConfigError("mgp_candidates must be non-empty token ids inside the vocabulary.")
            lookup = np.full(model.config.vocab_size, -1, dtype=np.int64)
            lookup[ids] = np.arange(ids.size)
            self.candidates = torch.from_numpy(ids)
            self.register_buffer("candidate_index", torch.from_numpy(lookup), persistent=False)
        if ontology_losses:
            if relations is None:
                raise ConfigError("the ontology losses need relations (scforge.ontology.cell_type_relations over "
                                  "the model's cell_types); pass them or ontology_losses=False.")
            if list(relations.ids) != list(model.config.cell_types):
                raise ConfigError("relations.ids must be the model's cell_types in the same order "
                                  f"({len(relations.ids)} vs {model.config.n_cell_types} types).")
            self.register_buffer("levels", torch.as_tensor(relations.levels, dtype=torch.int64), persistent=False)
            self.register_buffer("ancestor", torch.as_tensor(relations.ancestor, dtype=torch.bool), persistent=False)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model: ScCelloModel = self.model
        cu, max_len = batch["cu_seqlens"], int(batch["max_seqlen"])
        hidden = model.encode(batch["input_ids"], cu_seqlens=cu, max_seqlen=max_len)
        chosen = batch["labels"] != UNLABELLED
        targets = batch["labels"][chosen]
        if self.candidates is None:
            vocab = model.vocab_outputs()
        else:
            vocab = model.cls(model.bert.embeddings.word_embeddings.weight[self.candidates])
            targets = self.candidate_index[targets]
            if bool((targets < 0).any()):
                raise ConfigError("a masked token is not among mgp_candidates; include every gene of the corpus.")
        losses = {"mgp": masked_gene_prediction_loss(model.cls(hidden[chosen]), vocab, targets, self.tau)}
        if self.ontology_losses:
            types = batch["cell_types"]
            z = model.cell_outputs(hidden, cu)
            if bool((types != UNLABELLED).any()):
                second = model.cell_outputs(model.encode(batch["input_ids"], cu_seqlens=cu, max_seqlen=max_len), cu)
            else:
                second = z
            prototypes = model.learned_centroid
            losses["inter"] = ontology_alignment_loss(z, second, types, self.levels, self.ancestor, self.tau)
            losses["intra"] = cell_type_coherence_loss(z, prototypes, types, self.tau)
            losses["reg"] = prototype_regulariser(z, prototypes, types, model.affine_projection, self.tau)
        return sum(losses.values()), losses


def cell_type_indices(cell_type_ids: Sequence[str | None], cell_types: Sequence[str]) -> np.ndarray:
    """Prototype index of each cell's CL id (-100 for ``None``); ids outside ``cell_types`` raise."""
    position = {t: i for i, t in enumerate(cell_types)}
    unknown = sorted({t for t in cell_type_ids if t is not None and t not in position})
    if unknown:
        raise InputDataError(f"cell type ids {unknown[:10]} are not among the model's {len(position)} prototypes; "
                             "create the model with every CL id you train on (ScCello.new(cell_types=...)).")
    return np.array([UNLABELLED if t is None else position[t] for t in cell_type_ids], dtype=np.int64)


def pretrain(model: Any, cells: TokenizedCells, cell_type_ids: Sequence[str | None], *,
             relations: CellTypeRelations | None = None, ontology_losses: bool = True,
             config: TrainConfig | None = None, optim: OptimConfig | None = None, mlm_probability: float = 0.15,
             mgp_vocabulary: str = "full", val_idx: np.ndarray | None = None):
    """Pre-train an :class:`~scforge.models.sccello.api.ScCello` in place on tokenized cells
    (``model.tokenize``); ``cell_type_ids``: one CL id per cell, ``None`` for unlabelled cells.
    ``ontology_losses=False`` trains L_MGP only (the ablation). ``mgp_vocabulary``: ``"full"`` (scCello:
    L_MGP contrasts against every token) or ``"corpus"`` (only the genes present in ``cells``: cheaper).
    Returns the :class:`~scforge.train.FitResult`; ``model.module`` holds the trained weights."""
    if mgp_vocabulary not in ("full", "corpus"):
        raise ConfigError(f"mgp_vocabulary={mgp_vocabulary!r}; use 'full' or 'corpus'.")
    c = model.config
    if cells.meta.get("cls_id") != c.cls_token_id:
        raise InputDataError("these tokenized cells have no scCello <cls> token first; make them with model.tokenize().")
    if len(cell_type_ids) != cells.n_cells:
        raise ConfigError(f"{len(cell_type_ids)} cell type ids for {cells.n_cells} cells.")
    types = cell_type_indices(cell_type_ids, c.cell_types)
    cfg = config or TrainConfig()
    collate = ScCelloCollator(cells, types, mask_id=c.mask_token_id, cls_id=c.cls_token_id,
                              gene_id_range=(2, c.cls_token_id), seed=cfg.seed, mlm_probability=mlm_probability)
    candidates = None
    if mgp_vocabulary == "corpus":
        candidates = np.unique(cells.gene_ids[cells.gene_ids != c.cls_token_id])
    module = ScCelloTrainingModule(model.module, relations, optim, ontology_losses=ontology_losses,
                                   mgp_candidates=candidates)
    model.module.train()
    result = fit_module(module, collate, cells.n_cells, config=cfg, labels=np.where(types < 0, -1, types),
                        val_idx=val_idx)
    model.module.eval()
    return result
