"""Training on Lightning (one process, DDP, any device).

``fit_module``: any family's :class:`~scforge.train.module.TrainingModule` with its own collate
function. ``fit``: an scGPT model on tokenized cells with scGPT's objectives and corruptions."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from scforge.errors import ConfigError
from scforge.nn import cpu_has_fast_bf16
from scforge.tokenize.ragged import TokenizedCells
from scforge.train.data import Corruption, EpochBatchSampler, make_loader
from scforge.train.module import OptimConfig, ScGPTTrainingModule, TrainingModule
from scforge.train.objectives import Objectives

logger = logging.getLogger("scforge")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file, flushes it to disk, then renames it into place, so
    a crash never leaves a half-written file under a checkpoint's name (``last.ckpt`` included)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a checkpoint (``resume_from``) with the weights-only unpickler only, whatever the torch
        version or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` say: a file that would run code raises
        :class:`~scforge.errors.UnsafeFileError` and nothing from it runs."""
        from scforge.hub import safe_torch_load_object

        return safe_torch_load_object(path, what="training checkpoint")


@dataclass
class TrainConfig:
    """Trainer settings. ``precision="auto"``: bf16 mixed on GPUs and on CPUs with native bf16,
    else fp32. ``checkpoint_every``: steps between checkpoints (None: each epoch). ``devices`` > 1,
    ``num_nodes`` > 1 or a launch by torchrun / SLURM runs DDP; ``strategy`` also takes Lightning's
    names and objects (e.g. ``"fsdp"``)."""

    max_epochs: int = 10
    max_steps: int = -1
    batch_size: int = 32
    accumulate: int = 1
    grad_clip: float | None = 1.0
    precision: str = "auto"
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: Any = "auto"
    val_fraction: float = 0.1
    early_stopping_patience: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None
    log_dir: str | None = None
    logger: str = "csv"
    progress: bool = True
    seed: int = 0
    deterministic: bool = True
    log_every_n_steps: int = 10
    extra_callbacks: list = field(default_factory=list)

    def lightning_precision(self) -> str:
        if self.precision != "auto":
            return {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}.get(self.precision, self.precision)
        if torch.cuda.is_available() and self.accelerator in ("auto", "gpu", "cuda"):
            return "bf16-mixed"
        return "bf16-mixed" if cpu_has_fast_bf16() else "32-true"


class CellDataModule(L.LightningDataModule):
    """Train / validation loaders over tokenized cells; sharded per DDP rank in ``setup``."""

    def __init__(self, cells: TokenizedCells, *, train_idx: np.ndarray, val_idx: np.ndarray | None,
                 batch_size: int, corruption: Corruption, seed: int, labels: np.ndarray | None,
                 batch_labels: np.ndarray | None, per_batch: bool, mask_value: float, pad_value: float,
                 pad_id: int) -> None:
        super().__init__()
        self.cells, self.train_idx, self.val_idx = cells, train_idx, val_idx
        self.kw = {"batch_size": batch_size, "corruption": corruption, "seed": seed, "mask_value": mask_value,
                   "pad_value": pad_value, "pad_id": pad_id}
        self.labels, self.batch_labels, self.per_batch = labels, batch_labels, per_batch

    def _loader(self, idx: np.ndarray, shuffle: bool, per_batch: bool):
        sub = self.cells.select(idx)
        pick = (lambda a: None if a is None else a[idx])
        loader = make_loader(sub, shuffle=shuffle, labels=pick(self.labels), batch_labels=pick(self.batch_labels),
                             per_batch=per_batch, **self.kw)
        if self.trainer is not None:
            loader.batch_sampler.set_distributed(self.trainer.global_rank, self.trainer.world_size)
        return loader

    def train_dataloader(self):
        return self._loader(self.train_idx, True, self.per_batch)

    def val_dataloader(self):
        if self.val_idx is None or self.val_idx.size == 0:
            return []
        return self._loader(self.val_idx, False, self.per_batch)


class _Remap:
    """Collate wrapper: the sampler's positions within a subset -> the cells' own indices."""

    def __init__(self, collate: Callable[[list[tuple[int, int]]], dict[str, Any]], idx: np.ndarray) -> None:
        self.collate, self.idx = collate, idx

    def __call__(self, items: list[tuple[int, int]]) -> dict[str, Any]:
        return self.collate([(epoch, int(self.idx[i])) for epoch, i in items])


