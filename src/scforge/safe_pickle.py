"""Load data-only pickles (e.g. Geneformer's token and median dictionaries) without running code.

A pickle is a small program: its ``GLOBAL``/``STACK_GLOBAL`` instructions import any callable and
``REDUCE`` calls it, so ``pickle.load`` on a file from the internet can run ``os.system``. The
:func:`safe_load_pickle` here resolves globals through an allow-list and refuses everything else
*before* anything is called, raising :class:`~scforge.errors.UnsafeFileError` that names the
forbidden global and the file.

Allowed:

* builtin containers and scalars: ``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``str``,
  ``bytes``, ``bytearray``, ``int``, ``float``, ``complex``, ``bool``, ``None``
  (``None``/``True``/``False`` need no global), and ``collections.OrderedDict``;
* ``_codecs.encode`` restricted to latin-1 (how protocol 2 pickles store ``bytes``);
* NumPy scalars and dtypes (``numpy.core.multiarray.scalar`` / ``numpy._core.multiarray.scalar``,
  ``numpy.dtype``): Geneformer's dictionaries hold ``numpy.int16`` ids and ``numpy.float64``
  medians;
* plain NumPy arrays (``multiarray._reconstruct`` only with ``numpy.ndarray``, ``numpy.ndarray``,
  and protocol-5 ``numeric._frombuffer``). Object arrays are fine: their elements go through the
  same allow-list.

The legacy ``numpy.core`` module paths are resolved to the same objects without importing
``numpy.core`` (deprecated in NumPy 2).
"""

from __future__ import annotations

import io
import os
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from scforge.errors import InputDataError, UnsafeFileError

__all__ = ["safe_load_pickle", "ALLOWED_GLOBALS"]


def _numpy_core():
    """NumPy's core package (``numpy._core`` on NumPy 2, ``numpy.core`` on 1.x)."""
    core = getattr(np, "_core", None)
    if core is None:  # pragma: no cover - NumPy 1.x
        import numpy.core as core  # type: ignore[no-redef]
    return core


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as used by protocol-2 pickles for ``bytes``; only latin-1 is allowed."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(
            f"_codecs.encode called with encoding {encoding!r}; only latin-1 string encoding is allowed"
        )
    return obj.encode("latin-1", errors)


def _safe_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """``numpy...multiarray._reconstruct`` limited to plain ``numpy.ndarray`` (no subclasses)."""
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array reconstruction of {subtype!r} is not allowed")
    core = _numpy_core()
    return core.multiarray._reconstruct(subtype, shape, dtype)


def _safe_frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("frombuffer with an object dtype is not allowed")
    return _numpy_core().numeric._frombuffer(buf, dtype, shape, order)


def _safe_scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype):
        raise pickle.UnpicklingError(f"numpy scalar of non-dtype {dtype!r} is not allowed")
    return _numpy_core().multiarray.scalar(dtype, *args)


def _allowed_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("builtins", name): obj
        for name, obj in {
            "dict": dict,
            "list": list,
            "tuple": tuple,
            "set": set,
            "frozenset": frozenset,
            "str": str,
            "bytes": bytes,
            "bytearray": bytearray,
            "int": int,
            "float": float,
            "complex": complex,
            "bool": bool,
        }.items()
    }
    # Python 2 pickles name the builtins module __builtin__
    table.update({("__builtin__", k[1]): v for k, v in list(table.items())})
    table[("collections", "OrderedDict")] = OrderedDict
    table[("_codecs", "encode")] = _latin1_encode
    table[("numpy", "dtype")] = np.dtype
    table[("numpy", "ndarray")] = np.ndarray
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "scalar")] = _safe_scalar
        table[(f"{core}.multiarray", "_reconstruct")] = _safe_reconstruct
        table[(f"{core}.numeric", "_frombuffer")] = _safe_frombuffer
    return table


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, where: str) -> None:
        super().__init__(file)
        self._where = where

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle hook
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafeFileError(
                f"Refusing to load {self._where}: the pickle references the global "
                f"'{module}.{name}', which is not a plain data type, and unpickling it could run "
                "code. scforge only loads pickles made of dicts, lists, tuples, sets, strings, "
                "numbers and NumPy scalars/arrays (e.g. Geneformer dictionaries). If you trust "
                "the file and it is meant to hold data, re-save it as plain Python types (or as "
                "JSON) and load that instead."
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(
            f"Refusing to load {self._where}: the pickle uses persistent ids ({str(pid)[:80]!r}), "
            "as torch checkpoints do; it is not a plain data pickle. Load model weights with the "
            "model loaders (safetensors or the checkpoint readers), not as a dictionary pickle."
        )


def safe_load_pickle(path_or_bytes: str | os.PathLike | bytes | bytearray | memoryview | BinaryIO) -> Any:
    """Unpickle a data-only pickle from a path, bytes or a binary file object.

    Raises :class:`~scforge.errors.UnsafeFileError` (naming the forbidden global and the file)
    when the pickle would import anything outside the allow-list (see the module docstring), and
    :class:`~scforge.errors.InputDataError` when the file is missing or is not a readable pickle.
    Nothing from the pickle is called before its globals pass the check.
    """
    if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(path_or_bytes)
        where = f"the pickle bytes ({len(data):,} bytes)"
    elif isinstance(path_or_bytes, (str, os.PathLike)):
        path = Path(path_or_bytes)
        where = f"pickle file '{path}'"
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise InputDataError(f"Cannot read {where}: the file does not exist. Check the path.") from None
        except IsADirectoryError:
            raise InputDataError(f"Cannot read {where}: it is a folder, not a pickle file.") from None
        except OSError as exc:
            raise InputDataError(f"Cannot read {where}: {exc}. Check the path and its permissions.") from None
    elif hasattr(path_or_bytes, "read"):
        data = path_or_bytes.read()
        if not isinstance(data, (bytes, bytearray)):
            raise InputDataError("safe_load_pickle needs a binary file object (open(path, 'rb')), got a text stream.")
        where = f"pickle stream {getattr(path_or_bytes, 'name', '')!s}".rstrip()
    else:
        raise InputDataError(
            f"safe_load_pickle expects a path, bytes or a binary file object, got {type(path_or_bytes).__name__}."
        )

    if data[:4] == b"PK\x03\x04":
        raise UnsafeFileError(
            f"Refusing to load {where}: it is a zip archive (a torch.save checkpoint?), not a plain "
            "data pickle. Torch checkpoints must be read by the model loaders, not as dictionaries."
        )
    try:
        return _RestrictedUnpickler(io.BytesIO(data), where).load()
    except UnsafeFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, UnicodeDecodeError, OverflowError, MemoryError) as exc:
        raise InputDataError(
            f"Cannot read {where}: it is not a valid data pickle ({type(exc).__name__}: {exc}). "
            "The file may be truncated, not a pickle, or made by an incompatible program; "
            "download or re-create it."
        ) from None
