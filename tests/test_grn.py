"""Gene networks (scforge.tasks.grn, scforge.baselines.coexpression): embedding, attention, co-expression,
edges, programs, program activity, outputs and the `scforge grn` command."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from scipy.stats import rankdata, spearmanr

from scforge.baselines.coexpression import coexpression_difference, coexpression_network, correlation_matrix
from scforge.cli import main
from scforge.errors import ConfigError, GeneIdentityError, InputDataError
from scforge.genes import GeneVocab
from scforge.models.scgpt import ScGPT
from scforge.tasks.grn import (
    GeneNetwork,
    add_network,
    attention_difference,
    attention_network,
    embedding_network,
    knn_graph,
    program_activity,
    program_scores,
    rank_normalize,
    to_generib,
    write_edges_csv,
)
from scforge.tokenize import BinnedTokenizer

GENES = ["CD3E", "CD3D", "CD2", "IL7R", "MS4A1", "CD79A", "CD79B", "CD19", "LYZ", "CD14", "FCGR3A", "NKG7", "GNLY",
         "ISG15", "IFIT1", "MX1"]


@pytest.fixture(scope="module")
def tiny():
    """A tiny scGPT model over GENES and 41 cells of raw counts with a CTRL/STIM state."""
    torch.manual_seed(0)
    vocab = GeneVocab.from_gene_list(GENES, ["<pad>", "<cls>", "<eoc>"])
    model = ScGPT.new(vocab, d_model=32, n_heads=2, d_hid=64, n_layers=2)
    model.module.eval()
    rng = np.random.default_rng(0)
    counts = rng.poisson(rng.gamma(1.0, 2.0, size=(41, len(GENES)))).astype(np.float32)
    counts[:, 0] += 1  # no empty cell
    obs = pd.DataFrame({"stim": ["CTRL"] * 20 + ["STIM"] * 21,
                        "cell_type": (["T"] * 10 + ["B"] * 10) * 2 + ["T"]}, index=[f"c{i}" for i in range(41)])
    adata = ad.AnnData(sp.csr_matrix(counts), obs=obs, var=pd.DataFrame(index=GENES))
    return model, adata


# ---- rank normalisation and the streamed attention network ---------------------------------------
def test_rank_normalize_by_hand():
    scores = torch.tensor([[0.1, 0.5, 0.3], [0.9, 0.2, 0.4], [0.6, 0.8, 0.7]])
    # row ranks [[0,2,1],[2,0,1],[0,2,1]]; column ranks of those (ties by position): col0 [0,2,1],
    # col1 [1,0,2], col2 [0,1,2]
    expected = torch.tensor([[0, 1, 0], [2, 0, 1], [1, 2, 2]], dtype=torch.float32) / 3
    assert torch.equal(rank_normalize(scores), expected)
    x = torch.randint(0, 4, (2, 3, 6, 6)).float()  # many ties: ordinal ranks (stable, by position)
    got = rank_normalize(x).numpy()
    for idx in np.ndindex(2, 3):
        rows = np.stack([rankdata(r, method="ordinal") - 1 for r in x[idx].numpy()])
        cols = np.stack([rankdata(c, method="ordinal") - 1 for c in rows.T]).T
        np.testing.assert_array_equal(got[idx] * 6, cols)


def _direct_attention(model, adata, genes, cells, layers):
    """Every cell's rank-normalised maps materialised with plain torch ops (hooks + explicit matmuls)."""
    c = model.config
    tok = BinnedTokenizer(model.vocab, n_bins=c.n_bins, normalize_total=None, log1p=False, cls_value=c.pad_value,
                          include_zero_gene=True, pad_value=c.pad_value)
    batch = tok.tokenize(adata[cells][:, genes].copy()).pad()
    captured = {}
    blocks = model.module.transformer_encoder.layers
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0])) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model.module.encode(batch["genes"], batch["values"])
    for h in hooks:
        h.remove()
    n_heads, g = c.n_heads, len(genes)
    maps = np.zeros((len(cells), len(layers), n_heads, g, g))
    for li, layer_idx in enumerate(layers):
        attn = blocks[layer_idx].self_attn
        qkv = F.linear(captured[layer_idx], attn.Wqkv.weight, attn.Wqkv.bias).detach()
        q, k = qkv[..., : c.d_model], qkv[..., c.d_model: 2 * c.d_model]
        dh = c.d_model // n_heads
        for cell in range(len(cells)):
            for h in range(n_heads):
                s = (q[cell, 1:, h * dh:(h + 1) * dh] @ k[cell, 1:, h * dh:(h + 1) * dh].T).numpy()
                rows = np.stack([rankdata(r, method="ordinal") - 1 for r in s])
                maps[cell, li, h] = np.stack([rankdata(col, method="ordinal") - 1 for col in rows.T]).T / g
    return maps.mean(axis=(0, 1, 2))