class IndexDataModule(L.LightningDataModule):
    """Train / validation loaders over cell indices for any family: :class:`EpochBatchSampler`
    batches (seeded per epoch, resumable, sharded per DDP rank) handed to ``collate`` as
    ``(epoch, cell_index)`` pairs, indices into the full set of cells."""

    def __init__(self, collate: Callable[[list[tuple[int, int]]], dict[str, Any]], *, train_idx: np.ndarray,
                 val_idx: np.ndarray | None, batch_size: int, seed: int, groups: np.ndarray | None = None) -> None:
        super().__init__()
        self.collate, self.train_idx, self.val_idx = collate, train_idx, val_idx
        self.batch_size, self.seed, self.groups = batch_size, seed, groups

    def _loader(self, idx: np.ndarray, shuffle: bool) -> torch.utils.data.DataLoader:
        from scforge.train.data import _IndexDataset

        sampler = EpochBatchSampler(idx.size, self.batch_size, shuffle=shuffle, seed=self.seed,
                                    groups=None if self.groups is None else self.groups[idx])
        if self.trainer is not None:
            sampler.set_distributed(self.trainer.global_rank, self.trainer.world_size)
        return torch.utils.data.DataLoader(_IndexDataset(idx.size), batch_sampler=sampler,
                                           collate_fn=_Remap(self.collate, idx))

    def train_dataloader(self):
        return self._loader(self.train_idx, True)

    def val_dataloader(self):
        if self.val_idx is None or self.val_idx.size == 0:
            return []
        return self._loader(self.val_idx, False)


def split_indices(n: int, val_fraction: float, seed: int, labels: np.ndarray | None = None):
    """Seeded train/validation split, stratified by ``labels`` when every class has >= 2 cells."""
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    idx = np.arange(n)
    if val_fraction == 0 or n < 4:
        return idx, np.zeros(0, dtype=np.int64)
    from sklearn.model_selection import train_test_split

    strat = None
    if labels is not None:
        _, counts = np.unique(labels, return_counts=True)
        strat = labels if counts.min() >= 2 else None
    train, val = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=strat)
    return np.sort(train), np.sort(val)


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained module (best weights loaded when validation ran),
    the Lightning trainer, the checkpoint folder and the per-epoch metrics logged."""

    module: TrainingModule
    trainer: L.Trainer
    checkpoint_dir: Path | None
    best_checkpoint: str | None
    metrics: dict[str, float]


def fit(
    model: torch.nn.Module,
    cells: TokenizedCells,
    *,
    objectives: Objectives,
    corruption: Corruption | None = None,
    optim: OptimConfig | None = None,
    config: TrainConfig | None = None,
    labels: np.ndarray | None = None,
    batch_labels: np.ndarray | None = None,
    per_batch: bool = False,
    val_idx: np.ndarray | None = None,
    resume_from: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``model`` (an ``ScGPTModel``) on ``cells`` with Lightning.

    ``labels`` (integer codes) feed the classifier, ``batch_labels`` DSBN / DAR (``per_batch``:
    minibatches from one batch each). Validation: ``val_idx`` or a seeded split of
    ``config.val_fraction`` (stratified by labels). ``resume_from`` continues a run exactly from a
    checkpoint written by an earlier ``fit`` (model, optimizer, schedule, RNG and data position)."""
    cfg = config or TrainConfig()
    corruption = corruption or Corruption("mask" if objectives.gep or objectives.mvc else "none", 0.15)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    if labels is not None and len(labels) != cells.n_cells:
        raise ConfigError(f"{len(labels)} labels for {cells.n_cells} cells")
    if val_idx is None:
        train_idx, val_idx = split_indices(cells.n_cells, cfg.val_fraction, cfg.seed, labels)
    else:
        val_idx = np.asarray(val_idx, dtype=np.int64)
        train_idx = np.setdiff1d(np.arange(cells.n_cells), val_idx)
    c = model.config
    data = CellDataModule(cells, train_idx=train_idx, val_idx=val_idx, batch_size=cfg.batch_size,
                          corruption=corruption, seed=cfg.seed, labels=labels, batch_labels=batch_labels,
                          per_batch=per_batch, mask_value=c.mask_value, pad_value=c.pad_value, pad_id=c.pad_token_id)
    module = ScGPTTrainingModule(model, objectives, optim)
    return _run(module, data, cfg, has_val=val_idx.size > 0, resume_from=resume_from)


def _check_val_idx(val_idx: np.ndarray, n: int) -> np.ndarray:
    val_idx = np.asarray(val_idx, dtype=np.int64)
    if val_idx.size and (val_idx.min() < 0 or val_idx.max() >= n):
        raise ConfigError(f"val_idx must index the {n} cells (0..{n - 1}); got values from {val_idx.min()} to "
                          f"{val_idx.max()}")
    return np.unique(val_idx)


