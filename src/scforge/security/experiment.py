"""A whole backdoor experiment: split, poison, fine-tune, measure, defend, measure again.

>>> result = run_attack(adata, "cell_type", target="B", victim="logistic", rate=0.05)
>>> result.table          # tidy: stage x metric (accuracy, macro_f1, kappa, asr, ...)
>>> sweep = sweep_attack(adata, "cell_type", targets=["B", "NK"], rates=[0.01, 0.05], victim="logistic")

Stages: ``clean`` (the victim trained on the untouched training cells), ``poisoned`` (trained on the
poisoned copy) and ``defended`` (trained after :func:`~scforge.security.audit` flagged cells were
removed or relabelled). Clean accuracy, macro-F1 and Cohen's kappa are measured on the untouched test
cells; the attack success rate (ASR) is the share of triggered non-target test cells predicted as the
target, as scBackdoor defines it. Detection is scored against the known poisoned cells (AUROC,
precision, recall).

A token trigger (:class:`~scforge.security.RankShuffleTrigger`, scBackdoor's Geneformer attack) runs
the same stages on tokens: a Geneformer-family victim tokenizes the training and test cells with its
classification recipe, the chosen training cells are triggered on their tokens and relabelled, the
model is fine-tuned on those tokens, the non-target test cells are triggered on their tokens, and the
defence audits the tokenized set (:func:`~scforge.security.audit_tokens`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from scforge._inputs import obs_labels
from scforge.errors import ConfigError, InputDataError
from scforge.metrics import classification_metrics
from scforge.security.unlearn import check_copies, unlearning_set, unlearning_tokens

__all__ = ["run_attack", "sweep_attack", "AttackResult", "split_cells", "attack_success_rate", "trigger_cells"]

logger = logging.getLogger("scforge")
ACTIONS = ("remove", "relabel", "unlearn", "fine_prune")


def attack_success_rate(predictions: Any, target: str) -> float:
    """Share of ``predictions`` equal to ``target`` (predictions on triggered non-target cells)."""
    pred = np.asarray(predictions).astype(str)
    if pred.size == 0:
        raise InputDataError("no triggered cells to score; the test set has no non-target cells.")
    return float(np.mean(pred == str(target)))


def split_cells(adata: Any, label_key: str, *, split: Any = "random", test_size: float = 0.2,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, test)`` positions. ``split="random"``: stratified hold-out of ``test_size`` per class;
    ``split=(column, train_value, test_value)``: a batch shift, e.g. ``("stim", "CTRL", "STIM")``."""
    from scforge.bench.splits import holdout_split

    if isinstance(split, str):
        if split != "random":
            raise ConfigError(f"split={split!r}; use 'random' or (obs_column, train_value, test_value).")
        return holdout_split(adata.obs[label_key].astype(str).to_numpy(), test_size=test_size, seed=seed)
    try:
        column, train_value, test_value = split
    except (TypeError, ValueError):
        raise ConfigError(f"split={split!r}; use 'random' or (obs_column, train_value, test_value).") from None
    if column not in adata.obs.columns:
        raise InputDataError(f"obs has no column {column!r} to split by; columns are {list(adata.obs.columns)[:20]}.")
    values = adata.obs[column].astype(str).to_numpy()
    train, test = np.flatnonzero(values == str(train_value)), np.flatnonzero(values == str(test_value))
    for name, idx, v in (("training", train, train_value), ("test", test, test_value)):
        if idx.size == 0:
            raise InputDataError(f"no cells have obs[{column!r}] == {v!r} for the {name} set; values are "
                                 f"{sorted(set(values))[:10]}.")
    return train, test


def trigger_cells(adata: Any, trigger: Any, *, layer: str | None = None, seed: int = 0) -> Any:
    """A copy of ``adata`` with ``trigger`` applied to every cell (the test-time trigger)."""
    from scforge.security.poison import layer_matrix, with_matrix

    kwargs = {"gene_names": adata.var_names} if getattr(trigger, "name", "") == "fixed_genes" else {}
    return with_matrix(adata, layer, trigger.apply(layer_matrix(adata, layer), None, seed=seed, **kwargs))


