"""Model families. Each is a pure torch module configured by a dataclass, plus published-format loaders."""

from __future__ import annotations

import os
from typing import Any


def default_model_path() -> os.PathLike:
    """Folder of the small scGPT-family model shipped inside the package (``scforge.load("default")``)."""
    from importlib import resources

    from scforge.errors import CheckpointError

    folder = resources.files("scforge.models") / "default"
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(
            "The default model is not in this installation (src/scforge/models/default/). Rebuild it with "
            "`python scripts/train_default_model.py`."
        )
    return folder  # type: ignore[return-value]


def load(path: str | os.PathLike, **kwargs: Any):
    """Load a model folder of any supported format, detected from its files; ``"default"`` is the
    small scGPT-family model that ships with scforge (pretrained on ifnb, see its ``card.md``).

    scGPT folders (``best_model.pt`` + ``args.json`` + ``vocab.json``) and scforge folders
    (``config.json`` + ``model.safetensors`` + ``vocab.json`` + ``card.md``) give an
    :class:`scforge.models.scgpt.ScGPT`; ``kwargs`` go to the family's loader (e.g. ``n_cls=``)."""
    from scforge.errors import CheckpointError
    from scforge.hub import detect_format, load_model_folder

    if str(path) == "default":
        path = default_model_path()
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
