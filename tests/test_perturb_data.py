"""Perturbation data: GEARS layout reading, any-h5ad reading, DE rankings, splits and control pairing."""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scforge.data import (
    PerturbationData,
    condition_genes,
    from_anndata,
    heldout_split,
    pair_controls,
    rank_de_genes,
    read_gears,
    simulation_split,
    top_de_genes,
)
from scforge.errors import ConfigError, GeneIdentityError, InputDataError
from scforge.testing.perturbation import gears_layout_adata

# the reference scanpy calls in these tests build their result frame column by column
pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")

GENES = ["G0", "G1", "G2", "G3", "G4", "G5"]


# ------------------------------------------------------------------------------------------ helpers
def _snapshot(adata: ad.AnnData) -> dict:
    dense = adata.X.toarray() if sp.issparse(adata.X) else np.array(adata.X)
    return {"obs": adata.obs.copy(), "var": adata.var.copy(), "uns": sorted(adata.uns.keys()), "X": dense,
            "layers": {k: (v.toarray() if sp.issparse(v) else np.array(v)) for k, v in adata.layers.items()},
            "obsm": sorted(adata.obsm.keys())}


def _assert_unchanged(adata: ad.AnnData, snap: dict) -> None:
    now = _snapshot(adata)
    pd.testing.assert_frame_equal(now["obs"], snap["obs"])
    pd.testing.assert_frame_equal(now["var"], snap["var"])
    assert now["uns"] == snap["uns"] and now["obsm"] == snap["obsm"]
    np.testing.assert_array_equal(now["X"], snap["X"])
    assert now["layers"].keys() == snap["layers"].keys()
    for k in snap["layers"]:
        np.testing.assert_array_equal(now["layers"][k], snap["layers"][k])


def _toy(counts: bool = False) -> ad.AnnData:
    """Two contexts with controls; singles, a combo and a stimulus; log-scale values (or raw counts)."""
    rng = np.random.default_rng(0)
    plan = [("ctrl", "a", 4), ("ctrl", "b", 3), ("G0+ctrl", "a", 3), ("G0+ctrl", "b", 2), ("G1+ctrl", "a", 2),
            ("G0+G1", "a", 3), ("STIM", "b", 3)]
    labels = [c for c, _, n in plan for _ in range(n)]
    contexts = [x for _, x, n in plan for _ in range(n)]
    order = rng.permutation(len(labels))
    values = rng.poisson(3.0, size=(len(labels), len(GENES))).astype(np.float32)
    values[:, 5] = 0.0  # a gene never expressed
    x = values * 30 if counts else np.log1p(values)
    obs = pd.DataFrame({"perturbation": np.array(labels)[order], "cell_line": np.array(contexts)[order]},
                       index=[f"c{i}" for i in range(len(labels))])
    var = pd.DataFrame({"symbol": GENES}, index=[f"ID{i}" for i in range(len(GENES))])
    return ad.AnnData(X=sp.csr_matrix(x.astype(np.float32)), obs=obs, var=var)


def _toy_data(adata: ad.AnnData | None = None, control: str = "ctrl", **kw) -> PerturbationData:
    adata = _toy() if adata is None else adata
    kw.setdefault("gene_symbols", "symbol")
    return from_anndata(adata, "perturbation", control, context_key="cell_line", perturbation_genes={"STIM": ()}, **kw)


# ------------------------------------------------------------------------------------------ conditions
def test_condition_genes():
    assert condition_genes("ctrl") == ()
    assert condition_genes("A+ctrl") == ("A",)
    assert condition_genes("ctrl+A") == ("A",)
    assert condition_genes("A+B") == ("A", "B")
    assert condition_genes("NT", control="NT") == ()
    assert condition_genes("STIM") == ("STIM",)
    for bad in ["", "A+", "+A", "A++B", " A+ctrl", "ctrl+ctrl", "A+A"]:
        with pytest.raises(InputDataError):
            condition_genes(bad)


