"""`scforge bench` on perturbation configs: GEARS-layout and any-h5ad data, splits, resuming, report, config errors."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

from scforge.bench.perturbation import load_perturbation_config, run_perturbation_bench
from scforge.cli import main
from scforge.data.perturbation import read_gears, simulation_split
from scforge.errors import ConfigError

pytestmark = pytest.mark.filterwarnings("ignore::pandas.errors.PerformanceWarning")

BASELINES = ["no_change", "additive", "linear"]
SCRATCH = {"path": None, "model_type": "scgpt", "d_model": 16, "n_heads": 2, "d_hid": 16, "n_layers": 1}
TRAINING = {"epochs": 1, "batch_size": 64, "pool_size": 20, "precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def gears_file(ifnb_small, tmp_path_factory):
    """A Norman-like GEARS file: 8 singles and 8 combos over 48 genes of real ifnb cells."""
    from scforge.testing.perturbation import gears_layout_adata

    means = np.asarray(ifnb_small.layers["lognorm"].mean(axis=0)).ravel()
    genes = [str(g) for g in ifnb_small.var_names[np.argsort(-means, kind="stable")[60:68]]]
    combos = [(genes[i], genes[j]) for i, j in [(0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7)]]
    adata = gears_layout_adata(ifnb_small, singles=genes, combos=combos, n_ctrl=120, n_per_condition=16, seed=0,
                               n_genes=48, n_targets=10)
    path = tmp_path_factory.mktemp("norman_like") / "perturb_processed.h5ad"
    adata.write_h5ad(path)
    return path


def _write(folder, config: dict, name: str = "bench.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(config))
    return path


def _gears_config(gears_file) -> dict:
    return {"task": "perturbation", "name": "norman-like", "output": "out",
            "dataset": {"path": str(gears_file)}, "split": {"kind": "simulation", "seeds": [1]},
            "baselines": BASELINES, "models": {"scratch": SCRATCH}, "training": TRAINING}


def _means(adata: ad.AnnData, label: str) -> np.ndarray:
    x = adata.X[np.flatnonzero(adata.obs["condition"].astype(str) == label)].astype(np.float64)
    return np.asarray(x.mean(axis=0)).ravel()


@pytest.fixture(scope="module")
def gears_run(gears_file, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    path = _write(folder, _gears_config(gears_file))
    assert main(["bench", str(path), "--quiet"]) == 0
    return path, folder / "out"


def test_gears_bench_writes_tidy_results_summary_and_report(gears_run, gears_file):
    _, out = gears_run
    for name in ("results.csv", "results.parquet", "summary.csv", "report.html", "config.json"):
        assert (out / name).is_file(), name
    results = pd.read_parquet(out / "results.parquet")
    assert list(results.columns) == ["dataset", "method", "kind", "condition", "context", "subgroup", "seed", "metric",
                                     "value", "fallback"]
    split = simulation_split(read_gears(gears_file), seed=1)
    metrics = sorted(results.metric.unique())
    assert {"pearson_delta", "pearson_delta_de", "mse", "l2_top48", "pearson_delta_top20_de_non_dropout"} <= set(metrics)
    methods = [*BASELINES, "scratch"]
    # one row per method x test condition x metric, and nothing else
    assert len(results) == len(methods) * len(split.test) * len(metrics)
    assert not results.duplicated(["method", "condition", "metric"]).any()
    for method in methods:
        assert set(results.loc[results.method == method, "condition"]) == set(split.test)
    assert dict(zip(results.method, results.kind)) == {**{b: "baseline" for b in BASELINES}, "scratch": "model"}
    assert (results.dataset == "norman_like0").all() and (results.seed == 1).all() and results.context.isna().all()
    # subgroups come from the GEARS simulation split
    assert set(results.subgroup) <= {"combo_seen0", "combo_seen1", "combo_seen2", "unseen_single"}
    assert all(s == split.subgroup_of(c) for c, s in zip(results.condition, results.subgroup))
    # additive falls back exactly where a perturbed gene has no single among the fitted groups
    # (baselines fit on train + validation: they have no model selection)
    train_genes = {c.split("+")[0] for c in [*split.train, *split.val] if c.endswith("+ctrl")}
    add = results[(results.method == "additive") & (results.metric == "mse")]
    assert all(f == (not set(c.replace("+ctrl", "").split("+")) <= train_genes)
               for c, f in zip(add.condition, add.fallback))
    summary = pd.read_csv(out / "summary.csv")
    assert {"all", *results.subgroup} == set(summary.subgroup)
    report = (out / "report.html").read_text()
    assert report.count("data:image/png;base64,") == 1 and "scratch" in report and "additive (baseline)" in report
    assert "combo_seen1" in report and "<table>" in report and "src=\"http" not in report


def test_gears_bench_values_match_hand_computed_ones(gears_run, gears_file):
    _, out = gears_run
    results = pd.read_csv(out / "results.csv")
    adata = ad.read_h5ad(gears_file)
    ctrl = _means(adata, "ctrl")
    split = simulation_split(read_gears(gears_file), seed=1)
    cond = split.test[0]
    row = results[(results.method == "no_change") & (results.condition == cond) & (results.metric == "mse")]
    assert row.value.item() == pytest.approx(np.mean((ctrl - _means(adata, cond)) ** 2), rel=1e-9)
    seen = [c for c in split.test_subgroup["combo_seen2"] + split.test_subgroup["combo_seen1"]
            if all(f"{g}+ctrl" in split.train for g in c.split("+"))]
    assert seen, "the split should test a combo of two trained singles"
    a, b = seen[0].split("+")
    additive = ctrl + (_means(adata, f"{a}+ctrl") - ctrl) + (_means(adata, f"{b}+ctrl") - ctrl)
    truth = _means(adata, seen[0])
    row = results[(results.method == "additive") & (results.condition == seen[0]) & (results.metric == "pearson_delta")]
    assert row.value.item() == pytest.approx(np.corrcoef(additive - ctrl, truth - ctrl)[0, 1], rel=1e-9)


def test_rerun_recomputes_nothing_and_a_changed_setting_recomputes_only_its_unit(gears_run, monkeypatch, capsys):
    import scforge.baselines.perturbation as baselines_module
    import scforge.bench.perturbation as bench_module
    from scforge.tasks.perturb import PerturbationModel

    path, out = gears_run
    before = pd.read_csv(out / "results.csv")

    def boom(*args, **kwargs):
        raise AssertionError("a finished unit was recomputed")

    monkeypatch.setattr(PerturbationModel, "fit", boom)
    monkeypatch.setattr(baselines_module, "make_baseline", boom)
    monkeypatch.setattr(bench_module, "_load_data", boom)
    capsys.readouterr()
    assert main(["bench", str(path), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["computed"] == 0 and report["reused"] == 4 and report["rows"] == len(before)
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), before)
    # a new training setting is a new unit for the model only; the baselines' parts are reused
    monkeypatch.undo()
    monkeypatch.setattr(baselines_module, "make_baseline", boom)
    config = yaml.safe_load(path.read_text())
    config["training"]["lr"] = 1e-3
    path.write_text(yaml.safe_dump(config))
    assert main(["bench", str(path), "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["computed"] == 1 and report["reused"] == 3
    assert len(list((out / "parts").glob("scratch-seed1-*.csv"))) == 2


def test_anndata_context_split_with_gene_subset(ifnb_small, tmp_path):
    """Any h5ad: ifnb STIM vs CTRL per cell type, CD14 Mono held out, 200 most variable genes + IFNB1."""
    keep = ifnb_small.obs["seurat_annotations"].astype(str) != "Eryth"  # Eryth has no control cells
    small = ad.AnnData(X=ifnb_small.X[keep.to_numpy()], obs=ifnb_small.obs.loc[keep, ["stim", "seurat_annotations"]],
                       var=pd.DataFrame(index=ifnb_small.var_names),
                       layers={"lognorm": ifnb_small.layers["lognorm"][keep.to_numpy()]})
    small.write_h5ad(tmp_path / "ifnb.h5ad")
    config = {"task": "perturbation", "output": "out",
              "dataset": {"path": "ifnb.h5ad", "format": "anndata", "perturbation_key": "stim", "control": "CTRL",
                          "context_key": "seurat_annotations", "layer": "lognorm",
                          "perturbation_genes": {"STIM": ["IFNB1"]}, "genes": 200},
              "split": {"kind": "context", "contexts": ["CD14 Mono"], "seeds": [0], "val_fraction": 0.0},
              "baselines": ["no_change", "linear_context", "train_mean_delta"]}
    path = _write(tmp_path, config, "ifnb.yaml")
    results = run_perturbation_bench(path, say=None)
    assert set(results.context) == {"CD14 Mono"} and set(results.condition) == {"STIM"}
    assert set(results.subgroup) == {"single"} and set(results.dataset) == {"ifnb"}
    x = sp.csr_matrix(small.layers["lognorm"])
    var = np.asarray(x.multiply(x).mean(axis=0)).ravel() - np.asarray(x.mean(axis=0)).ravel() ** 2
    kept = set(np.argsort(-var, kind="stable")[:200]) | {int(np.flatnonzero(small.var_names == "IFNB1")[0])}
    assert f"l2_top{len(kept)}" in set(results.metric)
    # the STIM response carries over to a new cell type (measured: mse 0.58 vs 1.76, Pearson delta 0.87)
    mse = results[results.metric == "mse"].set_index("method")["value"]
    assert mse["linear_context"] < 0.5 * mse["no_change"]
    r = results[(results.metric == "pearson_delta") & (results.method == "linear_context")]["value"].item()
    assert r > 0.8
    assert results.attrs["reused"] == [] and len(results.attrs["computed"]) == 3


def test_gene_subset_of_a_gears_file_keeps_perturbed_genes_and_valid_rankings(gears_file, tmp_path):
    from scforge.bench.perturbation import _load_data
    from scforge.data.perturbation import rank_de_genes

    config = load_perturbation_config(_write(tmp_path, {**_gears_config(gears_file),
                                                        "dataset": {"path": str(gears_file), "genes": 20}}))
    data = _load_data(config.dataset)
    perturbed = {g for genes in data.perturbation_genes.values() for g in genes}
    assert perturbed <= set(data.gene_names) and data.n_genes == len(set(data.gene_names)) <= 20 + len(perturbed)
    assert "top_non_dropout_de_20" not in data.adata.uns  # stale top-20 lists are recomputed on the kept genes
    fresh = rank_de_genes(data)
    for group in data.groups:
        np.testing.assert_array_equal(data.de_ranking(*group), fresh[group])


def test_go_baselines_and_a_scgenept_model_use_go_dir(gears_file, shared_data, tmp_path, monkeypatch):
    monkeypatch.setenv("SCFORGE_SHARED_DATA", str(shared_data))
    config = {**_gears_config(gears_file), "baselines": ["knn_go", "rf_go"], "go_dir": "shared:genes/go",
              "models": {"scgenept": {**SCRATCH, "model_type": "scgenept_go_c", "text_style": "concat"}}}
    results = run_perturbation_bench(_write(tmp_path, config), say=None, report=False)
    assert dict(zip(results.method, results.kind)) == {"knn_go": "baseline", "rf_go": "baseline", "scgenept": "model"}
    split = simulation_split(read_gears(gears_file), seed=1)
    for method in ("knn_go", "rf_go", "scgenept"):
        values = results[(results.method == method) & (results.metric == "mse")]
        assert set(values.condition) == set(split.test) and np.isfinite(values.value).all()
    assert not (tmp_path / "out" / "report.html").exists()
    assert list((tmp_path / "out" / "cache" / "text").glob("gene_text_*.safetensors"))  # GO-C texts, embedded once


@pytest.mark.parametrize(("change", "message"), [
    ({"colour": "red"}, r"unknown keys \['colour'\]"),
    ({"task": "annotation"}, "task: perturbation"),
    ({"split": {"kind": "random"}}, "split.kind='random'; choose one of simulation, heldout, context"),
    ({"split": {"kind": "simulation", "test_fraction": 0.3}}, r"split \(kind simulation\): unknown keys"),
    ({"split": {"kind": "heldout", "test_fraction": 1.5}}, r"split.test_fraction must be a number in \(0, 1\)"),
    ({"split": {"kind": "context"}}, "split.contexts must list"),
    ({"split": {"seeds": [1, 1]}}, "repeats a seed"),
    ({"baselines": ["additive", "magic"]}, "baselines='magic'; choose one of"),
    ({"baselines": ["rf_go"]}, "need go_dir"),
    ({"models": {"m": {"path": None, "d_model": 30, "n_heads": 4}}}, "models.m: d_model=30 is not divisible"),
    ({"models": {"m": {"path": None, "depth": 3}}}, r"models.m: unknown keys \['depth'\]"),
    ({"models": {"m": {"path": None, "model_type": "gpt4"}}}, "models.m.model_type='gpt4'"),
    ({"models": {"m": {"path": None, "model_type": "scgenept_go_c"}}}, "needs go_dir"),
    ({"models": {"additive": {"path": None}}}, "have the names of baselines"),
    ({"models": {"m": {"path": "nowhere/model"}}}, "models.m.path: .*nowhere.* not found"),
    ({"training": {"epochs": 0}}, "training.epochs must be an integer >= 1"),
    ({"training": {"precision": "int8"}}, "training.precision='int8'"),
    ({"dataset": {"path": "missing.h5ad"}}, "dataset.path: .*missing.h5ad not found"),
    ({"dataset": {"path": "x.h5ad", "format": "anndata"}}, "dataset.perturbation_key is required"),
    ({"dataset": {"path": "x.h5ad", "format": "gears", "layer": "counts"}}, "apply to format: anndata only"),
    ({"dataset": {"path": "x.h5ad", "genes": -5}}, "dataset.genes must be an integer >= 1"),
])
def test_config_errors_name_the_key_and_the_allowed_values(tmp_path, change, message):
    (tmp_path / "x.h5ad").write_text("")
    config = {"task": "perturbation", "dataset": {"path": "x.h5ad"}, **change}
    path = _write(tmp_path, config)
    with pytest.raises(ConfigError, match=message) as info:
        load_perturbation_config(path)
    assert str(info.value).startswith(str(path))


def test_config_defaults_and_toml(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "perturb_processed.h5ad").write_text("")
    (tmp_path / "bench.toml").write_text('task = "perturbation"\noutput = "res"\n[dataset]\npath = "data"\n'
                                         '[split]\nkind = "heldout"\nseeds = [0, 1]\n')
    config = load_perturbation_config(tmp_path / "bench.toml")
    assert config.dataset.path == tmp_path / "data" / "perturb_processed.h5ad" and config.dataset.name == "data"
    assert config.output == tmp_path / "res" and config.split.seeds == (0, 1) and config.split.test_fraction == 0.2
    assert config.baselines == ("no_change", "train_mean", "additive", "linear") and config.models == ()
    assert config.training.epochs == 15 and config.training.pool_size == 300 and config.training.lr == 1e-4


def test_cli_reports_config_errors_and_keeps_the_matrix_path(tmp_path, capsys):
    path = _write(tmp_path, {"task": "perturbation", "dataset": {"path": "nope.h5ad"}})
    assert main(["bench", str(path)]) == 2
    assert "dataset.path" in capsys.readouterr().err
    other = _write(tmp_path, {"task": "grn", "datasets": {}}, "other.yaml")
    assert main(["bench", str(other)]) == 2
    assert "task: perturbation" in capsys.readouterr().err
    matrix = _write(tmp_path, {"datasets": {}}, "matrix.yaml")
    assert main(["bench", str(matrix)]) == 2
    assert "'datasets' must map names" in capsys.readouterr().err
