"""Geneformer (Theodoris et al.): rank-value encoded cells through a BERT encoder."""

from scforge.models.geneformer.api import Geneformer
from scforge.models.geneformer.config import GeneformerConfig
from scforge.models.geneformer.model import (
    BertBackbone,
    BertMLMHead,
    GeneformerForMaskedLM,
    GeneformerForSequenceClassification,
)

__all__ = [
    "BertBackbone",
    "BertMLMHead",
    "Geneformer",
    "GeneformerConfig",
    "GeneformerForMaskedLM",
    "GeneformerForSequenceClassification",
]
