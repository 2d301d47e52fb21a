"""Multi-omic cell embeddings (RNA + surface protein, RNA + ATAC) with scGPT's multi-omic model.

>>> data = MultiOmicData.from_cite_seq(adata, protein_key="protein_expression")   # RNA counts in X
>>> data = MultiOmicData.from_mudata("multiome.h5mu", modalities=("rna", "atac"))
>>> both = MultiOmicData.concat([data_5k, data_10k], batch_key="file")             # different panels
>>> model = MultiOmicModel.new(both, d_model=64, n_layers=2, n_hvg=1200, seed=0)
>>> model.fit(both, epochs=10, batch_size=32, lr=1e-3, batch_key="file")
>>> emb = model.embed(both)                         # [cells, d_model], L2-normalised
>>> out = model.embed(both, return_adata=True)      # new AnnData, obsm["X_scGPT_multiomic"]

**Tokens.** One joint vocabulary: RNA gene symbols as they are, protein features ``ADT:<name>``, peaks
``ATAC:<name>``, plus ``<pad>`` and ``<cls>``; the modality vocabulary is ``<pad>, <cls>, <rna>, <adt>,
<atac>``. A cell's sequence is ``<cls>``, its expressed RNA features, its proteins, its accessible peaks;
every position carries its modality id (``mod_types``; ``<cls>`` has ``<cls>``, padding ``<pad>``), as
scGPT's ``tokenize_and_pad_batch(mod_type=...)`` does. Features a cell lacks, or a whole modality it
lacks, are simply not in its sequence.

**Values.** scGPT value bins (per cell, per modality; 0 reserved, expressed features in bins
``1..n_bins-1``) through :class:`scforge.tokenize.BinnedTokenizer`:

* RNA: ``normalize_total(1e4)`` + ``log1p``, then bins of the expressed selected genes (HVGs);
* protein: CLR, then bins. Binning is by per-cell quantiles, and CLR (``log1p(x)`` minus the cell's mean)
  is a per-cell monotone map, so the bins equal those of ``log1p`` counts; a zero count gets no token;
* ATAC: ``"binary"`` (each accessible peak gets value 1) or ``"bins"`` (bins of its counts).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from scforge.errors import CheckpointError, ConfigError, DependencyError, InputDataError
from scforge.genes import GeneVocab
from scforge.matrix import check_values, require_counts
from scforge.models.scgpt.multiomic import MultiOmicConfig, MultiOmicScGPTModel
from scforge.tokenize.ragged import TokenizedCells
from scforge.train.module import OptimConfig, TrainingModule
from scforge.train.objectives import masked_mse

logger = logging.getLogger("scforge")

FAMILY = "scgpt-multiomic"
OBSM_KEY = "X_scGPT_multiomic"
KINDS = ("rna", "adt", "atac")
PREFIX = {"rna": "", "adt": "ADT:", "atac": "ATAC:"}
MOD_TOKENS = ("<pad>", "<cls>", "<rna>", "<adt>", "<atac>")
MOD_ID = {tok: i for i, tok in enumerate(MOD_TOKENS)}
ALIASES = {"rna": "rna", "gex": "rna", "gene expression": "rna", "adt": "adt", "prot": "adt", "protein": "adt",
           "proteins": "adt", "atac": "atac", "peaks": "atac", "chromatin": "atac"}
ATAC_VALUES = ("binary", "bins")
PAD_VALUE, MASK_VALUE, CLS_VALUE = -2.0, -1.0, 0.0


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class Modality:
    """One modality of :class:`MultiOmicData`: raw counts ``[cells, features]`` (CSR, float32), the
    cells that have it (``present``; rows of absent cells are empty) and which features each cell's
    assay measured: ``panels [n_panels, features]`` with ``panel_of_cell [cells]`` (several panels when
    datasets with different protein panels or gene sets were concatenated)."""

    kind: str
    features: pd.Index
    counts: sp.csr_matrix
    present: np.ndarray
    panels: np.ndarray
    panel_of_cell: np.ndarray

    @property
    def shared(self) -> np.ndarray:
        """Features measured in every panel that has cells."""
        used = np.unique(self.panel_of_cell[self.present])
        return self.panels[used].all(axis=0) if used.size else np.zeros(len(self.features), dtype=bool)


class MultiOmicData:
    """Cells with several modalities (``rna``, ``adt``, ``atac``), raw counts each, cells aligned.

    Build with :meth:`from_cite_seq`, :meth:`from_mudata`, :meth:`from_modalities` or :meth:`concat`.
    ``obs`` holds the cells' annotations (index = cell names)."""

    def __init__(self, modalities: Mapping[str, Modality], obs: pd.DataFrame) -> None:
        if not modalities:
            raise InputDataError("MultiOmicData needs at least one modality")
        for kind, mod in modalities.items():
            if mod.counts.shape[0] != len(obs):
                raise InputDataError(f"modality {kind!r} has {mod.counts.shape[0]} rows for {len(obs)} cells")
        self.modalities = dict(modalities)
        self.obs = obs

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}: {len(m.features)} features in {int(m.present.sum())} cells"
                          for k, m in self.modalities.items())
        return f"MultiOmicData({self.n_obs} cells; {parts})"

    @property
    def n_obs(self) -> int:
        return len(self.obs)

    @property
    def obs_names(self) -> pd.Index:
        return self.obs.index

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(self.modalities)

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def from_modalities(cls, modalities: Mapping[str, Any], obs: pd.DataFrame | None = None) -> MultiOmicData:
        """From ``{kind or alias: AnnData}`` (raw counts in ``X``). Cells are matched by ``obs_names``:
        a cell missing from a modality lacks that modality. ``obs`` (e.g. MuData's) fixes the cells and
        their order; without it the cells are the union in order of appearance."""
        if not modalities:
            raise InputDataError("no modalities given; pass e.g. {'rna': adata_rna, 'atac': adata_atac}")
        kinds = {_kind(name): adata for name, adata in modalities.items()}
        if len(kinds) != len(modalities):
            raise InputDataError(f"modalities {list(modalities)} name the same kind twice; kinds are {KINDS}")
        names = {kind: pd.Index(a.obs_names.astype(str)) for kind, a in kinds.items()}
        for kind, idx in names.items():
            if not idx.is_unique:
                raise InputDataError(f"modality {kind!r} has duplicate cell names ({idx[idx.duplicated()][:3].tolist()}); "
                                     "make them unique (obs_names_make_unique) so cells can be matched")
        if obs is None:
            cells = pd.Index(pd.unique(np.concatenate([idx.to_numpy() for idx in names.values()])))
            obs = kinds[next(iter(kinds))].obs.reindex(cells).copy() if len(kinds) == 1 else pd.DataFrame(index=cells)
        obs = obs.copy()
        obs.index = obs.index.astype(str)
        for kind, idx in names.items():
            unknown = idx.difference(obs.index)
            if unknown.size:
                raise InputDataError(f"{unknown.size} cells of modality {kind!r} are not among the {len(obs)} cells "
                                     f"(e.g. {unknown[:3].tolist()}): the modalities' cells do not match. Use the "
                                     "same cell barcodes (obs_names) in every modality")
        if len(kinds) > 1:
            for kind, idx in names.items():
                others = set().union(*(set(names[k]) for k in names if k != kind))
                if not others.intersection(idx):
                    raise InputDataError(f"modality {kind!r} shares no cell with the other modalities: the cells do not "
                                         "match (different obs_names). Use the same cell barcodes in every modality")
        mods = {kind: _modality(kind, adata, names[kind], obs.index) for kind, adata in kinds.items()}
        return cls(mods, obs)

    @classmethod
    def from_cite_seq(cls, adata: Any, protein_key: str = "protein_expression", *,
                      protein_names: Sequence[str] | None = None, layer: str | None = None) -> MultiOmicData:
        """CITE-seq AnnData: RNA counts in ``X`` (or ``layer``), protein counts in ``obsm[protein_key]``
        as a DataFrame (columns = proteins) or an array with ``protein_names`` (default
        ``uns["protein_names"]``). A cell whose protein row is all NaN lacks the protein modality."""
        import anndata as ad

        if protein_key not in adata.obsm:
            raise InputDataError(f"adata.obsm has no {protein_key!r} (it has {list(adata.obsm)}); pass protein_key=")
        prot = adata.obsm[protein_key]
        if isinstance(prot, pd.DataFrame):  # AnnData guarantees its index is obs_names
            names, values = list(map(str, prot.columns)), prot.to_numpy(dtype=np.float64)
        else:
            values = prot.toarray() if sp.issparse(prot) else np.asarray(prot, dtype=np.float64)
            if protein_names is None:
                protein_names = adata.uns.get("protein_names")
            if protein_names is None:
                raise InputDataError(f"obsm[{protein_key!r}] is an array without names: pass protein_names= (or store "
                                     "them in uns['protein_names'])")
            names = [str(p) for p in protein_names]
        values = np.asarray(values, dtype=np.float64)
        if values.ndim != 2 or values.shape[0] != adata.n_obs or values.shape[1] != len(names):
            raise InputDataError(f"the protein matrix has shape {values.shape} but the AnnData has {adata.n_obs} cells "
                                 f"and {len(names)} protein names: it must be [cells, proteins]")
        measured = ~np.isnan(values).all(axis=1)
        if np.isnan(values[measured]).any():
            raise InputDataError("the protein matrix has NaN values inside measured cells; only whole rows may be NaN "
                                 "(a cell without protein data)")
        x = adata.layers[layer] if layer is not None else adata.X
        rna = ad.AnnData(X=x, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.astype(str)))
        adt = ad.AnnData(X=sp.csr_matrix(np.nan_to_num(values[measured]).astype(np.float32)),
                         obs=pd.DataFrame(index=adata.obs_names[measured].astype(str)),
                         var=pd.DataFrame(index=pd.Index(names)))
        return cls.from_modalities({"rna": rna, "adt": adt}, obs=adata.obs)

    @classmethod
    def from_mudata(cls, mdata: Any, modalities: Sequence[str] | Mapping[str, str] = ("rna", "atac")) -> MultiOmicData:
        """A MuData (or a path to ``.h5mu``, read with ``mudata``). ``modalities``: MuData keys whose kind
        is their name (``rna``, ``atac``, ``prot``/``adt``, ...) or ``{key: kind}``. Cells missing from a
        modality (MuData allows that) lack it."""
        if isinstance(mdata, (str, os.PathLike)):
            mdata = _read_h5mu(Path(mdata))
        mod = getattr(mdata, "mod", None)
        if mod is None:
            raise InputDataError(f"expected a MuData (with .mod) or a .h5mu path, got {type(mdata).__name__}")
        mapping = dict(modalities) if isinstance(modalities, Mapping) else {m: m for m in modalities}
        missing = [k for k in mapping if k not in mod]
        if missing:
            raise InputDataError(f"the MuData has no modality {missing} (it has {list(mod)}); pass modalities=")
        return cls.from_modalities({kind: mod[key] for key, kind in mapping.items()}, obs=mdata.obs)

    @classmethod
    def concat(cls, parts: Sequence[MultiOmicData], *, batch_key: str = "batch",
               names: Sequence[str] | None = None, index_unique: str | None = "-") -> MultiOmicData:
        """Cells of several datasets, one after the other, with ``obs[batch_key]`` naming each part.
        Features are the union per modality; each part keeps its own panel, so a protein that one
        dataset did not measure is known as unmeasured (not zero) for its cells. When cell names
        repeat across datasets, each becomes ``<name><index_unique><part name>`` (``None``: an error)."""
        if not parts:
            raise InputDataError("nothing to concatenate")
        names = [str(i) for i in range(len(parts))] if names is None else [str(n) for n in names]
        if len(names) != len(parts):
            raise ConfigError(f"{len(names)} names for {len(parts)} datasets")
        obs = pd.concat([p.obs.assign(**{batch_key: n}) for p, n in zip(parts, names)], axis=0)
        if not obs.index.is_unique:
            if index_unique is None:
                raise InputDataError("the datasets share cell names; make them unique first or pass index_unique='-'")
            obs.index = obs.index.astype(str) + index_unique + obs[batch_key].astype(str).to_numpy()
        obs[batch_key] = pd.Categorical(obs[batch_key], categories=names)
        kinds = list(dict.fromkeys(k for p in parts for k in p.kinds))
        mods = {kind: _concat_modality(kind, [p.modalities.get(kind) for p in parts], [p.n_obs for p in parts])
                for kind in kinds}
        return cls(mods, obs)


