"""Baselines (scforge.baselines) against scikit-learn, scanpy and harmonypy on the real ifnb subset, and by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.baselines import (
    HVGPCA,
    EmbeddingClassifier,
    LogisticBaseline,
    harmony_integrate,
    harmony_pca,
    hvg_pca,
    log1p_cp10k,
    log2_cp10k,
)
from scforge.errors import ConfigError, InputDataError, ScforgeError

LABEL, BATCH = "seurat_annotations", "stim"


# ---- helpers -------------------------------------------------------------------------------------
def snapshot(adata) -> dict:
    """What a baseline must not change in the caller's AnnData."""
    return {"X": adata.X.copy(), "obs": adata.obs.copy(), "var": adata.var.copy(),
            "layers": sorted(adata.layers.keys()), "obsm": sorted(adata.obsm.keys()), "uns": sorted(adata.uns.keys()),
            "lognorm": adata.layers["lognorm"].copy()}


def assert_unchanged(adata, snap: dict) -> None:
    assert (adata.X != snap["X"]).nnz == 0 and adata.X.dtype == snap["X"].dtype
    assert (adata.layers["lognorm"] != snap["lognorm"]).nnz == 0
    pd.testing.assert_frame_equal(adata.obs, snap["obs"])
    pd.testing.assert_frame_equal(adata.var, snap["var"])
    assert sorted(adata.layers.keys()) == snap["layers"]
    assert sorted(adata.obsm.keys()) == snap["obsm"] and sorted(adata.uns.keys()) == snap["uns"]


def hand_log1p_cp10k(counts) -> np.ndarray:
    x = np.asarray(counts.toarray() if sp.issparse(counts) else counts, dtype=np.float64)
    totals = x.sum(axis=1, keepdims=True)
    return np.log1p(np.divide(x * 1e4, totals, out=np.zeros_like(x), where=totals > 0))


