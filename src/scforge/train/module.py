"""Lightning modules: :class:`TrainingModule` (optimiser, schedule, logging, exact resume; any family)
and :class:`ScGPTTrainingModule` (scGPT's objectives)."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning as L
import numpy as np
import torch

from scforge.errors import ConfigError
from scforge.train.objectives import Objectives, objective_losses


@dataclass
class OptimConfig:
    """AdamW with a warmup then ``schedule``: ``"cosine"`` / ``"linear"`` decay to ``min_lr_ratio``
    of the peak, ``"constant"``, or ``"step"`` (x ``gamma`` every ``step_every`` steps, as scGPT's
    StepLR per epoch). ``freeze``: parameter-name prefixes kept fixed (e.g. ``"encoder."``,
    ``"value_encoder."``, ``"transformer_encoder.layers.0."``)."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0
    gamma: float = 0.9
    step_every: int = 100
    freeze: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant", "step"):
            raise ConfigError(f"schedule={self.schedule!r}; choose cosine, linear, constant or step")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based) of ``total``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        return cfg.gamma ** ((step - cfg.warmup_steps) // max(cfg.step_every, 1))
    span = max(total - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape


class TrainingModule(L.LightningModule):
    """Base Lightning module of every scforge model family.

    A subclass implements :meth:`compute_losses` (total loss and named parts) and may add
    :meth:`validation_metrics`. The base class logs ``train/loss``, ``train/<part>``, ``val/loss``
    and ``val/<part>``; freezes the parameters named by ``optim.freeze``; runs fused AdamW with the
    warmup and schedule of :class:`OptimConfig`; and saves and restores the Python, NumPy and torch
    RNG states and the data position with each checkpoint, so a resumed run continues exactly as an
    uninterrupted one. Batches should carry ``cells`` (the cell indices; the logged batch size)."""

    def __init__(self, model: torch.nn.Module, optim: OptimConfig | None = None, total_steps: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.optim = optim or OptimConfig()
        self.total_steps = total_steps
        names = [n for n, _ in self.model.named_parameters()]
        unmatched = [f for f in self.optim.freeze if not any(n.startswith(f) for n in names)]
        if unmatched:
            raise ConfigError(f"freeze prefixes {unmatched} match no parameter; parameter names start with "
                              f"{sorted({n.split('.')[0] + '.' for n in names})}.")
        for name, p in self.model.named_parameters():
            if any(name.startswith(prefix) for prefix in self.optim.freeze):
                p.requires_grad_(False)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named parts for one minibatch."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_losses(batch)")

    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra validation figures for the batch just scored by :meth:`compute_losses` (e.g. accuracy)."""
        return {}

    @staticmethod
    def _batch_size(batch: dict[str, torch.Tensor]) -> int:
        cells = batch.get("cells")
        return int(cells.numel()) if isinstance(cells, torch.Tensor) else 1

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        self._consumed = getattr(self, "_consumed", 0) + 1
        total, losses = self.compute_losses(batch)
        n = self._batch_size(batch)
        self.log("train/loss", total, prog_bar=True, batch_size=n, on_step=True, on_epoch=True)
        for name, value in losses.items():
            self.log(f"train/{name}", value, batch_size=n)
        return total

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        total, losses = self.compute_losses(batch)
        n = self._batch_size(batch)
        self.log("val/loss", total, prog_bar=True, batch_size=n, sync_dist=True)
        for name, value in losses.items():
            self.log(f"val/{name}", value, batch_size=n, sync_dist=True)
        for name, value in self.validation_metrics(batch).items():
            self.log(f"val/{name}", value, prog_bar=name == "accuracy", batch_size=n, sync_dist=True)

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("every parameter is frozen; nothing to train")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        # the fused kernel (CPU and CUDA) updates all parameters in one pass: several times faster
        # than the per-tensor loop, same update rule
        # (not under fp16 loss scaling: Lightning cannot clip gradients a fused step unscales itself)
        fused = self._precision_name() != "16-mixed" and all(
            p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
            for p in params)
        opt = torch.optim.AdamW(groups, lr=self.optim.lr, betas=self.optim.betas, eps=self.optim.eps,
                                fused=fused or None)
        total = self.total_steps or int(self.trainer.estimated_stepping_batches)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, self.optim))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _precision_name(self) -> str:
        trainer = self._trainer
        return str(getattr(trainer, "precision", "")) if trainer is not None else ""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does, except under bf16 autocast: there gradients are never scaled, but
        Lightning's mixed-precision plugin refuses to clip for any fused optimizer, so clip directly."""
        if gradient_clip_val and self._precision_name() == "bf16-mixed":
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---- fully sharded data parallel (FSDP2, Lightning's ModelParallelStrategy) ----------------
    def configure_model(self) -> None:
        """Under ``TrainConfig(strategy="fsdp")``: shard a copy of the model over the data-parallel
        ranks, one FSDP unit per transformer layer plus the rest. The caller's model is left whole and
        gets the trained weights back at the end (:meth:`unshard_into_original`)."""
        mesh = getattr(self, "_device_mesh", None)
        if mesh is None or getattr(self, "_original_model", None) is not None:
            return
        import copy

        from torch.distributed.fsdp import fully_shard

        from scforge.nn import EncoderLayer

        dp = mesh["data_parallel"]
        self._original_model = self.model
        self.model = copy.deepcopy(self.model)
        for name, p in self.model.named_parameters():  # heads this run never trains: no optimizer state to shard
            if any(name.startswith(prefix) for prefix in self.idle_heads()):
                p.requires_grad_(False)
        for layer in self.model.modules():
            if isinstance(layer, EncoderLayer):
                fully_shard(layer, mesh=dp)
        fully_shard(self.model, mesh=dp)

    def idle_heads(self) -> list[str]:
        """Name prefixes of the parameters this module's losses never use (none by default)."""
        return []

    def unshard_into_original(self) -> None:
        """After sharded training: gather the full weights (a collective: every rank calls it) into the
        caller's model and train it no further as a sharded copy."""
        original = getattr(self, "_original_model", None)
        if original is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        original.load_state_dict(full)
        self.model, self._original_model = original, None

    # ---- exact resume ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        mine = {  # plain types and tensors only: loadable with weights_only=True
            "python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        }
        checkpoint["scforge_rng"] = mine
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # one process writes the file: it carries every rank's generators (each rank's dropout differs)
            ranks: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, mine)
            checkpoint["scforge_rng_ranks"] = ranks
        checkpoint["scforge_data"] = {"epoch": int(self.current_epoch), "consumed": int(getattr(self, "_consumed", 0))}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending_resume = checkpoint

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """The first step after a resume restores the RNG states saved with the checkpoint (here, after
        the data iterator was created, so nothing else draws from them before the step)."""
        rng = getattr(self, "_pending_rng", None)
        if rng is not None:
            version, internal, gauss_next = rng["python"]
            random.setstate((version, tuple(internal), gauss_next))
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            torch.set_rng_state(rng["torch"])
            self._pending_rng = None

    def _sampler(self):
        """What sets the epoch and resumes mid-epoch: the batch sampler, or a cell stream."""
        loader = self.trainer.train_dataloader
        for obj in (getattr(loader, "batch_sampler", None), getattr(loader, "dataset", None)):
            if obj is not None and hasattr(obj, "set_epoch") and hasattr(obj, "load_state_dict"):
                return obj
        return None

    def on_train_start(self) -> None:
        """On a resume, point the sampler at the saved epoch and skip the minibatches already used.
        (Lightning does not call ``on_train_epoch_start`` for an epoch it resumes in the middle.)"""
        self._consumed, self._consumed_epoch = 0, self.current_epoch
        state = getattr(self, "_pending_resume", None)
        self._pending_resume = None
        sampler = self._sampler()
        if sampler is not None:
            sampler.set_epoch(self.current_epoch)
        if state is None:
            return
        self._pending_rng = state.get("scforge_rng")
        ranks = state.get("scforge_rng_ranks")
        if ranks is not None and len(ranks) == self.trainer.world_size:
            self._pending_rng = ranks[self.trainer.global_rank]
        data = state.get("scforge_data")
        if sampler is not None and data is not None and data["epoch"] == self.current_epoch and data["consumed"]:
            sampler.load_state_dict(data)
            self._consumed = data["consumed"]

    def on_train_epoch_start(self) -> None:
        if self._consumed_epoch != self.current_epoch:
            self._consumed, self._consumed_epoch = 0, self.current_epoch
        sampler = self._sampler()
        if sampler is not None:
            sampler.set_epoch(self.current_epoch)


class ScGPTTrainingModule(TrainingModule):
    """Trains ``model`` (an ``ScGPTModel``) on ``objectives``; batches come from :mod:`scforge.train.data`.

    Logs ``train/loss`` and each term (``train/gep``, ``train/cls``, ...), ``val/loss`` and, with
    labels, ``val/accuracy``."""

    def __init__(self, model: torch.nn.Module, objectives: Objectives, optim: OptimConfig | None = None,
                 total_steps: int | None = None) -> None:
        super().__init__(model, optim, total_steps)
        self.objectives = objectives
        self._check_model()
        cw = objectives.class_weights
        self.register_buffer("class_weights", None if cw is None else torch.tensor(cw, dtype=torch.float32),
                             persistent=False)
        self.save_hyperparameters({"objectives": asdict(objectives), "optim": asdict(self.optim)})

    def idle_heads(self) -> list[str]:
        o = self.objectives
        heads = {"decoder.": o.gep or o.second_pass, "cls_decoder.": o.cls, "mvc_decoder.": o.mvc,
                 "grad_reverse_discriminator.": bool(o.dar_weight)}
        return [prefix for prefix, used in heads.items() if not used]

    def _check_model(self) -> None:
        c, o = self.model.config, self.objectives
        if o.mvc and not c.do_mvc:
            raise ConfigError("the MVC objective needs a model with an MVC decoder (do_mvc=True)")
        if o.dar_weight and not c.do_dab:
            raise ConfigError("DAR needs a model with the batch discriminator (do_dab=True, num_batch_labels)")
        if o.cls and c.n_cls < 2:
            raise ConfigError("classification needs a classifier head with n_cls >= 2")
        if o.ecs_threshold is not None:
            c.ecs_threshold = o.ecs_threshold

    def _forward(self, batch: dict[str, torch.Tensor], cell_emb_input: torch.Tensor | None = None):
        o = self.objectives
        kwargs = {}
        if "cu_seqlens" in batch:
            kwargs = {"cu_seqlens": batch["cu_seqlens"], "max_seqlen": int(batch["max_seqlen"])}
        else:
            kwargs = {"padding_mask": batch["padding_mask"], "gen_mask": batch["gen_mask"]}
        needs_batch = self.model.config.use_batch_labels or bool(self.model.config.domain_spec_batchnorm)
        return self.model(batch["genes"], batch["values"], batch_labels=batch.get("batch_labels") if needs_batch
                          else None, CLS=o.cls, CCE=bool(o.cce_weight), MVC=o.mvc, ECS=bool(o.ecs_weight),
                          cell_emb_input=cell_emb_input, **kwargs)

    def compute_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self._forward(batch)
        losses = objective_losses(self.model, out, batch, self.objectives, self.class_weights)
        o = self.objectives
        if o.second_pass and "gen_mask" in batch and self.global_step >= o.second_pass_after:
            again = self._forward(batch, cell_emb_input=out["cell_emb"].detach())
            losses["gen_second"] = objective_losses(self.model, again, batch, Objectives(gep=True))["gep"]
        self._last_output = out
        return sum(losses.values()), losses

    def validation_metrics(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = getattr(self, "_last_output", None)
        if not self.objectives.cls or "labels" not in batch or out is None:
            return {}
        return {"accuracy": (out["cls_output"].argmax(-1) == batch["labels"]).float().mean()}
