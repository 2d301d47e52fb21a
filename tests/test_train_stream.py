"""Training on streamed data: fit_stream in one process, exact resume after SIGKILL with DataLoader workers,
2-process DDP (Lightning's launcher, torchrun and a SLURM-style launch) and 2-process FSDP on CPU, and
pretraining from shards and files with the scGPT objectives."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from scforge.data.shards import ShardError, write_shards
from scforge.data.stream import CellStream
from scforge.errors import ConfigError
from scforge.genes.builtin import builtin_vocab
from scforge.models.scgpt import ScGPT
from scforge.tokenize import BinnedTokenizer, RankValueTokenizer
from scforge.train import Corruption, Objectives, TrainConfig, fit_stream

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def corpus(ifnb_small, tmp_path_factory):
    """100 real cells on disk (streamed) and 60 others held out."""
    root = tmp_path_factory.mktemp("corpus")
    ifnb_small[:100].copy().write_h5ad(root / "train.h5ad")
    ifnb_small[100:160].copy().write_h5ad(root / "val.h5ad")
    return root


def tok(max_len=48):
    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=max_len, seed=0, cls_value=0.0)


def tiny_model():
    torch.manual_seed(0)
    return ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_heads=4, d_hid=48, n_layers=2, dropout=0.1)


class Record(L.Callback):
    def __init__(self):
        self.seen = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault(trainer.current_epoch, []).extend(batch["cells"].tolist())


def test_fit_stream_uses_every_cell_once_per_epoch_and_validates(corpus):
    model = tiny_model()
    before = model.module.transformer_encoder.layers[0].linear1.weight.detach().clone()
    record = Record()
    train = CellStream(corpus / "train.h5ad", tok(), batch_size=8, block_size=16, buffer_blocks=2, seed=1)
    val = CellStream(corpus / "val.h5ad", tok(), batch_size=16, shuffle=False)
    result = fit_stream(model.module, train, val=val, num_workers=2, objectives=Objectives(gep=True, mvc=True),
                        corruption=Corruption("mask", 0.4),
                        config=TrainConfig(max_epochs=2, progress=False, accelerator="cpu", extra_callbacks=[record]))
    for epoch in (0, 1):
        assert sorted(record.seen[epoch]) == list(range(100))  # every cell once, over 2 workers
    assert record.seen[0] != record.seen[1]  # reshuffled per epoch
    assert result.trainer.global_step == 2 * len(train)
    assert np.isfinite(result.metrics["val/loss"]) and "val/gep" in result.metrics
    assert not torch.equal(model.module.transformer_encoder.layers[0].linear1.weight, before)


def test_fit_stream_refuses_what_it_cannot_train(corpus, tmp_path):
    model = tiny_model()
    train = CellStream(corpus / "train.h5ad", tok(), batch_size=8)
    obj = Objectives(gep=True)
    with pytest.raises(ConfigError, match="must be a scforge.data.stream.CellStream"):
        fit_stream(model.module, [1, 2], objectives=obj)
    with pytest.raises(ConfigError, match="shuffle=False"):
        fit_stream(model.module, train, val=CellStream(corpus / "val.h5ad", tok()), objectives=obj)
    with pytest.raises(ConfigError, match="need labels"):
        fit_stream(model.module, train, objectives=Objectives(cls=True))
    from scforge.genes.builtin import resolve_geneformer  # Geneformer tokens carry no values

    shards = write_shards(RankValueTokenizer(resolve_geneformer("geneformer-v2"), model_input_size=32),
                          corpus / "train.h5ad", tmp_path / "gf")
    with pytest.raises(ConfigError, match="gene ids and values"):
        fit_stream(model.module, CellStream([shards], batch_size=8), objectives=obj,
                   config=TrainConfig(max_steps=1, progress=False, accelerator="cpu"))


def _helper(args, env=None, launcher=None):
    cmd = [*(launcher or [sys.executable]), str(HERE / "train_helpers.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]


def _weights(path):
    return torch.load(path, weights_only=True)


def test_sigkill_mid_epoch_then_resume_with_workers_gives_the_same_weights(corpus, tmp_path):
    common = ["--stream", str(corpus / "train.h5ad"), "--workers", "2", "--steps", "10"]
    _ok(_helper(["--out", str(tmp_path / "full"), *common]))
    killed = _helper(["--out", str(tmp_path / "killed"), "--ckpt", str(tmp_path / "ck"), "--kill-at", "7", *common])
    assert killed.returncode == -9  # SIGKILL mid-epoch (13 minibatches per epoch)
    _ok(_helper(["--out", str(tmp_path / "resumed"), "--ckpt", str(tmp_path / "ck"), "--resume",
                 str(tmp_path / "ck" / "last.ckpt"), *common]))
    full = json.loads((tmp_path / "full.rank0.json").read_text())
    resumed = json.loads((tmp_path / "resumed.rank0.json").read_text())
    assert resumed["step"] == 10
    tail = resumed["seen"]["0"]
    assert 0 < len(tail) < len(full["seen"]["0"]) and tail == full["seen"]["0"][-len(tail) :]  # same cells, same order
    a, b = _weights(tmp_path / "full.rank0.pt"), _weights(tmp_path / "resumed.rank0.pt")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _check_ddp_run(prefix: Path, n_cells: int = 100) -> dict[str, torch.Tensor]:
    runs = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in runs] == [2, 2] and runs[0]["step"] == runs[1]["step"]  # as many steps each
    both = runs[0]["seen"]["0"] + runs[1]["seen"]["0"]  # the first epoch, complete
    assert sorted(set(both)) == list(range(n_cells))  # every cell reached a rank
    a, b = _weights(f"{prefix}.rank0.pt"), _weights(f"{prefix}.rank1.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # gradients were averaged: identical replicas
    return a


DIST = ["--workers", "2", "--devices", "2", "--steps", "10"]  # 8 steps per epoch: the second one is cut short


@pytest.fixture(scope="module")
def ddp_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "ddp"
    _ok(_helper(["--out", str(out), "--stream", str(corpus / "train.h5ad"), *DIST]))
    return out


@pytest.fixture(scope="module")
def fsdp_run(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp") / "fsdp"
    _ok(_helper(["--out", str(out), "--stream", str(corpus / "train.h5ad"), *DIST, "--strategy", "fsdp"]))
    return out


def test_ddp_two_processes_with_workers_over_a_stream(ddp_run):
    _check_ddp_run(ddp_run)


def test_fsdp_two_processes_on_cpu_equals_ddp(ddp_run, fsdp_run):
    """FSDP2 (Lightning's ModelParallelStrategy, gloo): parameters sharded per layer over 2 processes give
    the same weights as DDP, gathered whole into the caller's model on every rank."""
    fsdp, ddp = _check_ddp_run(fsdp_run), _weights(f"{ddp_run}.rank0.pt")
    for key in ddp:
        torch.testing.assert_close(fsdp[key], ddp[key], rtol=1e-4, atol=1e-5)  # fp32 reduction order


def test_fsdp_sigkill_mid_epoch_then_resume_gives_the_same_weights(corpus, fsdp_run, tmp_path):
    """Both sharded processes killed at step 7 (checkpoint at 6), resumed: bit-identical to the uninterrupted
    run on both ranks (each rank's random generators travel in the checkpoint)."""
    args = ["--stream", str(corpus / "train.h5ad"), *DIST, "--strategy", "fsdp", "--ckpt", str(tmp_path / "ck")]
    killed = _helper(["--out", str(tmp_path / "killed"), *args, "--kill-at", "7"])
    assert killed.returncode != 0 and not (tmp_path / "killed.rank0.pt").exists()
    _ok(_helper(["--out", str(tmp_path / "resumed"), *args, "--resume", str(tmp_path / "ck" / "last.ckpt")]))
    full = _weights(f"{fsdp_run}.rank0.pt")
    for rank in range(2):
        resumed = _weights(tmp_path / f"resumed.rank{rank}.pt")
        for key in full:
            assert torch.equal(full[key], resumed[key]), (rank, key)


def test_torchrun_and_slurm_launches(corpus, tmp_path):
    """The same script under torchrun and under a SLURM-style launch (two tasks, SLURM_* variables) runs DDP."""
    args = ["--stream", str(corpus / "train.h5ad"), "--devices", "2", "--steps", "8"]
    _ok(_helper(["--out", str(tmp_path / "torchrun"), *args],
                launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]))
    _check_ddp_run(tmp_path / "torchrun")
    procs = []
    for rank in range(2):
        env = dict(os.environ, SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="2", SLURM_PROCID=str(rank),
                   SLURM_LOCALID=str(rank), SLURM_NODEID="0", SLURM_JOB_NAME="scforge", SLURM_JOB_ID="4242",
                   SLURM_NODELIST="localhost", SLURM_JOB_NUM_NODES="1")
        cmd = [sys.executable, str(HERE / "train_helpers.py"), "--out", str(tmp_path / "slurm"), *args]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    assert "SLURM" in err
    _check_ddp_run(tmp_path / "slurm")


