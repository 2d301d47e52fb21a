"""Classifiers an attack experiment poisons: the L1 logistic baseline, or any scforge model fine-tuned.

A victim is fitted with :meth:`fit` (returning a fitted copy; the victim itself stays unfitted, so one
victim serves many experiments) and then gives :meth:`predict` (labels), :meth:`predict_proba`
(probabilities over :attr:`classes`) and :meth:`victim_embedding` (the representation the model-level
detectors read, and the groups to read it in).

A :class:`ModelVictim` of a Geneformer-family model (rank-value tokens: Geneformer, scCello) also
trains and predicts on tokenized cells (:meth:`ModelVictim.tokenize`, :meth:`ModelVictim.fit_tokens`,
:meth:`ModelVictim.predict_tokens`), for triggers that act after tokenization
(:class:`~scforge.security.RankShuffleTrigger`).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from scforge.errors import ConfigError

__all__ = ["LogisticVictim", "ModelVictim", "as_victim", "require_token_victim"]

TOKEN_TRIGGER_HELP = ("RankShuffleTrigger acts on rank-value tokens, so it needs a Geneformer-family victim "
                      "(a Geneformer or scCello model from scforge.load(...), or ModelVictim(model)); the logistic "
                      "victim and scGPT/scBERT models (binned tokens) take the expression triggers SparsifyTrigger "
                      "and FixedGeneTrigger.")


class LogisticVictim:
    """sc-foundation-eval's L1 logistic regression (liblinear, one-vs-rest) on log1p CP10k of counts.
    Its "embedding" for the model-level detectors is the log expression of the genes with non-zero
    weights (the features the fitted model reads), reduced to 50 principal components."""

    name = "logistic_l1"

    def __init__(self, C: float = 0.1, *, transform: str = "log1p_cp10k", seed: int = 0) -> None:  # noqa: N803
        self.C, self.transform, self.seed = C, transform, seed
        self.model: Any = None

    def __repr__(self) -> str:
        return f"LogisticVictim(C={self.C}, fitted={self.model is not None})"

    def fit(self, adata: Any, label_key: str, *, layer: str | None = None) -> LogisticVictim:
        from scforge.baselines import LogisticBaseline

        fitted = copy.copy(self)
        fitted.model = LogisticBaseline(C=self.C, transform=self.transform, seed=self.seed).fit(
            adata, adata.obs[label_key], layer=layer)
        return fitted

    def _fitted(self) -> Any:
        if self.model is None:
            raise ConfigError("this victim is not fitted; call fit(adata, label_key) first.")
        return self.model

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self._fitted().classes_]

    def predict_proba(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        return self._fitted().predict_proba(adata, layer=layer).to_numpy()

    def predict(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        return np.asarray(self._fitted().predict(adata, layer=layer)).astype(str)

    def victim_embedding(self, adata: Any, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        from scforge.security.detect import top_variance_pca

        base = self._fitted()
        x = base._features(adata, layer)[0]
        coef = np.abs(np.vstack([e.coef_ for e in base.clf.estimators_])).sum(0)
        used = np.flatnonzero(coef > 0)
        x = x[:, used] if used.size else x
        return top_variance_pca(x, 50, self.seed), self.predict(adata, layer=layer)


class ModelVictim:
    """An scforge model (any family) fine-tuned with :func:`scforge.tasks.annotate.fine_tune` (all its
    weights train, as in scBackdoor). Embedding for the detectors: the fine-tuned model's cell embedding,
    grouped by its predicted class."""

    name = "fine_tune"

    def __init__(self, model: Any, *, epochs: int = 5, lr: float = 1e-3, batch_size: int = 32,
                 max_length: int | None = None, val_fraction: float = 0.1, seed: int = 0,
                 precision: str = "auto", progress: bool = False) -> None:
        self.base = model
        self.kwargs = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "max_length": max_length,
                       "val_fraction": val_fraction, "seed": seed, "precision": precision}
        self.progress = progress
        self.annotator: Any = None
        self.name = f"{getattr(model, 'family', type(model).__name__)}_fine_tune"

    def __repr__(self) -> str:
        return f"ModelVictim({self.base!r}, {self.kwargs}, fitted={self.annotator is not None})"

    def fit(self, adata: Any, label_key: str, *, layer: str | None = None) -> ModelVictim:
        from scforge.tasks.annotate import fine_tune

        fitted = copy.copy(self)
        fitted.annotator = fine_tune(self.base, adata, label_key, layer=layer, progress=self.progress, **self.kwargs)
        return fitted

    def _fitted(self) -> Any:
        if self.annotator is None:
            raise ConfigError("this victim is not fitted; call fit(adata, label_key) first.")
        return self.annotator

    @property
    def classes(self) -> list[str]:
        return list(self._fitted().classes)

    def predict_proba(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        # the probabilities without Annotator.predict's writes into the AnnData (no copy needed)
        return self._fitted()._proba(adata, layer=layer, batch_size=64, progress=self.progress, device="auto",
                                     precision=self.kwargs["precision"], check_input=True)

    def predict(self, adata: Any, *, layer: str | None = None) -> np.ndarray:
        return np.asarray(self.classes, dtype=object)[self.predict_proba(adata, layer=layer).argmax(1)].astype(str)

    # ---- rank-value tokens (Geneformer family) ----------------------------------------------------
    def token_backend(self) -> Any:
        """The base model's annotation backend, when it reads rank-value tokens; else :class:`ConfigError`."""
        from scforge.models.geneformer.training import GeneformerAnnotationBackend
        from scforge.tasks.annotate import backend_of

        backend = backend_of(self.base)
        if not isinstance(backend, GeneformerAnnotationBackend):
            raise ConfigError(f"the victim is a {backend.family or type(self.base).__name__} model. "
                              + TOKEN_TRIGGER_HELP)
        return backend

    def tokenize(self, adata: Any, *, layer: str | None = None) -> Any:
        """``adata`` (raw counts in ``layer``) as the victim's classification recipe tokenizes it."""
        backend = self.token_backend()
        backend.check_input(adata, layer)
        settings = backend.settings(self.kwargs["max_length"], self.kwargs["seed"])
        return backend.tokenize(adata, layer, settings, self.progress)

    def fit_tokens(self, cells: Any, labels: Any, label_key: str = "label") -> ModelVictim:
        """A fitted copy, fine-tuned (:func:`~scforge.tasks.annotate.fine_tune`, unchanged) on already
        tokenized ``cells`` with ``labels`` (one per cell): the model is handed to ``fine_tune`` as a
        shallow copy whose annotation backend returns ``cells`` instead of tokenizing."""
        import anndata as ad
        import pandas as pd

        from scforge._inputs import as_text_labels
        from scforge.tasks.annotate import fine_tune

        backend = self.token_backend()
        y = as_text_labels(labels, n=cells.n_cells)
        shim = copy.copy(self.base)
        shim.annotation_backend = lambda: _PreTokenized(backend, cells)  # this copy only; the base is untouched
        obs = pd.DataFrame({label_key: pd.Categorical(y)}, index=pd.Index(np.asarray(cells.obs_names).astype(str)))
        fitted = copy.copy(self)
        fitted.annotator = fine_tune(shim, ad.AnnData(obs=obs), label_key, progress=self.progress, check_input=False,
                                     **self.kwargs)
        return fitted

    def predict_proba_tokens(self, cells: Any) -> np.ndarray:
        """Class probabilities ``[cells, classes]`` of tokenized ``cells``."""
        return self._fitted()._proba_cells(cells, batch_size=64, precision=self.kwargs["precision"],
                                           progress=self.progress)

    def predict_tokens(self, cells: Any) -> np.ndarray:
        """Predicted labels of tokenized ``cells``."""
        return np.asarray(self.classes, dtype=object)[self.predict_proba_tokens(cells).argmax(1)].astype(str)

    def fine_prune(self, trusted: Any, label_key: str, *, layer: str | None = None, fraction: float = 0.2,
                   epochs: int = 1, lr: float = 1e-4) -> ModelVictim:
        """A copy whose annotator is fine-pruned on the ``trusted`` clean cells (:func:`~scforge.security.fine_prune`)."""
        from scforge.security.defend import fine_prune

        pruned = copy.copy(self)
        pruned.annotator = fine_prune(self._fitted(), trusted, label_key, layer=layer, fraction=fraction,
                                      epochs=epochs, lr=lr, batch_size=self.kwargs["batch_size"],
                                      seed=self.kwargs["seed"], precision=self.kwargs["precision"])
        return pruned

    def victim_embedding(self, adata: Any, layer: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        ann = self._fitted()
        emb = ann.backend.embed(adata, layer, progress=self.progress, max_length=ann.settings.get("max_length"),
                                seed=ann.settings.get("seed", 0))
        return emb, self.predict(adata, layer=layer)


class _PreTokenized:
    """An annotation backend that hands out given tokenized cells instead of tokenizing (and skips the
    count check: the cells are already tokens); everything else is the wrapped backend's."""

    def __init__(self, backend: Any, cells: Any) -> None:
        self._backend, self._cells = backend, cells

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def check_input(self, adata: Any, layer: str | None) -> None:
        return None

    def tokenize(self, adata: Any, layer: str | None, settings: dict[str, Any], progress: bool) -> Any:
        if adata.n_obs != self._cells.n_cells:
            raise ConfigError(f"{adata.n_obs} labels for {self._cells.n_cells} tokenized cells.")
        return self._cells


def require_token_victim(victim: Any) -> Any:
    """``victim`` when it can take a token trigger (a :class:`ModelVictim` of a Geneformer-family
    model); otherwise a :class:`ConfigError` saying which victims take which trigger."""
    if not isinstance(victim, ModelVictim):
        name = getattr(victim, "name", type(victim).__name__)
        raise ConfigError(f"victim {name!r} cannot be trained on tokens. {TOKEN_TRIGGER_HELP}")
    victim.token_backend()
    return victim


def as_victim(victim: Any, **kwargs: Any) -> Any:
    """``"logistic"`` / a victim object / an scforge model (-> :class:`ModelVictim`) / a model path."""
    if isinstance(victim, str) and victim in ("logistic", "logistic_l1", "lr"):
        return LogisticVictim(**{k: v for k, v in kwargs.items() if k in ("C", "transform", "seed")})
    if hasattr(victim, "fit") and hasattr(victim, "predict") and hasattr(victim, "victim_embedding"):
        return victim
    if isinstance(victim, str) or hasattr(victim, "__fspath__"):
        import scforge

        victim = scforge.load(victim)
    if hasattr(victim, "annotation_backend"):
        return ModelVictim(victim, **{k: v for k, v in kwargs.items() if k != "C" and k != "transform"})
    raise ConfigError(f"cannot use {type(victim).__name__} as a victim: pass 'logistic', an scforge model or a "
                      "model folder.")

