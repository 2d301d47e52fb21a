"""Perturbation-response baselines that keep foundation models honest (Ahlmann-Eltze et al. 2025; Csendes et al.
2025): no change, train mean, additive singles, the linear model Y ≈ G W Pᵀ + b, and feature regressors.

Every baseline is fitted on :class:`~scforge.data.profiles.PerturbationProfiles` holding the training groups'
pseudobulk means plus every context's control mean, and predicts the mean expression of ``(condition, context)``
groups without ever seeing their truth:

>>> model = make_baseline("additive").fit(profiles.subset(train_groups))
>>> predictions = model.predict(test_groups)          # {group: float64 vector over profiles.gene_names}
>>> model.fallbacks                                   # groups that the baseline could not predict its own way
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.data.profiles import Group, PerturbationProfiles
from scforge.errors import ConfigError, InputDataError

logger = logging.getLogger("scforge")

GO_ANNOTATION_FILE = "human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz"
GO_ASPECTS = ("BP", "MF", "CC")
ESTIMATORS = ("knn", "rf", "ridge")


class PerturbationBaseline:
    """Common interface: :meth:`fit` on training profiles, :meth:`predict` mean expression per group.

    After :meth:`predict`, ``fallbacks`` lists the groups of that call that the baseline predicted by a
    documented fallback (e.g. the training mean delta) instead of its own rule."""

    name = "baseline"
    needs_groups = True  # whether fit needs at least one training group

    def __init__(self) -> None:
        self.gene_names: np.ndarray | None = None
        self.fallbacks: list[Group] = []
        self._control: dict[str | None, np.ndarray] = {}
        self._genes: dict[str, tuple[str, ...]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}{', fitted' if self.gene_names is not None else ''})"

    def fit(self, train: PerturbationProfiles) -> PerturbationBaseline:
        """Fit on ``train`` (the training groups' means and all control means); returns ``self``."""
        if not isinstance(train, PerturbationProfiles):
            raise ConfigError(f"{self.name}.fit needs a PerturbationProfiles, got {type(train).__name__}; build one "
                              "with scforge.data.profiles.PerturbationProfiles (or .subset(train_groups)).")
        if self.needs_groups and not train.means:
            raise ConfigError(f"{self.name}.fit got no training groups; give at least one (condition, context) mean.")
        no_control = [g for g in train.means if g[1] not in train.control]
        if no_control:
            raise ConfigError(f"training groups {no_control[:5]} have no control mean for their context; contexts "
                              f"with controls: {train.contexts}. Drop those groups or add their controls.")
        self.gene_names = train.gene_names.copy()
        self._control = dict(train.control)
        self._genes = dict(train.genes)
        self._fit(train)
        return self

    def _fit(self, train: PerturbationProfiles) -> None:
        """Subclass hook: learn from ``train`` (already checked)."""

    def predict(self, groups: Sequence[Group]) -> dict[Group, np.ndarray]:
        """Predicted mean expression (float64, shape ``(n_genes,)``) for each ``(condition, context)`` group."""
        if self.gene_names is None:
            raise ConfigError(f"{self.name}: predict was called before fit; call .fit(train_profiles) first.")
        groups = self._check_groups(groups)
        self.fallbacks = []
        out = {g: np.asarray(self._predict_one(g), dtype=np.float64) for g in groups}
        if self.fallbacks:
            logger.warning("%s: %d of %d groups used a fallback prediction (see .fallbacks): %s", self.name,
                           len(self.fallbacks), len(groups), self.fallbacks[:5])
        return out

    def _predict_one(self, group: Group) -> np.ndarray:
        raise NotImplementedError

    def _check_groups(self, groups: Sequence[Group]) -> list[Group]:
        if isinstance(groups, tuple) and len(groups) == 2 and isinstance(groups[0], str):
            raise ConfigError(f"{self.name}.predict takes a sequence of groups; wrap the single group {groups!r} in "
                              "a list.")
        groups = list(groups)
        for g in groups:
            if not (isinstance(g, tuple) and len(g) == 2 and isinstance(g[0], str)):
                raise ConfigError(f"{self.name}.predict: group {g!r} is not a (condition, context) tuple.")
        unknown = sorted({g[1] for g in groups if g[1] not in self._control}, key=str)
        if unknown:
            raise ConfigError(f"{self.name}.predict: unknown contexts {unknown} (no control mean was given at fit); "
                              f"known contexts: {list(self._control)}.")
        return groups

    def _control_of(self, group: Group) -> np.ndarray:
        return self._control[group[1]]

    def _genes_of(self, condition: str) -> tuple[str, ...]:
        if condition not in self._genes:
            raise ConfigError(f"{self.name}: condition {condition!r} has no perturbed-gene list; add it to "
                              "PerturbationProfiles.genes (an empty tuple for a stimulus without a gene).")
        return tuple(self._genes[condition])


def _mean_delta(train: PerturbationProfiles) -> np.ndarray:
    return np.mean([train.delta(g) for g in train.groups], axis=0)


class NoChange(PerturbationBaseline):
    """Predict the control mean of the group's context (no perturbation effect at all)."""

    name = "no_change"
    needs_groups = False

    def _predict_one(self, group: Group) -> np.ndarray:
        return self._control_of(group).copy()


class TrainMean(PerturbationBaseline):
    """The mean over training groups: ``style="absolute"`` predicts the mean of their mean profiles (Csendes'
    "train mean"); ``style="delta"`` predicts the group's control mean plus the mean of their deltas (each group's
    mean minus its own context's control mean)."""

    def __init__(self, style: str = "absolute") -> None:
        super().__init__()
        if style not in ("absolute", "delta"):
            raise ConfigError(f"TrainMean style={style!r}; choose 'absolute' or 'delta'.")
        self.style = style
        self.name = "train_mean" if style == "absolute" else "train_mean_delta"
        self.mean_: np.ndarray | None = None

    def _fit(self, train: PerturbationProfiles) -> None:
        if self.style == "absolute":
            self.mean_ = np.mean([train.means[g] for g in train.groups], axis=0)
        else:
            self.mean_ = _mean_delta(train)

    def _predict_one(self, group: Group) -> np.ndarray:
        return self.mean_.copy() if self.style == "absolute" else self._control_of(group) + self.mean_


class Additive(PerturbationBaseline):
    """Sum of observed single-gene effects in the same context (Ahlmann-Eltze's additive model).

    A group with genes ``(A, B)`` in context ``c`` is predicted as ``control_c + delta_A + delta_B``, where
    ``delta_X`` is the delta of the training group(s) in context ``c`` whose condition perturbs only ``X``
    (averaged when several conditions do). A single is its own observed delta when trained. When some genes have
    no observed single, the available ones are summed; when none has (an unseen single, a stimulus without
    genes), the training mean delta is used. Either way the group is recorded in ``fallbacks``."""

    name = "additive"

    def __init__(self) -> None:
        super().__init__()
        self.singles_: dict[tuple[str, str | None], np.ndarray] = {}
        self.mean_delta_: np.ndarray | None = None

    def _fit(self, train: PerturbationProfiles) -> None:
        collected: dict[tuple[str, str | None], list[np.ndarray]] = {}
        for group in train.groups:
            genes = self._genes_of(group[0])
            if len(genes) == 1:
                collected.setdefault((genes[0], group[1]), []).append(train.delta(group))
        self.singles_ = {key: np.mean(deltas, axis=0) for key, deltas in collected.items()}
        self.mean_delta_ = _mean_delta(train)

    def _predict_one(self, group: Group) -> np.ndarray:
        genes = self._genes_of(group[0])
        found = [self.singles_[(g, group[1])] for g in genes if (g, group[1]) in self.singles_]
        if len(found) < len(genes) or not genes:
            self.fallbacks.append(group)
        effect = np.sum(found, axis=0) if found else self.mean_delta_
        return self._control_of(group) + effect


def pca_gene_scores(matrix: np.ndarray, n_components: int) -> np.ndarray:
    """Principal-component scores of the rows (genes) of ``matrix`` (genes x groups), as R's
    ``prcomp(matrix)$x``: each column is centred by its mean over genes, ``Xc = U S Vᵀ`` (thin SVD), and the
    scores are ``U[:, :K] * S[:K]`` with ``K = min(n_components, n_groups, n_genes)``. Each column's sign is
    fixed so that its largest-magnitude entry is positive (deterministic output)."""
    x = np.asarray(matrix, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    k = min(int(n_components), s.size)
    u = u[:, :k]
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(k)])
    return u * np.where(signs == 0, 1.0, signs) * s[:k]


