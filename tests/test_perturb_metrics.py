"""Perturbation metrics against hand-computed values; evaluation table and summary."""

from __future__ import annotations

import math
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.data import from_anndata, heldout_split
from scforge.errors import ConfigError
from scforge.metrics import (
    evaluate_perturbations,
    pearson_delta,
    perturbation_metrics,
    summarize_perturbations,
    top_expressed_genes,
)

PRED = np.array([1.0, 2.0, 3.0, 0.5])
TRUTH = np.array([1.0, 3.0, 2.0, 1.0])
CTRL = np.array([1.0, 1.0, 1.0, 1.0])


def _pearson_by_hand(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def test_pearson_delta_hand_computed():
    # deltas: pred (0, 1, 2, -0.5), truth (0, 2, 1, 0); means 0.625 and 0.75
    # deviations (-0.625, 0.375, 1.375, -1.125) and (-0.75, 1.25, 0.25, -0.75):
    # cross sum 0.46875 + 0.46875 + 0.34375 + 0.84375 = 2.125; squares 3.6875 and 2.75
    expected = 2.125 / math.sqrt(3.6875 * 2.75)
    assert pearson_delta(PRED, TRUTH, CTRL) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(_pearson_by_hand([0, 1, 2, -0.5], [0, 2, 1, 0]))
    assert pearson_delta(PRED, TRUTH, CTRL, genes=[1, 2, 3]) == pytest.approx(
        np.corrcoef([1, 2, -0.5], [2, 1, 0])[0, 1])
    assert pearson_delta(PRED, TRUTH, np.zeros(4)) == pytest.approx(np.corrcoef(PRED, TRUTH)[0, 1])


def test_pearson_delta_constant_is_nan_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(pearson_delta(CTRL, TRUTH, CTRL))  # prediction = control: constant delta
        assert math.isnan(pearson_delta(np.full(4, 0.1), np.full(4, 0.3), np.zeros(4)))
        assert math.isnan(pearson_delta(PRED, TRUTH, CTRL, genes=[0]))
    with pytest.raises(ConfigError):
        pearson_delta(PRED, TRUTH[:3], CTRL)
    with pytest.raises(ConfigError):
        pearson_delta(PRED, TRUTH, CTRL, genes=[7])


def test_perturbation_metrics_hand_computed():
    m = perturbation_metrics(PRED, TRUTH, CTRL, de=[1, 2, 3], de_non_dropout=[1, 2], top_expressed=[1, 3])
    assert m["mse"] == pytest.approx((0 + 1 + 1 + 0.25) / 4)
    assert m["pearson"] == pytest.approx(_pearson_by_hand([1, 2, 3, 0.5], [1, 3, 2, 1]))
    assert m["pearson_delta"] == pytest.approx(2.125 / math.sqrt(3.6875 * 2.75))
    assert m["mse_de"] == pytest.approx((1 + 1 + 0.25) / 3)
    assert m["pearson_de"] == pytest.approx(_pearson_by_hand([2, 3, 0.5], [3, 2, 1]))
    assert m["pearson_delta_de"] == pytest.approx(_pearson_by_hand([1, 2, -0.5], [2, 1, 0]))
    # signs of pred-ctrl (+, +, -) vs truth-ctrl (+, +, 0): two of three agree
    assert m["direction_accuracy_de"] == pytest.approx(2 / 3)
    assert m["mse_top20_de_non_dropout"] == pytest.approx(1.0)
    assert m["pearson_top20_de_non_dropout"] == pytest.approx(-1.0)  # (2, 3) vs (3, 2)
    assert m["pearson_delta_top20_de_non_dropout"] == pytest.approx(-1.0)
    assert m["l2_top2"] == pytest.approx(math.sqrt(1 + 0.25))
    assert set(perturbation_metrics(PRED, TRUTH, CTRL)) == {"mse", "pearson", "pearson_delta"}


def test_direction_accuracy_counts_zero_changes_as_a_direction():
    m = perturbation_metrics([2.0, 1.0, 0.0, 1.0], [3.0, 1.0, 0.5, 2.0], [1.0, 1.0, 1.0, 1.0], de=[0, 1, 2, 3])
    # pred-ctrl signs (+, 0, -, 0), truth-ctrl (+, 0, -, +): 3 of 4 agree (GEARS frac_correct_direction)
    assert m["direction_accuracy_de"] == pytest.approx(0.75)


def test_top_expressed_genes():
    x = np.array([[1.0, 0.0, 5.0, 2.0], [3.0, 0.0, 1.0, 2.0]])  # means 2, 0, 3, 2
    np.testing.assert_array_equal(top_expressed_genes(x, n=3), [2, 0, 3])  # tie 0/3: lower position first
    np.testing.assert_array_equal(top_expressed_genes(sp.csr_matrix(x), n=10), [2, 0, 3, 1])
    with pytest.raises(ConfigError):
        top_expressed_genes(x, n=0)


def _data():
    rng = np.random.default_rng(1)
    labels = ["ctrl"] * 6 + ["A+ctrl"] * 4 + ["B+ctrl"] * 4 + ["A+B"] * 4
    x = np.log1p(rng.poisson(2.0, size=(len(labels), 8))).astype(np.float32)
    x[6:10, 0] += 2.0  # A raises gene 0
    x[10:14, 1] = 0.0  # B silences gene 1
    adata = ad.AnnData(X=sp.csr_matrix(x), obs=pd.DataFrame({"condition": labels}, index=map(str, range(len(labels)))),
                       var=pd.DataFrame(index=["A", "B", "C", "D", "E", "F", "G", "H"]))
    return adata, from_anndata(adata, "condition", "ctrl")


def test_evaluate_perturbations_table():
    adata, data = _data()
    x = adata.X.toarray()
    truth = {c: x[data.cells(c)].mean(0) for c in data.conditions}
    ctrl = x[data.control_cells()].mean(0)
    noisy = {c: truth[c] + np.linspace(-0.3, 0.4, 8) for c in data.conditions}
    split = heldout_split(data, test=["A+B"], val_fraction=0.0)
    table = evaluate_perturbations(noisy, data, method="noisy", split=split, seed=7, n_de=3, n_top_expressed=5)
    assert list(table.columns) == ["method", "condition", "context", "subgroup", "seed", "metric", "value"]
    assert set(table["subgroup"]) == {"combo", "train"} and (table["seed"] == 7).all()
    row = table[table["condition"] == "A+B"].set_index("metric")["value"]
    expected = perturbation_metrics(noisy["A+B"], truth["A+B"], ctrl, de=data.de_genes("A+B", n=3),
                                    de_non_dropout=data.de_genes("A+B", n=3, kind="non_dropout"),
                                    top_expressed=top_expressed_genes(x, 5))
    for name, value in expected.items():
        assert row[name] == pytest.approx(value, rel=1e-6)
    assert "l2_top5" in row.index and row["l2_top5"] == pytest.approx(np.linalg.norm(np.linspace(-0.3, 0.4, 8)[
        top_expressed_genes(x, 5)]), rel=1e-6)
    perfect = evaluate_perturbations({(c, None): truth[c] for c in data.conditions}, data, method="oracle", n_de=3)
    by_metric = perfect.groupby("metric")["value"]
    assert by_metric.max()["mse"] == pytest.approx(0, abs=1e-12) and by_metric.min()["pearson_delta"] == pytest.approx(1)
    assert by_metric.min()["direction_accuracy_de"] == 1.0 and (perfect["subgroup"] == "all").all()
    with pytest.raises(ConfigError):
        evaluate_perturbations({"A+ctrl": np.zeros(3)}, data, method="bad")
    with pytest.raises(ConfigError):
        evaluate_perturbations({"NOPE": np.zeros(8)}, data, method="bad")


def test_summarize_perturbations_conditions_and_seeds():
    rows = [("m", "c1", None, "combo", 0, "mse", 1.0), ("m", "c2", None, "combo", 0, "mse", 3.0),
            ("m", "c3", None, "single", 0, "mse", 5.0), ("m", "c4", None, "single", 0, "mse", float("nan"))]
    table = pd.DataFrame(rows, columns=["method", "condition", "context", "subgroup", "seed", "metric", "value"])
    out = summarize_perturbations(table).set_index(["subgroup"])
    assert out.loc["combo", "mean"] == 2.0 and out.loc["combo", "sd"] == pytest.approx(math.sqrt(2))
    assert out.loc["single", "mean"] == 5.0 and out.loc["single", "n_conditions"] == 1
    assert out.loc["all", "mean"] == 3.0 and out.loc["all", "sd"] == pytest.approx(2.0)
    assert (out["sd_over"] == "conditions").all() and (out["n_seeds"] == 1).all()
    seed1 = table.assign(seed=1, value=table["value"] + 1.0)
    both = summarize_perturbations(pd.concat([table, seed1])).set_index("subgroup")
    assert both.loc["combo", "mean"] == 2.5  # seed means 2 and 3
    assert both.loc["combo", "sd"] == pytest.approx(math.sqrt(0.5)) and both.loc["combo", "sd_over"] == "seeds"
    assert both.loc["combo", "n_seeds"] == 2
    with pytest.raises(ConfigError):
        summarize_perturbations(table.drop(columns="seed"))
