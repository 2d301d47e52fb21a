"""Perturbation experiments: GEARS ``perturb_processed.h5ad`` files and any h5ad with a perturbation column.

:class:`PerturbationData` wraps the caller's AnnData (never modified) and answers what models, baselines
and metrics need: the cells of each ``(condition, context)`` group and of each context's controls,
pseudobulk :class:`~scforge.data.profiles.PerturbationProfiles`, differentially expressed genes with
GEARS' semantics (read from ``uns`` when the file has them, else computed like GEARS does), the GEARS
``simulation`` split and a plain held-out split, and GEARS-style random control pairing.

GEARS facts followed here (snap-stanford/GEARS ``data_utils.py``): DE genes are
``sc.tl.rank_genes_groups(groupby=condition_name, reference=<cell_type>_ctrl_1, rankby_abs=True,
n_genes=n_vars)`` (t-test on X); the "non-dropout" top 20 keeps genes non-zero in the perturbation mean
or zero in both the perturbation and control means; the ``simulation`` split draws train genes with
``np.random.choice`` on the sorted unique genes after ``np.random.seed(seed)``.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from scforge.data.profiles import Group, PerturbationProfiles
from scforge.errors import ConfigError, GeneIdentityError, InputDataError

logger = logging.getLogger("scforge")

GEARS_FILE = "perturb_processed.h5ad"
RANKING_KEY = "rank_genes_groups_cov_all"
STORED_TOP_KEYS = {"non_dropout": "top_non_dropout_de_20", "non_zero": "top_non_zero_de_20"}
DEKind = Literal["de", "non_dropout", "non_zero"]
_CHUNK = 8192
_RAW_COUNT_MAX = 50.0


def condition_genes(condition: str, control: str = "ctrl") -> tuple[str, ...]:
    """Genes perturbed by a GEARS-style condition: ``"ctrl"`` -> ``()``, ``"A+ctrl"`` -> ``("A",)``,
    ``"A+B"`` -> ``("A", "B")``."""
    if not isinstance(condition, str) or not condition:
        raise InputDataError(f"condition {condition!r} is not a non-empty string; expected 'ctrl', 'A+ctrl' or 'A+B'")
    if condition == control:
        return ()
    parts = condition.split("+")
    if any(not p or p != p.strip() for p in parts):
        raise InputDataError(f"condition {condition!r} has an empty or space-padded part; expected {control!r}, "
                             f"'A+{control}', '{control}+A' or 'A+B' (gene symbols joined by '+')")
    genes = tuple(p for p in parts if p != control)
    if not genes or len(set(genes)) != len(genes):
        raise InputDataError(f"condition {condition!r} names no gene or repeats one; expected 'A+{control}' or 'A+B' "
                             "with distinct genes (pass perturbation_genes= to say which genes it perturbs)")
    return genes


def column_means(matrix: Any, rows: np.ndarray | None = None) -> np.ndarray:
    """Float64 column means of ``matrix`` over ``rows`` (all rows if None), read in row chunks."""
    n_obs = matrix.shape[0]
    rows = np.arange(n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    return _set_means(matrix, [rows])[0]


def _set_means(matrix: Any, row_sets: Sequence[np.ndarray]) -> np.ndarray:
    """Column means of ``matrix`` over each row set (k x n_genes float64), never densifying ``matrix``:
    an indicator matrix times row chunks of ``matrix``."""
    n_obs, n_genes = matrix.shape
    sizes = np.array([len(r) for r in row_sets], dtype=np.float64)
    set_ids = np.repeat(np.arange(len(row_sets)), sizes.astype(np.int64))
    cells = np.concatenate([np.asarray(r, dtype=np.int64) for r in row_sets]) if row_sets else np.zeros(0, int)
    indicator = sp.csc_matrix((np.ones(cells.size), (set_ids, cells)), shape=(len(row_sets), n_obs))
    sums = np.zeros((len(row_sets), n_genes))
    used = np.unique(cells)
    for lo in range(0, n_obs, _CHUNK):
        hi = min(lo + _CHUNK, n_obs)
        if not np.any((used >= lo) & (used < hi)):
            continue
        part = indicator[:, lo:hi] @ matrix[lo:hi]
        sums += part.toarray() if sp.issparse(part) else np.asarray(part)
    with np.errstate(invalid="ignore", divide="ignore"):
        return sums / sizes[:, None]


def _dense(block: Any) -> np.ndarray:
    return block.toarray() if sp.issparse(block) else np.asarray(block)


def _values(block: Any) -> np.ndarray:
    """The stored values of a row block (sparse: the non-zeros)."""
    return np.asarray(block.data) if sp.issparse(block) else np.asarray(block).ravel()


def _obs_labels(obs: pd.DataFrame, key: str, where: str) -> np.ndarray:
    if key not in obs.columns:
        cols = ", ".join(map(repr, obs.columns[:20])) or "(none)"
        raise InputDataError(f"obs[{key!r}] is missing in {where}; obs columns: {cols}. "
                             "Pass the obs column that labels each cell's perturbation (or context).")
    column = obs[key]
    if column.isna().any():
        raise InputDataError(f"obs[{key!r}] of {where} has {int(column.isna().sum())} missing values; "
                             "label every cell (e.g. with the control label) or subset the AnnData first")
    return np.asarray(column.astype(str), dtype=object)


@dataclass(eq=False)
class PerturbationData:
    """A perturbation experiment over the caller's AnnData (read, never modified).

    Build one with :func:`read_gears` or :func:`from_anndata`. ``perturbation_genes`` maps each
    condition to its perturbed gene symbols (default parsed by :func:`condition_genes`);
    ``uns_keys`` maps a group to its key in ``uns['rank_genes_groups_cov_all']`` (GEARS'
    ``condition_name``; default the condition label)."""

    adata: Any
    condition_key: str
    control: str
    context_key: str | None = None
    layer: str | None = None
    gene_names: np.ndarray | None = None
    perturbation_genes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    uns_keys: dict[Group, str] = field(default_factory=dict)
    dropped_conditions: list[str] = field(default_factory=list)
    where: str = "the AnnData given"

    def __post_init__(self) -> None:
        obs = self.adata.obs
        self._labels = _obs_labels(obs, self.condition_key, self.where)
        self._context_labels = None if self.context_key is None else _obs_labels(obs, self.context_key, self.where)
        if self.layer is not None and self.layer not in self.adata.layers:
            raise InputDataError(f"layer {self.layer!r} is not in {self.where}; layers: {list(self.adata.layers)}. "
                                 "Pass layer=None to use X.")
        names = self.adata.var_names if self.gene_names is None else self.gene_names
        self.gene_names = np.asarray(names).astype(str)
        if self.gene_names.size != self.adata.n_vars:
            raise ConfigError(f"gene_names has {self.gene_names.size} entries; {self.where} has {self.adata.n_vars} genes")
        self._all_conditions = [c for c in pd.unique(self._labels) if c != self.control]
        self.perturbation_genes = self._complete_genes(self.perturbation_genes)
        frame = pd.DataFrame({"c": self._labels, "x": self._context_labels if self.context_key else ""})
        self._index = {(c, x if self.context_key else None): np.asarray(rows, dtype=np.int64)
                       for (c, x), rows in frame.groupby(["c", "x"], sort=False).indices.items()}
        self._rankings: dict[Group, np.ndarray] = {}
        self._var_index = pd.Index(np.asarray(self.adata.var_names).astype(str))
        self._symbol_index: dict[str, int] = {}
        for i, s in enumerate(self.gene_names):
            self._symbol_index.setdefault(s, i)

    def _complete_genes(self, given: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        unknown = [c for c in given if c not in self._all_conditions]
        if unknown:
            raise ConfigError(f"perturbation_genes names conditions {unknown[:10]} that are not in "
                              f"obs[{self.condition_key!r}]; known: {self._all_conditions[:10]}")
        out = {}
        for c in self._all_conditions:
            if c in given:
                value = given[c]
                out[c] = (value,) if isinstance(value, str) else tuple(str(g) for g in value)
            else:
                out[c] = condition_genes(c, self.control)
        return out

    # ----------------------------------------------------------------------------------- structure
    @property
    def conditions(self) -> list[str]:
        """Non-control condition labels in first-appearance order (dropped ones excluded)."""
        return [c for c in self._all_conditions if c not in self.dropped_conditions]

    @property
    def contexts(self) -> list[str | None]:
        return [None] if self._context_labels is None else list(pd.unique(self._context_labels))

    @property
    def n_cells(self) -> int:
        return int(self.adata.n_obs)

    @property
    def n_genes(self) -> int:
        return int(self.adata.n_vars)

    @property
    def groups(self) -> list[Group]:
        """``(condition, context)`` pairs with at least one cell (controls excluded)."""
        return [(c, x) for c in self.conditions for x in self.contexts if (c, x) in self._index]

    @property
    def matrix(self) -> Any:
        """The expression used: X or ``layers[layer]``."""
        return self.adata.X if self.layer is None else self.adata.layers[self.layer]

    def _check_context(self, context: str | None) -> None:
        if context is not None and context not in self.contexts:
            raise ConfigError(f"context {context!r} is not in obs[{self.context_key!r}]; contexts: {self.contexts[:10]}")

    def _rows(self, label: str, context: str | None) -> np.ndarray:
        self._check_context(context)
        if context is not None or self.context_key is None:
            return self._index.get((label, context), np.zeros(0, dtype=np.int64))
        parts = [self._index[(label, x)] for x in self.contexts if (label, x) in self._index]
        return np.sort(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    def cells(self, condition: str, context: str | None = None) -> np.ndarray:
        """Row indices of the cells of ``condition`` (in ``context``; all contexts when None)."""
        if condition not in self.conditions:
            raise ConfigError(f"unknown condition {condition!r}; conditions: {self.conditions[:10]} "
                              f"(control cells: control_cells())")
        return self._rows(condition, context)

    def control_cells(self, context: str | None = None) -> np.ndarray:
        """Row indices of the control cells (of ``context``; all contexts when None)."""
        return self._rows(self.control, context)

    def _group(self, condition: str, context: str | None) -> Group:
        """The group of ``condition`` in ``context``; with one context holding it, context may be None."""
        if condition not in self.conditions:
            raise ConfigError(f"unknown condition {condition!r}; conditions: {self.conditions[:10]}")
        self._check_context(context)
        if context is None and self.context_key is not None:
            holding = [x for x in self.contexts if (condition, x) in self._index]
            if len(holding) != 1:
                raise ConfigError(f"condition {condition!r} occurs in contexts {holding}; pass context=")
            context = holding[0]
        if (condition, context) not in self._index:
            raise ConfigError(f"condition {condition!r} has no cells in context {context!r}")
        return condition, context

    def expression(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Dense float32 expression of ``rows`` (of X or the layer)."""
        rows = np.asarray(rows, dtype=np.int64)
        return _dense(self.matrix[rows]).astype(np.float32, copy=False)

    # ------------------------------------------------------------------------------------ profiles
    def profiles(self, groups: Iterable[Group] | None = None) -> PerturbationProfiles:
        """Mean profile of each group and of each context's controls (all controls without contexts)."""
        groups = self.groups if groups is None else [self._group(*g) for g in groups]
        contexts = [x for x in self.contexts if self.control_cells(x).size]
        sets = [self._index[g] for g in groups] + [self.control_cells(x) for x in contexts]
        means = _set_means(self.matrix, sets)
        n_cells = {g: int(self._index[g].size) for g in groups}
        n_cells.update({("ctrl", x): int(self.control_cells(x).size) for x in contexts})
        return PerturbationProfiles(
            self.gene_names, {g: means[i] for i, g in enumerate(groups)},
            {x: means[len(groups) + i] for i, x in enumerate(contexts)},
            {c: self.perturbation_genes[c] for c in self.conditions}, n_cells)

    # ------------------------------------------------------------------------------------ genes
    def gene_positions(self, symbols: Iterable[str], *, condition: str | None = None) -> np.ndarray:
        """Positions of gene ``symbols`` in ``gene_names`` (first occurrence); InputDataError naming any absent."""
        symbols = [str(s) for s in symbols]
        absent = [s for s in symbols if s not in self._symbol_index]
        if absent:
            owner = f"condition {condition!r} perturbs" if condition is not None else "genes"
            raise InputDataError(f"{owner} {absent} not among the {self.n_genes} measured genes of {self.where}. "
                                 "Filter those cells out, read with strict=False to drop such conditions, or pass "
                                 "perturbation_genes= naming measured genes.")
        return np.array([self._symbol_index[s] for s in symbols], dtype=np.int64)

    def _unmeasured(self) -> dict[str, list[str]]:
        out = {}
        for c in self.conditions:
            missing = [g for g in self.perturbation_genes[c] if g not in self._symbol_index]
            if missing:
                out[c] = missing
        return out

    def check_conditions(self) -> None:
        """Raise one InputDataError listing every condition whose perturbed genes are not measured."""
        problems = self._unmeasured()
        if not problems:
            return
        listed = "; ".join(f"{c!r} -> {', '.join(g)}" for c, g in list(problems.items())[:20])
        more = f" (and {len(problems) - 20} more)" if len(problems) > 20 else ""
        raise InputDataError(
            f"{len(problems)} condition(s) of obs[{self.condition_key!r}] in {self.where} perturb genes that are not "
            f"among its {self.n_genes} measured genes: {listed}{more}. Fix: filter those cells out, read with "
            "strict=False to drop these conditions, or pass perturbation_genes={condition: (measured symbols)} "
            "(e.g. {'STIM': ('IFNB1',)}, or () for a stimulus without a gene).")

    def _drop_unmeasured(self) -> None:
        problems = self._unmeasured()
        if problems:
            logger.warning("dropping %d condition(s) whose perturbed genes are not measured: %s",
                           len(problems), ", ".join(f"{c} ({'/'.join(g)})" for c, g in problems.items()))
            self.dropped_conditions = [*self.dropped_conditions, *problems]
            self.perturbation_genes = {c: g for c, g in self.perturbation_genes.items() if c not in problems}

    # ------------------------------------------------------------------------------------ DE genes
    def de_ranking(self, condition: str, context: str | None = None) -> np.ndarray:
        """All gene positions ranked by |t| against the context's controls (``uns`` ranking when present)."""
        group = self._group(condition, context)
        stored = self._stored(RANKING_KEY, group)
        if stored is not None:
            return stored
        if group not in self._rankings:
            same = [g for g in self.groups if g[1] == group[1] and g not in self._rankings
                    and self._index[g].size >= 2 and self._stored(RANKING_KEY, g) is None]
            self._rankings.update(rank_de_genes(self, list(dict.fromkeys([group, *same]))))
        return self._rankings[group]

    def de_genes(self, condition: str, context: str | None = None, n: int = 20, kind: DEKind = "de") -> np.ndarray:
        """Positions of the top ``n`` DE genes of a group, GEARS semantics (``kind``: "de", "non_dropout",
        "non_zero"); read from ``uns`` (``rank_genes_groups_cov_all``, ``top_*_de_20``) when present."""
        if kind not in ("de", *STORED_TOP_KEYS):
            raise ConfigError(f"kind must be 'de', 'non_dropout' or 'non_zero'; got {kind!r}")
        if n < 1:
            raise ConfigError(f"n must be >= 1; got {n}")
        group = self._group(condition, context)
        if kind != "de":
            stored = self._stored(STORED_TOP_KEYS[kind], group)
            if stored is not None and n <= stored.size:
                return stored[:n]
        ranking = self.de_ranking(*group)
        if kind == "de":
            return ranking[:n]
        prof = self.profiles([group])
        return top_de_genes(ranking, prof.means[group], prof.control_mean(group[1]), n=n, kind=kind)

    def _stored(self, uns_key: str, group: Group) -> np.ndarray | None:
        """Gene positions stored in ``uns[uns_key]`` for ``group``, or None."""
        table = self.adata.uns.get(uns_key)
        key = self.uns_keys.get(group, group[0])
        if not isinstance(table, Mapping) or key not in table:
            return None
        names = np.asarray(table[key]).astype(str)
        pos = self._var_index.get_indexer(names)
        missing = pos < 0
        if missing.any():
            pos[missing] = [self._symbol_index.get(s, -1) for s in names[missing]]
        if (pos < 0).any():
            raise InputDataError(f"uns[{uns_key!r}][{key!r}] of {self.where} names genes that are neither var_names "
                                 f"nor gene symbols (e.g. {names[pos < 0][:3].tolist()}); remove the stale uns entry "
                                 "so rankings are recomputed")
        return pos.astype(np.int64)

    # ------------------------------------------------------------------------------------ checks
    def _validate(self) -> None:
        """Controls present (in each context with perturbed cells) and non-negative, log-scale values."""
        is_ctrl = self._labels == self.control
        if not is_ctrl.any():
            seen = ", ".join(map(repr, pd.unique(self._labels)[:10]))
            raise InputDataError(f"no control cells labelled {self.control!r} in obs[{self.condition_key!r}] of "
                                 f"{self.where} (labels: {seen}); pass the control label used there")
        if self._context_labels is not None:
            without = sorted(set(self._context_labels[~is_ctrl]) - set(self._context_labels[is_ctrl]))
            if without:
                raise InputDataError(f"contexts {without[:10]} of obs[{self.context_key!r}] have perturbed cells but "
                                     f"no {self.control!r} controls; add controls, remove those cells, or pass "
                                     "context_key=None to pool the controls of all contexts")
        _check_log_scale(self.matrix, self.where if self.layer is None else f"layer {self.layer!r} of {self.where}")


