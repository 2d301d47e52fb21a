"""Cell-type annotation: fine-tuning, linear probe, predict / evaluate, save / load, CLI (real ifnb cells)."""

from __future__ import annotations

import hashlib
import json
import logging

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from scforge.cli import main
from scforge.errors import CheckpointError, ConfigError, InputDataError
from scforge.genes.builtin import builtin_vocab
from scforge.models.scgpt import ScGPT
from scforge.tasks.annotate import Annotator, encode_labels, fine_tune, linear_probe

KEY = "cell_type"
EXCLUDED = "NK"  # left out of training, so it is "unseen" at prediction time
FAST = {"progress": False, "precision": "fp32"}


def _tiny(seed: int = 0, **config) -> ScGPT:
    torch.manual_seed(seed)
    base = {"d_model": 32, "n_layers": 1, "n_heads": 4, "d_hid": 48, "max_seq_len": 64}
    base.update(config)
    return ScGPT.new(builtin_vocab("scgpt-human"), **base)


def _with_labels(adata: ad.AnnData) -> ad.AnnData:
    out = adata.copy()
    out.obs[KEY] = out.obs["seurat_annotations"].astype(str).astype(object)
    return out


@pytest.fixture(scope="module")
def data(ifnb_small):
    """Training cells (first 160 without NK; 5 unlabelled) and query cells (the NK ones + 40 others)."""
    labels = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    first = np.arange(160)
    nk = first[labels[first] == EXCLUDED]
    assert nk.size > 0
    train = _with_labels(ifnb_small[np.setdiff1d(first, nk)])
    train.obs.iloc[[3, 10, 20, 40, 80], train.obs.columns.get_loc(KEY)] = np.nan
    query = _with_labels(ifnb_small[np.concatenate([nk, np.arange(160, 200)])])
    return train, query


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def tuned(data):
    train, _ = data
    model = _tiny()
    before = {"model": _state(model.module), "X": train.X.copy(), "obs": train.obs.copy(),
              "obsm": set(train.obsm), "uns": set(train.uns), "layers": set(train.layers)}
    ann = fine_tune(model, train, KEY, epochs=2, batch_size=32, lr=1e-3, **FAST)
    return ann, model, before


# ---- fine-tuning ----------------------------------------------------------------------------------
def test_fine_tune_trains_a_copy_and_leaves_inputs_alone(data, tuned):
    train, _ = data
    ann, model, before = tuned
    expected = sorted(set(train.obs[KEY].dropna()))
    assert ann.classes == expected and EXCLUDED not in ann.classes and ann.mode == "fine_tune"
    assert ann.label_key == KEY
    assert ann.info["n_unlabelled"] == 5
    assert ann.info["n_train_cells"] + ann.info["n_val_cells"] == train.n_obs - 5
    assert ann.info["n_val_cells"] > 0 and ann.validation is not None and ann.validation.n_cells == ann.info["n_val_cells"]
    assert "val/loss" in ann.metrics and ann.info["class_weights"] is None
    # a new model with its own classifier; the caller's model is untouched
    assert ann.model is not model and ann.model.module is not model.module
    assert ann.model.config.n_cls == len(expected) and model.config.n_cls == 1
    after = model.module.state_dict()
    assert all(torch.equal(before["model"][k], after[k]) for k in after)
    own = {p.data_ptr() for p in model.module.parameters()}
    assert not own & {p.data_ptr() for p in ann.model.module.parameters()}
    changed = [k for k, v in ann.model.module.state_dict().items()
               if k.startswith("transformer_encoder.") and not torch.equal(v, before["model"][k])]
    assert changed  # the backbone was trained, starting from the caller's weights
    # the caller's AnnData is unchanged
    assert (train.X != before["X"]).nnz == 0
    pd.testing.assert_frame_equal(train.obs, before["obs"])
    assert set(train.obsm) == before["obsm"] and set(train.uns) == before["uns"]
    assert set(train.layers) == before["layers"]


