"""The user-facing scBERT model: load the published ``.pth``, save, embed cells, predict cell types.

>>> model = ScBERT.from_published("panglao_pretrained.pth", gene_panel="panglao_genes.txt",
...                               gene2vec="gene2vec_16906.npy")
>>> emb = model.embed(adata)                  # raw counts in; also sets adata.obsm["X_scBERT"]
>>> tuned = ScBERT.from_published("finetuned.pth", gene_panel=..., label_dict="label_dict")
>>> labels = tuned.predict(adata, unassign_threshold=0.5)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scforge.errors import CheckpointError, ConfigError, InputDataError
from scforge.genes import GeneVocab, align_genes
from scforge.models.scbert.checkpoint import (
    LoadReport,
    detect_layout,
    infer_config,
    load_gene2vec,
    load_state_into,
    read_published_state,
    to_published_keys,
    to_scforge_keys,
)
from scforge.models.scbert.config import ScBERTConfig
from scforge.models.scbert.model import ScBERTModel
from scforge.nn import autocast, resolve_device, resolve_precision

logger = logging.getLogger("scforge")
FAMILY = "scbert"
POOLINGS = ("mean", "conv1")
UNASSIGNED = "Unassigned"
#: fewer panel genes than this share of the panel found in the data -> a warning; none -> an error
LOW_COVERAGE = 0.5


def as_gene_panel(panel: GeneVocab | Sequence[str] | str | os.PathLike) -> GeneVocab:
    """scBERT's ordered gene panel from a :class:`GeneVocab`, a list of symbols, a text file (one gene
    per line) or a ``.h5ad`` whose ``var_names`` are the panel (e.g. ``panglao_10000.h5ad``)."""
    if isinstance(panel, GeneVocab):
        vocab = panel
    elif isinstance(panel, (str, os.PathLike)):
        path = Path(panel)
        if not path.is_file():
            raise ConfigError(f"the gene panel file '{path}' does not exist. Pass the 16,906 panel genes in "
                              "gene2vec order: a text file with one symbol per line, a list, or panglao_10000.h5ad.")
        if path.suffix == ".h5ad":
            import anndata as ad

            adata = ad.read_h5ad(path, backed="r")
            try:
                vocab = GeneVocab.from_gene_list(list(adata.var_names.astype(str)), name=path.name)
            finally:
                adata.file.close()
        else:
            vocab = GeneVocab.from_file(path)
    else:
        vocab = GeneVocab.from_gene_list([str(g) for g in panel])
    if vocab.specials:
        raise ConfigError(f"scBERT's gene panel is a plain ordered gene list; this one has special tokens "
                          f"{sorted(vocab.specials)}.")
    if len(vocab) == 0:
        raise ConfigError("the gene panel is empty.")
    return vocab


def _read_classes(label_dict: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names: scBERT's ``label_dict`` pickle (``np.unique`` of the cell types; read with the
    restricted unpickler) or a list."""
    if isinstance(label_dict, (str, os.PathLike)):
        from scforge.safe_pickle import safe_load_pickle

        path = Path(label_dict)
        if not path.is_file():
            raise CheckpointError(f"the label_dict file '{path}' does not exist (finetune.py writes it next to "
                                  "the checkpoint).")
        label_dict = safe_load_pickle(path)
    classes = [str(c) for c in np.asarray(label_dict, dtype=object).ravel()]
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"the class names are not unique: {classes[:10]}")
    return classes