def _check_embedding_table(table: pd.DataFrame, what: str) -> pd.DataFrame:
    if table.shape[0] == 0 or table.shape[1] == 0:
        raise ConfigError(f"{what} is empty (shape {table.shape}); give genes as rows and dimensions as columns.")
    if not table.index.is_unique:
        dup = table.index[table.index.duplicated()].unique().tolist()
        raise ConfigError(f"{what} has duplicated gene symbols in its index: {dup[:5]}; keep one row per gene.")
    try:
        values = _dense_values(table)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{what} must hold numbers only ({err}); drop non-numeric columns.") from err
    if not np.isfinite(values).all():
        raise ConfigError(f"{what} holds NaN or infinite values; fill or drop those rows first.")
    return pd.DataFrame(values, index=table.index.astype(str), columns=table.columns)


def _dense_values(table: pd.DataFrame) -> np.ndarray:
    if len(table.columns) and all(isinstance(d, pd.SparseDtype) for d in table.dtypes):
        return table.sparse.to_coo().toarray().astype(np.float64)
    return table.to_numpy(dtype=np.float64)


class LinearModel(PerturbationBaseline):
    """Ahlmann-Eltze et al.'s linear model on pseudobulk deltas: ``Y ≈ G W Pᵀ + b``.

    * ``Y`` (genes x training groups): each group's delta (mean minus its context's control mean), centred per
      gene by ``b`` (the mean delta over training groups).
    * ``G`` (genes x K): :func:`pca_gene_scores` of the training pseudobulk means (genes x groups), K =
      ``n_components``; or ``gene_embedding`` (a DataFrame indexed by symbol, or an array with rows aligned to
      ``gene_names``; measured genes absent from it get zero rows).
    * ``P`` (groups x K), one row per group: ``condition_embedding="genes"``: the sum of the embedding rows of
      the group's perturbed genes (a gene without a row contributes zero and is added to ``unknown_genes``,
      which collects such genes seen since the last fit);
      ``"context"``: ``Gᵀ (control_c - mean control)``, the group's context control projected on ``G`` (mean
      over all contexts given at fit), to carry a stimulus over to a new cell type.
    * ``W = (GᵀG + λI)⁻¹ Gᵀ Y P (PᵀP + λI)⁻¹`` with ``λ = ridge``; prediction ``control_c + G W p + b``.

    Groups whose embedding row is incomplete or zero for lack of genes are recorded in ``fallbacks``."""

    def __init__(self, n_components: int = 10, ridge: float = 0.1, condition_embedding: str = "genes",
                 gene_embedding: pd.DataFrame | np.ndarray | None = None) -> None:
        super().__init__()
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ConfigError(f"n_components must be an integer >= 1, got {n_components!r}")
        if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not np.isfinite(ridge) or ridge < 0:
            raise ConfigError(f"ridge must be a finite number >= 0, got {ridge!r}")
        if condition_embedding not in ("genes", "context"):
            raise ConfigError(f"condition_embedding={condition_embedding!r}; choose 'genes' (perturbed genes' rows "
                              "of G) or 'context' (the context's control projected on G).")
        self.n_components, self.ridge, self.condition_embedding = int(n_components), float(ridge), condition_embedding
        self.gene_embedding = gene_embedding
        self.name = "linear" if condition_embedding == "genes" else "linear_context"
        self.G_: np.ndarray | None = None
        self.W_: np.ndarray | None = None
        self.b_: np.ndarray | None = None
        self.unknown_genes: list[str] = []
        self._rows: dict[str, np.ndarray] = {}
        self._mean_control: np.ndarray | None = None

    def _gene_matrix(self, train: PerturbationProfiles) -> np.ndarray:
        names = train.gene_names
        emb = self.gene_embedding
        if emb is None:
            means = np.column_stack([train.means[g] for g in train.groups])
            g = pca_gene_scores(means, self.n_components)
            self._rows = dict(zip(names, g))
            return g
        if isinstance(emb, pd.DataFrame):
            table = _check_embedding_table(emb, "gene_embedding")
            absent = int((~pd.Index(names).isin(table.index)).sum())
            if absent == names.size:
                raise ConfigError("gene_embedding shares no gene symbol with the profiles' gene_names (e.g. "
                                  f"{names[:3].tolist()} vs {table.index[:3].tolist()}); use the same id type.")
            if absent:
                logger.info("gene_embedding: %d of %d measured genes have no row (zero rows used)", absent, names.size)
            self._rows = {k: v for k, v in zip(table.index, table.to_numpy())}
            return table.reindex(names).fillna(0.0).to_numpy()
        g = np.asarray(emb, dtype=np.float64)
        if g.ndim != 2 or g.shape[0] != names.size or g.shape[1] == 0 or not np.isfinite(g).all():
            raise ConfigError(f"gene_embedding array has shape {g.shape}; expected finite ({names.size}, d) with rows "
                              "aligned to gene_names (or give a DataFrame indexed by gene symbol).")
        self._rows = dict(zip(names, g))
        return g

    def _condition_row(self, group: Group, record: bool) -> np.ndarray:
        if self.condition_embedding == "context":
            return self.G_.T @ (self._control[group[1]] - self._mean_control)
        genes = self._genes_of(group[0])
        unknown = [g for g in genes if g not in self._rows]
        if record and (unknown or not genes):
            self.fallbacks.append(group)
        self.unknown_genes = sorted({*self.unknown_genes, *unknown})
        return np.sum([self._rows[g] for g in genes if g in self._rows] or [np.zeros(self.G_.shape[1])], axis=0)

    def _fit(self, train: PerturbationProfiles) -> None:
        self.unknown_genes = []
        self.G_ = self._gene_matrix(train)
        self._mean_control = np.mean(list(self._control.values()), axis=0)
        y = np.column_stack([train.delta(g) for g in train.groups])
        self.b_ = y.mean(axis=1)
        p = np.vstack([self._condition_row(g, record=False) for g in train.groups])
        self.W_ = ridge_two_sided(self.G_, y - self.b_[:, None], p, self.ridge)

    def _predict_one(self, group: Group) -> np.ndarray:
        return self._control_of(group) + self.G_ @ (self.W_ @ self._condition_row(group, record=True)) + self.b_


