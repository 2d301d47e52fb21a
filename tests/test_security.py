"""Backdoor triggers, poisoned-cell selection, detectors, audit and the attack experiment (scforge.security)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.errors import ConfigError, InputDataError
from scforge.security import (FixedGeneTrigger, LogisticVictim, RankShuffleTrigger, SparsifyTrigger,
                              attack_success_rate, audit, gini_coefficient, level_consistency, poison,
                              poison_tokens, run_attack, select_poison_cells, split_cells, sweep_attack)
from scforge.security.detect import (activation_clustering_scores, anomaly_ensemble, centroid_distance,
                                     detection_metrics, knn_label_disagreement, mean_abs_z, robust_z,
                                     spectral_signature_scores, strip_entropy)

KEY = "seurat_annotations"


@pytest.fixture(scope="module")
def cells(ifnb_small):
    """600 real PBMCs (raw counts), every cell type present."""
    return ifnb_small[np.r_[0:300, 1000:1300]].copy()


# ---- triggers ---------------------------------------------------------------------------------
def _reference_sparsify(row: np.ndarray, topnstop: float, rng: np.random.Generator) -> np.ndarray:
    """scBackdoor's trigger written out for one dense row, as published (values as given)."""
    total = row[row != 0].sum()
    n = max(int((row[row != 0] > topnstop).sum()), 1)
    top = np.argsort(-row, kind="stable")[:n]
    r = rng.uniform(0, 1, size=n)
    out = np.zeros_like(row)
    out[top] = r * total / r.sum()
    return out


def test_sparsify_values_scale_matches_the_published_transform(cells):
    x = sp.csr_matrix(cells.layers["lognorm"], dtype=np.float64)
    rows = np.array([3, 10, 250, 599])
    got = SparsifyTrigger(topnstop=2.0, scale="values").apply(x, rows, seed=7)
    rng = np.random.default_rng(7)
    for i in rows:
        np.testing.assert_allclose(got[i].toarray().ravel(), _reference_sparsify(x[i].toarray().ravel(), 2.0, rng),
                                   rtol=1e-12)
    untouched = np.setdiff1d(np.arange(x.shape[0]), rows)
    assert (got[untouched] != x[untouched]).nnz == 0


def test_sparsify_on_counts_keeps_integer_totals_and_top_genes(cells):
    x = sp.csr_matrix(cells.X)
    before = x.copy()
    trig = SparsifyTrigger(topnstop=2.0, scale="log1p")
    rows = np.arange(0, 600, 5)
    got = trig.apply(x, rows, seed=1)
    assert (x != before).nnz == 0  # input unchanged
    kept = trig.n_kept(x[rows])
    lognorm = np.log1p(x[rows].toarray() / x[rows].sum(1).A * 1e4)
    np.testing.assert_array_equal(kept, np.maximum((lognorm > 2.0).sum(1), 1))
    np.testing.assert_array_equal(np.asarray(got[rows].sum(1)).ravel(), np.asarray(x[rows].sum(1)).ravel())
    np.testing.assert_array_equal(np.diff(got[rows].indptr), kept)
    assert np.all(got[rows].data == np.round(got[rows].data)) and got[rows].data.min() >= 1
    for j, i in enumerate(rows[:5]):  # the kept genes are the cell's top-n genes
        dense = x[i].toarray().ravel()
        assert set(got[i].indices) == set(np.argsort(-dense, kind="stable")[: kept[j]])
    # the levels are redrawn: the cell no longer follows its genes' usual levels
    corr = level_consistency(got)
    assert np.median(corr[rows]) < 0.2 < 0.6 < np.median(np.delete(corr, rows))
    assert (trig.apply(x, rows, seed=1) != got).nnz == 0  # same seed, same result
    assert (trig.apply(x, rows, seed=2) != got).nnz > 0


