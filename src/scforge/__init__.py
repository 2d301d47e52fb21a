"""scforge: single-cell transcriptome foundation models (scGPT, Geneformer, scBERT, ...) on one fast core.

The top-level namespace is small and imports lazily; nothing heavy happens at ``import scforge``.

>>> import scforge
>>> tok = scforge.tokenize.BinnedTokenizer(vocab)      # doctest: +SKIP
>>> cells = tok.tokenize(adata)                         # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

__version__ = "0.1.0"

logging.getLogger("scforge").addHandler(logging.NullHandler())

_SUBMODULES = {"genes", "tokenize", "matrix", "errors", "nn", "models", "hub", "metrics", "tasks"}


def load(path: Any, **kwargs: Any) -> Any:
    """Load a model folder (published scGPT, or scforge's own format); see :func:`scforge.models.load`."""
    from scforge.models import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"scforge.{name}")
    raise AttributeError(f"module 'scforge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_SUBMODULES))
