"""Perturbation baselines on real ifnb pseudobulks (STIM per cell type) and on profiles built from them."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest

from scforge.baselines.perturbation import (Additive, FeatureRegressor, LinearModel, NoChange, TrainMean,
                                            baseline_registry, go_feature_matrix, make_baseline, pca_gene_scores,
                                            ridge_two_sided)
from scforge.data.profiles import PerturbationProfiles
from scforge.errors import ConfigError

HELD = "CD14 Mono"


@pytest.fixture(scope="module")
def ifnb(ifnb_small):
    """Real pseudobulks of the 500 most expressed genes: ("STIM", cell type) means, CTRL means per cell type,
    and the mean over all CTRL cells (the GEARS reference for Pearson delta)."""
    x = ifnb_small.layers["lognorm"]
    top = np.sort(np.argsort(-np.asarray(x.mean(axis=0)).ravel(), kind="stable")[:500])
    dense = x[:, top].toarray().astype(np.float64)
    cell_type = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    stim = ifnb_small.obs["stim"].astype(str).to_numpy()
    types = sorted(set(cell_type[stim == "CTRL"]) & set(cell_type[stim == "STIM"]))
    means = {("STIM", c): dense[(cell_type == c) & (stim == "STIM")].mean(axis=0) for c in types}
    control = {c: dense[(cell_type == c) & (stim == "CTRL")].mean(axis=0) for c in types}
    profiles = PerturbationProfiles(ifnb_small.var_names[top].to_numpy(), means, control, {"STIM": ("IFNB1",)})
    return profiles, dense[stim == "CTRL"].mean(axis=0)


def leave_out(profiles: PerturbationProfiles, context: str) -> PerturbationProfiles:
    return profiles.subset([g for g in profiles.groups if g[1] != context])


def pearson_delta(pred: np.ndarray, truth: np.ndarray, reference: np.ndarray) -> float:
    return float(np.corrcoef(pred - reference, truth - reference)[0, 1])


def combo_profiles(ifnb_profiles: PerturbationProfiles) -> tuple[PerturbationProfiles, dict]:
    """Singles A, B, C in two contexts with real STIM deltas of four other cell types as their effects."""
    p = ifnb_profiles
    effect = {("A", "CD14 Mono"): p.delta(("STIM", "B")), ("B", "CD14 Mono"): p.delta(("STIM", "NK")),
              ("A", "CD8 T"): p.delta(("STIM", "DC")), ("B", "CD8 T"): p.delta(("STIM", "CD16 Mono"))}
    control = {c: p.control[c] for c in ("CD14 Mono", "CD8 T")}
    means = {(f"{gene}+ctrl", c): control[c] + d for (gene, c), d in effect.items()}
    means[("C+ctrl", "CD8 T")] = control["CD8 T"] + p.delta(("STIM", "Mk"))
    genes = {"A+ctrl": ("A",), "B+ctrl": ("B",), "C+ctrl": ("C",), "D+ctrl": ("D",), "A+B": ("A", "B"),
             "A+C": ("A", "C")}
    return PerturbationProfiles(p.gene_names, means, control, genes), effect


def test_no_change_returns_the_context_control(ifnb):
    profiles, _ = ifnb
    model = NoChange().fit(leave_out(profiles, HELD))
    pred = model.predict(profiles.groups)
    assert set(pred) == set(profiles.groups)
    for (cond, ctx), vec in pred.items():
        assert vec.dtype == np.float64 and vec.shape == (500,)
        np.testing.assert_array_equal(vec, profiles.control[ctx])
    pred[("STIM", HELD)][:] = -1  # the returned vector is a copy, not the stored control
    assert (profiles.control[HELD] >= 0).all()


def test_train_mean_absolute_and_delta_match_numpy(ifnb):
    profiles, _ = ifnb
    train = leave_out(profiles, HELD)
    others = [g for g in profiles.groups if g[1] != HELD]
    absolute = TrainMean().fit(train)
    delta = TrainMean(style="delta").fit(train)
    assert (absolute.name, delta.name) == ("train_mean", "train_mean_delta")
    expect_abs = np.stack([profiles.means[g] for g in others]).mean(axis=0)
    expect_delta = np.stack([profiles.means[g] - profiles.control[g[1]] for g in others]).mean(axis=0)
    g = ("STIM", HELD)
    np.testing.assert_allclose(absolute.predict([g])[g], expect_abs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(delta.predict([g])[g], profiles.control[HELD] + expect_delta, rtol=0, atol=1e-12)
    with pytest.raises(ConfigError, match="style"):
        TrainMean(style="relative")


def test_additive_sums_observed_single_deltas_in_the_same_context(ifnb):
    profiles, effect = combo_profiles(ifnb[0])
    model = Additive().fit(profiles)
    mono, cd8 = ("A+B", "CD14 Mono"), ("A+B", "CD8 T")
    pred = model.predict([mono, cd8])
    assert model.fallbacks == []
    np.testing.assert_allclose(pred[mono], profiles.control["CD14 Mono"] + effect[("A", "CD14 Mono")]
                               + effect[("B", "CD14 Mono")], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pred[cd8], profiles.control["CD8 T"] + effect[("A", "CD8 T")]
                               + effect[("B", "CD8 T")], rtol=0, atol=1e-12)
    # a trained single is its own delta; C is observed in CD8 T only; D never
    mean_delta = np.mean([profiles.delta(g) for g in profiles.groups], axis=0)
    single, partial, unseen = ("A+ctrl", "CD8 T"), ("A+C", "CD14 Mono"), ("D+ctrl", "CD14 Mono")
    pred = model.predict([single, partial, unseen])
    np.testing.assert_allclose(pred[single], profiles.means[single], rtol=0, atol=1e-12)
    np.testing.assert_allclose(pred[partial], profiles.control["CD14 Mono"] + effect[("A", "CD14 Mono")],
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(pred[unseen], profiles.control["CD14 Mono"] + mean_delta, rtol=0, atol=1e-12)
    assert model.fallbacks == [partial, unseen]


def test_pca_gene_scores_match_prcomp_scores(ifnb):
    from sklearn.decomposition import PCA

    profiles, _ = ifnb
    x = np.column_stack([profiles.means[g] for g in profiles.groups])  # genes x groups
    ours = pca_gene_scores(x, 5)
    theirs = PCA(n_components=5, svd_solver="full").fit_transform(x)  # genes as samples: centres each group
    np.testing.assert_allclose(np.abs(ours), np.abs(theirs), rtol=1e-7, atol=1e-9)
    assert pca_gene_scores(x, 50).shape == (500, len(profiles.groups))


def test_linear_context_closed_form_matches_a_kronecker_solve(ifnb):
    profiles, _ = ifnb
    train = leave_out(profiles, HELD)
    model = LinearModel(condition_embedding="context", ridge=0.1).fit(train)
    groups = train.groups
    g = model.G_
    np.testing.assert_allclose(g, pca_gene_scores(np.column_stack([train.means[k] for k in groups]), 10))
    y = np.column_stack([train.delta(k) for k in groups])
    b = y.mean(axis=1)
    mean_control = np.mean([profiles.control[c] for c in profiles.control], axis=0)
    p = np.vstack([g.T @ (profiles.control[k[1]] - mean_control) for k in groups])
    # vec(G W Pᵀ) ridge normal equations: ((PᵀP + λI) ⊗ (GᵀG + λI)) vec(W) = vec(Gᵀ Yc P)
    lam = 0.1
    lhs = np.kron(p.T @ p + lam * np.eye(10), g.T @ g + lam * np.eye(10))
    rhs = (g.T @ (y - b[:, None]) @ p).reshape(-1, order="F")
    w = np.linalg.solve(lhs, rhs).reshape(10, 10, order="F")
    np.testing.assert_allclose(model.W_, w, rtol=1e-6, atol=1e-10 * np.abs(w).max())
    np.testing.assert_allclose(model.b_, b)
    target = ("STIM", HELD)
    p_new = g.T @ (profiles.control[HELD] - mean_control)
    np.testing.assert_allclose(model.predict([target])[target], profiles.control[HELD] + g @ w @ p_new + b,
                               rtol=1e-8, atol=1e-8)


def test_linear_context_transfers_stimulus_to_held_out_cell_type(ifnb):
    """On real ifnb with CD14 Mono held out, the context model predicts the STIM response far better than no
    change (measured: Pearson delta vs all CTRL cells 0.89 vs 0.56; L2 12.3 vs 20.5)."""
    profiles, pooled_control = ifnb
    train, target = leave_out(profiles, HELD), ("STIM", HELD)
    truth = profiles.means[target]
    linear = make_baseline("linear_context").fit(train).predict([target])[target]
    still = make_baseline("no_change").fit(train).predict([target])[target]
    assert np.isfinite(linear).all()
    r_linear, r_still = pearson_delta(linear, truth, pooled_control), pearson_delta(still, truth, pooled_control)
    assert r_linear > 0.8 and r_linear > r_still + 0.2, (r_linear, r_still)
    assert np.linalg.norm(linear - truth) < 0.7 * np.linalg.norm(still - truth)


def test_linear_genes_mode_records_unknown_perturbed_genes(ifnb):
    profiles, _ = ifnb
    assert "IFNB1" not in set(profiles.gene_names)  # not among the 500 most expressed genes
    train, target = leave_out(profiles, HELD), ("STIM", HELD)
    model = LinearModel().fit(train)
    pred = model.predict([target])[target]
    assert model.unknown_genes == ["IFNB1"] and model.fallbacks == [target]
    expect = TrainMean(style="delta").fit(train).predict([target])[target]  # zero embedding row: control + b
    np.testing.assert_allclose(pred, expect, rtol=0, atol=1e-10)


def test_linear_model_recovers_exact_low_rank_effects(ifnb):
    """Deltas made exactly as E W0 Eᵀ[perturbed gene] + b0 (rank 3) are recovered for unseen genes as ridge -> 0."""
    profiles = ifnb[0]
    rng = np.random.default_rng(0)
    names = profiles.gene_names
    emb = rng.normal(size=(names.size, 3))
    train_genes, test_genes = list(names[:12]), list(names[12:15])
    emb[:12] -= emb[:12].mean(axis=0)  # centred training rows: the per-gene mean delta is exactly b0
    w0, b0, control = rng.normal(size=(3, 3)), rng.normal(size=names.size), profiles.control[HELD]
    truth = {(f"{s}+ctrl", None): control + emb @ w0 @ emb[i] + b0 for i, s in enumerate(names[:15])}
    genes = {f"{s}+ctrl": (s,) for s in names[:15]}
    train = PerturbationProfiles(names, {(f"{s}+ctrl", None): truth[(f"{s}+ctrl", None)] for s in train_genes},
                                 {None: control}, genes)
    table = pd.DataFrame(emb, index=names)
    model = LinearModel(ridge=1e-9, gene_embedding=table).fit(train)
    targets = [(f"{s}+ctrl", None) for s in test_genes]
    for target, pred in model.predict(targets).items():
        np.testing.assert_allclose(pred, truth[target], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.W_, w0, rtol=1e-6, atol=1e-6)
    assert model.fallbacks == []
    # an array aligned to gene_names is the same embedding
    same = LinearModel(ridge=1e-9, gene_embedding=emb).fit(train)
    np.testing.assert_allclose(same.predict(targets)[targets[0]], truth[targets[0]], rtol=1e-6, atol=1e-6)


def test_linear_pca_fits_training_groups_exactly_as_ridge_vanishes(ifnb):
    """8 groups whose real deltas have zero mean over genes lie in the span of the 8 PCs of the (column-centred)
    pseudobulk matrix, and P (8 x 8) is invertible: Y is fitted exactly as λ -> 0, and not at λ = 0.1 * scale."""
    profiles = ifnb[0]
    names = profiles.gene_names
    control = np.full(names.size, 1.5)  # a constant control: column centring removes it
    deltas = [profiles.delta(g) for g in profiles.groups[:8]]
    means = {(f"{names[i * 7]}+ctrl", None): control + d - d.mean() for i, d in enumerate(deltas)}
    genes = {c: (c.split("+")[0],) for c, _ in means}
    train = PerturbationProfiles(names, means, {None: control}, genes)
    exact = LinearModel(n_components=10, ridge=1e-10).fit(train).predict(train.groups)
    for group, pred in exact.items():
        np.testing.assert_allclose(pred, means[group], rtol=1e-6, atol=1e-6)
    shrunk = LinearModel(n_components=10, ridge=1e3).fit(train).predict(train.groups)
    assert max(np.abs(shrunk[g] - means[g]).max() for g in train.groups) > 1e-2


def test_ridge_two_sided_singular_without_ridge():
    with pytest.raises(ConfigError, match="ridge > 0"):
        ridge_two_sided(np.zeros((4, 2)), np.ones((4, 3)), np.zeros((3, 2)), 0.0)


def feature_profiles(ifnb_profiles: PerturbationProfiles) -> tuple[PerturbationProfiles, pd.DataFrame]:
    p = ifnb_profiles
    sources = ["B", "NK", "DC", "CD16 Mono"]
    control = {c: p.control[c] for c in ("CD14 Mono", "CD8 T")}
    means = {(f"G{i}+ctrl", "CD14 Mono"): control["CD14 Mono"] + p.delta(("STIM", s)) for i, s in enumerate(sources)}
    genes = {f"G{i}+ctrl": (f"G{i}",) for i in range(6)} | {"G0+G1": ("G0", "G1"), "G0+Z": ("G0", "Z")}
    features = pd.DataFrame([[0, 0, 0, 0], [5, 0, 0, 1], [0, 5, 0, 0], [0, 0, 5, 2], [0.1, 4.9, 0, 0.1],
                             [5, 5, 0, 1]], index=[f"G{i}" for i in range(6)], columns=list("abcd"), dtype=float)
    return PerturbationProfiles(p.gene_names, means, control, genes), features


def test_knn_with_one_neighbour_returns_the_neighbours_delta(ifnb):
    train, features = feature_profiles(ifnb[0])
    model = FeatureRegressor(features, "knn", n_neighbors=1).fit(train)
    assert model.name == "knn_features"
    targets = [("G4+ctrl", "CD8 T"), ("G0+G1", "CD14 Mono")]  # G4 sits next to G2; G0 + G1 features = G1's
    pred = model.predict(targets)
    np.testing.assert_allclose(pred[targets[0]], train.control["CD8 T"] + train.delta(("G2+ctrl", "CD14 Mono")),
                               rtol=0, atol=1e-12)
    np.testing.assert_allclose(pred[targets[1]], train.means[("G1+ctrl", "CD14 Mono")], rtol=0, atol=1e-12)
    assert model.fallbacks == []


def test_feature_regressor_missing_features_error_or_mean(ifnb):
    train, features = feature_profiles(ifnb[0])
    with pytest.raises(ConfigError, match=r"'Z'"):
        FeatureRegressor(features, "knn").fit(train).predict([("G0+Z", "CD14 Mono")])
    with pytest.raises(ConfigError, match="G3"):
        FeatureRegressor(features.drop(index="G3"), "ridge").fit(train)
    model = FeatureRegressor(features.drop(index="G3"), "ridge", missing="mean").fit(train)
    assert model.skipped_ == [("G3+ctrl", "CD14 Mono")]
    target = ("G0+Z", "CD8 T")
    pred = model.predict([target, ("G1+ctrl", "CD8 T")])
    mean_delta = np.mean([train.delta(g) for g in train.groups], axis=0)
    np.testing.assert_allclose(pred[target], train.control["CD8 T"] + mean_delta, rtol=0, atol=1e-12)
    assert model.fallbacks == [target]


def test_random_forest_same_seed_same_result(ifnb):
    train, features = feature_profiles(ifnb[0])
    target = [("G5+ctrl", "CD14 Mono")]
    runs = [FeatureRegressor(features, "rf", seed=s, n_estimators=20).fit(train).predict(target)[target[0]]
            for s in (3, 3, 4)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])


def test_go_feature_matrix_on_real_annotations(shared_data):
    go_dir = shared_data / "genes" / "go"
    symbols = ["ISG15", "IFIT1", "IFIT3", "MX1", "ACTB", "IFIT1", "NOT_A_GENE"]
    frame = go_feature_matrix(go_dir, symbols)
    assert list(frame.index) == ["ISG15", "IFIT1", "IFIT3", "MX1", "ACTB"]
    assert frame.attrs["unannotated"] == ["NOT_A_GENE"]
    assert (frame.dtypes == np.uint8).all() and set(np.unique(frame.to_numpy())) <= {0, 1}
    assert (frame.sum(axis=0) >= 2).all() and frame.columns.is_monotonic_increasing
    assert ((frame.loc["ISG15"] == 1) & (frame.loc["IFIT1"] == 1)).any()
    # one term checked against the raw file: the requested genes directly annotated to it (ND excluded)
    term = "GO:0051607"  # defense response to virus
    with gzip.open(go_dir / "human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz", "rt") as fh:
        rows = [line.rstrip("\n").split("\t") for line in fh]
    raw = {r[1] for r in rows[1:] if r[2] == term and r[1] in symbols and r[3] != "ND"}
    assert set(frame.index[frame[term] == 1]) == raw and len(raw) >= 3
    sparse = go_feature_matrix(go_dir, symbols, sparse=True)
    assert all(isinstance(d, pd.SparseDtype) for d in sparse.dtypes)
    np.testing.assert_array_equal(sparse.sparse.to_dense().to_numpy(), frame.to_numpy())
    bp_only = go_feature_matrix(go_dir / "human_go_annotations_direct_orgHsEgDb_2022-09.tsv.gz", symbols,
                                aspects=("BP",), min_genes=3)
    assert set(bp_only.columns) < set(frame.columns) and (bp_only.sum(axis=0) >= 3).all()
    with pytest.raises(ConfigError, match="aspects"):
        go_feature_matrix(go_dir, symbols, aspects=("XX",))


def test_knn_go_on_real_go_features(ifnb, shared_data):
    """ISG15 and IFIT1 share antiviral terms; with one neighbour IFIT3 takes the effect of its nearest GO profile."""
    p = ifnb[0]
    genes = ["ISG15", "IFIT1", "ACTB", "IFIT3"]
    features = go_feature_matrix(shared_data / "genes" / "go", genes)
    control = {"CD14 Mono": p.control["CD14 Mono"]}
    means = {(f"{g}+ctrl", "CD14 Mono"): control["CD14 Mono"] + p.delta(("STIM", s))
             for g, s in zip(genes[:3], ["B", "NK", "DC"])}
    train = PerturbationProfiles(p.gene_names, means, control, {f"{g}+ctrl": (g,) for g in genes})
    model = make_baseline("knn_go", features=features, n_neighbors=1).fit(train)
    target = ("IFIT3+ctrl", "CD14 Mono")
    pred = model.predict([target])[target]
    z = model.pca_.transform(features.to_numpy(dtype=float))
    nearest = genes[int(np.argmin(np.linalg.norm(z[:3] - z[3], axis=1)))]
    assert nearest in ("ISG15", "IFIT1")
    np.testing.assert_allclose(pred, means[(f"{nearest}+ctrl", "CD14 Mono")], rtol=0, atol=1e-12)


def test_registry_names_and_errors(ifnb):
    profiles, _ = ifnb
    train, features = feature_profiles(profiles)
    assert set(baseline_registry) == {"no_change", "train_mean", "train_mean_delta", "additive", "linear",
                                      "linear_context", "knn_go", "rf_go"}
    for name in baseline_registry:
        model = make_baseline(name, features=features) if name.endswith("_go") else make_baseline(name)
        assert model.name == name
        with pytest.raises(ConfigError, match="before fit"):
            model.predict([("G0+ctrl", "CD14 Mono")])
    with pytest.raises(ConfigError, match="unknown perturbation baseline"):
        make_baseline("gears")
    with pytest.raises(ConfigError, match="needs features"):
        make_baseline("rf_go")
    with pytest.raises(ConfigError, match="fixes"):
        make_baseline("linear", condition_embedding="context")
    with pytest.raises(ConfigError, match="bad"):
        make_baseline("additive", ridge=1.0)


def test_bad_groups_and_inputs_raise_config_errors(ifnb):
    profiles, _ = ifnb
    model = Additive().fit(leave_out(profiles, HELD))
    with pytest.raises(ConfigError, match="unknown contexts"):
        model.predict([("STIM", "Eryth")])
    with pytest.raises(ConfigError, match="no perturbed-gene list"):
        model.predict([("LPS", HELD)])
    with pytest.raises(ConfigError, match="sequence of groups"):
        model.predict(("STIM", HELD))
    with pytest.raises(ConfigError, match="no training groups"):
        TrainMean().fit(profiles.subset([]))
    with pytest.raises(ConfigError, match="PerturbationProfiles"):
        NoChange().fit({"means": {}})
    with pytest.raises(ConfigError, match="ridge"):
        LinearModel(ridge=-1.0)
    with pytest.raises(ConfigError, match="shape"):
        LinearModel(gene_embedding=np.ones((3, 2))).fit(profiles)
    with pytest.raises(ConfigError, match="no gene symbol"):
        LinearModel(gene_embedding=pd.DataFrame(np.ones((2, 2)), index=["x", "y"])).fit(profiles)
    with pytest.raises(ConfigError, match="estimator"):
        FeatureRegressor(pd.DataFrame(np.ones((2, 2))), "svm")
    with pytest.raises(ConfigError, match="bad estimator argument"):
        FeatureRegressor(pd.DataFrame(np.ones((2, 2)), index=["a", "b"]), "rf", n_trees=3)


def test_fit_and_predict_leave_the_profiles_unchanged(ifnb):
    profiles, _ = ifnb
    before = {k: v.copy() for k, v in [*profiles.means.items(), *profiles.control.items()]}
    train = leave_out(profiles, HELD)
    for name in ("no_change", "train_mean", "train_mean_delta", "additive", "linear", "linear_context"):
        for vec in make_baseline(name).fit(train).predict(profiles.groups).values():
            vec += 1.0
    for key, vec in [*profiles.means.items(), *profiles.control.items()]:
        np.testing.assert_array_equal(vec, before[key])
