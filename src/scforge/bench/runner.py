"""Run an experiment matrix: every (dataset, method, mode, fraction, seed) unit once, cached and resumable.

Units write their tidy rows to ``<output>/parts/`` as they finish; a rerun reads finished units back
and computes only new or changed ones (keys hash the data, model and settings), so a crashed or
interrupted run resumes where it stopped. Embeddings are cached by (model, dataset, settings) hash
under the cache folder. At the end all rows go to ``results.parquet`` / ``results.csv`` and the
HTML report is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.bench.cache import ArrayCache, PartStore, atomic_write_text, fingerprint, stable_hash
from scforge.bench.config import TRAINING_MODES, DatasetSpec, MatrixConfig, ModelSpec, load_config
from scforge.bench.splits import Split, few_shot_splits
from scforge.tasks.embed import embed_cells, supports_training  # noqa: F401 (re-exported)
from scforge.errors import ConfigError, InputDataError

logger = logging.getLogger(__name__)

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "precision", "recall", "kappa")
RESULT_COLUMNS = ["dataset", "method", "kind", "mode", "seed", "fraction", "metric", "value", "n_train", "n_test"]
BASELINE_LABELS = {"logistic_l1": "L1 logistic regression", "pca_knn": "HVG+PCA kNN",
                   "pca_logistic": "HVG+PCA logistic", "pca": "HVG+PCA (unintegrated)", "harmony": "Harmony"}


@dataclass
class Unit:
    """One cell of the matrix."""

    task: str  # "annotation" | "integration"
    dataset: str
    method: str  # a baseline name or a model name
    kind: str  # "baseline" | "model"
    mode: str
    seed: int
    fraction: float
    settings: dict[str, Any]

    @property
    def label(self) -> str:
        if self.task == "integration":
            return f"{self.dataset} integration {self.method}"
        return f"{self.dataset} {self.method}/{self.mode} fraction {self.fraction:g} seed {self.seed}"

    def uid(self) -> str:
        return f"{self.task}-{self.dataset}-{self.method}-{self.mode}-{stable_hash(self.__dict__, 20)}"


@dataclass
class MatrixRun:
    """What :func:`run_matrix` did: the tidy results, how many units ran or were reused, and the files."""

    config: MatrixConfig
    results: pd.DataFrame
    computed: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


class _Dataset:
    def __init__(self, spec: DatasetSpec, memo: Path) -> None:
        import anndata as ad

        if not spec.path.is_file():
            raise InputDataError(f"dataset {spec.name}: {spec.path} not found.")
        self.spec = spec
        self.fingerprint = fingerprint(spec.path, memo)
        self.adata = ad.read_h5ad(spec.path)
        obs = self.adata.obs
        if spec.label_key not in obs:
            raise InputDataError(f"dataset {spec.name}: obs has no column {spec.label_key!r} (label_key); columns: "
                                 f"{list(obs.columns)[:20]}.")
        if spec.batch_key is not None and spec.batch_key not in obs:
            raise InputDataError(f"dataset {spec.name}: obs has no column {spec.batch_key!r} (batch_key); columns: "
                                 f"{list(obs.columns)[:20]}.")
        if spec.layer is not None and spec.layer not in self.adata.layers:
            raise InputDataError(f"dataset {spec.name}: no layer {spec.layer!r}; layers: {list(self.adata.layers)}.")
        labels = obs[spec.label_key]
        self.labelled = np.flatnonzero(labels.notna().to_numpy())
        if self.labelled.size == 0:
            raise InputDataError(f"dataset {spec.name}: no cell has a label in obs[{spec.label_key!r}].")
        self.labels = labels.iloc[self.labelled].astype(str).to_numpy()
        self.batches = None
        if spec.batch_key is not None:
            b = obs[spec.batch_key]
            if b.isna().any():
                raise InputDataError(f"dataset {spec.name}: {int(b.isna().sum())} cells have no batch in "
                                     f"obs[{spec.batch_key!r}].")
            self.batches = b.astype(str).to_numpy()

    def cells(self, positions: np.ndarray, genes: np.ndarray | None = None):
        """A copy of the labelled cells at ``positions`` (positions index the labelled cells), of the
        genes at ``genes`` (all when None)."""
        rows = self.labelled[positions]
        return (self.adata[rows] if genes is None else self.adata[rows, genes]).copy()


class _Runner:
    def __init__(self, config: MatrixConfig, log: Callable[[str], None]) -> None:
        self.config, self.log = config, log
        self.cache = config.cache_dir
        self.memo = self.cache / "fingerprints.json"
        self.arrays = ArrayCache(self.cache / "embeddings")
        self.parts = PartStore(config.output / "parts")
        self._datasets: dict[str, _Dataset] = {}
        self._models: dict[str, tuple[Any, str]] = {}
        self._model_fp: dict[str, str] = {}
        self._hvgs: dict[tuple[str, int], np.ndarray] = {}
        self._splits: dict[str, list[Split]] = {}
        self.model_specs = {m.name: m for m in config.models}

    # ---- inputs ------------------------------------------------------------------------------------
    def dataset(self, spec: DatasetSpec) -> _Dataset:
        if spec.name not in self._datasets:
            self._datasets[spec.name] = _Dataset(spec, self.memo)
        return self._datasets[spec.name]

    def model_fingerprint(self, spec: ModelSpec) -> str:
        if spec.name not in self._model_fp:
            from scforge.models import default_model_path

            path = default_model_path() if spec.path == "default" else spec.path
            if not Path(path).exists():
                raise ConfigError(f"model {spec.name}: {spec.path} not found.")
            self._model_fp[spec.name] = fingerprint(path, self.memo)
        return self._model_fp[spec.name]

    def model(self, spec: ModelSpec) -> Any:
        if spec.name not in self._models:
            import scforge

            self._models[spec.name] = scforge.load(spec.path)
        return self._models[spec.name]

    def splits(self, ds: _Dataset) -> list[Split]:
        c = self.config
        if ds.spec.name not in self._splits:
            self._splits[ds.spec.name] = few_shot_splits(ds.labels, c.fractions, c.seeds, test_size=c.test_size,
                                                         split_seed=c.split_seed)
        return self._splits[ds.spec.name]

    # ---- embeddings (all cells of a dataset, cached) ------------------------------------------------
    def _cached(self, key_parts: dict[str, Any], compute: Callable[[], np.ndarray], what: str) -> np.ndarray:
        key = f"{key_parts['name']}-{key_parts['dataset']}-{stable_hash(key_parts, 20)}"
        hit = self.arrays.get(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        emb = np.asarray(compute(), dtype=np.float32)
        self.arrays.put(key, emb, {**key_parts, "seconds": time.perf_counter() - t0, "shape": list(emb.shape)})
        self.log(f"  embedded {what}: {emb.shape[0]} cells x {emb.shape[1]} ({time.perf_counter() - t0:.0f} s)")
        return emb

    def pca(self, ds: _Dataset) -> np.ndarray:
        from scforge.baselines import hvg_pca

        c = self.config
        parts = {"name": "pca", "dataset": ds.spec.name, "data": ds.fingerprint, "layer": ds.spec.layer,
                 "n_top_genes": c.n_top_genes, "n_pcs": c.n_pcs, "seed": c.split_seed}
        return self._cached(parts, lambda: hvg_pca(ds.adata, n_top_genes=c.n_top_genes, n_comps=c.n_pcs,
                                                   layer=ds.spec.layer, seed=c.split_seed), f"{ds.spec.name} HVG+PCA")

    def harmony(self, ds: _Dataset) -> np.ndarray:
        from scforge.baselines import harmony_integrate

        c = self.config
        parts = {"name": "harmony", "dataset": ds.spec.name, "data": ds.fingerprint, "layer": ds.spec.layer,
                 "batch_key": ds.spec.batch_key, "n_top_genes": c.n_top_genes, "n_pcs": c.n_pcs, "seed": c.split_seed}
        return self._cached(parts, lambda: harmony_integrate(self.pca(ds), ds.batches, seed=c.split_seed),
                            f"{ds.spec.name} Harmony")

    def model_genes(self, ds: _Dataset, spec: ModelSpec) -> np.ndarray | None:
        """Positions of the genes the model reads (its ``n_hvg`` HVGs of the whole dataset), or None for all."""
        if spec.n_hvg is None:
            return None
        key = (ds.spec.name, spec.n_hvg)
        if key not in self._hvgs:
            from scforge.baselines import highly_variable_genes

            self._hvgs[key] = np.flatnonzero(highly_variable_genes(ds.adata, spec.n_hvg, layer=ds.spec.layer))
        return self._hvgs[key]

    def model_input(self, ds: _Dataset, spec: ModelSpec) -> Any:
        """All of the dataset's cells, restricted to the genes the model reads (a copy when restricted)."""
        genes = self.model_genes(ds, spec)
        return ds.adata if genes is None else ds.adata[:, genes].copy()

    def model_embedding(self, ds: _Dataset, spec: ModelSpec) -> np.ndarray:
        parts = {"name": spec.name, "dataset": ds.spec.name, "data": ds.fingerprint, "layer": ds.spec.layer,
                 "model": self.model_fingerprint(spec), "max_length": spec.max_length, **_hvg_part(spec)}
        return self._cached(parts, lambda: embed_cells(self.model(spec), self.model_input(ds, spec),
                                                       layer=ds.spec.layer, batch_size=spec.batch_size,
                                                       max_length=spec.max_length),
                            f"{ds.spec.name} with {spec.name}")

    def integrated(self, ds: _Dataset, spec: ModelSpec) -> np.ndarray:
        """Embeddings after scGPT's integration fine-tuning (all cells; cached like the others)."""
        from scforge.tasks.integrate import IntegrationSettings, fine_tune_integration

        c = self.config
        parts = {"name": f"{spec.name}-integrated", "dataset": ds.spec.name, "data": ds.fingerprint,
                 "layer": ds.spec.layer, "model": self.model_fingerprint(spec), "batch_key": ds.spec.batch_key,
                 "settings": c.integration_finetune, "seed": c.split_seed, **_hvg_part(spec)}

        def compute() -> np.ndarray:
            cells = self.model_input(ds, spec)
            tuned = fine_tune_integration(self.model(spec), cells, ds.spec.batch_key, layer=ds.spec.layer,
                                          settings=IntegrationSettings(**c.integration_finetune), seed=c.split_seed,
                                          progress=False)
            return tuned.embed(cells, ds.spec.layer, key_added=None)

        return self._cached(parts, compute, f"{ds.spec.name} with {spec.name} (integration fine-tune)")

    def embedding(self, ds: _Dataset, name: str) -> np.ndarray:
        if name == "pca":
            return self.pca(ds)
        if name == "harmony":
            return self.harmony(ds)
        return self.model_embedding(ds, self.model_specs[name])

    # ---- units -------------------------------------------------------------------------------------
    def units(self) -> tuple[list[Unit], list[str]]:
        c, units, skipped = self.config, [], []
        for dspec in c.datasets:
            ds = self.dataset(dspec)
            base = {"data": ds.fingerprint, "label_key": dspec.label_key, "layer": dspec.layer,
                    "test_size": c.test_size, "split_seed": c.split_seed}
            if c.annotation:
                for split in self.splits(ds):
                    for b in c.baselines:
                        s = dict(base)
                        if b == "logistic_l1":
                            s["C"] = c.logistic_C
                        else:
                            s.update(n_pcs=c.n_pcs, n_top_genes=c.n_top_genes,
                                     **({"n_neighbors": c.n_neighbors} if b == "pca_knn" else {"C": c.probe_C}))
                        units.append(Unit("annotation", dspec.name, b, "baseline", "baseline", split.seed,
                                          split.fraction, s))
                    for mspec in c.models:
                        trainable = supports_training(self.model(mspec))
                        for mode in c.modes:
                            if mode in TRAINING_MODES and (
                                    (c.train_seeds is not None and split.seed not in c.train_seeds)
                                    or (c.train_fractions is not None and split.fraction not in c.train_fractions)):
                                continue
                            if mode in TRAINING_MODES and not trainable:
                                msg = (f"{mspec.name}/{mode}: this model family has no classification head in "
                                       "scforge; only the embedding modes (knn, linear_probe) run")
                                if msg not in skipped:
                                    skipped.append(msg)
                                continue
                            s = {**base, "model": self.model_fingerprint(mspec), "max_length": mspec.max_length,
                                 **_hvg_part(mspec)}
                            if mode == "knn":
                                s["n_neighbors"] = c.n_neighbors
                            elif mode == "linear_probe":
                                s["C"] = c.probe_C
                            else:
                                s["training"] = c.training.__dict__
                            units.append(Unit("annotation", dspec.name, mspec.name, "model", mode, split.seed,
                                              split.fraction, s))
            if c.integration and dspec.batch_key is not None:
                names = [("pca", "baseline"), ("harmony", "baseline")] + [(m.name, "model") for m in c.models]
                for name, kind in names:
                    s = {"data": ds.fingerprint, "label_key": dspec.label_key, "batch_key": dspec.batch_key,
                         "layer": dspec.layer, "n_pcs": c.n_pcs, "n_top_genes": c.n_top_genes, "seed": c.split_seed}
                    if kind == "model":
                        m = self.model_specs[name]
                        s.update(model=self.model_fingerprint(m), max_length=m.max_length, **_hvg_part(m))
                    units.append(Unit("integration", dspec.name, name, kind, "zero_shot" if kind == "model"
                                      else "baseline", c.split_seed, float("nan"), s))
                    if kind == "model" and c.integration_finetune is not None:
                        if not _is_scgpt(self.model(self.model_specs[name])):
                            msg = f"{name}/integration fine-tune: scGPT's recipe needs an scGPT-family model"
                            if msg not in skipped:
                                skipped.append(msg)
                            continue
                        units.append(Unit("integration", dspec.name, name, kind, "fine_tune", c.split_seed,
                                          float("nan"), {**s, "integration_finetune": c.integration_finetune}))
        return units, skipped

    def run_unit(self, unit: Unit) -> pd.DataFrame:
        ds = self._datasets[unit.dataset]
        if unit.task == "integration":
            return self._integration(unit, ds)
        split = next(s for s in self.splits(ds) if s.seed == unit.seed and s.fraction == unit.fraction)
        t0 = time.perf_counter()
        pred = self._predict(unit, ds, split)
        seconds = time.perf_counter() - t0
        from scforge.metrics import classification_metrics

        y_test = ds.labels[split.test]
        report = classification_metrics(y_test, np.asarray(pred).astype(str),
                                        labels=sorted(set(ds.labels[split.train]) | set(y_test)))
        values = {m: getattr(report, m) for m in CLASSIFICATION_METRICS}
        values["seconds"] = seconds
        return _rows(unit, values, n_train=split.train.size, n_test=split.test.size)

    def _predict(self, unit: Unit, ds: _Dataset, split: Split) -> np.ndarray:
        from scforge.baselines import EmbeddingClassifier, LogisticBaseline

        c, y = self.config, ds.labels
        if unit.method == "logistic_l1":
            base = LogisticBaseline(C=c.logistic_C, seed=unit.seed)
            base.fit(ds.cells(split.train), y[split.train], layer=ds.spec.layer)
            return base.predict(ds.cells(split.test), layer=ds.spec.layer)
        if unit.method in ("pca_knn", "pca_logistic") or unit.mode in ("knn", "linear_probe"):
            name = "pca" if unit.kind == "baseline" else unit.method
            emb = self.embedding(ds, name)[ds.labelled]
            knn = unit.method == "pca_knn" or unit.mode == "knn"
            clf = EmbeddingClassifier("knn" if knn else "logistic", n_neighbors=c.n_neighbors, C=c.probe_C,
                                      seed=unit.seed)
            clf.fit(emb[split.train], y[split.train])
            return clf.predict(emb[split.test])
        return self._train(unit, ds, split)

    def _train(self, unit: Unit, ds: _Dataset, split: Split) -> np.ndarray:
        from scforge.models.ablation import embedding_prefixes, untrained_copy
        from scforge.tasks.annotate import fine_tune

        c, spec = self.config.training, self.model_specs[unit.method]
        model = self.model(spec)
        freeze: tuple[str, ...] = ()
        if unit.mode != "fine_tune":
            model = untrained_copy(model, seed=unit.seed)
            if unit.mode == "no_pretraining_frozen":
                freeze = embedding_prefixes(model)
        genes = self.model_genes(ds, spec)
        train = ds.cells(split.train, genes)
        tuned = fine_tune(model, train, ds.spec.label_key, layer=ds.spec.layer, epochs=c.epochs, lr=c.lr,
                          batch_size=c.batch_size, max_length=c.max_length or spec.max_length,
                          val_fraction=c.val_fraction, freeze=freeze, seed=unit.seed, progress=False)
        proba = tuned.predict(ds.cells(split.test, genes), layer=ds.spec.layer, progress=False)
        return proba.columns.to_numpy()[proba.to_numpy().argmax(1)]

    def _integration(self, unit: Unit, ds: _Dataset) -> pd.DataFrame:
        from scforge.metrics import integration_metrics

        t0 = time.perf_counter()
        lab = ds.labelled
        embs = {"pca": self.pca(ds)[lab]}
        if unit.mode == "fine_tune":
            embs[unit.method] = self.integrated(ds, self.model_specs[unit.method])[lab]
        elif unit.method != "pca":
            embs[unit.method] = self.embedding(ds, unit.method)[lab]
        # the unintegrated PCA is PCR's reference; its own row is the "pca" unit's, not scored again here
        report = integration_metrics(embs, ds.labels, ds.batches[lab], unintegrated="pca", seed=unit.seed,
                                     score_unintegrated=unit.method == "pca")
        row = report.table.loc[unit.method]
        values = {str(k): float(v) for k, v in row.items() if pd.notna(v)}
        values["seconds"] = time.perf_counter() - t0
        return _rows(unit, values, n_train=0, n_test=int(lab.size))