def fit_module(
    module: TrainingModule,
    collate: Callable[[list[tuple[int, int]]], dict[str, Any]],
    n_cells: int,
    *,
    config: TrainConfig | None = None,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    val_idx: np.ndarray | None = None,
    resume_from: str | os.PathLike | None = None,
) -> FitResult:
    """Train any family's ``module`` on ``n_cells`` cells with Lightning.

    ``collate`` turns a minibatch, a list of ``(epoch, cell_index)`` pairs, into the batch dict its
    :meth:`~TrainingModule.compute_losses` reads; it must draw its randomness from a generator seeded
    with :func:`~scforge.train.data.batch_seed` (seed, epoch, first index, size), so runs repeat and
    resume exactly. ``labels`` stratify the seeded validation split (``config.val_fraction``) unless
    ``val_idx`` is given; ``groups`` (one integer per cell) makes each minibatch come from one group.
    ``resume_from``: a checkpoint written by an earlier run with ``config.checkpoint_dir``."""
    cfg = config or TrainConfig()
    if n_cells < 1:
        raise ConfigError("no cells to train on")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    for name, arr in (("labels", labels), ("groups", groups)):
        if arr is not None and len(arr) != n_cells:
            raise ConfigError(f"{len(arr)} {name} for {n_cells} cells")
    if val_idx is None:
        train_idx, val_idx = split_indices(n_cells, cfg.val_fraction, cfg.seed, labels)
    else:
        val_idx = _check_val_idx(val_idx, n_cells)
        train_idx = np.setdiff1d(np.arange(n_cells), val_idx)
    if train_idx.size == 0:
        raise ConfigError("every cell is in the validation set; nothing is left to train on")
    data = IndexDataModule(collate, train_idx=train_idx, val_idx=val_idx, batch_size=cfg.batch_size, seed=cfg.seed,
                           groups=None if groups is None else np.asarray(groups))
    return _run(module, data, cfg, has_val=val_idx.size > 0, resume_from=resume_from)


def _strategy(cfg: TrainConfig) -> Any:
    """DDP that tolerates parameters a run does not use (scGPT's classifier head in pretraining, the
    MVC decoder in annotation): without it, DDP stops at the first step."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1 or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    many = (isinstance(cfg.devices, int) and cfg.devices > 1) or cfg.num_nodes > 1 or launched
    if cfg.strategy == "fsdp":  # FSDP2 through Lightning's ModelParallelStrategy: CPU (gloo) and GPU
        from lightning.pytorch.strategies import ModelParallelStrategy

        if not isinstance(cfg.devices, int):
            raise ConfigError(f'strategy="fsdp" needs devices as a number of processes per node, got {cfg.devices!r}')
        return ModelParallelStrategy(data_parallel_size=cfg.devices * cfg.num_nodes, tensor_parallel_size=1,
                                     save_distributed_checkpoint=False)
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and many):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return cfg.strategy


def _run(module: TrainingModule, data: L.LightningDataModule, cfg: TrainConfig, *, has_val: bool,
         resume_from: str | os.PathLike | None) -> FitResult:
    ckpt_dir = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    callbacks = list(cfg.extra_callbacks)
    checkpoint_cb = None
    if ckpt_dir is not None:
        checkpoint_cb = L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, every_n_train_steps=cfg.checkpoint_every,
            monitor="val/loss" if has_val else None, save_top_k=1, filename="best" if has_val else "step{step}",
            auto_insert_metric_name=False)
        callbacks.append(checkpoint_cb)
    if cfg.early_stopping_patience is not None and has_val:
        callbacks.append(L.pytorch.callbacks.EarlyStopping("val/loss", patience=cfg.early_stopping_patience))
    loggers: Any = False
    if cfg.logger and cfg.log_dir:
        if cfg.logger == "tensorboard":
            loggers = L.pytorch.loggers.TensorBoardLogger(cfg.log_dir, name="")
        else:
            loggers = L.pytorch.loggers.CSVLogger(cfg.log_dir, name="")
    trainer = L.Trainer(
        max_epochs=cfg.max_epochs, max_steps=cfg.max_steps, accelerator=cfg.accelerator, devices=cfg.devices,
        num_nodes=cfg.num_nodes, strategy=_strategy(cfg), precision=cfg.lightning_precision(), accumulate_grad_batches=cfg.accumulate,
        gradient_clip_val=cfg.grad_clip, callbacks=callbacks, logger=loggers, enable_checkpointing=ckpt_dir is not None,
        enable_progress_bar=cfg.progress, enable_model_summary=False, deterministic=cfg.deterministic,
        use_distributed_sampler=False, log_every_n_steps=cfg.log_every_n_steps, plugins=[AtomicCheckpointIO()], num_sanity_val_steps=0,
        default_root_dir=str(ckpt_dir or cfg.log_dir or Path.cwd()),
    )
    trainer.fit(module, datamodule=data, ckpt_path=str(resume_from) if resume_from else None)
    module.unshard_into_original()
    best = checkpoint_cb.best_model_path if checkpoint_cb is not None and has_val else None
    if best:
        from scforge.hub import safe_torch_load

        state = safe_torch_load(best, what="best checkpoint")  # weights-only; its "state_dict" entry
        module.load_state_dict(state)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    module.model.eval()
    return FitResult(module, trainer, ckpt_dir, best or None, metrics)
