"""Classification metrics on scikit-learn: one call gives the scalar scores, the confusion matrix
and the per-class table.

>>> report = classification_metrics(["B", "T", "T"], ["B", "T", "B"])
>>> round(report.accuracy, 3)
0.667
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from scforge._inputs import as_labels
from scforge.errors import ConfigError, InputDataError


@dataclass
class ClassificationReport:
    """Scores of predicted against true labels (macro averages over ``labels``; 0/0 counts as 0).

    ``confusion``: counts, rows = true label, columns = predicted label. ``per_class``: precision,
    recall, f1 and support (true cells) per label. ``kappa`` is Cohen's kappa (NaN when undefined,
    e.g. a single label everywhere)."""

    accuracy: float
    macro_f1: float
    precision: float
    recall: float
    kappa: float
    n_cells: int
    confusion: pd.DataFrame
    per_class: pd.DataFrame

    @property
    def labels(self) -> list[Any]:
        return list(self.confusion.index)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict: the scalar metrics (non-finite -> None), ``labels`` and ``confusion``
        (list of rows, true x predicted)."""
        return {
            "accuracy": _finite(self.accuracy), "macro_f1": _finite(self.macro_f1),
            "precision": _finite(self.precision), "recall": _finite(self.recall), "kappa": _finite(self.kappa),
            "n_cells": int(self.n_cells), "labels": [_plain(x) for x in self.labels],
            "confusion": self.confusion.to_numpy().astype(int).tolist(),
        }

    def __str__(self) -> str:
        return (f"{self.n_cells} cells, {len(self.labels)} labels: accuracy {self.accuracy:.3f}, macro F1 "
                f"{self.macro_f1:.3f}, precision {self.precision:.3f}, recall {self.recall:.3f}, kappa {self.kappa:.3f}")


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _plain(x: Any) -> Any:
    return x.item() if isinstance(x, np.generic) else x


def _sorted_union(a: np.ndarray, b: np.ndarray) -> list[Any]:
    union = list(dict.fromkeys(list(a) + list(b)))
    try:
        return sorted(union)
    except TypeError:  # mixed types: order by their text
        return sorted(union, key=str)


def classification_metrics(y_true: Sequence[Any] | np.ndarray | pd.Series, y_pred: Sequence[Any] | np.ndarray | pd.Series,
                           *, labels: Sequence[Any] | None = None) -> ClassificationReport:
    """Accuracy, macro F1 / precision / recall, Cohen's kappa, confusion matrix and per-class scores.

    ``labels`` fixes the label set and its order (rows and columns of ``confusion``, the classes
    averaged over); default: the sorted union of the true and predicted labels. Cells whose true
    and predicted labels are both outside ``labels`` still count for accuracy."""
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    t, p = as_labels(y_true, what="y_true"), as_labels(y_pred, what="y_pred")
    if t.size != p.size:
        raise InputDataError(f"y_true has {t.size} labels but y_pred has {p.size}; give one of each per cell.")
    if t.size == 0:
        raise InputDataError("no cells to score: y_true and y_pred are empty.")
    if labels is None:
        label_list = _sorted_union(t, p)
    else:
        label_list = list(labels)
        if not label_list:
            raise ConfigError("labels is empty; pass the label set to score, or None for every label seen.")
        if len(set(label_list)) != len(label_list):
            raise ConfigError(f"labels has duplicates: {label_list}.")
    # integer codes for sklearn (it rejects object arrays of non-strings); labels outside
    # ``label_list`` get codes of their own, so they still count for accuracy
    every = label_list + [x for x in dict.fromkeys(list(t) + list(p)) if x not in set(label_list)]
    code = {x: i for i, x in enumerate(every)}
    tc = np.fromiter((code[x] for x in t), dtype=np.int64, count=t.size)
    pc = np.fromiter((code[x] for x in p), dtype=np.int64, count=p.size)
    lab = np.arange(len(label_list))
    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore", UserWarning)  # single-label inputs: we pass labels explicitly
        warnings.simplefilter("ignore", RuntimeWarning)  # undefined kappa -> NaN, documented
        prec, rec, f1, _ = precision_recall_fscore_support(tc, pc, labels=lab, average="macro", zero_division=0)
        per_p, per_r, per_f, support = precision_recall_fscore_support(tc, pc, labels=lab, average=None,
                                                                       zero_division=0)
        kappa = float(cohen_kappa_score(tc, pc, labels=lab)) if len(label_list) > 1 else float("nan")
        matrix = confusion_matrix(tc, pc, labels=lab)
        accuracy = float(accuracy_score(tc, pc))
    index = pd.Index(label_list, name="true")
    confusion = pd.DataFrame(matrix, index=index, columns=pd.Index(label_list, name="predicted"))
    per_class = pd.DataFrame({"precision": per_p, "recall": per_r, "f1": per_f, "support": support.astype(int)},
                             index=pd.Index(label_list, name="label"))
    return ClassificationReport(accuracy=accuracy, macro_f1=float(f1), precision=float(prec),
                                recall=float(rec), kappa=kappa, n_cells=int(t.size), confusion=confusion,
                                per_class=per_class)
