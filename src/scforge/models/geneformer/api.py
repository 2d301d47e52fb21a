"""The user-facing Geneformer model: load, save, embed cells and genes.

>>> model = Geneformer.from_published("Geneformer-V1-10M/")   # HF folder; dictionaries picked by vocab size
>>> emb = model.embed(adata)                                  # raw counts; also sets adata.obsm["X_geneformer"]
>>> genes = model.gene_embeddings(adata, ["CD3E", "MS4A1"])   # mean contextual embedding per gene
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.errors import CheckpointError, ConfigError, GeneIdentityError, InputDataError, VocabularyError
from scforge.genes import GeneformerDictionaries
from scforge.models.geneformer.checkpoint import GeneformerModel, load_hf_folder, load_state_into, write_hf_folder
from scforge.models.geneformer.config import V1_VOCAB_SIZE, V2_VOCAB_SIZE, GeneformerConfig
from scforge.models.geneformer.model import GeneformerForMaskedLM, GeneformerForSequenceClassification
from scforge.nn import autocast, resolve_device, resolve_precision, segment_ids
from scforge.tokenize import RankValueTokenizer
from scforge.tokenize.ragged import TokenizedCells

logger = logging.getLogger("scforge")
FAMILY = "geneformer"
#: the gene medians travel with the weights in scforge folders (one float64 per token id, NaN for specials)
MEDIANS_KEY = "tokenizer.gene_medians"
MODES = ("auto", "cls", "cell")


def resolve_dictionaries(spec: Any, vocab_size: int) -> GeneformerDictionaries:
    """Dictionaries from a folder / token-dictionary path / built-in name, or the built-in V1 or V2 set
    chosen by the model's vocabulary size when ``spec`` is None; checked against ``vocab_size``."""
    from scforge.genes.builtin import resolve_geneformer

    if spec is None:
        if vocab_size not in (V1_VOCAB_SIZE, V2_VOCAB_SIZE):
            raise VocabularyError(
                f"The model has {vocab_size} token embeddings, which is neither Geneformer V1 ({V1_VOCAB_SIZE:,}) "
                f"nor V2 ({V2_VOCAB_SIZE:,}); pass dictionaries= (the folder holding its token and median pickles)."
            )
        spec = "geneformer-v1" if vocab_size == V1_VOCAB_SIZE else "geneformer-v2"
    dictionaries = resolve_geneformer(spec)
    if len(dictionaries.vocab) != vocab_size:
        raise VocabularyError(
            f"The token dictionary has {len(dictionaries.vocab):,} tokens but the model has {vocab_size:,} token "
            f"embeddings (V1: {V1_VOCAB_SIZE:,}, V2: {V2_VOCAB_SIZE:,}). Use the dictionaries of the model's "
            "version."
        )
    return dictionaries


