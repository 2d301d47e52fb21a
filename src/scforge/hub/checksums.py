"""Check model files against the SHA-256 digests their folder lists, before anything is deserialised.

A model folder may carry a checksum listing; when it does, every file a loader is about to read
must match it (when it does not, nothing is checked: the digests are "verified when present"):

* ``SHA256SUMS``: the ``sha256sum`` format, one ``<64 hex>  <file name>`` per line (``*name`` for
  binary mode, ``#`` comments and blank lines ignored); the BSD form ``SHA256 (name) = <hex>`` too;
* a model card, ``README.md`` or ``card.md``: lines that say ``sha256`` and hold a 64-hex digest
  next to a file name of the folder (e.g. ``- `model.safetensors` sha256: 3f2a...``), or the digest
  on the line right after a line naming the file. scforge's own ``card.md`` lists its weights so.

A mismatch raises :class:`~scforge.errors.CheckpointError` naming the file, the listing, the
expected and actual digests (first 12 hex characters) and the fix (re-download the file).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from scforge.errors import CheckpointError

__all__ = ["CHECKSUM_FILE", "CARD_FILES", "Listed", "read_listed_checksums", "verify_listed_checksums",
           "verify_file_checksum"]

logger = logging.getLogger("scforge")

#: the ``sha256sum`` listing scforge reads in a model folder
CHECKSUM_FILE = "SHA256SUMS"
#: model cards whose ``sha256: <hex>`` lines are read
CARD_FILES = ("README.md", "card.md")

_HEX = r"[0-9a-fA-F]{64}"
_GNU_LINE = re.compile(rf"^\\?({_HEX}) [ *](.+)$")
_BSD_LINE = re.compile(rf"^SHA256 ?\((.+)\) ?= ?({_HEX})$", re.IGNORECASE)
_DIGEST = re.compile(rf"(?<![0-9a-fA-F]){_HEX}(?![0-9a-fA-F])")
_SHA_WORD = re.compile(r"sha-?256", re.IGNORECASE)
_NAME_CHARS = re.compile(r"[`'\"*|()\[\]<>,;]")


@dataclass(frozen=True)
class Listed:
    """One digest a listing gives for a file: ``name`` (relative to the folder), ``sha256`` (lower
    case hex) and ``source`` (the listing file it comes from)."""

    name: str
    sha256: str
    source: Path


def _normalise(name: str) -> str:
    """``./a/b.bin`` -> ``a/b.bin`` (POSIX separators)."""
    return str(PurePosixPath(name.strip().replace("\\", "/"))).removeprefix("./")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise CheckpointError(f"Cannot read the checksum listing '{path}': {exc}. Check its permissions.") from None


def _parse_sha256sums(path: Path) -> list[Listed]:
    text = _read_text(path)
    out: list[Listed] = []
    skipped = 0
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        gnu, bsd = _GNU_LINE.match(line), _BSD_LINE.match(line)
        if gnu:
            out.append(Listed(_normalise(gnu.group(2)), gnu.group(1).lower(), path))
        elif bsd:
            out.append(Listed(_normalise(bsd.group(1)), bsd.group(2).lower(), path))
        else:
            skipped += 1
    if skipped:
        logger.warning("%s: ignored %d line(s) that are not '<sha256 hex>  <file name>'.", path, skipped)
    return out


def _names_on(line: str, names: set[str]) -> list[str]:
    """File names of the folder mentioned on a card line (word-wise, after stripping markdown)."""
    words = _NAME_CHARS.sub(" ", _DIGEST.sub(" ", line)).replace(":", " ").split()
    return list(dict.fromkeys(_normalise(w) for w in words if _normalise(w) in names))


def _parse_card(path: Path, names: set[str]) -> list[Listed]:
    lines = _read_text(path).splitlines()
    out: list[Listed] = []
    for i, line in enumerate(lines):
        if not _SHA_WORD.search(line):
            continue
        digests = _DIGEST.findall(line)
        if len(digests) != 1:
            continue
        named = _names_on(line, names)
        if not named and i > 0:  # "model.safetensors" on one line, "sha256: <hex>" on the next
            named = _names_on(lines[i - 1], names) if not _DIGEST.search(lines[i - 1]) else []
        if len(named) == 1:
            out.append(Listed(named[0], digests[0].lower(), path))
    return out


def _folder_files(folder: Path) -> set[str]:
    """Names (relative, POSIX) of the files in ``folder`` and one level below."""
    names = set()
    for p in folder.iterdir():
        if p.is_file():
            names.add(p.name)
        elif p.is_dir():
            names.update(f"{p.name}/{q.name}" for q in p.iterdir() if q.is_file())
    return names


def read_listed_checksums(folder: str | os.PathLike) -> list[Listed]:
    """Every digest ``folder``'s ``SHA256SUMS`` and model cards list (empty when there is none)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    listed: list[Listed] = []
    if (folder / CHECKSUM_FILE).is_file():
        listed += _parse_sha256sums(folder / CHECKSUM_FILE)
    cards = [folder / name for name in CARD_FILES if (folder / name).is_file()]
    if cards:
        names = _folder_files(folder)
        for card in cards:
            listed += _parse_card(card, names)
    return listed


def _sha256(path: Path) -> str:
    from scforge.hub.folder import sha256_file

    try:
        return sha256_file(path)
    except OSError as exc:
        raise CheckpointError(f"Cannot read '{path}' to check its sha256: {exc}.") from None


def verify_listed_checksums(folder: str | os.PathLike, names: list[str] | tuple[str, ...] | None = None, *,
                            known: dict[str, str] | None = None) -> dict[str, str]:
    """Check the files of ``folder`` against the digests its listings give, before they are read.

    ``names``: the files (relative to ``folder``) the caller is about to deserialise; only those
    are checked, and only when listed. ``None`` checks every listed file that exists. ``known``:
    digests the caller already computed (``{name: hex}``), used instead of hashing again. Returns
    ``{name: sha256}`` of the files verified. Raises :class:`~scforge.errors.CheckpointError` on
    a mismatch, or when a file to check is listed but missing.
    """
    folder = Path(folder)
    listed = read_listed_checksums(folder)
    if not listed:
        return {}
    wanted = None if names is None else {_normalise(n) for n in names}
    digests = {_normalise(k): v.lower() for k, v in (known or {}).items()}
    verified: dict[str, str] = {}
    for entry in listed:
        if wanted is not None and entry.name not in wanted:
            continue
        path = folder / entry.name
        if not path.is_file():
            if wanted is None:
                continue
            raise CheckpointError(
                f"'{entry.source}' lists {entry.name} but '{path}' is not a file. Re-download the model folder.")
        if entry.name not in digests:
            digests[entry.name] = _sha256(path)
        actual = digests[entry.name]
        if actual != entry.sha256:
            raise CheckpointError(
                f"'{path}' does not match the sha256 listed in '{entry.source}': expected "
                f"{entry.sha256[:12]}..., the file has {actual[:12]}... It is corrupt, truncated or was "
                f"replaced, so scforge did not load it. Re-download {entry.name} from the model's source "
                f"(or, if you changed it on purpose, update {entry.source.name})."
            )
        verified[entry.name] = actual
    if verified:
        logger.info("%s: sha256 verified for %s", folder, ", ".join(sorted(verified)))
    return verified


def verify_file_checksum(path: str | os.PathLike) -> str | None:
    """Verify one file against the listings of its own folder; its sha256 when listed, else ``None``."""
    path = Path(path)
    return verify_listed_checksums(path.parent, [path.name]).get(path.name)