def ridge_two_sided(g: np.ndarray, y: np.ndarray, p: np.ndarray, ridge: float) -> np.ndarray:
    """``W = (GᵀG + λI)⁻¹ Gᵀ Y P (PᵀP + λI)⁻¹`` for ``Y ≈ G W Pᵀ`` (G genes x k, Y genes x n, P n x l)."""
    left = g.T @ g + ridge * np.eye(g.shape[1])
    right = p.T @ p + ridge * np.eye(p.shape[1])
    try:
        inner = np.linalg.solve(left, g.T @ y @ p)
        return np.linalg.solve(right, inner.T).T  # right is symmetric: inner right⁻¹ = (right⁻¹ innerᵀ)ᵀ
    except np.linalg.LinAlgError as err:
        raise ConfigError(f"the linear model's normal equations are singular with ridge={ridge}; use ridge > 0 "
                          "(0.1 is the published default).") from err


class FeatureRegressor(PerturbationBaseline):
    """Csendes et al.'s regressor from perturbed-gene features to the pseudobulk delta.

    ``features``: a DataFrame indexed by gene symbol (e.g. :func:`go_feature_matrix`, or language embeddings),
    reduced by ``PCA(min(n_components, rows, columns))`` fitted on the whole table. A group's input is the sum
    of the reduced rows of its perturbed genes; the target is its delta over all genes (multi-output).
    ``estimator``: ``"knn"`` (KNeighborsRegressor, ``n_neighbors`` default 5, capped at the training groups),
    ``"rf"`` (RandomForestRegressor, ``n_estimators`` default 100, ``random_state=seed``) or ``"ridge"``;
    ``**kwargs`` go to the estimator. Prediction = control mean + predicted delta.

    A group with a perturbed gene lacking a feature row (or with no genes) raises :class:`ConfigError` listing
    them, unless ``missing="mean"``: such training groups are left out (``skipped_``) and such predicted groups
    get the training mean delta (``fallbacks``)."""

    def __init__(self, features: pd.DataFrame, estimator: str = "knn", n_components: int = 256, seed: int = 0, *,
                 missing: str = "error", feature_name: str = "features", **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(features, pd.DataFrame):
            raise ConfigError(f"features must be a pandas DataFrame indexed by gene symbol, got "
                              f"{type(features).__name__} (e.g. go_feature_matrix(go_dir, symbols)).")
        if estimator not in ESTIMATORS:
            raise ConfigError(f"estimator={estimator!r}; choose one of {ESTIMATORS}.")
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise ConfigError(f"n_components must be an integer >= 1, got {n_components!r}")
        if missing not in ("error", "mean"):
            raise ConfigError(f"missing={missing!r}; choose 'error' or 'mean' (training mean delta).")
        self.features = _check_embedding_table(features, "features")
        self.estimator, self.n_components, self.seed, self.missing = estimator, int(n_components), seed, missing
        self.kwargs = dict(kwargs)
        self.name = f"{estimator}_{feature_name}"
        self._make_estimator(1)  # unknown keyword arguments fail here, not at fit
        self.model: Any = None
        self.pca_: Any = None
        self.skipped_: list[Group] = []
        self.mean_delta_: np.ndarray | None = None
        self._reduced: dict[str, np.ndarray] = {}

    def _make_estimator(self, n_train: int) -> Any:
        kwargs = dict(self.kwargs)
        try:
            if self.estimator == "knn":
                from sklearn.neighbors import KNeighborsRegressor

                return KNeighborsRegressor(n_neighbors=min(kwargs.pop("n_neighbors", 5), n_train), **kwargs)
            if self.estimator == "rf":
                from sklearn.ensemble import RandomForestRegressor

                kwargs.setdefault("n_estimators", 100)
                return RandomForestRegressor(random_state=self.seed, **kwargs)
            from sklearn.linear_model import Ridge

            return Ridge(**kwargs)
        except TypeError as err:
            raise ConfigError(f"FeatureRegressor({self.estimator!r}): bad estimator argument ({err}).") from err

    def _inputs(self, groups: list[Group]) -> tuple[list[Group], np.ndarray, dict[Group, list[str]]]:
        """Groups that have features, their summed reduced rows, and the missing genes of the others."""
        ok, rows, missing = [], [], {}
        for group in groups:
            genes = self._genes_of(group[0])
            absent = [g for g in genes if g not in self._reduced]
            if absent or not genes:
                missing[group] = absent
            else:
                ok.append(group)
                rows.append(np.sum([self._reduced[g] for g in genes], axis=0))
        width = self.pca_.n_components_
        return ok, np.vstack(rows) if rows else np.zeros((0, width)), missing

    def _raise_missing(self, missing: dict[Group, list[str]], where: str) -> None:
        genes = sorted({g for absent in missing.values() for g in absent})
        raise ConfigError(f"{self.name}.{where}: {len(missing)} groups have perturbed genes without a feature row "
                          f"(or no genes): groups {list(missing)[:5]}, genes {genes[:10]}. Add rows for them to "
                          "features, drop those groups, or pass missing='mean' to use the training mean delta.")

    def _fit(self, train: PerturbationProfiles) -> None:
        from sklearn.decomposition import PCA

        table = self.features.to_numpy()
        k = min(self.n_components, *table.shape)
        self.pca_ = PCA(n_components=k, svd_solver="full", random_state=self.seed).fit(table)
        self._reduced = dict(zip(self.features.index, self.pca_.transform(table)))
        ok, x, missing = self._inputs(train.groups)
        if missing and self.missing == "error":
            self._raise_missing(missing, "fit")
        if not ok:
            raise ConfigError(f"{self.name}.fit: none of the {len(train.groups)} training groups has features for "
                              "all its perturbed genes; nothing to train on.")
        self.skipped_ = list(missing)
        self.mean_delta_ = _mean_delta(train)
        y = np.vstack([train.delta(g) for g in ok])
        self.model = self._make_estimator(len(ok)).fit(x, y)

    def predict(self, groups: Sequence[Group]) -> dict[Group, np.ndarray]:
        if self.gene_names is None:
            raise ConfigError(f"{self.name}: predict was called before fit; call .fit(train_profiles) first.")
        groups = self._check_groups(groups)
        ok, x, missing = self._inputs(groups)
        if missing and self.missing == "error":
            self._raise_missing(missing, "predict")
        deltas = dict(zip(ok, self.model.predict(x))) if ok else {}
        self.fallbacks = [g for g in groups if g in missing]
        if self.fallbacks:
            logger.warning("%s: %d of %d groups lack features; predicted the training mean delta: %s", self.name,
                           len(self.fallbacks), len(groups), self.fallbacks[:5])
        return {g: np.asarray(self._control_of(g) + deltas.get(g, self.mean_delta_), dtype=np.float64)
                for g in groups}


def go_feature_matrix(go_dir: str | Path, symbols: Sequence[str], *, aspects: Sequence[str] = GO_ASPECTS,
                      min_genes: int = 2, exclude_evidence: Sequence[str] = ("ND",),
                      sparse: bool = False) -> pd.DataFrame:
    """Binary gene x GO-term matrix (uint8) for ``symbols`` from the direct annotations of org.Hs.eg.db
    (``go_dir`` is the folder holding ``human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz``, or the file).

    Only ``aspects`` (BP, MF, CC) are used, annotations with ``exclude_evidence`` codes are dropped (``ND``: "no
    biological data", which only marks root terms), and terms annotated to fewer than ``min_genes`` of the
    requested genes are dropped. Rows are the requested symbols with at least one such annotation, in request
    order (a row may be all zero when all its terms were dropped); symbols with none are listed in
    ``attrs["unannotated"]``. Columns are GO ids, sorted. ``sparse=True`` returns a scipy-sparse-backed frame."""
    import scipy.sparse as sp

    path = Path(go_dir)
    path = path / GO_ANNOTATION_FILE if path.is_dir() else path
    if not path.is_file():
        raise InputDataError(f"GO annotation file not found at {path}; pass the folder holding {GO_ANNOTATION_FILE} "
                             "(e.g. ../shared/data/genes/go) or the file itself.")
    bad = [a for a in aspects if a not in GO_ASPECTS]
    if bad or not len(aspects):
        raise ConfigError(f"aspects={list(aspects)!r}; choose a non-empty subset of {GO_ASPECTS}.")
    if isinstance(min_genes, bool) or not isinstance(min_genes, (int, np.integer)) or min_genes < 1:
        raise ConfigError(f"min_genes must be an integer >= 1, got {min_genes!r}")
    if isinstance(symbols, str):
        raise ConfigError(f"symbols must be a sequence of gene symbols, got the single string {symbols!r}.")
    wanted = list(dict.fromkeys(str(s) for s in symbols))
    if not wanted:
        raise ConfigError("symbols is empty; give the gene symbols to build GO features for.")
    need = ["symbol", "go_id", "evidence", "aspect"]
    table = pd.read_csv(path, sep="\t", dtype=str)
    absent_cols = [c for c in need if c not in table.columns]
    if absent_cols:
        raise InputDataError(f"{path} lacks columns {absent_cols} (has {list(table.columns)}); expected the "
                             "org.Hs.eg.db direct annotation table with symbol, go_id, evidence, aspect.")
    keep = table["symbol"].isin(wanted) & table["aspect"].isin(list(aspects)) & \
        ~table["evidence"].isin(list(exclude_evidence))
    pairs = table.loc[keep, ["symbol", "go_id"]].drop_duplicates()
    rows = [s for s in wanted if s in set(pairs["symbol"])]
    counts = pairs["go_id"].value_counts()
    terms = sorted(counts.index[counts >= min_genes])
    pairs = pairs[pairs["go_id"].isin(terms)]
    row_of = {s: i for i, s in enumerate(rows)}
    col_of = {t: j for j, t in enumerate(terms)}
    matrix = sp.csr_matrix((np.ones(len(pairs), dtype=np.uint8), (pairs["symbol"].map(row_of).to_numpy(),
                                                                   pairs["go_id"].map(col_of).to_numpy())),
                           shape=(len(rows), len(terms)), dtype=np.uint8)
    index, columns = pd.Index(rows, name="symbol"), pd.Index(terms, name="go_id")
    if sparse:
        frame = pd.DataFrame.sparse.from_spmatrix(matrix, index=index, columns=columns)
    else:
        frame = pd.DataFrame(matrix.toarray(), index=index, columns=columns)
    frame.attrs["unannotated"] = [s for s in wanted if s not in row_of]
    return frame


def _fixed(cls: Callable[..., PerturbationBaseline], name: str, **fixed: Any) -> Callable[..., PerturbationBaseline]:
    def factory(**kwargs: Any) -> PerturbationBaseline:
        clash = sorted(set(kwargs) & set(fixed))
        if clash:
            raise ConfigError(f"baseline {name!r} fixes {clash}; use another registry name or the class directly.")
        return cls(**fixed, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in fixed.items())}, **kwargs)"
    return factory


