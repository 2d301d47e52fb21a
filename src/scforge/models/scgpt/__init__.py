"""scGPT on the shared core: config, torch module, published checkpoints, and the user-facing model."""

from scforge.models.scgpt.api import ScGPT
from scforge.models.scgpt.checkpoint import LoadReport, detect_layout, to_published_keys, to_scforge_keys
from scforge.models.scgpt.config import ScGPTConfig
from scforge.models.scgpt.model import ScGPTModel
from scforge.models.scgpt.multiomic import MultiOmicConfig, MultiOmicScGPTModel

__all__ = ["LoadReport", "MultiOmicConfig", "MultiOmicScGPTModel", "ScGPT", "ScGPTConfig", "ScGPTModel", "detect_layout", "to_published_keys",
           "to_scforge_keys"]
