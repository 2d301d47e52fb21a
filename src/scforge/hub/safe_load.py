"""Load PyTorch checkpoints (``.pt`` / ``.bin`` / ``.ckpt``) without ever running code from them.

:func:`safe_torch_load` only uses ``torch.load(..., weights_only=True)``: PyTorch's restricted
unpickler resolves every global through an allow-list *before* anything is called, so a file that
would need ``os.system`` (or any other callable) to load is refused, not run. scforge turns that
refusal into :class:`~scforge.errors.UnsafeFileError` and every other failure (missing, empty,
truncated, corrupt, not a state dict) into :class:`~scforge.errors.CheckpointError`, each saying
what was wrong, where and how to fix it.

:func:`safe_numpy_load` reads ``.npy`` / ``.npz`` files with ``allow_pickle=False``: an object
array (which NumPy stores as a pickle) is refused with :class:`~scforge.errors.UnsafeFileError`
naming the globals its pickle references (found by decoding the opcodes, never by running them).
"""

from __future__ import annotations

import logging
import io
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from scforge.errors import CheckpointError, UnsafeFileError

__all__ = ["safe_torch_load", "safe_torch_load_object", "safe_numpy_load", "WRAPPER_KEYS"]

logger = logging.getLogger("scforge")

#: keys under which trainers (Lightning, plain loops, ...) nest the model's state dict
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")

_RESAVE_HINT = (
    "In a trusted environment, load the model and re-save only its weights with "
    "`torch.save(model.state_dict(), path)` (or save them as safetensors)."
)
_REDOWNLOAD_HINT = "Re-download or re-copy the file (compare its size / checksum with the source)."

# Messages of torch's weights-only unpickler that mean "this file needs a non-allowed callable/class".
_UNSAFE_MARKERS = (
    "was not an allowed global",
    "Unsupported global",
    "is blocked",
    "Trying to call reduce for unrecognized function",
    "Can only create new object for",
    "Can only build Tensor",
    "Only persistent_load of storage is allowed",
)
_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
_STRING_OPS = {
    "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING",
}
_NO_PUSH_OPS = {"PROTO", "FRAME", "MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT", "MARK"}


