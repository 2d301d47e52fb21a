"""The Cell Ontology (CL), read offline from cellxgene's compressed JSON release files.

File format (``CL-ontology-v<date>.json.zst``, as shipped by ``cellxgene-ontology-guide``): a dict
``term_id -> {label, description, synonyms, deprecated, replaced_by?, ancestors: {id: distance}}``.
Distance 1 marks a direct parent (``is_a`` and ``part_of`` relations, restricted to CL terms).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from scforge.errors import ConfigError, DependencyError, InputDataError

__all__ = ["CellOntology", "OntologyTerm", "load_cell_ontology"]

_RELEASE = re.compile(r"CL-ontology-(v[0-9-]+)\.json(\.zst)?$")


@dataclass(frozen=True)
class OntologyTerm:
    """One CL term: ``ancestors`` maps every ancestor id to its distance (1 = direct parent)."""

    id: str
    label: str
    synonyms: tuple[str, ...] = ()
    deprecated: bool = False
    replaced_by: str | None = None
    ancestors: dict[str, int] = field(default_factory=dict)

    @property
    def parents(self) -> list[str]:
        """Direct parents (distance 1), sorted."""
        return sorted(a for a, d in self.ancestors.items() if d == 1)


class CellOntology:
    """Terms of one CL release with lookups by id, label and synonym, and the parent/child graph.

    >>> cl = load_cell_ontology("CL-ontology-v2026-03-26.json.zst")
    >>> cl.find("B cell")          # ['CL:0000236']
    >>> cl.parents("CL:0000236"), "CL:0000000" in cl.ancestors("CL:0000236")
    """

    def __init__(self, terms: Iterable[OntologyTerm], *, release: str | None = None, source: str | None = None):
        self.terms: dict[str, OntologyTerm] = {t.id: t for t in terms}
        self.release = release
        self.source = source
        self._children: dict[str, set[str]] = {t: set() for t in self.terms}
        for term in self.terms.values():
            for parent in term.parents:
                if parent in self._children:
                    self._children[parent].add(term.id)
        self._by_name: dict[str, set[str]] = {}
        self._by_label: dict[str, set[str]] = {}
        for term in self.terms.values():
            self._by_label.setdefault(term.label.casefold(), set()).add(term.id)
            for name in (term.label, *term.synonyms):
                self._by_name.setdefault(name.casefold(), set()).add(term.id)

    def __repr__(self) -> str:
        return f"CellOntology({len(self.terms)} terms, {len(self.term_ids())} current, release {self.release})"

    def __len__(self) -> int:
        return len(self.terms)

    def __contains__(self, term_id: object) -> bool:
        return term_id in self.terms

    def __getitem__(self, term_id: str) -> OntologyTerm:
        term = self.terms.get(term_id)
        if term is None:
            raise InputDataError(f"{term_id!r} is not a term of the Cell Ontology {self.release or ''} ({self.source}). "
                                 "Check the id (form 'CL:0000236') or use a newer CL release.")
        return term

    # ---- lookups -------------------------------------------------------------------------------
    def term_ids(self, *, include_deprecated: bool = False) -> list[str]:
        """All term ids (sorted); deprecated (obsolete) terms only when asked."""
        return sorted(t for t, term in self.terms.items() if include_deprecated or not term.deprecated)

    def label(self, term_id: str) -> str:
        return self[term_id].label

    def synonyms(self, term_id: str) -> tuple[str, ...]:
        return self[term_id].synonyms

    def parents(self, term_id: str) -> list[str]:
        """Direct parents (``is_a`` and ``part_of``), sorted."""
        return self[term_id].parents

    def children(self, term_id: str) -> list[str]:
        """Direct children, sorted."""
        self[term_id]
        return sorted(self._children[term_id])

    def ancestors(self, term_id: str, *, include_self: bool = False) -> set[str]:
        """Every ancestor of ``term_id`` (transitive, as recorded in the release)."""
        out = set(self[term_id].ancestors)
        return out | {term_id} if include_self else out

    def descendants(self, term_id: str, *, include_self: bool = False) -> set[str]:
        """Every term below ``term_id`` (transitive closure of the child links)."""
        self[term_id]
        seen: set[str] = set()
        stack = [term_id]
        while stack:
            for child in self._children[stack.pop()]:
                if child not in seen:
                    seen.add(child)
                    stack.append(child)
        return seen | {term_id} if include_self else seen

    def find(self, name: str, *, synonyms: bool = True, include_deprecated: bool = False) -> list[str]:
        """Ids whose label (and, with ``synonyms``, a synonym) equals ``name`` case-insensitively."""
        index = self._by_name if synonyms else self._by_label
        hits = index.get(str(name).strip().casefold(), set())
        return sorted(t for t in hits if include_deprecated or not self.terms[t].deprecated)

    def edges(self) -> list[tuple[str, str]]:
        """``(child, parent)`` direct links between current (non-deprecated) terms, sorted."""
        current = {t for t, term in self.terms.items() if not term.deprecated}
        return sorted((t, p) for t in current for p in self.terms[t].parents if p in current)


def _parse(raw: object, where: str) -> list[OntologyTerm]:
    if not isinstance(raw, dict) or not raw:
        raise InputDataError(f"{where} does not hold a Cell Ontology dict (term id -> term); got {type(raw).__name__}.")
    terms = []
    for term_id, entry in raw.items():
        if not isinstance(entry, dict) or "label" not in entry:
            raise InputDataError(f"{where}: entry {term_id!r} has no 'label'; this is not a cellxgene ontology file.")
        ancestors = entry.get("ancestors") or {}
        if not isinstance(ancestors, dict):
            raise InputDataError(f"{where}: 'ancestors' of {term_id!r} is not a dict of id -> distance.")
        terms.append(OntologyTerm(
            id=str(term_id), label=str(entry["label"]), synonyms=tuple(entry.get("synonyms") or ()),
            deprecated=bool(entry.get("deprecated", False)), replaced_by=entry.get("replaced_by"),
            ancestors={str(a): int(d) for a, d in ancestors.items()},
        ))
    return terms


def _read_json(path: Path) -> object:
    try:
        if path.name.endswith(".zst"):
            import zstandard

            with open(path, "rb") as f:
                data = zstandard.ZstdDecompressor().stream_reader(f).read()
        else:
            data = path.read_bytes()
        return json.loads(data)
    except FileNotFoundError:
        raise InputDataError(f"Cell Ontology file {path} does not exist. Pass the path of a "
                             "'CL-ontology-v<date>.json.zst' file.") from None
    except Exception as exc:  # zstd, OS and JSON errors
        raise InputDataError(f"Could not read the Cell Ontology file {path}: {exc}. It must be cellxgene's "
                             "zstd-compressed JSON (CL-ontology-v<date>.json.zst) or the same JSON uncompressed.") from None


def _installed_release() -> Path:
    """The newest CL file in the installed ``cellxgene-ontology-guide`` package."""
    try:
        import cellxgene_ontology_guide
    except ImportError:
        raise DependencyError(
            "No Cell Ontology path was given and the optional package 'cellxgene-ontology-guide' is not installed. "
            "Pass path='.../CL-ontology-v<date>.json.zst', or install it: pip install 'scforge[ontology]'."
        ) from None
    folder = Path(cellxgene_ontology_guide.__file__).parent / "data"
    files = sorted(folder.glob("CL-ontology-v*.json.zst"))
    if not files:
        raise DependencyError(f"cellxgene-ontology-guide is installed but {folder} has no CL-ontology-v*.json.zst "
                              "file. Reinstall it, or pass the path of a CL release file.")
    return files[-1]  # ISO dates: the last name is the newest release


def load_cell_ontology(path: str | os.PathLike | None = None) -> CellOntology:
    """Read a Cell Ontology release offline.

    ``path``: a ``CL-ontology-v<date>.json.zst`` file (or the same JSON uncompressed). Without a
    path, the newest release shipped by the optional ``cellxgene-ontology-guide`` package is used
    (``pip install 'scforge[ontology]'``).
    """
    if path is None:
        path = _installed_release()
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; pass the ontology file itself (CL-ontology-v<date>.json.zst).")
    match = _RELEASE.search(path.name)
    return CellOntology(_parse(_read_json(path), str(path)), release=match.group(1) if match else None,
                        source=str(path))
