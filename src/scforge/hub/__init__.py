"""Read and write model checkpoints safely: scforge model folders, scGPT files, format detection.

* :func:`safe_torch_load`: PyTorch ``.pt`` state dicts via ``torch.load(weights_only=True)`` only;
  files that would run code are refused with :class:`~scforge.errors.UnsafeFileError`.
* :func:`save_model_folder` / :func:`load_model_folder`: scforge's own folder (``config.json``,
  ``model.safetensors``, ``vocab.json``, ``card.md``), written atomically and checksum-verified.
* :func:`detect_format` / :func:`scgpt_files`: which format a path holds, and the scGPT file trio.
"""

from __future__ import annotations

from scforge.hub.detect import detect_format, scgpt_files
from scforge.hub.folder import ModelFolder, load_model_folder, replace_folder, save_model_folder, sha256_file
from scforge.hub.safe_load import safe_torch_load

__all__ = [
    "replace_folder",
    "safe_torch_load",
    "save_model_folder",
    "load_model_folder",
    "ModelFolder",
    "detect_format",
    "scgpt_files",
    "sha256_file",
]