@dataclass
class AttackResult:
    """Outcome of :func:`run_attack`. ``table``: tidy rows (stage, metric, value); ``detection``:
    detection scores of the audit; ``settings``; ``audit``: the audit table of the poisoned training
    set (None without a defence); ``seconds``: wall time per step; ``triggered``: one row per
    triggered test cell (its ``obs_names``): its true ``label``, the genes the trigger kept (``n_kept``,
    sparsify trigger only) and each stage's prediction (``pred_clean``, ``pred_poisoned``, ...), for
    :meth:`asr_by`."""

    table: pd.DataFrame
    detection: dict[str, float]
    settings: dict[str, Any]
    audit: pd.DataFrame | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    triggered: pd.DataFrame | None = None

    @property
    def stages(self) -> list[str]:
        """The stages with per-cell predictions in :attr:`triggered` (``[]`` without them)."""
        frame = self.triggered
        return [] if frame is None else [c[len("pred_"):] for c in frame.columns if c.startswith("pred_")]

    def asr_by(self, by: str = "label", stage: str = "poisoned", bins: Sequence[float] | None = None) -> pd.DataFrame:
        """ASR of ``stage`` per group of triggered test cells: ``by`` a column of :attr:`triggered`
        (``"label"``: the cell's true class; ``"n_kept"``: how many genes the trigger left it), cut into
        ``bins`` (edges, right-closed) when given. Columns ``n_cells`` and ``asr``."""
        frame = self.triggered
        if frame is None:
            raise ConfigError("this result has no per-cell predictions (it was saved before they were kept).")
        column = f"pred_{stage}"
        if column not in frame.columns:
            raise ConfigError(f"no stage {stage!r} in this result; stages are {self.stages}.")
        if by not in frame.columns or by.startswith("pred_"):
            raise ConfigError(f"cannot group by {by!r}; use one of "
                              f"{[c for c in frame.columns if not c.startswith('pred_')]}.")
        groups = frame[by]
        if bins is not None:
            if not pd.api.types.is_numeric_dtype(groups):
                raise ConfigError(f"bins need a numeric column; {by!r} holds labels (leave bins=None).")
            groups = pd.cut(groups, bins=list(bins))
            if groups.isna().any():
                raise ConfigError(f"{int(groups.isna().sum())} triggered cells have {by} outside the bins "
                                  f"{list(bins)} (edges are right-closed); widen the first or last edge.")
        hit = frame[column].astype(str) == str(self.settings["target"])
        out = hit.groupby(groups, observed=True).agg(["size", "mean"]).rename(columns={"size": "n_cells",
                                                                                    "mean": "asr"})
        out.index.name = by
        return out

    def asr_by_stages(self, by: str = "label", bins: Sequence[float] | None = None) -> pd.DataFrame:
        """:meth:`asr_by` for every stage side by side: columns ``n_cells`` and ``asr_<stage>``."""
        tables = [self.asr_by(by, stage, bins) for stage in self.stages]
        if not tables:
            raise ConfigError("this result has no per-cell predictions (it was saved before they were kept).")
        return pd.concat([tables[0]["n_cells"], *(t["asr"].rename(f"asr_{stage}")
                                                  for t, stage in zip(tables, self.stages))], axis=1)

    def value(self, stage: str, metric: str) -> float:
        row = self.table[(self.table.stage == stage) & (self.table.metric == metric)]
        if row.empty:
            raise KeyError(f"no {metric!r} for stage {stage!r}")
        return float(row.value.iloc[0])

    def wide(self) -> pd.DataFrame:
        """Stages as rows, metrics as columns."""
        return self.table.pivot_table(index="stage", columns="metric", values="value", sort=False)

    def tidy(self) -> pd.DataFrame:
        """:attr:`table` plus the detection scores (stage ``"detection"``), with the run's target, rate
        and ``topnstop`` (NaN for other triggers) as leading columns: one run's rows of a sweep table."""
        detection = pd.DataFrame({"stage": "detection", "metric": list(self.detection),
                                  "value": [float(v) for v in self.detection.values()]})
        out = pd.concat([self.table, detection], ignore_index=True) if len(detection) else self.table.copy()
        out.insert(0, "topnstop", float(self.settings.get("topnstop", float("nan"))))
        out.insert(0, "rate", float(self.settings["rate"]))
        out.insert(0, "target", str(self.settings["target"]))
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "detection": self.detection, "seconds": self.seconds,
                "results": {s: {m: float(v) for m, v in row.dropna().items()} for s, row in self.wide().iterrows()}}

    def save(self, out: str | Path) -> Path:
        """Write ``attack.json``, ``results.csv`` and ``report.html`` (and ``audit.csv``) under ``out``."""
        from scforge.security.report import write_attack_report

        return write_attack_report(self, out)