def _check_log_scale(matrix: Any, where: str) -> None:
    vmin, vmax, integer = np.inf, -np.inf, True
    for lo in range(0, matrix.shape[0], _CHUNK):
        vals = _values(matrix[lo:lo + _CHUNK])
        if vals.size == 0:
            continue
        if not np.isfinite(vals).all():
            raise InputDataError(f"expression in {where} has NaN or infinite values (rows {lo}..); clean them first")
        vmin, vmax = min(vmin, float(vals.min())), max(vmax, float(vals.max()))
        integer = integer and bool(np.all(vals == np.round(vals)))
    if vmin < 0:
        raise InputDataError(f"expression in {where} has negative values (min {vmin:.3g}); perturbation data must be "
                             "non-negative log1p-normalised expression: pass layer= naming such a layer")
    if integer and vmax > _RAW_COUNT_MAX:
        raise InputDataError(f"expression in {where} looks like raw counts (integers up to {vmax:.0f}); "
                             "log-normalise it (sc.pp.normalize_total + sc.pp.log1p on a copy) or pass layer= "
                             "naming a log-normalised layer")


def top_de_genes(ranking: np.ndarray, pert_mean: np.ndarray, control_mean: np.ndarray, *, n: int = 20,
                 kind: DEKind = "de") -> np.ndarray:
    """The first ``n`` of a DE ``ranking`` (gene positions), GEARS filters: "non_zero" keeps genes whose
    perturbation mean is non-zero; "non_dropout" also keeps genes zero in both perturbation and control means."""
    ranking = np.asarray(ranking, dtype=np.int64)
    if kind == "de":
        return ranking[:n]
    pert_mean, control_mean = np.asarray(pert_mean), np.asarray(control_mean)
    keep = pert_mean != 0
    if kind == "non_dropout":
        keep = keep | ((pert_mean == 0) & (control_mean == 0))
    elif kind != "non_zero":
        raise ConfigError(f"kind must be 'de', 'non_dropout' or 'non_zero'; got {kind!r}")
    return ranking[keep[ranking]][:n]


