"""Model families. Each is a pure torch module configured by a dataclass, plus published-format loaders."""

from __future__ import annotations

import os
from typing import Any


def load(path: str | os.PathLike, **kwargs: Any):
    """Load a model folder of any supported format, detected from its files.

    scGPT folders (``best_model.pt`` + ``args.json`` + ``vocab.json``) and scforge folders
    (``config.json`` + ``model.safetensors`` + ``vocab.json`` + ``card.md``) give an
    :class:`scforge.models.scgpt.ScGPT`; ``kwargs`` go to the family's loader (e.g. ``n_cls=``)."""
    from scforge.errors import CheckpointError
    from scforge.hub import detect_format, load_model_folder

    kind = detect_format(path)
    if kind == "scgpt":
        from scforge.models.scgpt import ScGPT

        return ScGPT.from_published(path, **kwargs)
    if kind == "scforge":
        family = load_model_folder(path).family
        if family == "scgpt":
            from scforge.models.scgpt import ScGPT

            return ScGPT.from_folder(path)
        raise CheckpointError(f"{path} holds a {family!r} model, which this version of scforge cannot load yet.")
    raise CheckpointError(f"{path} is a {kind} model folder, which this version of scforge cannot load yet.")
