"""The user-facing scCello model: create, save / load, tokenize and embed cells.

>>> model = ScCello.new(cell_types=["CL:0000236", "CL:0000623"], num_hidden_layers=2, hidden_size=64)
>>> emb = model.embed(adata)              # raw counts; also sets adata.obsm["X_scCello"]

Tokens: Geneformer V1 rank value encoding (25,426 tokens, no ``<cls>``); scCello appends ``<cls>``
as token 25,426 and puts it at position 0 of every cell, followed by the top ``max_length - 1``
ranked genes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scforge.errors import CheckpointError, ConfigError, InputDataError, VocabularyError
from scforge.genes import GeneformerDictionaries, GeneVocab
from scforge.models.sccello.config import ScCelloConfig
from scforge.models.sccello.model import ScCelloModel
from scforge.nn import autocast, resolve_device, resolve_precision
from scforge.tokenize import RankValueTokenizer
from scforge.tokenize.ragged import TokenizedCells

logger = logging.getLogger("scforge")
FAMILY = "sccello"
CLS_TOKEN = "<cls>"


def with_cls(cells: TokenizedCells, cls_id: int) -> TokenizedCells:
    """A copy of ``cells`` with ``cls_id`` inserted before every cell's tokens (vectorised)."""
    n = cells.n_cells
    offsets = cells.offsets + np.arange(n + 1, dtype=np.int64)
    ids = np.empty(int(offsets[-1]), dtype=cells.gene_ids.dtype)
    is_cls = np.zeros(ids.size, dtype=bool)
    is_cls[offsets[:-1]] = True
    ids[is_cls] = cls_id
    ids[~is_cls] = cells.gene_ids
    meta = dict(cells.meta, cls_id=int(cls_id), cls_position=0)
    return TokenizedCells(offsets=offsets, gene_ids=ids, values=None, obs_names=cells.obs_names, meta=meta)


def sccello_vocab(dictionaries: GeneformerDictionaries) -> GeneVocab:
    """Geneformer V1's vocabulary with ``<cls>`` appended (scCello's 25,427 tokens)."""
    base = dictionaries.vocab
    if base.cls_id is not None:
        raise VocabularyError("scCello builds on Geneformer V1 dictionaries (no <cls>); these already have <cls> "
                              "(V2?). Use dictionaries='geneformer-v1' or the V1 pickle folder.")
    specials = dict(base.specials, cls=CLS_TOKEN)
    return GeneVocab(tokens=list(base.tokens) + [CLS_TOKEN], specials=specials, name="sccello")


