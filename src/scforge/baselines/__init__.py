"""Simple baselines that foundation models must beat (more arrive with the evaluation harness)."""

from scforge.baselines.logistic import LogisticBaseline, log1p_cp10k

__all__ = ["LogisticBaseline", "log1p_cp10k"]