def _score_predictions(truth: np.ndarray, pred: np.ndarray, triggered_pred: np.ndarray, target: str
                       ) -> dict[str, float]:
    rep = classification_metrics(truth, pred)
    return {"accuracy": rep.accuracy, "macro_f1": rep.macro_f1, "precision": rep.precision, "recall": rep.recall,
            "kappa": rep.kappa, "asr": attack_success_rate(triggered_pred, target)}


def _scores(victim: Any, test: Any, triggered: Any, label_key: str, target: str, layer: str | None
            ) -> tuple[dict[str, float], np.ndarray]:
    """The stage's metrics and its predictions on the triggered cells."""
    truth = test.obs[label_key].astype(str).to_numpy()
    triggered_pred = victim.predict(triggered, layer=layer)
    return _score_predictions(truth, victim.predict(test, layer=layer), triggered_pred, target), triggered_pred


def _relabel(adata: Any, label_key: str, flagged: np.ndarray, layer: str | None, seed: int) -> Any:
    """Flagged cells relabelled by the majority label of their 15 nearest unflagged cells (PCA of log1p CP10k)."""
    from sklearn.neighbors import NearestNeighbors

    from scforge.baselines import log1p_cp10k
    from scforge.security.detect import top_variance_pca
    from scforge.security.poison import layer_matrix

    pcs = top_variance_pca(log1p_cp10k(layer_matrix(adata, layer)), 50, seed)
    y = adata.obs[label_key].astype(str).to_numpy().copy()
    clean = np.flatnonzero(~flagged)
    k = min(15, clean.size)
    _, nbrs = NearestNeighbors(n_neighbors=k).fit(pcs[clean]).kneighbors(pcs[flagged])
    for i, row in zip(np.flatnonzero(flagged), nbrs):
        values, counts = np.unique(y[clean[row]], return_counts=True)
        y[i] = values[np.argmax(counts)]
    out = adata.copy()
    out.obs[label_key] = pd.Categorical(y)
    return out


def _strip_detection(victim: Any, test: Any, triggered: Any, clean_pool: Any, layer: str | None, n_blends: int,
                     seed: int) -> dict[str, float]:
    """STRIP entropy of clean and triggered test cells under ``victim``; AUROC of triggered vs clean."""
    import anndata as ad
    import scipy.sparse as sp

    from scforge.security.detect import detection_metrics, strip_entropy

    genes = test.var_names

    def predict_proba(matrix: Any) -> np.ndarray:
        m = sp.csr_matrix(matrix)
        m.data = np.round(m.data)  # blends of counts stay counts
        cells = ad.AnnData(m.astype(np.float32), var=pd.DataFrame(index=genes))
        if layer is not None:
            cells.layers[layer] = cells.X
        return victim.predict_proba(cells, layer=layer)

    from scforge.security.poison import layer_matrix

    pool = layer_matrix(clean_pool, layer)
    clean_s = strip_entropy(predict_proba, layer_matrix(test, layer), pool, n_blends=n_blends, seed=seed)
    trig_s = strip_entropy(predict_proba, layer_matrix(triggered, layer), pool, n_blends=n_blends, seed=seed + 1)
    truth = np.r_[np.zeros(clean_s.size, bool), np.ones(trig_s.size, bool)]
    return {"strip_auroc": detection_metrics(np.r_[clean_s, trig_s], truth)["auroc"]}