def sklearn_l1_ovr(C: float, seed: int = 0):  # noqa: N803
    """The reference model, spelt as sc-foundation-eval spells it."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scikit-learn >= 1.8 deprecates penalty= (same model as l1_ratio=1)
        return OneVsRestClassifier(LogisticRegression(penalty="l1", solver="liblinear", C=C, random_state=seed,
                                                      max_iter=1000))


def fit_quiet(model, x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.fit(x, y)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One BLAS/OpenMP thread: on the shared 2-core machine, 2 threads made lbfgs ~50x slower (spinning)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


@pytest.fixture(scope="module")
def ifnb(ifnb_small):
    return ifnb_small


@pytest.fixture(scope="module")
def split(ifnb):
    from sklearn.model_selection import train_test_split

    y = ifnb.obs[LABEL].astype(str).to_numpy()
    train, test = train_test_split(np.arange(ifnb.n_obs), test_size=0.2, random_state=0, stratify=y)
    return np.sort(train), np.sort(test)


@pytest.fixture(scope="module")
def fitted_lr(ifnb, split):
    """C=0.1 baseline on the 80 % split (the sc-foundation-eval setting); checks the input is unchanged."""
    train, _ = split
    train_data = ifnb[train].copy()
    snap = snapshot(train_data)
    base = LogisticBaseline(C=0.1, seed=0).fit(train_data, train_data.obs[LABEL])
    assert_unchanged(train_data, snap)
    return base


@pytest.fixture(scope="module")
def pca_fit(ifnb):
    """HVGPCA(2000, 50) on all 2,000 cells and its fit_transform output; checks the input is unchanged."""
    snap = snapshot(ifnb)
    model = HVGPCA(2000, 50, seed=0)
    pcs = model.fit_transform(ifnb)
    assert_unchanged(ifnb, snap)
    return model, pcs


# ---- transforms ----------------------------------------------------------------------------------
def test_log_cp10k_hand_values():
    counts = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]], dtype=np.float32)
    keep = counts.copy()
    ln = log1p_cp10k(sp.csr_matrix(counts)).toarray()
    l2 = log2_cp10k(counts).toarray()
    expect_ln = np.array([[np.log(2501), np.log(7501), 0], [0, 0, 0], [np.log(2501), np.log(2501), np.log(5001)]])
    np.testing.assert_allclose(ln, expect_ln, rtol=1e-12)
    np.testing.assert_allclose(l2, [[np.log2(2501), np.log2(7501), 0], [0, 0, 0],
                                    [np.log2(2501), np.log2(2501), np.log2(5001)]], rtol=1e-12)
    np.testing.assert_allclose(l2, ln / np.log(2), rtol=1e-12)
    np.testing.assert_array_equal(counts, keep)


def test_log2_cp10k_equals_scanpy_base2(ifnb):
    import scanpy as sc

    sub = ifnb[:200].copy()
    mine = log2_cp10k(sub.X).toarray()
    sc.pp.normalize_total(sub, target_sum=1e4)
    sc.pp.log1p(sub, base=2)
    np.testing.assert_allclose(mine, sub.X.toarray(), rtol=1e-5, atol=1e-5)  # scanpy works in float32


# ---- logistic baseline ---------------------------------------------------------------------------
@pytest.mark.parametrize("transform", ["log1p_cp10k", "log2_cp10k", "none"])
def test_logistic_equals_sklearn_ovr(ifnb, split, transform):
    train, test = split[0][:500], split[1][:200]
    y = ifnb.obs[LABEL].astype(str).to_numpy()
    layer = "lognorm" if transform == "none" else None
    base = LogisticBaseline(C=0.1, transform=transform, seed=3).fit(ifnb[train], y[train], layer=layer)

    def hand(idx):
        if transform == "none":
            return ifnb.layers["lognorm"][idx].toarray()
        f = hand_log1p_cp10k(ifnb.X[idx])
        return f / np.log(2) if transform == "log2_cp10k" else f

    ref = fit_quiet(sklearn_l1_ovr(0.1, seed=3), sp.csr_matrix(hand(train)), y[train])
    proba = base.predict_proba(ifnb[test], layer=layer)
    assert list(proba.columns) == list(ref.classes_) == base.classes_
    assert list(proba.index) == list(ifnb.obs_names[test])
    np.testing.assert_allclose(proba.to_numpy(), ref.predict_proba(sp.csr_matrix(hand(test))), atol=1e-6)
    np.testing.assert_array_equal(base.predict(ifnb[test], layer=layer), ref.predict(sp.csr_matrix(hand(test))))
    assert base.C_ == 0.1 and base.cv_scores_ is None
    # L1: most coefficients are exactly zero, as in the reference
    coef = np.vstack([e.coef_ for e in base.clf.estimators_])
    assert (coef == 0).mean() > 0.9


def test_logistic_cv_matches_cross_validate(ifnb):
    from sklearn.model_selection import cross_validate

    y_all = ifnb.obs[LABEL].astype(str).to_numpy()
    big = pd.Series(y_all).value_counts()
    rng = np.random.default_rng(0)
    cells = np.sort(rng.choice(np.flatnonzero(np.isin(y_all, big.index[big >= 60])), 400, replace=False))
    genes = np.sort(np.argsort(-np.asarray(ifnb.X.sum(0)).ravel())[:500])
    sub = ifnb[cells][:, genes].copy()
    y = y_all[cells]
    grid = (0.01, 0.1, 1.0)
    base = LogisticBaseline(C="cv", C_grid=grid, seed=0).fit(sub, y)
    feats = sp.csr_matrix(hand_log1p_cp10k(sub.X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expect = {c: cross_validate(sklearn_l1_ovr(c), feats, y, cv=5)["test_score"].mean() for c in grid}
    assert set(base.cv_scores_) == set(grid)
    for c in grid:
        assert base.cv_scores_[c] == pytest.approx(expect[c], abs=1e-12)
    best = max(grid, key=expect.get)
    assert base.C_ == best
    assert len({round(v, 6) for v in expect.values()}) > 1  # the grid really discriminates here
    # refit on all cells with the chosen C
    fixed = LogisticBaseline(C=best, seed=0).fit(sub, y)
    np.testing.assert_allclose(base.predict_proba(sub).to_numpy(), fixed.predict_proba(sub).to_numpy())


def test_logistic_accuracy_on_ifnb(ifnb, split, fitted_lr):
    _, test = split
    y = ifnb.obs[LABEL].astype(str).to_numpy()
    test_data = ifnb[test].copy()
    snap = snapshot(test_data)
    pred = fitted_lr.predict(test_data)
    assert_unchanged(test_data, snap)
    acc = float(np.mean(pred == y[test]))
    assert acc > 0.8, acc
    proba = fitted_lr.predict_proba(test_data)
    np.testing.assert_allclose(proba.sum(1), 1.0)
    assert len(fitted_lr.classes_) == 13


def test_logistic_gene_alignment(ifnb, split, fitted_lr):
    _, test = split
    query = ifnb[test[:100]].copy()
    base_p = fitted_lr.predict_proba(query).to_numpy()
    # reordered genes + an extra unknown gene without counts: the same cells, the same answer
    rev = query[:, ::-1].copy()
    extra = sp.hstack([rev.X, sp.csr_matrix((rev.n_obs, 1), dtype=np.float32)]).tocsr()
    import anndata as ad

    rev2 = ad.AnnData(X=extra, obs=rev.obs, var=pd.DataFrame(index=list(rev.var_names) + ["NOT_A_GENE"]))
    np.testing.assert_allclose(fitted_lr.predict_proba(rev2).to_numpy(), base_p, atol=1e-12)
    # 3,000 genes dropped: normalised by the query's own totals, missing genes are zero
    kept = np.sort(np.random.default_rng(1).choice(query.n_vars, query.n_vars - 3000, replace=False))
    part = query[:, kept].copy()
    feats = np.zeros((part.n_obs, query.n_vars))
    feats[:, kept] = hand_log1p_cp10k(part.X)
    expect = fitted_lr.clf.predict_proba(sp.csr_matrix(feats))
    np.testing.assert_allclose(fitted_lr.predict_proba(part).to_numpy(), expect, atol=1e-10)
    assert not np.allclose(expect, base_p)


def test_logistic_bad_inputs(ifnb, fitted_lr):
    sub = ifnb[:60].copy()
    y = sub.obs[LABEL].astype(str).to_numpy()
    for kwargs in ({"C": 0}, {"C": -1.0}, {"C": "auto"}, {"C": float("nan")}, {"transform": "log10"},
                   {"C_grid": ()}, {"C_grid": (0.1, 0.0)}, {"cv_folds": 1}, {"max_iter": 0}):
        with pytest.raises(ConfigError):
            LogisticBaseline(**kwargs)
    with pytest.raises(ConfigError, match="'Eryth'.*fixed C"):  # 5 Eryth cells < 10 folds
        LogisticBaseline(C="cv", cv_folds=10, C_grid=(0.1,)).fit(ifnb, ifnb.obs[LABEL])
    with pytest.raises(InputDataError, match="missing"):
        LogisticBaseline().fit(sub, np.where(np.arange(60) == 3, None, y))
    with pytest.raises(InputDataError, match="missing"):
        LogisticBaseline().fit(sub, pd.Series(y).where(np.arange(60) != 5))  # NaN
    with pytest.raises(InputDataError, match="59 labels for 60 cells"):
        LogisticBaseline().fit(sub, y[:59])
    with pytest.raises(ConfigError, match="at least 2 classes"):
        LogisticBaseline().fit(sub, ["B"] * 60)
    with pytest.raises(InputDataError, match="raw integer counts"):
        LogisticBaseline().fit(sub, y, layer="lognorm")
    with pytest.raises(InputDataError, match="Layer 'nope'"):
        LogisticBaseline().fit(sub, y, layer="nope")
    with pytest.raises(ConfigError, match="fit"):
        LogisticBaseline().predict(sub)
    bad = sub.copy()
    bad.X = bad.X.copy()
    bad.X.data[0] = np.nan
    with pytest.raises(InputDataError, match="NaN"):
        LogisticBaseline(transform="none").fit(bad, y)
    bad.X.data[0] = -2
    with pytest.raises(InputDataError, match="negative"):
        LogisticBaseline().fit(bad, y)
    with pytest.raises(InputDataError, match="0 cells"):
        LogisticBaseline().fit(sub[:0], [])
    renamed = sub.copy()
    renamed.var_names = [f"ENSG{i:011d}" for i in range(renamed.n_vars)]
    with pytest.raises(InputDataError, match="none of the"):
        fitted_lr.predict(renamed)
    snap = snapshot(sub)
    with pytest.raises(ScforgeError):
        LogisticBaseline().fit(sub, y[:10])
    assert_unchanged(sub, snap)


# ---- HVG + PCA -----------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:zero-centering a sparse")  # scanpy's scale() on the reference copy
def test_hvgpca_equals_scanpy(ifnb, pca_fit):
    import scanpy as sc

    model, pcs = pca_fit
    ref = ifnb.copy()
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=2000)
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    ref = ref[:, ref.var["highly_variable"]].copy()
    sc.pp.scale(ref, max_value=10)
    sc.pp.pca(ref, n_comps=50, random_state=0)
    assert list(model.genes_) == list(ref.var_names)
    theirs = ref.obsm["X_pca"]
    assert pcs.shape == theirs.shape == (2000, 50)
    corr = np.array([abs(np.corrcoef(pcs[:, i], theirs[:, i])[0, 1]) for i in range(50)])
    assert corr.min() > 0.9999, corr.min()
    np.testing.assert_allclose(np.abs(pcs), np.abs(theirs), atol=1e-3)
    np.testing.assert_allclose(model.explained_variance_ratio_, ref.uns["pca"]["variance_ratio"], rtol=1e-4)
    np.testing.assert_allclose(np.abs(model.components_), np.abs(ref.varm["PCs"].T), atol=1e-5)


def test_highly_variable_genes_mask_equals_scanpy_and_leaves_the_data_alone(ifnb, pca_fit):
    import scanpy as sc

    from scforge.baselines import highly_variable_genes

    snap = snapshot(ifnb)
    mask = highly_variable_genes(ifnb, 1200)
    assert_unchanged(ifnb, snap)
    ref = sc.pp.highly_variable_genes(ifnb, flavor="seurat_v3", n_top_genes=1200, inplace=False)
    np.testing.assert_array_equal(mask, ref["highly_variable"].to_numpy())
    assert mask.sum() == 1200
    assert list(ifnb.var_names[highly_variable_genes(ifnb, 2000)]) == list(pca_fit[0].genes_)
    assert highly_variable_genes(ifnb, 10**6).all()
    with pytest.raises(ConfigError, match="n_top_genes"):
        highly_variable_genes(ifnb, 0)


def test_hvgpca_transform(ifnb, pca_fit):
    model, pcs = pca_fit
    snap = snapshot(ifnb)
    np.testing.assert_allclose(model.transform(ifnb), pcs, atol=1e-10)
    # genes in reverse order: the same cells, the same PCs
    np.testing.assert_allclose(model.transform(ifnb[:300, ::-1].copy()), pcs[:300], atol=1e-10)
    assert_unchanged(ifnb, snap)
    # half the HVGs missing: own totals, missing genes zero, then the fitted scaling and components
    hvg = set(model.genes_)
    drop = {g for i, g in enumerate(model.genes_) if i % 2 == 0}
    keep = [g for g in ifnb.var_names if g not in drop]
    part = ifnb[:300, keep].copy()
    full = pd.DataFrame(hand_log1p_cp10k(part.X), columns=part.var_names)
    x = full.reindex(columns=model.genes_, fill_value=0.0).to_numpy()
    z = np.clip((x - model.mean_) / model.std_, -10, 10)
    expect = (z - model.center_) @ model.components_.T
    got = model.transform(part)
    np.testing.assert_allclose(got, expect, atol=1e-10)
    assert len(hvg & set(keep)) == 1000 and not np.allclose(got, pcs[:300], atol=1e-3)


def test_hvg_pca_function(ifnb):
    sub = ifnb[::2].copy()
    a = hvg_pca(sub, n_top_genes=400, n_comps=10, seed=0)
    b = HVGPCA(400, 10, seed=0).fit_transform(sub)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1000, 10)
    # PCs are uncorrelated, with decreasing variance
    cov = np.cov(a.T)
    assert np.all(np.diff(np.diag(cov)) <= 1e-9)
    np.testing.assert_allclose(cov - np.diag(np.diag(cov)), 0, atol=1e-8)
    # flavor="seurat" ranks genes on log1p CP10k, as scanpy does after normalize_total + log1p
    import scanpy as sc

    model = HVGPCA(400, 10, flavor="seurat").fit(sub)
    ref = sub.copy()
    sc.pp.normalize_total(ref, target_sum=1e4)
    sc.pp.log1p(ref)
    sc.pp.highly_variable_genes(ref, flavor="seurat", n_top_genes=400)
    assert list(model.genes_) == list(ref.var_names[ref.var["highly_variable"]])


def test_hvgpca_small_data_falls_back_to_detected_genes(ifnb, caplog):
    """scanpy's seurat_v3 loess fails on these 500 cells x 13,215 genes ('reciprocal condition number');
    HVGPCA then ranks the genes detected in >= 3 cells, as after sc.pp.filter_genes(min_cells=3)."""
    import scanpy as sc

    sub = ifnb[:500].copy()
    with pytest.raises(ValueError, match="reciprocal condition number"):
        sc.pp.highly_variable_genes(sub.copy(), flavor="seurat_v3", n_top_genes=400)
    with caplog.at_level("WARNING", logger="scforge"):
        model = HVGPCA(400, 10).fit(sub)
    assert "detected in >= 3 cells" in caplog.text
    ref = sub.copy()
    sc.pp.filter_genes(ref, min_cells=3)
    sc.pp.highly_variable_genes(ref, flavor="seurat_v3", n_top_genes=400)
    assert list(model.genes_) == list(ref.var_names[ref.var["highly_variable"]])


def test_hvgpca_bad_inputs(ifnb):
    sub = ifnb[:40].copy()
    with pytest.raises(InputDataError, match="raw integer counts"):
        HVGPCA(200, 5).fit(sub, layer="lognorm")
    with pytest.raises(ConfigError, match="n_comps=40"):
        HVGPCA(200, 40).fit(sub)
    with pytest.raises(ConfigError, match="n_comps=10"):
        HVGPCA(10, 10).fit(sub)
    with pytest.raises(ConfigError):
        HVGPCA(200, 5, flavor="pearson")
    with pytest.raises(ConfigError):
        HVGPCA(0, 5)
    with pytest.raises(ConfigError, match="fit"):
        HVGPCA().transform(sub)
    bad = sub.copy()
    bad.X = bad.X.copy()
    bad.X.data[3] = np.inf
    with pytest.raises(InputDataError, match="NaN/inf"):
        HVGPCA(200, 5).fit(bad)


# ---- embedding classifiers -----------------------------------------------------------------------
def test_knn_by_hand():
    # 1-d points on a line (as 2-d rows), euclidean, 3 neighbours
    train = np.array([[0.0, 0], [1, 0], [2, 0], [10, 0], [11, 0], [12, 0], [5.2, 0]])
    labels = ["a", "a", "a", "b", "b", "b", "b"]
    knn = EmbeddingClassifier("knn", n_neighbors=3, metric="euclidean", l2_normalize=False).fit(train, labels)
    query = np.array([[0.5, 0], [11.5, 0], [4.0, 0], [7.0, 0]])
    # 4.0 -> 5.2 (b, 1.2), 2 (a, 2), 1 (a, 3): a 2/3; 7.0 -> 5.2 (b, 1.8), 10 (b, 3), 11 (b, 4): b
    np.testing.assert_array_equal(knn.predict(query), ["a", "b", "a", "b"])
    np.testing.assert_allclose(knn.predict_proba(query).to_numpy(), [[1, 0], [0, 1], [2 / 3, 1 / 3], [0, 1]])
    # cosine: direction only (default metric), row scale does not matter
    dirs = np.array([[1.0, 0.0], [5.0, 0.5], [0.0, 2.0], [0.3, 9.0]])
    cos = EmbeddingClassifier("knn", n_neighbors=1).fit(dirs, ["x", "x", "y", "y"])
    np.testing.assert_array_equal(cos.predict([[100.0, 1.0], [0.01, 0.2]]), ["x", "y"])
    # n_neighbors larger than the training set: capped, majority of all cells
    big = EmbeddingClassifier("knn", n_neighbors=50, metric="euclidean").fit(train, labels)
    np.testing.assert_array_equal(big.predict([[0.0, 0]]), ["b"])
    np.testing.assert_allclose(big.predict_proba([[0.0, 0]]).to_numpy(), [[3 / 7, 4 / 7]])


@pytest.fixture(scope="module")
def probes(ifnb, split, pca_fit):
    """Both kinds with default settings, fitted on the training PCs (the inputs are checked unchanged)."""
    _, pcs = pca_fit
    emb, y = pcs.copy(), ifnb.obs[LABEL].astype(str).to_numpy()
    train = split[0]
    out = {kind: EmbeddingClassifier(kind).fit(emb[train], y[train]) for kind in ("knn", "logistic")}
    np.testing.assert_array_equal(emb, pcs)
    return out


def test_logistic_probe_equals_sklearn(ifnb, split, pca_fit, probes):
    from sklearn.linear_model import LogisticRegression

    _, pcs = pca_fit
    train, test = split
    y = ifnb.obs[LABEL].astype(str).to_numpy()
    probe = probes["logistic"]
    norm = pcs / np.linalg.norm(pcs, axis=1, keepdims=True)
    ref = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000, random_state=0).fit(norm[train], y[train])
    np.testing.assert_allclose(probe.predict_proba(pcs[test]).to_numpy(), ref.predict_proba(norm[test]), atol=1e-8)
    np.testing.assert_array_equal(probe.predict(pcs[test]), ref.predict(norm[test]))
    assert probe.classes_ == list(ref.classes_)
    small = pcs[:, :10] / pcs[:, :10].std(axis=0)  # without normalisation: rows as given
    raw = EmbeddingClassifier("logistic", C=0.5, l2_normalize=False).fit(small[train], y[train])
    ref_raw = LogisticRegression(C=0.5, max_iter=1000, random_state=0).fit(small[train], y[train])
    np.testing.assert_allclose(raw.predict_proba(small[test]).to_numpy(), ref_raw.predict_proba(small[test]),
                               atol=1e-8)


@pytest.mark.parametrize("kind", ["knn", "logistic"])
def test_probe_accuracy_on_ifnb_pca(ifnb, split, pca_fit, probes, kind):
    _, pcs = pca_fit
    train, test = split
    y = ifnb.obs[LABEL].astype(str).to_numpy()
    clf = probes[kind]
    acc = float(np.mean(clf.predict(pcs[test]) == y[test]))
    assert acc > 0.8, acc
    if kind == "knn":
        from sklearn.neighbors import KNeighborsClassifier

        ref = KNeighborsClassifier(n_neighbors=10, metric="cosine").fit(pcs[train], y[train])
        agree = np.mean(clf.predict(pcs[test]) == ref.predict(pcs[test]))
        assert agree > 0.99  # the same neighbours up to rounding of the L2 normalisation


def test_probe_bad_inputs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 4))
    y = np.array(["a", "b", "c"] * 10, dtype=object)
    keep = x.copy()
    for kwargs in ({"kind": "svm"}, {"n_neighbors": 0}, {"C": 0.0}, {"metric": "nope"}, {"max_iter": 0}):
        with pytest.raises(ConfigError):
            EmbeddingClassifier(**kwargs)
    with pytest.raises(InputDataError, match="missing"):
        EmbeddingClassifier().fit(x, np.where(np.arange(30) == 2, np.nan, y))
    with pytest.raises(ConfigError, match="at least 2 classes"):
        EmbeddingClassifier("logistic").fit(x, ["a"] * 30)
    with pytest.raises(InputDataError, match="29 labels for 30 cells"):
        EmbeddingClassifier().fit(x, y[:29])
    bad = x.copy()
    bad[4, 1] = np.nan
    with pytest.raises(InputDataError, match="NaN/inf"):
        EmbeddingClassifier().fit(bad, y)
    with pytest.raises(InputDataError, match="2-d"):
        EmbeddingClassifier().fit(x[:, 0], y)
    with pytest.raises(ConfigError, match="fit"):
        EmbeddingClassifier().predict(x)
    for kind in ("knn", "logistic"):
        clf = EmbeddingClassifier(kind).fit(x, y)
        with pytest.raises(InputDataError, match="3 dimensions but the classifier was fitted on 4"):
            clf.predict(x[:, :3])
        bad = x.copy()
        bad[0, 0] = np.inf
        with pytest.raises(InputDataError, match="NaN/inf"):
            clf.predict_proba(bad)
    np.testing.assert_array_equal(x, keep)


# ---- Harmony -------------------------------------------------------------------------------------
def _same_batch_fraction(emb: np.ndarray, batches: np.ndarray, k: int = 15) -> float:
    from sklearn.neighbors import NearestNeighbors

    idx = NearestNeighbors(n_neighbors=k + 1).fit(emb).kneighbors(emb, return_distance=False)[:, 1:]
    return float(np.mean(batches[idx] == batches[:, None]))


def test_harmony_equals_harmonypy_and_mixes_batches(ifnb, pca_fit):
    import harmonypy
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    _, pcs = pca_fit
    emb = pcs.copy()
    batches = ifnb.obs[BATCH]
    out = harmony_integrate(emb, batches, seed=0)
    np.testing.assert_array_equal(emb, pcs)
    direct = harmonypy.run_harmony(pcs, ifnb.obs[[BATCH]], BATCH, random_state=0, verbose=False)
    z = np.asarray(direct.Z_corr)
    assert z.shape == out.shape == pcs.shape  # harmonypy 2.x returns cells x dims
    np.testing.assert_allclose(out, z, atol=1e-8)
    np.testing.assert_array_equal(harmony_integrate(pcs, batches, seed=0), out)  # same seed, same result
    assert not np.allclose(harmony_integrate(pcs, batches, seed=1), out)
    b = batches.astype(str).to_numpy()
    y = ifnb.obs[LABEL].astype(str).to_numpy()
    before, after = _same_batch_fraction(pcs, b), _same_batch_fraction(out, b)
    assert before > 0.85 and after < 0.75, (before, after)  # 0.5 would be perfect mixing
    stim_before = cross_val_score(KNeighborsClassifier(15), pcs, b, cv=5).mean()
    stim_after = cross_val_score(KNeighborsClassifier(15), out, b, cv=5).mean()
    assert stim_after < stim_before - 0.15, (stim_before, stim_after)
    # cell types stay together
    assert _same_batch_fraction(out, y) >= _same_batch_fraction(pcs, y) - 0.02


def test_harmony_pca(ifnb):
    sub = ifnb[::2, :5000].copy()
    snap = snapshot(sub)
    got = harmony_pca(sub, BATCH, n_top_genes=500, n_comps=15, seed=2)
    assert_unchanged(sub, snap)
    expect = harmony_integrate(HVGPCA(500, 15, seed=2).fit_transform(sub), sub.obs[BATCH].to_numpy(), seed=2)
    np.testing.assert_array_equal(got, expect)
    assert got.shape == (1000, 15)


def test_harmony_bad_inputs(ifnb):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 5))
    b = np.array(["u", "v"] * 50, dtype=object)
    with pytest.raises(InputDataError, match="one batch"):
        harmony_integrate(x, ["u"] * 100)
    with pytest.raises(InputDataError, match="missing"):
        harmony_integrate(x, np.where(np.arange(100) == 7, None, b))
    with pytest.raises(InputDataError, match="99 batch labels for 100 cells"):
        harmony_integrate(x, b[:99])
    bad = x.copy()
    bad[1, 1] = np.inf
    with pytest.raises(InputDataError, match="NaN/inf"):
        harmony_integrate(bad, b)
    with pytest.raises(InputDataError, match="at least 16 cells"):
        harmony_integrate(x[:10], b[:10])
    with pytest.raises(ConfigError):
        harmony_integrate(x, b, theta=-1)
    with pytest.raises(ConfigError):
        harmony_integrate(x, b, max_iter=0)
    sub = ifnb[:50].copy()
    with pytest.raises(InputDataError, match="no column 'batch'"):
        harmony_pca(sub, "batch")
    one = sub[sub.obs[BATCH] == "CTRL"].copy()
    with pytest.raises(InputDataError, match="single batch"):
        harmony_pca(one, BATCH)
    # square embedding (cells == dims): still cells x dims, equal to harmonypy on the same input
    import harmonypy

    sq = rng.normal(size=(40, 40))
    sq[1::2] += 3.0  # batch v shifted
    out = harmony_integrate(sq, b[:40])
    direct = harmonypy.run_harmony(sq.T, pd.DataFrame({"batch": b[:40]}), "batch", random_state=0, verbose=False)
    np.testing.assert_allclose(out, np.asarray(direct.Z_corr), atol=1e-8)
    gap = np.linalg.norm(sq[1::2].mean(0) - sq[::2].mean(0))
    assert np.linalg.norm(out[1::2].mean(0) - out[::2].mean(0)) < 0.5 * gap  # rows are cells: the shift shrinks
