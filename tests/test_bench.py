"""The experiment matrix: config, few-shot splits, the runner (cache, resume, rerun of what changed),
the tidy results table, the HTML report and ``scforge bench`` (real ifnb cells, tiny models)."""

from __future__ import annotations

import json
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scforge.bench import few_shot_splits, holdout_split, load_config, run_matrix, subsample, summarize
from scforge.bench import runner as runner_mod
from scforge.cli import main
from scforge.errors import ConfigError, InputDataError
from scforge.genes.builtin import builtin_vocab
from scforge.models.scgpt import ScGPT

LABELS = np.array(["B"] * 50 + ["T"] * 30 + ["NK"] * 12 + ["DC"] * 5 + ["Eryth"] * 2 + ["rare"] * 1)


# ---- splits -------------------------------------------------------------------------------------
def test_holdout_is_stratified_and_keeps_every_class_in_training():
    pool, test = holdout_split(LABELS, 0.2, seed=0)
    assert np.intersect1d(pool, test).size == 0 and pool.size + test.size == LABELS.size
    counts = pd.Series(LABELS[test]).value_counts()
    assert counts["B"] == 10 and counts["T"] == 6 and counts["NK"] == 2 and counts["DC"] == 1
    assert counts["Eryth"] == 1 and "rare" not in counts  # a single cell stays in training
    assert set(LABELS[pool]) == set(LABELS)


def test_few_shot_splits_are_stratified_nested_in_the_pool_and_reproducible():
    splits = few_shot_splits(LABELS, (0.1, 0.5, 1.0), (0, 1), test_size=0.2, split_seed=0)
    again = few_shot_splits(LABELS.tolist(), (0.1, 0.5, 1.0), (0, 1), test_size=0.2, split_seed=0)
    pool, test = holdout_split(LABELS, 0.2, 0)
    assert [(s.fraction, s.seed) for s in splits] == [(f, s) for f in (0.1, 0.5, 1.0) for s in (0, 1)]
    for s, t in zip(splits, again):
        assert np.array_equal(s.train, t.train) and np.array_equal(s.test, test)
        assert np.isin(s.train, pool).all()
        per_class = pd.Series(LABELS[s.train]).value_counts()
        pool_counts = pd.Series(LABELS[pool]).value_counts()
        for cls, n in pool_counts.items():  # round(f * n) per class, never fewer than one
            assert per_class[cls] == min(max(round(s.fraction * n), 1), n)
    full = [s for s in splits if s.fraction == 1.0]
    assert all(np.array_equal(s.train, pool) for s in full)
    a, b = (s.train for s in splits if s.fraction == 0.1)
    assert not np.array_equal(a, b)  # seeds draw different subsamples


def test_splits_refuse_bad_input():
    with pytest.raises(InputDataError, match="missing labels.*labelled cells"):
        holdout_split(np.array(["A", None, "B"], dtype=object))
    with pytest.raises(ConfigError, match="fractions"):
        subsample(LABELS, np.arange(10), 0.0, 0)
    with pytest.raises(ConfigError, match="test_size"):
        holdout_split(LABELS, 1.5)


# ---- config -------------------------------------------------------------------------------------
def test_yaml_and_toml_configs_agree_and_resolve_paths(tmp_path):
    (tmp_path / "d.h5ad").write_text("")
    (tmp_path / "a.yaml").write_text(
        "name: t\noutput: out\ndatasets:\n  d: {path: d.h5ad, label_key: cell_type, batch_key: stim}\n"
        "models:\n  m: {path: default}\nmodes: [knn, fine_tune]\nseeds: [0, 1]\nfractions: [0.5, 1]\n"
        "training: {epochs: 1}\nintegration: true\nlogistic_C: cv\n")
    (tmp_path / "a.toml").write_text(
        'name = "t"\noutput = "out"\nmodes = ["knn", "fine_tune"]\nseeds = [0, 1]\nfractions = [0.5, 1]\n'
        'integration = true\nlogistic_C = "cv"\n[datasets.d]\npath = "d.h5ad"\nlabel_key = "cell_type"\n'
        'batch_key = "stim"\n[models.m]\npath = "default"\n[training]\nepochs = 1\n')
    a, b = load_config(tmp_path / "a.yaml"), load_config(tmp_path / "a.toml")
    assert a == b
    assert a.output == tmp_path / "out" and a.datasets[0].path == tmp_path / "d.h5ad"
    assert a.fractions == (0.5, 1.0) and a.training.epochs == 1 and a.logistic_C == "cv"
    assert a.cache_dir == tmp_path / "out" / "cache"