class ScCello:
    """An scCello model with its tokenizer dictionaries; ``module`` is the pure torch :class:`ScCelloModel`."""

    family = FAMILY

    def __init__(self, module: ScCelloModel, dictionaries: GeneformerDictionaries, *, source: str | None = None):
        vocab = sccello_vocab(dictionaries)
        c = module.config
        if len(vocab) != c.vocab_size:
            raise ConfigError(f"the dictionaries give {len(vocab)} tokens (with <cls>) but the model has {c.vocab_size}.")
        if (vocab.special_id("cls"), vocab.special_id("pad"), vocab.special_id("mask")) != (
                c.cls_token_id, c.pad_token_id, c.mask_token_id):
            raise ConfigError("the model's <cls>/<pad>/<mask> ids differ from the dictionaries'.")
        self.module = module
        self.dictionaries = dictionaries
        self.vocab = vocab
        self.source = source

    @property
    def config(self) -> ScCelloConfig:
        return self.module.config

    @property
    def embedding_dim(self) -> int:
        return self.config.hidden_size

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return (f"ScCello({c.num_hidden_layers} layers x {c.hidden_size}, {c.n_cell_types} cell types, "
                f"{n / 1e6:.2f}M parameters, from {self.source or 'new'})")

    # ---- construction and saving -------------------------------------------------------------
    @classmethod
    def new(cls, cell_types: list[str] | tuple[str, ...] = (), *, dictionaries: str | os.PathLike = "geneformer-v1",
            seed: int | None = None, **config: Any) -> ScCello:
        """A randomly initialised model; ``cell_types``: CL ids of the prototypes; ``config``:
        :class:`ScCelloConfig` fields (e.g. ``num_hidden_layers=2, hidden_size=64``)."""
        from scforge.genes.builtin import resolve_geneformer

        dicts = resolve_geneformer(dictionaries)
        n_tokens = len(dicts.vocab)
        cfg = ScCelloConfig(vocab_size=n_tokens + 1, cls_token_id=n_tokens, pad_token_id=dicts.vocab.special_id("pad"),
                            mask_token_id=dicts.vocab.special_id("mask"), cell_types=list(cell_types),
                            dictionaries=str(dictionaries), **config)
        if seed is not None:
            torch.manual_seed(seed)
        return cls(ScCelloModel(cfg), dicts)

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ScCello:
        """Load scforge's folder format written by :meth:`save`."""
        from scforge.genes.builtin import resolve_geneformer
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not scCello; load it with scforge.load().")
        config = ScCelloConfig.from_dict(folder.config)
        module = ScCelloModel(config)
        expected = module.state_dict()
        missing = sorted(set(expected) - set(folder.state_dict))
        unexpected = sorted(set(folder.state_dict) - set(expected))
        shapes = [k for k in expected if k in folder.state_dict and folder.state_dict[k].shape != expected[k].shape]
        if missing or unexpected or shapes:
            raise CheckpointError(f"{path} does not fit an scCello model of its config: missing {missing[:5]}, "
                                  f"unexpected {unexpected[:5]}, mis-shaped {shapes[:5]}.")
        module.load_state_dict(folder.state_dict)
        model = cls(module.eval(), resolve_geneformer(config.dictionaries), source=str(path))
        if model.vocab.tokens != folder.vocab.tokens:
            raise CheckpointError(f"the vocabulary of {path} differs from the dictionaries {config.dictionaries!r} "
                                  "named in its config.")
        return model

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write scforge's folder (``config.json``, ``model.safetensors``, ``vocab.json``, ``card.md``)."""
        from scforge.hub import save_model_folder

        return save_model_folder(path, family=FAMILY, config=self.config.to_dict(), state_dict=self.module.state_dict(),
                                 vocab=self.vocab, card=self.card(), overwrite=overwrite)

    def card(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return "\n".join([
            "# scCello model (scforge)", "",
            f"- backbone: Geneformer BERT, {c.num_hidden_layers} post-norm layers x {c.hidden_size}, "
            f"{c.num_attention_heads} heads, FFN {c.intermediate_size}, {c.max_position_embeddings} positions",
            f"- parameters: {n:,}", f"- vocabulary: {c.vocab_size} tokens (Geneformer V1 + <cls>={c.cls_token_id})",
            f"- cell-type prototypes: {c.n_cell_types} (CL ids in config.json), tau {c.tau}",
            "- expected input for embed(): raw counts", f"- source: {self.source or 'trained with scforge'}", "",
        ])

    # ---- tokens ------------------------------------------------------------------------------
    def tokenize(self, adata: Any, layer: str | None = None, *, max_length: int | None = None,
                 gene_col: str | None = None, use_raw: bool = False, n_counts_key: str | None = "n_counts",
                 progress: bool = False) -> TokenizedCells:
        """``<cls>`` + the top ``max_length - 1`` genes by Geneformer rank value (raw counts required;
        non-integer values raise :class:`InputDataError`). Cells in input order."""
        limit = self.config.max_position_embeddings
        max_length = max_length or limit
        if not 2 <= max_length <= limit:
            raise ConfigError(f"max_length must be in 2..{limit} (the model's positions), got {max_length}.")
        tok = RankValueTokenizer(self.dictionaries, model_input_size=max_length - 1, special_tokens=False,
                                 n_counts_key=n_counts_key)
        cells = tok.tokenize(adata, layer=layer, gene_col=gene_col, use_raw=use_raw, progress=progress)
        empty = np.flatnonzero(cells.lengths == 0)
        if empty.size:
            names = [str(cells.obs_names[i]) for i in empty[:5]]
            raise InputDataError(f"{empty.size} of {cells.n_cells} cells express no gene of the Geneformer V1 "
                                 f"dictionary (e.g. {names}). Remove them, e.g. sc.pp.filter_cells(adata, min_genes=1).")
        return with_cls(cells, self.config.cls_token_id)

    # ---- tasks -------------------------------------------------------------------------------
    def annotation_backend(self):
        """Backend for :func:`scforge.tasks.annotate.fine_tune` / ``linear_probe``."""
        from scforge.models.sccello.annotation import ScCelloAnnotationBackend

        return ScCelloAnnotationBackend(self)

    # ---- embeddings --------------------------------------------------------------------------
    def embed_cells(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto",
                    precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Cell embeddings ``cell_cls(h[<cls>])`` ``[n_cells, hidden]`` of tokenized cells, in their order."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if cells.meta.get("cls_id") != self.config.cls_token_id:
            raise InputDataError("these tokenized cells have no scCello <cls> token first; make them with "
                                 "ScCello.tokenize().")
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        emb = np.zeros((cells.n_cells, self.config.hidden_size), dtype=np.float32)
        order = np.argsort(-cells.lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
        with torch.inference_mode(), autocast(dev, dtype):
            for idx in tqdm(batches, desc="scCello embed", unit="batch", disable=not progress, leave=False):
                b = cells.pack(idx)
                cu = b["cu_seqlens"].to(dev, torch.int64)
                hidden = module.encode(b["genes"].to(dev), cu_seqlens=cu, max_seqlen=b["max_seqlen"])
                emb[idx] = module.cell_outputs(hidden, cu).float().cpu().numpy()
        return emb

    def embed(self, adata: Any, layer: str | None = None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, key_added: str | None = "X_scCello",
              n_counts_key: str | None = "n_counts", gene_col: str | None = None, use_raw: bool = False,
              progress: bool = False) -> np.ndarray:
        """Cell embeddings ``[n_cells, hidden]`` (the ``cell_cls`` head on the last layer's ``<cls>``), rows in
        input order. ``adata`` holds raw counts; only ``obsm[key_added]`` and ``uns["scforge"]`` change."""
        cells = self.tokenize(adata, layer, max_length=max_length, gene_col=gene_col, use_raw=use_raw,
                              n_counts_key=n_counts_key, progress=progress)
        emb = self.embed_cells(cells, batch_size=batch_size, device=device, precision=precision, progress=progress)
        if hasattr(adata, "obsm") and key_added:
            adata.obsm[key_added] = emb
            adata.uns.setdefault("scforge", {})[key_added] = {
                "model": self.source or "scforge", "family": FAMILY, "layer": layer,
                "max_length": max_length or self.config.max_position_embeddings,
            }
        return emb