def run_attack(
    adata: Any,
    label_key: str,
    target: str,
    *,
    victim: Any = "logistic",
    rate: float = 0.05,
    trigger: Any = None,
    selection: str | None = None,
    layer: str | None = None,
    split: Any = "random",
    test_size: float = 0.2,
    defence: str | None = "remove",
    threshold: float = 5.0,
    combine: Sequence[str] | None = None,
    model_level: bool = False,
    seed: int = 0,
    clean_victim: Any = None,
    trusted_fraction: float = 0.1,
    unlearn_copies: float = 1.0,
    strip: bool = False,
    strip_blends: int = 8,
    token_knn: bool = True,
    progress: bool = False,
) -> AttackResult:
    """Run one backdoor experiment on ``adata`` (see the module docstring); ``adata`` is not changed.

    ``victim``: ``"logistic"`` (L1-LR), an scforge model or model folder (fine-tuned), or a victim
    object; ``trigger``: default :class:`~scforge.security.SparsifyTrigger` (``topnstop=2``, log1p
    CP10k of counts); ``defence``: ``"remove"`` / ``"relabel"`` the audit's flagged cells and retrain,
    ``"unlearn"`` (remove them, add ``unlearn_copies`` x as many unflagged cells carrying the trigger
    rebuilt from the flagged ones and their own labels, retrain: :func:`~scforge.security.unlearning_set`),
    ``"fine_prune"`` (model victims: :func:`~scforge.security.fine_prune` on ``trusted_fraction`` of the
    training cells, drawn from the cells that were not poisoned), or None; ``model_level``: add the
    model-level detectors (on the poisoned victim) to the audit; ``combine``: the detectors whose
    z-scores decide which cells the defence flags (:func:`~scforge.security.audit`'s ``combine``;
    default its data-level set). ``clean_victim``: an already fitted
    clean victim on the same split to reuse (sweeps pass it). ``strip``: also screen the test cells of
    the poisoned model with STRIP (``strip_blends`` blends with clean training cells each) and report
    how well its entropy separates triggered from clean test cells (``detection["strip_auroc"]``).
    ``selection``: which training cells are poisoned (:func:`~scforge.security.select_poison_cells`;
    default the published choice: ``"gini"`` for expression triggers, ``"random"`` for token triggers).

    ``trigger=RankShuffleTrigger()``: scBackdoor's Geneformer attack on tokens (module docstring); the
    victim must be a Geneformer-family model (or its :class:`~scforge.security.ModelVictim`), else
    :class:`~scforge.errors.ConfigError`. Its defence audits the poisoned tokens with
    :func:`~scforge.security.audit_tokens`, plus (``token_knn``) the kNN label detector on 50 PCs of
    the training cells' log1p CP10k expression, which the token trigger leaves untouched.
    ``model_level`` and ``strip`` read expression and are refused with a token trigger."""
    from scforge.security.audit import audit
    from scforge.security.detect import detection_metrics
    from scforge.security.poison import layer_matrix, poison
    from scforge.security.triggers import SparsifyTrigger
    from scforge.security.victims import as_victim

    if defence is not None and defence not in ACTIONS:
        raise ConfigError(f"defence={defence!r}; choose one of {ACTIONS} or None.")
    if defence == "unlearn":
        check_copies(unlearn_copies)
    obs_labels(adata, label_key, what="the attack experiment")
    trigger = SparsifyTrigger() if trigger is None else trigger
    if getattr(trigger, "name", "") == "rank_shuffle":
        if model_level or strip or combine is not None:
            raise ConfigError("model_level, strip and combine apply to expression-level inputs; with the token "
                              "trigger RankShuffleTrigger leave them off (the defence audits the tokens).")
        return _run_token_attack(adata, label_key, str(target), victim=victim, rate=rate, trigger=trigger,
                                 selection=selection or "random", layer=layer, split=split, test_size=test_size,
                                 defence=defence, threshold=threshold, seed=seed, clean_victim=clean_victim,
                                 trusted_fraction=trusted_fraction, token_knn=token_knn,
                                 unlearn_copies=unlearn_copies)
    from scforge.security.audit import DATA_DETECTORS, MODEL_DETECTORS, check_combine

    combine = check_combine(combine, DATA_DETECTORS + (MODEL_DETECTORS if model_level else ()))
    selection = selection or "gini"
    victim = as_victim(victim, seed=seed)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train_idx, test_idx = split_cells(adata, label_key, split=split, test_size=test_size, seed=seed)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    target = str(target)
    if target not in set(train.obs[label_key].astype(str)):
        raise InputDataError(f"target {target!r} is not a label of the training cells; labels are "
                             f"{sorted(set(train.obs[label_key].astype(str)))}.")
    non_target = test[test.obs[label_key].astype(str).to_numpy() != target].copy()
    triggered = trigger_cells(non_target, trigger, layer=layer, seed=seed + 1)
    settings = {"label_key": label_key, "target": target, "rate": float(rate), "selection": selection,
                "victim": getattr(victim, "name", type(victim).__name__), "split": split if isinstance(split, str)
                else list(split), "test_size": test_size, "defence": defence, "threshold": threshold,
                "combine": None if combine is None else list(combine), "seed": seed, "n_train": int(train.n_obs),
                "n_test": int(test.n_obs), "n_triggered_test": int(non_target.n_obs),
                **trigger.describe()}
    rows = []
    per_cell = pd.DataFrame({"label": non_target.obs[label_key].astype(str).to_numpy()},
                            index=pd.Index(non_target.obs_names.astype(str), name="obs_name"))
    if hasattr(trigger, "n_kept"):
        per_cell["n_kept"] = trigger.n_kept(layer_matrix(non_target, layer))

    def score(stage: str, fitted: Any) -> None:
        metrics, per_cell[f"pred_{stage}"] = _scores(fitted, test, triggered, label_key, target, layer)
        rows.extend((stage, m, v) for m, v in metrics.items())

    clean = clean_victim if clean_victim is not None else victim.fit(train, label_key, layer=layer)
    seconds["clean_fit"] = time.perf_counter() - t0
    score("clean", clean)

    t1 = time.perf_counter()
    poisoned = poison(train, label_key, target, rate=rate, trigger=trigger, selection=selection, layer=layer,
                      seed=seed)
    settings["n_poisoned"] = poisoned.n_poisoned
    if "n_kept" in per_cell and poisoned.n_poisoned:  # how sparse the poisons are against the test-time trigger
        settings["n_kept_median_poisoned"] = float(np.median(
            trigger.n_kept(layer_matrix(train, layer)[poisoned.poisoned])))
        settings["n_kept_median_triggered_test"] = float(per_cell["n_kept"].median())
    bad = victim.fit(poisoned.adata, label_key, layer=layer)
    seconds["poisoned_fit"] = time.perf_counter() - t1
    score("poisoned", bad)

    detection: dict[str, float] = {}
    if strip:
        t_strip = time.perf_counter()
        detection.update(_strip_detection(bad, test, triggered, train, layer, strip_blends, seed))
        seconds["strip"] = time.perf_counter() - t_strip
    table = None
    if defence is not None:
        t2 = time.perf_counter()
        table = audit(poisoned.adata, label_key, layer=layer, model=bad if model_level else None,
                      threshold=threshold, combine=combine, seed=seed)
        seconds["audit"] = time.perf_counter() - t2
        flagged = table["flagged"].to_numpy()
        detection = detection_metrics(table["score"].to_numpy(), poisoned.poisoned, flagged)
        for col in [c for c in table.columns if c.endswith("_z")]:
            detection[f"auroc_{col[:-2]}"] = detection_metrics(table[col].to_numpy(), poisoned.poisoned).get(
                "auroc", float("nan"))
        t3 = time.perf_counter()
        if defence == "fine_prune":
            if not hasattr(bad, "fine_prune"):
                raise ConfigError("defence='fine_prune' needs a fine-tuned model victim (not the logistic baseline).")
            clean_rows = np.flatnonzero(~poisoned.poisoned)
            n_trusted = max(2, int(round(trusted_fraction * clean_rows.size)))
            trusted = np.sort(np.random.default_rng(seed).choice(clean_rows, size=n_trusted, replace=False))
            fixed = bad.fine_prune(train[trusted].copy(), label_key, layer=layer)
            extra = ("n_trusted", float(n_trusted))
        else:
            if defence == "remove":
                cleaned = poisoned.adata[~flagged].copy()
            elif defence == "unlearn":
                cleaned, info = unlearning_set(poisoned.adata, label_key, flagged, layer=layer,
                                               copies=unlearn_copies, seed=seed)
                settings["unlearn"] = info
                rows.append(("defended", "n_unlearn_copies", float(info["n_added"])))
            else:
                cleaned = _relabel(poisoned.adata, label_key, flagged, layer, seed)
            fixed = victim.fit(cleaned, label_key, layer=layer)
            extra = ("n_relabelled" if defence == "relabel" else "n_removed", float(flagged.sum()))
        seconds["defended_fit"] = time.perf_counter() - t3
        score("defended", fixed)
        rows.append(("defended", *extra))
    seconds["total"] = time.perf_counter() - t0
    tidy = pd.DataFrame(rows, columns=["stage", "metric", "value"])
    logger.info("attack %s -> %s: %s", settings["victim"], target,
                tidy[tidy.metric.isin(["accuracy", "asr"])].to_dict("records"))
    return AttackResult(tidy, detection, settings, table, seconds, per_cell)


