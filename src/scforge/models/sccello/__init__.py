"""scCello (Yuan et al., NeurIPS 2024): a Geneformer backbone pre-trained with cell-ontology guidance.

``ScCello`` (api) is the user class; ``losses``, ``training`` (``pretrain``) and ``tasks`` hold the
objectives, pre-training and the zero-shot tasks."""

from scforge.models.sccello.api import ScCello
from scforge.models.sccello.config import SCCELLO_VOCAB_SIZE, ScCelloConfig
from scforge.models.sccello.model import ProjectionHead, ScCelloModel

__all__ = ["SCCELLO_VOCAB_SIZE", "ProjectionHead", "ScCello", "ScCelloConfig", "ScCelloModel"]