# ------------------------------------------------------------------------------------------ any h5ad
def test_from_anndata_structure_and_profiles():
    adata = _toy()
    snap = _snapshot(adata)
    data = _toy_data(adata)
    assert data.conditions == list(pd.unique(adata.obs["perturbation"][adata.obs["perturbation"] != "ctrl"]))
    assert set(data.contexts) == {"a", "b"} and data.n_cells == 20 and data.n_genes == 6
    assert set(data.groups) == {("G0+ctrl", "a"), ("G0+ctrl", "b"), ("G1+ctrl", "a"), ("G0+G1", "a"), ("STIM", "b")}
    assert data.gene_names.tolist() == GENES
    assert data.perturbation_genes == {"G0+ctrl": ("G0",), "G1+ctrl": ("G1",), "G0+G1": ("G0", "G1"), "STIM": ()}
    labels, lines = adata.obs["perturbation"].to_numpy(), adata.obs["cell_line"].to_numpy()
    np.testing.assert_array_equal(data.cells("G0+ctrl", "b"), np.flatnonzero((labels == "G0+ctrl") & (lines == "b")))
    np.testing.assert_array_equal(data.cells("G0+ctrl"), np.flatnonzero(labels == "G0+ctrl"))
    np.testing.assert_array_equal(data.control_cells("a"), np.flatnonzero((labels == "ctrl") & (lines == "a")))
    np.testing.assert_array_equal(data.control_cells(), np.flatnonzero(labels == "ctrl"))
    dense = adata.X.toarray()
    rows = data.cells("G0+G1", "a")
    expr = data.expression(rows)
    assert expr.dtype == np.float32
    np.testing.assert_array_equal(expr, dense[rows])
    prof = data.profiles()
    for group in data.groups:
        np.testing.assert_allclose(prof.means[group], dense[data.cells(*group)].mean(0), rtol=1e-6)
        assert prof.n_cells[group] == data.cells(*group).size
    np.testing.assert_allclose(prof.control["b"], dense[data.control_cells("b")].mean(0), rtol=1e-6)
    assert prof.n_cells[("ctrl", "a")] == 4 and prof.genes["STIM"] == ()
    _assert_unchanged(adata, snap)


def test_layer_is_used():
    adata = _toy()
    adata.layers["log"] = adata.X.copy() * 2
    data = _toy_data(adata, layer="log")
    rows = data.cells("G1+ctrl", "a")
    np.testing.assert_allclose(data.expression(rows), adata.layers["log"][rows].toarray())


def test_de_rankings_computed_per_context_and_cached():
    import scanpy as sc

    adata = _toy()
    snap = _snapshot(adata)
    data = _toy_data(adata)
    ranking = data.de_ranking("G0+ctrl", "b")
    # scanpy on exactly the "b" controls and G0+ctrl/b cells (another group of b present, as GEARS has)
    b = adata[(adata.obs["cell_line"] == "b").to_numpy()].copy()
    sc.tl.rank_genes_groups(b, groupby="perturbation", reference="ctrl", rankby_abs=True, n_genes=6,
                            method="t-test", use_raw=False)
    expected = pd.Index(adata.var_names).get_indexer(b.uns["rank_genes_groups"]["names"]["G0+ctrl"])
    np.testing.assert_array_equal(ranking, expected)
    assert sorted(ranking.tolist()) == list(range(6))
    np.testing.assert_array_equal(data.de_genes("G0+ctrl", "b", n=2), expected[:2])
    assert ("STIM", "b") in data._rankings  # the context's other groups were ranked in the same call
    _assert_unchanged(adata, snap)
    with pytest.raises(ConfigError, match="pass context="):
        data.de_genes("G0+ctrl")


def test_top_de_genes_non_dropout_rule_hand_made():
    ranking = np.array([4, 0, 3, 1, 2, 5])
    pert = np.array([0.0, 1.0, 0.0, 2.0, 0.0, 0.5])
    ctrl = np.array([0.3, 1.0, 0.0, 0.0, 0.0, 0.0])
    # gene 4: zero in both -> kept; 0: zero in pert but not ctrl -> dropout; 3: non-zero -> kept
    np.testing.assert_array_equal(top_de_genes(ranking, pert, ctrl, n=3, kind="non_dropout"), [4, 3, 1])
    np.testing.assert_array_equal(top_de_genes(ranking, pert, ctrl, n=3, kind="non_zero"), [3, 1, 5])
    np.testing.assert_array_equal(top_de_genes(ranking, pert, ctrl, n=2), [4, 0])
    np.testing.assert_array_equal(top_de_genes(ranking, pert, ctrl, n=10, kind="non_dropout"), [4, 3, 1, 2, 5])
    with pytest.raises(ConfigError):
        top_de_genes(ranking, pert, ctrl, kind="bogus")