def _kind(name: str) -> str:
    kind = ALIASES.get(str(name).lower())
    if kind is None:
        raise ConfigError(f"unknown modality {name!r}; known kinds: {KINDS} (aliases: {sorted(ALIASES)}); pass "
                          "modalities={key: kind} to name it")
    return kind


def _modality(kind: str, adata: Any, names: pd.Index, cells: pd.Index) -> Modality:
    """A modality's counts aligned to ``cells`` (rows of cells without it stay empty)."""
    features = pd.Index(adata.var_names.astype(str))
    where = f"modality {kind!r}"
    if adata.n_vars == 0 or adata.n_obs == 0:
        raise InputDataError(f"{where} is empty ({adata.n_obs} cells x {adata.n_vars} features)")
    if not features.is_unique:
        raise InputDataError(f"{where} has duplicate feature names ({features[features.duplicated()][:3].tolist()}); "
                             "make them unique (var_names_make_unique)")
    x = sp.csr_matrix(adata.X, dtype=np.float32, copy=True)  # sum_duplicates works in place
    x.sum_duplicates()
    check_values(x, where)
    if kind in ("rna", "adt"):
        require_counts(x, where)
    if x.nnz == 0:
        raise InputDataError(f"{where} has only zeros: no feature was detected in any cell")
    rows = cells.get_indexer(names)
    out = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, np.arange(rows.size))),
                        shape=(len(cells), rows.size)) @ x
    present = np.zeros(len(cells), dtype=bool)
    present[rows] = True
    return Modality(kind, features, out.tocsr(), present, np.ones((1, len(features)), dtype=bool),
                    np.zeros(len(cells), dtype=np.int64))