def rank_de_genes(data: PerturbationData, groups: Iterable[Group] | None = None) -> dict[Group, np.ndarray]:
    """Every gene ranked for each group against its context's controls, as GEARS does:
    ``sc.tl.rank_genes_groups(reference=<ctrl>, rankby_abs=True, n_genes=n_vars, method="t-test")`` on the
    expression used, run on a private AnnData holding only the needed rows. Returns gene positions."""
    groups = data.groups if groups is None else [data._group(*g) for g in groups]
    small = [g for g in groups if data._index[g].size < 2]
    if small:
        raise InputDataError(f"groups {small[:10]} have fewer than 2 cells; a t-test DE ranking needs at least 2")
    out: dict[Group, np.ndarray] = {}
    for context in dict.fromkeys(g[1] for g in groups):
        out.update(_rank_context(data, context, [g for g in groups if g[1] == context]))
    return out


def _rank_context(data: PerturbationData, context: str | None, groups: list[Group]) -> dict[Group, np.ndarray]:
    import anndata as ad
    import scanpy as sc

    ctrl = data.control_cells(context)
    if ctrl.size < 2:
        raise InputDataError(f"context {context!r} has {ctrl.size} control cell(s); a DE ranking needs at least 2")
    rows = np.concatenate([ctrl, *(data._index[g] for g in groups)])
    labels = np.concatenate([np.full(ctrl.size, "ref")] + [np.full(data._index[g].size, f"g{i}")
                                                            for i, g in enumerate(groups)])
    order = np.argsort(rows, kind="stable")  # keep the file's row order: same sums as a full-file call
    private = ad.AnnData(
        X=data.matrix[rows[order]],
        obs=pd.DataFrame({"group": pd.Categorical(labels[order])}, index=np.arange(rows.size).astype(str)),
        var=pd.DataFrame(index=np.arange(data.n_genes).astype(str)))
    with warnings.catch_warnings():  # scanpy's own frame-building and log-fold-change noise
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        sc.tl.rank_genes_groups(private, groupby="group", reference="ref", rankby_abs=True, n_genes=data.n_genes,
                                method="t-test", use_raw=False)
    names = private.uns["rank_genes_groups"]["names"]
    return {g: np.asarray(names[f"g{i}"]).astype(np.int64) for i, g in enumerate(groups)}