def test_computed_non_dropout_uses_group_and_context_control_means():
    data = _toy_data()
    prof = data.profiles([("G0+ctrl", "a")])
    expected = top_de_genes(data.de_ranking("G0+ctrl", "a"), prof.means[("G0+ctrl", "a")], prof.control["a"],
                            n=4, kind="non_dropout")
    np.testing.assert_array_equal(data.de_genes("G0+ctrl", "a", n=4, kind="non_dropout"), expected)
    assert 5 in data.de_genes("G0+ctrl", "a", n=6, kind="non_dropout")  # zero in both means: kept
    assert 5 not in data.de_genes("G0+ctrl", "a", n=6, kind="non_zero")


def test_rank_de_genes_rejects_single_cell_groups():
    adata = _toy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[np.flatnonzero(labels == "G1+ctrl")[0]] = "G2+ctrl"
    adata.obs["perturbation"] = labels
    data = _toy_data(adata)
    with pytest.raises(InputDataError, match="fewer than 2 cells"):
        rank_de_genes(data, [("G2+ctrl", "a")])
    with pytest.raises(InputDataError, match="fewer than 2 cells"):
        data.de_genes("G2+ctrl", "a")
    assert data.de_genes("G0+ctrl", "a", n=3).size == 3  # other groups still rank


# ------------------------------------------------------------------------------------------ errors
def test_unmeasured_condition_gene_strict_and_lenient(caplog):
    adata = _toy()
    labels = adata.obs["perturbation"].astype(str).to_numpy()
    labels[labels == "G1+ctrl"] = "ZZZ9+ctrl"
    adata.obs["perturbation"] = labels
    snap = _snapshot(adata)
    with pytest.raises(InputDataError, match=r"'ZZZ9\+ctrl' -> ZZZ9") as err:
        _toy_data(adata)
    assert "strict=False" in str(err.value) and "perturbation_genes" in str(err.value)
    with caplog.at_level(logging.WARNING, logger="scforge"):
        data = _toy_data(adata, strict=False)
    assert data.dropped_conditions == ["ZZZ9+ctrl"] and "ZZZ9+ctrl" not in data.conditions
    assert all(g[0] != "ZZZ9+ctrl" for g in data.groups) and "ZZZ9" in caplog.text
    with pytest.raises(InputDataError, match="ZZZ9"):
        data.gene_positions(["G0", "ZZZ9"], condition="ZZZ9+ctrl")
    np.testing.assert_array_equal(data.gene_positions(["G3", "G0"]), [3, 0])
    _assert_unchanged(adata, snap)


def test_stimulus_needs_perturbation_genes():
    adata = _toy()
    with pytest.raises(InputDataError, match="STIM"):
        from_anndata(adata, "perturbation", "ctrl", context_key="cell_line", gene_symbols="symbol")
    data = from_anndata(adata, "perturbation", "ctrl", context_key="cell_line", perturbation_genes={"STIM": ["G4"]},
                        gene_symbols="symbol")
    assert data.perturbation_genes["STIM"] == ("G4",)


def test_input_errors():
    adata = _toy()
    snap = _snapshot(adata)
    with pytest.raises(InputDataError, match=r"obs\['treatment'\] is missing"):
        from_anndata(adata, "treatment", "ctrl")
    with pytest.raises(InputDataError, match="no control cells labelled 'CTRL'"):
        _toy_data(adata, control="CTRL")
    with pytest.raises(InputDataError, match="layer 'nope'"):
        _toy_data(adata, layer="nope")
    with pytest.raises(GeneIdentityError, match="gene_symbols"):
        _toy_data(adata, gene_symbols="nope")
    named = adata.copy()
    named.var = named.var.rename(columns={"symbol": "gene_name"})
    assert _toy_data(named, gene_symbols=None).gene_names.tolist() == GENES  # var['gene_name'] by default
    with pytest.raises(ConfigError, match="not in obs"):
        from_anndata(adata, "perturbation", "ctrl", perturbation_genes={"NOPE": ()})
    _assert_unchanged(adata, snap)