def test_predict_probabilities_keys_and_unseen(data, tuned, caplog):
    _, query = data
    ann, _, _ = tuned
    q = query.copy()
    x_before, obs_before = q.X.copy(), q.obs.copy()
    with caplog.at_level(logging.WARNING, logger="scforge"):
        proba = ann.predict(q, batch_size=16, progress=False)
    assert list(proba.columns) == ann.classes and list(proba.index) == list(q.obs_names)
    values = proba.to_numpy()
    assert values.shape == (q.n_obs, len(ann.classes)) and np.all(values >= 0)
    np.testing.assert_allclose(values.sum(1), 1.0, atol=1e-5)
    pred = q.obs[f"{KEY}_pred"]
    assert isinstance(pred.dtype, pd.CategoricalDtype) and list(pred.cat.categories) == ann.classes
    assert pred.astype(str).tolist() == [ann.classes[i] for i in values.argmax(1)]
    np.testing.assert_array_equal(q.obsm[f"{KEY}_proba"], values)
    assert q.uns["scforge"][f"{KEY}_proba_classes"] == ann.classes
    unseen = q.obs[f"{KEY}_unseen"].to_numpy()
    assert unseen.dtype == bool
    np.testing.assert_array_equal(unseen, ~q.obs[KEY].isin(ann.classes).to_numpy())
    assert unseen[q.obs[KEY].to_numpy() == EXCLUDED].all() and not unseen.all()
    assert any(EXCLUDED in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    # only the documented keys were added
    assert (q.X != x_before).nnz == 0
    pd.testing.assert_frame_equal(q.obs[obs_before.columns], obs_before)
    assert set(q.obs.columns) - set(obs_before.columns) == {f"{KEY}_pred", f"{KEY}_unseen"}
    # batch size does not change the result; key_added renames the keys; no label column -> no unseen key
    other = query.copy()
    del other.obs[KEY]
    again = ann.predict(other, key_added="ann", batch_size=64, progress=False)
    np.testing.assert_allclose(again.to_numpy(), values, atol=1e-5)
    assert {"ann_pred"} <= set(other.obs) and "ann_unseen" not in other.obs and "ann_proba" in other.obsm


def test_evaluate_scores_seen_cells_only(data, tuned):
    _, query = data
    ann, _, _ = tuned
    q = query.copy()
    report = ann.evaluate(q, progress=False)
    seen = q.obs[KEY].isin(ann.classes).to_numpy()
    assert report.n_cells == int(seen.sum())
    hits = q.obs[f"{KEY}_pred"].astype(str).to_numpy()[seen] == q.obs[KEY].to_numpy()[seen]
    assert report.accuracy == pytest.approx(hits.mean())
    assert set(report.labels) <= set(ann.classes)


def test_label_encoding_round_trips():
    labels = pd.Series([3, "b", None, 3, np.nan, "a", "b"], dtype=object)
    classes, codes, keep = encode_labels(labels, "x")
    assert classes == ["3", "a", "b"]
    np.testing.assert_array_equal(keep, [0, 1, 3, 5, 6])
    np.testing.assert_array_equal(codes, [0, 2, -1, 0, -1, 1, 2])
    assert [classes[c] for c in codes[keep]] == [str(v) for v in labels[keep]]


def test_label_errors_come_before_training(data):
    train, _ = data
    model = _tiny()
    one = train.copy()
    one.obs[KEY] = np.where(np.arange(one.n_obs) % 2 == 0, "B", None)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        fine_tune(model, one, KEY, **FAST)
    with pytest.raises(ConfigError, match="at least 2 classes"):
        linear_probe(model, one, KEY, progress=False)
    with pytest.raises(InputDataError, match="no column 'nope'"):
        fine_tune(model, train, "nope", **FAST)
    with pytest.raises(ConfigError, match="match no parameter"):
        fine_tune(model, train, KEY, freeze=("not_a_layer.",), **FAST)
    with pytest.raises(ConfigError, match="epochs"):
        fine_tune(model, train, KEY, epochs=0, **FAST)


def test_class_weights_inverse_frequency(data):
    train, _ = data
    small = train[:96].copy()
    ann = fine_tune(_tiny(1), small, KEY, epochs=1, batch_size=32, class_weights=True, val_fraction=0.0,
                    freeze=("encoder.",), **FAST)
    w = np.asarray(ann.info["class_weights"])
    counts = small.obs[KEY].value_counts().reindex(ann.classes).to_numpy()
    assert w.shape == (len(ann.classes),) and w.mean() == pytest.approx(1.0)
    np.testing.assert_allclose(w * counts, (w * counts)[0])  # proportional to 1 / count
    assert ann.validation is None and ann.info["n_val_cells"] == 0
    assert all(p.requires_grad for p in ann.model.module.parameters())
    np.testing.assert_allclose(ann.predict(small, progress=False).to_numpy().sum(1), 1.0, atol=1e-5)


# ---- linear probe ---------------------------------------------------------------------------------
def test_linear_probe_beats_chance_on_an_easy_pair(ifnb_small):
    """CD14 monocytes vs B cells. A random model's embedding carries the signal only faintly, so this
    uses a wider one (d=128) that averages its outputs over 500 genes per cell."""
    labels = ifnb_small.obs["seurat_annotations"].astype(str).to_numpy()
    mono, b = np.flatnonzero(labels == "CD14 Mono"), np.flatnonzero(labels == "B")
    train = _with_labels(ifnb_small[np.sort(np.concatenate([mono[:60], b[:60]]))])
    test = _with_labels(ifnb_small[np.sort(np.concatenate([mono[60:110], b[60:110]]))])
    model = _tiny(0, d_model=128, cell_emb_style="avg-pool")
    ann = linear_probe(model, train, KEY, max_length=500, val_fraction=0.0, progress=False)
    assert ann.mode == "linear_probe" and ann.classes == ["B", "CD14 Mono"] and ann.model is model
    report = ann.evaluate(test, progress=False)
    assert report.n_cells == 100
    assert report.accuracy >= 0.75 and report.macro_f1 >= 0.7  # chance: 0.5 (binomial p < 1e-6)
    assert KEY not in set(train.obsm) | set(train.uns.get("scforge", {}))  # nothing written to the training data


def test_linear_probe_unlabelled_cells_and_validation(data):
    train, query = data
    ann = linear_probe(_tiny(), train, KEY, val_fraction=0.2, progress=False)
    assert ann.info["n_unlabelled"] == 5 and ann.info["n_val_cells"] > 0
    assert ann.validation is not None and 0 <= ann.validation.accuracy <= 1
    proba = ann.predict(query.copy(), progress=False).to_numpy()
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)


