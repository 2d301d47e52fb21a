"""``fit_module``: the family-agnostic engine path (TrainingModule + a seeded collate function) on
real cells: learns, repeats with the same seed, resumes exactly, stratifies and checks its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError
from scforge.train import OptimConfig, TrainConfig, TrainingModule, batch_seed, fit_module


class _Probe(TrainingModule):
    """A linear classifier on fixed per-cell features; input dropout drawn by the collator."""

    def compute_losses(self, batch):
        logits = self.model(batch["x"])
        return torch.nn.functional.cross_entropy(logits, batch["labels"]), {"ce": torch.nn.functional.cross_entropy(
            logits, batch["labels"]).detach()}

    def validation_metrics(self, batch):
        return {"accuracy": (self.model(batch["x"]).argmax(-1) == batch["labels"]).float().mean()}


class _Collate:
    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.x, self.y, self.seed = x, y, seed
        self.seen: list[int] = []

    def __call__(self, items):
        idx = np.asarray([i for _, i in items])
        rng = np.random.default_rng(batch_seed(self.seed, items[0][0], int(idx[0]), idx.size))
        keep = rng.random((idx.size, self.x.shape[1])) > 0.1
        self.seen.extend(idx.tolist())
        return {"x": torch.from_numpy((self.x[idx] * keep).astype(np.float32)),
                "labels": torch.from_numpy(self.y[idx]), "cells": torch.from_numpy(idx)}


@pytest.fixture(scope="module")
def features(ifnb_small):
    import scanpy as sc

    a = ifnb_small[:600].copy()
    sc.pp.normalize_total(a, target_sum=1e4)
    sc.pp.log1p(a)
    sc.pp.highly_variable_genes(a, n_top_genes=300, subset=True)
    x = np.asarray(a.X.todense(), dtype=np.float32)
    classes, y = np.unique(a.obs["seurat_annotations"].astype(str), return_inverse=True)
    return (x - x.mean(0)) / (x.std(0) + 1e-3), y.astype(np.int64), len(classes)


def _module(features, seed=0, total_steps=None):
    torch.manual_seed(seed)
    x, _, k = features
    return _Probe(torch.nn.Linear(x.shape[1], k), OptimConfig(lr=2e-2, warmup_steps=2, schedule="cosine"),
                  total_steps=total_steps)


def _cfg(**kw):
    base = dict(max_epochs=5, batch_size=64, val_fraction=0.2, precision="fp32", progress=False, seed=3,
                accelerator="cpu")
    return TrainConfig(**{**base, **kw})


def test_fit_module_learns_and_repeats(features):
    x, y, _ = features
    runs = []
    for _ in range(2):
        collate = _Collate(x, y, seed=3)
        result = fit_module(_module(features), collate, len(y), config=_cfg(), labels=y)
        runs.append((result, collate))
    (a, ca), (b, _) = runs
    assert a.metrics["val/accuracy"] > 0.6, a.metrics  # 13 PBMC types from 300 HVGs
    assert a.metrics["val/loss"] < np.log(len(np.unique(y)))
    for pa, pb in zip(a.module.model.parameters(), b.module.model.parameters()):
        assert torch.equal(pa, pb)
    assert np.unique(ca.seen).size == len(y)  # training and validation batches together cover every cell


def test_fit_module_resume_is_exact(features, tmp_path):
    x, y, _ = features
    steps = 4 * 10  # the schedule spans the full run in all three (600 cells, batches of 64)
    straight = fit_module(_module(features, total_steps=steps), _Collate(x, y, 3), len(y), config=_cfg(max_epochs=4, val_fraction=0.0),
                          labels=y)
    ckpt = tmp_path / "ckpt"
    fit_module(_module(features, total_steps=steps), _Collate(x, y, 3), len(y), config=_cfg(max_epochs=2, val_fraction=0.0, checkpoint_dir=str(ckpt)),
               labels=y)
    resumed = fit_module(_module(features, seed=99, total_steps=steps), _Collate(x, y, 3), len(y),
                         config=_cfg(max_epochs=4, val_fraction=0.0, checkpoint_dir=str(tmp_path / "again")), labels=y,
                         resume_from=ckpt / "last.ckpt")
    for pa, pb in zip(straight.module.model.parameters(), resumed.module.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6)


def test_fit_module_checks_inputs(features):
    x, y, _ = features
    with pytest.raises(ConfigError, match="labels"):
        fit_module(_module(features), _Collate(x, y, 0), len(y), config=_cfg(), labels=y[:10])
    with pytest.raises(ConfigError, match="val_idx"):
        fit_module(_module(features), _Collate(x, y, 0), len(y), config=_cfg(), val_idx=np.array([0, len(y)]))
    with pytest.raises(ConfigError, match="freeze prefixes"):
        _Probe(torch.nn.Linear(3, 2), OptimConfig(freeze=("encoder.",)))
    with pytest.raises(NotImplementedError):
        TrainingModule(torch.nn.Linear(3, 2)).compute_losses({})