def _concat_modality(kind: str, mods: list[Modality | None], sizes: list[int]) -> Modality:
    features = pd.Index(pd.unique(np.concatenate([m.features.to_numpy() for m in mods if m is not None])))
    blocks, present, panels, panel_of_cell = [], [], [], []
    for mod, n in zip(mods, sizes):
        if mod is None:
            blocks.append(sp.csr_matrix((n, len(features)), dtype=np.float32))
            present.append(np.zeros(n, dtype=bool))
            panel_of_cell.append(np.full(n, len(panels)))
            panels.append(np.zeros(len(features), dtype=bool))
            continue
        cols = features.get_indexer(mod.features)
        remap = sp.csr_matrix((np.ones(cols.size, dtype=np.float32), (np.arange(cols.size), cols)),
                              shape=(cols.size, len(features)))
        blocks.append((mod.counts @ remap).tocsr())
        present.append(mod.present)
        wide = np.zeros((mod.panels.shape[0], len(features)), dtype=bool)
        wide[:, cols] = mod.panels
        panel_of_cell.append(mod.panel_of_cell + len(panels))
        panels.extend(wide)
    return Modality(kind, features, sp.vstack(blocks).tocsr(), np.concatenate(present), np.stack(panels),
                    np.concatenate(panel_of_cell))