def test_streamed_attention_matches_direct_computation(tiny):
    model, adata = tiny
    before = adata.X.copy()
    net = attention_network(model, adata, GENES, batch_size=8, progress=False)  # 41 cells: a short last batch
    assert net.directed and net.genes == GENES and net.info["n_cells"] == 41
    np.testing.assert_allclose(net.weights.to_numpy(), _direct_attention(model, adata, GENES, np.arange(41), [0, 1]),
                               atol=1e-6)
    one = attention_network(model, adata, GENES[:6], layers=[-1], state_key="stim", state="STIM", batch_size=5,
                            progress=False)
    stim = np.flatnonzero(adata.obs["stim"] == "STIM")
    np.testing.assert_allclose(one.weights.to_numpy(), _direct_attention(model, adata, GENES[:6], stim, [1]),
                               atol=1e-6)
    assert one.info["n_cells"] == 21 and one.info["layers"] == [1]
    assert (adata.X != before).nnz == 0 and list(adata.obs.columns) == ["stim", "cell_type"]


def test_attention_difference_and_errors(tiny):
    model, adata = tiny
    kw = {"batch_size": 16, "progress": False}
    diff = attention_difference(model, adata, "stim", "STIM", "CTRL", GENES[:8], **kw)
    a = attention_network(model, adata, GENES[:8], state_key="stim", state="STIM", **kw)
    b = attention_network(model, adata, GENES[:8], state_key="stim", state="CTRL", **kw)
    np.testing.assert_allclose(diff.weights.to_numpy(), a.weights.to_numpy() - b.weights.to_numpy())
    assert diff.directed and "difference" in diff.method
    sub = attention_network(model, adata, GENES[:8], state_key="stim", state="STIM", max_cells=7, **kw)
    again = attention_network(model, adata, GENES[:8], state_key="stim", state="STIM", max_cells=7, **kw)
    assert sub.info["n_cells"] == 7 and sub.weights.equals(again.weights)
    with pytest.raises(InputDataError, match="no cell has"):
        attention_network(model, adata, GENES, state_key="stim", state="nope", **kw)
    with pytest.raises(InputDataError, match="no column"):
        attention_network(model, adata, GENES, state_key="condition", state="STIM", **kw)
    with pytest.raises(GeneIdentityError, match="not in the data"):
        attention_network(model, adata, ["CD3E", "NOTAGENE"], **kw)
    with pytest.raises(ConfigError, match="layers"):
        attention_network(model, adata, GENES, layers=[5], **kw)
    with pytest.raises(ConfigError, match="scGPT-family"):
        attention_network(object(), adata, GENES, **kw)
    logged = adata.copy()
    logged.X = logged.X.log1p()
    with pytest.raises(InputDataError, match="raw counts"):
        attention_network(model, logged, GENES, **kw)


# ---- gene-embedding networks, edges and programs -------------------------------------------------
def test_embedding_network_cosine_and_gene_restriction(tiny):
    table = pd.DataFrame([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-1.0, 0.0]], index=["A", "B", "C", "D"])
    net = embedding_network(table, ["C", "A", "Z", "B"])
    assert net.genes == ["C", "A", "B"] and not net.directed
    s = np.sqrt(0.5)
    np.testing.assert_allclose(net.weights.to_numpy(), [[1, 0, s], [0, 1, s], [s, s, 1]], atol=1e-12)
    model, _ = tiny
    from_model = embedding_network(model, ["MX1", "CD3E", "NOTAGENE"])
    emb = model.gene_embeddings(["MX1", "CD3E"]).to_numpy()
    cos = emb[0] @ emb[1] / np.linalg.norm(emb[0]) / np.linalg.norm(emb[1])
    assert from_model.genes == ["MX1", "CD3E"]
    assert from_model.weights.loc["MX1", "CD3E"] == pytest.approx(cos, abs=1e-6)
    with pytest.raises(GeneIdentityError, match="at least 2"):
        embedding_network(table, ["A", "Z"])
    with pytest.raises(ConfigError, match="gene embeddings"):
        embedding_network(object(), ["A", "B"])


