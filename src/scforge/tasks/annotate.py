"""Cell-type annotation with any scforge model family: fine-tune a copy of the model with a classifier
head, or fit a linear probe on its frozen cell embeddings; then predict, evaluate, save and load.

>>> ann = fine_tune(model, adata, "cell_type", epochs=10)    # or linear_probe(model, adata, "cell_type")
>>> proba = ann.predict(query)      # obs["cell_type_pred"], obsm["cell_type_proba"]
>>> ann.evaluate(test).macro_f1
>>> ann.save("annotator/"); ann = Annotator.load("annotator/")

A family takes part through its :class:`AnnotationBackend` (``model.annotation_backend()``): how it
tokenizes cells for classification, builds a copy with a fresh classification head, trains it on
the shared engine and scores cells. scGPT follows its annotation tutorial (values normalised to
1e4, log1p, per-cell bins, ``<cls>`` first, cross-entropy on the ``<cls>`` output); see each
family's backend for its recipe. The caller's model is never changed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from scforge.errors import CheckpointError, ConfigError, InputDataError
from scforge.hub import replace_folder
from scforge.metrics import ClassificationReport, classification_metrics
from scforge.tokenize.ragged import TokenizedCells, require_expressed_cells

logger = logging.getLogger("scforge")

MODES = ("fine_tune", "linear_probe")
ANNOTATOR_FILE = "annotator.json"
PROBE_FILE = "probe.npz"
ANNOTATOR_FORMAT = 1
_PRECISIONS = ("auto", "fp32", "bf16", "fp16")


# ---- what a family provides ---------------------------------------------------------------------
class AnnotationBackend(ABC):
    """What annotation needs from a model family, bound to one model object (:attr:`model`, the
    family's user class, e.g. :class:`~scforge.models.scgpt.ScGPT`); returned by
    ``model.annotation_backend()``."""

    family: str = ""
    n_special: int = 0  # special tokens in every tokenized cell (a cell with no more has no gene)
    # parameter-name prefixes of the input embeddings (gene/value tables), frozen by the
    # "no pre-training + frozen embeddings" ablation
    embedding_prefixes: tuple[str, ...] = ()

    def __init__(self, model: Any) -> None:
        self.model = model

    @property
    @abstractmethod
    def embedding_dim(self) -> int:
        """Width of the cell embeddings :meth:`embed` returns."""

    @property
    @abstractmethod
    def n_classes(self) -> int | None:
        """Outputs of the model's classification head (None without one)."""

    @abstractmethod
    def settings(self, max_length: int | None, seed: int) -> dict[str, Any]:
        """JSON-ready tokenizer settings for classification (stored with the annotator)."""

    @abstractmethod
    def check_input(self, adata: Any, layer: str | None) -> None:
        """Raise a clear scforge error when the data cannot be used (e.g. log data where counts are due)."""

    @abstractmethod
    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> TokenizedCells:
        """Tokenize cells as :meth:`settings` says."""

    @abstractmethod
    def classifier_copy(self, n_classes: int, seed: int, source: str) -> Any:
        """A new model object: the backbone weights copied, a fresh ``n_classes`` head (seeded)."""

    @abstractmethod
    def training_module(self, optim: Any, class_weights: tuple[float, ...] | None) -> Any:
        """A :class:`~scforge.train.TrainingModule` training this model's classifier on ``batch["labels"]``."""

    @abstractmethod
    def collate(self, cells: TokenizedCells, labels: np.ndarray, seed: int) -> Callable[[list[tuple[int, int]]], dict]:
        """Collate function for :func:`~scforge.train.fit_module` (no input corruption)."""

    @abstractmethod
    def proba(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto", precision: str = "auto",
              progress: bool = False) -> np.ndarray:
        """Class probabilities ``[cells, n_classes]`` from the classification head."""

    @abstractmethod
    def embed(self, adata: Any, layer: str | None, *, batch_size: int = 64, device: Any = "auto",
              precision: str = "auto", max_length: int | None = None, seed: int = 0, check_input: bool = True,
              progress: bool = True) -> np.ndarray:
        """Frozen cell embeddings ``[cells, embedding_dim]`` in input order (nothing written to ``adata``)."""


def backend_of(model: Any) -> AnnotationBackend:
    """The annotation backend of a model object, or a clear error for anything else."""
    make = getattr(model, "annotation_backend", None)
    if make is None:
        raise ConfigError(f"annotation needs an scforge model (scforge.load(...)), got {type(model).__name__}.")
    return make()


# ---- helpers -----------------------------------------------------------------------------------
def _read_obs(adata: Any) -> pd.DataFrame:
    """``obs`` of an AnnData, or of an ``.h5ad`` file (read backed; the matrix is not loaded)."""
    if isinstance(adata, (str, os.PathLike)):
        import anndata as ad

        path = Path(adata)
        if not path.is_file() or path.suffix != ".h5ad":
            raise InputDataError(f"{str(adata)!r} is not an .h5ad file; pass an AnnData or an .h5ad path.")
        backed = ad.read_h5ad(path, backed="r")
        try:
            return backed.obs.copy()
        finally:
            backed.file.close()
    if not hasattr(adata, "obs"):
        raise InputDataError(f"annotation needs an AnnData or an .h5ad path, got {type(adata).__name__}.")
    return adata.obs


def _label_column(obs: pd.DataFrame, label_key: str) -> pd.Series:
    if label_key not in obs.columns:
        shown = ", ".join(map(repr, list(obs.columns)[:15])) or "(none)"
        raise InputDataError(f"obs has no column {label_key!r} with the labels. Columns present: {shown}.")
    return obs[label_key]


def _as_text(labels: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Labels as str (object array; None where missing) and the mask of present labels."""
    present = ~labels.isna().to_numpy()
    text = np.array([str(x) if ok else None for x, ok in zip(labels.to_numpy(dtype=object), present)], dtype=object)
    return text, present


def encode_labels(labels: pd.Series, label_key: str = "labels") -> tuple[list[str], np.ndarray, np.ndarray]:
    """Classes (sorted unique non-missing labels, as str), integer codes (-1 where missing) and the
    indices of labelled cells. Raises :class:`ConfigError` with fewer than 2 classes."""
    text, present = _as_text(labels)
    classes = sorted(set(text[present]))
    if len(classes) < 2:
        raise ConfigError(f"obs[{label_key!r}] has {len(classes)} distinct label(s) {classes} among its "
                          f"{int(present.sum())} labelled cells; a classifier needs at least 2 classes.")
    lookup = {c: i for i, c in enumerate(classes)}
    codes = np.array([lookup[t] if ok else -1 for t, ok in zip(text, present)], dtype=np.int64)
    keep = np.flatnonzero(present)
    dropped = int(text.size - keep.size)
    if dropped:
        logger.warning("obs[%r]: %d of %d cells have no label and are left out of training.", label_key, dropped,
                       text.size)
    return classes, codes, keep


def _split(n: int, val_fraction: float, seed: int, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seeded train/validation split (stratified where possible); every class keeps >= 1 training cell."""
    from scforge.train import split_indices

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    try:
        train, val = split_indices(n, val_fraction, seed, y)
    except ValueError:  # stratification impossible (e.g. fewer validation cells than classes)
        train, val = split_indices(n, val_fraction, seed, None)
    missing = np.setdiff1d(np.unique(y), y[train])
    if missing.size:
        back = val[np.isin(y[val], missing)]
        train, val = np.sort(np.concatenate([train, back])), np.setdiff1d(val, back)
    return train, val


def _check_nonempty(cells: TokenizedCells, backend: AnnotationBackend) -> None:
    require_expressed_cells(cells, "they cannot be annotated", n_special=backend.n_special)


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}


def _probe_from_arrays(coef: np.ndarray, intercept: np.ndarray, C: float):
    """A fitted LogisticRegression rebuilt from its coefficients (no pickle)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=C)
    clf.coef_ = np.asarray(coef, dtype=np.float64)
    clf.intercept_ = np.asarray(intercept, dtype=np.float64)
    n_classes = 2 if clf.coef_.shape[0] == 1 else clf.coef_.shape[0]
    clf.classes_ = np.arange(n_classes)
    clf.n_features_in_ = clf.coef_.shape[1]
    return clf


# ---- the annotator -----------------------------------------------------------------------------
class Annotator:
    """A trained cell-type classifier on an scforge model of any family.

    ``mode``: ``"fine_tune"`` (``model`` is the fine-tuned model; its classifier head gives the
    probabilities) or ``"linear_probe"`` (``model`` is the frozen base model; a logistic regression
    on its L2-normalised embeddings gives them). ``classes``: the training labels (str), in the
    order of the probability columns. ``metrics``: what training logged (``val/loss``, ...);
    ``validation``: scores on the held-out cells (None without validation, or after :meth:`load`,
    where :meth:`summary` still holds them)."""

    def __init__(self, model: Any, classes: Sequence[str], label_key: str, mode: str, *,
                 settings: dict[str, Any], probe: Any = None, metrics: dict[str, float] | None = None,
                 validation: ClassificationReport | None = None, info: dict[str, Any] | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"mode={mode!r}; choose one of {MODES}.")
        if mode == "linear_probe" and probe is None:
            raise ConfigError("a linear_probe annotator needs its fitted probe.")
        self.model = model
        self.backend = backend_of(model)
        self.classes = [str(c) for c in classes]
        self.label_key = label_key
        self.mode = mode
        self.settings = dict(settings)
        self.probe = probe
        self.metrics = dict(metrics or {})
        self.validation = validation
        self.info = dict(info or {})
        if validation is not None:
            self.info["validation"] = validation.to_dict()

    def __repr__(self) -> str:
        return (f"Annotator({self.mode}, {len(self.classes)} classes from obs[{self.label_key!r}], "
                f"model {self.model.source or 'new'})")

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: mode, classes, cell counts, training metrics, validation scores."""
        return {"mode": self.mode, "family": self.backend.family, "label_key": self.label_key,
                "classes": list(self.classes),
                "n_train_cells": self.info.get("n_train_cells"), "n_val_cells": self.info.get("n_val_cells"),
                "n_unlabelled": self.info.get("n_unlabelled"), "class_weights": self.info.get("class_weights"),
                "metrics": _finite(self.metrics),
                "validation": self.info.get("validation")}

    # ---- prediction ----------------------------------------------------------------------------
    def predict(self, adata: Any, *, layer: str | None = None, key_added: str | None = None, batch_size: int = 64,
                progress: bool = True, device: str | torch.device = "auto", precision: str = "auto",
                check_input: bool = True) -> pd.DataFrame:
        """Class probabilities ``[cells, classes]`` (rows: obs names, columns: :attr:`classes`).

        For an AnnData, adds (``KEY`` = ``key_added``, default the training ``label_key``):
        ``obs[KEY_pred]`` (categorical over the training classes), ``obsm[KEY_proba]`` (float32
        array), ``uns["scforge"][KEY_proba_classes]`` (its column names) and, when the AnnData has
        the ``label_key`` column, ``obs[KEY_unseen]`` (True where the cell's label is not a
        training class; such labels are logged as a warning). Nothing else of the AnnData changes;
        an ``.h5ad`` path is read, not written."""
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        obs = _read_obs(adata)
        proba = self._proba(adata, layer=layer, batch_size=batch_size, progress=progress, device=device,
                            precision=precision, check_input=check_input)
        if proba.shape[0] != len(obs):
            raise InputDataError(f"{proba.shape[0]} predictions for {len(obs)} cells.")
        if hasattr(adata, "obsm"):
            self._write(adata, proba, key_added or self.label_key)
        return pd.DataFrame(proba, index=pd.Index(obs.index, name=obs.index.name), columns=list(self.classes))

    def evaluate(self, adata: Any, label_key: str | None = None, **predict_kwargs: Any) -> ClassificationReport:
        """:meth:`predict`, then :meth:`score` against ``obs[label_key]`` (default: the training key)."""
        key = label_key or self.label_key
        truth = _label_column(_read_obs(adata), key)
        proba = self.predict(adata, **predict_kwargs).to_numpy()
        return self.score(truth, np.asarray(self.classes, dtype=object)[proba.argmax(1)])

    def score(self, y_true: Sequence[Any] | pd.Series, y_pred: Sequence[Any] | pd.Series) -> ClassificationReport:
        """Scores of predictions on the cells whose true label is a training class (unlabelled cells and
        unseen labels are left out; :class:`InputDataError` when none is left)."""
        text, present = _as_text(pd.Series(np.asarray(y_true, dtype=object)))
        pred = np.asarray(y_pred, dtype=object).astype(str)
        if pred.size != text.size:
            raise InputDataError(f"{text.size} true labels but {pred.size} predictions.")
        seen = present & np.isin(text, np.asarray(self.classes, dtype=object))
        if not seen.any():
            raise InputDataError(f"none of the {text.size} cells has a label among the {len(self.classes)} "
                                 "training classes; nothing to score.")
        if not seen.all():
            logger.info("score: %d cells without a training-class label left out", int((~seen).sum()))
        used = set(text[seen]) | set(pred[seen])
        return classification_metrics(text[seen], pred[seen], labels=[c for c in self.classes if c in used])

    def _proba(self, adata: Any, *, layer: str | None, batch_size: int, progress: bool, device: Any,
               precision: str, check_input: bool) -> np.ndarray:
        s, backend = self.settings, self.backend
        if self.mode == "linear_probe":
            emb = backend.embed(adata, layer, batch_size=batch_size, device=device, precision=precision,
                                max_length=s.get("max_length"), seed=s.get("seed", 0), check_input=check_input,
                                progress=progress)
            return self.probe.predict_proba(_l2_normalized(emb)).astype(np.float32)
        if check_input:
            backend.check_input(adata, layer)
        cells = backend.tokenize(adata, layer, s, progress)
        _check_nonempty(cells, backend)
        return self._proba_cells(cells, batch_size=batch_size, device=device, precision=precision, progress=progress)

    def _proba_cells(self, cells: TokenizedCells, *, batch_size: int = 64, device: Any = "auto",
                     precision: str = "auto", progress: bool = False) -> np.ndarray:
        """Classifier probabilities of tokenized cells (fine-tune mode)."""
        return self.backend.proba(cells, batch_size=batch_size, device=device, precision=precision, progress=progress)

    def _write(self, adata: Any, proba: np.ndarray, key: str) -> None:
        classes = np.asarray(self.classes, dtype=object)
        adata.obs[f"{key}_pred"] = pd.Categorical(classes[proba.argmax(1)], categories=list(self.classes))
        adata.obsm[f"{key}_proba"] = proba
        adata.uns.setdefault("scforge", {})[f"{key}_proba_classes"] = list(self.classes)
        if self.label_key in adata.obs.columns:
            text, present = _as_text(adata.obs[self.label_key])
            unseen = present & ~np.isin(text, classes)
            adata.obs[f"{key}_unseen"] = unseen
            if unseen.any():
                names = sorted(set(text[unseen]))
                logger.warning("%d cells have labels in obs[%r] that the annotator was not trained on: %s; their "
                               "predictions can only be one of the training classes (obs[%r] marks them).",
                               int(unseen.sum()), self.label_key, names, f"{key}_unseen")

    # ---- persistence ---------------------------------------------------------------------------
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write a folder: the scforge model folder of :attr:`model` (fine-tuned, or the base model of a
        linear probe), ``annotator.json`` (classes, label key, mode, tokenizer settings, metrics) and,
        for a linear probe, ``probe.npz`` (coefficients; no pickles). Built aside, then renamed into place."""
        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise CheckpointError(f"'{path}' exists and is a file; choose a folder path for the annotator.")
            if any(path.iterdir()):
                if not overwrite:
                    raise CheckpointError(f"'{path}' exists and is not empty; pass overwrite=True to replace a "
                                          "saved annotator, or choose another path.")
                if not (path / ANNOTATOR_FILE).is_file():
                    raise CheckpointError(f"overwrite=True, but '{path}' is not an annotator folder (no "
                                          f"{ANNOTATOR_FILE}); scforge only replaces its own folders.")
        path.parent.mkdir(parents=True, exist_ok=True)
        stage = path.parent / f".{path.name}.tmp-{secrets.token_hex(4)}"
        try:
            self.model.save(stage)
            meta: dict[str, Any] = {"scforge_annotator": ANNOTATOR_FORMAT, **self.summary(),
                                    "settings": self.settings}
            if self.mode == "linear_probe":
                np.savez(stage / PROBE_FILE, coef=self.probe.coef_, intercept=self.probe.intercept_)
                meta["probe"] = {"file": PROBE_FILE, "C": float(self.probe.C)}
            (stage / ANNOTATOR_FILE).write_text(json.dumps(meta, indent=2, allow_nan=False) + "\n", encoding="utf-8")
            replace_folder(stage, path)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Annotator:
        """Read a folder written by :meth:`save` (the weights' checksum is verified)."""
        path = Path(path)
        file = path / ANNOTATOR_FILE
        if not file.is_file():
            raise CheckpointError(f"'{path}' is not an annotator folder: it has no {ANNOTATOR_FILE}. Write one "
                                  "with Annotator.save() or `scforge finetune`.")
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"'{file}' is not valid JSON ({exc}); the annotator folder is damaged.") from None
        if not isinstance(meta, dict) or meta.get("scforge_annotator") != ANNOTATOR_FORMAT:
            raise CheckpointError(f"'{file}' is not an annotator file of format {ANNOTATOR_FORMAT}.")
        missing = [k for k in ("mode", "label_key", "classes", "settings") if k not in meta]
        if missing or meta["mode"] not in MODES:
            raise CheckpointError(f"'{file}' lacks {missing} or has an unknown mode; the folder is damaged.")
        from scforge.models import load as load_model

        model = load_model(path)
        backend = backend_of(model)
        probe = None
        if meta["mode"] == "linear_probe":
            from scforge.hub import safe_numpy_load

            arrays = safe_numpy_load(path / PROBE_FILE, what="linear probe")  # object arrays: UnsafeFileError
            if not isinstance(arrays, dict) or not {"coef", "intercept"} <= set(arrays):
                raise CheckpointError(f"cannot read the probe '{path / PROBE_FILE}': an .npz with 'coef' and "
                                      "'intercept' is expected; the folder is damaged.")
            coef, intercept = arrays["coef"], arrays["intercept"]
            n_classes = len(meta["classes"])
            if coef.shape[0] != (1 if n_classes == 2 else n_classes) or coef.shape[1] != backend.embedding_dim:
                raise CheckpointError(f"'{path / PROBE_FILE}' has coefficients {coef.shape} for {n_classes} classes "
                                      f"and {backend.embedding_dim}-d embeddings; the folder is damaged.")
            probe = _probe_from_arrays(coef, intercept, float(meta.get("probe", {}).get("C", 1.0)))
        elif backend.n_classes != len(meta["classes"]):
            raise CheckpointError(f"'{path}': the classifier has {backend.n_classes} outputs but "
                                  f"{ANNOTATOR_FILE} lists {len(meta['classes'])} classes; the folder is damaged.")
        info = {k: meta.get(k) for k in ("n_train_cells", "n_val_cells", "n_unlabelled", "class_weights",
                                         "validation")}
        metrics = {k: float("nan") if v is None else float(v) for k, v in (meta.get("metrics") or {}).items()}
        return cls(model, meta["classes"], meta["label_key"], meta["mode"], settings=meta["settings"], probe=probe,
                   metrics=metrics, info=info)


# ---- training ----------------------------------------------------------------------------------
def _l2_normalized(emb: np.ndarray) -> np.ndarray:
    x = np.asarray(emb, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _check_training_args(epochs: int, batch_size: int, lr: float, precision: str) -> None:
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if precision not in _PRECISIONS:
        raise ConfigError(f"precision={precision!r}; choose one of {_PRECISIONS}.")


def _validation_report(classes: list[str], y_true: np.ndarray, proba: np.ndarray) -> ClassificationReport:
    names = np.asarray(classes, dtype=object)
    t, p = names[y_true], names[proba.argmax(1)]
    used = set(t) | set(p)
    return classification_metrics(t, p, labels=[c for c in classes if c in used])


def fine_tune(
    model: Any,
    adata: Any,
    label_key: str,
    *,
    layer: str | None = None,
    epochs: int = 10,
    batch_size: int = 32,
    lr: float = 1e-4,
    max_length: int | None = None,
    val_fraction: float = 0.1,
    class_weights: bool = False,
    freeze: Sequence[str] = (),
    seed: int = 0,
    precision: str = "auto",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    log_dir: str | os.PathLike | None = None,
    check_input: bool = True,
) -> Annotator:
    """Fine-tune a copy of ``model`` (any scforge family) to classify ``obs[label_key]``.

    Classes are the sorted distinct labels; unlabelled cells are left out (and logged). The copy
    gets a new classifier with one output per class; the backbone starts from ``model``'s weights
    (``freeze``: parameter-name prefixes kept fixed, e.g. scGPT's ``("encoder.", "value_encoder.")``).
    Input: raw counts (``layer``), tokenized by the family's classification recipe (scGPT: normalised
    to 1e4, log1p, binned, ``<cls>`` first), at most ``max_length`` tokens (default the model's).
    AdamW at ``lr`` with 10% warmup then cosine decay; ``val_fraction`` of the cells (stratified,
    seeded) are held out and the best epoch by validation loss is kept when ``checkpoint_dir`` is
    given. ``class_weights=True`` weights the loss by inverse class frequency (mean 1). ``adata``:
    AnnData or ``.h5ad`` path; it is not modified."""
    from scforge.train import OptimConfig, TrainConfig, fit_module

    backend = backend_of(model)
    _check_training_args(epochs, batch_size, lr, precision)
    freeze = (freeze,) if isinstance(freeze, str) else tuple(freeze)
    settings = backend.settings(max_length, seed)
    classes, codes, keep = encode_labels(_label_column(_read_obs(adata), label_key), label_key)
    if check_input:
        backend.check_input(adata, layer)
    cells = backend.tokenize(adata, layer, settings, progress)
    cells, y = cells.select(keep), codes[keep]
    _check_nonempty(cells, backend)
    train_idx, val_idx = _split(cells.n_cells, val_fraction, seed, y)
    weights = None
    if class_weights:
        inv = 1.0 / np.bincount(y, minlength=len(classes)).astype(np.float64)
        weights = tuple(float(w) for w in inv / inv.mean())
    source = f"{model.source or f'a new {backend.family} model'}, fine-tuned on obs[{label_key!r}]"
    tuned = backend.classifier_copy(len(classes), seed, source)
    tuned_backend = backend_of(tuned)
    total_steps = epochs * math.ceil(train_idx.size / batch_size)
    optim = OptimConfig(lr=lr, warmup_steps=max(1, round(0.1 * total_steps)), schedule="cosine", freeze=freeze)
    module_of = getattr(tuned, "module", None)
    trainable = {n: p.requires_grad for n, p in module_of.named_parameters()} if module_of is not None else {}
    module = tuned_backend.training_module(optim, weights)
    result = fit_module(
        module, tuned_backend.collate(cells, y, seed), cells.n_cells,
        config=TrainConfig(max_epochs=epochs, batch_size=batch_size, val_fraction=val_fraction, seed=seed,
                           precision=precision, progress=progress,
                           checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
                           log_dir=None if log_dir is None else str(log_dir)),
        labels=y, val_idx=val_idx,
    )
    trained = result.module.model.eval()
    for name, p in trained.named_parameters():  # undo the training freeze; fixed tables stay fixed
        p.requires_grad_(trainable.get(name, True))
    info = {"n_train_cells": int(train_idx.size), "n_val_cells": int(val_idx.size),
            "n_unlabelled": int(codes.size - keep.size), "class_weights": None if weights is None else list(weights)}
    annotator = Annotator(tuned, classes, label_key, "fine_tune", settings=settings, metrics=result.metrics, info=info)
    if val_idx.size:
        proba = annotator._proba_cells(cells.select(val_idx), precision=precision)
        annotator.validation = _validation_report(classes, y[val_idx], proba)
        annotator.info["validation"] = annotator.validation.to_dict()
        logger.info("fine_tune validation: %s", annotator.validation)
    return annotator


def linear_probe(
    model: Any,
    adata: Any,
    label_key: str,
    *,
    layer: str | None = None,
    C: float = 1.0,  # noqa: N803 - scikit-learn's name
    max_iter: int = 1000,
    val_fraction: float = 0.1,
    seed: int = 0,
    batch_size: int = 64,
    max_length: int | None = None,
    progress: bool = True,
    device: str | torch.device = "auto",
    precision: str = "auto",
    check_input: bool = True,
) -> Annotator:
    """Logistic regression (lbfgs, multinomial) on ``model``'s frozen, L2-normalised cell embeddings.

    Embeddings come from the family's ``embed`` (nothing is written to ``adata``); unlabelled cells
    are left out. ``val_fraction`` of the labelled cells (stratified, seeded) are held out for
    :attr:`Annotator.validation`. The annotator keeps a reference to ``model`` (not a copy)."""
    from sklearn.linear_model import LogisticRegression

    backend = backend_of(model)
    if not C > 0:
        raise ConfigError(f"C must be > 0, got {C}")
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    classes, codes, keep = encode_labels(_label_column(_read_obs(adata), label_key), label_key)
    subset = hasattr(adata, "obs") and keep.size < codes.size
    emb = backend.embed(adata[keep] if subset else adata, layer, batch_size=batch_size, device=device,
                        precision=precision, max_length=max_length, seed=seed, check_input=check_input,
                        progress=progress)
    if not subset and keep.size < codes.size:
        emb = emb[keep]
    x, y = _l2_normalized(emb), codes[keep]
    train_idx, val_idx = _split(y.size, val_fraction, seed, y)
    clf = LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter, random_state=seed).fit(x[train_idx], y[train_idx])
    settings = {"max_length": max_length, "seed": int(seed)}
    info = {"n_train_cells": int(train_idx.size), "n_val_cells": int(val_idx.size),
            "n_unlabelled": int(codes.size - keep.size)}
    metrics = {"train/accuracy": float(clf.score(x[train_idx], y[train_idx]))}
    validation = None
    if val_idx.size:
        validation = _validation_report(classes, y[val_idx], clf.predict_proba(x[val_idx]))
        metrics["val/accuracy"] = validation.accuracy
        logger.info("linear_probe validation: %s", validation)
    return Annotator(model, classes, label_key, "linear_probe", settings=settings, probe=clf, metrics=metrics,
                     validation=validation, info=info)
