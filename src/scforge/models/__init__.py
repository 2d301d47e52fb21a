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


# family name in a scforge folder's config.json -> (module, user class); each class has from_folder(path)
FAMILIES: dict[str, tuple[str, str]] = {
    "scgpt": ("scforge.models.scgpt", "ScGPT"),
    "geneformer": ("scforge.models.geneformer", "Geneformer"),
    "scbert": ("scforge.models.scbert", "ScBERT"),
    "sccello": ("scforge.models.sccello", "ScCello"),
    "scgpt-perturb": ("scforge.tasks.perturb", "PerturbationModel"),
    "scgpt-integration": ("scforge.tasks.integrate", "IntegrationModel"),
    "scgpt-multiomic": ("scforge.tasks.multiomic", "MultiOmicModel"),
}


def family_class(family: str):
    """The user class of a model family (e.g. ``"scgpt"`` -> :class:`~scforge.models.scgpt.ScGPT`)."""
    import importlib

    from scforge.errors import CheckpointError

    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; this version of scforge knows {sorted(FAMILIES)}.")
    module, name = FAMILIES[family]
    return getattr(importlib.import_module(module), name)


def load(path: str | os.PathLike, **kwargs: Any):
    """Load a model of any supported format, detected from its files; ``"default"`` is the small
    scGPT-family model that ships with scforge (pretrained on ifnb, see its ``card.md``).

    - scforge folders (``config.json`` with ``"family"`` + ``model.safetensors`` + ``vocab.json`` +
      ``card.md``): that family's class.
    - scGPT folders (``best_model.pt`` + ``args.json`` + ``vocab.json``): :class:`~scforge.models.scgpt.ScGPT`.
    - Hugging Face BERT folders (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``):
      :class:`~scforge.models.geneformer.Geneformer`.
    - an scBERT checkpoint file (``.pth``/``.pt``): :class:`~scforge.models.scbert.ScBERT`.

    ``kwargs`` go to the family's published-format loader (e.g. ``n_cls=`` for scGPT, ``gene2vec=``
    for scBERT, ``dictionaries=`` for Geneformer)."""
    from pathlib import Path

    from scforge.hub import detect_format, load_model_folder

    if str(path) == "default":
        path = default_model_path()
    file = Path(path)
    if file.is_file() and file.suffix in (".pth", ".pt") and not (file.parent / "args.json").is_file():
        return family_class("scbert").from_published(path, **kwargs)
    kind = detect_format(path)
    if kind == "scgpt":
        return family_class("scgpt").from_published(path, **kwargs)
    if kind == "huggingface":
        return family_class("geneformer").from_published(path, **kwargs)
    return family_class(load_model_folder(path).family).from_folder(path)
