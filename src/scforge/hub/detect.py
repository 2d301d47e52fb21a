"""Tell which checkpoint format a path holds: scforge folder, scGPT folder, or Hugging Face folder.

* ``"scforge"``: ``config.json`` with a ``"scforge_format"`` key (see :mod:`scforge.hub.folder`);
* ``"scgpt"``: ``args.json`` + ``vocab.json`` + ``best_model.pt`` (or exactly one other ``*.pt``),
  or a ``.pt`` file whose folder holds ``args.json``;
* ``"huggingface"``: ``config.json`` + ``model.safetensors`` or ``pytorch_model.bin`` (or their
  sharded ``*.index.json``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from scforge.errors import CheckpointError

__all__ = ["detect_format", "scgpt_files", "FORMATS"]

FORMATS = ("scforge", "scgpt", "huggingface")
SCGPT_WEIGHTS = "best_model.pt"
_HF_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)
_NEEDS = (
    "scforge: config.json with \"scforge_format\", model.safetensors, vocab.json, card.md; "
    "scGPT: args.json, vocab.json and best_model.pt (or exactly one other .pt file); "
    "Hugging Face: config.json and model.safetensors or pytorch_model.bin"
)


def _listing(path: Path, limit: int = 15) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir())
    if not names:
        return "nothing (the folder is empty)"
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def _pt_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".pt" and p.is_file())


def _scgpt_weights(folder: Path) -> Path | None:
    """best_model.pt, else the only .pt file; None when there is none or the choice is ambiguous."""
    if (folder / SCGPT_WEIGHTS).is_file():
        return folder / SCGPT_WEIGHTS
    pts = _pt_files(folder)
    return pts[0] if len(pts) == 1 else None


def _has_scforge_config(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"'{cfg}' cannot be parsed as JSON ({exc}), so the format of '{folder}' cannot be told. "
            "The file is damaged: re-download or re-save the model."
        ) from None
    return isinstance(data, dict) and "scforge_format" in data


def detect_format(path: str | os.PathLike) -> str:
    """``"scforge"``, ``"scgpt"`` or ``"huggingface"`` for a checkpoint folder (or scGPT ``.pt`` file).

    Raises :class:`~scforge.errors.CheckpointError` when the path does not exist or matches no
    format, listing what it holds and what each format needs.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The checkpoint path '{path}' does not exist. Check the path.")
    if path.is_file():
        if path.suffix == ".pt" and (path.parent / "args.json").is_file():
            return "scgpt"
        raise CheckpointError(
            f"'{path}' is a file, not a checkpoint folder (only an scGPT .pt file next to its args.json "
            f"is accepted as a file). Pass the folder holding the model. Formats: {_NEEDS}."
        )
    if _has_scforge_config(path):
        return "scforge"
    has = {name: (path / name).is_file() for name in ("args.json", "vocab.json", "config.json")}
    if has["args.json"] and has["vocab.json"] and _scgpt_weights(path) is not None:
        return "scgpt"
    if has["config.json"] and any((path / name).is_file() for name in _HF_WEIGHTS):
        return "huggingface"
    hint = ""
    if has["args.json"]:
        pts = _pt_files(path)
        if not has["vocab.json"]:
            hint = " It has args.json like an scGPT folder but no vocab.json."
        elif not pts:
            hint = " It has args.json and vocab.json like an scGPT folder but no .pt weights file."
        else:
            hint = (
                f" It looks like an scGPT folder but has several .pt files ({', '.join(p.name for p in pts)}) "
                f"and none is {SCGPT_WEIGHTS}; rename the one to use to {SCGPT_WEIGHTS} or pass that .pt file."
            )
    elif has["config.json"]:
        hint = " It has config.json but no weights file (model.safetensors / pytorch_model.bin)."
    raise CheckpointError(
        f"Cannot tell the checkpoint format of '{path}': it holds {_listing(path)}.{hint} Formats: {_NEEDS}."
    )


def scgpt_files(path: str | os.PathLike) -> tuple[Path, Path, Path]:
    """``(weights .pt, args.json, vocab.json)`` of an scGPT checkpoint folder or ``.pt`` file.

    Raises :class:`~scforge.errors.CheckpointError` naming the missing files, or listing the
    ``.pt`` files when there are several and none is ``best_model.pt``.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The scGPT checkpoint path '{path}' does not exist. Check the path.")
    if path.is_file():
        if path.suffix != ".pt":
            raise CheckpointError(
                f"'{path}' is not an scGPT weights file (.pt). Pass the scGPT folder (args.json, vocab.json, "
                f"{SCGPT_WEIGHTS}) or its .pt file."
            )
        folder, weights = path.parent, path
    else:
        folder = path
        pts = _pt_files(folder)
        weights = _scgpt_weights(folder)
        if weights is None and len(pts) > 1:
            raise CheckpointError(
                f"The scGPT folder '{folder}' has several .pt files ({', '.join(p.name for p in pts)}) and none "
                f"is {SCGPT_WEIGHTS}, so scforge cannot tell which holds the model. Pass the .pt file itself "
                f"or rename it to {SCGPT_WEIGHTS}."
            )
    missing = [name for name in ("args.json", "vocab.json") if not (folder / name).is_file()]
    if weights is None:
        missing.insert(0, f"{SCGPT_WEIGHTS} (or another .pt weights file)")
    if missing:
        raise CheckpointError(
            f"The scGPT checkpoint folder '{folder}' is missing {', '.join(missing)}; it holds {_listing(folder)}. "
            f"An scGPT checkpoint needs args.json, vocab.json and {SCGPT_WEIGHTS}: download all three."
        )
    return weights, folder / "args.json", folder / "vocab.json"
