"""Fine-pruning of fine-tuned classifiers, and the fine-pruning defence of run_attack (tiny scGPT, real cells)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError
from scforge.genes.builtin import builtin_vocab
from scforge.models.scgpt import ScGPT
from scforge.security import ModelVictim, fine_prune, run_attack
from scforge.security.defend import classifier_layer
from scforge.tasks.annotate import fine_tune

KEY = "seurat_annotations"
FAST = {"progress": False, "precision": "fp32"}


def _tiny(seed: int = 0) -> ScGPT:
    torch.manual_seed(seed)
    return ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_layers=1, n_heads=4, d_hid=48, max_seq_len=64)


@pytest.fixture(scope="module")
def cells(ifnb_small):
    sub = ifnb_small[np.r_[0:150, 1000:1150]].copy()
    labels = sub.obs[KEY].astype(str)
    keep = labels.map(labels.value_counts()).to_numpy() >= 8
    return sub[keep].copy()


@pytest.fixture(scope="module")
def annotator(cells):
    return fine_tune(_tiny(), cells, KEY, epochs=2, batch_size=32, lr=1e-3, seed=0, **FAST)


def _activity(ann, cells, layer):
    acts = []
    handle = layer.register_forward_pre_hook(lambda m, i: acts.append(i[0].detach().abs().reshape(-1, layer.in_features)))
    try:
        backend = ann.backend
        backend.proba(backend.tokenize(cells, None, ann.settings, False), precision="fp32")
    finally:
        handle.remove()
    return torch.cat(acts).double().mean(0).numpy()


def test_prune_only_zeroes_the_least_active_units_and_leaves_the_original(annotator, cells):
    before = {k: v.clone() for k, v in annotator.model.module.state_dict().items()}
    pruned = fine_prune(annotator, cells, KEY, fraction=0.25, epochs=0)
    for k, v in annotator.model.module.state_dict().items():
        assert torch.equal(v, before[k]), k
    name, lin = classifier_layer(pruned.model.module, len(pruned.classes))
    assert name.startswith("cls_decoder")
    info = pruned.info["fine_pruning"]
    activity = _activity(annotator, cells, classifier_layer(annotator.model.module, len(annotator.classes))[1])
    expected = np.sort(np.argsort(activity, kind="stable")[: round(0.25 * lin.in_features)])
    assert info["units"] == expected.tolist() and info["n_pruned"] == expected.size
    w = lin.weight.detach()
    assert torch.all(w[:, expected] == 0) and torch.any(w[:, np.setdiff1d(np.arange(lin.in_features), expected)] != 0)
    assert pruned.predict(cells.copy(), progress=False).shape == (cells.n_obs, len(annotator.classes))


def test_fine_pruning_retrains_and_keeps_pruned_units_at_zero(annotator, cells):
    pruned = fine_prune(annotator, cells, KEY, fraction=0.5, epochs=1, lr=1e-3)
    _, lin = classifier_layer(pruned.model.module, len(pruned.classes))
    units = pruned.info["fine_pruning"]["units"]
    assert torch.all(lin.weight.detach()[:, units] == 0)
    other = [n for n in annotator.model.module.state_dict() if n.startswith("transformer")][0]
    assert not torch.equal(pruned.model.module.state_dict()[other], annotator.model.module.state_dict()[other])
    with pytest.raises(ConfigError, match="fraction"):
        fine_prune(annotator, cells, KEY, fraction=1.5)


def test_run_attack_with_the_fine_pruning_defence(cells):
    victim = ModelVictim(_tiny(), epochs=1, lr=1e-3, batch_size=32, precision="fp32")
    res = run_attack(cells, KEY, "B", victim=victim, rate=0.05, defence="fine_prune", trusted_fraction=0.3, seed=0)
    w = res.wide()
    assert list(w.index) == ["clean", "poisoned", "defended"] and w.loc["defended", "n_trusted"] > 0
    assert 0.0 <= w.loc["defended", "asr"] <= 1.0
    with pytest.raises(ConfigError, match="model victim"):
        run_attack(cells, KEY, "B", victim="logistic", defence="fine_prune")


def test_audit_with_a_fine_tuned_annotator_groups_by_its_predictions(annotator, cells):
    from scforge.security import audit

    obs_before = cells.obs.copy()
    table = audit(cells, KEY, model=annotator, detectors=("level", "spectral", "clusters"))
    assert set(table["model_group"]) <= set(annotator.classes)
    assert np.isfinite(table["spectral_z"]).all() and list(table.index) == list(cells.obs_names)
    assert list(cells.obs.columns) == list(obs_before.columns)  # nothing written into the caller's AnnData