def _rows(unit: Unit, values: dict[str, float], *, n_train: int, n_test: int) -> pd.DataFrame:
    return pd.DataFrame({
        "dataset": unit.dataset, "method": unit.method, "kind": unit.kind, "mode": unit.mode,
        "seed": int(unit.seed), "fraction": float(unit.fraction), "metric": list(values),
        "value": [float(v) for v in values.values()], "n_train": int(n_train), "n_test": int(n_test),
        "task": unit.task,
    })


def _hvg_part(spec: ModelSpec) -> dict[str, int]:
    """The cache-key entry for a model's gene restriction (absent for all genes, so old keys hold)."""
    return {} if spec.n_hvg is None else {"n_hvg": spec.n_hvg}


def _is_scgpt(model: Any) -> bool:
    from scforge.models.scgpt import ScGPT

    return isinstance(model, ScGPT)


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_matrix(config: MatrixConfig | str | os.PathLike, *, fresh: bool = False, report: bool = True,
               log: Callable[[str], None] | None = _stderr) -> MatrixRun:
    """Run (or resume) the experiment matrix of ``config`` (a :class:`MatrixConfig` or a config path).

    ``fresh=True`` ignores finished units and recomputes them (cached embeddings are still reused).
    Returns the tidy results (one row per dataset/method/mode/seed/fraction/metric) and writes
    ``results.parquet``, ``results.csv``, ``config.json`` and (``report``) ``report.html`` to the
    config's output folder."""
    if not isinstance(config, MatrixConfig):
        config = load_config(config)
    with _quiet_lightning():
        return _run(config, fresh=fresh, report=report, say=log or (lambda _msg: None))