@pytest.mark.parametrize("text, match", [
    ("datasets: {}\n", "datasets"),
    ("datasets: {d: {path: x.h5ad}}\n", "label_key"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nmodes: [zero]\nmodels: {m: default}\n", "unknown mode"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nfractions: [0, 1]\n", "fractions"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nspeed: fast\n", "unknown keys"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\ntraining: {epoch: 2}\n", "training takes"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nintegration: true\n", "batch_key"),
    ("datasets: {pca: {path: x.h5ad, label_key: y}}\n", "reserved"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nintegration_finetune: {epoch: 2}\n", "integration_finetune takes"),
    ("datasets: {d: {path: x.h5ad, label_key: y}}\nintegration_finetune: {mask_ratio: 2}\n", "mask_ratio"),
    ("datasets: [\n", "not valid YAML"),
])
def test_bad_configs_get_clear_errors(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_shared_dataset_names_resolve(tmp_path, shared_data):
    path = tmp_path / "c.yaml"
    path.write_text("datasets: {ifnb: {path: 'shared:ifnb_sub_2000'}}\n")
    d = load_config(path).datasets[0]
    assert d.path == shared_data / "ifnb" / "ifnb_sub_2000.h5ad"
    assert (d.label_key, d.batch_key) == ("seurat_annotations", "stim")


# ---- the runner on real cells ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def workspace(ifnb_small, tmp_path_factory):
    """300 ifnb cells (20 unlabelled) in an .h5ad and a tiny scGPT model folder."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(0)
    keep = np.sort(rng.choice(ifnb_small.n_obs, 300, replace=False))
    sub = ifnb_small[keep].copy()
    genes = np.asarray(sub.X.sum(0)).ravel() > 0
    sub = sub[:, genes].copy()
    sub.obs["cell_type"] = sub.obs["seurat_annotations"].astype(str).astype(object)
    sub.obs.iloc[rng.choice(300, 20, replace=False), sub.obs.columns.get_loc("cell_type")] = np.nan
    sub.write_h5ad(root / "cells.h5ad")
    torch.manual_seed(0)
    ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_layers=1, n_heads=4, d_hid=48,
              max_seq_len=64).save(root / "tiny")
    return root


def _config(root, name: str, extra: str = "") -> str:
    path = root / f"{name}.yaml"
    path.write_text(
        f"name: {name}\noutput: {name}-out\ncache: cache\n"
        "datasets:\n  cells: {path: cells.h5ad, label_key: cell_type, batch_key: stim}\n"
        "models:\n  tiny: {path: tiny, max_length: 64}\n"
        "seeds: [0, 1]\nfractions: [0.5, 1.0]\nn_pcs: 20\nn_top_genes: 500\numap: false\n" + extra)
    return str(path)


@pytest.fixture(scope="module")
def first_run(workspace):
    calls: list[str] = []
    path = _config(workspace, "m", "modes: [knn, linear_probe]\nbaselines: [logistic_l1, pca_knn, pca_logistic]\n")
    run = run_matrix(path, log=calls.append, report=False)
    return path, run, calls


def test_matrix_gives_one_tidy_row_per_unit_and_metric(first_run, workspace):
    _, run, _ = first_run
    r = run.results
    assert {"dataset", "method", "kind", "mode", "seed", "fraction", "metric", "value"} <= set(r.columns)
    methods = {(m, mode) for m, mode in zip(r.method, r["mode"])}
    assert methods == {("logistic_l1", "baseline"), ("pca_knn", "baseline"), ("pca_logistic", "baseline"),
                       ("tiny", "knn"), ("tiny", "linear_probe")}
    assert len(run.computed) == 5 * 2 * 2 and not run.reused
    per_unit = r.groupby(["method", "mode", "seed", "fraction"]).metric.apply(sorted)
    assert all(m == sorted(["accuracy", "macro_f1", "precision", "recall", "kappa", "seconds"]) for m in per_unit)
    # 280 labelled cells: 20% stratified test, the same test cells for every method
    cells = ad.read_h5ad(workspace / "cells.h5ad")
    y = cells.obs.cell_type.dropna().astype(str).to_numpy()
    splits = few_shot_splits(y, (0.5, 1.0), (0, 1))
    assert set(r.n_test) == {splits[0].test.size} and 50 <= splits[0].test.size <= 62
    for s in splits:
        assert set(r[(r.fraction == s.fraction) & (r.seed == s.seed)].n_train) == {s.train.size}
    on_disk = pd.read_parquet(run.files["parquet"])
    pd.testing.assert_frame_equal(on_disk, r, check_dtype=False)
    assert pd.read_csv(run.files["csv"]).shape == r.shape
    assert json.loads(run.files["config"].read_text())["name"] == "m"


def test_matrix_scores_equal_direct_calls(first_run, workspace):
    """The L1 baseline row equals fitting the baseline by hand on the same split."""
    from scforge.baselines import LogisticBaseline
    from scforge.metrics import classification_metrics

    _, run, _ = first_run
    cells = ad.read_h5ad(workspace / "cells.h5ad")
    lab = cells[cells.obs.cell_type.notna().to_numpy()].copy()
    y = lab.obs.cell_type.astype(str).to_numpy()
    split = next(s for s in few_shot_splits(y, (0.5, 1.0), (0, 1)) if s.fraction == 0.5 and s.seed == 1)
    base = LogisticBaseline(C=0.1, seed=1).fit(lab[split.train], y[split.train])
    want = classification_metrics(y[split.test], base.predict(lab[split.test]),
                                  labels=sorted(set(y[split.train]) | set(y[split.test])))
    r = run.results
    got = r[(r.method == "logistic_l1") & (r.seed == 1) & (r.fraction == 0.5)].set_index("metric").value
    assert got["accuracy"] == pytest.approx(want.accuracy) and got["macro_f1"] == pytest.approx(want.macro_f1)
    assert got["accuracy"] > 0.7  # real signal on real cells


def test_rerun_reuses_everything_and_recomputes_only_what_changed(first_run, workspace):
    path, run, _ = first_run
    again = run_matrix(path, log=None, report=False)
    assert not again.computed and len(again.reused) == len(run.computed)
    pd.testing.assert_frame_equal(again.results, run.results)
    changed = _config(workspace, "m", "modes: [knn, linear_probe]\nbaselines: [logistic_l1, pca_knn, pca_logistic]\n"
                      "n_neighbors: 5\n")
    third = run_matrix(changed, log=None, report=False)
    # only the kNN units depend on n_neighbors: pca_knn and tiny/knn, 2 seeds x 2 fractions each
    assert len(third.computed) == 8 and len(third.reused) == 12


def test_crashed_run_resumes_without_redoing_finished_units(workspace, monkeypatch):
    path = _config(workspace, "crash", "modes: [knn]\nbaselines: [pca_knn]\n")
    real = runner_mod._Runner.run_unit
    done: list[str] = []

    def flaky(self, unit):
        if len(done) == 3:
            raise KeyboardInterrupt("power cut")
        done.append(unit.label)
        return real(self, unit)

    monkeypatch.setattr(runner_mod._Runner, "run_unit", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_matrix(path, log=None, report=False)
    monkeypatch.setattr(runner_mod._Runner, "run_unit", real)
    resumed = run_matrix(path, log=None, report=False)
    assert len(resumed.reused) == 3 and len(resumed.computed) == 5
    fresh = run_matrix(path, log=None, report=False, fresh=True)
    cols = ["method", "mode", "seed", "fraction", "metric"]
    a = resumed.results[resumed.results.metric != "seconds"].sort_values(cols).reset_index(drop=True)
    b = fresh.results[fresh.results.metric != "seconds"].sort_values(cols).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)  # same seed, same numbers: resuming changes nothing


def test_a_model_folder_fingerprint_ignores_its_card_but_not_its_weights(tmp_path):
    from scforge.bench.cache import fingerprint

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights-v1")
    (folder / "config.json").write_text('{"d_model": 8}')
    (folder / "card.md").write_text("# a model")
    memo = tmp_path / "memo.json"
    first = fingerprint(folder, memo)
    (folder / "card.md").write_text("# a model\n\nNow with results.")
    assert fingerprint(folder, memo) == first == fingerprint(folder)  # documentation only
    (folder / "model.safetensors").write_bytes(b"weights-v2")
    assert fingerprint(folder, memo) != first
    (folder / "config.json").write_text('{"d_model": 16}')
    second = fingerprint(folder)
    assert second != first and fingerprint(folder / "card.md") != fingerprint(folder / "config.json")


def test_embeddings_are_cached_by_model_and_dataset(first_run, workspace):
    notes = [json.loads(p.read_text()) for p in (workspace / "cache" / "embeddings").glob("*.json")]
    names = sorted(n["name"] for n in notes)
    assert names == ["pca", "tiny"]
    tiny = next(n for n in notes if n["name"] == "tiny")
    assert tiny["shape"] == [300, 32] and len(tiny["model"]) == 64 and len(tiny["data"]) == 64


def test_training_modes_integration_and_report(workspace):
    path = _config(workspace, "full", "modes: [fine_tune, no_pretraining, no_pretraining_frozen]\n"
                   "baselines: [pca_knn]\nseeds: [0]\nfractions: [1.0]\ntraining: {epochs: 1, batch_size: 64}\n"
                   "integration: true\nintegration_finetune: {epochs: 1, n_hvg: 48, batch_size: 32}\n")
    run = run_matrix(path, log=None)
    r = run.results
    ann = r[r.task == "annotation"]
    assert set(ann["mode"]) == {"baseline", "fine_tune", "no_pretraining", "no_pretraining_frozen"}
    assert ann.value.notna().all()
    integ = r[r.task == "integration"]
    assert set(integ.method) == {"pca", "harmony", "tiny"}
    assert set(integ[integ.method == "tiny"]["mode"]) == {"zero_shot", "fine_tune"}  # scGPT's integration recipe
    tuned = integ[(integ.method == "tiny") & (integ["mode"] == "fine_tune")].set_index("metric")["value"]
    assert {"avg_bio", "avg_batch", "ilisi"} <= set(tuned.index) and tuned.notna().all()
    integ = integ[integ["mode"] != "fine_tune"]
    wide = integ.pivot_table(index="method", columns="metric", values="value")
    assert {"nmi", "ari", "avg_bio", "avg_batch", "ilisi", "kbet", "graph_connectivity"} <= set(wide.columns)
    assert wide.loc["pca", "avg_bio"] > wide.loc["tiny", "avg_bio"]  # an untrained tiny model is no match for PCA
    # labelled cells only: 280
    assert set(integ.n_test) == {280}
    html = run.files["report"].read_text()
    assert "<table" in html and "scib" in html and "fine_tune" in html


def test_summarize_gives_t_intervals():
    rows = pd.DataFrame({"dataset": "d", "method": "m", "kind": "model", "mode": "knn", "fraction": 1.0,
                         "metric": "accuracy", "seed": [0, 1, 2], "value": [0.5, 0.6, 0.7], "task": "annotation"})
    s = summarize(rows).iloc[0]
    assert s["mean"] == pytest.approx(0.6) and s["n"] == 3
    assert s["ci95"] == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)


def test_report_draws_curves_bars_and_umaps(first_run, workspace, tmp_path):
    from scforge.bench import write_report

    _, run, _ = first_run
    rng = np.random.default_rng(0)
    emb = {"a": rng.normal(size=(120, 8)).astype(np.float32), "b": rng.normal(size=(120, 8)).astype(np.float32)}
    labels = np.array(["x", "y", None] * 40, dtype=object)
    out = write_report(run.results, tmp_path / "r.html", title="t",
                       embeddings={"cells": {"embeddings": emb, "labels": labels, "batches": np.array(["p", "q"] * 60)}})
    html = out.read_text()
    assert html.count("data:image/png;base64") == 3  # few-shot curves, bars, UMAP grid
    assert "L1 logistic regression" in html and "tiny · knn" in html


def test_cli_bench_runs_and_reports(workspace, capsys):
    path = _config(workspace, "cli", "modes: [knn]\nbaselines: [pca_knn]\nseeds: [0]\nfractions: [1.0]\n")
    assert main(["bench", path, "--no-report", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["computed"] == 2 and out["rows"] == 12
    assert main(["bench", str(workspace / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_missing_label_column_is_a_clear_error(workspace):
    path = workspace / "bad.yaml"
    path.write_text("output: bad-out\ndatasets:\n  cells: {path: cells.h5ad, label_key: celltype}\numap: false\n")
    with pytest.raises(InputDataError, match="no column 'celltype'"):
        run_matrix(path, log=None)


def test_train_seeds_limit_only_the_training_modes(workspace):
    from scforge.bench.runner import _Runner

    path = _config(workspace, "ts", "modes: [knn, fine_tune, no_pretraining]\nbaselines: [pca_knn]\n"
                   "seeds: [0, 1, 2]\ntrain_seeds: [1]\ntrain_fractions: [1.0]\n")
    units, _ = _Runner(load_config(path), lambda m: None).units()
    seen = {}
    for u in units:
        seen.setdefault(u.mode, set()).add((u.seed, u.fraction))
    every = {(s, f) for s in (0, 1, 2) for f in (0.5, 1.0)}
    assert seen == {"baseline": every, "knn": every, "fine_tune": {(1, 1.0)}, "no_pretraining": {(1, 1.0)}}
    bad = _config(workspace, "ts2", "seeds: [0]\ntrain_seeds: [3]\n")
    with pytest.raises(ConfigError, match="subset"):
        load_config(bad)


def test_a_model_can_read_only_the_datasets_hvgs(workspace):
    """``n_hvg``: the model embeds and trains on the dataset's HVGs; the cache keys tell the two apart."""
    from scforge.baselines import highly_variable_genes
    from scforge.bench.runner import _Runner

    path = _config(workspace, "hvg", "modes: [knn, fine_tune]\nbaselines: []\nseeds: [0]\nfractions: [1.0]\n"
                   "training: {epochs: 1, batch_size: 64}\n")
    path_hvg = workspace / "hvg2.yaml"
    path_hvg.write_text(open(path).read().replace("max_length: 64}", "max_length: 64, n_hvg: 300}")
                        .replace("hvg-out", "hvg2-out"))
    runner = _Runner(load_config(path_hvg), lambda m: None)
    ds = runner.dataset(runner.config.datasets[0])
    spec = runner.config.models[0]
    assert spec.n_hvg == 300
    cells = ad.read_h5ad(workspace / "cells.h5ad")
    np.testing.assert_array_equal(runner.model_genes(ds, spec), np.flatnonzero(highly_variable_genes(cells, 300)))
    emb = runner.model_embedding(ds, spec)
    plain = _Runner(load_config(path), lambda m: None)
    full = plain.model_embedding(plain.dataset(plain.config.datasets[0]), plain.config.models[0])
    assert emb.shape == full.shape and not np.allclose(emb, full)  # a different input, a different cache entry
    want = runner_mod.embed_cells(runner.model(spec), cells[:, runner.model_genes(ds, spec)].copy(),
                                  batch_size=64, max_length=64)
    np.testing.assert_allclose(emb, want, rtol=1e-4, atol=1e-5)
    r = run_matrix(str(path_hvg), log=None, report=False).results
    tuned = r[(r["mode"] == "fine_tune") & (r.metric == "accuracy")]
    assert len(tuned) == 1 and 0 < tuned.value.iloc[0] <= 1
    bad = workspace / "hvg3.yaml"
    bad.write_text(open(path).read().replace("max_length: 64}", "max_length: 64, n_hvg: 0}"))
    with pytest.raises(ConfigError, match="n_hvg"):
        load_config(bad)


def test_sccello_runs_in_every_annotation_mode(workspace):
    """scCello takes part in the matrix like the other families: embedding modes and training modes."""
    from scforge.models.sccello import ScCello

    ScCello.new(["CL:0000236", "CL:0000576"], seed=0, num_hidden_layers=1, hidden_size=32, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=64).save(workspace / "cello", overwrite=True)
    path = workspace / "cello.yaml"
    path.write_text(
        "name: cello\noutput: cello-out\ncache: cache\n"
        "datasets:\n  cells: {path: cells.h5ad, label_key: cell_type}\n"
        "models:\n  cello: {path: cello, max_length: 64}\n"
        "modes: [knn, linear_probe, fine_tune, no_pretraining]\nbaselines: []\n"
        "seeds: [0]\nfractions: [1.0]\nn_pcs: 20\nn_top_genes: 500\numap: false\n"
        "training: {epochs: 1, batch_size: 64}\n")
    r = run_matrix(str(path), log=None, report=False).results
    ann = r[(r.task == "annotation") & (r.method == "cello")]
    assert set(ann["mode"]) == {"knn", "linear_probe", "fine_tune", "no_pretraining"}
    assert ann.value.notna().all() and (ann[ann.metric == "accuracy"].value > 0).all()