def test_raw_counts_and_negative_values_rejected():
    with pytest.raises(InputDataError, match="raw counts"):
        _toy_data(_toy(counts=True))
    adata = _toy()
    adata.X = adata.X.toarray() - 1.0
    with pytest.raises(InputDataError, match="negative"):
        _toy_data(adata)


def test_context_without_controls_rejected():
    adata = _toy()
    lines = adata.obs["cell_line"].astype(str).to_numpy()
    lines[adata.obs["perturbation"].to_numpy() == "STIM"] = "c"
    adata.obs["cell_line"] = lines
    with pytest.raises(InputDataError, match=r"contexts \['c'\].*no 'ctrl' controls"):
        _toy_data(adata)
    data = from_anndata(adata, "perturbation", "ctrl", perturbation_genes={"STIM": ()},
                        gene_symbols="symbol")  # controls pooled over contexts: fine
    assert data.contexts == [None]


# ------------------------------------------------------------------------------------------ splits (toy)
def test_heldout_split():
    data = _toy_data()
    split = heldout_split(data, test_fraction=0.25, val_fraction=0.34, seed=3)
    parts = [set(split.train) - {"ctrl"}, set(split.val), set(split.test)]
    assert sum(map(len, parts)) == 4 and set().union(*parts) == set(data.conditions)
    assert len(split.test) == 1 and len(split.val) == 1 and "ctrl" in split.train
    assert split == heldout_split(data, test_fraction=0.25, val_fraction=0.34, seed=3)
    explicit = heldout_split(data, test=["STIM", "G0+G1", "G1+ctrl"], val_fraction=0.0)
    assert explicit.test_subgroup == {"combo": ["G0+G1"], "single": ["G1+ctrl"], "stimulus": ["STIM"]}
    assert explicit.subgroup_of("STIM") == "stimulus" and explicit.subgroup_of("G0+ctrl") == "train"
    assert explicit.to_dict()["test"] == [c for c in data.conditions if c in {"STIM", "G0+G1", "G1+ctrl"}]
    with pytest.raises(ConfigError):
        heldout_split(data, test=["NOPE"])
    with pytest.raises(ConfigError):
        heldout_split(data, test_fraction=1.0)
    with pytest.raises(ConfigError, match="no training conditions"):
        heldout_split(data, test=data.conditions)


def test_simulation_split_errors():
    with pytest.raises(ConfigError, match="1 or 2 genes"):
        simulation_split(_toy_data())  # STIM perturbs no gene
    adata = _toy()
    keep = adata.obs["perturbation"].isin(["ctrl", "G0+ctrl"]).to_numpy()
    with pytest.raises(ConfigError, match="at least 2"):
        simulation_split(from_anndata(adata[keep].copy(), "perturbation", "ctrl", gene_symbols="symbol"))
    data = from_anndata(adata[(adata.obs["perturbation"] != "STIM").to_numpy()].copy(), "perturbation", "ctrl",
                        gene_symbols="symbol")
    for kw in ({"train_gene_set_size": 1.0}, {"combo_seen2_train_frac": 0.0}, {"train_gene_set_size": -0.1}):
        with pytest.raises(ConfigError):
            simulation_split(data, **kw)


# ------------------------------------------------------------------------------------------ control pairing
def test_pair_controls_same_context_deterministic():
    adata = _toy()
    snap = _snapshot(adata)
    data = _toy_data(adata)
    rows = np.arange(data.n_cells)
    paired = pair_controls(data, rows, seed=5)
    labels, lines = adata.obs["perturbation"].to_numpy(), adata.obs["cell_line"].to_numpy()
    is_ctrl = labels == "ctrl"
    np.testing.assert_array_equal(paired[is_ctrl], rows[is_ctrl])
    assert (labels[paired] == "ctrl").all() and (lines[paired] == lines[rows]).all()
    np.testing.assert_array_equal(paired, pair_controls(data, rows, seed=5))
    many = np.repeat(data.cells("G0+ctrl", "a"), 30)
    assert not np.array_equal(pair_controls(data, many, seed=1), pair_controls(data, many, seed=2))
    assert set(pair_controls(data, many, seed=1)) == set(data.control_cells("a"))  # uniform over the pool
    _assert_unchanged(adata, snap)
    bare = PerturbationData(adata, "perturbation", "ctrl", context_key="perturbation",
                            perturbation_genes={"STIM": ()})  # each label its own context: no controls
    with pytest.raises(InputDataError, match="no 'ctrl' controls"):
        pair_controls(bare, data.cells("G0+G1"), seed=0)