class Geneformer:
    """A Geneformer model with its dictionaries. ``module`` is a pure torch
    :class:`GeneformerForMaskedLM` (or :class:`GeneformerForSequenceClassification` after fine-tuning)."""

    family = FAMILY

    def __init__(self, module: GeneformerModel, dictionaries: GeneformerDictionaries, *, report=None,
                 source: str | None = None) -> None:
        vocab = dictionaries.vocab
        if len(vocab) != module.config.vocab_size:
            raise VocabularyError(f"The token dictionary has {len(vocab):,} tokens but the model expects "
                                  f"{module.config.vocab_size:,}.")
        if vocab.special_id("pad") != module.config.pad_token_id:
            raise VocabularyError(f"<pad> is token {vocab.special_id('pad')} in the dictionary but "
                                  f"{module.config.pad_token_id} in the model config.")
        self.module = module
        self.dictionaries = dictionaries
        self.report = report
        self.source = source

    @property
    def config(self) -> GeneformerConfig:
        return self.module.config

    @property
    def vocab(self):
        return self.dictionaries.vocab

    @property
    def has_cls(self) -> bool:
        """V2 dictionaries wrap cells in ``<cls>`` ... ``<eos>``; V1 has no special tokens in a cell."""
        return "<cls>" in self.dictionaries.vocab

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return (f"Geneformer({self.dictionaries.version}, {c.num_hidden_layers} layers x {c.hidden_size}, "
                f"{c.num_attention_heads} heads, {n / 1e6:.1f}M parameters, from {self.source or 'new'})")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def new(cls, config: GeneformerConfig, dictionaries: Any = None, *, seed: int | None = None) -> Geneformer:
        """A randomly initialised masked-LM model (HF BERT initialisation, seeded when ``seed`` is given)."""
        dicts = resolve_dictionaries(dictionaries, config.vocab_size)
        if seed is not None:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                return cls(GeneformerForMaskedLM(config), dicts)
        return cls(GeneformerForMaskedLM(config), dicts)

    @classmethod
    def from_published(cls, folder: str | os.PathLike, dictionaries: Any = None) -> Geneformer:
        """Load a published HF folder (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``;
        ``BertForMaskedLM`` or ``BertForSequenceClassification``). ``dictionaries``: a folder with the
        token/median pickles (or a token dictionary path, or ``"geneformer-v1"``/``"geneformer-v2"``);
        default: the built-in V1 or V2 set matching the vocabulary size."""
        module, report = load_hf_folder(folder)
        return cls(module.eval(), resolve_dictionaries(dictionaries, module.config.vocab_size), report=report,
                   source=str(folder))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Geneformer:
        """Load scforge's own folder format written by :meth:`save`."""
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not Geneformer; load it with scforge.load().")
        try:
            config = GeneformerConfig.from_dict(folder.config["model"])
            version = folder.config["dictionaries_version"]
        except (KeyError, TypeError) as exc:
            raise CheckpointError(f"{path}/config.json lacks the Geneformer settings ({exc}).") from None
        state = dict(folder.state_dict)
        medians = state.pop(MEDIANS_KEY, None)
        if medians is None or medians.numel() != len(folder.vocab):
            raise CheckpointError(f"{path} lacks the gene medians ({MEDIANS_KEY}) for its {len(folder.vocab)} tokens.")
        values = medians.double().numpy()
        tokens = folder.vocab.tokens
        dicts = GeneformerDictionaries(
            vocab=folder.vocab, medians={t: float(v) for t, v in zip(tokens, values) if np.isfinite(v)},
            name_to_id=None, ensembl_mapping=None, version=version, files={"folder": str(path)})
        module: GeneformerModel = (GeneformerForSequenceClassification(config) if config.num_labels
                                   else GeneformerForMaskedLM(config))
        report = load_state_into(module, state, source=str(path))
        if report.initialized:
            raise CheckpointError(f"{path} is incomplete: {report.summary()}")
        model = cls(module.eval(), dicts, report=report, source=str(path))
        model.classes = folder.config.get("classes")
        return model

    # ---- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write scforge's folder format (weights, gene medians, vocabulary, card); family ``"geneformer"``.
        The Ensembl id mapping of the source dictionaries is not stored (data with retired ids should be
        tokenized with the original dictionaries)."""
        from scforge.hub import save_model_folder

        state = {k: v for k, v in self.module.state_dict().items() if k != "mlm_head.decoder.weight"}
        state[MEDIANS_KEY] = torch.from_numpy(self.tokenizer()._medians.astype(np.float64))
        config = {"model": self.config.to_dict(), "dictionaries_version": self.dictionaries.version,
                  "classes": getattr(self, "classes", None)}
        return save_model_folder(path, family=FAMILY, config=config, state_dict=state, vocab=self.vocab,
                                 card=self.card(), overwrite=overwrite)

    def save_published(self, path: str | os.PathLike, *, safe_serialization: bool = True) -> Path:
        """Write a HF folder (``config.json`` + ``model.safetensors`` / ``pytorch_model.bin``) that
        ``transformers`` and Geneformer's own code load."""
        return write_hf_folder(self.module, path, safe_serialization=safe_serialization)

    def card(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return "\n".join([
            "# Geneformer model (scforge)", "",
            f"- architecture: BERT, {c.num_hidden_layers} post-LN layers x {c.hidden_size}, {c.num_attention_heads} "
            f"heads, FFN {c.intermediate_size}, {c.hidden_act}, {c.max_position_embeddings} positions",
            f"- parameters: {n:,}", f"- dictionaries: Geneformer {self.dictionaries.version}, {c.vocab_size:,} tokens",
            f"- head: {'classifier, ' + str(c.num_labels) + ' classes' if c.num_labels else 'masked LM'}",
            "- input for embed(): raw counts, Ensembl ids or symbols (mapped), rank value encoding",
            f"- source: {self.source or 'trained with scforge'}", "",
        ])

    # ---- tokenization ------------------------------------------------------------------------
    def tokenizer(self, *, max_length: int | None = None, n_counts_key: str | None = "n_counts",
                  **kwargs: Any) -> RankValueTokenizer:
        """The rank value tokenizer of this model's dictionaries; at most ``max_length`` tokens (default and
        cap: the model's positions, 2,048 for V1 and 4,096 for V2). ``kwargs`` go to the tokenizer."""
        limit = self.config.max_position_embeddings
        if max_length is not None and not 0 < max_length <= limit:
            raise ConfigError(f"max_length must be in 1..{limit} (the model's positions), got {max_length}.")
        return RankValueTokenizer(self.dictionaries, model_input_size=max_length or limit,
                                  n_counts_key=n_counts_key, **kwargs)

    def tokenize(self, adata: Any, layer: str | None = None, *, max_length: int | None = None,
                 gene_col: str | None = None, use_raw: bool = False, n_counts_key: str | None = "n_counts",
                 progress: bool = False) -> TokenizedCells:
        """Rank value encoding of raw counts (rejects non-integer values); cells in input order. Cells that
        express no gene of the dictionary raise :class:`InputDataError`."""
        tok = self.tokenizer(max_length=max_length, n_counts_key=n_counts_key)
        cells = tok.tokenize(adata, layer=layer, gene_col=gene_col, use_raw=use_raw, progress=progress)
        self.require_genes(cells)
        return cells

    def require_genes(self, cells: TokenizedCells) -> None:
        empty = np.flatnonzero(cells.lengths <= (2 if self.has_cls else 0))
        if empty.size:
            names = [str(cells.obs_names[i]) for i in empty[:5]]
            raise InputDataError(
                f"{empty.size} of {cells.n_cells} cells express no gene of the Geneformer dictionary (e.g. {names}); "
                "they have no embedding. Remove them first, e.g. sc.pp.filter_cells(adata, min_genes=1)."
            )

    # ---- embeddings --------------------------------------------------------------------------
    def layers_to_run(self, emb_layer: int) -> int:
        """EmbExtractor's layer choice: hidden_states[num_layers + emb_layer] (-1 penultimate, 0 last)."""
        n = self.config.num_hidden_layers
        if not isinstance(emb_layer, (int, np.integer)) or not -n <= emb_layer <= 0:
            raise ConfigError(f"emb_layer must be an int in {-n}..0 (-1: penultimate layer, 0: last), got {emb_layer!r}.")
        return n + int(emb_layer)

    def resolve_mode(self, mode: str) -> str:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}; choose one of {MODES}.")
        if mode == "auto":
            return "cls" if self.has_cls else "cell"
        if mode == "cls" and not self.has_cls:
            raise ConfigError("mode='cls' needs a <cls> token, which V1 dictionaries lack; use mode='cell' "
                              "(mean over genes), as Geneformer's EmbExtractor does for V1.")
        return mode

    def hidden_batches(
        self, cells: TokenizedCells, *, emb_layer: int = -1, batch_size: int = 64, device: Any = "auto",
        precision: str = "auto", progress: bool = False, desc: str = "Geneformer",
    ) -> Iterator[tuple[np.ndarray, dict, torch.Tensor]]:
        """Packed hidden states of the chosen layer, batch by batch: ``(cell indices, packed batch, h [T, H])``.
        Cells are grouped by length (longest first) so batches hold similar lengths; no padding is computed."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        n_layers = self.layers_to_run(emb_layer)
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        backbone = self.module.bert.to(dev).eval()
        order = np.argsort(-cells.lengths, kind="stable")
        batches = [order[i:i + batch_size] for i in range(0, order.size, batch_size)]
        with torch.inference_mode(), autocast(dev, dtype):
            for idx in tqdm(batches, desc=desc, unit="batch", disable=not progress, leave=False):
                b = cells.pack(idx)
                cu = b["cu_seqlens"].to(dev, torch.int64)
                h = backbone(b["genes"].to(dev), cu_seqlens=cu, max_seqlen=b["max_seqlen"], num_layers=n_layers)
                yield idx, b, h

    def pool(self, h: torch.Tensor, cu_seqlens: torch.Tensor, mode: str) -> torch.Tensor:
        """Cell embeddings from packed states: ``cls`` = first token; ``cell`` = mean over genes, leaving
        out ``<cls>``/``<eos>`` when the dictionary has them."""
        cu = cu_seqlens.to(h.device, torch.int64)
        if mode == "cls":
            return h[cu[:-1]].float()
        seg = segment_ids(cu)
        keep = self.gene_token_mask(cu, h.shape[0])
        n = cu.numel() - 1
        sums = torch.zeros(n, h.shape[-1], dtype=torch.float32, device=h.device).index_add_(0, seg[keep], h[keep].float())
        counts = torch.bincount(seg[keep], minlength=n).clamp_min(1)
        return sums / counts[:, None]

    def gene_token_mask(self, cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """True at packed positions holding genes (not ``<cls>`` / ``<eos>``)."""
        keep = torch.ones(n_tokens, dtype=torch.bool, device=cu_seqlens.device)
        if self.has_cls:
            keep[cu_seqlens[:-1]] = False
            keep[cu_seqlens[1:] - 1] = False
        return keep

    def embed_cells(self, cells: TokenizedCells, *, emb_layer: int = -1, mode: str = "auto", batch_size: int = 64,
                    device: Any = "auto", precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Cell embeddings ``[n_cells, hidden]`` of tokenized cells, rows in the cells' order."""
        mode = self.resolve_mode(mode)
        self.require_genes(cells)
        emb = np.zeros((cells.n_cells, self.config.hidden_size), dtype=np.float32)
        for idx, b, h in self.hidden_batches(cells, emb_layer=emb_layer, batch_size=batch_size, device=device,
                                             precision=precision, progress=progress, desc="Geneformer embed"):
            emb[idx] = self.pool(h, b["cu_seqlens"], mode).cpu().numpy()
        return emb

    def embed(
        self,
        adata: Any,
        layer: str | None = None,
        *,
        emb_layer: int = -1,
        mode: str = "auto",
        batch_size: int = 64,
        device: Any = "auto",
        precision: str = "auto",
        key_added: str | None = "X_geneformer",
        max_length: int | None = None,
        n_counts_key: str | None = "n_counts",
        gene_col: str | None = None,
        use_raw: bool = False,
        progress: bool = False,
    ) -> np.ndarray:
        """Cell embeddings ``[n_cells, hidden]`` in input order, with Geneformer ``EmbExtractor`` semantics.

        ``adata`` holds raw counts (an AnnData, ``.h5ad`` path or matrix); genes are Ensembl ids or symbols
        mapped to them. ``emb_layer=-1`` takes the penultimate layer, ``0`` the last. ``mode``: ``"cls"``
        (V2: the ``<cls>`` state), ``"cell"`` (mean over genes, excluding ``<cls>``/``<eos>``); ``"auto"``
        picks ``cls`` for V2, ``cell`` for V1. ``n_counts_key``: obs column of total counts over all genes
        (computed from the data when absent). Only ``obsm[key_added]`` and ``uns["scforge"]`` change."""
        cells = self.tokenize(adata, layer, max_length=max_length, gene_col=gene_col, use_raw=use_raw,
                              n_counts_key=n_counts_key)
        emb = self.embed_cells(cells, emb_layer=emb_layer, mode=mode, batch_size=batch_size, device=device,
                               precision=precision, progress=progress)
        if hasattr(adata, "obsm") and key_added:
            adata.obsm[key_added] = emb
            adata.uns.setdefault("scforge", {})[key_added] = {
                "model": self.source or "scforge", "family": FAMILY, "emb_layer": emb_layer,
                "mode": self.resolve_mode(mode), "layer": layer, "max_length": max_length,
            }
        return emb

    def gene_ids(self, genes: Sequence[str]) -> np.ndarray:
        """Token ids of gene names (Ensembl ids or symbols); unknown names raise :class:`GeneIdentityError`."""
        from scforge.genes import align_genes

        genes = [str(g) for g in genes]
        alignment = align_genes(genes, self.vocab, ensembl_mapping=self.dictionaries.ensembl_mapping)
        ids = np.asarray(alignment.token_ids, dtype=np.int64)
        if (ids < 0).any():
            unknown = [g for g, i in zip(genes, ids) if i < 0]
            raise GeneIdentityError(
                f"{len(unknown)} of {len(ids)} genes are not in the Geneformer {self.dictionaries.version} dictionary: "
                f"{unknown[:10]}. Use Ensembl ids (e.g. ENSG00000105374) or current HGNC symbols.")
        return ids

    def gene_embeddings(
        self,
        adata: Any,
        genes: Sequence[str] | None = None,
        layer: str | None = None,
        *,
        per_cell: bool = False,
        emb_layer: int = -1,
        batch_size: int = 64,
        device: Any = "auto",
        precision: str = "auto",
        max_length: int | None = None,
        n_counts_key: str | None = "n_counts",
        gene_col: str | None = None,
        use_raw: bool = False,
        progress: bool = False,
    ) -> pd.DataFrame | np.ndarray:
        """Contextual gene embeddings (EmbExtractor ``emb_mode="gene"``).

        ``per_cell=False``: the mean embedding of each gene over the cells where it is among the tokens, a
        DataFrame indexed by gene (the given names, or the dictionary's Ensembl ids of every gene seen when
        ``genes`` is None), with the number of cells in ``df.attrs["n_cells"]``. ``per_cell=True`` (needs
        ``genes``): ``[n_cells, n_genes, hidden]``, NaN where the gene is not among a cell's tokens."""
        if per_cell and genes is None:
            raise ConfigError("per_cell=True needs genes= (a few genes; all genes of all cells would not fit).")
        wanted = self.gene_ids(genes) if genes is not None else None
        cells = self.tokenize(adata, layer, max_length=max_length, gene_col=gene_col, use_raw=use_raw,
                              n_counts_key=n_counts_key)
        d, vocab_size = self.config.hidden_size, self.config.vocab_size
        sums = torch.zeros((vocab_size, d), dtype=torch.float64)
        counts = np.zeros(vocab_size, dtype=np.int64)
        ctx = np.full((cells.n_cells, len(wanted), d), np.nan, dtype=np.float32) if per_cell else None
        column = np.full(vocab_size, -1, dtype=np.int64)
        if wanted is not None:
            column[wanted] = np.arange(len(wanted))
        for idx, b, h in self.hidden_batches(cells, emb_layer=emb_layer, batch_size=batch_size, device=device,
                                             precision=precision, progress=progress, desc="Geneformer genes"):
            cu = b["cu_seqlens"].to(torch.int64)
            keep = self.gene_token_mask(cu, h.shape[0]).cpu().numpy()
            ids = b["genes"].numpy()
            states = h.float().cpu().numpy()
            if wanted is not None:
                keep &= column[ids] >= 0
            sums.index_add_(0, torch.from_numpy(ids[keep]), torch.from_numpy(states[keep]).double())
            counts += np.bincount(ids[keep], minlength=vocab_size)
            if ctx is not None:
                rows = np.repeat(idx, np.diff(cu.numpy()))[keep]
                ctx[rows, column[ids[keep]]] = states[keep]
        if ctx is not None:
            return ctx
        if wanted is not None:
            index, ids = list(genes), wanted
        else:
            ids = np.flatnonzero(counts)
            index = [self.vocab.token(int(i)) for i in ids]
        with np.errstate(invalid="ignore", divide="ignore"):
            means = sums.numpy()[ids] / counts[ids, None]
        df = pd.DataFrame(means.astype(np.float32), index=pd.Index(index, name="gene"))
        df.attrs["n_cells"] = dict(zip(index, counts[ids].tolist()))
        return df

    # ---- tasks -------------------------------------------------------------------------------
    def annotation_backend(self):
        """Backend for :func:`scforge.tasks.annotate.fine_tune` / ``linear_probe``."""
        from scforge.models.geneformer.training import GeneformerAnnotationBackend

        return GeneformerAnnotationBackend(self)