# ---- save / load ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fine_tune", "linear_probe"])
def test_save_load_round_trip(mode, data, tuned, tmp_path):
    train, query = data
    ann = tuned[0] if mode == "fine_tune" else linear_probe(_tiny(), train, KEY, progress=False)
    expected = ann.predict(query.copy(), progress=False)
    path = ann.save(tmp_path / "annotator")
    files = {p.name for p in path.iterdir()}
    assert {"annotator.json", "config.json", "model.safetensors", "vocab.json"} <= files
    assert ("probe.npz" in files) == (mode == "linear_probe")
    loaded = Annotator.load(path)
    assert (loaded.mode, loaded.classes, loaded.label_key) == (mode, ann.classes, KEY)
    assert loaded.summary()["validation"] == ann.summary()["validation"]
    got = loaded.predict(query.copy(), progress=False)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    with pytest.raises(CheckpointError, match="not empty"):
        ann.save(path)
    ann.save(path, overwrite=True)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not an annotator folder"):
        ann.save(other, overwrite=True)
    with pytest.raises(CheckpointError, match="no annotator.json"):
        Annotator.load(other)


# ---- command line ---------------------------------------------------------------------------------
def _json(text: str) -> dict:
    lines = text.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


def test_cli_pretrain_finetune_predict(ifnb_small, tmp_path, capsys):
    data = tmp_path / "cells.h5ad"
    ifnb_small[:96].copy().write_h5ad(data)
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    model_dir, ann_dir, out = tmp_path / "model", tmp_path / "ann", tmp_path / "pred.h5ad"

    assert main(["pretrain", str(data), "--out", str(model_dir), "--layers", "1", "--width", "32", "--heads", "4",
                 "--ffn", "48", "--max-length", "64", "--objective", "mask", "--batch-size", "16",
                 "--max-steps", "3", "--warmup-steps", "1", "--precision", "fp32", "--no-progress"]) == 0
    summary = _json(capsys.readouterr().out)
    assert summary["written"] == str(model_dir) and (model_dir / "model.safetensors").is_file()

    args = ["finetune", str(data), "--model", str(model_dir), "--label-key", "seurat_annotations", "--out",
            str(ann_dir), "--epochs", "1", "--batch-size", "16", "--precision", "fp32", "--no-progress"]
    assert main(args) == 0
    summary = _json(capsys.readouterr().out)
    assert summary["mode"] == "fine_tune" and summary["validation"]["n_cells"] == summary["n_val_cells"] > 0
    assert summary["classes"] == sorted(set(ifnb_small.obs["seurat_annotations"][:96].astype(str)))
    assert main(args) == 2  # refuses to overwrite, before training
    assert "--overwrite" in capsys.readouterr().err

    assert main(["predict", str(data), "--model", str(ann_dir), "--out", str(out), "--no-progress"]) == 0
    summary = _json(capsys.readouterr().out)
    assert summary["cells"] == 96 and sum(summary["predicted"].values()) == 96
    assert summary["metrics"]["n_cells"] == 96 - summary["unseen_label_cells"]
    written = ad.read_h5ad(out)
    classes = Annotator.load(ann_dir).classes
    assert written.obsm["seurat_annotations_proba"].shape == (96, len(classes))
    assert list(written.uns["scforge"]["seurat_annotations_proba_classes"]) == classes
    assert written.obs["seurat_annotations_pred"].notna().all()
    np.testing.assert_allclose(written.obsm["seurat_annotations_proba"].sum(1), 1.0, atol=1e-5)
    assert hashlib.sha256(data.read_bytes()).hexdigest() == digest
    assert main(["predict", str(data), "--model", str(ann_dir), "--out", str(data)]) == 2
    assert "never overwrites" in capsys.readouterr().err

    probe_dir = tmp_path / "probe"
    assert main(["finetune", str(data), "--model", str(model_dir), "--label-key", "seurat_annotations", "--out",
                 str(probe_dir), "--mode", "linear_probe", "--no-progress"]) == 0
    assert _json(capsys.readouterr().out)["mode"] == "linear_probe"
    assert Annotator.load(probe_dir).mode == "linear_probe"
