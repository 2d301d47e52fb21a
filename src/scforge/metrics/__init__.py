"""Evaluation metrics (classification: accuracy, macro F1, Cohen's kappa, confusion matrix)."""

from scforge.metrics.classification import ClassificationReport, classification_metrics

__all__ = ["ClassificationReport", "classification_metrics"]
