"""Training engine on Lightning: scGPT objectives, seeded resumable data, atomic checkpoints, DDP."""

from scforge.train.data import CellCollator, Corruption, EpochBatchSampler, make_loader
from scforge.train.engine import AtomicCheckpointIO, FitResult, TrainConfig, fit, split_indices
from scforge.train.module import OptimConfig, ScGPTTrainingModule, lr_factor
from scforge.train.objectives import Objectives, masked_bernoulli_nll, masked_mse, objective_losses

__all__ = [
    "AtomicCheckpointIO", "CellCollator", "Corruption", "EpochBatchSampler", "FitResult", "Objectives",
    "OptimConfig", "ScGPTTrainingModule", "TrainConfig", "fit", "lr_factor", "make_loader",
    "masked_bernoulli_nll", "masked_mse", "objective_losses", "split_indices",
]