def _run_token_attack(adata: Any, label_key: str, target: str, *, victim: Any, rate: float, trigger: Any,
                      selection: str, layer: str | None, split: Any, test_size: float, defence: str | None,
                      threshold: float, seed: int, clean_victim: Any, trusted_fraction: float,
                      unlearn_copies: float,
                      token_knn: bool) -> AttackResult:
    """:func:`run_attack` with a token trigger (scBackdoor's Geneformer attack); see the module docstring."""
    from scforge.baselines import log1p_cp10k
    from scforge.security.audit import audit_tokens
    from scforge.security.detect import detection_metrics, top_variance_pca
    from scforge.security.poison import gini_coefficient, layer_matrix, poison_tokens
    from scforge.security.victims import as_victim, require_token_victim

    victim = require_token_victim(as_victim(victim, seed=seed))
    if clean_victim is not None:
        require_token_victim(clean_victim)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    train_idx, test_idx = split_cells(adata, label_key, split=split, test_size=test_size, seed=seed)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    y_train = train.obs[label_key].astype(str).to_numpy()
    y_test = test.obs[label_key].astype(str).to_numpy()
    if target not in set(y_train):
        raise InputDataError(f"target {target!r} is not a label of the training cells; labels are "
                             f"{sorted(set(y_train))}.")
    train_cells = victim.tokenize(train, layer=layer)
    test_cells = victim.tokenize(test, layer=layer)
    triggered = trigger.apply(test_cells.select(np.flatnonzero(y_test != target)), None, seed=seed + 1)
    seconds["tokenize"] = time.perf_counter() - t0
    settings = {"label_key": label_key, "target": target, "rate": float(rate), "selection": selection,
                "victim": victim.name, "input": "rank-value tokens", "max_length": victim.token_backend().settings(
                    victim.kwargs["max_length"], seed)["max_length"], "split": split if isinstance(split, str)
                else list(split),
                "test_size": test_size, "defence": defence, "threshold": threshold, "seed": seed,
                "n_train": int(train.n_obs), "n_test": int(test.n_obs), "n_triggered_test": int(triggered.n_cells),
                **trigger.describe()}

    is_triggered = y_test != target
    per_cell = pd.DataFrame({"label": y_test[is_triggered]},
                            index=pd.Index(test.obs_names[is_triggered].astype(str), name="obs_name"))

    def scores(fitted: Any, stage: str) -> dict[str, float]:
        pred = fitted.predict_tokens(test_cells)
        per_cell[f"pred_{stage}"] = fitted.predict_tokens(triggered)
        return _score_predictions(y_test, pred, per_cell[f"pred_{stage}"].to_numpy(), target)

    t1 = time.perf_counter()
    clean = clean_victim if clean_victim is not None else victim.fit_tokens(train_cells, y_train, label_key)
    seconds["clean_fit"] = time.perf_counter() - t1
    rows = [("clean", m, v) for m, v in scores(clean, "clean").items()]

    t1 = time.perf_counter()
    gini = None if selection == "random" else gini_coefficient(layer_matrix(train, layer))
    cells, y_poisoned, poisoned = poison_tokens(train_cells, y_train, target, rate=rate, trigger=trigger,
                                                selection=selection, gini=gini, seed=seed)
    settings["n_poisoned"] = int(poisoned.sum())
    bad = victim.fit_tokens(cells, y_poisoned, label_key)
    seconds["poisoned_fit"] = time.perf_counter() - t1
    rows += [("poisoned", m, v) for m, v in scores(bad, "poisoned").items()]

    detection: dict[str, float] = {}
    table = None
    if defence is not None:
        t2 = time.perf_counter()
        pcs = top_variance_pca(log1p_cp10k(layer_matrix(train, layer)), 50, seed) if token_knn else None
        table = audit_tokens(cells, y_poisoned, embedding=pcs, threshold=threshold, label_key=label_key)
        seconds["audit"] = time.perf_counter() - t2
        flagged = table["flagged"].to_numpy()
        detection = detection_metrics(table["score"].to_numpy(), poisoned, flagged)
        for col in [c for c in table.columns if c.endswith("_z")]:
            detection[f"auroc_{col[:-2]}"] = detection_metrics(table[col].to_numpy(), poisoned).get(
                "auroc", float("nan"))
        t3 = time.perf_counter()
        if defence == "fine_prune":  # trusted: clean training cells, tokenized from their (untouched) counts
            clean_rows = np.flatnonzero(~poisoned)
            n_trusted = max(2, int(round(trusted_fraction * clean_rows.size)))
            trusted = np.sort(np.random.default_rng(seed).choice(clean_rows, size=n_trusted, replace=False))
            fixed = bad.fine_prune(train[trusted].copy(), label_key, layer=layer)
            extra = ("n_trusted", float(n_trusted))
        elif defence == "remove":
            fixed = victim.fit_tokens(cells.select(np.flatnonzero(~flagged)), y_poisoned[~flagged], label_key)
            extra = ("n_removed", float(flagged.sum()))
        elif defence == "unlearn":
            kept, kept_y, info = unlearning_tokens(cells, y_poisoned, flagged, copies=unlearn_copies, seed=seed)
            settings["unlearn"] = info
            rows.append(("defended", "n_unlearn_copies", float(info["n_added"])))
            fixed = victim.fit_tokens(kept, kept_y, label_key)
            extra = ("n_removed", float(flagged.sum()))
        else:
            labelled = train.copy()
            labelled.obs[label_key] = pd.Categorical(y_poisoned)
            relabelled = _relabel(labelled, label_key, flagged, layer, seed).obs[label_key].astype(str).to_numpy()
            fixed = victim.fit_tokens(cells, relabelled, label_key)
            extra = ("n_relabelled", float(flagged.sum()))
        seconds["defended_fit"] = time.perf_counter() - t3
        rows += [("defended", m, v) for m, v in scores(fixed, "defended").items()]
        rows.append(("defended", *extra))
    seconds["total"] = time.perf_counter() - t0
    tidy = pd.DataFrame(rows, columns=["stage", "metric", "value"])
    logger.info("token attack %s -> %s: %s", settings["victim"], target,
                tidy[tidy.metric.isin(["accuracy", "asr"])].to_dict("records"))
    return AttackResult(tidy, detection, settings, table, seconds, per_cell)