class ScBERT:
    """An scBERT model with its gene panel: ``module`` is the pure torch :class:`ScBERTModel`;
    ``classes`` names the classifier's outputs of a fine-tuned model."""

    family = FAMILY

    def __init__(self, module: ScBERTModel, panel: GeneVocab, *, classes: Sequence[str] | None = None,
                 report: LoadReport | None = None, source: str | None = None) -> None:
        if len(panel) != module.config.panel_size:
            raise ConfigError(f"the gene panel has {len(panel)} genes but the model has {module.config.max_seq_len} "
                              f"positions (panel + 1 = {module.config.panel_size} + 1). Use the panel the model "
                              "was trained with.")
        n_classes = module.config.n_classes
        if classes is not None and (n_classes is None or len(classes) != n_classes):
            raise ConfigError(f"{len(classes)} class names for a model with {n_classes or 'no'} classifier outputs.")
        self.module = module
        self.panel = panel
        self.classes = None if classes is None else [str(c) for c in classes]
        self.report = report
        self.source = source

    @property
    def config(self) -> ScBERTConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        head = f"classifier with {c.n_classes} classes" if c.n_classes else "pretraining head"
        return (f"ScBERT({c.depth} Performer layers x {c.dim}, {c.heads} heads, panel {c.panel_size} genes, {head}, "
                f"{n / 1e6:.1f}M parameters, from {self.source or 'new'})")

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def new(cls, gene_panel: GeneVocab | Sequence[str] | str | os.PathLike, *,
            gene2vec: str | os.PathLike | np.ndarray | torch.Tensor | None = None, seed: int = 0,
            classes: Sequence[str] | None = None, **config: Any) -> ScBERT:
        """A randomly initialised model (weights and random features seeded by ``seed``) over
        ``gene_panel``; ``gene2vec`` [panel, dim] fills the frozen positions (needed unless
        ``g2v_position_emb=False``). ``config``: :class:`ScBERTConfig` fields."""
        panel = as_gene_panel(gene_panel)
        config.setdefault("max_seq_len", len(panel) + 1)
        config.setdefault("projection_seed", seed)
        if classes is not None:
            config.setdefault("n_classes", len(classes))
        cfg = ScBERTConfig(**config)
        if cfg.g2v_position_emb and gene2vec is None:
            raise ConfigError("scBERT adds a frozen gene2vec embedding per panel gene: pass gene2vec= (the .npy "
                              "file or an array [panel genes, dim]), or g2v_position_emb=False.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = ScBERTModel(cfg)
        if module.pos_emb is not None:
            with torch.no_grad():
                module.pos_emb.emb.weight.copy_(load_gene2vec(gene2vec, panel_size=cfg.panel_size, dim=cfg.dim))
        return cls(module.eval(), panel, classes=classes, source=None)

    @classmethod
    def from_published(cls, path: str | os.PathLike, *, gene_panel: GeneVocab | Sequence[str] | str | os.PathLike,
                       gene2vec: str | os.PathLike | np.ndarray | None = None,
                       label_dict: str | os.PathLike | Sequence[str] | None = None, **overrides: Any) -> ScBERT:
        """Load an scBERT ``.pth`` (pretrained ``panglao_pretrained.pth`` or a ``finetune.py``
        checkpoint) through the weights-only loader. ``gene_panel``: the panel in gene2vec order
        (16,906 genes for the published model); ``gene2vec``: ``gene2vec_16906.npy``, needed only when
        the file lacks ``pos_emb.emb.weight``; ``label_dict``: class names of a fine-tuned model
        (scBERT's ``label_dict`` pickle or a list). ``overrides``: :class:`ScBERTConfig` fields
        not stored in the file (e.g. ``attention_chunk``)."""
        panel = as_gene_panel(gene_panel)
        raw = read_published_state(path)
        layout = detect_layout(raw)
        state = to_scforge_keys(raw)
        overrides.setdefault("max_seq_len", len(panel) + 1)
        if "pos_emb.emb.weight" in state or "to_out.fc1.weight" in state:
            overrides.pop("max_seq_len")  # the file fixes it
        config = infer_config(state, source=str(path), **overrides)
        if config.panel_size != len(panel):
            raise CheckpointError(f"'{path}' has {config.max_seq_len} positions (a {config.panel_size}-gene panel + 1) "
                                  f"but the gene panel given has {len(panel)} genes. Pass the panel the model was "
                                  "trained with (panglao_10000.h5ad var_names for the published model).")
        module = ScBERTModel(config)
        report = load_state_into(module, state, source=str(path), layout=layout, gene2vec=gene2vec)
        classes = None if label_dict is None else _read_classes(label_dict)
        return cls(module.eval(), panel, classes=classes, report=report, source=str(path))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> ScBERT:
        """Load scforge's own folder format written by :meth:`save`."""
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not scBERT; load it with scforge.load().")
        settings = dict(folder.config)
        classes = settings.pop("classes", None)
        config = ScBERTConfig.from_dict(settings)
        module = ScBERTModel(config)
        report = load_state_into(module, folder.state_dict, source=str(path), layout="scforge")
        return cls(module.eval(), folder.vocab, classes=classes, report=report, source=str(path))

    # ---- saving ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write scforge's folder format (``config.json`` with the class names, ``model.safetensors``,
        ``vocab.json`` = the gene panel, ``card.md``)."""
        from scforge.hub import save_model_folder

        config = self.config.to_dict()
        if self.classes is not None:
            config["classes"] = list(self.classes)
        return save_model_folder(path, family=FAMILY, config=config, state_dict=self.module.state_dict(),
                                 vocab=self.panel, card=self.card(), overwrite=overwrite)

    def save_published(self, path: str | os.PathLike, *, layout: str = "scbert", overwrite: bool = False) -> Path:
        """Write a ``.pth`` as scBERT does (``{'epoch', 'model_state_dict'}``, published key names)."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise CheckpointError(f"{path} exists; pass overwrite=True to replace it.")
        state = to_published_keys({k: v.detach().cpu() for k, v in self.module.state_dict().items()}, layout)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"epoch": 0, "model_state_dict": state}, path)
        return path

    def card(self) -> str:
        c = self.config
        n = sum(p.numel() for p in self.module.parameters())
        return "\n".join([
            "# scBERT model (scforge)", "",
            f"- architecture: {c.depth} Performer (FAVOR+) layers x {c.dim}, {c.heads} heads of {c.dim_head}, "
            f"{c.nb_features} random features, FFN x{c.ff_mult}",
            f"- parameters: {n:,}", f"- gene panel: {c.panel_size} genes (+1 zero position)",
            f"- gene2vec positions: {c.g2v_position_emb}",
            f"- head: {f'classifier, {c.n_classes} classes' if c.n_classes else 'masked token prediction'}",
            f"- classes: {', '.join(self.classes)}" if self.classes else "- classes: none",
            "- expected input: raw counts (normalised to 1e4, log2(1+x), bins 0..5 by scforge)",
            f"- source: {self.source or 'trained with scforge'}", "",
        ])

    # ---- inputs ------------------------------------------------------------------------------
    def tokenizer(self, **kwargs: Any):
        """The :class:`~scforge.tokenize.LogBinTokenizer` over this model's panel (scBERT's input)."""
        from scforge.tokenize import LogBinTokenizer

        c = self.config
        return LogBinTokenizer(self.panel, max_bin=c.max_bin, mask_id=c.mask_token_id, **kwargs)

    def check_input(self, adata: Any, layer: str | None = None, *, gene_col: str | None = None,
                    use_raw: bool = False) -> int:
        """Check that ``adata`` holds raw counts and enough panel genes; returns how many panel genes
        were found (an error when none, a warning below half the panel)."""
        from scforge.matrix import as_source, iter_row_chunks, looks_like_counts

        source = as_source(adata, layer=layer, use_raw=use_raw)
        where = f"{source.where}" + (f" layer {layer!r}" if layer else "")
        first = next(iter(iter_row_chunks(source, 2048)), None)
        if first is None:
            raise InputDataError(f"{where} has no cells.")
        csr = first[2]
        if csr.nnz and not looks_like_counts(csr):
            raise InputDataError(
                f"scBERT tokenizes raw counts (it normalises to 1e4 and takes log2 itself), but the values of {where} "
                f"are not integers (max {float(csr.data.max()):.3g}): they look normalised or log-transformed. Pass "
                "the counts (layer='counts' or use_raw=True), or check_input=False if these values are right."
            )
        alignment = align_genes(source.gene_names(gene_col), self.panel)
        found = int(np.unique(alignment.token_ids[alignment.token_ids >= 0]).size)
        panel = len(self.panel)
        if found == 0:
            alignment.require_overlap(where=where)
        message = f"{found} of the {panel} panel genes found in {where}"
        if found < LOW_COVERAGE * panel:
            logger.warning("scBERT: only %s (%.0f%%); missing genes are input as 0 (not expressed), which shifts "
                           "the model's view of every cell. Check gene names (symbols of the panel).",
                           message, 100 * found / panel)
        else:
            logger.info("scBERT: %s.", message)
        return found

    def tokenize(self, adata: Any, layer: str | None = None, *, gene_col: str | None = None, use_raw: bool = False,
                 check_input: bool = True, progress: bool = False):
        """:class:`~scforge.tokenize.TokenizedCells` of ``adata`` (checked first unless ``check_input=False``)."""
        if check_input:
            self.check_input(adata, layer, gene_col=gene_col, use_raw=use_raw)
        return self.tokenizer().tokenize(adata, layer=layer, gene_col=gene_col, use_raw=use_raw, progress=progress)

    def token_matrix(self, cells) -> np.ndarray:
        """Tokenized cells as a ``[cells, max_seq_len]`` uint8 matrix (a view when possible)."""
        width = self.config.max_seq_len
        if cells.gene_ids is not None or cells.values is None or np.any(cells.lengths != width):
            raise InputDataError(f"these tokenized cells are not scBERT input over this model's panel ({width} "
                                 "positions per cell); tokenize with model.tokenizer().")
        return cells.values.reshape(cells.n_cells, width)

    def annotation_backend(self):
        """This model's :class:`~scforge.tasks.annotate.AnnotationBackend` (``fine_tune`` / ``linear_probe``)."""
        from scforge.models.scbert.annotation import ScBERTAnnotationBackend

        return ScBERTAnnotationBackend(self)

    # ---- outputs -----------------------------------------------------------------------------
    def _batches(self, tokens: np.ndarray, batch_size: int, device, precision, progress: bool, desc: str):
        """Yield ``(rows, final-norm hidden states)`` per batch, in inference mode."""
        from tqdm.auto import tqdm

        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        starts = range(0, tokens.shape[0], batch_size)
        with torch.inference_mode(), autocast(dev, dtype):
            for lo in tqdm(starts, desc=desc, unit="batch", disable=not progress, leave=False):
                rows = slice(lo, lo + batch_size)
                batch = torch.from_numpy(np.ascontiguousarray(tokens[rows])).to(dev, torch.long)
                yield rows, module.encode(batch)

    def embed_tokens(self, cells, *, pooling: str = "mean", batch_size: int = 4, device: str | torch.device = "auto",
                     precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Cell embeddings of already tokenized cells (see :meth:`embed`)."""
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling={pooling!r}; choose one of {POOLINGS}.")
        if pooling == "conv1" and not self.module.has_classifier:
            raise ConfigError("pooling='conv1' uses the fine-tuning head's conv1; this model has the pretraining "
                              "head. Use pooling='mean'.")
        tokens = self.token_matrix(cells)
        width = self.config.dim if pooling == "mean" else self.config.max_seq_len
        out = np.zeros((tokens.shape[0], width), dtype=np.float32)
        for rows, hidden in self._batches(tokens, batch_size, device, precision, progress, "scBERT embed"):
            pooled = hidden.float().mean(1) if pooling == "mean" else \
                self.module.to_out.position_scores(hidden).float()
            out[rows] = pooled.cpu().numpy()
        return out

    def embed(self, adata: Any, layer: str | None = None, *, pooling: str = "mean", batch_size: int = 4,
              key_added: str = "X_scBERT", device: str | torch.device = "auto", precision: str = "auto",
              gene_col: str | None = None, use_raw: bool = False, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        """Cell embeddings from raw counts, in input order; adds ``obsm[key_added]`` to an AnnData.

        ``pooling="mean"``: the mean over all positions of the final-norm hidden states (``dim``
        wide). scBERT has no ``<cls>`` token and every panel gene is a position, so the mean is the
        summary that uses the whole cell without a trained head. ``pooling="conv1"`` (fine-tuned
        models): the head's per-gene scores ``relu(conv1(h))`` (``max_seq_len`` wide), the vector
        the published classifier reads. Only ``obsm`` and ``uns["scforge"]`` of the AnnData change."""
        cells = self.tokenize(adata, layer, gene_col=gene_col, use_raw=use_raw, check_input=check_input,
                              progress=progress)
        emb = self.embed_tokens(cells, pooling=pooling, batch_size=batch_size, device=device, precision=precision,
                                progress=progress)
        if hasattr(adata, "obsm") and key_added:
            adata.obsm[key_added] = emb
            adata.uns.setdefault("scforge", {})[key_added] = {
                "model": self.source or "scforge", "family": FAMILY, "pooling": pooling, "layer": layer}
        return emb

    def proba_tokens(self, cells, *, batch_size: int = 4, device: str | torch.device = "auto",
                     precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Class probabilities ``[cells, n_classes]`` of tokenized cells (softmax of the head)."""
        if not self.module.has_classifier:
            raise ConfigError("this scBERT model has no classification head (a pretrained checkpoint); fine-tune "
                              "it first (scforge.tasks.annotate.fine_tune) or load a fine-tuned checkpoint.")
        tokens = self.token_matrix(cells)
        out = np.zeros((tokens.shape[0], self.config.n_classes), dtype=np.float32)
        for rows, hidden in self._batches(tokens, batch_size, device, precision, progress, "scBERT predict"):
            out[rows] = torch.softmax(self.module.to_out(hidden).float(), dim=-1).cpu().numpy()
        return out

    def predict_proba(self, adata: Any, layer: str | None = None, *, batch_size: int = 4,
                      device: str | torch.device = "auto", precision: str = "auto", gene_col: str | None = None,
                      use_raw: bool = False, check_input: bool = True, progress: bool = True) -> np.ndarray:
        """Class probabilities ``[cells, n_classes]`` from raw counts (columns: :attr:`classes`)."""
        cells = self.tokenize(adata, layer, gene_col=gene_col, use_raw=use_raw, check_input=check_input,
                              progress=progress)
        return self.proba_tokens(cells, batch_size=batch_size, device=device, precision=precision, progress=progress)

    def predict(self, adata: Any, layer: str | None = None, *, unassign_threshold: float | None = None,
                key_added: str | None = "scbert_pred", **kwargs: Any) -> np.ndarray:
        """Predicted class names as scBERT's ``predict.py``: argmax of the softmax; with
        ``unassign_threshold``, cells whose top probability is below it are ``"Unassigned"`` (a
        possible novel type; scBERT uses 0.5). Adds ``obs[key_added]`` to an AnnData.
        ``kwargs``: as :meth:`predict_proba`."""
        if unassign_threshold is not None and not 0.0 <= unassign_threshold <= 1.0:
            raise ConfigError(f"unassign_threshold must be in [0, 1], got {unassign_threshold}")
        proba = self.predict_proba(adata, layer, **kwargs)
        names = np.asarray(self.classes if self.classes is not None
                           else [str(i) for i in range(proba.shape[1])], dtype=object)
        labels = names[proba.argmax(1)]
        if unassign_threshold is not None:
            labels[proba.max(1) < unassign_threshold] = UNASSIGNED
        if hasattr(adata, "obs") and key_added:
            adata.obs[key_added] = labels.astype(str)
        return labels
