"""The user-facing scGPT model: load, save, embed cells and genes.

>>> model = scforge.load("scGPT_human/")              # published folder or scforge folder
>>> emb = model.embed(adata)                         # also sets adata.obsm["X_scGPT"]
>>> genes = model.gene_embeddings(["CD3E", "MS4A1"])  # DataFrame, one row per gene
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.errors import CheckpointError, ConfigError, GeneIdentityError, InputDataError
from scforge.genes import GeneVocab, align_genes
from scforge.models.scgpt.checkpoint import (
    LoadReport,
    build_from_state,
    detect_layout,
    infer_heads,
    to_published_keys,
    to_scforge_keys,
)
from scforge.models.scgpt.config import ScGPTConfig
from scforge.models.scgpt.model import ScGPTModel
from scforge.nn import autocast, resolve_device, resolve_precision
from scforge.tokenize.ragged import require_expressed_cells

logger = logging.getLogger("scforge")
FAMILY = "scgpt"


class ScGPT:
    """An scGPT model with its vocabulary: ``module`` is the pure torch :class:`ScGPTModel`."""

    family = FAMILY

    def __init__(self, module: ScGPTModel, vocab: GeneVocab, *, report: LoadReport | None = None,
                 source: str | None = None) -> None:
        if len(vocab) != module.config.vocab_size:
            raise ConfigError(f"vocabulary has {len(vocab)} tokens but the model expects {module.config.vocab_size}.")
        self.module = module
        self.vocab = vocab
        self.report = report
        self.source = source

    @property
    def config(self) -> ScGPTConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return (f"ScGPT({c.n_layers} layers x {c.d_model}, {c.n_heads} heads, vocab {c.vocab_size}, "
                f"{n / 1e6:.1f}M parameters, from {self.source or 'new'})")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def new(cls, vocab: GeneVocab, **config: Any) -> ScGPT:
        """A randomly initialised model for ``vocab`` (``config``: :class:`ScGPTConfig` fields)."""
        if vocab.special_id("pad") is None:
            raise ConfigError("the vocabulary needs a <pad> token (GeneVocab specials).")
        cfg = ScGPTConfig(vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"), **config)
        return cls(ScGPTModel(cfg), vocab, source=None)

    @classmethod
    def from_published(cls, path: str | os.PathLike, *, strict_heads: bool = False, **overrides: Any) -> ScGPT:
        """Load an scGPT folder (``best_model.pt``, ``args.json``, ``vocab.json``); the weights are read
        with the weights-only unpickler, after checking the folder's ``SHA256SUMS`` when it has one.

        The heads are configured from what the file holds (MVC, zero-probability, classifier,
        batch parts); ``overrides`` (ScGPTConfig fields, e.g. ``n_cls=12``) change them, and
        heads the file lacks are initialised and listed in ``model.report``."""
        from scforge.hub import safe_torch_load, scgpt_files, verify_listed_checksums

        weights, args_path, vocab_path = scgpt_files(path)
        # a SHA256SUMS / model card of the folder, when present, must vouch for the files read here
        verify_listed_checksums(weights.parent, [weights.name, args_path.name, vocab_path.name])
        vocab = GeneVocab.from_scgpt_json(vocab_path)
        raw = safe_torch_load(weights, what="scGPT weights")
        layout = detect_layout(raw)
        state = to_scforge_keys(raw)
        emb = state.get("encoder.embedding.weight")
        if emb is None:
            raise CheckpointError(f"{weights} has no 'encoder.embedding.weight': it is not an scGPT TransformerModel "
                                  f"state dict (first keys: {list(raw)[:5]}).")
        if emb.shape[0] != len(vocab):
            raise CheckpointError(
                f"{weights} has {emb.shape[0]} gene embeddings but {vocab_path} lists {len(vocab)} tokens "
                "(including <pad>, <cls>, <eoc>). Use the vocab.json shipped with these weights."
            )
        fields = infer_heads(state)
        fields.update(overrides)
        config = ScGPTConfig.from_args_json(args_path, vocab_size=len(vocab), pad_token_id=vocab.special_id("pad"),
                                            **fields)
        module, report = build_from_state(config, state, str(weights), layout, strict_heads)
        return cls(module.eval(), vocab, report=report, source=str(path))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ScGPT:
        """Load scforge's own folder format written by :meth:`save`."""
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not scGPT; load it with scforge.load().")
        config = ScGPTConfig.from_dict(folder.config)
        module, report = build_from_state(config, folder.state_dict, str(path), "flash", strict_heads=True)
        return cls(module.eval(), folder.vocab, report=report, source=str(path))

    # ---- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write scforge's folder format (``config.json``, ``model.safetensors``, ``vocab.json``, ``card.md``)."""
        from scforge.hub import save_model_folder

        return save_model_folder(path, family=FAMILY, config=self.config.to_dict(),
                                 state_dict=self.module.state_dict(), vocab=self.vocab, card=self.card(),
                                 overwrite=overwrite)

    def save_published(self, path: str | os.PathLike, *, layout: str = "flash", overwrite: bool = False) -> Path:
        """Write scGPT's own folder format (``best_model.pt``, ``args.json``, ``vocab.json``)."""
        path = Path(path)
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise CheckpointError(f"{path} exists and is not empty; pass overwrite=True to replace its files.")
        path.mkdir(parents=True, exist_ok=True)
        c = self.config
        state = to_published_keys({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, layout)
        torch.save(state, path / "best_model.pt")
        args = {"embsize": c.d_model, "nheads": c.n_heads, "d_hid": c.d_hid, "nlayers": c.n_layers,
                "n_layers_cls": c.n_layers_cls, "dropout": c.dropout, "pad_token": c.pad_token,
                "pad_value": c.pad_value, "mask_value": c.mask_value, "n_bins": c.n_bins,
                "input_emb_style": c.input_emb_style, "max_seq_len": c.max_seq_len,
                "pre_norm": c.norm_scheme != "post", "MVC": c.do_mvc, "USE_GENERATIVE_TRAINING": c.use_generative,
                "input_style": "binned"}
        (path / "args.json").write_text(json.dumps(args, indent=2))
        self.vocab.to_scgpt_json(path / "vocab.json")
        return path

    def card(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return "\n".join([
            "# scGPT model (scforge)", "",
            f"- architecture: {c.n_layers} post-norm layers x {c.d_model} wide, {c.n_heads} heads, FFN {c.d_hid}"
            if c.norm_scheme == "post" else f"- architecture: {c.n_layers} layers ({c.norm_scheme}) x {c.d_model}",
            f"- parameters: {n:,}", f"- vocabulary: {c.vocab_size} tokens", f"- value input: {c.input_emb_style}, "
            f"{c.n_bins} bins", f"- expected input for embed(): {c.expected_input}",
            f"- heads: MVC={c.do_mvc}, classes={c.n_cls}, DAR={c.do_dab}, batch labels={c.use_batch_labels}",
            f"- source: {self.source or 'trained with scforge'}", "",
        ])

    # ---- embeddings --------------------------------------------------------------------------
    def tokenizer(self, *, max_length: int | None = None, seed: int = 0):
        """The tokenizer ``embed`` uses: scGPT's ``embed_data`` conventions (bins of the raw values,
        ``<cls>`` with the pad value, at most ``max_length`` tokens with seeded gene subsampling)."""
        from scforge.tokenize import BinnedTokenizer

        c = self.config
        return BinnedTokenizer(self.vocab, n_bins=c.n_bins, normalize_total=None, log1p=False,
                               cls_value=c.pad_value, max_len=max_length or c.max_seq_len, seed=seed,
                               pad_value=c.pad_value, mask_value=c.mask_value)

    def annotation_backend(self):
        """scGPT's side of :mod:`scforge.tasks.annotate` (fine-tuning and linear probing)."""
        from scforge.models.scgpt.annotation import ScGPTAnnotationBackend

        return ScGPTAnnotationBackend(self)

    def embed(
        self,
        adata: Any,
        layer: str | None = None,
        *,
        batch_size: int = 64,
        key_added: str = "X_scGPT",
        device: str | torch.device = "auto",
        precision: str = "auto",
        max_length: int | None = None,
        normalize: bool = True,
        seed: int = 0,
        gene_col: str | None = None,
        use_raw: bool = False,
        check_input: bool = True,
        progress: bool = True,
    ) -> np.ndarray:
        """Cell embeddings ``[n_cells, d_model]`` in input order; adds ``obsm[key_added]`` to an AnnData.

        Follows scGPT's ``embed_data``: expressed genes of the vocabulary (others are dropped and
        reported), value bins of the given values, ``<cls>`` first with the pad value, at most
        ``max_length`` tokens (default: the model's ``max_seq_len``) with a seeded gene subsample,
        the ``<cls>`` output L2-normalised (``normalize``). Only ``obsm`` and ``uns["scforge"]`` of the
        AnnData change. ``adata`` may also be a path to an ``.h5ad`` file (read chunk by chunk)."""
        emb, _ = self._run(adata, layer, batch_size=batch_size, device=device, precision=precision,
                           max_length=max_length, seed=seed, gene_col=gene_col, use_raw=use_raw,
                           check_input=check_input, progress=progress)
        if normalize:
            emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
        if hasattr(adata, "obsm") and key_added:
            adata.obsm[key_added] = emb
            adata.uns.setdefault("scforge", {})[key_added] = {
                "model": self.source or "scforge", "family": FAMILY, "max_length": max_length or self.config.max_seq_len,
                "normalized": normalize, "seed": seed, "layer": layer,
            }
        return emb

    def contextual_gene_embeddings(
        self, adata: Any, genes: list[str], layer: str | None = None, **kwargs: Any
    ) -> np.ndarray:
        """Transformer outputs of ``genes`` in each cell: ``[n_cells, n_genes, d_model]``, NaN where the
        gene is not among the cell's tokens (not expressed, or subsampled away). ``kwargs`` as :meth:`embed`."""
        ids = self._gene_ids(genes)
        _, ctx = self._run(adata, layer, wanted=ids, **kwargs)
        return ctx

    def gene_embeddings(self, genes: list[str] | None = None, *, missing: str = "error") -> pd.DataFrame:
        """Context-free gene embeddings (gene encoder output, after its LayerNorm), one row per gene.

        ``genes=None`` gives every gene of the vocabulary. Names are matched like the data's genes
        (symbols, Ensembl ids, aliases); ``missing="drop"`` skips unknown genes instead of raising."""
        if genes is None:
            names = list(self.vocab.gene_tokens)
            ids = self.vocab.lookup(names)
        else:
            names, ids = list(genes), self._gene_ids(genes, missing=missing)
            keep = ids >= 0
            names, ids = [n for n, k in zip(names, keep) if k], ids[keep]
        dev = next(self.module.parameters()).device
        with torch.no_grad():
            out = self.module.gene_embeddings(torch.as_tensor(ids, dtype=torch.long, device=dev)).float().cpu().numpy()
        return pd.DataFrame(out, index=pd.Index(names, name="gene"))

    # ---- internals ---------------------------------------------------------------------------
    def _gene_ids(self, genes: list[str], missing: str = "error") -> np.ndarray:
        if missing not in ("error", "drop"):
            raise ConfigError(f"missing={missing!r}; use 'error' or 'drop'.")
        alignment = align_genes(list(genes), self.vocab)
        ids = np.asarray(alignment.token_ids, dtype=np.int64)
        if missing == "error" and (ids < 0).any():
            unknown = [g for g, i in zip(genes, ids) if i < 0]
            raise GeneIdentityError(f"{len(unknown)} of {len(ids)} genes are not in the model's vocabulary: "
                                    f"{unknown[:10]}. Check the names, or pass missing='drop'.")
        return ids

    def _check_input(self, adata: Any, layer: str | None, use_raw: bool) -> None:
        from scforge.matrix import as_source, iter_row_chunks, looks_like_counts

        source = as_source(adata, layer=layer, use_raw=use_raw)
        first = next(iter(iter_row_chunks(source, 2048)), None)
        if first is None:
            raise InputDataError(f"{source.where} has no cells.")
        csr = first[2] if isinstance(first, tuple) else first
        if csr.nnz == 0:
            return
        counts = looks_like_counts(csr)
        where = f"{source.where}" + (f" layer {layer!r}" if layer else "")
        if self.config.expected_input == "counts" and not counts:
            raise InputDataError(
                f"This scGPT model embeds raw counts, but the values of {where} are not integers (max "
                f"{float(csr.data.max()):.3g}): they look normalised or log-transformed. Pass the counts "
                "(layer='counts' or use_raw=True), or check_input=False if you know these values are right."
            )
        if self.config.expected_input == "log1p" and counts and float(csr.data.max()) > 30:
            raise InputDataError(
                f"This scGPT model was trained on log1p-normalised values, but {where} holds raw counts (integers "
                f"up to {float(csr.data.max()):.0f}). Run scanpy's normalize_total and log1p first, pass the layer "
                "that holds them, or check_input=False."
            )

    def _run(self, adata, layer, *, batch_size=64, device="auto", precision="auto", max_length=None, seed=0,
             gene_col=None, use_raw=False, check_input=True, progress=True, wanted=None):
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if check_input:
            self._check_input(adata, layer, use_raw)
        tok = self.tokenizer(max_length=max_length, seed=seed)
        cells = tok.tokenize(adata, layer=layer, gene_col=gene_col, use_raw=use_raw)
        require_expressed_cells(cells, "their embedding would be meaningless", n_special=1)
        lengths = cells.lengths
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        d = self.config.d_model
        emb = np.zeros((cells.n_cells, d), dtype=np.float32)
        ctx = None
        if wanted is not None:
            ctx = np.full((cells.n_cells, len(wanted), d), np.nan, dtype=np.float32)
            order = np.argsort(np.asarray(wanted, dtype=np.int64), kind="stable")
            lookup = SimpleNamespace(sorted_ids=np.asarray(wanted, dtype=np.int64)[order], order=order)
        order = np.argsort(-lengths, kind="stable")  # similar lengths together
        batches = [order[i : i + batch_size] for i in range(0, order.size, batch_size)]
        with torch.inference_mode(), autocast(dev, dtype):
            for idx in tqdm(batches, desc="scGPT embed", unit="batch", disable=not progress, leave=False):
                b = cells.pack(idx)
                genes = b["genes"].to(dev)
                values = b["values"].to(dev)
                cu = b["cu_seqlens"].to(dev, torch.int64)
                h = module.encode(genes, values, cu_seqlens=cu, max_seqlen=b["max_seqlen"])
                emb[idx] = module.cell_embedding(h, values, cu_seqlens=cu).float().cpu().numpy()
                if ctx is not None:
                    self._collect(ctx, lookup, idx, b["genes"].numpy(), b["cu_seqlens"].numpy(), h)
        logger.info("scGPT embed: %d cells, %d tokens, device %s, %s", cells.n_cells, cells.n_tokens, dev, dtype)
        return emb, ctx

    @staticmethod
    def _collect(ctx, wanted, idx, genes, cu, h) -> None:
        """Copy the outputs at the wanted genes' tokens into ``ctx[cell, gene]`` (vectorized)."""
        column = np.searchsorted(wanted.sorted_ids, genes)
        column = np.minimum(column, wanted.sorted_ids.size - 1)
        hit = np.flatnonzero(wanted.sorted_ids[column] == genes)
        if hit.size:
            rows = np.repeat(idx, np.diff(cu))[hit]
            ctx[rows, wanted.order[column[hit]]] = h[torch.as_tensor(hit)].float().cpu().numpy()
