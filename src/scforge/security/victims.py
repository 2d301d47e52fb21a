"""Classifiers an attack experiment poisons: the L1 logistic baseline, or any scforge model fine-tuned.

A victim is fitted with :meth:`fit` (returning a fitted copy; the victim itself stays unfitted, so one
victim serves many experiments) and then gives :meth:`predict` (labels), :meth:`predict_proba`
(probabilities over :attr:`classes`) and :meth:`victim_embedding` (the representation the model-level
detectors read, and the groups to read it in).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from scforge.errors import ConfigError

__all__ = ["LogisticVictim", "ModelVictim", "as_victim"]


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