# ------------------------------------------------------------------------------------------ readers
def _finish(data: PerturbationData, strict: bool) -> PerturbationData:
    data._validate()
    if strict:
        data.check_conditions()
    else:
        data._drop_unmeasured()
    return data


def _condition_name_keys(data: PerturbationData, column: str = "condition_name") -> dict[Group, str]:
    """Group -> its ``obs[column]`` value when that is the same for all its cells (GEARS ``condition_name``)."""
    if column not in data.adata.obs.columns:
        return {}
    names = np.asarray(data.adata.obs[column].astype(str))
    out = {}
    for group, rows in data._index.items():
        values = pd.unique(names[rows])
        if group[0] != data.control and values.size == 1:
            out[group] = str(values[0])
    return out


def _load_gears(path_or_adata: Any) -> tuple[Any, str]:
    import anndata as ad

    if isinstance(path_or_adata, ad.AnnData):
        return path_or_adata, "the AnnData given"
    path = Path(path_or_adata)
    if path.is_dir():
        path = path / GEARS_FILE
    if not path.is_file():
        raise InputDataError(f"GEARS file not found: {path}; pass a {GEARS_FILE} or the dataset folder holding it")
    return ad.read_h5ad(path), str(path)


def read_gears(path_or_adata: Any, *, strict: bool = True) -> PerturbationData:
    """A GEARS ``perturb_processed.h5ad`` (path, its folder, or the AnnData read from it).

    Conditions are ``obs['condition']`` ('ctrl', 'A+ctrl', 'A+B'); gene symbols ``var['gene_name']``;
    DE rankings from ``uns`` keyed by ``obs['condition_name']``. One cell type -> no context; several
    -> ``context_key='cell_type'``. ``strict=False`` drops conditions whose genes are not measured."""
    adata, where = _load_gears(path_or_adata)
    if "condition" not in adata.obs.columns:
        raise InputDataError(f"{where} has no obs['condition'] column (obs: {list(adata.obs.columns)[:20]}); a GEARS "
                             "file labels cells 'ctrl', 'A+ctrl' or 'A+B' there. For another layout use "
                             "from_anndata(adata, perturbation_key=..., control=...).")
    obs = adata.obs
    several = "cell_type" in obs.columns and obs["cell_type"].nunique() > 1
    gene_names = np.asarray(adata.var["gene_name"]) if "gene_name" in adata.var.columns else None
    data = PerturbationData(adata, "condition", "ctrl", context_key="cell_type" if several else None,
                            gene_names=gene_names, where=where)
    data.uns_keys = _condition_name_keys(data)
    return _finish(data, strict)