def safe_torch_load(path: str | os.PathLike, *, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict from ``path`` with ``torch.load(weights_only=True)`` on the CPU.

    Accepts a plain state dict (``{name: Tensor}``, e.g. scGPT's ``best_model.pt``) or a wrapper
    dict holding one under ``"state_dict"``, ``"model_state_dict"`` or ``"model"`` (unwrapped, with
    an INFO log). ``what`` names the file in messages (e.g. ``"scGPT weights"``).

    Raises :class:`~scforge.errors.UnsafeFileError` when the file would need to execute code to
    load (nothing in it is run) and :class:`~scforge.errors.CheckpointError` when it is missing,
    empty, truncated, corrupt or not a state dict. Returns a plain ``dict`` in file order.
    """
    path = Path(path)
    return _as_state_dict(safe_torch_load_object(path, what=what), path, what)


def safe_torch_load_object(path: str | os.PathLike, *, what: str = "checkpoint") -> Any:
    """Whatever ``torch.load(path, weights_only=True)`` returns (on the CPU), e.g. a whole Lightning
    ``.ckpt`` (state dict, optimizer and loop states), with the errors of :func:`safe_torch_load`:
    :class:`~scforge.errors.UnsafeFileError` when loading would run code (nothing is run),
    :class:`~scforge.errors.CheckpointError` when the file is missing, empty or corrupt."""
    path = Path(path)
    _check_file(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _classify_unpickling_error(path, what, str(exc)) from None
    except Exception as exc:  # RuntimeError (bad zip), EOFError, KeyError, struct.error, ...
        raise _corrupt(path, what, f"{type(exc).__name__}: {_first_line(str(exc))}") from None


# ---- checks before loading ----------------------------------------------------------------------
def _check_file(path: Path, what: str) -> None:
    if not path.exists():
        parent = path.parent
        hint = ""
        if parent.is_dir():
            pts = sorted(p.name for p in parent.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
            if pts:
                hint = f" That folder has: {', '.join(pts[:8])}{' ...' if len(pts) > 8 else ''}."
        else:
            hint = f" Its folder '{parent}' does not exist either."
        raise CheckpointError(f"The {what} file '{path}' does not exist.{hint} Check the path.")
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir())
        shown = ", ".join(inside[:10]) + (" ..." if len(inside) > 10 else "") if inside else "nothing"
        raise CheckpointError(
            f"The {what} path '{path}' is a folder (holding {shown}), not a weights file. Pass the "
            "weights file itself (e.g. best_model.pt), or load the folder with the model's from_pretrained."
        )
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(
            f"The {what} file '{path}' is empty (0 bytes): a download or copy was interrupted. {_REDOWNLOAD_HINT}"
        )


# ---- error classification -----------------------------------------------------------------------
def _first_line(text: str) -> str:
    """First line of an exception message, cut to its first sentence when long."""
    text = text.strip()
    line = text.splitlines()[0] if text else "(no message)"
    if len(line) > 120 and ". " in line:
        line = line.split(". ", 1)[0]
    return line


def _corrupt(path: Path, what: str, detail: str, looks: str = "it looks truncated or corrupt") -> CheckpointError:
    size = path.stat().st_size
    hint = ""
    if _looks_like_safetensors(path):
        hint = (
            " It looks like a safetensors file, not a PyTorch pickle: read it with "
            "safetensors.torch.load_file instead."
        )
    return CheckpointError(
        f"The {what} file '{path}' ({size:,} bytes) cannot be read as a PyTorch checkpoint; {looks} "
        f"({detail}).{hint} {_REDOWNLOAD_HINT}"
    )


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(10)
    return len(head) == 10 and head[8:10] == b'{"'


def _allowed_globals() -> set[str]:
    try:
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        return set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except Exception:  # pragma: no cover - private torch API moved
        return set()


def _classify_unpickling_error(path: Path, what: str, message: str) -> Exception:
    """UnsafeFileError when the file needs a non-allowed global/callable, else CheckpointError."""
    allowed = _allowed_globals()
    found, complete = _scan_globals(path)
    offenders = [g for g in found if g not in allowed]
    if not offenders and complete and any(marker in message for marker in _UNSAFE_MARKERS):
        match = _GLOBAL_IN_MESSAGE.search(message)
        offenders = [match.group(1)] if match else []
    elif not offenders:
        # torch's complaint about a global can come from a name cut short by the end of the file
        reason = message.split("WeightsUnpickler error:")[-1].split("Check the documentation of torch.load")[0]
        looks = "it looks truncated or corrupt" if not complete else (
            "it looks corrupt, or is a pickle not written by torch.save"
        )
        return _corrupt(path, what, f"the safe unpickler stopped: {_first_line(reason)}", looks=looks)
    named_text = f" It references {', '.join(offenders[:6])}." if offenders else ""
    return UnsafeFileError(
        f"The {what} file '{path}' is not a plain weights file: loading it would execute code from the "
        f"file (a pickle that calls or builds objects outside PyTorch's tensor allow-list).{named_text} "
        "scforge refuses to load it and ran nothing from it. If you trust its source, load it once in a "
        "trusted environment and re-save only the weights with `torch.save(model.state_dict(), path)` "
        "(or as safetensors); otherwise get the checkpoint from its official source."
    )


def _scan_globals(path: Path, max_pickles: int = 5) -> tuple[list[str], bool]:
    """Globals (``module.name``) a pickle/torch file references, and whether its pickles parse to the end.

    Opcodes are only decoded (``pickletools.genops``); nothing is imported or called. Legacy
    (non-zip) torch files hold up to five pickles in a row followed by raw tensor bytes.
    """
    found: list[str] = []
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if n.endswith(".pkl")]
                complete = bool(names)
                for name in names:
                    with zf.open(name) as f:
                        complete &= _scan_stream(f, found, 1)
        else:
            with open(path, "rb") as f:
                complete = _scan_stream(f, found, max_pickles)
    except Exception:  # unreadable zip directory etc.
        complete = False
    return list(dict.fromkeys(found)), complete


def _scan_stream(f: BinaryIO, found: list[str], max_pickles: int) -> bool:
    """Decode up to ``max_pickles`` pickles; False when one is cut short or does not parse."""
    for _ in range(max_pickles):
        pushed: list[Any] = []
        memo: dict[int, Any] = {}
        stopped = False
        try:
            for op, arg, _pos in pickletools.genops(f):
                name = op.name
                if name in ("GLOBAL", "INST"):
                    found.append(str(arg).replace(" ", ".", 1).replace("__builtin__.", "builtins.", 1))
                    pushed.append(None)
                elif name == "STACK_GLOBAL":
                    mod, attr = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                    if isinstance(mod, str) and isinstance(attr, str):
                        found.append(f"{mod}.{attr}")
                    else:
                        found.append("<a global whose name could not be read>")
                    pushed.append(None)
                elif name in _STRING_OPS:
                    pushed.append(arg if isinstance(arg, str) else None)
                elif name == "MEMOIZE":
                    memo[len(memo)] = pushed[-1] if pushed else None
                elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                    memo[int(arg)] = pushed[-1] if pushed else None
                elif name in ("GET", "BINGET", "LONG_BINGET"):
                    pushed.append(memo.get(int(arg)))
                elif name == "STOP":
                    stopped = True
                elif name not in _NO_PUSH_OPS:
                    pushed.append(None)
        except Exception:
            return False
        if not stopped:
            return False
        if not f.read(1):
            return True  # the file ends right after a pickle
        f.seek(-1, os.SEEK_CUR)
    return True


# ---- what was loaded ----------------------------------------------------------------------------
def _describe(obj: Any) -> str:
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, Mapping):
        keys = list(obj.keys())
        shown = ", ".join(repr(k) for k in keys[:6]) + (", ..." if len(keys) > 6 else "")
        return f"a {type(obj).__name__} with {len(keys)} keys ({shown})"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__name__}"


def _tensor_mapping_problem(obj: Any) -> str | None:
    """None when ``obj`` is a non-empty ``{str: Tensor}`` mapping, else what is wrong with it."""
    if not isinstance(obj, Mapping):
        return f"it holds {_describe(obj)}"
    if not obj:
        return "it holds an empty dict (no weights)"
    for key, value in obj.items():
        if not isinstance(key, str):
            return f"key {key!r} is a {type(key).__name__}, not a parameter name (str)"
        if not isinstance(value, torch.Tensor):
            return f"entry {key!r} is {_describe(value)}, not a tensor"
    return None


def _as_state_dict(obj: Any, path: Path, what: str) -> dict[str, torch.Tensor]:
    problem = _tensor_mapping_problem(obj)
    if problem is None:
        return _plain(obj)
    if isinstance(obj, Mapping):
        candidates = [k for k in WRAPPER_KEYS if k in obj and _tensor_mapping_problem(obj[k]) is None]
        if len(candidates) == 1:
            key = candidates[0]
            others = [k for k in obj if k != key]
            logger.info(
                "%s '%s': using the state dict stored under %r (%d tensors); ignoring the other keys %s",
                what, path, key, len(obj[key]), others[:8],
            )
            return _plain(obj[key])
        if len(candidates) > 1:
            raise CheckpointError(
                f"The {what} file '{path}' holds several state dicts (under {', '.join(map(repr, candidates))}); "
                "scforge cannot tell which is the model. Re-save the one you want with "
                "`torch.save(ckpt[KEY], path)`."
            )
    raise CheckpointError(
        f"The {what} file '{path}' is not a model state dict: {problem} (the file holds {_describe(obj)}). "
        f"scforge expects {{parameter name: tensor}}, optionally nested under one of "
        f"{', '.join(map(repr, WRAPPER_KEYS))}. {_RESAVE_HINT}"
    )


def _plain(mapping: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.detach() if isinstance(v, torch.nn.Parameter) else v) for k, v in mapping.items()}


# ---- NumPy files --------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"


def safe_numpy_load(path: str | os.PathLike, *, what: str = "array") -> np.ndarray | dict[str, np.ndarray]:
    """An ``.npy`` array, or the arrays of an ``.npz`` as ``{name: array}``, read with
    ``allow_pickle=False`` only.

    Object arrays (pickled by NumPy) raise :class:`~scforge.errors.UnsafeFileError` naming the file,
    the member and the non-data globals the pickle references; nothing from it runs. A missing,
    truncated or non-NumPy file raises :class:`~scforge.errors.CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"The {what} file '{path}' does not exist (or is not a file). Check the path.")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as exc:
        raise (_unsafe_numpy(path, what, None) if "allow_pickle" in str(exc) else _bad_numpy(path, what, exc)) from None
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _bad_numpy(path, what, exc) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    out: dict[str, np.ndarray] = {}
    with loaded:
        for member in loaded.files:
            try:
                out[member] = loaded[member]
            except ValueError as exc:
                raise (_unsafe_numpy(path, what, member) if "allow_pickle" in str(exc)
                       else _bad_numpy(path, what, exc)) from None
            except (OSError, EOFError, zipfile.BadZipFile) as exc:
                raise _bad_numpy(path, what, exc) from None
    return out


def _bad_numpy(path: Path, what: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"The {what} file '{path}' is not a readable NumPy .npy/.npz file ({type(exc).__name__}: "
        f"{_first_line(str(exc))}). Save plain numeric arrays with np.save / np.savez, or re-download it."
    )


def _pickle_stream_of(raw: BinaryIO) -> BinaryIO:
    """Position ``raw`` at the pickle an object ``.npy`` holds after its header (or at 0 for a bare pickle)."""
    head = raw.read(10)
    if head[:6] == _NPY_MAGIC and len(head) == 10:
        major = head[6]
        if major == 1:
            size = int.from_bytes(head[8:10], "little")
            raw.seek(10 + size)
        else:
            size = int.from_bytes(head[8:10] + raw.read(2), "little")
            raw.seek(12 + size)
    else:
        raw.seek(0)
    return raw


def _unsafe_numpy(path: Path, what: str, member: str | None) -> UnsafeFileError:
    from scforge.safe_pickle import ALLOWED_GLOBALS

    allowed = {f"{mod}.{name}" for mod, name in ALLOWED_GLOBALS}
    found: list[str] = []
    is_npy = True
    try:
        if member is not None:
            with zipfile.ZipFile(path) as zf, zf.open(f"{member}.npy") as f:
                raw: BinaryIO = io.BytesIO(f.read())
        else:
            raw = io.BytesIO(path.read_bytes())
        is_npy = raw.read(6) == _NPY_MAGIC
        raw.seek(0)
        _scan_stream(_pickle_stream_of(raw), found, 1)
    except Exception:  # unreadable: the refusal stands, just without the names
        pass
    offenders = [g for g in dict.fromkeys(found) if g not in allowed]
    where = f"'{path}'" + (f" (array '{member}')" if member is not None else "")
    kind = ("holds an object array, which NumPy stores as a pickle" if is_npy
            else "is a Python pickle, not a NumPy array file")
    named = (f" Its pickle references {', '.join(offenders[:6])}, which would run as it loads."
             if offenders else " It holds Python objects rather than numbers.")
    return UnsafeFileError(
        f"The {what} file {where} {kind}: loading it could execute code from the file.{named} "
        "scforge refuses to load it (allow_pickle=False) and ran "
        "nothing from it. Save plain numeric arrays (np.save(path, array.astype(np.float32))), or get the file "
        "from its official source."
    )