def test_pretrain_stream_from_shards_and_files(corpus, tmp_path):
    from scforge.tasks.pretrain import pretrain_stream, pretrain_tokenizer, vocab_from_genes

    import anndata as ad

    vocab = vocab_from_genes(list(ad.read_h5ad(corpus / "train.h5ad", backed="r").var_names))
    write_shards(pretrain_tokenizer(vocab, max_length=48), corpus / "train.h5ad", tmp_path / "shards")
    kw = dict(vocab=vocab, d_model=32, n_layers=1, n_heads=2, d_hid=32, max_length=48, batch_size=16, epochs=1,
              progress=False, accelerator="cpu")
    result = pretrain_stream([tmp_path / "shards", corpus / "val.h5ad"], val_sources=corpus / "val.h5ad", **kw)
    assert result.n_train_cells == 160 and result.n_val_cells == 60
    assert np.isfinite(result.metrics["val/gep"]) and np.isfinite(result.metrics["val/mvc"])
    assert result.model.config.use_generative  # scGPT's generative pretraining objective
    with pytest.raises(ShardError, match="for-pretraining --max-len 64"):
        pretrain_stream([tmp_path / "shards"], **{**kw, "max_length": 64})


def test_cli_shard_for_pretraining_then_pretrain(corpus, tmp_path, capsys):
    from scforge.cli import main

    assert main(["shard", str(corpus / "train.h5ad"), "--model", "scgpt", "--for-pretraining", "--max-len", "48",
                 "--out", str(tmp_path / "shards")]) == 0
    assert (tmp_path / "shards" / "vocab.json").is_file()
    capsys.readouterr()
    assert main(["pretrain", str(tmp_path / "shards"), "--val", str(corpus / "val.h5ad"), "--out",
                 str(tmp_path / "model"), "--max-length", "48", "--layers", "1", "--width", "32", "--heads", "2",
                 "--ffn", "32", "--epochs", "1", "--batch-size", "16", "--no-progress", "--accelerator", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n_train_cells"] == 100 and report["n_val_cells"] == 60
    from scforge import load

    assert load(tmp_path / "model").config.d_model == 32