def from_anndata(adata: Any, perturbation_key: str, control: str, *,
                 perturbation_genes: Mapping[str, Sequence[str]] | None = None, context_key: str | None = None,
                 layer: str | None = None, gene_symbols: str | None = None, strict: bool = True) -> PerturbationData:
    """Any AnnData with a perturbation column and a control label (log-normalised X or ``layer``).

    ``perturbation_genes`` gives a condition's genes where its label is not 'A+ctrl'/'A+B' (e.g.
    ``{"STIM": ("IFNB1",)}``, or ``()``); ``gene_symbols`` names the var column of symbols (default
    ``var['gene_name']`` when present, else var_names)."""
    gene_names = np.asarray(adata.var["gene_name"]) if "gene_name" in adata.var.columns else None
    if gene_symbols is not None:
        if gene_symbols not in adata.var.columns:
            raise GeneIdentityError(f"gene_symbols={gene_symbols!r} is not a var column; var columns: "
                                    f"{list(adata.var.columns)[:20]} (None uses var_names)")
        gene_names = np.asarray(adata.var[gene_symbols])
    data = PerturbationData(adata, perturbation_key, str(control), context_key=context_key, layer=layer,
                            gene_names=gene_names, perturbation_genes=dict(perturbation_genes or {}))
    data.uns_keys = _condition_name_keys(data)
    return _finish(data, strict)


