"""scCello downstream tasks and clustering metrics on real ifnb cells (30 PCs of the real data as embeddings)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import spearmanr

from scforge.errors import InputDataError
from scforge.metrics.clustering import best_leiden, clustering_metrics
from scforge.models.sccello.api import ScCello
from scforge.models.sccello.tasks import (
    classify_novel_cell_types,
    linear_probe,
    marker_gene_prediction,
    marker_token_sets,
    spearman_rows,
)
from scforge.ontology import CellTypeRelations, cell_type_relations, load_cell_ontology, load_marker_table, map_labels


@pytest.fixture(scope="module")
def cl(shared_data):
    return load_cell_ontology(shared_data / "genes/ontology/CL-ontology-v2026-03-26.json.zst")


@pytest.fixture(scope="module")
def ifnb(ifnb_small, cl):
    import anndata as ad
    import scanpy as sc

    ids = np.array(map_labels(ifnb_small.obs["seurat_annotations"], ontology=cl).ids)
    lognorm = ad.AnnData(ifnb_small.layers["lognorm"].copy())
    sc.pp.pca(lognorm, n_comps=30, random_state=0)  # real cells, 30 principal components
    return lognorm.obsm["X_pca"].astype(np.float64), ids, ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()


def test_linear_probe_on_real_embeddings(ifnb):
    emb, _, labels = ifnb
    train, test = np.arange(0, 2000, 2), np.arange(1, 2000, 2)
    report = linear_probe(emb[train], labels[train], emb[test], labels[test])
    assert report.accuracy > 0.85 and report.n_cells == 1000
    shuffled = np.random.default_rng(0).permutation(labels[train])
    assert linear_probe(emb[train], shuffled, emb[test], labels[test]).accuracy < 0.5
    again = linear_probe(emb[train], labels[train], emb[test], labels[test])
    assert again.accuracy == report.accuracy
    with pytest.raises(InputDataError):
        linear_probe(emb[train], labels[train][:-1], emb[test], labels[test])


def test_clustering_metrics_on_real_embeddings(ifnb):
    emb, _, labels = ifnb
    sub = np.arange(0, 2000, 6)
    resolutions = (0.2, 0.5, 1.0)
    report = clustering_metrics(emb[sub], labels[sub], resolutions=resolutions, seed=0)
    from sklearn.metrics import silhouette_score

    assert report.asw_label == pytest.approx((silhouette_score(emb[sub].astype(np.float32), labels[sub]) + 1) / 2,
                                             rel=1e-5)
    assert report.avg_bio == pytest.approx((report.nmi + report.ari + report.asw_label) / 3)
    assert report.nmi > 0.5 and report.ari > 0.3 and report.resolution in resolutions
    noise = np.random.default_rng(0).normal(size=emb[sub].shape)
    assert clustering_metrics(noise, labels[sub], resolutions=resolutions).avg_bio < report.avg_bio - 0.2
    assert clustering_metrics(emb[sub], labels[sub], resolutions=resolutions, seed=0) == report
    single = [best_leiden(emb[sub], labels[sub], resolutions=(r,))[2] for r in resolutions]
    assert report.nmi == pytest.approx(max(single))
    with pytest.raises(InputDataError):
        clustering_metrics(emb[sub], ["x"] * sub.size)


def test_spearman_rows_matches_scipy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(4, 7)), rng.normal(size=(3, 7))
    b[0, :3] = b[0, 3]  # ties
    out = spearman_rows(a, b)
    for i in range(4):
        for j in range(3):
            assert out[i, j] == pytest.approx(spearmanr(a[i], b[j]).statistic)
    assert spearman_rows(a, np.ones((1, 7)))[0, 0] == 0.0


def test_novel_cell_types_by_hand():
    # seen types s0, s1, s2 with orthogonal prototypes; novel n0 is closest to s0, n1 to s2
    relations = CellTypeRelations(
        ids=["s0", "s1", "s2", "n0", "n1"],
        ppr=np.array([[0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0],
                      [0.30, 0.02, 0.01, 0.5, 0], [0.01, 0.05, 0.20, 0, 0.5]]),
        levels=np.zeros((5, 5), dtype=int), ancestor=np.zeros((5, 5), dtype=bool))
    reference = np.eye(3).repeat(2, axis=0)
    query = np.array([[1.0, 0.1, 0.0], [0.0, 0.2, 1.0]])
    result = classify_novel_cell_types(query, reference, ["s0", "s0", "s1", "s1", "s2", "s2"], ["n0", "n1"],
                                       relations, true_types=["n0", "n1"])
    assert result.predictions.tolist() == ["n0", "n1"] and result.report.accuracy == 1.0
    assert result.scores[0, 0] == pytest.approx(1.0)  # same ranking s0 > s1 > s2
    with pytest.raises(InputDataError, match="also occur"):
        classify_novel_cell_types(query, reference, ["s0"] * 6, ["s0"], relations)


def test_novel_cell_types_on_real_cells(ifnb, cl):
    emb, ids, _ = ifnb
    novel = ["CL:0000785", "CL:0002396"]  # B Activated (mature B cell), CD16 Mono; their CL parents are seen
    relations = cell_type_relations(cl, sorted(set(ids)))
    is_novel = np.isin(ids, novel)
    result = classify_novel_cell_types(emb[is_novel], emb[~is_novel], ids[~is_novel], novel, relations,
                                       true_types=ids[is_novel])
    assert result.report.accuracy > 0.9 and result.scores.shape == (int(is_novel.sum()), 2)


def test_marker_gene_prediction_knock_out(ifnb_small, cl):
    labels = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    picks = np.concatenate([np.flatnonzero(labels == t)[:1] for t in ("B", "NK", "CD14 Mono")])
    cells_ad = ifnb_small[picks].copy()
    model = ScCello.new([], num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=64, seed=0)
    cells = model.tokenize(cells_ad, max_length=40)
    markers = marker_token_sets(model, labels[picks], load_marker_table())
    assert all(len(m) >= 2 for m in markers)
    result = marker_gene_prediction(model, cells, markers, batch_size=7)
    assert 0 <= result.auroc <= 1 and result.n_scored == int(np.isfinite(result.per_cell).sum())
    # the knock-out score of one gene equals 1 - cos with the embedding of the shortened sequence
    from scforge.models.sccello.tasks import _knockout_embeddings
    import torch

    tokens = np.asarray(cells.cell(0)[0], dtype=np.int64)
    with torch.inference_mode():
        base, knocked = _knockout_embeddings(model.module.eval(), tokens, 5, torch.device("cpu"), torch.float32)
    from scforge.tokenize.ragged import TokenizedCells

    shortened = TokenizedCells(offsets=np.array([0, tokens.size, 2 * tokens.size - 1]),
                               gene_ids=np.concatenate([tokens, np.delete(tokens, 3)]), values=None,
                               obs_names=np.array(["a", "b"]), meta={"cls_id": model.config.cls_token_id})
    direct = model.embed_cells(shortened, precision="fp32")
    np.testing.assert_allclose(base, direct[0], atol=1e-5)
    np.testing.assert_allclose(knocked[2], direct[1], atol=1e-5)  # gene at position 3 = knock-out row 2
    with pytest.raises(InputDataError, match="both marker"):
        marker_gene_prediction(model, cells, [set(), set(), set()])
