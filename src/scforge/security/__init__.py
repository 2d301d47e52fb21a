"""Backdoor red-teaming and defence for single-cell classifiers (scBackdoor reproduced, then beaten)."""

from __future__ import annotations

from scforge.security.poison import PoisonedData, gini_coefficient, poison, poison_tokens, select_poison_cells
from scforge.security.audit import audit, audit_tokens, level_consistency
from scforge.security.defend import fine_prune
from scforge.security.experiment import AttackResult, attack_success_rate, run_attack, split_cells, sweep_attack
from scforge.security.triggers import FixedGeneTrigger, RankShuffleTrigger, SparsifyTrigger, trigger_from_name
from scforge.security.detect import gene_token_counts, rank_consistency
from scforge.security.unlearn import reconstruct_token_trigger, reconstruct_trigger, unlearning_set, unlearning_tokens
from scforge.security.victims import LogisticVictim, ModelVictim, as_victim, require_token_victim

__all__ = [
    "SparsifyTrigger", "RankShuffleTrigger", "FixedGeneTrigger", "trigger_from_name",
    "gini_coefficient", "select_poison_cells", "poison", "poison_tokens", "PoisonedData",
    "audit", "audit_tokens", "level_consistency", "rank_consistency", "gene_token_counts",
    "run_attack", "sweep_attack", "AttackResult", "attack_success_rate", "split_cells",
    "LogisticVictim", "ModelVictim", "as_victim", "require_token_victim", "fine_prune",
    "reconstruct_trigger", "reconstruct_token_trigger", "unlearning_set", "unlearning_tokens",
]
