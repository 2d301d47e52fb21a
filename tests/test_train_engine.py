"""Training engine: losses, data (masking, generative split, sampling), every objective learns, fit,
atomic checkpoints, exact resume after SIGKILL, and 2-process DDP on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError
from scforge.train import (
    CellCollator,
    Corruption,
    EpochBatchSampler,
    Objectives,
    OptimConfig,
    ScGPTTrainingModule,
    TrainConfig,
    fit,
    lr_factor,
    masked_bernoulli_nll,
    masked_mse,
)
from train_helpers import tiny_problem

HERE = Path(__file__).resolve().parent


def test_losses_by_hand():
    pred = torch.tensor([1.0, 2.0, 3.0])
    target = torch.tensor([1.5, 2.0, 0.0])
    mask = torch.tensor([True, False, True])
    assert masked_mse(pred, target, mask).item() == pytest.approx((0.25 + 9.0) / 2)
    assert masked_mse(pred, target, torch.zeros(3, dtype=torch.bool)).item() == 0.0
    p = torch.tensor([0.8, 0.5, 0.1])
    expected = -(np.log(0.8) + np.log(0.9)) / 2  # target 1.5 > 0 -> log p; target 0 -> log(1 - p)
    assert masked_bernoulli_nll(p, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_lr_schedules():
    cfg = OptimConfig(warmup_steps=10, schedule="cosine")
    assert lr_factor(0, 110, cfg) == pytest.approx(0.1)
    assert lr_factor(9, 110, cfg) == pytest.approx(1.0)
    assert lr_factor(60, 110, cfg) == pytest.approx(0.5)
    assert lr_factor(110, 110, cfg) == pytest.approx(0.0)
    assert lr_factor(55, 100, OptimConfig(schedule="linear")) == pytest.approx(0.45)
    assert lr_factor(250, 100, OptimConfig(schedule="step", step_every=100, gamma=0.9)) == pytest.approx(0.81)
    with pytest.raises(ConfigError):
        OptimConfig(schedule="weird")


@pytest.fixture(scope="module")
def problem(shared_data):
    return tiny_problem()


def test_mask_collator_is_seeded_and_leaves_cls(problem):
    _, cells, labels, _ = problem
    coll = CellCollator(cells, corruption=Corruption("mask", 0.25), seed=1, labels=labels)
    items = [(0, i) for i in range(8)]
    a, b = coll(items), coll(items)
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = coll([(1, i) for i in range(8)])
    assert not torch.equal(a["predict"], c["predict"])  # a new epoch re-masks
    cu = a["cu_seqlens"]
    for r in range(8):
        lo, hi = int(cu[r]), int(cu[r + 1])
        assert not a["predict"][lo]  # <cls> is never masked
        assert int(a["predict"][lo:hi].sum()) == int((hi - lo - 1) * 0.25)
    assert torch.all(a["values"][a["predict"]] == -1.0)
    assert torch.equal(a["target"][~a["predict"]], a["values"][~a["predict"]])
    assert torch.equal(a["labels"], torch.as_tensor(labels[:8]))


def test_generative_collator_moves_generated_genes_last(problem):
    model, cells, _, _ = problem
    coll = CellCollator(cells, corruption=Corruption("generative", (0.25, 0.5, 0.75)), seed=0,
                        pad_id=model.config.pad_token_id)
    batch = coll([(0, i) for i in range(6)])
    lengths = (~batch["padding_mask"]).sum(1)
    for r in range(6):
        gen = batch["gen_mask"][r, : lengths[r]]
        k = int(gen.sum())
        assert k in {int((lengths[r] - 1) * f) for f in (0.25, 0.5, 0.75)}
        assert gen[lengths[r] - k :].all() and not gen[: lengths[r] - k].any()
        # same genes as the cell's tokens, reordered
        lo, hi = cells.offsets[r], cells.offsets[r + 1]
        assert sorted(batch["genes"][r, : lengths[r]].tolist()) == sorted(cells.gene_ids[lo:hi].tolist())
    assert torch.equal(batch["predict"], batch["gen_mask"])


def test_sampler_per_batch_sharding_and_resume():
    groups = np.repeat([0, 1, 2], [10, 7, 5])
    s = EpochBatchSampler(22, 4, seed=5, groups=groups)
    batches = [[i for _, i in b] for b in s]
    assert all(len(set(groups[b])) == 1 for b in batches)
    assert sorted(i for b in batches for i in b) == list(range(22))
    ranks = [EpochBatchSampler(22, 4, seed=5, rank=r, world_size=2) for r in range(2)]
    seen = [[i for b in r for _, i in b] for r in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(22))  # 6 minibatches: none dropped, none shared
    assert len(ranks[0]) == len(ranks[1]) == 3  # equal step counts on every rank
    full = [b for b in EpochBatchSampler(22, 4, seed=5)]
    resumed = EpochBatchSampler(22, 4, seed=5)
    resumed.load_state_dict({"epoch": 0, "consumed": 2})
    assert [b for b in resumed] == full[2:]
    other = EpochBatchSampler(22, 4, seed=5)
    other.set_epoch(1)
    assert [b for b in other] != full


CASES = {
    "gep": (Objectives(gep=True), Corruption("mask", 0.3), {}),
    "gep+mvc+zero": (Objectives(gep=True, mvc=True), Corruption("mask", 0.3), {"explicit_zero_prob": True}),
    "generative+second-pass": (Objectives(gep=True, mvc=True, second_pass=True, second_pass_after=0),
                               Corruption("generative", (0.25, 0.5, 0.75)), {"use_generative": True}),
    "cls": (Objectives(gep=False, cls=True), Corruption("none"), {"n_cls": 13}),
    "ecs+cce": (Objectives(gep=True, ecs_weight=10.0, cce_weight=1.0), Corruption("mask", 0.2), {}),
    "dar+dsbn": (Objectives(gep=True, mvc=True, dar_weight=1.0), Corruption("mask", 0.4),
                 {"do_dab": True, "num_batch_labels": 2, "domain_spec_batchnorm": "dsbn", "use_batch_labels": True}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_objective_learns_on_real_cells(shared_data, case):
    objectives, corruption, config = CASES[case]
    model, cells, labels, batches = tiny_problem(n_cells=48, **config)
    coll = CellCollator(cells, corruption=corruption, seed=0, labels=labels, batch_labels=batches,
                        pad_id=model.config.pad_token_id)
    group = np.flatnonzero(batches == batches[0])[:16] if "dsbn" in case else np.arange(16)
    batch = coll([(0, int(i)) for i in group])
    module = ScGPTTrainingModule(model.module, objectives, OptimConfig(lr=3e-3))
    module.train()
    opt = torch.optim.AdamW(module.model.parameters(), lr=3e-3)
    first = None
    for _ in range(25):
        total, losses = module.compute_losses(batch)
        if first is None:
            first = {k: float(v) for k, v in losses.items()}
        opt.zero_grad()
        total.backward()
        opt.step()
    with torch.no_grad():
        module.eval()
        _, last = module.compute_losses(batch)
    assert set(first) == set(last)
    main_terms = [k for k in first if k not in ("ecs", "dar", "cce")]
    for key in main_terms:
        assert float(last[key]) < first[key], (key, first[key], float(last[key]))
    if case == "generative+second-pass":
        assert "gen_second" in last


def test_objectives_must_fit_the_model(problem):
    model, *_ = problem
    with pytest.raises(ConfigError, match="discriminator"):
        ScGPTTrainingModule(model.module, Objectives(dar_weight=1.0))
    with pytest.raises(ConfigError, match="classifier"):
        ScGPTTrainingModule(model.module, Objectives(gep=False, cls=True))
    with pytest.raises(ConfigError, match="nothing to train"):
        Objectives(gep=False)


def test_fit_validates_checkpoints_logs_and_freezes(shared_data, tmp_path):
    model, cells, labels, _ = tiny_problem(n_cells=80, n_cls=13)
    frozen_before = model.module.encoder.embedding.weight.detach().clone()
    moving_before = model.module.transformer_encoder.layers[0].linear1.weight.detach().clone()
    cfg = TrainConfig(max_epochs=2, batch_size=16, val_fraction=0.2, checkpoint_dir=str(tmp_path / "ckpt"),
                      log_dir=str(tmp_path / "logs"), progress=False, seed=1)
    result = fit(model.module, cells, objectives=Objectives(gep=True, cls=True), config=cfg, labels=labels,
                 optim=OptimConfig(lr=1e-3, freeze=("encoder.",), warmup_steps=2))
    assert result.best_checkpoint and Path(result.best_checkpoint).exists()
    assert (tmp_path / "ckpt" / "last.ckpt").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))
    assert "val/loss" in result.metrics and "val/accuracy" in result.metrics
    logs = list((tmp_path / "logs").rglob("metrics.csv"))
    assert logs and "train/loss" in logs[0].read_text()
    assert torch.equal(model.module.encoder.embedding.weight, frozen_before)
    assert not torch.equal(model.module.transformer_encoder.layers[0].linear1.weight, moving_before)


def _run(args, check=True):
    return subprocess.run([sys.executable, str(HERE / "train_helpers.py"), *args], capture_output=True, text=True,
                          check=check, timeout=600)


def test_sigkill_mid_epoch_then_resume_gives_the_same_weights(shared_data, tmp_path):
    _run(["--out", str(tmp_path / "full"), "--steps", "12"])
    killed = _run(["--out", str(tmp_path / "killed"), "--ckpt", str(tmp_path / "ck"), "--kill-at", "7",
                   "--steps", "12"], check=False)
    assert killed.returncode == -9  # SIGKILL, mid-epoch (8 batches per epoch)
    last = tmp_path / "ck" / "last.ckpt"
    assert last.exists()
    _run(["--out", str(tmp_path / "resumed"), "--ckpt", str(tmp_path / "ck"), "--resume", str(last),
          "--steps", "12"])
    a = torch.load(tmp_path / "full.rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed.rank0.pt", weights_only=True)
    assert json.loads((tmp_path / "resumed.rank0.json").read_text())["step"] == 12
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_ddp_two_processes_on_cpu(shared_data, tmp_path):
    _run(["--out", str(tmp_path / "ddp"), "--devices", "2", "--steps", "3"])
    seen = [json.loads((tmp_path / f"ddp.rank{r}.json").read_text())["seen"] for r in range(2)]
    assert len(seen[0]) == len(seen[1]) == 24 and not set(seen[0]) & set(seen[1])
    a = torch.load(tmp_path / "ddp.rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "ddp.rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were averaged: identical replicas


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_gradient_clipping_with_the_fused_optimizer_in_every_precision(shared_data, precision, monkeypatch):
    """Lightning refuses to clip for a fused optimizer under its bf16 plugin; scforge clips itself there
    (bf16 gradients are never loss-scaled), so clipped training runs in bf16 as in fp32."""
    model, cells, labels, _ = tiny_problem(n_cells=48, n_cls=13)
    clip, after = torch.nn.utils.clip_grad_norm_, []

    def recording_clip(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        total = clip(parameters, max_norm, *args, **kwargs)
        after.append(float(torch.stack([p.grad.float().norm() for p in parameters]).norm()))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    cfg = TrainConfig(max_epochs=1, batch_size=16, val_fraction=0.0, progress=False, precision=precision,
                      grad_clip=1e-3, accelerator="cpu")
    fit(model.module, cells, objectives=Objectives(gep=True, cls=True), config=cfg, labels=labels,
        optim=OptimConfig(lr=1e-3, warmup_steps=1))
    assert len(after) == 3 and max(after) <= 1e-3 * 1.01  # every step clipped to the limit