# ------------------------------------------------------------------------------------------ GEARS layout
def _gears_genes(source: ad.AnnData) -> tuple[list[str], list[tuple[str, str]]]:
    means = np.asarray(source.layers["lognorm"].mean(axis=0)).ravel()
    genes = [str(g) for g in source.var_names[np.argsort(-means, kind="stable")[100:116]]]
    rng = np.random.default_rng(2)
    pairs: set[tuple[str, str]] = set()
    while len(pairs) < 20:
        a, b = sorted(rng.choice(16, 2, replace=False))
        pairs.add((genes[a], genes[b]))
    return genes, sorted(pairs)


@pytest.fixture(scope="module")
def gears_path(ifnb_small, tmp_path_factory):
    snap = _snapshot(ifnb_small)
    genes, combos = _gears_genes(ifnb_small)
    adata = gears_layout_adata(ifnb_small, singles=genes[:12], combos=combos, n_ctrl=150, n_per_condition=20,
                               seed=0, n_genes=600)
    _assert_unchanged(ifnb_small, snap)
    path = tmp_path_factory.mktemp("norman_like") / "perturb_processed.h5ad"
    adata.write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def gears_adata(gears_path):
    return ad.read_h5ad(gears_path)


def test_gears_layout_file(gears_adata):
    a = gears_adata
    obs = a.obs
    assert a.shape == (150 + 32 * 20, 600)
    assert set(obs.columns) >= {"condition", "cell_type", "dose_val", "control", "condition_name"}
    assert (obs["condition_name"].astype(str) == obs["cell_type"].astype(str) + "_" + obs["condition"].astype(str)
            + "_" + obs["dose_val"].astype(str)).all()
    ctrl = obs["condition"] == "ctrl"
    assert (obs.loc[ctrl, "dose_val"] == "1").all() and (obs.loc[~ctrl, "dose_val"] == "1+1").all()
    assert (obs["control"] == ctrl.astype(int)).all()
    assert a.var.index.is_unique and a.var.index.str.startswith("ENSG").all()
    assert "ENSG00000187608" in a.var.index and "gene_name" in a.var.columns  # ISG15, a real id
    counts = a.layers["counts"].data
    assert np.all(counts == np.round(counts)) and a.X.max() < 50
    names = set(obs["condition_name"].astype(str)) - {"A549_ctrl_1"}
    ranking = a.uns["rank_genes_groups_cov_all"]
    assert set(ranking) == names and all(len(v) == 600 for v in ranking.values())
    assert set(a.uns["top_non_dropout_de_20"]) == names and set(a.uns["non_zeros_gene_idx"]) == names


def test_read_gears_and_uns_lookups(gears_path, gears_adata):
    data = read_gears(gears_path.parent)  # the folder works as well as the file
    assert data.contexts == [None] and len(data.conditions) == 32 and len(data.groups) == 32
    assert data.n_cells == gears_adata.n_obs and data.gene_names.tolist() == gears_adata.var["gene_name"].tolist()
    var = pd.Index(gears_adata.var_names)
    uns = gears_adata.uns
    for condition in data.conditions:
        name = f"A549_{condition}_1+1"
        assert data.uns_keys[(condition, None)] == name
        np.testing.assert_array_equal(data.de_genes(condition), var.get_indexer(uns["rank_genes_groups_cov_all"][name][:20]))
        np.testing.assert_array_equal(data.de_ranking(condition), var.get_indexer(uns["rank_genes_groups_cov_all"][name]))
        np.testing.assert_array_equal(data.de_genes(condition, kind="non_dropout"),
                                      var.get_indexer(uns["top_non_dropout_de_20"][name]))
        np.testing.assert_array_equal(data.de_genes(condition, n=5, kind="non_zero"),
                                      var.get_indexer(uns["top_non_zero_de_20"][name][:5]))
    assert data._rankings == {}  # nothing computed: all read from uns