def test_sparsify_rejects_bad_settings_and_inputs(cells):
    with pytest.raises(ConfigError, match="scale"):
        SparsifyTrigger(scale="ln")
    with pytest.raises(ConfigError, match="topnstop"):
        SparsifyTrigger(topnstop=-1)
    with pytest.raises(InputDataError, match="counts|integer"):
        SparsifyTrigger(scale="log1p").apply(cells.layers["lognorm"], [0])
    with pytest.raises(InputDataError, match="row indices"):
        SparsifyTrigger().apply(cells.X, [10_000])
    negative = cells.X.copy()
    negative.data[0] = -1.0
    with pytest.raises(InputDataError, match="trigger has negative values.*first at cell 0"):
        SparsifyTrigger().apply(negative, [0])


def test_rank_shuffle_trigger_on_geneformer_style_tokens():
    from scforge.tokenize.ragged import TokenizedCells

    ids = [np.r_[2, np.arange(100, 140), 3], np.r_[2, np.arange(200, 210), 3], np.r_[2, np.arange(300, 330), 3]]
    offsets = np.r_[0, np.cumsum([a.size for a in ids])]
    cells = TokenizedCells(offsets, np.concatenate(ids).astype(np.int32), None, np.array(["a", "b", "c"]),
                           {"cls_id": 2, "eos_id": 3})
    out = RankShuffleTrigger(top=20).apply(cells, [0, 1], seed=0)
    first, _ = out.cell(0)
    assert first[0] == 2 and first[-1] == 3 and first.size == 22
    assert sorted(first[1:-1]) == list(range(100, 120)) and list(first[1:-1]) != list(range(100, 120))
    second, _ = out.cell(1)
    assert sorted(second[1:-1]) == list(range(200, 210))  # shorter than 20: all kept, shuffled
    np.testing.assert_array_equal(out.cell(2)[0], ids[2])  # untouched
    np.testing.assert_array_equal(cells.cell(0)[0], ids[0])  # input unchanged
    new_cells, labels, mask = poison_tokens(cells, ["x", "y", "y"], "x", rate=0.5, seed=0)
    assert mask.sum() == labels.tolist().count("x") - 1 == 1
    with pytest.raises(InputDataError, match="rank-value tokens"):
        RankShuffleTrigger().apply(np.zeros((2, 2)))


def test_fixed_gene_trigger_sets_the_genes_to_their_high_quantile(cells):
    genes = ("ISG15", "IFI6")
    trig = FixedGeneTrigger(genes, quantile=0.99)
    x = sp.csr_matrix(cells.X)
    got = trig.apply(x, [0, 1], gene_names=cells.var_names)
    cols = [cells.var_names.get_loc(g) for g in genes]
    for j, c in enumerate(cols):
        expressed = x[:, c].data
        assert got[0, c] == got[1, c] == max(round(float(np.quantile(expressed, 0.99))), 1)
    other = np.setdiff1d(np.arange(x.shape[1]), cols)
    assert (got[:2][:, other] != x[:2][:, other]).nnz == 0 and (got[2:] != x[2:]).nnz == 0
    with pytest.raises(InputDataError, match="NOTAGENE"):
        FixedGeneTrigger(("NOTAGENE",)).apply(x, [0], gene_names=cells.var_names)


# ---- selection -------------------------------------------------------------------------------
def test_gini_matches_the_textbook_formula(cells):
    x = sp.csr_matrix(cells.X[:20])
    got = gini_coefficient(x)
    for i in range(20):
        v = np.sort(x[i].toarray().ravel().astype(np.float64))
        n = v.size
        ref = 2 * np.sum(np.arange(1, n + 1) * v) / (n * v.sum()) - (n + 1) / n
        assert got[i] == pytest.approx(ref, abs=1e-12)
    assert gini_coefficient(sp.csr_matrix(np.ones((1, 5))))[0] == pytest.approx(0.0)
    assert gini_coefficient(sp.csr_matrix((1, 5)))[0] == 0.0


