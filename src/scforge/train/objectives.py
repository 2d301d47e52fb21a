"""Loss terms of scGPT's objectives (GEP, GEPC/MVC, zero-probability, CLS, ECS, DAR, CCE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from scforge.errors import ConfigError


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``sum((pred - target)^2 * mask) / sum(mask)`` (scGPT's ``masked_mse_loss``); 0 when nothing is masked."""
    m = mask.to(pred.dtype)
    return ((pred.float() - target.float()) ** 2 * m).sum() / m.sum().clamp(min=1.0)


def masked_bernoulli_nll(nonzero_prob: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of "value > 0" under the predicted probability, over masked positions
    (scGPT's ``criterion_neg_log_bernoulli``; its ``*_zero_probs`` outputs are P(non-zero))."""
    p = nonzero_prob.float().clamp(1e-7, 1 - 1e-7)
    y = (target > 0).float()
    ll = y * torch.log(p) + (1 - y) * torch.log1p(-p)
    m = mask.float()
    return -(ll * m).sum() / m.sum().clamp(min=1.0)


@dataclass
class Objectives:
    """Which scGPT objectives to train and their weights.

    Pretraining (scGPT paper): ``gep=True, mvc=True`` with ``Corruption("generative", (0.25, 0.5, 0.75))``
    and optionally ``second_pass=True`` (after ``second_pass_after`` steps the detached cell
    embedding is fed back at position 0 and the generated genes are predicted again). Fine-tuning
    for annotation: ``cls=True`` (``gep=False`` unless masking is used). Integration: ``gep``,
    ``mvc``, ``ecs_weight=10`` (scGPT multiplies ECS by 10), ``dar_weight=1``.
    """

    gep: bool = True
    mvc: bool = False
    cls: bool = False
    ecs_weight: float = 0.0
    ecs_threshold: float | None = None
    dar_weight: float = 0.0
    cce_weight: float = 0.0
    second_pass: bool = False
    second_pass_after: int = 1000
    class_weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not (self.gep or self.mvc or self.cls or self.ecs_weight or self.dar_weight or self.cce_weight):
            raise ConfigError("Objectives: nothing to train; enable gep, mvc, cls or a weighted term.")
        if min(self.ecs_weight, self.dar_weight, self.cce_weight) < 0:
            raise ConfigError("Objectives: weights must be >= 0.")


def objective_losses(model, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], obj: Objectives,
                     class_weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every enabled loss term (unweighted except ECS/DAR/CCE, which carry their weights)."""
    losses: dict[str, torch.Tensor] = {}
    predict, target = batch["predict"], batch["target"]
    if obj.gep:
        losses["gep"] = masked_mse(out["mlm_output"], target, predict)
        if "mlm_zero_probs" in out:
            losses["gep_zero"] = masked_bernoulli_nll(out["mlm_zero_probs"], target, predict)
    if obj.mvc:
        losses["mvc"] = masked_mse(out["mvc_output"], target, predict)
        if "mvc_zero_probs" in out:
            losses["mvc_zero"] = masked_bernoulli_nll(out["mvc_zero_probs"], target, predict)
    if obj.cls:
        if "labels" not in batch:
            raise ConfigError("the classification objective needs labels")
        losses["cls"] = F.cross_entropy(out["cls_output"].float(), batch["labels"], weight=class_weights)
    if obj.ecs_weight:
        losses["ecs"] = obj.ecs_weight * out["loss_ecs"]
    if obj.dar_weight:
        if "batch_labels" not in batch:
            raise ConfigError("DAR needs batch labels")
        losses["dar"] = obj.dar_weight * F.cross_entropy(out["dab_output"].float(), batch["batch_labels"])
    if obj.cce_weight:
        losses["cce"] = obj.cce_weight * out["loss_cce"]
    return losses
