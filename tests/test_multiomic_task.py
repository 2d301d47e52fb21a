"""Multi-omic data, tokens, user API (fit / embed / save / load) and the concatenated-PCA baseline."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scforge.baselines.multiomic import clr, concat_pca, tfidf, unit_total_variance
from scforge.errors import ConfigError, InputDataError
from scforge.tasks.multiomic import MOD_TOKENS, MultiOmicData, MultiOmicModel, MultiOmicVocab, pad_batch, tokenize

MOD = {tok: i for i, tok in enumerate(MOD_TOKENS)}


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine is shared: one torch thread is several times faster than two under load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cite(n_cells: int = 40, n_genes: int = 30, proteins=("P1", "P2", "P3"), seed: int = 0, prefix: str = "c"):
    """A CITE-seq AnnData: two cell groups with different genes and proteins, proteins as a DataFrame."""
    rng = np.random.default_rng(seed)
    group = np.arange(n_cells) % 2
    rate = np.where(group[:, None] == 0, np.linspace(0.2, 3, n_genes), np.linspace(3, 0.2, n_genes))
    x = rng.poisson(rate).astype(np.float32)
    prate = np.where(group[:, None] == 0, 50.0, 5.0) * np.linspace(1, 2, len(proteins))
    names = [f"{prefix}{i}" for i in range(n_cells)]
    prot = pd.DataFrame(rng.poisson(prate).astype(float), index=names, columns=list(proteins))
    adata = ad.AnnData(X=x, obs=pd.DataFrame({"group": group.astype(str)}, index=names),
                       var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    adata.obsm["protein_expression"] = prot
    return adata


def test_tokens_order_values_and_modalities_by_hand():
    adata = ad.AnnData(X=np.array([[0, 4, 1], [2, 0, 0]], dtype=np.float32),
                       obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["A", "B", "C"]))
    adata.obsm["protein_expression"] = np.array([[3.0, 7.0], [0.0, 5.0]])
    adata.uns["protein_names"] = ["P1", "P2"]
    data = MultiOmicData.from_cite_seq(adata)
    vocab = MultiOmicVocab.build(data, n_hvg=None)
    assert vocab.features.tokens == ["<pad>", "<cls>", "A", "B", "C", "ADT:P1", "ADT:P2"]
    cells = tokenize(data, vocab, n_bins=3)
    # n_bins=3: edges = [min, max] of the cell's non-zero values; the max gets bin 2, the others bin 1
    g0, v0 = cells.cell(0)
    assert g0.tolist() == [1, 3, 4, 5, 6] and v0.tolist() == [0.0, 2.0, 1.0, 1.0, 2.0]
    g1, v1 = cells.cell(1)
    # a lone value sits on both edges: a tie, drawn between bins 1 and 2 as scGPT's binning does
    assert g1.tolist() == [1, 2, 6] and v1[0] == 0.0 and set(v1[1:].tolist()) <= {1.0, 2.0}
    batch = pad_batch(cells, np.array([0, 1]), vocab)
    assert batch["mod_types"].tolist() == [[MOD["<cls>"], MOD["<rna>"], MOD["<rna>"], MOD["<adt>"], MOD["<adt>"]],
                                           [MOD["<cls>"], MOD["<rna>"], MOD["<adt>"], MOD["<pad>"], MOD["<pad>"]]]
    assert batch["padding_mask"][1].tolist() == [False, False, False, True, True]
    assert batch["values"][1, 3:].tolist() == [-2.0, -2.0]


def test_protein_bins_equal_bins_of_clr():
    """Per-cell quantile bins are unchanged by CLR (a per-cell monotone map of the counts)."""
    adata = cite(n_cells=6, proteins=tuple(f"P{i}" for i in range(12)), seed=4)
    data = MultiOmicData.from_cite_seq(adata)
    vocab = MultiOmicVocab({"adt": data.modalities["adt"].features.tolist()})
    cells = tokenize(data, vocab, n_bins=5)
    counts = adata.obsm["protein_expression"].to_numpy()
    for i in range(6):
        _, values = cells.cell(i)
        expressed = counts[i] > 0
        clr_row = clr(counts[i : i + 1])[0][expressed]
        ranks = np.argsort(np.argsort(clr_row, kind="stable"), kind="stable")
        assert np.all(np.diff(values[1:][np.argsort(ranks)]) >= 0)  # bins increase with CLR


def test_missing_protein_row_means_no_protein_tokens_and_embedding_still_works():
    adata = cite(n_cells=12)
    prot = adata.obsm["protein_expression"].copy()
    prot.iloc[3] = np.nan
    adata.obsm["protein_expression"] = prot
    before = adata.obsm["protein_expression"].copy()
    data = MultiOmicData.from_cite_seq(adata)
    assert data.modalities["adt"].present.tolist() == [i != 3 for i in range(12)]
    model = MultiOmicModel.new(data, d_model=16, n_layers=1, n_heads=2, n_hvg=None, seed=0)
    cells = model.tokenize(data)
    mods = model.vocab.mod_of_token[cells.cell(3)[0]]
    assert MOD["<adt>"] not in mods and MOD["<rna>"] in mods
    assert MOD["<adt>"] in model.vocab.mod_of_token[cells.cell(2)[0]]
    emb = model.embed(data, device="cpu", precision="fp32")
    assert emb.shape == (12, 16) and np.isfinite(emb).all()
    pd.testing.assert_frame_equal(adata.obsm["protein_expression"], before)  # caller's data untouched


def test_different_panels_share_common_tokens():
    a = MultiOmicData.from_cite_seq(cite(n_cells=10, proteins=("CD3", "CD19", "CD14"), prefix="x"))
    b = MultiOmicData.from_cite_seq(cite(n_cells=8, proteins=("CD19", "CD3"), seed=1, prefix="x"))
    both = MultiOmicData.concat([a, b], batch_key="file", names=["5k", "10k"])
    assert both.obs_names[0] == "x0-5k" and both.obs["file"].tolist() == ["5k"] * 10 + ["10k"] * 8
    adt = both.modalities["adt"]
    assert adt.features.tolist() == ["CD3", "CD19", "CD14"]
    assert adt.panels.tolist() == [[True, True, True], [True, True, False]] and adt.shared.tolist() == [True, True, False]
    vocab = MultiOmicVocab.build(both, n_hvg=None)
    cells = tokenize(both, vocab, n_bins=11)
    cd3, cd14 = vocab.features["ADT:CD3"], vocab.features["ADT:CD14"]
    assert cd3 in cells.cell(0)[0] and cd3 in cells.cell(12)[0]  # one token for both panels
    assert all(cd14 not in cells.cell(i)[0] for i in range(10, 18))  # not measured in the second panel
    np.testing.assert_array_equal(both.modalities["adt"].counts[12].toarray()[0, :2],
                                  b.modalities["adt"].counts[2].toarray()[0, [1, 0]])


def test_from_mudata_fixture_and_cells_missing_from_a_modality(shared_data):
    mu = pytest.importorskip("mudata")
    path = shared_data / "multiomics" / "test_rna_atac.h5mu"
    data = MultiOmicData.from_mudata(path, modalities=("rna", "atac"))
    assert data.n_obs == 1000 and data.kinds == ("rna", "atac")
    assert len(data.modalities["atac"].features) == 174 and data.modalities["atac"].present.all()
    mdata = mu.read_h5mu(path)
    partial = mu.MuData({"rna": mdata.mod["rna"][:50].copy(), "peaks": mdata.mod["atac"][10:50].copy()})
    sub = MultiOmicData.from_mudata(partial, modalities={"rna": "rna", "peaks": "atac"})
    assert sub.modalities["atac"].present.tolist() == [i >= 10 for i in range(50)]
    vocab = MultiOmicVocab.build(sub, n_hvg=None, n_top_peaks=20)
    assert len(vocab.per_modality["atac"]) == 20 and vocab.per_modality["atac"][0].startswith("chr")
    cells = tokenize(sub, vocab)
    atac = vocab.features.tokens.index("ATAC:" + vocab.per_modality["atac"][0])
    mods = vocab.mod_of_token[cells.gene_ids]
    assert (mods[cells.gene_ids >= atac] == MOD["<atac>"]).all()
    assert all(MOD["<atac>"] not in vocab.mod_of_token[cells.cell(i)[0]] for i in range(10))
    assert set(cells.values[mods == MOD["<atac>"]].tolist()) == {1.0}  # binarised peaks
    with pytest.raises(InputDataError, match="does not exist"):
        MultiOmicData.from_mudata(shared_data / "multiomics" / "nope.h5mu")
    with pytest.raises(InputDataError, match="no modality"):
        MultiOmicData.from_mudata(mdata, modalities=("rna", "prot"))


def test_clear_errors_for_bad_inputs():
    adata = cite(n_cells=6)
    rna = adata.copy()
    del rna.obsm["protein_expression"]
    prot = ad.AnnData(X=sp.csr_matrix(adata.obsm["protein_expression"].to_numpy()),
                      obs=pd.DataFrame(index=[f"other{i}" for i in range(6)]))
    with pytest.raises(InputDataError, match="do not match"):
        MultiOmicData.from_modalities({"rna": rna, "adt": prot})
    with pytest.raises(InputDataError, match=r"shape \(6, 3\).*2 protein names"):
        arr = adata.copy()
        arr.obsm["protein_expression"] = adata.obsm["protein_expression"].to_numpy()
        MultiOmicData.from_cite_seq(arr, protein_names=["P1", "P2"])
    with pytest.raises(InputDataError, match="must hold raw integer counts"):
        logged = adata.copy()
        logged.X = np.log1p(logged.X)
        MultiOmicData.from_cite_seq(logged)
    with pytest.raises(InputDataError, match="is empty"):
        MultiOmicData.from_modalities({"rna": rna, "adt": ad.AnnData(X=np.zeros((6, 0)), obs=rna.obs)})
    with pytest.raises(InputDataError, match="only zeros"):
        MultiOmicData.from_modalities({"rna": rna, "adt": ad.AnnData(X=np.zeros((6, 2)), obs=rna.obs)})
    with pytest.raises(ConfigError, match="unknown modality"):
        MultiOmicData.from_modalities({"hic": rna})
    with pytest.raises(InputDataError, match="NaN values inside measured cells"):
        holes = adata.copy()
        p = holes.obsm["protein_expression"].copy()
        p.iloc[0, 1] = np.nan
        holes.obsm["protein_expression"] = p
        MultiOmicData.from_cite_seq(holes)


def test_fit_embed_deterministic_and_save_load(tmp_path):
    data = MultiOmicData.concat([MultiOmicData.from_cite_seq(cite(n_cells=24, prefix="a")),
                                 MultiOmicData.from_cite_seq(cite(n_cells=24, seed=1, prefix="b"))],
                                batch_key="file")
    obs_before = data.obs.copy()

    def trained():
        model = MultiOmicModel.new(data, d_model=16, n_layers=1, n_heads=2, n_hvg=None, batch_key="file", seed=3)
        return model.fit(data, epochs=1, batch_size=16, lr=1e-3, seed=0, precision="fp32", device="cpu")

    first, second = trained(), trained()
    assert {"train/gep", "train/mvc", "train/dar"} <= set(first.history)
    for a, b in zip(first.module.state_dict().values(), second.module.state_dict().values()):
        assert torch.equal(a, b)  # same seed, same weights
    out = first.embed(data, return_adata=True, device="cpu", precision="fp32")
    emb = out.obsm["X_scGPT_multiomic"]
    assert emb.shape == (48, 16) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert out.obs_names.equals(data.obs_names) and "X_scGPT_multiomic" not in getattr(data, "obsm", {})
    pd.testing.assert_frame_equal(data.obs, obs_before)
    folder = first.save(tmp_path / "mo")
    again = MultiOmicModel.load(folder)
    import scforge

    assert isinstance(scforge.load(folder), MultiOmicModel)  # the family is registered
    assert again.batches == ["0", "1"] and again.vocab.per_modality == first.vocab.per_modality
    np.testing.assert_allclose(again.embed(data, device="cpu", precision="fp32"), emb, atol=1e-6)
    plain = MultiOmicModel.new(data, d_model=16, n_layers=1, n_heads=2, n_hvg=None)
    with pytest.raises(ConfigError, match="no batch embedding"):
        plain.fit(data, epochs=1, batch_key="file")
    with pytest.raises(ConfigError, match="mask_ratio"):
        plain.fit(data, epochs=1, mask_ratio=1.5)


def test_embedding_of_data_with_fewer_features_uses_the_shared_tokens():
    big = MultiOmicData.from_cite_seq(cite(n_cells=10, proteins=("CD3", "CD19", "CD14")))
    small = MultiOmicData.from_cite_seq(cite(n_cells=10, proteins=("CD19", "NEW")))
    model = MultiOmicModel.new(big, d_model=16, n_layers=1, n_heads=2, n_hvg=None, seed=0)
    cells = model.tokenize(small)
    assert model.vocab.features["ADT:CD19"] in cells.cell(0)[0]
    assert "ADT:NEW" not in model.vocab.features and cells.gene_ids.max() < len(model.vocab)
    assert model.embed(small, device="cpu", precision="fp32").shape == (10, 16)


# ---- baseline ------------------------------------------------------------------------------------
def test_clr_tfidf_and_unit_variance_by_hand():
    np.testing.assert_allclose(clr(np.array([[0.0, np.e - 1]])), [[-0.5, 0.5]])
    m = tfidf(sp.csr_matrix(np.array([[1.0, 1.0], [0.0, 2.0]])))
    # tf = [[.5, .5], [0, 1]]; idf = 2 / [1, 3]
    np.testing.assert_allclose(m.toarray(), np.log1p(np.array([[0.5 * 2 * 1e4, 0.5 * 2 / 3 * 1e4],
                                                                [0.0, 2 / 3 * 1e4]])))
    z = unit_total_variance(np.array([[1.0, 0.0], [3.0, 4.0]]))
    np.testing.assert_allclose(z.var(axis=0).sum(), 1.0)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)


def test_concat_pca_blocks_and_missing_cells():
    adata = cite(n_cells=40, n_genes=30, proteins=tuple(f"P{i}" for i in range(8)))
    prot = adata.obsm["protein_expression"].copy()
    prot.iloc[:4] = np.nan
    adata.obsm["protein_expression"] = prot
    data = MultiOmicData.from_cite_seq(adata)
    emb = concat_pca(data, {"rna": 5, "adt": 3}, n_top_genes=20)
    assert emb.shape == (40, 8)
    np.testing.assert_allclose(emb[4:, 5:].var(axis=0).sum(), 1.0, rtol=1e-4)
    np.testing.assert_allclose(emb[:, :5].var(axis=0).sum(), 1.0, rtol=1e-4)
    assert np.all(emb[:4, 5:] == 0)  # no protein data: the block's mean
    group = adata.obs["group"].to_numpy()
    assert abs(emb[group == "0", 0].mean() - emb[group == "1", 0].mean()) > 0.05  # PC1 separates the groups
    with pytest.raises(ConfigError, match="too many"):
        concat_pca(data, {"rna": 5, "adt": 8})
    with pytest.raises(ConfigError, match="integer >= 1"):
        concat_pca(data, {"rna": 5})


def test_callers_sparse_matrix_is_not_touched():
    x = sp.csr_matrix((np.array([2.0, 1.0, 3.0], dtype=np.float32), np.array([2, 0, 1]), np.array([0, 2, 3])),
                      shape=(2, 3))  # unsorted column indices in row 0
    adata = ad.AnnData(X=x, obs=pd.DataFrame(index=["a", "b"]), var=pd.DataFrame(index=["A", "B", "C"]))
    adata.obsm["protein_expression"] = pd.DataFrame({"P1": [1.0, 2.0]}, index=["a", "b"])
    data = MultiOmicData.from_cite_seq(adata)
    assert adata.X.indices.tolist() == [2, 0, 1] and not adata.X.has_sorted_indices
    np.testing.assert_array_equal(data.modalities["rna"].counts.toarray(), x.toarray())