def test_gini_selection_picks_the_highest_gini_cells_per_class():
    y = np.array(["t"] * 10 + ["a"] * 20 + ["b"] * 10, dtype=object)
    g = np.arange(40, dtype=float)[::-1] / 40
    idx = select_poison_cells(y, "t", 0.1, method="gini", gini=g)
    rate = 0.1 * 40 / 30
    assert idx.size == math.ceil(20 * rate) + math.ceil(10 * rate)
    assert list(idx) == [10, 11, 12, 30, 31]  # the highest Gini in each non-target class
    faithful = select_poison_cells(y, "t", 0.1, method="gini_faithful", gini=g)
    assert list(faithful) == [0, 1, 2, 20, 21]  # positions in the non-target subset, used on the full set (sic)
    rnd = select_poison_cells(y, "t", 0.1, method="random", seed=3)
    assert rnd.size == int(int(0.1 * 40) / 30 * 20) + int(int(0.1 * 40) / 30 * 10) and not np.isin(rnd, range(10)).any()
    np.testing.assert_array_equal(rnd, select_poison_cells(y, "t", 0.1, method="random", seed=3))
    with pytest.raises(InputDataError, match="target label"):
        select_poison_cells(y, "zzz", 0.1, gini=g)
    with pytest.raises(ConfigError, match="rate"):
        select_poison_cells(y, "t", 1.5, gini=g)
    with pytest.raises(ConfigError, match="Gini"):
        select_poison_cells(y, "t", 0.1, method="gini")


def test_poison_copies_flips_labels_and_leaves_the_input_alone(cells):
    before_x, before_obs = cells.X.copy(), cells.obs.copy()
    p = poison(cells, KEY, "B", rate=0.05, seed=0)
    assert (cells.X != before_x).nnz == 0
    pd.testing.assert_frame_equal(cells.obs, before_obs)
    y = cells.obs[KEY].astype(str).to_numpy()
    assert p.n_poisoned >= int(0.05 * cells.n_obs) and not (y[p.poisoned] == "B").any()
    assert (p.adata.obs[KEY].astype(str).to_numpy()[p.poisoned] == "B").all()
    changed = np.flatnonzero(np.asarray((p.adata.X != cells.X).sum(1)).ravel() > 0)
    assert set(changed) <= set(np.flatnonzero(p.poisoned))
    g = gini_coefficient(cells.X)
    for c in set(y[p.poisoned]):  # Gini rule: each class's poisoned cells are its highest-Gini ones
        members = np.flatnonzero((y == c))
        chosen = members[p.poisoned[members]]
        assert g[chosen].min() >= np.sort(g[members])[::-1][chosen.size - 1] - 1e-12
    assert p.summary()["n_poisoned"] == p.n_poisoned
    again = poison(cells, KEY, "B", rate=0.05, seed=0)
    assert (again.adata.X != p.adata.X).nnz == 0