# ------------------------------------------------------------------------------------------ splits
@dataclass
class PerturbationSplit:
    """Conditions for train / val / test (``train`` includes the control label, as GEARS does), with
    named subgroups of the test and val conditions."""

    train: list[str]
    val: list[str]
    test: list[str]
    test_subgroup: dict[str, list[str]]
    val_subgroup: dict[str, list[str]]
    kind: str
    seed: int

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable form."""
        return {"kind": self.kind, "seed": int(self.seed), "train": [str(c) for c in self.train],
                "val": [str(c) for c in self.val], "test": [str(c) for c in self.test],
                "test_subgroup": {k: [str(c) for c in v] for k, v in self.test_subgroup.items()},
                "val_subgroup": {k: [str(c) for c in v] for k, v in self.val_subgroup.items()}}

    def subgroup_of(self, condition: str) -> str:
        """Test subgroup of a test condition; ``"val:<subgroup>"`` for val; ``"train"`` for train."""
        for name, members in self.test_subgroup.items():
            if condition in members:
                return name
        for name, members in self.val_subgroup.items():
            if condition in members:
                return f"val:{name}"
        if condition in self.train:
            return "train"
        raise ConfigError(f"condition {condition!r} is in no part of this {self.kind} split")


def _check_fraction(name: str, value: float, low_ok: bool = False) -> None:
    if not ((0 <= value if low_ok else 0 < value) and value < 1):
        interval = "[0, 1)" if low_ok else "(0, 1)"
        raise ConfigError(f"{name} must be in {interval}; got {value}")


def _simulation_round(perts: list[str], genes_of: Mapping[str, tuple[str, ...]], gene_frac: float,
                      combo_frac: float, seed: int) -> tuple[list[str], list[str], dict[str, list[str]]]:
    """One GEARS ``get_simulation_split`` call: draw train genes, then the seen-2 combos kept in train."""
    unique = np.array(sorted({g for p in perts for g in genes_of[p]}))
    n_train = int(len(unique) * gene_frac)
    train_genes = set(np.random.RandomState(seed).choice(unique, n_train, replace=False).tolist())
    singles = [p for p in perts if len(genes_of[p]) == 1]
    seen = {p: sum(g in train_genes for g in genes_of[p]) for p in perts if len(genes_of[p]) == 2}
    pool = sorted(p for p, k in seen.items() if k == 2)
    combo_train = (np.random.RandomState(seed).choice(pool, int(len(pool) * combo_frac), replace=False).tolist()
                   if pool else [])
    subgroups = {"combo_seen0": [p for p, k in seen.items() if k == 0],
                 "combo_seen1": [p for p, k in seen.items() if k == 1],
                 "combo_seen2": sorted(set(pool) - set(combo_train)),
                 "unseen_single": [p for p in singles if genes_of[p][0] not in train_genes]}
    train = [p for p in singles if genes_of[p][0] in train_genes] + [str(p) for p in combo_train]
    test = [*subgroups["combo_seen1"], *subgroups["combo_seen2"], *subgroups["unseen_single"],
            *subgroups["combo_seen0"]]
    return train, test, subgroups


def simulation_split(data: PerturbationData, *, seed: int = 1, train_gene_set_size: float = 0.75,
                     combo_seen2_train_frac: float = 0.75) -> PerturbationSplit:
    """GEARS ``DataSplitter(split_type="simulation")``: train genes drawn with ``RandomState(seed)``
    (same stream as GEARS' ``np.random.seed`` + ``np.random.choice``) on the sorted unique genes; val
    carved from train the same way with fractions 0.9 / 0.9; the control label goes to train."""
    _check_fraction("train_gene_set_size", train_gene_set_size)
    _check_fraction("combo_seen2_train_frac", combo_seen2_train_frac)
    genes_of = {c: data.perturbation_genes[c] for c in data.conditions}
    bad = [c for c, g in genes_of.items() if len(g) not in (1, 2)]
    if bad:
        raise ConfigError(f"the simulation split needs conditions of 1 or 2 genes; {bad[:10]} perturb "
                          f"{[len(genes_of[c]) for c in bad[:10]]} genes. Use heldout_split for these data.")
    if len({g for genes in genes_of.values() for g in genes}) < 2:
        raise ConfigError("the simulation split needs at least 2 distinct perturbed genes")
    train, test, test_sub = _simulation_round(data.conditions, genes_of, train_gene_set_size,
                                              combo_seen2_train_frac, seed)
    train, val, val_sub = _simulation_round(train, genes_of, 0.9, 0.9, seed)
    return PerturbationSplit([*train, data.control], val, test, test_sub, val_sub, "simulation", seed)


def _subgroups_by_size(conditions: list[str], genes_of: Mapping[str, tuple[str, ...]]) -> dict[str, list[str]]:
    names = {0: "stimulus", 1: "single"}
    out: dict[str, list[str]] = {}
    for c in conditions:
        out.setdefault(names.get(len(genes_of[c]), "combo"), []).append(c)
    return out


def heldout_split(data: PerturbationData, *, test: Sequence[str] | None = None, test_fraction: float = 0.2,
                  val_fraction: float = 0.1, seed: int = 0) -> PerturbationSplit:
    """Random held-out conditions (or the ``test`` given), val drawn from the rest; subgroups
    "single" / "combo" / "stimulus" (no gene) by the number of perturbed genes."""
    _check_fraction("val_fraction", val_fraction, low_ok=True)
    conditions = data.conditions
    rng = np.random.default_rng(seed)
    if test is None:
        _check_fraction("test_fraction", test_fraction)
        chosen = set(rng.permutation(len(conditions))[:max(1, round(len(conditions) * test_fraction))].tolist())
        test = [c for i, c in enumerate(conditions) if i in chosen]
    else:
        unknown = [c for c in test if c not in conditions]
        if unknown:
            raise ConfigError(f"test conditions {unknown[:10]} are not in the data; conditions: {conditions[:10]}")
        test = [c for c in conditions if c in set(test)]
    rest = [c for c in conditions if c not in set(test)]
    chosen = set(rng.permutation(len(rest))[:round(len(rest) * val_fraction)].tolist())
    val = [c for i, c in enumerate(rest) if i in chosen]
    train = [c for c in rest if c not in set(val)]
    if not train:
        raise ConfigError(f"no training conditions left ({len(test)} test, {len(val)} val of {len(conditions)}); "
                          "lower test_fraction / val_fraction")
    genes_of = data.perturbation_genes
    return PerturbationSplit([*train, data.control], val, test, _subgroups_by_size(test, genes_of),
                             _subgroups_by_size(val, genes_of), "heldout", seed)


def pair_controls(data: PerturbationData, rows: Sequence[int] | np.ndarray, *, seed: int) -> np.ndarray:
    """For each row, a control cell of the same context drawn uniformly with replacement
    (``np.random.default_rng(seed)``); control rows are paired with themselves (GEARS: x = y)."""
    rows = np.asarray(rows, dtype=np.int64).ravel()
    if rows.size and (rows.min() < 0 or rows.max() >= data.n_cells):
        raise ConfigError(f"rows must be cell indices in [0, {data.n_cells}); got {rows.min()}..{rows.max()}")
    rng = np.random.default_rng(seed)
    out = rows.copy()
    perturbed = data._labels[rows] != data.control
    for context in data.contexts:
        mask = perturbed if context is None else perturbed & (data._context_labels[rows] == context)
        if not mask.any():
            continue
        pool = data.control_cells(context)
        if pool.size == 0:
            raise InputDataError(f"context {context!r} has perturbed cells but no {data.control!r} controls to pair "
                                 "them with; add controls or pool contexts (context_key=None)")
        out[mask] = pool[rng.integers(0, pool.size, int(mask.sum()))]
    return out
