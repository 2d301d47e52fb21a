"""scforge.metrics.integration: scib-metrics integration scores and scGPT's AvgBIO / AvgBATCH.

Fast tests (no jax import): helpers by hand, report methods, every input error. Slow tests (one
process-wide jax/numba compile, ~2-3 min on 2 cores): a synthetic case with hand-known answers,
the ifnb subset scored and compared metric by metric with scib-metrics called directly.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from scforge.errors import ConfigError, InputDataError
from scforge.metrics.integration import (
    METRIC_COLUMNS,
    IntegrationReport,
    avg_batch,
    avg_bio,
    integration_metrics,
    integration_metrics_adata,
)

# ---------------------------------------------------------------- helpers by hand


def test_avg_bio_and_avg_batch_by_hand():
    assert avg_bio(0.6, 0.3, 0.9) == pytest.approx(0.6)
    assert avg_bio(1.0, -0.2, 0.5) == pytest.approx(1.3 / 3)  # ARI can be negative
    assert avg_batch(0.8, 0.6) == pytest.approx(0.7)
    assert avg_batch(np.float32(1.0), np.float64(0.0)) == pytest.approx(0.5)
    assert math.isnan(avg_bio(float("nan"), 0.5, 0.5))
    assert math.isnan(avg_batch(0.5, float("nan")))


@pytest.mark.parametrize("call, needle", [
    (lambda: avg_bio(0.5, 0.5, -0.2), "asw_label"),     # raw silhouette instead of (s + 1) / 2
    (lambda: avg_bio(1.5, 0.5, 0.5), "nmi"),
    (lambda: avg_batch(0.5, 1.2), "graph_connectivity"),
    (lambda: avg_batch("0.5", 0.5), "real number"),
    (lambda: avg_bio(None, 0.5, 0.5), "real number"),
])
def test_avg_helpers_reject_bad_values(call, needle):
    with pytest.raises(ConfigError, match=needle):
        call()


def _report() -> IntegrationReport:
    table = pd.DataFrame([np.arange(16, dtype=float) / 20, np.arange(16, dtype=float) / 40],
                         index=pd.Index(["b", "a"], name="embedding"), columns=list(METRIC_COLUMNS))
    table.loc["a", "pcr"] = np.nan
    return IntegrationReport(table=table, n_cells=100, n_labels=3, n_batches=2, clustering="kmeans",
                             neighbors="pynndescent", unintegrated=None, notes=["pcr: not computed"])


def test_report_tidy_and_to_dict():
    rep = _report()
    tidy = rep.tidy()
    assert list(tidy.columns) == ["embedding", "metric", "value"]
    assert len(tidy) == 2 * len(METRIC_COLUMNS)
    assert tidy["embedding"].tolist()[:16] == ["b"] * 16  # input order kept, not sorted
    assert tidy["metric"].tolist()[:16] == list(METRIC_COLUMNS)
    assert tidy.set_index(["embedding", "metric"]).loc[("a", "kbet"), "value"] == pytest.approx(7 / 40)
    d = rep.to_dict()
    assert d["metrics"]["b"]["total"] == pytest.approx(15 / 20)
    assert d["metrics"]["a"]["pcr"] is None
    assert d["n_cells"] == 100 and d["notes"] == ["pcr: not computed"]
    import json

    json.dumps(d)  # plain types only
    assert "avg_bio" in str(rep)


# ---------------------------------------------------------------- input errors (no jax needed)


def _inputs(n: int = 120, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.array(["B", "T", "NK"] * (n // 3))
    batches = np.array(["ctrl", "stim"] * (n // 2))
    return {"a": rng.normal(size=(n, 5)), "b": rng.normal(size=(n, 4)).astype(np.float32)}, labels, batches


def _err(**change):
    embs, labels, batches = _inputs()
    args = {"embeddings": embs, "labels": labels, "batches": batches}
    kwargs = {k: change.pop(k) for k in list(change) if k not in args}
    args.update(change)
    return args["embeddings"], args["labels"], args["batches"], kwargs


def _with_nan_labels():
    _, labels, _ = _inputs()
    lab = labels.astype(object)
    lab[[3, 7, 50]] = [np.nan, None, np.nan]
    return lab


def _non_finite():
    embs, _, _ = _inputs()
    embs["a"] = embs["a"].copy()
    embs["a"][[1, 2], 0] = [np.nan, np.inf]
    return embs


@pytest.mark.parametrize("case, exc, needles", [
    (dict(labels=_with_nan_labels()), InputDataError, ["3 missing", "labels", "subset"]),
    (dict(batches=pd.Series(["x", None] * 60)), InputDataError, ["60 missing", "batches"]),
    (dict(labels=np.array(["B", "T", "NK"] * 39)), InputDataError, ["117 values", "120 cells"]),
    (dict(labels=np.array(["B"] * 120)), InputDataError, ["single distinct", "labels"]),
    (dict(batches=np.array(["x"] * 120)), InputDataError, ["single distinct", "batches"]),
    (dict(embeddings=_non_finite()), InputDataError, ["'a'", "2 non-finite", "first rows [1, 2]"]),
    (dict(embeddings={"a": np.zeros((120, 3)), "b": np.zeros((119, 3))}), InputDataError,
     ["different numbers of cells", "'b': 119"]),
    (dict(embeddings={}), ConfigError, ["empty"]),
    (dict(embeddings=np.zeros((120, 3))), ConfigError, ["mapping"]),
    (dict(embeddings={"a": np.zeros(120)}), InputDataError, ["2-d", "(120,)"]),
    (dict(embeddings={"a": np.array([["x"] * 3] * 120)}), InputDataError, ["not numeric"]),
    (dict(embeddings={1: np.zeros((120, 3))}), ConfigError, ["non-empty strings"]),
    (dict(unintegrated="pca"), ConfigError, ["'pca'", "['a', 'b']"]),
    (dict(clustering="louvain"), ConfigError, ["kmeans", "leiden"]),
    (dict(neighbors="faiss"), ConfigError, ["pynndescent", "exact"]),
    (dict(n_jobs=0), ConfigError, ["n_jobs"]),
    (dict(seed=-1), ConfigError, ["seed"]),
    # labels and batches confounded: no cell type in two batches
    (dict(batches=np.array(["x", "y", "z"] * 40)), InputDataError, ["confounded", "BRAS"]),
])
def test_input_errors(case, exc, needles):
    embs, labels, batches, kwargs = _err(**case)
    with pytest.raises(exc) as info:
        integration_metrics(embs, labels, batches, **kwargs)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))


def test_too_few_cells_for_the_90_neighbour_graph():
    embs, labels, batches = _inputs(n=90)
    with pytest.raises(InputDataError, match=r"90 cells is too few.*at least 91"):
        integration_metrics(embs, labels, batches)


def test_labels_become_codes_in_sorted_order():
    # scib-metrics' kbet_per_label depends on the order np.unique gives the labels, so the codes handed to it
    # must sort like the caller's values (not in order of first appearance)
    from scforge.metrics.integration import _per_cell

    codes = _per_cell(pd.Categorical(["T", "B", "NK", "B"]), "labels")
    assert codes.tolist() == [2, 0, 1, 0]
    assert _per_cell([3, 1, 2, 1], "labels").tolist() == [2, 0, 1, 0]
    assert _per_cell(np.array(["b", 1, "a", 1], dtype=object), "labels").tolist() == [2, 0, 1, 0]  # mixed types


def test_errors_leave_inputs_untouched():
    embs, labels, batches = _inputs()
    before = {k: v.copy() for k, v in embs.items()}
    with pytest.raises(InputDataError):
        integration_metrics(embs, labels, np.array(["x"] * 120))
    assert all(np.array_equal(before[k], embs[k]) for k in embs)


def test_adata_errors_name_the_missing_keys():
    import anndata as ad

    embs, labels, batches = _inputs()
    adata = ad.AnnData(obs=pd.DataFrame({"cell_type": labels, "stim": batches}, index=[f"c{i}" for i in range(120)]))
    adata.obsm["X_a"] = embs["a"]
    with pytest.raises(ConfigError, match=r"no \['X_b'\].*X_a"):
        integration_metrics_adata(adata, ["X_a", "X_b"], "cell_type", "stim")
    with pytest.raises(ConfigError, match="label_key='celltype'.*cell_type"):
        integration_metrics_adata(adata, ["X_a"], "celltype", "stim")
    with pytest.raises(ConfigError, match="unintegrated='X_pca' must be one of obsm_keys"):
        integration_metrics_adata(adata, ["X_a"], "cell_type", "stim", unintegrated="X_pca")
    adata.obs.loc["c5", "cell_type"] = np.nan
    with pytest.raises(InputDataError, match="1 missing"):
        integration_metrics_adata(adata, ["X_a"], "cell_type", "stim")
    assert list(adata.obsm.keys()) == ["X_a"] and list(adata.obs.columns) == ["cell_type", "stim"]


# ---------------------------------------------------------------- slow: real scores

TOL = 1e-12  # the Benchmarker path gives the same numbers as the functions called directly


def _synthetic(seed: int = 0):
    """3 tight, far-apart cell-type clusters in 10-d, 2 batches alternating inside each cluster.
    ``mixed``: batches perfectly mixed; ``split``: batch 'y' shifted by 5 on an axis of its own."""
    rng = np.random.default_rng(seed)
    n_per = 80
    labels = np.repeat(["B", "T", "NK"], n_per)
    batches = np.tile(["x", "y"], 3 * n_per // 2)
    centres = np.zeros((3, 10))
    centres[0, 0], centres[1, 1], centres[2, 2] = 50.0, 50.0, 50.0
    mixed = centres[np.repeat(np.arange(3), n_per)] + rng.normal(scale=0.3, size=(3 * n_per, 10))
    split = mixed.copy()
    split[batches == "y", 9] += 5.0
    return {"mixed": mixed.astype(np.float32), "split": split.astype(np.float32)}, labels, batches


@pytest.fixture(scope="module")
def synthetic_run():
    embs, labels, batches = _synthetic()
    copies = {k: v.copy() for k, v in embs.items()}
    report = integration_metrics(embs, labels, batches, unintegrated="split", clustering="leiden", seed=0)
    assert all(np.array_equal(copies[k], embs[k]) for k in embs)  # scib's k-means never saw the caller's arrays
    return embs, labels, batches, report


@pytest.mark.slow
def test_synthetic_tight_clusters_mixed_batches(synthetic_run):
    _, _, _, rep = synthetic_run
    t = rep.table
    assert list(t.columns) == list(METRIC_COLUMNS) and list(t.index) == ["mixed", "split"]
    m, s = t.loc["mixed"], t.loc["split"]
    # labels are perfectly separated in both embeddings
    for row in (m, s):
        assert row["silhouette_label"] > 0.95 and row["clisi"] == pytest.approx(1.0, abs=1e-6)
        assert row["isolated_labels"] > 0.95
    assert m["nmi"] == pytest.approx(1.0) and m["ari"] == pytest.approx(1.0)
    # a cell in no other cell's 15 neighbours is a strong component of its own, so not exactly 1
    assert m["graph_connectivity"] > 0.95
    # split: the 15-NN graph has 6 components (label x batch, 40 cells each) that Leiden cannot merge, so
    # the best clustering is those 6 halves: NMI = 2 ln3 / (ln3 + ln6); ARI from the pair counts
    assert s["nmi"] == pytest.approx(2 * math.log(3) / (math.log(3) + math.log(6)), abs=1e-9)
    pairs, rows, total = 6 * math.comb(40, 2), 3 * math.comb(80, 2), math.comb(240, 2)
    expected = rows * pairs / total
    assert s["ari"] == pytest.approx((pairs - expected) / ((rows + pairs) / 2 - expected), abs=1e-9)
    assert s["graph_connectivity"] == pytest.approx(0.5)
    # mixed batches: high iLISI / batch silhouette; split batches: low
    assert m["ilisi"] > 0.8 and s["ilisi"] < 0.05
    assert m["silhouette_batch"] > 0.9 and s["silhouette_batch"] < 0.3
    assert m["kbet"] > 0.5 and s["kbet"] < 0.05
    assert m["bras"] > s["bras"] + 0.3
    # PCR against the split (unintegrated) embedding: itself 0, the mixed one removes the batch variance
    assert s["pcr"] == 0.0 and m["pcr"] > 0.9
    # the scGPT averages and scib's aggregates are the means of their parts
    for _, row in t.iterrows():
        assert row["avg_bio"] == pytest.approx((row["nmi"] + row["ari"] + row["silhouette_label"]) / 3, abs=1e-12)
        assert row["avg_batch"] == pytest.approx((row["silhouette_batch"] + row["graph_connectivity"]) / 2, abs=1e-12)
        bio = row[["nmi", "ari", "silhouette_label", "clisi", "isolated_labels"]].mean()
        batch = row[["bras", "ilisi", "kbet", "graph_connectivity", "pcr"]].mean()
        assert row["bio_conservation"] == pytest.approx(bio, abs=1e-6)  # scib sums some float32 values
        assert row["batch_correction"] == pytest.approx(batch, abs=1e-6)
        assert row["total"] == pytest.approx(0.4 * batch + 0.6 * bio, abs=1e-6)
    assert m["avg_batch"] > s["avg_batch"] + 0.3
    assert rep.n_cells == 240 and rep.n_labels == 3 and rep.n_batches == 2 and rep.notes == []


@pytest.mark.slow
def test_same_seed_same_scores(synthetic_run):
    embs, labels, batches, rep = synthetic_run
    again = integration_metrics(embs, labels, batches, unintegrated="split", clustering="leiden", seed=0)
    pd.testing.assert_frame_equal(rep.table, again.table, check_exact=True)


@pytest.mark.slow
def test_unintegrated_used_for_pcr_only_gives_the_same_row(synthetic_run):
    embs, labels, batches, rep = synthetic_run
    only = integration_metrics(embs, labels, batches, unintegrated="split", clustering="leiden", seed=0,
                               score_unintegrated=False)
    assert list(only.table.index) == ["mixed"]
    pd.testing.assert_frame_equal(only.table.loc[["mixed"]], rep.table.loc[["mixed"]], check_exact=True)
    with pytest.raises(ConfigError, match="no embedding to score"):
        integration_metrics({"split": embs["split"]}, labels, batches, unintegrated="split",
                            score_unintegrated=False)


@pytest.fixture(scope="module")
def ifnb_embeddings(ifnb_small):
    import anndata as ad
    import scanpy as sc

    lognorm = ad.AnnData(ifnb_small.layers["lognorm"].copy())
    sc.pp.pca(lognorm, n_comps=30, random_state=0)
    pca = np.asarray(lognorm.obsm["X_pca"], dtype=np.float32)
    rng = np.random.default_rng(0)
    # a crude batch correction: centre each batch (CTRL / STIM) on the overall mean
    stim = ifnb_small.obs["stim"].to_numpy()
    centred = pca.copy()
    for b in np.unique(stim):
        centred[stim == b] -= pca[stim == b].mean(axis=0) - pca.mean(axis=0)
    embs = {"pca": pca, "random": rng.normal(size=pca.shape).astype(np.float32), "centred": centred}
    labels = ifnb_small.obs["seurat_annotations"].to_numpy().astype(str)
    return embs, labels, stim.astype(str)


@pytest.fixture(scope="module")
def ifnb_run(ifnb_embeddings):
    embs, labels, batches = ifnb_embeddings
    copies = {k: v.copy() for k, v in embs.items()}
    rep = integration_metrics(embs, pd.Series(labels, index=np.arange(labels.size) + 7), list(batches),
                              unintegrated="pca")
    assert all(np.array_equal(copies[k], embs[k]) for k in embs)
    return rep


@pytest.mark.slow
def test_ifnb_pca_scores_above_random(ifnb_run):
    t = ifnb_run.table
    assert ifnb_run.n_cells == 2000 and ifnb_run.n_labels == 13 and ifnb_run.n_batches == 2
    assert t.loc["pca", "avg_bio"] > t.loc["random", "avg_bio"] + 0.25
    assert t.loc["pca", "nmi"] > 0.5 and t.loc["random", "nmi"] < 0.1
    # a random embedding mixes the batches; PCA of the raw data keeps the stimulation effect apart
    assert t.loc["random", "ilisi"] > 0.8 > t.loc["pca", "ilisi"]
    assert t.loc["centred", "ilisi"] > t.loc["pca", "ilisi"]
    assert t.loc["pca", "pcr"] == 0.0 and t.loc["centred", "pcr"] > 0.5
    tidy = ifnb_run.tidy()
    assert len(tidy) == 3 * len(METRIC_COLUMNS)
    assert tidy.set_index(["embedding", "metric"]).loc[("pca", "avg_bio"), "value"] == t.loc["pca", "avg_bio"]


def _direct(x: np.ndarray, labels: np.ndarray, batches: np.ndarray, pre: np.ndarray, nn, clustering: str) -> dict:
    """Every metric from scib-metrics' own functions on the caller's arrays (string labels)."""
    import scib_metrics as sm

    x = x.copy()  # scib's k-means shifts its input in place
    if clustering == "kmeans":
        nmi_ari = sm.nmi_ari_cluster_labels_kmeans(x.copy(), labels)
    else:
        nmi_ari = sm.nmi_ari_cluster_labels_leiden(nn.subset_neighbors(15), labels, seed=0)
    return {
        "nmi": nmi_ari["nmi"], "ari": nmi_ari["ari"],
        "silhouette_label": sm.silhouette_label(x, labels), "clisi": sm.clisi_knn(nn, labels),
        "isolated_labels": sm.isolated_labels(x, labels, batches), "bras": sm.bras(x, labels, batches),
        "ilisi": sm.ilisi_knn(nn, batches), "kbet": sm.kbet_per_label(nn.subset_neighbors(50), batches, labels),
        "graph_connectivity": sm.graph_connectivity(nn.subset_neighbors(15), labels),
        "pcr": sm.pcr_comparison(pre, x, batches, categorical=True),
        "silhouette_batch": sm.silhouette_batch(x, labels, batches),
    }


@pytest.mark.slow
def test_ifnb_equals_scib_metrics_called_directly(ifnb_run, ifnb_embeddings):
    from scib_metrics.nearest_neighbors import pynndescent

    embs, labels, batches = ifnb_embeddings
    for name in ("pca", "centred"):
        nn = pynndescent(embs[name], n_neighbors=90, random_state=0)
        want = _direct(embs[name], labels, batches, embs["pca"], nn, "kmeans")
        got = ifnb_run.table.loc[name]
        for metric, value in want.items():
            assert got[metric] == pytest.approx(float(value), abs=TOL), (name, metric)


@pytest.mark.slow
def test_ifnb_leiden_exact_neighbours_via_adata(ifnb_embeddings, ifnb_small, ifnb_run):
    import anndata as ad
    from scib_metrics.nearest_neighbors import NeighborsResults
    from sklearn.neighbors import NearestNeighbors

    embs, labels, batches = ifnb_embeddings
    adata = ad.AnnData(obs=ifnb_small.obs[["seurat_annotations", "stim"]].copy())
    adata.obsm["X_pca"] = embs["pca"]
    adata.obsm["X_centred"] = embs["centred"]
    obs_before = adata.obs.copy()
    rep = integration_metrics_adata(adata, ["X_pca", "X_centred"], "seurat_annotations", "stim",
                                    clustering="leiden", neighbors="exact", unintegrated="X_pca")
    pd.testing.assert_frame_equal(adata.obs, obs_before)
    assert list(adata.obsm.keys()) == ["X_pca", "X_centred"] and np.array_equal(adata.obsm["X_pca"], embs["pca"])
    x = embs["centred"]
    dist, idx = NearestNeighbors(n_neighbors=90).fit(x).kneighbors(x)
    nn = NeighborsResults(indices=idx, distances=dist.astype(np.float32))
    want = _direct(x, labels, batches, embs["pca"], nn, "leiden")
    got = rep.table.loc["X_centred"]
    for metric, value in want.items():
        assert got[metric] == pytest.approx(float(value), abs=TOL), metric
    # exact neighbours agree closely with pynndescent's on 2,000 cells
    for metric in ("clisi", "ilisi", "graph_connectivity", "kbet"):
        assert got[metric] == pytest.approx(ifnb_run.table.loc["centred", metric], abs=0.02), metric


@pytest.mark.slow
def test_smallest_input_and_untestable_kbet_note(recwarn):
    # 91 cells (the least a 90-neighbour graph allows); 12 labels of <= 8 cells: kBET tests no label -> NaN
    rng = np.random.default_rng(1)
    labels = np.concatenate([np.repeat(np.arange(11), 8), [11, 11, 11]])
    batches = rng.choice(["x", "y"], 91)
    rep = integration_metrics({"e": rng.normal(size=(91, 8))}, labels, batches, neighbors="exact")
    row = rep.table.loc["e"]
    assert math.isnan(row["kbet"]) and math.isnan(row["pcr"])
    assert row["batch_correction"] == pytest.approx(row[["bras", "ilisi", "graph_connectivity"]].mean(), abs=1e-6)
    assert any("kbet: NaN for 'e'" in note for note in rep.notes)
    assert any(note.startswith("pcr: not computed") for note in rep.notes)
    assert not [w for w in recwarn if "Mean of empty slice" in str(w.message)]
    assert rep.to_dict()["metrics"]["e"]["kbet"] is None
