"""scforge's own model folder: ``config.json``, ``model.safetensors``, ``vocab.json``, ``card.md``.

* ``config.json``: ``{"scforge_format": 1, "family": ..., "scforge_version": ..., "config": {...},
  "sha256": {"model.safetensors": "<hex>"}}``;
* ``model.safetensors``: the weights (no pickle anywhere, so loading runs no code);
* ``vocab.json``: the gene vocabulary in scforge's JSON format (:meth:`GeneVocab.save`);
* ``card.md``: a human-readable model card, ending with the sha256 of ``model.safetensors``
  (a section scforge adds on saving and strips again on loading, so :attr:`ModelFolder.card` is
  the card text as given).

:func:`save_model_folder` builds the folder in a temporary sibling and renames it into place, so
a crash never leaves a half-written folder at the target; :func:`load_model_folder` checks every
file and the weights' checksum before returning anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from scforge.errors import CheckpointError, ConfigError, VocabularyError
from scforge.genes.vocab import GeneVocab
from scforge.hub.checksums import verify_listed_checksums

__all__ = [
    "ModelFolder",
    "save_model_folder",
    "load_model_folder",
    "sha256_file",
    "FOLDER_FILES",
    "SCFORGE_FORMAT",
]

SCFORGE_FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
VOCAB_FILE = "vocab.json"
CARD_FILE = "card.md"
#: the files every scforge model folder holds
FOLDER_FILES = (CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE, CARD_FILE)
#: safetensors metadata entry holding the state dict's key order (safetensors sorts tensors)
ORDER_KEY = "scforge_key_order"
_REQUIRED_KEYS = ("scforge_format", "family", "config", "sha256")
#: marks the checksum section scforge appends to ``card.md`` (see :func:`card_with_checksums`)
CARD_CHECKSUMS_MARK = "<!-- scforge:checksums -->"
_BLOCK = 1 << 20


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ModelFolder:
    """Everything a scforge model folder holds, as loaded by :func:`load_model_folder`."""

    path: Path
    family: str
    config: dict
    state_dict: dict[str, torch.Tensor]
    vocab: GeneVocab
    card: str


# ---- saving ------------------------------------------------------------------------------------
def _scforge_version() -> str:
    try:
        from scforge import __version__

        return str(__version__)
    except ImportError:  # pragma: no cover - partially initialised package
        from importlib.metadata import version

        return version("scforge")


def _prepare_tensors(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU copies (so tied / shared / strided tensors all save), with clear errors."""
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(
            f"state_dict must be a mapping {{name: tensor}} (e.g. model.state_dict()), got {type(state_dict).__name__}."
        )
    if not state_dict:
        raise CheckpointError("state_dict is empty: there are no weights to save. Pass model.state_dict().")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(key, str):
            raise CheckpointError(
                f"state_dict key {key!r} is a {type(key).__name__}; parameter names must be str."
            )
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor; only tensors go "
                "into model.safetensors. Put other settings into `config` instead."
            )
        if value.layout != torch.strided:
            raise CheckpointError(
                f"state_dict entry {key!r} is a {value.layout} tensor; safetensors stores dense tensors "
                "only. Convert it with .to_dense() first."
            )
        out[key] = value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    return out


def _config_json(family: str, config: dict, weights_sha: str) -> str:
    if not isinstance(family, str) or not family:
        raise ConfigError(f"family must be a non-empty str (e.g. 'scgpt'), got {family!r}.")
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict of model settings, got {type(config).__name__}.")
    payload = {
        "scforge_format": SCFORGE_FORMAT,
        "family": family,
        "scforge_version": _scforge_version(),
        "config": dict(config),
        "sha256": {WEIGHTS_FILE: weights_sha},
    }
    try:
        return json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"The model config cannot be written as JSON ({exc}). Use only str, int, float (finite), "
            "bool, None, lists and dicts with str keys in config."
        ) from None


def card_with_checksums(card: str, digests: Mapping[str, str]) -> str:
    """``card`` plus a "Checksums" section listing ``- `name` sha256: <hex>`` per file (the form
    :mod:`scforge.hub.checksums` reads); an earlier such section is replaced."""
    lines = "".join(f"- `{name}` sha256: {digest}\n" for name, digest in digests.items())
    return f"{card_without_checksums(card)}\n{CARD_CHECKSUMS_MARK}\n## Checksums\n\n{lines}"