def test_edges_threshold_topk_absolute_and_directed():
    w = pd.DataFrame([[1.0, 0.5, -0.7], [0.5, 1.0, 0.2], [-0.7, 0.2, 1.0]], index=list("abc"), columns=list("abc"))
    net = GeneNetwork(w, "test")
    e = net.edges(threshold=0.1)
    assert e.values.tolist() == [["a", "b", 0.5], ["b", "c", 0.2]]
    assert net.edges(threshold=0.4, absolute=True).values.tolist() == [["a", "c", -0.7], ["a", "b", 0.5]]
    assert net.edges(top_k=1).values.tolist() == [["a", "b", 0.5], ["b", "c", 0.2]]  # a->b, b->a, c->b
    d = GeneNetwork(pd.DataFrame([[0, 3, 1], [2, 0, 5], [4, 1, 0]], index=list("abc"), columns=list("abc"),
                                 dtype=float), "attention", directed=True)
    assert d.edges(top_k=1).values.tolist() == [["b", "c", 5.0], ["c", "a", 4.0], ["a", "b", 3.0]]
    assert len(d.edges(threshold=0)) == 6
    deg = d.weighted_degree()
    assert deg.to_dict() == {"a": 3 + 1 + 2 + 4, "b": 2 + 5 + 3 + 1, "c": 4 + 1 + 1 + 5}
    assert net.weighted_degree().to_dict() == pytest.approx({"a": 1.2, "b": 0.7, "c": 0.9})
    with pytest.raises(ConfigError, match="threshold"):
        net.edges()
    with pytest.raises(InputDataError, match="NaN"):
        GeneNetwork(w.where(w > 0), "bad")
    with pytest.raises(ConfigError, match="different genes"):
        net - GeneNetwork(w.iloc[:2, :2], "other")


def test_knn_graph_by_hand():
    s = np.array([[1, 0.9, 0.1, -0.5], [0.9, 1, 0.3, 0.2], [0.1, 0.3, 1, 0.8], [-0.5, 0.2, 0.8, 1]])
    g = knn_graph(s, 1).toarray()
    expected = np.zeros((4, 4))
    expected[0, 1] = expected[1, 0] = 0.9
    expected[2, 3] = expected[3, 2] = 0.8
    np.testing.assert_allclose(g, expected)
    g2 = knn_graph(s, 2).toarray()  # d's second neighbour is b (0.2); a's is c (0.1); negative weights never
    assert g2[3, 1] == g2[1, 3] == pytest.approx(0.2) and g2[0, 2] == pytest.approx(0.1) and g2[0, 3] == 0
    with pytest.raises(ConfigError, match="n_neighbors"):
        knn_graph(s, 4)


def test_programs_find_planted_clusters_and_are_seeded():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(3, 16)) * 3
    sizes = [8, 6, 4]  # the third is below min_size
    emb = np.vstack([c + rng.normal(scale=0.3, size=(n, 16)) for c, n in zip(centres, sizes)])
    genes = [f"g{i}" for i in range(sum(sizes))]
    net = embedding_network(pd.DataFrame(emb, index=genes))
    progs = net.programs(n_neighbors=3, resolution=0.5, min_size=5, seed=0)
    assert list(progs.columns) == ["program", "gene", "size"]
    assert progs.groupby("program")["gene"].apply(list).to_dict() == {0: genes[:8], 1: genes[8:14]}
    assert progs["size"].tolist() == [8] * 8 + [6] * 6
    assert progs.equals(net.programs(n_neighbors=3, resolution=0.5, min_size=5, seed=0))
    assert len(net.programs(n_neighbors=3, resolution=0.5, min_size=1, seed=0)) == 18
    with pytest.raises(ConfigError, match="resolution"):
        net.programs(resolution=0)


def test_program_scores_and_activity(tiny):
    _, adata = tiny
    rng = np.random.default_rng(2)
    filler = rng.poisson(rng.gamma(1.0, 2.0, size=(41, 150))).astype(np.float32)  # score_genes' control genes
    x = np.hstack([adata.X.toarray(), filler])
    x[adata.obs["cell_type"].to_numpy() == "B", 4:8] += 30  # the B program is high in B cells
    data = ad.AnnData(sp.csr_matrix(x), obs=adata.obs.copy(),
                      var=pd.DataFrame(index=GENES + [f"F{i}" for i in range(150)]))
    before = data.X.copy()
    programs = pd.DataFrame({"program": [0] * 4 + [1] * 4, "gene": GENES[4:8] + GENES[:4], "size": 4})
    scores = program_scores(data, programs, seed=0)
    assert scores.shape == (41, 2) and list(scores.index) == list(data.obs_names)
    act = program_activity(data, programs, "cell_type")
    assert list(act.index) == ["B", "T"] and act.loc["B", 0] > act.loc["T", 0] + 1
    np.testing.assert_allclose(act.loc["B"].to_numpy(), scores[data.obs["cell_type"] == "B"].mean().to_numpy())
    assert (data.X != before).nnz == 0 and "_score" not in data.obs
    with pytest.raises(InputDataError, match="no column"):
        program_activity(data, programs, "missing")
    with pytest.raises(InputDataError, match="none of the genes"):
        program_scores(data, {"p": ["NOTAGENE"]})


