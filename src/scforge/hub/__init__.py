"""Read and write model checkpoints safely: scforge model folders, scGPT files, format detection.

* :func:`safe_torch_load`: PyTorch ``.pt`` state dicts via ``torch.load(weights_only=True)`` only;
  files that would run code are refused with :class:`~scforge.errors.UnsafeFileError`.
* :func:`save_model_folder` / :func:`load_model_folder`: scforge's own folder (``config.json``,
  ``model.safetensors``, ``vocab.json``, ``card.md``), written atomically and checksum-verified.
* :func:`detect_format` / :func:`scgpt_files`: which format a path holds, and the scGPT file trio.
* :func:`verify_listed_checksums`: files checked against a folder's ``SHA256SUMS`` / model card
  sha256 lines before they are deserialised.
* :func:`safe_torch_load_object` (a whole ``.ckpt``, weights-only) and :func:`safe_numpy_load`
  (``.npy`` / ``.npz`` without pickles).
"""

from __future__ import annotations

from scforge.hub.checksums import verify_file_checksum, verify_listed_checksums
from scforge.hub.detect import detect_format, scgpt_files
from scforge.hub.folder import ModelFolder, load_model_folder, replace_folder, save_model_folder, sha256_file
from scforge.hub.safe_load import safe_numpy_load, safe_torch_load, safe_torch_load_object

__all__ = [
    "replace_folder",
    "safe_torch_load",
    "safe_torch_load_object",
    "safe_numpy_load",
    "verify_listed_checksums",
    "verify_file_checksum",
    "save_model_folder",
    "load_model_folder",
    "ModelFolder",
    "detect_format",
    "scgpt_files",
    "sha256_file",
]
