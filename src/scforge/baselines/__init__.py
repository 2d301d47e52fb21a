"""Simple baselines that foundation models must beat: L1 logistic regression on log-normalised expression
(sc-foundation-eval), HVG + PCA embeddings, kNN / logistic probes on any embedding, Harmony integration,
mean/additive/linear perturbation models, co-expression gene networks and concatenated per-modality PCA.

Heavy libraries (scanpy, harmonypy) are imported only when a function needs them.
"""

from scforge.baselines.coexpression import coexpression_difference, coexpression_network
from scforge.baselines.harmony import harmony_integrate, harmony_pca
from scforge.baselines.logistic import DEFAULT_C_GRID, LogisticBaseline, log1p_cp10k, log2_cp10k
from scforge.baselines.pca import HVGPCA, highly_variable_genes, hvg_pca
from scforge.baselines.perturbation import (Additive, FeatureRegressor, LinearModel, NoChange,
                                            PerturbationBaseline, TrainMean, baseline_registry,
                                            go_feature_matrix, make_baseline)
from scforge.baselines.multiomic import concat_pca
from scforge.baselines.probes import EmbeddingClassifier

__all__ = [
    "coexpression_difference",
    "coexpression_network",
    "concat_pca",
    "Additive",
    "FeatureRegressor",
    "LinearModel",
    "NoChange",
    "PerturbationBaseline",
    "TrainMean",
    "baseline_registry",
    "go_feature_matrix",
    "make_baseline",
    "DEFAULT_C_GRID",
    "EmbeddingClassifier",
    "HVGPCA",
    "LogisticBaseline",
    "harmony_integrate",
    "harmony_pca",
    "highly_variable_genes",
    "hvg_pca",
    "log1p_cp10k",
    "log2_cp10k",
]