def _read_h5mu(path: Path) -> Any:
    if not path.is_file():
        raise InputDataError(f"{path} does not exist (expected a .h5mu file)")
    try:
        import mudata
    except ImportError as exc:
        raise DependencyError("reading .h5mu files needs the `mudata` package: pip install mudata") from exc
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "not created by muon/mudata", pull_on_update notices
        return mudata.read_h5mu(path)


# ---- vocabulary and tokens ----------------------------------------------------------------------
@dataclass
class MultiOmicVocab:
    """The joint feature vocabulary and the per-modality feature lists it was built from.

    ``features``: :class:`GeneVocab` (``<pad>``, ``<cls>``, then each modality's tokens, namespaced by
    :data:`PREFIX`); ``per_modality``: ``{kind: [feature names as in the data]}``; ``mod_of_token``:
    the modality id (:data:`MOD_TOKENS`) of every vocabulary id."""

    per_modality: dict[str, list[str]]
    features: GeneVocab = field(init=False)
    mod_of_token: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.per_modality if k not in KINDS]
        if unknown:
            raise ConfigError(f"unknown modality kinds {unknown}; kinds are {KINDS}")
        tokens = ["<pad>", "<cls>"]
        mods = [MOD_ID["<pad>"], MOD_ID["<cls>"]]
        for kind, feats in self.per_modality.items():
            tokens += [PREFIX[kind] + f for f in feats]
            mods += [MOD_ID[f"<{kind}>"]] * len(feats)
        self.features = GeneVocab(tokens, {"pad": "<pad>", "cls": "<cls>"}, name="multi-omic features")
        self.mod_of_token = np.asarray(mods, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.features)

    def token(self, kind: str, feature: str) -> str:
        """The vocabulary token of a modality's feature (``ADT:CD3``, ``ATAC:chr1:100-200``, ``CD3E``)."""
        return PREFIX[kind] + feature

    @classmethod
    def build(cls, data: MultiOmicData, *, n_hvg: int | None = 1200, n_top_peaks: int | None = None,
              hvg_batch_key: str | None = None) -> MultiOmicVocab:
        """Features of ``data``: RNA highly variable genes (``seurat_v3`` on counts, among genes every
        dataset measured; ``n_hvg=None``: all such genes), every protein of any panel, the
        ``n_top_peaks`` most often accessible peaks (None: all)."""
        per: dict[str, list[str]] = {}
        for kind, mod in data.modalities.items():
            if kind == "rna":
                per[kind] = _hvgs(data, mod, n_hvg, hvg_batch_key)
            elif kind == "atac" and n_top_peaks is not None and n_top_peaks < len(mod.features):
                freq = np.asarray((mod.counts > 0).sum(axis=0)).ravel()
                keep = np.sort(np.argsort(-freq, kind="stable")[:n_top_peaks])
                per[kind] = mod.features[keep].tolist()
            else:
                per[kind] = mod.features.tolist()
        return cls(per)


