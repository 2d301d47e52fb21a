"""scBERT on the shared core: config, FAVOR+ Performer module, published ``.pth`` checkpoints, the
user-facing model, and its training objectives."""

from scforge.models.scbert.api import ScBERT, as_gene_panel
from scforge.models.scbert.checkpoint import (
    LoadReport,
    detect_layout,
    load_gene2vec,
    read_published_state,
    to_published_keys,
    to_scforge_keys,
)
from scforge.models.scbert.config import ScBERTConfig
from scforge.models.scbert.model import ScBERTModel
from scforge.models.scbert.performer import FavorSelfAttention, favor_attention, gaussian_orthogonal_random_matrix

__all__ = ["FavorSelfAttention", "LoadReport", "ScBERT", "ScBERTConfig", "ScBERTModel", "as_gene_panel",
           "detect_layout", "favor_attention", "gaussian_orthogonal_random_matrix", "load_gene2vec",
           "read_published_state", "to_published_keys", "to_scforge_keys"]
