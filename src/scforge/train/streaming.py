"""Training on data that does not fit in memory: Lightning over :class:`~scforge.data.stream.CellStream`.

The stream deals blocks of cells to DDP ranks and DataLoader workers and tokenizes them inside the
workers; :class:`StreamCollator` corrupts and packs each minibatch there too, so the training
process only runs the model. Every rank gets the same number of minibatches per epoch (the stream
repeats a few of a short rank's own cells), so DDP never waits on a rank that ran out."""

from __future__ import annotations

import copy
import os
from typing import Any

import lightning as L
import numpy as np
import torch

from scforge.errors import ConfigError
from scforge.train.data import CellCollator, Corruption
from scforge.train.engine import FitResult, TrainConfig, _run
from scforge.train.module import OptimConfig, ScGPTTrainingModule
from scforge.train.objectives import Objectives


class StreamCollator(CellCollator):
    """A stream minibatch (``cells``, ``tokens``, ``epoch``) -> the tensors of :class:`CellCollator`;
    the corruption is seeded by the cells' global numbers, so it does not depend on the worker."""

    def __init__(self, *, corruption: Corruption, seed: int = 0, mask_value: float = -1.0, pad_value: float = -2.0,
                 pad_id: int = 0) -> None:
        super().__init__(None, corruption=corruption, seed=seed, mask_value=mask_value, pad_value=pad_value,
                         pad_id=pad_id)

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        tokens = batch["tokens"]
        if tokens.values is None or tokens.gene_ids is None:
            raise ConfigError("training needs tokenized cells with gene ids and values: give the stream an scGPT "
                              "(binned) tokenizer or shards written with one")
        return self.collate(tokens, np.arange(tokens.n_cells), np.asarray(batch["cells"], dtype=np.int64),
                            int(batch["epoch"]))


class StreamDataModule(L.LightningDataModule):
    """Train (and optional validation) DataLoaders over cell streams, told their DDP rank by the trainer."""

    def __init__(self, train: Any, val: Any | None, collate: StreamCollator, num_workers: int = 0) -> None:
        super().__init__()
        self.train, self.val, self.collate, self.num_workers = train, val, collate, int(num_workers)

    def _loader(self, stream: Any, even: bool) -> torch.utils.data.DataLoader:
        if self.trainer is not None:
            stream.set_distributed(self.trainer.global_rank, self.trainer.world_size, self.num_workers)
        stream.even_batches = even
        return torch.utils.data.DataLoader(stream, batch_size=None, num_workers=self.num_workers,
                                           collate_fn=self.collate)

    def train_dataloader(self):
        """Lightning starts the DataLoader (and forks its workers, which copy the stream) before any
        epoch hook runs, so the epoch and a resumed position are set on the stream here."""
        if self.trainer is not None:
            self.train.set_epoch(self.trainer.current_epoch)
            pending = getattr(self.trainer.lightning_module, "_pending_resume", None) or {}
            data = pending.get("scforge_data")
            if data and data["epoch"] == self.trainer.current_epoch and data["consumed"]:
                self.train.load_state_dict(data)
        return self._loader(self.train, even=True)

    def val_dataloader(self):
        # even counts here too: a rank without validation batches would leave the others waiting in the
        # end-of-epoch reduction (the repeats weigh a few cells twice, as DistributedSampler does)
        return [] if self.val is None else self._loader(self.val, even=True)


def _total_steps(stream: Any, cfg: TrainConfig, num_workers: int) -> int:
    """Optimizer steps of the whole run, for the learning-rate schedule. Worked out here, not by
    Lightning: asking Lightning starts the DataLoader before a sharded (FSDP) model has restored a
    checkpoint, so the workers would miss the resumed position."""
    if cfg.max_steps > 0:
        return int(cfg.max_steps)
    world = cfg.devices * cfg.num_nodes if isinstance(cfg.devices, int) else 1
    probe = copy.copy(stream)
    probe.set_distributed(0, world, num_workers)
    probe.even_batches = world > 1  # as the training loader: every rank as many minibatches as the fullest
    steps = 0
    for epoch in range(cfg.max_epochs):
        probe.epoch = epoch
        steps += -(-len(probe) // max(cfg.accumulate, 1))
    return max(steps, 1)


def fit_stream(
    model: torch.nn.Module,
    train: Any,
    *,
    objectives: Objectives,
    corruption: Corruption | None = None,
    optim: OptimConfig | None = None,
    config: TrainConfig | None = None,
    val: Any | None = None,
    num_workers: int = 0,
    resume_from: str | os.PathLike | None = None,
) -> FitResult:
    """Train ``model`` (an ``ScGPTModel``) on a :class:`~scforge.data.stream.CellStream` with Lightning.

    Minibatches are the stream's (its ``batch_size``; ``config.batch_size`` is not used). ``val``: a
    stream of held-out cells (read in order). ``config.devices`` > 1, or a launch by ``torchrun`` /
    SLURM, runs DDP: each rank reads its own blocks. ``num_workers`` DataLoader workers per rank read
    and tokenize in parallel. ``resume_from`` continues exactly, mid-epoch included."""
    from scforge.data.stream import CellStream

    for name, stream in (("train", train), ("val", val)):
        if stream is not None and not isinstance(stream, CellStream):
            raise ConfigError(f"{name} must be a scforge.data.stream.CellStream, got {type(stream).__name__}")
    if val is not None and val.shuffle:
        raise ConfigError("the validation stream should read in order: build it with shuffle=False")
    if num_workers < 0:
        raise ConfigError(f"num_workers must be >= 0, got {num_workers}")
    cfg = config or TrainConfig()
    corruption = corruption or Corruption("mask" if objectives.gep or objectives.mvc else "none", 0.15)
    if objectives.cls or objectives.dar_weight:
        raise ConfigError("streamed training covers the label-free objectives (GEP, MVC, ECS); classification "
                          "and DAR need labels: use scforge.train.fit on tokenized cells")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    c = model.config
    collate = StreamCollator(corruption=corruption, seed=cfg.seed, mask_value=c.mask_value, pad_value=c.pad_value,
                             pad_id=c.pad_token_id)
    module = ScGPTTrainingModule(model, objectives, optim, total_steps=_total_steps(train, cfg, num_workers))
    return _run(module, StreamDataModule(train, val, collate, num_workers), cfg, has_val=val is not None,
                resume_from=resume_from)
