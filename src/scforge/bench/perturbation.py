"""Perturbation benchmarks: ``scforge bench config.yaml`` on a config with ``task: perturbation``.

For each split seed, every baseline is fitted on the training groups' pseudobulk profiles and every model
is fine-tuned on the training groups' cells; both predict the mean expression of the test groups, which
:func:`~scforge.metrics.perturbation.evaluate_perturbations` scores. A *group* is a ``(condition, context)``
pair (context ``None`` for data of one cell population). Each (method, seed) result is a part CSV under
``<output>/parts/`` whose name hashes the data file and every setting it depends on, so a rerun computes
only new or changed units. Outputs: ``results.csv`` / ``results.parquet`` (tidy), ``summary.csv``,
``config.json`` and a self-contained ``report.html``. See ``docs/perturbation_bench.md``.
"""

from __future__ import annotations

import dataclasses
import html
import json
import logging
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.baselines.perturbation import baseline_registry
from scforge.bench.cache import atomic_write_text, fingerprint, stable_hash
from scforge.bench.config import _local, _read, shared_data_dir
from scforge.data.perturbation import GEARS_FILE, RANKING_KEY, PerturbationSplit
from scforge.errors import ConfigError

logger = logging.getLogger("scforge")

TASK = "perturbation"
FORMATS = ("gears", "anndata")
SPLIT_KINDS = ("simulation", "heldout", "context")
GO_BASELINES = ("knn_go", "rf_go")
DEFAULT_BASELINES = ("no_change", "train_mean", "additive", "linear")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MAIN_METRICS = ("pearson_delta", "pearson_delta_de", "mse")  # plus every l2_top<k>
RESULT_COLUMNS = ["dataset", "method", "kind", "condition", "context", "subgroup", "seed", "metric", "value",
                  "fallback"]
_TOP_KEYS = ("top_non_dropout_de_20", "top_non_zero_de_20", "non_dropout_gene_idx", "non_zeros_gene_idx")
_PART_VERSION = 1
_CHUNK = 8192

Group = tuple[str, "str | None"]


# ------------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class DatasetConfig:
    """The perturbation experiment: a GEARS ``perturb_processed.h5ad`` (file or folder) or any h5ad with a
    perturbation column (``format: anndata``). ``genes``: keep the N most variable genes plus the perturbed ones."""

    path: Path
    name: str
    format: str | None = None  # None: "gears" when obs has 'condition' and 'condition_name', else an error
    perturbation_key: str | None = None
    control: str | None = None
    context_key: str | None = None
    layer: str | None = None
    gene_symbols: str | None = None
    perturbation_genes: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    genes: int | None = None
    strict: bool = True


@dataclass(frozen=True)
class SplitConfig:
    """Which groups are held out, per seed: GEARS ``simulation``, random ``heldout`` conditions, or every
    group of the held-out ``contexts`` (``context``; val drawn from the other groups)."""

    kind: str = "simulation"
    seeds: tuple[int, ...] = (1,)
    train_gene_set_size: float = 0.75
    combo_seen2_train_frac: float = 0.75
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    contexts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """A perturbation model: ``path`` None builds a new one (random init), else ``"default"`` or an scGPT
    folder for :meth:`~scforge.tasks.perturb.PerturbationModel.from_pretrained`. ``options`` are
    architecture fields (``d_model``, ``n_heads``, ...); ``genept`` is a GenePT pickle for the NCBI variants."""

    name: str
    path: str | None
    model_type: str = "scgpt"
    text_style: str = "concat"
    genept: Path | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TrainingConfig:
    """Fine-tuning and inference settings shared by every model (scGenePT's defaults except epochs)."""

    epochs: int = 15
    lr: float = 1e-4
    batch_size: int = 64
    max_seq_len: int | None = None  # None: the model's own (1536)
    pool_size: int = 300
    early_stop: int = 10
    gamma: float = 0.9
    precision: str = "auto"
    device: str = "auto"


@dataclass(frozen=True)
class PerturbationBenchConfig:
    """A whole perturbation benchmark (see :func:`load_perturbation_config`)."""

    name: str
    output: Path
    dataset: DatasetConfig
    split: SplitConfig = field(default_factory=SplitConfig)
    baselines: tuple[str, ...] = DEFAULT_BASELINES
    models: tuple[ModelConfig, ...] = ()
    training: TrainingConfig = field(default_factory=TrainingConfig)
    go_dir: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps({"task": TASK, **dataclasses.asdict(self)}, default=str))


