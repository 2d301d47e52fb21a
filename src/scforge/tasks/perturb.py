"""Perturbation response prediction with scGPT's perturbation model and scGenePT's language variants.

>>> data = read_gears("norman/perturb_processed.h5ad")
>>> split = simulation_split(data, seed=1)
>>> model = PerturbationModel.from_pretrained("scGPT_human/", genes=data.gene_names)
>>> model.fit(data, split, epochs=15)
>>> pred = model.predict(data, [(c, None) for c in split.test])   # mean over 300 controls each
>>> ranking = model.rank_perturbations(data, observed, candidates=split.test)   # reverse perturbation

Training follows scGPT's perturbation tutorial and scGenePT: each perturbed cell is paired with one
random control cell of its context (GEARS), the control's log-normalised expression of every gene
is the input, perturbation flags mark the perturbed genes, and the loss is the MSE over all input
genes against the perturbed cell (a random subset of ``max_seq_len`` genes per minibatch when there
are more). Adam (no weight decay), StepLR x ``gamma`` per epoch, gradient clipping at 1, early
stopping on the validation MSE with the best model kept.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.errors import CheckpointError, ConfigError, GeneIdentityError
from scforge.genes import GeneVocab, align_genes
from scforge.models.scgpt.perturbation import (
    MODEL_TYPES,
    PerturbConfig,
    ScGPTPerturbModel,
    config_from_state,
    published_to_scforge,
    text_module_name,
)
from scforge.nn import autocast, resolve_device, resolve_precision
from scforge.train.module import OptimConfig, TrainingModule
from scforge.train.objectives import masked_mse

logger = logging.getLogger("scforge")
FAMILY = "scgpt-perturb"
PRETRAINED_PREFIXES = ("encoder.", "value_encoder.", "transformer_encoder.")  # the tutorial's load_param_prefixs


@dataclass
class LoadSummary:
    """What :meth:`PerturbationModel.from_pretrained` copied from the pretrained model."""

    source: str
    loaded: list[str]
    skipped: list[str]
    genes_in_vocab: int
    genes_total: int

    def __str__(self) -> str:
        return (f"{self.source}: {len(self.loaded)} tensors loaded ({', '.join(sorted({k.split('.')[0] for k in self.loaded}))}); "
                f"not loaded: {', '.join(self.skipped) or 'none'}; {self.genes_in_vocab}/{self.genes_total} genes "
                "in the vocabulary (the others use the <pad> token, as scGPT's tutorial does)")


class PerturbationTraining(TrainingModule):
    """MSE over all input genes between the predicted and the observed perturbed expression."""

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.model(batch["genes"], batch["values"], batch["flags"])
        mse = masked_mse(out["pred"].float(), batch["target"], torch.ones_like(batch["target"], dtype=torch.bool))
        return mse, {"mse": mse}


class PerturbationModel:
    """A perturbation model over a fixed gene list (``genes``), with its vocabulary."""

    family = FAMILY

    def __init__(self, module: ScGPTPerturbModel, vocab: GeneVocab, genes: Sequence[str], *,
                 source: str | None = None, load_summary: LoadSummary | None = None) -> None:
        if len(vocab) != module.config.vocab_size:
            raise ConfigError(f"vocabulary has {len(vocab)} tokens but the model expects {module.config.vocab_size}")
        self.module, self.vocab, self.source, self.load_summary = module, vocab, source, load_summary
        self.genes = np.asarray(genes).astype(str)
        if self.genes.size == 0:
            raise ConfigError("the model needs a non-empty gene list")
        ids = np.asarray(align_genes(list(self.genes), vocab).token_ids, dtype=np.int64)
        self.in_vocab = ids >= 0
        self.gene_ids = np.where(self.in_vocab, ids, vocab.special_id("pad"))
        self.history: list[dict[str, float]] = []

    @property
    def config(self) -> PerturbConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return (f"PerturbationModel({c.model_type}: {c.n_layers} layers x {c.d_model}, {self.genes.size} genes, "
                f"{n / 1e6:.1f}M parameters, from {self.source or 'new'})")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def new(cls, vocab: GeneVocab | None, genes: Sequence[str], *, model_type: str = "scgpt",
            text_embeddings: Mapping[str, Any] | None = None, seed: int = 0, **config: Any) -> PerturbationModel:
        """A randomly initialised model (the no-pretraining ablation). ``vocab=None`` builds one from
        ``genes``. ``model_type``: a key of :data:`MODEL_TYPES` (scGPT or a scGenePT variant);
        ``text_embeddings`` maps each of its text sources (``genept``, ``go_c``, ...) to a
        :class:`~scforge.genes.text.GeneTextEmbeddings` (or any symbol -> vector mapping)."""
        if vocab is None:
            vocab = GeneVocab.from_gene_list(list(dict.fromkeys(map(str, genes))), {"pad": "<pad>", "cls": "<cls>"})
        fields = _model_type_fields(model_type)
        fields.update(config)
        sources = fields.get("text_sources", ())
        tables = _text_tables(vocab, sources, text_embeddings or {}, seed)
        fields["text_dims"] = tuple(t.shape[1] for t in tables.values())
        torch.manual_seed(seed)
        module = ScGPTPerturbModel(PerturbConfig(vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"),
                                                 model_type=model_type, **fields))
        for source, table in tables.items():
            module.set_text_embeddings(source, table)
        return cls(module, vocab, genes)

    @classmethod
    def from_pretrained(cls, pretrained: Any, genes: Sequence[str], *, model_type: str = "scgpt",
                        text_embeddings: Mapping[str, Any] | None = None, load_transformer: bool = True,
                        seed: int = 0, **config: Any) -> PerturbationModel:
        """Start from any scGPT model (an :class:`~scforge.models.scgpt.ScGPT`, a published or scforge
        folder, or ``"default"``): its gene encoder, value encoder and transformer are copied (the
        tutorial's ``load_param_prefixs``); the perturbation flags, text encoders and decoder are new.
        ``load_transformer=False`` is scGenePT's ``_no_attention`` variant (encoders only). A value
        encoder over value bins (``input_emb_style="category"``) is not loaded (listed as skipped)."""
        from scforge.models.scgpt import ScGPT

        if not isinstance(pretrained, ScGPT):
            from scforge.models import load

            pretrained = load(pretrained)
            if not isinstance(pretrained, ScGPT):
                raise CheckpointError(f"{pretrained!r} is not an scGPT model; the perturbation model starts from scGPT")
        pc = pretrained.config
        arch = {"d_model": pc.d_model, "n_heads": pc.n_heads, "d_hid": pc.d_hid, "n_layers": pc.n_layers}
        clash = {k: v for k, v in config.items() if k in arch and v != arch[k]}
        if clash:
            raise ConfigError(f"{clash} differ from the pretrained model's architecture {arch}")
        if pc.norm_scheme != "post":
            raise ConfigError("the perturbation model is post-norm, as scGPT's; this pretrained model is pre-norm")
        config = {**arch, **config}
        model = cls.new(pretrained.vocab, genes, model_type=model_type, text_embeddings=text_embeddings, seed=seed,
                        **config)
        prefixes = [p for p in PRETRAINED_PREFIXES if p != "transformer_encoder." or load_transformer]
        own = model.module.state_dict()
        src = pretrained.module.state_dict()
        take = {k: v for k, v in src.items() if k.startswith(tuple(prefixes)) and k in own and own[k].shape == v.shape}
        skipped = sorted({k.split(".")[0] for k in src if k.startswith(tuple(PRETRAINED_PREFIXES)) and k not in take})
        if pc.input_emb_style != "continuous":
            take = {k: v for k, v in take.items() if not k.startswith("value_encoder.")}
            skipped.append(f"value_encoder ({pc.input_emb_style} input)")
        missing_tf = [k for k in own if k.startswith("transformer_encoder.") and k not in take]
        if load_transformer and missing_tf:
            raise CheckpointError(f"the pretrained transformer does not fit: {missing_tf[:3]} ...")
        model.module.load_state_dict(take, strict=False)
        model.source = pretrained.source or "pretrained scGPT"
        model.load_summary = LoadSummary(model.source, sorted(take), skipped, int(model.in_vocab.sum()),
                                         model.genes.size)
        logger.info("%s", model.load_summary)
        return model

    @classmethod
    def from_published(cls, path: str | os.PathLike, genes: Sequence[str], *, n_heads: int | None = None,
                       model_type: str | None = None) -> PerturbationModel:
        """A fine-tuned scGPT ``TransformerGenerator`` or scGenePT folder (``best_model.pt`` +
        ``args.json`` + ``vocab.json``), read with the weights-only unpickler. The architecture comes
        from the tensors; ``n_heads`` from ``args.json`` (``nheads``) unless given."""
        import json

        from scforge.hub import safe_torch_load, scgpt_files, verify_listed_checksums

        weights, args_path, vocab_path = scgpt_files(path)
        verify_listed_checksums(weights.parent, [weights.name, args_path.name, vocab_path.name])
        vocab = GeneVocab.from_scgpt_json(vocab_path)
        args = json.loads(Path(args_path).read_text())
        heads = n_heads or args.get("nheads") or args.get("nhead")
        if not heads:
            raise CheckpointError(f"{args_path} has no 'nheads'; pass n_heads=")
        raw = safe_torch_load(weights, what="scGPT perturbation weights")
        # scGenePT's GO-all encoder is stored as gopt_encoder_f: from the file alone it reads as GO-F
        state = published_to_scforge(raw, PerturbConfig(len(vocab), vocab.special_id("pad")))
        config = config_from_state(state, vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"),
                                   n_heads=int(heads))
        config.model_type = model_type or ("scgpt" if not config.text_sources else "scgenept")
        module = ScGPTPerturbModel(config)
        result = module.load_state_dict({k: v for k, v in state.items() if k in module.state_dict()}, strict=False)
        if result.missing_keys:
            raise CheckpointError(f"{weights} lacks {len(result.missing_keys)} tensors of the model it describes: "
                                  f"{result.missing_keys[:5]}")
        ignored = sorted({k.split(".")[0] for k in state if k not in module.state_dict()})
        if ignored:
            logger.info("%s: unused parts of the file (not part of perturbation prediction): %s", weights, ignored)
        return cls(module.eval(), vocab, genes, source=str(path))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> PerturbationModel:
        """Load scforge's folder format written by :meth:`save`."""
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not a perturbation model")
        cfg = dict(folder.config)
        genes = cfg.pop("genes", None)
        if not genes:
            raise CheckpointError(f"{path}/config.json has no 'genes' list")
        module = ScGPTPerturbModel(PerturbConfig.from_dict(cfg))
        module.load_state_dict(folder.state_dict, strict=True)
        return cls(module.eval(), folder.vocab, genes, source=str(path))

    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write scforge's folder format (``config.json`` with the gene list, ``model.safetensors``, ``vocab.json``)."""
        from scforge.hub import save_model_folder

        config = {**self.config.to_dict(), "genes": self.genes.tolist()}
        card = (f"# scGPT perturbation model ({self.config.model_type})\n\n- genes: {self.genes.size}\n"
                f"- started from: {self.source or 'random initialisation'}\n")
        return save_model_folder(path, family=FAMILY, config=config, state_dict=self.module.state_dict(),
                                 vocab=self.vocab, card=card, overwrite=overwrite)

    # ---- data plumbing -----------------------------------------------------------------------
    def _positions(self, data: Any) -> np.ndarray:
        """Columns of ``data`` holding the model's genes, in the model's order."""
        index = {g: i for i, g in enumerate(np.asarray(data.gene_names).astype(str))}
        absent = [g for g in self.genes if g not in index]
        if absent:
            raise GeneIdentityError(f"{len(absent)} of the model's {self.genes.size} genes are not in the data "
                                    f"({absent[:5]}); use data with the same genes the model was built for")
        return np.array([index[g] for g in self.genes], dtype=np.int64)

    def flags_for(self, condition_genes: Sequence[str]) -> np.ndarray:
        """Perturbation flags over the model's genes (1 for each perturbed gene)."""
        index = {g: i for i, g in enumerate(self.genes)}
        absent = [g for g in condition_genes if g not in index]
        if absent:
            raise GeneIdentityError(f"perturbed genes {absent} are not among the model's {self.genes.size} genes; "
                                    "build the model with a gene list that contains them")
        flags = np.zeros(self.genes.size, dtype=np.int64)
        flags[[index[g] for g in condition_genes]] = 1
        return flags

    # ---- training ----------------------------------------------------------------------------
    def fit(self, data: Any, split: Any = None, *, train: Sequence[Any] | None = None,
            val: Sequence[Any] | None = None, epochs: int = 15, lr: float = 1e-4, batch_size: int = 64,
            gamma: float = 0.9, early_stop: int = 10, max_seq_len: int | None = None, seed: int = 0,
            precision: str = "auto", device: str = "auto", progress: bool = False) -> PerturbationModel:
        """Fine-tune on ``data`` (a :class:`~scforge.data.perturbation.PerturbationData`).

        Training and validation groups come from ``split`` (its ``train``/``val`` conditions, in every
        context) or from ``train``/``val`` lists of conditions or ``(condition, context)`` groups.
        Every control cell is also trained to reproduce itself (GEARS). Returns ``self``; per-epoch
        losses are in :attr:`history`."""
        from scforge.data.perturbation import pair_controls
        from scforge.train import TrainConfig
        from scforge.train.engine import fit_module

        if split is not None:
            train, val = split.train, split.val
        if not train:
            raise ConfigError("nothing to train on: pass a split or train= conditions")
        cols = self._positions(data)
        flag_sets: dict[tuple[str, ...], int] = {}
        rows_t, flags_t = self._pairs_rows(data, train, flag_sets, include_control=True)
        rows_v, flags_v = self._pairs_rows(data, val or [], flag_sets, include_control=False)
        flag_matrix = np.stack([self.flags_for(genes) for genes in flag_sets])
        rows = np.concatenate([rows_t, rows_v])
        cond_flags = np.concatenate([flags_t, flags_v])
        inputs = pair_controls(data, rows, seed=seed)
        n_train = rows_t.size
        val_idx = np.arange(n_train, rows.size)
        L = max_seq_len or self.config.max_seq_len
        collate = _PairCollate(data, cols, self.gene_ids, inputs, rows, cond_flags, flag_matrix, L, seed)
        steps = -(-n_train // batch_size)
        optim = OptimConfig(lr=lr, weight_decay=0.0, schedule="step", gamma=gamma, step_every=steps)
        with tempfile.TemporaryDirectory(prefix="scforge-perturb-") as tmp:
            cfg = TrainConfig(max_epochs=epochs, batch_size=batch_size, grad_clip=1.0, precision=precision,
                              accelerator="cpu" if str(device) == "cpu" else "auto", seed=seed,
                              early_stopping_patience=early_stop if val_idx.size else None,
                              checkpoint_dir=tmp if val_idx.size else None, log_dir=tmp, progress=progress,
                              val_fraction=0.0)
            module = PerturbationTraining(self.module, optim)
            result = fit_module(module, collate, rows.size, config=cfg, val_idx=val_idx)
            self.history = _epoch_history(Path(tmp))
        self.module = result.module.model.eval()
        return self

    @staticmethod
    def _pairs_rows(data: Any, groups: Sequence[Any], flag_sets: dict[tuple[str, ...], int], *,
                    include_control: bool) -> tuple[np.ndarray, np.ndarray]:
        """Cell rows of ``groups`` and, per cell, the index of its perturbed-gene set in ``flag_sets``
        (which grows as new sets appear)."""
        rows, which = [], []
        for group in groups:
            condition, context = group if isinstance(group, tuple) else (group, None)
            if condition == data.control:
                continue
            cells = np.asarray(data.cells(condition, context), dtype=np.int64)
            key = tuple(data.perturbation_genes[condition])
            flags_id = flag_sets.setdefault(key, len(flag_sets))
            rows.append(cells)
            which.append(np.full(cells.size, flags_id, dtype=np.int64))
        if include_control:  # every control cell, of every context: controls are inputs, never held out
            ctrl = np.asarray(data.control_cells(None), dtype=np.int64)
            rows.append(ctrl)
            which.append(np.full(ctrl.size, flag_sets.setdefault((), len(flag_sets)), dtype=np.int64))
        if not rows:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(rows), np.concatenate(which)

    # ---- prediction --------------------------------------------------------------------------
    def predict_cells(self, values: np.ndarray, perturbed_genes: Sequence[str], *, batch_size: int = 64,
                      device: str = "auto", precision: str = "auto") -> np.ndarray:
        """Predicted expression ``[n_cells, n_genes]`` of cells with control expression ``values``
        (columns = the model's genes) after perturbing ``perturbed_genes`` (empty: no perturbation)."""
        values = np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or values.shape[1] != self.genes.size:
            raise ConfigError(f"values must be [cells, {self.genes.size}] over the model's genes; got {values.shape}")
        flags = torch.as_tensor(self.flags_for(perturbed_genes))
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        genes = torch.as_tensor(self.gene_ids, device=dev)
        out = np.empty_like(values)
        with torch.inference_mode(), autocast(dev, dtype):
            for i in range(0, values.shape[0], batch_size):
                v = torch.as_tensor(values[i : i + batch_size], device=dev)
                b = v.shape[0]
                pred = module(genes.expand(b, -1), v, flags.to(dev).expand(b, -1))["pred"]
                out[i : i + batch_size] = pred.float().cpu().numpy()
        return out

    def predict(self, data: Any, groups: Sequence[Any], *, pool_size: int = 300, seed: int = 0,
                batch_size: int = 64, device: str = "auto", precision: str = "auto") -> dict[tuple, np.ndarray]:
        """Mean predicted expression over the model's genes for each ``(condition, context)`` group (or
        condition): the mean over a seeded pool of ``pool_size`` control cells of the context (all of
        them when fewer), each perturbed in silico, as scGPT's and scGenePT's inference does. Each
        group's pool depends on ``seed`` and the group only, not on the other groups asked for."""
        import zlib

        cols = self._positions(data)
        out: dict[tuple, np.ndarray] = {}
        for group in groups:
            condition, context = group if isinstance(group, tuple) else (group, None)
            genes = data.perturbation_genes.get(condition)
            if genes is None:
                raise ConfigError(f"condition {condition!r} is not in the data; known: {list(data.conditions)[:10]}")
            ctrl = np.asarray(data.control_cells(context), dtype=np.int64)
            rng = np.random.default_rng([seed, zlib.crc32(f"{condition}|{context}".encode())])  # order-free
            pool = ctrl if ctrl.size <= pool_size else np.sort(rng.choice(ctrl, pool_size, replace=False))
            values = data.expression(pool)[:, cols]
            pred = self.predict_cells(values, genes, batch_size=batch_size, device=device, precision=precision)
            out[(condition, context)] = pred.mean(axis=0, dtype=np.float64)
        return out

    def rank_perturbations(self, data: Any, observed: np.ndarray, candidates: Sequence[str], *,
                           context: str | None = None, metric: str = "pearson_delta", pool_size: int = 300,
                           seed: int = 0, **kwargs: Any) -> pd.DataFrame:
        """Reverse perturbation: which candidate perturbation best explains an observed mean state
        (a vector over the model's genes)? Each candidate is predicted from the context's controls and
        scored against ``observed``: ``pearson_delta`` (higher is better) or ``l2`` (lower is better).
        Returns a table sorted best first with ``rank``, ``condition`` and ``score``."""
        from scforge.metrics.perturbation import pearson_delta

        if metric not in ("pearson_delta", "l2"):
            raise ConfigError(f"metric={metric!r}; choose 'pearson_delta' or 'l2'")
        observed = np.asarray(observed, dtype=np.float64)
        if observed.shape != (self.genes.size,):
            raise ConfigError(f"observed must be a vector over the model's {self.genes.size} genes; got {observed.shape}")
        if not candidates:
            raise ConfigError("no candidate perturbations to rank")
        cols = self._positions(data)
        control = np.asarray(data.expression(np.asarray(data.control_cells(context)))[:, cols].mean(0), np.float64)
        preds = self.predict(data, [(c, context) for c in candidates], pool_size=pool_size, seed=seed, **kwargs)
        scores = [pearson_delta(preds[(c, context)], observed, control) if metric == "pearson_delta"
                  else float(np.linalg.norm(preds[(c, context)] - observed)) for c in candidates]
        table = pd.DataFrame({"condition": list(candidates), "score": scores})
        table = table.sort_values("score", ascending=metric == "l2", kind="stable").reset_index(drop=True)
        table.insert(0, "rank", np.arange(1, len(table) + 1))
        return table


class _PairCollate:
    """Minibatch of (control input, perturbed target) pairs over the model's genes; a seeded random
    subset of ``max_seq_len`` genes per minibatch when the model has more genes (scGPT's tutorial)."""

    def __init__(self, data, cols, gene_ids, inputs, targets, flag_ids, flag_matrix, max_seq_len, seed):
        self.data, self.cols, self.gene_ids = data, cols, torch.as_tensor(gene_ids)
        self.inputs, self.targets, self.flag_ids, self.flag_matrix = inputs, targets, flag_ids, flag_matrix
        self.max_seq_len, self.seed = max_seq_len, seed

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        from scforge.train.data import batch_seed

        epoch = items[0][0]
        idx = np.array([i for _, i in items], dtype=np.int64)
        n_genes = self.cols.size
        if n_genes > self.max_seq_len:
            rng = np.random.default_rng(batch_seed(self.seed, epoch, int(idx[0]), idx.size))
            keep = np.sort(rng.permutation(n_genes)[: self.max_seq_len])
        else:
            keep = np.arange(n_genes)
        cols = self.cols[keep]
        values = self.data.expression(self.inputs[idx])[:, cols]
        target = self.data.expression(self.targets[idx])[:, cols]
        flags = self.flag_matrix[self.flag_ids[idx]][:, keep]
        b = idx.size
        return {"genes": self.gene_ids[keep].expand(b, -1).contiguous(), "values": torch.as_tensor(values),
                "flags": torch.as_tensor(flags), "target": torch.as_tensor(target), "cells": torch.as_tensor(idx)}


def _model_type_fields(model_type: str) -> dict:
    base = model_type.removesuffix("_no_attention")
    if base not in MODEL_TYPES:
        raise ConfigError(f"model_type={model_type!r}; choose one of {sorted(MODEL_TYPES)} (optionally with "
                          "'_no_attention')")
    fields = {"embedding_norm": True, "decoder": "expr", **MODEL_TYPES[base]}
    fields["text_sources"] = tuple(fields["text_sources"])
    return fields


def _text_tables(vocab: GeneVocab, sources: Sequence[str], embeddings: Mapping[str, Any], seed: int):
    """One ``[vocab, d_text]`` table per source: the text vector of each vocabulary gene, Uniform(-0.1,
    0.1) for genes without one (scGenePT), zeros for special tokens."""
    missing = [s for s in sources if s not in embeddings]
    if missing:
        raise ConfigError(f"this model type needs text embeddings for {missing}; pass text_embeddings={{source: "
                          "GeneTextEmbeddings}} (see scforge.genes.text)")
    from scforge.genes.text import GeneTextEmbeddings

    tables = {}
    tokens = vocab.tokens
    special = np.isin(tokens, list(vocab.specials.values()))
    for source in sources:
        emb = embeddings[source]
        if not isinstance(emb, GeneTextEmbeddings):  # any symbol -> vector mapping
            emb = GeneTextEmbeddings(list(emb), np.stack([np.asarray(v, dtype=np.float32) for v in emb.values()]))
        table, found = emb.matrix(tokens, missing="uniform", seed=seed)
        table[special] = 0.0
        found &= ~special
        if not found.any():
            raise GeneIdentityError(f"none of the vocabulary's genes has a {source} text embedding; check that the "
                                    "embeddings are keyed by the same gene symbols as the vocabulary")
        logger.info("%s text embeddings: %d of %d vocabulary genes", source, int(found.sum()), int((~special).sum()))
        tables[source] = torch.as_tensor(table)
    return tables


def _epoch_history(log_dir: Path) -> list[dict[str, float]]:
    files = sorted(log_dir.rglob("metrics.csv"))
    if not files:
        return []
    table = pd.read_csv(files[-1])
    keep = [c for c in ("train/loss_epoch", "val/loss", "val/mse") if c in table.columns]
    if "epoch" not in table.columns or not keep:
        return []
    grouped = table.groupby("epoch")[keep].mean()
    return [{"epoch": int(e), **{k: float(v) for k, v in row.items() if np.isfinite(v)}} for e, row in grouped.iterrows()]


__all__ = ["LoadSummary", "PerturbationModel", "PerturbationTraining", "text_module_name"]
