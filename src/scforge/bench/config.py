"""The experiment-matrix config: models x datasets x modes x seeds x fractions, read from YAML or TOML.

Example (YAML; relative paths are relative to the config file)::

    name: ifnb-annotation
    output: results/ifnb
    datasets:
      ifnb: {path: shared:ifnb_sub_2000}          # or a path to any .h5ad with label_key/batch_key
    models:
      scgpt_default: {path: default}
    modes: [knn, linear_probe, fine_tune, no_pretraining]
    baselines: [logistic_l1, pca_knn, pca_logistic]
    seeds: [0, 1, 2]
    train_seeds: [0]            # optional: the (slow) training modes run with these seeds only
    train_fractions: [0.1, 1.0] # ... and at these fractions only
    fractions: [0.1, 0.25, 0.5, 0.75, 1.0]
    training: {epochs: 3, lr: 0.001}
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from scforge.errors import ConfigError

MODEL_MODES = ("knn", "linear_probe", "fine_tune", "no_pretraining", "no_pretraining_frozen")
BASELINES = ("logistic_l1", "pca_knn", "pca_logistic")
TRAINING_MODES = ("fine_tune", "no_pretraining", "no_pretraining_frozen")

# datasets of ../shared/data known by name, with their label and batch columns
SHARED_DATASETS = {
    "ifnb_sub_2000": ("ifnb/ifnb_sub_2000.h5ad", "seurat_annotations", "stim"),
    "ifnb_full": ("ifnb/ifnb_full_13999_partial_labels.h5ad", "seurat_annotations", "stim"),
}


@dataclass(frozen=True)
class DatasetSpec:
    """An ``.h5ad`` of raw counts (``layer``; default ``X``) with labels in ``obs[label_key]`` (unlabelled
    cells, NaN, are left out of annotation and scored integration metrics) and optional ``obs[batch_key]``."""

    name: str
    path: Path
    label_key: str
    batch_key: str | None = None
    layer: str | None = None


@dataclass(frozen=True)
class ModelSpec:
    """A model for :func:`scforge.load` (``"default"``, a folder or a published checkpoint).
    ``n_hvg``: the model reads only the dataset's ``n_hvg`` highly variable genes (seurat_v3 on the
    counts of all its cells, no labels), as scGPT's and scBackdoor's preprocessing does."""

    name: str
    path: str
    batch_size: int = 64
    max_length: int | None = None
    n_hvg: int | None = None


@dataclass(frozen=True)
class TrainingSpec:
    """Settings of the fine-tuning modes (:func:`scforge.tasks.annotate.fine_tune`)."""

    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int | None = None
    val_fraction: float = 0.1


@dataclass(frozen=True)
class MatrixConfig:
    """The whole matrix. ``fractions`` of the training pool (the cells outside the fixed stratified test
    split of ``test_size``, drawn with ``split_seed``) x ``seeds``; every method sees the same splits."""

    name: str
    output: Path
    datasets: tuple[DatasetSpec, ...]
    models: tuple[ModelSpec, ...] = ()
    modes: tuple[str, ...] = ("knn", "linear_probe")
    baselines: tuple[str, ...] = BASELINES
    seeds: tuple[int, ...] = (0,)
    train_seeds: tuple[int, ...] | None = None  # seeds of the training modes (default: all seeds)
    train_fractions: tuple[float, ...] | None = None  # fractions of the training modes (default: all)
    fractions: tuple[float, ...] = (1.0,)
    test_size: float = 0.2
    split_seed: int = 0
    training: TrainingSpec = field(default_factory=TrainingSpec)
    integration: bool = False
    # scGPT integration fine-tuning per scGPT-family model (IntegrationSettings fields); None: zero-shot only
    integration_finetune: dict[str, Any] | None = None
    annotation: bool = True
    logistic_C: float | str = 0.1  # noqa: N815 - scikit-learn's name
    n_neighbors: int = 10
    probe_C: float = 1.0  # noqa: N815
    n_pcs: int = 50
    n_top_genes: int = 2000
    umap: bool = True
    cache: Path | None = None

    @property
    def cache_dir(self) -> Path:
        return self.cache or self.output / "cache"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return _plain(d)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    return x


def shared_data_dir(*anchors: Path) -> Path | None:
    """``$SCFORGE_SHARED_DATA``, else the first ``../shared/data`` found beside an anchor or the cwd."""
    env = os.environ.get("SCFORGE_SHARED_DATA")
    if env:
        return Path(env)
    for base in (*anchors, Path.cwd()):
        for parent in (base, *base.resolve().parents):
            candidate = parent / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def _read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found.")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        elif path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            raise ConfigError(f"{path}: use a .yaml, .yml or .toml config file.")
    except (tomllib.TOMLDecodeError, ValueError) as e:  # yaml.YAMLError derives from Exception only
        raise ConfigError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from None
    except Exception as e:
        if type(e).__module__.startswith("yaml"):
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        raise
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping (keys name, datasets, models, ...).")
    return data


def _entry(section: str, name: str, spec: Any, wanted: str) -> tuple[dict[str, Any], str]:
    """A ``datasets``/``models`` entry as a fresh dict (a bare string is its path) and its path."""
    if isinstance(spec, str):
        spec = {"path": spec}
    if not isinstance(spec, dict) or "path" not in spec:
        raise ConfigError(f"{section}.{name}: give a mapping with {wanted}.")
    spec = dict(spec)
    return spec, str(spec.pop("path"))


def _local(raw: str, base: Path) -> Path:
    """``raw`` with ``~`` expanded, relative to ``base`` unless absolute."""
    path = Path(os.path.expanduser(raw))
    return path if path.is_absolute() else base / path


def _dataset(name: str, spec: Any, base: Path) -> DatasetSpec:
    spec, raw = _entry("datasets", name, spec, "at least 'path' (and 'label_key')")
    label_key, batch_key = spec.pop("label_key", None), spec.pop("batch_key", None)
    if raw.startswith("shared:"):
        key = raw.split(":", 1)[1]
        if key not in SHARED_DATASETS:
            raise ConfigError(f"datasets.{name}: unknown shared dataset {key!r}; known: {sorted(SHARED_DATASETS)}.")
        root = shared_data_dir(base)
        if root is None:
            raise ConfigError(f"datasets.{name}: {raw} needs the shared data folder (../shared/data); set "
                              "SCFORGE_SHARED_DATA to its path.")
        rel, default_label, default_batch = SHARED_DATASETS[key]
        path = root / rel
        label_key = label_key or default_label
        batch_key = batch_key or default_batch
    else:
        path = _local(raw, base)
    if not label_key:
        raise ConfigError(f"datasets.{name}: 'label_key' (the obs column of cell labels) is required.")
    layer = spec.pop("layer", None)
    if spec:
        raise ConfigError(f"datasets.{name}: unknown keys {sorted(spec)}; allowed: path, label_key, batch_key, layer.")
    return DatasetSpec(name=name, path=path, label_key=str(label_key),
                       batch_key=None if batch_key is None else str(batch_key), layer=layer)


def _model(name: str, spec: Any, base: Path) -> ModelSpec:
    spec, raw = _entry("models", name, spec, "'path' (\"default\", a folder or a checkpoint)")
    path = raw if raw == "default" else str(_local(raw, base))
    n_hvg = spec.get("n_hvg")
    if n_hvg is not None and (isinstance(n_hvg, bool) or not isinstance(n_hvg, int) or n_hvg < 1):
        raise ConfigError(f"models.{name}: n_hvg must be an integer >= 1 (or left out for all genes), got {n_hvg!r}.")
    try:
        return ModelSpec(name=name, path=path, **spec)
    except TypeError:
        raise ConfigError(f"models.{name}: unknown keys {sorted(spec)}; allowed: path, batch_size, max_length, "
                          "n_hvg.") from None


def _tuple(data: dict, key: str, default: tuple, kind: type) -> tuple:
    value = data.pop(key, default)
    if isinstance(value, str | int | float):  # a single value stands for a list of one
        value = [value]
    try:
        return tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a list of {kind.__name__}, got {value!r}.") from None


def parse_config(data: dict[str, Any], base: Path, *, source: str = "config") -> MatrixConfig:
    """Validate a config mapping; relative paths are resolved against ``base``."""
    data = dict(data)
    name = str(data.pop("name", "scforge-bench"))
    datasets_raw = data.pop("datasets", None)
    if not isinstance(datasets_raw, dict) or not datasets_raw:
        raise ConfigError(f"{source}: 'datasets' must map names to datasets (path, label_key, batch_key).")
    datasets = tuple(_dataset(str(k), v, base) for k, v in datasets_raw.items())
    models_raw = data.pop("models", None) or {}
    if not isinstance(models_raw, dict):
        raise ConfigError(f"{source}: 'models' must map names to models (path: default | folder).")
    models = tuple(_model(str(k), v, base) for k, v in models_raw.items())
    modes = _tuple(data, "modes", ("knn", "linear_probe"), str)
    baselines = _tuple(data, "baselines", BASELINES, str)
    for m in modes:
        if m not in MODEL_MODES:
            raise ConfigError(f"{source}: unknown mode {m!r}; choose from {list(MODEL_MODES)}.")
    for b in baselines:
        if b not in BASELINES:
            raise ConfigError(f"{source}: unknown baseline {b!r}; choose from {list(BASELINES)}.")
    seeds = _tuple(data, "seeds", (0,), int)
    train_seeds = _tuple(data, "train_seeds", seeds, int) if "train_seeds" in data else None
    fractions = _tuple(data, "fractions", (1.0,), float)
    train_fractions = _tuple(data, "train_fractions", fractions, float) if "train_fractions" in data else None
    if train_fractions is not None and not set(train_fractions) <= set(fractions):
        raise ConfigError(f"{source}: train_fractions {list(train_fractions)} must be a subset of fractions "
                          f"{list(fractions)}.")
    if train_seeds is not None and not set(train_seeds) <= set(seeds):
        raise ConfigError(f"{source}: train_seeds {list(train_seeds)} must be a subset of seeds {list(seeds)}.")
    if not seeds or not fractions:
        raise ConfigError(f"{source}: seeds and fractions must not be empty.")
    if any(not 0 < f <= 1 for f in fractions):
        raise ConfigError(f"{source}: fractions must lie in (0, 1], got {list(fractions)}.")
    names = [d.name for d in datasets] + [m.name for m in models]
    clash = sorted(set(names) & set(BASELINES + ("pca", "harmony")))
    if clash:
        raise ConfigError(f"{source}: names {clash} are reserved for baselines; rename them.")
    training = data.pop("training", {}) or {}
    try:
        training = TrainingSpec(**training)
    except TypeError:
        raise ConfigError(f"{source}: training takes {list(TrainingSpec.__dataclass_fields__)}, got "
                          f"{sorted(training)}.") from None
    output = _local(str(data.pop("output", "scforge-bench")), base)
    cache = data.pop("cache", None)
    cache = None if cache is None else _local(str(cache), base)
    kwargs = {}
    for key, kind in (("test_size", float), ("split_seed", int), ("integration", bool), ("annotation", bool),
                      ("n_neighbors", int), ("probe_C", float), ("n_pcs", int), ("n_top_genes", int),
                      ("umap", bool)):
        if key in data:
            kwargs[key] = kind(data.pop(key))
    if "integration_finetune" in data:
        kwargs["integration_finetune"] = _integration_settings(data.pop("integration_finetune"), source)
    if "logistic_C" in data:
        c = data.pop("logistic_C")
        kwargs["logistic_C"] = c if c == "cv" else float(c)
    if data:
        raise ConfigError(f"{source}: unknown keys {sorted(data)}.")
    if not 0 < kwargs.get("test_size", 0.2) < 1:
        raise ConfigError(f"{source}: test_size must lie in (0, 1).")
    if kwargs.get("integration") and not any(d.batch_key for d in datasets):
        raise ConfigError(f"{source}: integration needs a dataset with batch_key.")
    if modes and not models:
        modes = ()
    return MatrixConfig(name=name, output=output, datasets=datasets,
                        models=models, modes=modes, baselines=baselines, seeds=seeds, train_seeds=train_seeds,
                        fractions=fractions, train_fractions=train_fractions,
                        training=training, cache=cache, **kwargs)


def _integration_settings(value: Any, source: str) -> dict[str, Any] | None:
    """``integration_finetune``: true (the tutorial's settings), false/null, or a mapping of settings."""
    from scforge.tasks.integrate import IntegrationSettings

    if value in (None, False):
        return None
    settings = {} if value is True else value
    if not isinstance(settings, dict):
        raise ConfigError(f"{source}: integration_finetune must be true, false or a mapping of settings "
                          f"({list(IntegrationSettings.__dataclass_fields__)}), got {value!r}.")
    try:
        return IntegrationSettings(**settings).to_dict()
    except TypeError:
        raise ConfigError(f"{source}: integration_finetune takes {list(IntegrationSettings.__dataclass_fields__)}, "
                          f"got {sorted(settings)}.") from None


def load_config(path: str | os.PathLike) -> MatrixConfig:
    """Read and validate a matrix config (``.yaml``/``.yml``/``.toml``)."""
    p = Path(path)
    return parse_config(_read(p), p.resolve().parent, source=str(p))