def _check_keys(where: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; allowed: {', '.join(allowed)}.")


def _mapping(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {value!r}.")
    return {str(k): v for k, v in value.items()}


def _int(where: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{where} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


def _float(where: str, value: Any, low: float, high: float, *, low_open: bool = True, high_open: bool = True) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{where} must be a number in {interval}, got {value!r}.")
    return float(value)


def _str(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where} must be a non-empty string, got {value!r}.")
    return value


def _choice(where: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(f"{where}={value!r}; choose one of {', '.join(choices)}.")
    return str(value)


def _resolve(where: str, raw: Any, base: Path) -> Path:
    """``shared:<rel>`` (../shared/data) or a path relative to the config file; it must exist."""
    raw = _str(where, raw)
    if raw.startswith("shared:"):
        root = shared_data_dir(base)
        if root is None:
            raise ConfigError(f"{where}: {raw} needs the shared data folder (../shared/data); set "
                              "SCFORGE_SHARED_DATA to its path.")
        path = root / raw.split(":", 1)[1]
    else:
        path = _local(raw, base)
    if not path.exists():
        raise ConfigError(f"{where}: {path} not found (relative paths are relative to the config file).")
    return path


def _gene_lists(where: str, value: Any) -> dict[str, tuple[str, ...]]:
    out = {}
    for condition, genes in _mapping(where, value).items():
        genes = [genes] if isinstance(genes, str) else genes
        if not isinstance(genes, list | tuple) or not all(isinstance(g, str) and g for g in genes):
            raise ConfigError(f"{where}.{condition} must be a gene symbol or a list of them ([] for none), "
                              f"got {genes!r}.")
        out[condition] = tuple(genes)
    return out


_ANNDATA_KEYS = ("perturbation_key", "control", "context_key", "layer", "gene_symbols", "perturbation_genes")


def _dataset(value: Any, base: Path) -> DatasetConfig:
    spec = _mapping("dataset", value)
    _check_keys("dataset", spec, ("path", "name", "format", "genes", "strict", *_ANNDATA_KEYS))
    if "path" not in spec:
        raise ConfigError("dataset.path is required: a GEARS perturb_processed.h5ad (or its folder) or an .h5ad.")
    path = _resolve("dataset.path", spec.pop("path"), base)
    path = path / GEARS_FILE if path.is_dir() else path
    fmt = spec.pop("format", None)
    if fmt is not None:
        _choice("dataset.format", fmt, FORMATS)
    elif "perturbation_key" in spec:
        fmt = "anndata"
    if fmt == "gears":
        given = sorted(set(spec) & set(_ANNDATA_KEYS))
        if given:
            raise ConfigError(f"dataset: {given} apply to format: anndata only (a GEARS file fixes them).")
    if fmt == "anndata":
        for key in ("perturbation_key", "control"):
            if key not in spec:
                raise ConfigError(f"dataset.{key} is required with format: anndata (the obs column of perturbation "
                                  "labels and the label of control cells).")
    text_keys = ("name", "perturbation_key", "control", "context_key", "layer", "gene_symbols")
    kwargs: dict[str, Any] = {k: _str(f"dataset.{k}", spec.pop(k)) for k in text_keys if k in spec}
    kwargs.setdefault("name", path.parent.name if path.name == GEARS_FILE else path.stem)
    if "perturbation_genes" in spec:
        kwargs["perturbation_genes"] = _gene_lists("dataset.perturbation_genes", spec.pop("perturbation_genes"))
    if spec.get("genes") is not None:
        kwargs["genes"] = _int("dataset.genes", spec["genes"], 1)
    if "strict" in spec:
        strict = spec.pop("strict")
        if not isinstance(strict, bool):
            raise ConfigError(f"dataset.strict must be true or false, got {strict!r}.")
        kwargs["strict"] = strict
    return DatasetConfig(path=path, format=fmt, **kwargs)


_SPLIT_KEYS = {"simulation": ("train_gene_set_size", "combo_seen2_train_frac"),
               "heldout": ("test_fraction", "val_fraction"), "context": ("contexts", "val_fraction")}


def _seeds(value: Any) -> tuple[int, ...]:
    value = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(value, list | tuple) or not value:
        raise ConfigError(f"split.seeds must be a non-empty list of integers, got {value!r}.")
    seeds = tuple(_int("split.seeds", s, 0) for s in value)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"split.seeds repeats a seed: {list(seeds)}.")
    return seeds


def _split(value: Any) -> SplitConfig:
    spec = _mapping("split", value)
    kind = _choice("split.kind", spec.pop("kind", "simulation"), SPLIT_KINDS)
    _check_keys(f"split (kind {kind})", spec, ("kind", "seeds", *_SPLIT_KEYS[kind]))
    kwargs: dict[str, Any] = {"kind": kind, "seeds": _seeds(spec.pop("seeds", [1 if kind == "simulation" else 0]))}
    for key in ("train_gene_set_size", "combo_seen2_train_frac", "test_fraction"):
        if key in spec:
            kwargs[key] = _float(f"split.{key}", spec.pop(key), 0.0, 1.0)
    if "val_fraction" in spec:
        kwargs["val_fraction"] = _float("split.val_fraction", spec.pop("val_fraction"), 0.0, 1.0, low_open=False)
    if kind == "context":
        contexts = spec.pop("contexts", None)
        contexts = [contexts] if isinstance(contexts, str) else contexts
        if not isinstance(contexts, list | tuple) or not contexts:
            raise ConfigError("split.contexts must list the held-out contexts (values of dataset.context_key), "
                              f"got {contexts!r}.")
        kwargs["contexts"] = tuple(_str("split.contexts", c) for c in contexts)
    return SplitConfig(**kwargs)


def _baselines(value: Any, go_dir: Path | None) -> tuple[str, ...]:
    value = list(DEFAULT_BASELINES) if value is None else value
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, list | tuple):
        raise ConfigError(f"baselines must be a list of names, got {value!r}; choose from {sorted(baseline_registry)}.")
    names = tuple(_choice("baselines", b, sorted(baseline_registry)) for b in value)
    if len(set(names)) != len(names):
        raise ConfigError(f"baselines repeats a name: {list(names)}.")
    needing_go = [b for b in names if b in GO_BASELINES]
    if needing_go and go_dir is None:
        raise ConfigError(f"baselines {needing_go} need go_dir (the folder of GO annotations, e.g. shared:genes/go).")
    return names


def _option_fields() -> dict[str, Any]:
    """Architecture fields a model entry may set, with their defaults (their types are checked)."""
    from scforge.models.scgpt.perturbation import PerturbConfig

    fixed = {"vocab_size", "pad_token_id", "model_type", "text_sources", "text_dims", "extra"}
    return {f.name: f.default for f in dataclasses.fields(PerturbConfig) if f.name not in fixed}


def _option(where: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}.")
        return value
    if isinstance(default, int):
        return _int(where, value, 0 if where.endswith("pert_pad_id") else 1)
    if isinstance(default, float):
        return _float(where, value, 0.0, 1.0, low_open=False)
    return _str(where, value)


def _model(name: str, value: Any, base: Path, go_dir: Path | None) -> ModelConfig:
    from scforge.genes.text import TEXT_STYLES
    from scforge.models.scgpt.perturbation import MODEL_TYPES, PerturbConfig

    where = f"models.{name}"
    spec = _mapping(where, value)
    fields = _option_fields()
    _check_keys(where, spec, ("path", "model_type", "text_style", "genept", *fields))
    if "path" not in spec:
        raise ConfigError(f"{where}.path is required: 'default', an scGPT folder, or null for a new random model.")
    raw = spec.pop("path")
    path = None if raw is None else raw if raw == "default" else str(_resolve(f"{where}.path", raw, base))
    model_type = spec.pop("model_type", "scgpt")
    types = [*MODEL_TYPES, *(f"{t}_no_attention" for t in MODEL_TYPES)]
    _choice(f"{where}.model_type", model_type, types)
    text_style = _choice(f"{where}.text_style", spec.pop("text_style", "concat"), TEXT_STYLES)
    genept = _resolve(f"{where}.genept", spec.pop("genept"), base) if "genept" in spec else None
    sources = MODEL_TYPES[model_type.removesuffix("_no_attention")]["text_sources"]
    if "genept" in sources and genept is None:
        raise ConfigError(f"{where}: model_type {model_type} needs genept: a GenePT embedding pickle of gene symbols.")
    if any(s.startswith("go_") for s in sources) and go_dir is None:
        raise ConfigError(f"{where}: model_type {model_type} needs go_dir (GO annotations for its text embeddings).")
    options = {k: _option(f"{where}.{k}", v, fields[k]) for k, v in spec.items()}
    try:
        PerturbConfig(vocab_size=3, pad_token_id=0, **options)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return ModelConfig(name=name, path=path, model_type=model_type, text_style=text_style, genept=genept,
                       options=options)


def _training(value: Any) -> TrainingConfig:
    spec = _mapping("training", value)
    names = [f.name for f in dataclasses.fields(TrainingConfig)]
    _check_keys("training", spec, names)
    kwargs: dict[str, Any] = {}
    for key in ("epochs", "batch_size", "pool_size", "early_stop"):
        if key in spec:
            kwargs[key] = _int(f"training.{key}", spec[key], 1)
    if spec.get("max_seq_len") is not None:
        kwargs["max_seq_len"] = _int("training.max_seq_len", spec["max_seq_len"], 1)
    if "lr" in spec:
        kwargs["lr"] = _float("training.lr", spec["lr"], 0.0, 1.0, high_open=False)
    if "gamma" in spec:
        kwargs["gamma"] = _float("training.gamma", spec["gamma"], 0.0, 1.0, high_open=False)
    if "precision" in spec:
        kwargs["precision"] = _choice("training.precision", spec["precision"], PRECISIONS)
    if "device" in spec:
        device = spec["device"]
        if not isinstance(device, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", device):
            raise ConfigError(f"training.device={device!r}; use auto, cpu, cuda or cuda:N.")
        kwargs["device"] = device
    return TrainingConfig(**kwargs)


_TOP_LEVEL = ("task", "name", "output", "dataset", "split", "baselines", "go_dir", "models", "training")


def parse_perturbation_config(data: Mapping[str, Any], base: Path, *, source: str = "config") -> \
        PerturbationBenchConfig:
    """Validate a perturbation-bench mapping; relative paths resolve against ``base`` (the config's folder)."""
    data = dict(data)
    try:
        _check_keys(source, data, _TOP_LEVEL)
        if data.get("task") != TASK:
            raise ConfigError(f"task={data.get('task')!r}; a perturbation benchmark needs task: {TASK}.")
        go_dir = _resolve("go_dir", data["go_dir"], base) if data.get("go_dir") is not None else None
        models_raw = _mapping("models", data.get("models"))
        models = tuple(_model(n, v, base, go_dir) for n, v in models_raw.items())
        baselines = _baselines(data.get("baselines"), go_dir)
        clash = sorted(set(models_raw) & set(baselines))
        if clash:
            raise ConfigError(f"models {clash} have the names of baselines; rename them.")
        if not baselines and not models:
            raise ConfigError("nothing to run: give baselines and/or models.")
        return PerturbationBenchConfig(
            name=_str("name", data.get("name", "perturbation-bench")),
            output=_local(_str("output", data.get("output", "scforge-perturbation-bench")), base),
            dataset=_dataset(data.get("dataset"), base), split=_split(data.get("split")), baselines=baselines,
            models=models, training=_training(data.get("training")), go_dir=go_dir)
    except ConfigError as err:
        if str(err).startswith(source):
            raise
        raise ConfigError(f"{source}: {err}") from None


def load_perturbation_config(path: str | os.PathLike) -> PerturbationBenchConfig:
    """Read and validate a perturbation-bench config (``.yaml``/``.yml``/``.toml``); every bad key or value
    raises :class:`~scforge.errors.ConfigError` naming it and what is allowed."""
    p = Path(path)
    return parse_perturbation_config(_read(p), p.resolve().parent, source=str(p))


# ------------------------------------------------------------------------------------------ data
def _gene_variances(matrix: Any) -> np.ndarray:
    """Variance of each column over all rows (float64), read in row chunks (sparse stays sparse)."""
    import scipy.sparse as sp

    n = matrix.shape[0]
    total, squares = np.zeros(matrix.shape[1]), np.zeros(matrix.shape[1])
    for lo in range(0, n, _CHUNK):
        block = matrix[lo:lo + _CHUNK]
        if sp.issparse(block):
            total += np.asarray(block.sum(axis=0)).ravel()
            squares += np.asarray(block.multiply(block).sum(axis=0)).ravel()
        else:
            block = np.asarray(block, dtype=np.float64)
            total += block.sum(axis=0)
            squares += (block * block).sum(axis=0)
    mean = total / n
    return squares / n - mean * mean


def _keep_genes(data: Any, n: int) -> Any:
    """A private AnnData with the ``n`` most variable genes plus every perturbed gene (var order kept); the
    stored DE rankings are filtered to the kept genes, the stored top-20 lists dropped (recomputed)."""
    keep = np.zeros(data.n_genes, dtype=bool)
    keep[np.argsort(-_gene_variances(data.matrix), kind="stable")[:n]] = True
    keep |= np.isin(data.gene_names, [g for genes in data.perturbation_genes.values() for g in genes])
    sub = data.adata[:, keep].copy()
    kept = set(np.asarray(sub.var_names).astype(str)) | set(data.gene_names[keep])
    uns = {k: v for k, v in sub.uns.items() if k not in _TOP_KEYS}
    if isinstance(uns.get(RANKING_KEY), Mapping):
        uns[RANKING_KEY] = {k: np.asarray(v)[np.isin(np.asarray(v).astype(str), list(kept))]
                            for k, v in uns[RANKING_KEY].items()}
    sub.uns = uns
    return sub


def _wrap(adata: Any, spec: DatasetConfig) -> Any:
    from scforge.data.perturbation import from_anndata, read_gears

    fmt = spec.format
    if fmt is None:
        if not {"condition", "condition_name"} <= set(adata.obs.columns):
            raise ConfigError(f"dataset {spec.path}: obs has no 'condition' and 'condition_name' columns (GEARS "
                              f"layout); obs columns: {list(adata.obs.columns)[:20]}. Give format: anndata with "
                              "perturbation_key and control.")
        fmt = "gears"
    if fmt == "gears":
        return read_gears(adata, strict=spec.strict)
    return from_anndata(adata, spec.perturbation_key, spec.control, perturbation_genes=spec.perturbation_genes,
                        context_key=spec.context_key, layer=spec.layer, gene_symbols=spec.gene_symbols,
                        strict=spec.strict)


def _load_data(spec: DatasetConfig) -> Any:
    import anndata as ad

    data = _wrap(ad.read_h5ad(spec.path), spec)
    if spec.genes is not None and spec.genes < data.n_genes:
        data = _wrap(_keep_genes(data, spec.genes), spec)
    return data


# ------------------------------------------------------------------------------------------ splits
@dataclass
class _Split:
    """A seed's split and its groups (``train`` without controls)."""

    split: PerturbationSplit
    train: list[Group]
    val: list[Group]
    test: list[Group]


def _by_size(conditions: Sequence[str], genes_of: Mapping[str, tuple[str, ...]]) -> dict[str, list[str]]:
    names = {0: "stimulus", 1: "single"}
    out: dict[str, list[str]] = {}
    for c in conditions:
        out.setdefault(names.get(len(genes_of[c]), "combo"), []).append(c)
    return out


def _context_split(data: Any, spec: SplitConfig, seed: int) -> _Split:
    """Every group of the held-out contexts is tested; val is a seeded ``val_fraction`` of the other groups."""
    if data.context_key is None:
        raise ConfigError("split kind 'context' needs a dataset with contexts (dataset.context_key, or a GEARS file "
                          "of several cell types).")
    unknown = [c for c in spec.contexts if c not in data.contexts]
    if unknown:
        raise ConfigError(f"split.contexts {unknown} are not in obs[{data.context_key!r}]; contexts: "
                          f"{data.contexts[:20]}.")
    test = [g for g in data.groups if g[1] in spec.contexts]
    rest = [g for g in data.groups if g[1] not in spec.contexts]
    chosen = set(np.random.default_rng(seed).permutation(len(rest))[:round(len(rest) * spec.val_fraction)].tolist())
    val = [g for i, g in enumerate(rest) if i in chosen]
    train = [g for i, g in enumerate(rest) if i not in chosen]
    if not test or not train:
        raise ConfigError(f"split.contexts {list(spec.contexts)} leave {len(test)} test and {len(train)} training "
                          "groups; both must be non-empty.")
    conditions = {name: list(dict.fromkeys(g[0] for g in groups))
                  for name, groups in (("train", train), ("val", val), ("test", test))}
    split = PerturbationSplit([*conditions["train"], data.control], conditions["val"], conditions["test"],
                              _by_size(conditions["test"], data.perturbation_genes),
                              _by_size(conditions["val"], data.perturbation_genes), "context", seed)
    return _Split(split, train, val, test)


def _make_split(data: Any, spec: SplitConfig, seed: int) -> _Split:
    """The split of ``seed`` and its train / val / test ``(condition, context)`` groups."""
    from scforge.data.perturbation import heldout_split, simulation_split

    if spec.kind == "context":
        return _context_split(data, spec, seed)
    if spec.kind == "simulation":
        split = simulation_split(data, seed=seed, train_gene_set_size=spec.train_gene_set_size,
                                 combo_seen2_train_frac=spec.combo_seen2_train_frac)
    else:
        split = heldout_split(data, test_fraction=spec.test_fraction, val_fraction=spec.val_fraction, seed=seed)

    def groups(conditions: Sequence[str]) -> list[Group]:
        wanted = set(conditions)
        return [g for g in data.groups if g[0] in wanted]

    return _Split(split, groups(split.train), groups(split.val), groups(split.test))


# ------------------------------------------------------------------------------------------ running
@dataclass
class _Unit:
    method: str
    kind: str  # "baseline" | "model"
    seed: int
    model: ModelConfig | None = None

    @property
    def label(self) -> str:
        return f"{self.method} ({self.kind}) seed {self.seed}"


def _read_part(path: Path) -> pd.DataFrame:
    text = {c: str for c in ("dataset", "method", "kind", "condition", "context", "subgroup", "metric")}
    table = pd.read_csv(path, dtype={**text, "seed": np.int64, "fallback": bool}, keep_default_na=False,
                        na_values={"value": ["", "nan", "NaN"]})
    table["context"] = table["context"].astype(object).where(table["context"] != "", None)
    return table[RESULT_COLUMNS]


class _Bench:
    def __init__(self, config: PerturbationBenchConfig, say: Callable[[str], None]) -> None:
        self.config, self.say = config, say
        self.memo = config.output / "cache" / "fingerprints.json"
        self._data: Any = None
        self._profiles: Any = None
        self._splits: dict[int, _Split] = {}
        self._go: pd.DataFrame | None = None
        self._texts: dict[tuple[str, str, str], Any] = {}
        self._pretrained: dict[str, Any] = {}

    # ---- inputs (loaded only when a unit must be computed) ------------------------------------
    @property
    def data(self) -> Any:
        if self._data is None:
            self.say(f"reading {self.config.dataset.path}")
            self._data = _load_data(self.config.dataset)
            self.say(f"  {self._data.n_cells} cells x {self._data.n_genes} genes, {len(self._data.groups)} groups")
        return self._data

    def split(self, seed: int) -> _Split:
        if seed not in self._splits:
            self._splits[seed] = _make_split(self.data, self.config.split, seed)
        return self._splits[seed]

    def go_features(self) -> pd.DataFrame:
        from scforge.baselines.perturbation import go_feature_matrix

        if self._go is None:
            genes = sorted({g for genes in self.data.perturbation_genes.values() for g in genes})
            self._go = go_feature_matrix(self.config.go_dir, genes)
        return self._go

    # ---- resume keys -------------------------------------------------------------------------
    def units(self) -> list[_Unit]:
        c = self.config
        return [u for seed in c.split.seeds for u in
                [*(_Unit(b, "baseline", seed) for b in c.baselines), *(_Unit(m.name, "model", seed, m) for m in c.models)]]

    def _fingerprint(self, path: Any) -> str:
        return fingerprint(path, self.memo)

    def part_path(self, unit: _Unit) -> Path:
        c = self.config
        dataset = {k: v for k, v in dataclasses.asdict(c.dataset).items() if k not in ("path", "name")}
        split = {k: v for k, v in dataclasses.asdict(c.split).items() if k != "seeds"}
        settings: dict[str, Any] = {"version": _PART_VERSION, "data": self._fingerprint(c.dataset.path),
                                    "dataset": dataset, "split": split, "seed": unit.seed, "method": unit.method}
        if unit.method in GO_BASELINES:
            settings["go"] = self._fingerprint(c.go_dir)
        if unit.model is not None:
            settings.update(model=dataclasses.asdict(unit.model), training=dataclasses.asdict(c.training),
                            files=self._model_files(unit.model))
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", unit.method)
        return c.output / "parts" / f"{safe}-seed{unit.seed}-{stable_hash(settings, 16)}.csv"

    def _model_files(self, spec: ModelConfig) -> dict[str, str]:
        from scforge.models import default_model_path
        from scforge.models.scgpt.perturbation import MODEL_TYPES

        files = {}
        if spec.path is not None:
            files["model"] = self._fingerprint(default_model_path() if spec.path == "default" else spec.path)
        if spec.genept is not None:
            files["genept"] = self._fingerprint(spec.genept)
        sources = MODEL_TYPES[spec.model_type.removesuffix("_no_attention")]["text_sources"]
        if any(s.startswith("go_") for s in sources):
            files["go"] = self._fingerprint(self.config.go_dir)
        return files

    # ---- one unit ----------------------------------------------------------------------------
    def run_unit(self, unit: _Unit) -> pd.DataFrame:
        from scforge.metrics.perturbation import evaluate_perturbations

        split = self.split(unit.seed)
        if unit.model is None:
            predictions, fallbacks = self._baseline(unit.method, split, unit.seed)
        else:
            predictions, fallbacks = self._model(unit.model, split, unit.seed), set()
        table = evaluate_perturbations(predictions, self.data, method=unit.method, split=split.split, seed=unit.seed)
        table["dataset"] = self.config.dataset.name
        table["kind"] = unit.kind
        table["fallback"] = [(c, x) in fallbacks for c, x in zip(table["condition"], table["context"])]
        return table[RESULT_COLUMNS]

    def _baseline(self, name: str, split: _Split, seed: int) -> tuple[dict[Group, np.ndarray], set[Group]]:
        from scforge.baselines.perturbation import make_baseline

        if self._profiles is None:
            self._profiles = self.data.profiles()
        kwargs = {"features": self.go_features(), "missing": "mean", "seed": seed} if name in GO_BASELINES else {}
        # baselines have no model selection: they fit on every non-test group (train + validation),
        # the groups a model sees for training and early stopping
        model = make_baseline(name, **kwargs).fit(self._profiles.subset([*split.train, *split.val]))
        predictions = model.predict(split.test)
        return predictions, set(model.fallbacks)

    def _text_embeddings(self, spec: ModelConfig) -> dict[str, Any]:
        from scforge.genes.text import go_gene_embeddings, read_genept_pickle
        from scforge.models.scgpt.perturbation import MODEL_TYPES

        out = {}
        for source in MODEL_TYPES[spec.model_type.removesuffix("_no_attention")]["text_sources"]:
            key = (source, spec.text_style, str(spec.genept))
            if key not in self._texts:
                if source == "genept":
                    self._texts[key] = read_genept_pickle(spec.genept)
                else:
                    genes = list(dict.fromkeys(self.data.gene_names.tolist()))
                    self._texts[key] = go_gene_embeddings(self.config.go_dir, genes, kind=source,
                                                          style=spec.text_style,
                                                          cache_dir=self.config.output / "cache" / "text")
            out[source] = self._texts[key]
        return out

    def _build(self, spec: ModelConfig, seed: int) -> Any:
        from scforge.tasks.perturb import PerturbationModel

        kwargs = {"model_type": spec.model_type, "text_embeddings": self._text_embeddings(spec), "seed": seed,
                  **spec.options}
        if spec.path is None:
            return PerturbationModel.new(None, self.data.gene_names, **kwargs)
        if spec.path not in self._pretrained:
            from scforge.models import load

            self._pretrained[spec.path] = load(spec.path)
        return PerturbationModel.from_pretrained(self._pretrained[spec.path], self.data.gene_names,
                                                 load_transformer=not spec.model_type.endswith("_no_attention"),
                                                 **kwargs)

    def _model(self, spec: ModelConfig, split: _Split, seed: int) -> dict:
        t = self.config.training
        model = self._build(spec, seed)
        model.fit(self.data, train=split.train, val=split.val or None, epochs=t.epochs, lr=t.lr,
                  batch_size=t.batch_size, gamma=t.gamma, early_stop=t.early_stop, max_seq_len=t.max_seq_len,
                  seed=seed, precision=t.precision, device=t.device)
        return model.predict(self.data, split.test, pool_size=t.pool_size, seed=seed, batch_size=t.batch_size,
                             device=t.device, precision=t.precision)

    # ---- the whole run -----------------------------------------------------------------------
    def run(self, *, fresh: bool, report: bool) -> pd.DataFrame:
        from scforge.metrics.perturbation import summarize_perturbations

        units = self.units()
        frames, computed, reused = [], [], []
        for i, unit in enumerate(units, 1):
            path = self.part_path(unit)
            if path.is_file() and not fresh:
                reused.append(path.name)
            else:
                self.say(f"[{i}/{len(units)}] {unit.label}")
                t0 = time.perf_counter()
                rows = self.run_unit(unit)
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(path, rows.to_csv(index=False))
                computed.append(path.name)
                main = rows.loc[rows.metric == "pearson_delta", "value"]
                self.say(f"  pearson_delta {main.mean():.3f} over {main.size} test groups "
                         f"({time.perf_counter() - t0:.1f} s)")
            frames.append(_read_part(path))
        results = pd.concat(frames, ignore_index=True)
        summary = summarize_perturbations(results)
        files = self._write(results, summary, report)
        self.say(f"{len(computed)} units computed, {len(reused)} reused; results in {files['csv']}")
        results.attrs.update(computed=computed, reused=reused, files=files)
        return results

    def _write(self, results: pd.DataFrame, summary: pd.DataFrame, report: bool) -> dict[str, Path]:
        out = self.config.output
        files = {"csv": out / "results.csv", "parquet": out / "results.parquet", "summary": out / "summary.csv",
                 "config": out / "config.json"}
        atomic_write_text(files["csv"], results.to_csv(index=False))
        tmp = out / f".results.{os.getpid()}.tmp.parquet"
        results.to_parquet(tmp, index=False)
        os.replace(tmp, files["parquet"])
        atomic_write_text(files["summary"], summary.to_csv(index=False))
        atomic_write_text(files["config"], json.dumps(self.config.to_dict(), indent=1))
        if report:
            files["report"] = write_perturbation_report(results, summary, out / "report.html", title=self.config.name)
        return files


def run_perturbation_bench(config_or_path: PerturbationBenchConfig | str | os.PathLike, *, fresh: bool = False,
                           report: bool = True, say: Callable[[str], None] | None = print) -> pd.DataFrame:
    """Run (or resume) a perturbation benchmark and return its tidy results (one row per
    method/condition/context/subgroup/seed/metric, plus ``dataset``, ``kind`` and ``fallback``: whether a
    baseline predicted that group by its documented fallback). ``fresh=True`` recomputes finished units.
    ``results.attrs`` holds the ``computed`` and ``reused`` part names and the ``files`` written."""
    from scforge.bench.runner import _quiet_lightning

    config = config_or_path if isinstance(config_or_path, PerturbationBenchConfig) \
        else load_perturbation_config(config_or_path)
    with _quiet_lightning():
        return _Bench(config, say or (lambda _msg: None)).run(fresh=fresh, report=report)


# ------------------------------------------------------------------------------------------ report
def _main_metrics(metrics: Sequence[str]) -> list[str]:
    present = set(metrics)
    l2 = sorted((m for m in present if m.startswith("l2_top")), key=lambda m: int(m[6:]) if m[6:].isdigit() else 0)
    return [m for m in MAIN_METRICS if m in present] + l2


def _higher_is_better(metric: str) -> bool:
    return not (metric.startswith("mse") or metric.startswith("l2_"))


def _subgroups(summary: pd.DataFrame) -> list[str]:
    found = sorted(set(summary["subgroup"]) - {"all"})
    return ["all", *found] if "all" in set(summary["subgroup"]) else found


def _bar_figure(summary: pd.DataFrame, kinds: Mapping[str, str]) -> str | None:
    """One panel per main metric: mean ± sd per method (bars) in each subgroup; baselines hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from scforge.bench.report import _png

    metrics = _main_metrics(summary["metric"].unique())
    if not metrics:
        return None
    methods = list(dict.fromkeys(summary["method"]))
    subgroups = _subgroups(summary)
    sizes = summary.groupby("subgroup")["n_conditions"].max()
    colors = plt.get_cmap("tab10").colors
    width = 0.8 / len(methods)
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 1.1 * len(subgroups) * (1 + 0.35 * len(methods))),
                                                        3.4 * len(metrics)), squeeze=False, layout="constrained")
    for ax, metric in zip(axes[:, 0], metrics):
        d = summary[summary.metric == metric].set_index(["method", "subgroup"])
        for j, method in enumerate(methods):
            rows = [d.loc[(method, s)] if (method, s) in d.index else None for s in subgroups]
            baseline = kinds.get(method) == "baseline"
            ax.bar(np.arange(len(subgroups)) + (j - (len(methods) - 1) / 2) * width,
                   [np.nan if r is None else r["mean"] for r in rows], width,
                   yerr=[0.0 if r is None or not np.isfinite(r["sd"]) else r["sd"] for r in rows],
                   color=colors[j % 10], hatch="//" if baseline else None, edgecolor="black" if baseline else "none",
                   capsize=2, label=f"{method} (baseline)" if baseline else method)
        ax.set_xticks(range(len(subgroups)), [f"{s}\n(n={sizes.get(s, 0)})" for s in subgroups])
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} ({'higher' if _higher_is_better(metric) else 'lower'} is better)")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(fig)


def _cell(row: pd.Series | None, best: float) -> str:
    if row is None or not np.isfinite(row["mean"]):
        return "<td>–</td>"
    text = f"{row['mean']:.3f} ± {row['sd']:.3f}" if np.isfinite(row["sd"]) else f"{row['mean']:.3f}"
    return f"<td><b>{text}</b></td>" if row["mean"] == best else f"<td>{text}</td>"


def _summary_table(summary: pd.DataFrame, metric: str, kinds: Mapping[str, str]) -> str:
    """HTML table of one metric: rows method, columns subgroup, cells mean ± sd; the best per column in bold."""
    subgroups = _subgroups(summary)
    d = summary[summary.metric == metric].set_index(["method", "subgroup"])
    means = d["mean"].unstack("subgroup")
    best = means.max() if _higher_is_better(metric) else means.min()
    head = "<tr><th>method</th>" + "".join(f"<th>{html.escape(s)}</th>" for s in subgroups) + "</tr>"
    rows = []
    for method in dict.fromkeys(summary["method"]):
        cells = "".join(_cell(d.loc[(method, s)] if (method, s) in d.index else None, best.get(s, np.nan))
                        for s in subgroups)
        label = f"{method} (baseline)" if kinds.get(method) == "baseline" else method
        rows.append(f"<tr><td>{html.escape(label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _counts_note(results: pd.DataFrame) -> str:
    per = results[results.metric == "pearson_delta"].groupby("subgroup")["condition"].nunique()
    fallback = results[(results.metric == "pearson_delta") & results.fallback].groupby("method").size()
    text = "Test conditions per subgroup: " + ", ".join(f"{html.escape(str(s))} {n}" for s, n in per.items()) + "."
    if len(fallback):
        text += " Groups predicted by a baseline's fallback (e.g. the training mean delta where the additive model " \
                "has no observed single): " + ", ".join(f"{html.escape(m)} {n}" for m, n in fallback.items()) + "."
    return f"<p class='note'>{text}</p>"


def write_perturbation_report(results: pd.DataFrame, summary: pd.DataFrame, path: str | os.PathLike, *,
                              title: str = "scforge perturbation bench") -> Path:
    """Write a self-contained HTML report: bar charts of the main metrics per subgroup and the summary table."""
    from scforge.bench.report import CSS

    kinds = dict(zip(results["method"], results["kind"]))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
             f"<body><h1>{html.escape(title)}</h1>",
             f"<p class='note'>Dataset {html.escape(', '.join(map(str, results['dataset'].unique())))}; seeds "
             f"{', '.join(map(str, sorted(results['seed'].unique())))}. Baselines are hatched. Values: mean ± sd "
             "(over seeds' means with several seeds, else over test conditions); subgroup 'all' pools every test "
             "condition. Metrics compare mean profiles with the truth relative to the context's control mean "
             "(GEARS definitions; l2_top&lt;k&gt;: Euclidean distance on the k most expressed genes). A Pearson "
             "correlation with a constant prediction (no_change) is undefined: –.</p>",
             _counts_note(results)]
    figure = _bar_figure(summary, kinds)
    if figure:
        parts.append(f"<h2>Main metrics by subgroup</h2>{figure}")
    parts.append("<h2>Summary (all metrics: summary.csv)</h2>")
    for metric in _main_metrics(summary["metric"].unique()):
        parts.append(f"<h3>{html.escape(metric)}</h3>{_summary_table(summary, metric, kinds)}")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "\n".join(parts))
    return path
