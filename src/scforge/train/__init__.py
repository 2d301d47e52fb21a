"""Training engine on Lightning: any family's module (``fit_module``), scGPT objectives (``fit``), streamed
data (``fit_stream``), seeded resumable data, atomic checkpoints, DDP and FSDP.

Names are imported on first use, so that ``scforge.train.data`` (used by the data streams, also in
DataLoader worker processes) does not pull in Lightning."""

from importlib import import_module
from typing import Any

_WHERE = {
    "CellCollator": "data", "Corruption": "data", "EpochBatchSampler": "data", "batch_seed": "data",
    "make_loader": "data",
    "AtomicCheckpointIO": "engine", "FitResult": "engine", "IndexDataModule": "engine", "TrainConfig": "engine",
    "fit": "engine", "fit_module": "engine", "split_indices": "engine",
    "OptimConfig": "module", "ScGPTTrainingModule": "module", "TrainingModule": "module", "lr_factor": "module",
    "Objectives": "objectives", "masked_bernoulli_nll": "objectives", "masked_mse": "objectives",
    "objective_losses": "objectives",
    "StreamCollator": "streaming", "StreamDataModule": "streaming", "fit_stream": "streaming",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'scforge.train' has no attribute {name!r}")
    value = getattr(import_module(f"scforge.train.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