@contextlib.contextmanager
def _quiet_lightning():
    """Lightning's per-fit banners (devices, tips, 'max_epochs reached') would drown the matrix's own
    progress lines: raise its loggers to WARNING while the matrix runs."""
    import lightning.pytorch  # noqa: F401 - its import sets its loggers to INFO; set ours after it
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric", "lightning")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _run(config: MatrixConfig, *, fresh: bool, report: bool, say: Callable[[str], None]) -> MatrixRun:
    runner = _Runner(config, say)
    units, skipped = runner.units()
    for s in skipped:
        say(f"skipped: {s}")
    run = MatrixRun(config=config, results=pd.DataFrame(columns=RESULT_COLUMNS), skipped=skipped)
    frames = []
    for i, unit in enumerate(units, 1):
        uid = unit.uid()
        if runner.parts.has(uid) and not fresh:
            frames.append(runner.parts.read(uid))
            run.reused.append(uid)
            continue
        say(f"[{i}/{len(units)}] {unit.label}")
        rows = runner.run_unit(unit)
        runner.parts.write(uid, rows)
        frames.append(rows)
        run.computed.append(uid)
        main = rows[rows.metric.isin(["accuracy", "avg_bio"])]
        if len(main):
            say(f"  {main.metric.iloc[0]} {main.value.iloc[0]:.3f} "
                f"({rows.loc[rows.metric == 'seconds', 'value'].iloc[0]:.1f} s)")
    results = pd.concat(frames, ignore_index=True) if frames else run.results
    run.results = results
    out = config.output
    out.mkdir(parents=True, exist_ok=True)
    run.files["parquet"], run.files["csv"] = out / "results.parquet", out / "results.csv"
    tmp = out / f".results.{os.getpid()}.tmp.parquet"
    results.to_parquet(tmp, index=False)
    os.replace(tmp, run.files["parquet"])
    atomic_write_text(run.files["csv"], results.to_csv(index=False))
    run.files["config"] = out / "config.json"
    atomic_write_text(run.files["config"], json.dumps(config.to_dict(), indent=1))
    if report:
        from scforge.bench.report import write_report

        embeddings = {}
        if config.umap:
            for dspec in config.datasets:
                ds = runner.dataset(dspec)
                names = (["pca"] + (["harmony"] if config.integration and ds.batches is not None else [])
                         + [m.name for m in config.models])
                embeddings[dspec.name] = {
                    "embeddings": {n: runner.embedding(ds, n) for n in names},
                    "labels": ds.adata.obs[dspec.label_key].astype(object).to_numpy(),
                    "batches": ds.batches,
                }
        run.files["report"] = write_report(results, out / "report.html", title=config.name,
                                           embeddings=embeddings, cache=runner.arrays, skipped=skipped)
    say(f"{len(run.computed)} units computed, {len(run.reused)} reused; results in {run.files['parquet']}")
    return run