baseline_registry: dict[str, Callable[..., PerturbationBaseline]] = {
    "no_change": _fixed(NoChange, "no_change"),
    "train_mean": _fixed(TrainMean, "train_mean", style="absolute"),
    "train_mean_delta": _fixed(TrainMean, "train_mean_delta", style="delta"),
    "additive": _fixed(Additive, "additive"),
    "linear": _fixed(LinearModel, "linear", condition_embedding="genes"),
    "linear_context": _fixed(LinearModel, "linear_context", condition_embedding="context"),
    "knn_go": _fixed(FeatureRegressor, "knn_go", estimator="knn", feature_name="go"),
    "rf_go": _fixed(FeatureRegressor, "rf_go", estimator="rf", feature_name="go"),
}


def make_baseline(name: str, **kwargs: Any) -> PerturbationBaseline:
    """A fresh baseline by registry name (``baseline_registry``); ``knn_go`` and ``rf_go`` need ``features=``
    (e.g. :func:`go_feature_matrix`)."""
    if name not in baseline_registry:
        raise ConfigError(f"unknown perturbation baseline {name!r}; choose one of {sorted(baseline_registry)}.")
    if name in ("knn_go", "rf_go") and "features" not in kwargs:
        raise ConfigError(f"baseline {name!r} needs features= (a gene x GO-term DataFrame, e.g. "
                          "go_feature_matrix(go_dir, perturbed_genes)).")
    try:
        return baseline_registry[name](**kwargs)
    except TypeError as err:
        raise ConfigError(f"baseline {name!r}: bad arguments {sorted(kwargs)} ({err}).") from err