# ---- detectors -------------------------------------------------------------------------------
def test_mean_abs_z_and_centroid_distance_equal_dense_references(cells):
    from scforge.baselines import log1p_cp10k

    x = log1p_cp10k(cells.X[:200])
    dense = x.toarray()
    sd = dense.std(0)
    z = np.where(sd > 0, (dense - dense.mean(0)) / np.where(sd > 0, sd, 1), 0.0)
    np.testing.assert_allclose(mean_abs_z(x), np.abs(z).mean(1), rtol=1e-9)
    y = cells.obs[KEY].astype(str).to_numpy()[:200]
    cents = np.stack([dense[y == c].mean(0) for c in np.unique(y)])
    ref = np.sqrt(((dense[:, None, :] - cents[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(centroid_distance(x, y), ref, rtol=1e-7)
    ens = anomaly_ensemble(x, y, n_pcs=10)
    assert set(ens) == {"mean_abs_z", "centroid_distance", "isolation", "anomaly"}
    pub = anomaly_ensemble(x, y, n_pcs=10, combine="published")
    np.testing.assert_allclose(pub["anomaly"], (ens["mean_abs_z"] + ens["centroid_distance"] + ens["isolation"]) / 3)


def test_knn_disagreement_and_robust_z():
    emb = np.r_[np.zeros((20, 2)), np.ones((20, 2)) * 10] + np.random.default_rng(0).normal(size=(40, 2)) * 0.1
    y = np.array(["a"] * 20 + ["b"] * 20, dtype=object)
    y[3] = "b"  # a mislabelled cell inside cluster a
    share = knn_label_disagreement(emb, y, n_neighbors=5)
    assert share[3] == 1.0 and share.argmax() == 3 and np.median(share) == 0.0
    z = robust_z(np.r_[np.zeros(9), 10.0], min_scale=0.5)
    assert z[-1] == pytest.approx(20.0)


def test_robust_z_trim_reestimates_the_reference_without_the_outlying_third():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(size=60), np.full(40, 8.0)]
    plain, trimmed = robust_z(values), robust_z(values, trim=3.0)
    assert plain[60:].max() < 4  # 40% at one value inflate the MAD and shift the median
    assert trimmed[60:].min() > 6 and abs(np.median(trimmed[:60])) < 0.3  # the reference is the clean 60
    assert np.abs(trimmed[:60]).max() < 4
    groups = np.r_[np.zeros(100, int), np.ones(100, int)]
    both = robust_z(np.r_[values, values], groups, trim=3.0)
    np.testing.assert_allclose(both, np.r_[trimmed, trimmed])
    majority = np.r_[rng.normal(size=40), np.full(60, 8.0)]  # more than half outlying: not trimmed
    np.testing.assert_allclose(robust_z(majority, trim=3.0), robust_z(majority))
    with pytest.raises(ConfigError, match="trim"):
        robust_z(values, trim=0)


def test_sparsity_finds_poisons_that_make_up_a_third_of_the_target_class(ifnb_small, cells):
    import scanpy as sc

    from scforge.security.detect import sparsity_scores

    hvg = sc.pp.highly_variable_genes(ifnb_small, flavor="seurat_v3", n_top_genes=1000, inplace=False)
    h = cells[:, hvg["highly_variable"].to_numpy()].copy()  # scBackdoor's HVG-restricted input
    p = poison(h, KEY, "B", rate=0.05, trigger=SparsifyTrigger(topnstop=5.0), seed=0)
    y = p.adata.obs[KEY].astype(str).to_numpy()
    assert p.poisoned.sum() / (y == "B").sum() > 0.4
    scores = sparsity_scores(p.adata.X, y)
    untrimmed = robust_z(-np.log1p(scores["n_genes"]), y)
    assert (untrimmed[p.poisoned] > 5).mean() < 0.1  # the class's own poisons hide them
    m = detection_metrics(scores["sparsity"], p.poisoned, scores["sparsity"] > 5)
    assert m["recall"] > 0.9 and m["precision"] == 1.0 and m["auroc"] > 0.999


def test_complexity_finds_poisons_that_outnumber_their_target_class(ifnb_small):
    from scforge.baselines import highly_variable_genes
    from scforge.security.detect import complexity_scores, sparsity_scores

    h = ifnb_small[:, highly_variable_genes(ifnb_small, 1200)].copy()
    p = poison(h, KEY, "NK", rate=0.05, trigger=SparsifyTrigger(topnstop=5.0), seed=0)
    y = p.adata.obs[KEY].astype(str).to_numpy()
    assert p.poisoned.sum() / (y == "NK").sum() > 0.5  # NK is mostly poisons after the flip
    per_class = sparsity_scores(p.adata.X, y)["sparsity"]
    assert detection_metrics(per_class, p.poisoned, per_class > 5)["recall"] < 0.1  # every per-class statistic fails
    scores = complexity_scores(p.adata.X)
    m = detection_metrics(scores["complexity"], p.poisoned, scores["complexity"] > 5)
    assert m["auroc"] > 0.99 and m["recall"] > 0.95 and m["precision"] > 0.95
    # a poison has the genes of a cell with a far smaller total: its deficit is large and positive
    assert np.median(scores["log_genes_deficit"][p.poisoned]) > 1.5
    assert abs(np.median(scores["log_genes_deficit"][~p.poisoned])) < 0.1
    clean = complexity_scores(h.X)["complexity"]
    assert (clean > 5).mean() < 0.005  # few false alarms on the unpoisoned set
    np.testing.assert_allclose(complexity_scores(h.X.toarray())["complexity"], clean)
    with pytest.raises(InputDataError, match="at least 3 cells"):
        complexity_scores(h.X[:2])


def test_count_based_detectors_refuse_scaled_or_non_finite_input(ifnb_small):
    from scforge.security.detect import complexity_scores, sparsity_scores

    small = ifnb_small[:60].copy()
    before = small.X.copy()
    y = small.obs[KEY].astype(str).to_numpy()
    dense = small.X.toarray()
    scaled = dense - dense.mean(axis=0)  # centred: negative values, genes detected mean nothing
    broken = small.X.astype(np.float32).copy()
    broken.data[0] = np.nan
    for detector in (complexity_scores, lambda m: sparsity_scores(m, y)):
        with pytest.raises(InputDataError, match=r"score has negative values \(min -.*first at cell 0"):
            detector(scaled)
        with pytest.raises(InputDataError, match="score has 1 NaN or infinite values.*must be finite"):
            detector(broken)
    assert (small.X != before).nnz == 0  # the caller's matrix is untouched
    assert np.isfinite(complexity_scores(small.X)["complexity"]).all()


def test_spectral_signatures_and_activation_clustering_find_a_planted_subgroup():
    rng = np.random.default_rng(0)
    clean = rng.normal(size=(95, 16))
    planted = rng.normal(size=(5, 16)) * 0.3 + 6.0
    emb = np.r_[clean, planted]
    y = np.array(["t"] * 100, dtype=object)
    truth = np.r_[np.zeros(95, bool), np.ones(5, bool)]
    assert detection_metrics(spectral_signature_scores(emb, y), truth)["auroc"] > 0.99
    ac = activation_clustering_scores(emb, y)
    assert ac["flag"][truth].all() and not ac["flag"][~truth].any()
    m = detection_metrics(ac["score"], truth, ac["flag"])
    assert m["precision"] == m["recall"] == 1.0


def test_strip_entropy_is_lowest_for_a_trigger_the_model_always_follows():
    rng = np.random.default_rng(0)
    x = sp.csr_matrix(rng.poisson(1.0, size=(30, 10)).astype(float))

    def predict_proba(m):  # "triggered" = gene 0 above 5 -> class 0 with certainty
        m = sp.csr_matrix(m).toarray()
        p = np.full((m.shape[0], 3), 1 / 3)
        p[m[:, 0] > 5] = [1.0, 0.0, 0.0]
        return p

    triggered = x.tolil()
    triggered[:5, 0] = 40.0
    scores = strip_entropy(predict_proba, triggered.tocsr(), x, n_blends=4)
    assert scores[:5].min() > scores[5:].max()


def test_detection_metrics():
    m = detection_metrics(np.array([0.1, 0.9, 0.8, 0.2]), np.array([0, 1, 1, 0]), np.array([0, 1, 0, 1], bool))
    assert m["auroc"] == 1.0 and m["precision"] == 0.5 and m["recall"] == 0.5


# ---- audit -----------------------------------------------------------------------------------
def test_audit_finds_the_poisoned_cells_on_real_data(cells):
    p = poison(cells, KEY, "CD14 Mono", rate=0.05, seed=0)
    before = p.adata.X.copy()
    table = audit(p.adata, KEY)
    assert (p.adata.X != before).nnz == 0
    assert list(table.index) == list(p.adata.obs_names)
    m = detection_metrics(table["score"].to_numpy(), p.poisoned, table["flagged"].to_numpy())
    assert m["auroc"] > 0.99 and m["recall"] == 1.0 and m["precision"] > 0.7
    assert table.loc[p.poisoned_names, "reasons"].str.contains("usual levels").all()
    summary = table.attrs["summary"]
    assert summary["n_flagged"] == int(table.flagged.sum()) and set(summary["per_class"]) == set(table.label)
    clean = audit(cells, KEY)
    assert clean["flagged"].mean() < 0.05  # few false alarms on clean data


def test_audit_on_log_normalised_values_and_bad_input(cells):
    p = poison(cells, KEY, "B", rate=0.05, trigger=SparsifyTrigger(scale="values"), layer="lognorm", seed=0)
    table = audit(p.adata, KEY, layer="lognorm", detectors=("level", "sparsity"))
    assert detection_metrics(table["score"].to_numpy(), p.poisoned)["auroc"] > 0.98
    with pytest.raises(InputDataError, match="no column"):
        audit(cells, "nope")
    with pytest.raises(ConfigError, match="need a model"):
        audit(cells, KEY, detectors=("spectral",))
    with pytest.raises(ConfigError, match="unknown detectors"):
        audit(cells, KEY, detectors=("magic",))
    missing = cells.copy()
    missing.obs[KEY] = missing.obs[KEY].astype(object)
    missing.obs.iloc[0, missing.obs.columns.get_loc(KEY)] = None
    with pytest.raises(InputDataError, match="missing labels"):
        audit(missing, KEY)
    scaled = cells.copy()
    dense = scaled.layers["lognorm"].toarray()
    scaled.layers["centred"] = dense - dense.mean(axis=0)
    with pytest.raises(InputDataError, match=r"audit's expression \(layer 'centred'\) has negative values"):
        audit(scaled, KEY, layer="centred")
    np.testing.assert_array_equal(scaled.layers["centred"], dense - dense.mean(axis=0))  # left as it was


def test_audit_with_a_logistic_victim_adds_model_level_scores(cells):
    victim = LogisticVictim(C=0.1).fit(cells, KEY)
    table = audit(cells, KEY, model=victim, detectors=("level", "spectral", "clusters"))
    assert {"spectral", "spectral_z", "clusters", "clusters_z", "model_group"} <= set(table.columns)
    assert np.isfinite(table["score"]).all()


# ---- the experiment --------------------------------------------------------------------------
def test_attack_success_rate_and_splits(cells):
    assert attack_success_rate(["B", "B", "NK", "B"], "B") == 0.75
    with pytest.raises(InputDataError):
        attack_success_rate([], "B")
    train, test = split_cells(cells, KEY, split=("stim", "CTRL", "STIM"))
    assert set(cells.obs.stim.iloc[train]) == {"CTRL"} and set(cells.obs.stim.iloc[test]) == {"STIM"}
    with pytest.raises(InputDataError, match="no cells"):
        split_cells(cells, KEY, split=("stim", "CTRL", "NOPE"))


def test_run_attack_with_logistic_victim_plants_and_removes_the_backdoor(ifnb_small):
    before = ifnb_small.X.copy()
    res = run_attack(ifnb_small, KEY, "B", victim="logistic", rate=0.05, seed=0)
    assert (ifnb_small.X != before).nnz == 0
    w = res.wide()
    assert list(w.index) == ["clean", "poisoned", "defended"]
    assert w.loc["poisoned", "asr"] > w.loc["clean", "asr"] + 0.3  # the backdoor is planted
    assert w.loc["defended", "asr"] <= 0.1  # and removed
    assert abs(w.loc["defended", "accuracy"] - w.loc["clean", "accuracy"]) <= 0.02
    assert res.detection["auroc"] > 0.99 and res.detection["recall"] == 1.0
    assert res.settings["n_poisoned"] == int(res.audit.shape[0] * 0 + res.settings["n_poisoned"])
    assert res.value("defended", "n_removed") == res.detection["n_flagged"]


def test_attack_keeps_per_cell_predictions_and_breaks_asr_down(ifnb_small):
    res = run_attack(ifnb_small, KEY, "B", victim="logistic", rate=0.05, trigger=SparsifyTrigger(topnstop=4.0),
                     defence=None, seed=0)
    frame = res.triggered
    _, test_idx = split_cells(ifnb_small, KEY, seed=0)
    test = ifnb_small[test_idx]
    non_target = test[test.obs[KEY].astype(str) != "B"]
    assert list(frame.index) == list(non_target.obs_names)
    assert list(frame["label"]) == list(non_target.obs[KEY].astype(str))
    np.testing.assert_array_equal(frame["n_kept"], SparsifyTrigger(topnstop=4.0).n_kept(non_target.X))
    assert list(frame.columns) == ["label", "n_kept", "pred_clean", "pred_poisoned"]
    for stage in ("clean", "poisoned"):
        assert (frame[f"pred_{stage}"] == "B").mean() == pytest.approx(res.value(stage, "asr"))
    by_class = res.asr_by("label")
    assert by_class["n_cells"].sum() == len(frame) and "B" not in by_class.index
    assert (by_class["asr"] * by_class["n_cells"]).sum() / len(frame) == pytest.approx(res.value("poisoned", "asr"))
    mono = frame[frame["label"] == "CD14 Mono"]
    assert by_class.loc["CD14 Mono", "asr"] == pytest.approx((mono["pred_poisoned"] == "B").mean())
    by_kept = res.asr_by("n_kept", "clean", bins=[0, 10, 1000])
    assert list(by_kept["n_cells"]) == [int((frame.n_kept <= 10).sum()), int((frame.n_kept > 10).sum())]
    # how sparse the poisons were against the triggered test cells
    assert res.settings["n_kept_median_triggered_test"] == float(frame["n_kept"].median())
    assert 1 <= res.settings["n_kept_median_poisoned"] <= frame["n_kept"].max()
    assert res.stages == ["clean", "poisoned"]
    side_by_side = res.asr_by_stages("n_kept", bins=[0, 10, 1000])
    assert list(side_by_side.columns) == ["n_cells", "asr_clean", "asr_poisoned"]
    np.testing.assert_allclose(side_by_side["asr_clean"], by_kept["asr"])
    np.testing.assert_array_equal(side_by_side["n_cells"], by_kept["n_cells"])
    with pytest.raises(ConfigError, match="no stage 'defended'"):
        res.asr_by("label", "defended")
    with pytest.raises(ConfigError, match="cannot group by"):
        res.asr_by("pred_clean")
    with pytest.raises(ConfigError, match="numeric column"):
        res.asr_by("label", bins=[0, 10])
    with pytest.raises(ConfigError, match="outside the bins"):  # no cell silently left out of the table
        res.asr_by("n_kept", bins=[int(frame.n_kept.min()), 1000])


def test_sweep_and_relabel_defence(cells):
    table = sweep_attack(cells, KEY, targets=["B"], rates=[0.03, 0.08], victim="logistic", defence="relabel")
    assert set(table.rate) == {0.03, 0.08} and {"clean", "poisoned", "defended", "detection"} <= set(table.stage)
    assert (table[(table.stage == "defended") & (table.metric == "n_relabelled")].value > 0).all()
    with pytest.raises(ConfigError, match="defence"):
        run_attack(cells, KEY, "B", defence="burn")


def test_run_attack_defence_flags_with_the_chosen_detectors(cells):
    trigger = SparsifyTrigger(topnstop=4.0)
    default = run_attack(cells, KEY, "B", victim="logistic", trigger=trigger, seed=0)
    chosen = run_attack(cells, KEY, "B", victim="logistic", trigger=trigger, combine=("complexity", "level"),
                        seed=0)
    assert default.settings["combine"] is None and chosen.settings["combine"] == ["complexity", "level"]
    table = chosen.audit
    np.testing.assert_allclose(table["score"], table[["complexity_z", "level_z"]].max(axis=1))
    assert table["knn_z"].max() > chosen.settings["threshold"]  # a kNN alarm that no longer flags
    assert chosen.value("defended", "n_removed") == int(table["flagged"].sum())
    assert chosen.value("defended", "n_removed") < default.value("defended", "n_removed")
    assert chosen.detection["recall"] == 1.0 and chosen.value("defended", "asr") <= 0.1
    with pytest.raises(ConfigError, match="model_level=True"):  # refused before any training
        run_attack(cells, KEY, "B", victim="logistic", trigger=trigger, combine=("spectral",))
    with pytest.raises(ConfigError, match="detector names"):
        run_attack(cells, KEY, "B", victim="logistic", trigger=trigger, combine="level")


def test_proportional_levels_keep_the_cells_own_order(cells):
    x = sp.csr_matrix(cells.X)
    got = SparsifyTrigger(topnstop=4.0, levels="proportional").apply(x, [5], seed=0)
    kept = got[5].indices
    orig = x[5].toarray().ravel()[kept]
    new = got[5].toarray().ravel()[kept]
    assert new.sum() == x[5].sum() > orig.sum()
    assert np.all(np.diff(new[np.argsort(-orig, kind="stable")]) <= 0)  # order preserved
    with pytest.raises(ConfigError, match="levels"):
        SparsifyTrigger(levels="loud")


def test_audit_knn_in_a_given_embedding_and_strip_in_run_attack(cells):
    table = audit(cells, KEY, detectors=("knn",), embedding="X_pca")
    from scforge.security.detect import knn_label_disagreement as knn

    np.testing.assert_allclose(table["knn"], knn(cells.obsm["X_pca"], cells.obs[KEY].astype(str)))
    with pytest.raises(InputDataError, match="obsm has no"):
        audit(cells, KEY, detectors=("knn",), embedding="X_nope")
    res = run_attack(cells, KEY, "B", victim="logistic", trigger=SparsifyTrigger(topnstop=4.0), defence=None,
                     strip=True, strip_blends=4)
    assert 0.0 <= res.detection["strip_auroc"] <= 1.0 and "strip" in res.seconds


def test_audit_combines_data_level_detectors_unless_asked(cells):
    victim = LogisticVictim(C=0.1).fit(cells, KEY)
    default = audit(cells, KEY, model=victim)
    data_z = default[[f"{d}_z" for d in ("level", "sparsity", "complexity", "anomaly", "knn")]].max(axis=1)
    np.testing.assert_allclose(default["score"], data_z)
    assert default.attrs["summary"]["combined"] == ["level", "sparsity", "complexity", "anomaly", "knn"]
    both = audit(cells, KEY, model=victim, combine=("level", "spectral"))
    np.testing.assert_allclose(both["score"], both[["level_z", "spectral_z"]].max(axis=1))
    with pytest.raises(ConfigError, match="not run"):
        audit(cells, KEY, detectors=("level",), combine=("level", "knn"))
    with pytest.raises(ConfigError, match="need a model"):  # refused before any detector runs
        audit(cells, KEY, combine=("level", "spectral"))


def test_top_variance_pca_matches_pca_on_the_most_variable_genes(cells):
    from sklearn.decomposition import PCA

    from scforge.baselines import log1p_cp10k
    from scforge.security.detect import top_variance_pca

    x = log1p_cp10k(cells.X)
    got = top_variance_pca(x, 5, seed=0, n_top_genes=300)
    dense = x.toarray()
    genes = np.sort(np.argsort(-dense.var(0), kind="stable")[:300])
    ref = PCA(5, svd_solver="full").fit_transform(dense[:, genes])
    for j in range(5):  # same components up to sign, in order of variance
        assert abs(np.corrcoef(got[:, j], ref[:, j])[0, 1]) > 0.999
    np.testing.assert_array_equal(got, top_variance_pca(x, 5, seed=0, n_top_genes=300))