def _hvgs(data: MultiOmicData, mod: Modality, n_hvg: int | None, batch_key: str | None) -> list[str]:
    import anndata as ad

    from scforge.tokenize import select_hvg

    shared = mod.shared
    genes = mod.features[shared]
    if n_hvg is None or n_hvg >= genes.size:
        return genes.tolist()
    rows = np.flatnonzero(mod.present)
    obs = data.obs.iloc[rows][[batch_key]] if batch_key is not None else None
    sub = ad.AnnData(X=mod.counts[rows][:, np.flatnonzero(shared)], obs=obs, var=pd.DataFrame(index=genes))
    return select_hvg(sub, n_hvg, flavor="seurat_v3", batch_key=batch_key)


def tokenize(data: MultiOmicData, vocab: MultiOmicVocab, *, n_bins: int = 51, atac_values: str = "binary",
             seed: int = 0) -> TokenizedCells:
    """Every cell's tokens: ``<cls>`` (value 0), then per modality its expressed vocabulary features with
    their value bins (module docstring). Modalities in the vocabulary but not in ``data`` are absent."""
    from scforge.tokenize import BinnedTokenizer

    if atac_values not in ATAC_VALUES:
        raise ConfigError(f"atac_values={atac_values!r}; choose one of {ATAC_VALUES}")
    kinds = [k for k in vocab.per_modality if k in data.modalities]
    if not kinds:
        raise InputDataError(f"the data has modalities {data.kinds}; the model knows {list(vocab.per_modality)}: "
                             "nothing in common")
    parts = []
    for kind in kinds:
        mod = data.modalities[kind]
        rows = np.flatnonzero(mod.present)
        tokens = pd.Index([vocab.token(kind, f) for f in mod.features])
        known = tokens.isin(vocab.features.tokens)
        if kind == "atac" and atac_values == "binary":
            parts.append(_binary_tokens(mod.counts[rows][:, np.flatnonzero(known)],
                                        vocab.features.lookup(tokens[known].tolist()), rows, data.n_obs))
            continue
        tok = BinnedTokenizer(vocab.features, n_bins=n_bins, normalize_total=1e4 if kind == "rna" else None,
                              log1p=kind != "atac", append_cls=False, seed=seed, pad_value=PAD_VALUE,
                              mask_value=MASK_VALUE, species="human", use_synonyms=False)
        sub = _anndata(mod.counts[rows][:, np.flatnonzero(known)], tokens[known])
        parts.append(_scatter(tok.tokenize(sub), rows, data.n_obs))
    return _join(parts, data.obs_names, vocab, n_bins, atac_values, seed)


def _anndata(x: sp.csr_matrix, var_names: pd.Index) -> Any:
    import anndata as ad

    return ad.AnnData(X=sp.csr_matrix(x, dtype=np.float32), var=pd.DataFrame(index=var_names.astype(str)))


def _binary_tokens(x: sp.csr_matrix, ids: np.ndarray, rows: np.ndarray, n_cells: int) -> tuple:
    x = sp.csr_matrix(x)
    x.eliminate_zeros()
    x.sort_indices()
    lengths = np.zeros(n_cells, dtype=np.int64)
    lengths[rows] = np.diff(x.indptr)
    return lengths, ids[x.indices].astype(np.int64), np.ones(x.nnz, dtype=np.float32)


def _scatter(cells: TokenizedCells, rows: np.ndarray, n_cells: int) -> tuple:
    lengths = np.zeros(n_cells, dtype=np.int64)
    lengths[rows] = cells.lengths
    return lengths, cells.gene_ids.astype(np.int64), cells.values.astype(np.float32)