# ---- outputs ---------------------------------------------------------------------------------------
def test_outputs_uns_csv_and_generib(tiny, tmp_path):
    _, adata = tiny
    edges = pd.DataFrame({"source": ["A", "B", "C"], "target": ["B", "C", "A"], "weight": [0.2, -0.9, 0.5]})
    out = add_network(adata, edges, key="grn")
    assert out is not adata and "grn" not in adata.uns and out.uns["grn"].equals(edges)
    same = add_network(adata.copy(), edges, inplace=True)
    assert same.uns["grn"].equals(edges)
    path = write_edges_csv(edges, tmp_path / "edges.csv")
    assert pd.read_csv(path).equals(edges)
    pred = to_generib(edges, method_id="scforge_attention", dataset_id="ifnb", max_edges=2)
    assert pred.uns["method_id"] == "scforge_attention" and pred.uns["dataset_id"] == "ifnb"
    assert pred.uns["prediction"].values.tolist() == [["B", "C", "-0.9"], ["C", "A", "0.5"]]
    pred.write_h5ad(tmp_path / "prediction.h5ad")
    back = ad.read_h5ad(tmp_path / "prediction.h5ad")
    assert back.uns["prediction"]["weight"].tolist() == ["-0.9", "0.5"]
    with pytest.raises(InputDataError, match="columns"):
        add_network(adata, edges.rename(columns={"weight": "w"}))


# ---- co-expression baseline -------------------------------------------------------------------------
def test_coexpression_pearson_spearman_by_hand(tiny):
    _, adata = tiny
    genes = GENES[:5]
    x = adata.X.toarray().astype(np.float64)
    logged = np.log1p(x / x.sum(1, keepdims=True) * 1e4)[:, :5]
    net = coexpression_network(adata, genes)
    np.testing.assert_allclose(net.weights.to_numpy(), np.corrcoef(logged, rowvar=False), atol=1e-12)
    sp_net = coexpression_network(adata, genes, method="spearman")
    # ranks (and their ties) are a property of the exact float values: rank scforge's own normalisation
    from scforge.baselines import log1p_cp10k

    same_values = log1p_cp10k(adata.X)[:, :5].toarray()
    np.testing.assert_allclose(same_values, logged, rtol=1e-12)
    np.testing.assert_allclose(sp_net.weights.to_numpy(), spearmanr(same_values).statistic, atol=1e-12)
    stim = (adata.obs["stim"] == "STIM").to_numpy()
    diff = coexpression_difference(adata, "stim", "STIM", "CTRL", genes)
    expected = np.corrcoef(logged[stim], rowvar=False) - np.corrcoef(logged[~stim], rowvar=False)
    np.testing.assert_allclose(diff.weights.to_numpy(), expected, atol=1e-12)
    flat = correlation_matrix(np.c_[np.arange(4.0), np.ones(4)])
    np.testing.assert_array_equal(flat, np.eye(2))  # a constant gene correlates with nothing
    logged_adata = adata.copy()
    logged_adata.X = logged_adata.X.log1p()
    with pytest.raises(InputDataError):
        coexpression_network(logged_adata, genes)
    with pytest.raises(ConfigError, match="method"):
        coexpression_network(adata, genes, method="kendall")


# ---- the command line ------------------------------------------------------------------------------
def test_cli_grn_coexpression_and_attention(tiny, tmp_path, capsys):
    model, adata = tiny
    data = tmp_path / "cells.h5ad"
    adata.write_h5ad(data)
    model.save(tmp_path / "model")
    out = tmp_path / "coexp"
    code = main(["grn", str(data), "--method", "coexpression", "--n-hvg", "50", "--state-key", "stim", "--state",
                 "STIM", "--reference", "CTRL", "--min-size", "2", "--n-neighbors", "3", "--out", str(out)])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["genes"] == len(GENES) and summary["method"] == "coexpression-pearson difference"
    edges = pd.read_csv(out / "edges.csv")
    assert list(edges.columns) == ["source", "target", "weight"] and len(edges) > 0
    assert list(pd.read_csv(out / "programs.csv").columns) == ["program", "gene", "size"]
    assert main(["grn", str(data), "--method", "attention", "--model", str(tmp_path / "model"), "--n-hvg", "50",
                 "--top-k", "2", "--min-size", "2", "--n-neighbors", "3", "--no-progress",
                 "--out", str(tmp_path / "att")]) == 0
    assert json.loads(capsys.readouterr().out)["edges"] <= 2 * len(GENES)
    assert main(["grn", str(data), "--method", "coexpression", "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["grn", str(data), "--method", "embedding", "--state", "STIM", "--model", str(tmp_path / "model"),
                 "--out", str(tmp_path / "emb")]) == 2
    assert "apply to --method attention" in capsys.readouterr().err