def sweep_attack(
    adata: Any,
    label_key: str,
    *,
    targets: Sequence[str],
    rates: Sequence[float] = (0.05,),
    topnstops: Sequence[float] = (2.0,),
    victim: Any = "logistic",
    split: Any = "random",
    scale: str = "log1p",
    seed: int = 0,
    **kwargs: Any,
) -> pd.DataFrame:
    """:func:`run_attack` over targets x rates x ``topnstop`` thresholds (the clean victim is fitted once
    per split and reused; ``scale`` as in :class:`~scforge.security.SparsifyTrigger`). One tidy table: the settings columns plus stage, metric, value."""
    from scforge.security.triggers import SparsifyTrigger
    from scforge.security.victims import as_victim

    if not targets:
        raise ConfigError("sweep_attack needs at least one target label.")
    victim = as_victim(victim, seed=seed)
    train_idx, _ = split_cells(adata, label_key, split=split, test_size=kwargs.get("test_size", 0.2), seed=seed)
    clean = victim.fit(adata[train_idx].copy(), label_key, layer=kwargs.get("layer"))
    parts = []
    for target in targets:
        for rate in rates:
            for stop in topnstops:
                res = run_attack(adata, label_key, target, victim=victim, rate=rate, split=split, seed=seed,
                                 trigger=SparsifyTrigger(topnstop=float(stop), scale=scale),
                                 clean_victim=clean, **kwargs)
                parts.append(res.tidy())
    return pd.concat(parts, ignore_index=True)