def _join(parts: list[tuple], obs_names: pd.Index, vocab: MultiOmicVocab, n_bins: int, atac_values: str,
          seed: int) -> TokenizedCells:
    """``<cls>`` + each modality's tokens, per cell, into one ragged array (no Python loop over cells)."""
    n = len(obs_names)
    lengths = np.stack([p[0] for p in parts])  # [modalities, cells]
    total = 1 + lengths.sum(axis=0)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(total, out=offsets[1:])
    genes = np.empty(int(offsets[-1]), dtype=np.int64)
    values = np.empty(int(offsets[-1]), dtype=np.float32)
    genes[offsets[:-1]] = vocab.features.special_id("cls")
    values[offsets[:-1]] = CLS_VALUE
    start = offsets[:-1] + 1
    for (lens, ids, vals) in parts:
        within = np.arange(ids.size, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        dest = np.repeat(start, lens) + within
        genes[dest], values[dest] = ids, vals
        start = start + lens
    meta = {"tokenizer": "scgpt-multiomic", "n_bins": n_bins, "atac_values": atac_values, "seed": seed,
            "pad_id": vocab.features.special_id("pad"), "pad_value": PAD_VALUE, "mask_value": MASK_VALUE}
    return TokenizedCells(offsets=offsets, gene_ids=genes, values=values, obs_names=np.asarray(obs_names), meta=meta)


def pad_batch(cells: TokenizedCells, idx: np.ndarray, vocab: MultiOmicVocab) -> dict[str, torch.Tensor]:
    """Padded ``genes``, ``values``, ``padding_mask`` and ``mod_types`` of the cells ``idx``."""
    batch = cells.pad(idx, pad_id=vocab.features.special_id("pad"), pad_value=PAD_VALUE)
    batch["mod_types"] = torch.from_numpy(vocab.mod_of_token[batch["genes"].numpy()])
    return batch


# ---- training -----------------------------------------------------------------------------------
class MultiOmicTraining(TrainingModule):
    """scGPT's multi-omic objectives: GEP (masked value MSE) + GEPC/MVC, plus DAR when the model has the
    batch discriminator (``dar_weight`` x cross-entropy through gradient reversal)."""

    def __init__(self, model: MultiOmicScGPTModel, optim: OptimConfig, dar_weight: float = 1.0) -> None:
        super().__init__(model, optim)
        self.dar_weight = dar_weight

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.model.config
        out = self.model(batch["genes"], batch["values"], batch["padding_mask"],
                         batch.get("batch_labels") if c.use_batch_labels else None,
                         mod_types=batch["mod_types"] if c.use_mod else None, MVC=c.do_mvc)
        losses = {"gep": masked_mse(out["mlm_output"], batch["target"], batch["predict"])}
        if c.do_mvc:
            losses["mvc"] = masked_mse(out["mvc_output"], batch["target"], batch["predict"])
        if c.do_dab:
            losses["dar"] = self.dar_weight * torch.nn.functional.cross_entropy(out["dab_output"].float(),
                                                                                batch["batch_labels"])
        return sum(losses.values()), losses


class _Collate:
    """Padded, masked minibatches; masking drawn from a generator seeded per (seed, epoch, batch)."""

    def __init__(self, cells: TokenizedCells, vocab: MultiOmicVocab, batch_codes: np.ndarray | None,
                 mask_ratio: float, seed: int) -> None:
        self.cells, self.vocab, self.batch_codes = cells, vocab, batch_codes
        self.mask_ratio, self.seed = mask_ratio, seed

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
        from scforge.tokenize import mask_values
        from scforge.train.data import batch_seed

        epoch = items[0][0]
        idx = np.array([i for _, i in items], dtype=np.int64)
        batch = pad_batch(self.cells, idx, self.vocab)
        gen = torch.Generator().manual_seed(batch_seed(self.seed, epoch, int(idx[0]), idx.size))
        masked, predict = mask_values(batch["values"], mask_ratio=self.mask_ratio, mask_value=MASK_VALUE,
                                      pad_value=PAD_VALUE, keep_first=1, generator=gen)
        batch.update(target=batch["values"], values=masked, predict=predict, cells=torch.from_numpy(idx))
        if self.batch_codes is not None:
            batch["batch_labels"] = torch.from_numpy(self.batch_codes[idx])
        return batch


# ---- the user-facing model ----------------------------------------------------------------------
class MultiOmicModel:
    """scGPT's multi-omic model with its vocabulary and tokenization settings.

    ``batches``: the batch categories the model's batch embedding and discriminator know (``None``:
    the model has neither)."""

    family = FAMILY

    def __init__(self, module: MultiOmicScGPTModel, vocab: MultiOmicVocab, *, n_bins: int = 51,
                 atac_values: str = "binary", batch_key: str | None = None,
                 batches: Sequence[str] | None = None, source: str | None = None) -> None:
        if len(vocab) != module.config.vocab_size:
            raise ConfigError(f"vocabulary has {len(vocab)} tokens but the model expects {module.config.vocab_size}")
        self.module, self.vocab, self.n_bins, self.atac_values = module, vocab, n_bins, atac_values
        self.batch_key, self.batches = batch_key, None if batches is None else [str(b) for b in batches]
        self.source = source
        self.history: dict[str, float] = {}

    @property
    def config(self) -> MultiOmicConfig:
        return self.module.config

    def __repr__(self) -> str:
        c = self.config
        feats = ", ".join(f"{k} {len(v)}" for k, v in self.vocab.per_modality.items())
        return f"MultiOmicModel({c.n_layers} layers x {c.d_model}; features: {feats}; from {self.source or 'new'})"

    @classmethod
    def new(cls, data: MultiOmicData, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 4,
            d_hid: int | None = None, dropout: float = 0.2, n_hvg: int | None = 1200,
            n_top_peaks: int | None = None, n_bins: int = 51, atac_values: str = "binary",
            batch_key: str | None = None, seed: int = 0) -> MultiOmicModel:
        """A randomly initialised model whose vocabulary comes from ``data`` (:meth:`MultiOmicVocab.build`).
        ``batch_key`` (a column of ``data.obs``) adds the batch embedding and the DAR discriminator, as
        scGPT's multi-omic tutorial (``use_batch_labels``, ``DAR``)."""
        if atac_values not in ATAC_VALUES:
            raise ConfigError(f"atac_values={atac_values!r}; choose one of {ATAC_VALUES}")
        batches = None
        if batch_key is not None:
            batches = _batch_categories(data, batch_key)
        vocab = MultiOmicVocab.build(data, n_hvg=n_hvg, n_top_peaks=n_top_peaks, hvg_batch_key=batch_key)
        torch.manual_seed(seed)
        config = MultiOmicConfig(
            vocab_size=len(vocab), pad_token_id=vocab.features.special_id("pad"), d_model=d_model, n_heads=n_heads,
            d_hid=d_hid or d_model, n_layers=n_layers, dropout=dropout, n_bins=n_bins, do_mvc=True,
            use_batch_labels=batches is not None, do_dab=batches is not None,
            num_batch_labels=len(batches) if batches else None, n_mod_tokens=len(MOD_TOKENS),
            mod_pad_id=MOD_ID["<pad>"], pad_value=PAD_VALUE, mask_value=MASK_VALUE)
        return cls(MultiOmicScGPTModel(config), vocab, n_bins=n_bins, atac_values=atac_values, batch_key=batch_key,
                   batches=batches)

    def tokenize(self, data: MultiOmicData, *, seed: int = 0) -> TokenizedCells:
        """The model's tokens of ``data`` (features outside the vocabulary are left out)."""
        cells = tokenize(data, self.vocab, n_bins=self.n_bins, atac_values=self.atac_values, seed=seed)
        logger.info("multi-omic tokens: %d cells, %.0f tokens per cell on average (max %d)", cells.n_cells,
                    float(cells.lengths.mean()), int(cells.lengths.max()))
        return cells

    def fit(self, data: MultiOmicData, *, epochs: int = 10, batch_size: int = 32, lr: float = 1e-3,
            mask_ratio: float = 0.4, batch_key: str | None = None, dar_weight: float = 1.0, gamma: float = 0.9,
            seed: int = 0, precision: str = "auto", device: str = "auto", progress: bool = False) -> MultiOmicModel:
        """Train on every cell of ``data`` with GEP + MVC (and DAR when the model was built with a
        ``batch_key``): ``mask_ratio`` of each cell's values (not ``<cls>``) masked, Adam, StepLR x
        ``gamma`` per epoch, gradient clipping at 1. ``batch_key`` defaults to the model's. Returns
        ``self``; the last epoch's losses are in :attr:`history`."""
        from scforge.train import TrainConfig
        from scforge.train.engine import fit_module

        if not 0.0 < mask_ratio < 1.0:
            raise ConfigError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        batch_key = batch_key or self.batch_key
        codes = None
        if batch_key is not None:
            if self.batches is None:
                raise ConfigError(f"batch_key={batch_key!r} but this model has no batch embedding / discriminator; "
                                  "build it with MultiOmicModel.new(data, batch_key=...) to use batch labels")
            codes = self._batch_codes(data, batch_key)
        cells = self.tokenize(data, seed=seed)
        collate = _Collate(cells, self.vocab, codes, mask_ratio, seed)
        steps = -(-cells.n_cells // batch_size)
        optim = OptimConfig(lr=lr, weight_decay=0.0, schedule="step", gamma=gamma, step_every=steps)
        with tempfile.TemporaryDirectory(prefix="scforge-multiomic-") as tmp:
            cfg = TrainConfig(max_epochs=epochs, batch_size=batch_size, grad_clip=1.0, precision=precision,
                              accelerator="cpu" if str(device) == "cpu" else "auto", seed=seed, val_fraction=0.0,
                              log_dir=tmp, progress=progress)
            result = fit_module(MultiOmicTraining(self.module, optim, dar_weight), collate, cells.n_cells, config=cfg)
        self.module = result.module.model.eval()
        self.history = {k: v for k, v in result.metrics.items() if k.startswith("train/")}
        return self

    def _batch_codes(self, data: MultiOmicData, batch_key: str) -> np.ndarray:
        if batch_key not in data.obs:
            raise InputDataError(f"obs has no column {batch_key!r} (it has {list(data.obs.columns)})")
        labels = data.obs[batch_key].astype(str).to_numpy()
        unknown = sorted(set(labels) - set(self.batches))
        if unknown:
            raise InputDataError(f"batches {unknown[:5]} are not among the model's {self.batches}")
        return pd.Index(self.batches).get_indexer(labels).astype(np.int64)

    @torch.no_grad()
    def embed(self, data: MultiOmicData, *, batch_size: int = 64, return_adata: bool = False, seed: int = 0,
              device: str = "auto", precision: str = "auto") -> Any:
        """Cell embeddings ``[cells, d_model]`` (the ``<cls>`` output, L2-normalised). With
        ``return_adata`` a new AnnData (``obs`` copied from ``data``) holding them in
        ``obsm["X_scGPT_multiomic"]``; nothing of the caller's is changed."""
        from scforge.nn import autocast, resolve_device, resolve_precision

        cells = self.tokenize(data, seed=seed)
        dev = resolve_device(device)
        dtype = resolve_precision(precision, dev)
        module = self.module.to(dev).eval()
        out = np.empty((cells.n_cells, self.config.d_model), dtype=np.float32)
        order = np.argsort(cells.lengths, kind="stable")  # similar lengths together: less padding
        with autocast(dev, dtype):
            for i in range(0, order.size, batch_size):
                idx = order[i : i + batch_size]
                b = pad_batch(cells, idx, self.vocab)
                emb = module.cell_embeddings(b["genes"].to(dev), b["values"].to(dev), b["padding_mask"].to(dev))
                out[idx] = emb.float().cpu().numpy()
        if not return_adata:
            return out
        import anndata as ad

        adata = ad.AnnData(obs=data.obs.copy())
        adata.obsm[OBSM_KEY] = out
        adata.uns["scforge"] = {"model": FAMILY, "obsm_key": OBSM_KEY, "source": self.source or "new"}
        return adata

    # ---- folder format -----------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """scforge's folder (``config.json`` with the model config and the per-modality features,
        ``model.safetensors``, ``vocab.json`` = the joint feature vocabulary, ``card.md``)."""
        from scforge.hub import save_model_folder

        config = {"model": self.config.to_dict(), "per_modality": self.vocab.per_modality, "n_bins": self.n_bins,
                  "atac_values": self.atac_values, "batch_key": self.batch_key, "batches": self.batches}
        feats = "\n".join(f"- {k}: {len(v)} features" for k, v in self.vocab.per_modality.items())
        card = (f"# scGPT multi-omic model\n\n{feats}\n- {self.config.n_layers} layers x {self.config.d_model}\n"
                f"- batches: {self.batches or 'none'}\n")
        return save_model_folder(path, family=FAMILY, config=config, state_dict=self.module.state_dict(),
                                 vocab=self.vocab.features, card=card, overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike) -> MultiOmicModel:
        """Load a folder written by :meth:`save` (checksums verified, no pickle)."""
        from scforge.hub import load_model_folder

        folder = load_model_folder(path)
        if folder.family != FAMILY:
            raise CheckpointError(f"{path} holds a {folder.family!r} model, not a multi-omic scGPT model")
        cfg = folder.config
        missing = [k for k in ("model", "per_modality") if k not in cfg]
        if missing:
            raise CheckpointError(f"{path}/config.json lacks {missing}; it was not written by MultiOmicModel.save")
        vocab = MultiOmicVocab({k: list(v) for k, v in cfg["per_modality"].items()})
        if vocab.features.tokens != folder.vocab.tokens:
            raise CheckpointError(f"{path}: vocab.json does not match the per-modality features in config.json")
        module = MultiOmicScGPTModel(MultiOmicConfig.from_dict(cfg["model"]))
        module.load_state_dict(folder.state_dict, strict=True)
        return cls(module.eval(), vocab, n_bins=int(cfg.get("n_bins", 51)),
                   atac_values=cfg.get("atac_values", "binary"), batch_key=cfg.get("batch_key"),
                   batches=cfg.get("batches"), source=str(path))

    from_folder = load  # what scforge.load() calls for this family


def _batch_categories(data: MultiOmicData, batch_key: str) -> list[str]:
    if batch_key not in data.obs:
        raise InputDataError(f"obs has no column {batch_key!r} (it has {list(data.obs.columns)})")
    col = data.obs[batch_key]
    if col.isna().any():
        raise InputDataError(f"obs[{batch_key!r}] has missing values; every cell needs a batch")
    cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else pd.unique(col.astype(str))
    return [str(c) for c in cats]


__all__ = ["MOD_TOKENS", "Modality", "MultiOmicData", "MultiOmicModel", "MultiOmicTraining", "MultiOmicVocab",
           "OBSM_KEY", "pad_batch", "tokenize"]