def test_gears_computed_rankings_equal_scanpy(gears_adata):
    import scanpy as sc

    stripped = gears_adata.copy()
    for key in ("rank_genes_groups_cov_all", "top_non_dropout_de_20", "top_non_zero_de_20"):
        del stripped.uns[key]
    snap = _snapshot(stripped)
    data = read_gears(stripped)
    reference = gears_adata.copy()
    sc.tl.rank_genes_groups(reference, groupby="condition_name", reference="A549_ctrl_1", rankby_abs=True,
                            n_genes=reference.n_vars, method="t-test", use_raw=False)
    names = reference.uns["rank_genes_groups"]["names"]
    var = pd.Index(gears_adata.var_names)
    stored = gears_adata.uns
    for condition in data.conditions:
        name = f"A549_{condition}_1+1"
        np.testing.assert_array_equal(data.de_ranking(condition), var.get_indexer(names[name]))
        np.testing.assert_array_equal(data.de_genes(condition, kind="non_dropout"),
                                      var.get_indexer(stored["top_non_dropout_de_20"][name]))
    _assert_unchanged(stripped, snap)


def test_read_gears_errors(tmp_path, gears_adata):
    with pytest.raises(InputDataError, match="GEARS file not found"):
        read_gears(tmp_path)
    no_column = gears_adata.copy()
    del no_column.obs["condition"]
    with pytest.raises(InputDataError, match=r"no obs\['condition'\]"):
        read_gears(no_column)
    no_ctrl = gears_adata[(gears_adata.obs["condition"] != "ctrl").to_numpy()].copy()
    with pytest.raises(InputDataError, match="no control cells labelled 'ctrl'"):
        read_gears(no_ctrl)


def _train_genes(genes: set[str], fraction: float, seed: int) -> set[str]:
    """GEARS' draw, written as a permutation (what RandomState.choice without replacement does)."""
    ordered = np.array(sorted(genes))
    return set(ordered[np.random.RandomState(seed).permutation(ordered.size)[:int(ordered.size * fraction)]])


def _check_subgroups(subgroups: dict[str, list[str]], genes_of: dict, train_genes: set[str]) -> None:
    for name, members in subgroups.items():
        for c in members:
            seen = sum(g in train_genes for g in genes_of[c])
            if name == "unseen_single":
                assert len(genes_of[c]) == 1 and seen == 0
            else:
                assert len(genes_of[c]) == 2 and seen == int(name[-1])


def test_simulation_split_gears_semantics(gears_path):
    data = read_gears(gears_path)
    genes_of = data.perturbation_genes
    split = simulation_split(data, seed=2)
    train = [c for c in split.train if c != "ctrl"]
    assert "ctrl" in split.train
    assert len(train) + len(split.val) + len(split.test) == 32
    assert set(train) | set(split.val) | set(split.test) == set(data.conditions)
    all_genes = {g for c in data.conditions for g in genes_of[c]}
    train_genes = _train_genes(all_genes, 0.75, 2)
    assert len(all_genes) - len(train_genes) == int(len(all_genes) * (1 - 0.75)) == 4
    # every test subgroup is non-empty for this seed, so the checks below are not vacuous
    assert all(split.test_subgroup.values()) and all(split.val_subgroup.values())
    _check_subgroups(split.test_subgroup, genes_of, train_genes)
    assert sorted(sum(split.test_subgroup.values(), [])) == sorted(split.test)
    pool = sorted(c for c in data.conditions if len(genes_of[c]) == 2 and set(genes_of[c]) <= train_genes)
    kept = np.array(pool)[np.random.RandomState(2).permutation(len(pool))[:int(len(pool) * 0.75)]]
    assert set(kept) == set(pool) - set(split.test_subgroup["combo_seen2"])
    round1_train = train + split.val
    val_genes = _train_genes({g for c in round1_train for g in genes_of[c]}, 0.9, 2)
    _check_subgroups(split.val_subgroup, genes_of, val_genes)
    assert sorted(sum(split.val_subgroup.values(), [])) == sorted(split.val)
    assert all(c in split.test_subgroup[split.subgroup_of(c)] for c in split.test)
    assert simulation_split(data, seed=2) == split
    assert simulation_split(data, seed=3).to_dict() != split.to_dict()
