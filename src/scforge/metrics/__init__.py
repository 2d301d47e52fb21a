"""Evaluation metrics: classification (accuracy, macro F1, Cohen's kappa, confusion matrix) and
clustering of embeddings (Leiden with a resolution sweep; NMI, ARI, label ASW, AvgBio)."""

from scforge.metrics.classification import ClassificationReport, classification_metrics
from scforge.metrics.clustering import ClusteringReport, best_leiden, clustering_metrics
from scforge.metrics.integration import (
    IntegrationReport,
    avg_batch,
    avg_bio,
    integration_metrics,
    integration_metrics_adata,
)

__all__ = ["ClassificationReport", "ClusteringReport", "best_leiden", "classification_metrics", "clustering_metrics"]
__all__ += ["IntegrationReport", "avg_batch", "avg_bio", "integration_metrics", "integration_metrics_adata"]
from scforge.metrics.perturbation import (
    evaluate_perturbations,
    pearson_delta,
    perturbation_metrics,
    summarize_perturbations,
    top_expressed_genes,
)

__all__ += ["evaluate_perturbations", "pearson_delta", "perturbation_metrics", "summarize_perturbations",
            "top_expressed_genes"]
from scforge.metrics.grn import (
    gene_set_recovery,
    go_gene_sets,
    interferon_genes,
    n_enriched_programs,
    program_enrichment,
)

__all__ += ["gene_set_recovery", "go_gene_sets", "interferon_genes", "n_enriched_programs", "program_enrichment"]