def card_without_checksums(text: str) -> str:
    """The card text without the section :func:`card_with_checksums` appended."""
    head, mark, _ = text.rpartition(f"\n{CARD_CHECKSUMS_MARK}\n")
    return head if mark else text


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync(path: Path) -> None:
    """fsync a file or a directory (directories: best effort, not on every platform)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. directories on Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _is_replaceable(path: Path) -> bool:
    """True for a folder that is (or was being written as) a scforge model folder."""
    names = {p.name for p in path.iterdir()}
    if names <= set(FOLDER_FILES):
        return True
    try:
        data = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "scforge_format" in data


def save_model_folder(
    path: str | os.PathLike,
    *,
    family: str,
    config: dict,
    state_dict: Mapping[str, torch.Tensor],
    vocab: GeneVocab,
    card: str,
    overwrite: bool = False,
) -> Path:
    """Write a scforge model folder at ``path`` atomically and return its path.

    The folder is built in a temporary sibling and renamed into place at the end. An existing
    non-empty ``path`` is refused unless ``overwrite=True``; even then only a scforge model folder
    is replaced (the old one is moved aside, the new one moved in, then the old one deleted), never
    an unrelated folder or a file.
    """
    path = Path(path)
    if not isinstance(vocab, GeneVocab):
        raise ConfigError(f"vocab must be a scforge GeneVocab, got {type(vocab).__name__}.")
    if not isinstance(card, str):
        raise ConfigError(f"card must be the model card text (str), got {type(card).__name__}.")
    tensors = _prepare_tensors(state_dict)
    _config_json(family, config, "0" * 64)  # validate before touching the disk
    _check_target(path, overwrite)

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        from safetensors.torch import save_file

        try:
            metadata = {"format": "pt", ORDER_KEY: json.dumps(list(tensors))}
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)
        except Exception as exc:
            raise CheckpointError(f"Writing the weights to '{path / WEIGHTS_FILE}' failed: {exc}") from exc
        _fsync(tmp / WEIGHTS_FILE)
        del tensors
        weights_sha = sha256_file(tmp / WEIGHTS_FILE)
        _write_text(tmp / CONFIG_FILE, _config_json(family, config, weights_sha))
        vocab.save(tmp / VOCAB_FILE)
        _fsync(tmp / VOCAB_FILE)
        _write_text(tmp / CARD_FILE, card_with_checksums(card, {WEIGHTS_FILE: weights_sha}))
        _fsync(tmp)
        _move_into_place(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync(path.parent)
    return path


def _check_target(path: Path, overwrite: bool) -> None:
    if not path.exists():
        return
    if not path.is_dir():
        raise CheckpointError(
            f"'{path}' exists and is a file, not a model folder; scforge will not replace it. Choose "
            "another path or remove the file."
        )
    if not any(path.iterdir()):
        return
    if not overwrite:
        raise CheckpointError(
            f"The folder '{path}' already exists and is not empty. Pass overwrite=True to replace a "
            "saved model, or choose another path."
        )
    if not _is_replaceable(path):
        shown = sorted(p.name for p in path.iterdir())[:8]
        raise CheckpointError(
            f"overwrite=True, but '{path}' is not a scforge model folder (it holds {', '.join(shown)}); "
            "scforge only replaces its own model folders. Choose another path or empty the folder yourself."
        )


def _move_into_place(tmp: Path, path: Path, overwrite: bool) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if path.exists():
        _check_target(path, overwrite)  # it may have changed since the first check
    try:
        replace_folder(tmp, path)
    except OSError as exc:
        raise CheckpointError(f"Cannot move the new model folder into '{path}': {exc}.") from exc


def replace_folder(staged: Path, path: Path) -> None:
    """Move the fully written folder ``staged`` to ``path`` by renames (same file system), so ``path``
    is never half-written. An existing ``path`` (the caller has checked it may be replaced) is moved
    aside first, put back if the move fails, and deleted after. An empty ``path`` is simply replaced."""
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
    if not path.exists():
        os.rename(staged, path)
        return
    old = path.parent / f".{path.name}.old-{secrets.token_hex(4)}"
    os.rename(path, old)
    try:
        os.rename(staged, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- loading -----------------------------------------------------------------------------------
def _read_config(path: Path) -> dict[str, Any]:
    cfg_path = path / CONFIG_FILE
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(
            f"'{cfg_path}' is not valid JSON ({exc}); the model folder is damaged. Re-download or re-save it."
        ) from None
    if not isinstance(data, dict):
        raise CheckpointError(f"'{cfg_path}' holds a {type(data).__name__}, not a JSON object; the folder is damaged.")
    if "scforge_format" not in data:
        raise CheckpointError(
            f"'{cfg_path}' has no \"scforge_format\" key, so '{path}' is not a scforge model folder. "
            "Use scforge.hub.detect_format to see which format it is (scGPT, Hugging Face, ...)."
        )
    fmt = data["scforge_format"]
    if fmt != SCFORGE_FORMAT:
        raise CheckpointError(
            f"'{path}' is scforge model folder format {fmt!r}; this scforge reads format {SCFORGE_FORMAT}. "
            f"It was written by scforge {data.get('scforge_version', '?')}: upgrade scforge to load it."
        )
    missing = [k for k in _REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(
            f"'{cfg_path}' lacks the keys {', '.join(missing)}; the model folder is damaged. Re-save it."
        )
    if not isinstance(data["family"], str) or not isinstance(data["config"], dict):
        raise CheckpointError(
            f"'{cfg_path}': \"family\" must be a string and \"config\" an object; the model folder is damaged."
        )
    sha = data["sha256"].get(WEIGHTS_FILE) if isinstance(data["sha256"], dict) else None
    if not isinstance(sha, str) or len(sha) != 64:
        raise CheckpointError(
            f"'{cfg_path}' has no valid \"sha256\" entry for {WEIGHTS_FILE}; the model folder is damaged. Re-save it."
        )
    return data


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file on the CPU, in the key order recorded at save time."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state_dict = load_file(str(path), device="cpu")
    try:
        order = json.loads(metadata.get(ORDER_KEY, "null"))
    except ValueError:
        order = None
    if isinstance(order, list) and sorted(order) == sorted(state_dict):
        state_dict = {k: state_dict[k] for k in order}
    return state_dict


def load_model_folder(path: str | os.PathLike) -> ModelFolder:
    """Read and verify a scforge model folder (files present, config valid, weights checksum).

    The weights must match the sha256 in ``config.json``, and any file listed in a ``SHA256SUMS``
    or model card of the folder must match its digest there (:mod:`scforge.hub.checksums`)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"The model folder '{path}' does not exist. Check the path.")
    if not path.is_dir():
        raise CheckpointError(
            f"'{path}' is a file; a scforge model is a folder holding {', '.join(FOLDER_FILES)}. Pass the folder."
        )
    missing = [name for name in FOLDER_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(
            f"The model folder '{path}' is missing {', '.join(missing)} (a scforge model folder holds "
            f"{', '.join(FOLDER_FILES)}). Re-download or re-save the model."
        )
    data = _read_config(path)
    weights = path / WEIGHTS_FILE
    expected = data["sha256"][WEIGHTS_FILE].lower()
    actual = sha256_file(weights)
    if actual != expected:
        raise CheckpointError(
            f"'{weights}' does not match the checksum in config.json (sha256 {actual[:12]}... instead "
            f"of {expected[:12]}...): the weights file is modified or corrupt. Re-download or re-save the model."
        )
    verify_listed_checksums(path, known={WEIGHTS_FILE: actual})
    try:
        state_dict = _load_safetensors(weights)
    except Exception as exc:
        raise CheckpointError(f"Cannot read the weights '{weights}': {exc}. Re-download or re-save the model.") from None
    try:
        vocab = GeneVocab.from_file(path / VOCAB_FILE)
    except VocabularyError as exc:
        raise CheckpointError(f"The vocabulary of the model folder '{path}' is unusable: {exc}") from exc
    try:
        card = card_without_checksums((path / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"Cannot read the model card '{path / CARD_FILE}': {exc}.") from None
    return ModelFolder(
        path=path, family=data["family"], config=data["config"], state_dict=state_dict, vocab=vocab, card=card
    )

