"""Classification metrics against hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from scforge.errors import ConfigError, InputDataError
from scforge.metrics import classification_metrics

# true a a b b c / predicted a b b b a
#   confusion (rows true): a: [1 1 0], b: [0 2 0], c: [1 0 0]
#   precision a 1/2, b 2/3, c 0 -> macro 7/18; recall a 1/2, b 1, c 0 -> macro 1/2
#   f1 a 1/2, b 4/5, c 0 -> macro 13/30; accuracy 3/5
#   kappa: p_o = 0.6, p_e = (2*2 + 2*3 + 1*0) / 25 = 0.4 -> (0.6 - 0.4) / 0.6 = 1/3
TRUE = ["a", "a", "b", "b", "c"]
PRED = ["a", "b", "b", "b", "a"]


def test_hand_computed_example():
    r = classification_metrics(TRUE, PRED)
    assert r.accuracy == pytest.approx(0.6)
    assert r.precision == pytest.approx(7 / 18)
    assert r.recall == pytest.approx(0.5)
    assert r.macro_f1 == pytest.approx(13 / 30)
    assert r.kappa == pytest.approx(1 / 3)
    assert r.n_cells == 5 and r.labels == ["a", "b", "c"]
    assert r.confusion.to_numpy().tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert r.confusion.index.name == "true" and r.confusion.columns.name == "predicted"
    pc = r.per_class
    assert pc.loc["a"].tolist() == pytest.approx([0.5, 0.5, 0.5, 2])
    assert pc.loc["b"].tolist() == pytest.approx([2 / 3, 1.0, 0.8, 2])
    assert pc.loc["c"].tolist() == pytest.approx([0.0, 0.0, 0.0, 1])  # 0/0 precision -> 0
    assert pc["support"].dtype.kind == "i"


def test_labels_fix_order_and_macro_set():
    r = classification_metrics(pd.Series(TRUE), np.array(PRED), labels=["c", "b", "a", "d"])
    assert r.labels == ["c", "b", "a", "d"]
    assert r.confusion.loc["c", "a"] == 1 and r.confusion.loc["a", "b"] == 1
    assert r.confusion["d"].sum() == 0 and r.per_class.loc["d", "support"] == 0
    assert r.recall == pytest.approx((0 + 1 + 0.5 + 0) / 4)  # d counts as 0
    assert r.accuracy == pytest.approx(0.6)


def test_labels_outside_the_set_still_count_for_accuracy():
    r = classification_metrics(["a", "b", "z"], ["a", "a", "z"], labels=["a", "b"])
    assert r.accuracy == pytest.approx(2 / 3)
    assert r.confusion.to_numpy().tolist() == [[1, 0], [1, 0]]


def test_non_string_labels_and_json():
    r = classification_metrics([1, 1, 2, 3], [1, 2, 2, 3])
    assert r.labels == [1, 2, 3] and r.accuracy == pytest.approx(0.75)
    d = r.to_dict()
    json.dumps(d)
    assert d["confusion"] == [[1, 1, 0], [0, 1, 0], [0, 0, 1]] and d["labels"] == [1, 2, 3]
    assert set(d) >= {"accuracy", "macro_f1", "precision", "recall", "kappa", "confusion"}


def test_single_label_kappa_undefined():
    r = classification_metrics(["x", "x"], ["x", "x"])
    assert r.accuracy == 1.0 and math.isnan(r.kappa)
    assert r.to_dict()["kappa"] is None


def test_bad_inputs():
    with pytest.raises(InputDataError, match="2 labels but y_pred has 1"):
        classification_metrics(["a", "b"], ["a"])
    with pytest.raises(InputDataError, match="empty"):
        classification_metrics([], [])
    with pytest.raises(InputDataError, match="missing labels"):
        classification_metrics(["a", None], ["a", "a"])
    with pytest.raises(ConfigError, match="duplicates"):
        classification_metrics(["a"], ["a"], labels=["a", "a"])
