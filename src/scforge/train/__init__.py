"""Training engine on Lightning: any family's module (``fit_module``), scGPT objectives (``fit``), seeded
resumable data, atomic checkpoints, DDP."""

from scforge.train.data import CellCollator, Corruption, EpochBatchSampler, batch_seed, make_loader
from scforge.train.engine import (AtomicCheckpointIO, FitResult, IndexDataModule, TrainConfig, fit, fit_module,
                                  split_indices)
from scforge.train.module import OptimConfig, ScGPTTrainingModule, TrainingModule, lr_factor
from scforge.train.objectives import Objectives, masked_bernoulli_nll, masked_mse, objective_losses

__all__ = [
    "AtomicCheckpointIO", "CellCollator", "Corruption", "EpochBatchSampler", "FitResult", "IndexDataModule",
    "Objectives", "OptimConfig", "ScGPTTrainingModule", "TrainConfig", "TrainingModule", "batch_seed", "fit",
    "fit_module", "lr_factor", "make_loader", "masked_bernoulli_nll", "masked_mse", "objective_losses",
    "split_indices",
]
