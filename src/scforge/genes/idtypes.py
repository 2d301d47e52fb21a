"""Guess what kind of gene identifiers a list holds (symbols or Ensembl ids, human or mouse).

Every name is put in one class:

* ``ensembl``: human Ensembl gene id ``ENSG`` + 11 digits (also ``ENSGR`` + 10, GENCODE's old
  PAR-Y form), optionally with a version suffix ``.12`` and ``_PAR_Y``;
* ``mouse_ensembl``: ``ENSMUSG`` + 11 digits, optional version;
* ``entrez``: digits only (NCBI Gene ids);
* ``symbol``: a name of the shipped HGNC table (approved, previous or alias symbol), matched with
  its exact case;
* ``mouse_symbol``: a name of the shipped MGI table, exact case. Names in both tables count for
  whichever species has more names found only in its own table (human on a tie).

The class with the most names wins when it holds at least half of them (``fraction`` reports the
share). Symbols get a second chance: when at least 20% of the names are in the table and, together
with the remaining names that are *shaped* like that species' symbols (human: no lower-case
letters apart from ``orf``, e.g. ``RP11-34P13.7`` or ``C1orf159``; mouse: a capital followed by
lower-case letters, e.g. ``Gm12345``), they reach half, the symbol type is kept. Otherwise the
guess is ``"unknown"``. Integers that are exactly ``0..n-1`` or ``1..n`` are reported as an
``"unknown"`` positional index rather than Entrez ids.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

np_strings = getattr(np, "strings", np.char)  # NumPy >= 2 has fast string ufuncs
_ENS_ANY_CASE = ["".join(p) for p in itertools.product(*zip("ENS", "ens"))]

__all__ = ["IdTypeGuess", "detect_id_type", "ID_TYPES", "species_of", "kind_of"]

ID_TYPES = ("symbol", "ensembl", "mouse_symbol", "mouse_ensembl", "entrez", "unknown")

HUMAN_ENSEMBL_RE = r"^ENSG(?:\d{11}|R\d{10})(?:\.\d+)?(?:_PAR_Y)?$"
MOUSE_ENSEMBL_RE = r"^ENSMUSG\d{11}(?:\.\d+)?$"
VERSION_RE = r"\.\d+(?:_PAR_Y)?$"
ENTREZ_RE = r"^\d+$"
_HUMAN_SHAPE_RE = r"^[A-Z0-9][A-Z0-9._\-/@]*$"
_MOUSE_SHAPE_RE = r"^(?:[A-Z0-9][A-Za-z0-9]*[a-z][A-Za-z0-9._\-/@]*|mt-[A-Za-z0-9]+)$"

_SPECIES = {"symbol": "human", "ensembl": "human", "mouse_symbol": "mouse", "mouse_ensembl": "mouse"}
_KIND = {"symbol": "symbol", "ensembl": "ensembl", "mouse_symbol": "symbol", "mouse_ensembl": "ensembl"}


def species_of(id_type: str) -> str:
    """``"human"``, ``"mouse"`` or ``"unknown"`` for an id type name."""
    return _SPECIES.get(id_type, "unknown")


def kind_of(id_type: str) -> str | None:
    """``"symbol"``, ``"ensembl"`` or ``None`` for an id type name."""
    return _KIND.get(id_type)


@dataclass
class IdTypeGuess:
    """Result of :func:`detect_id_type`.

    ``fraction`` is the share of names recognised as ``id_type`` (for symbols: found in the
    HGNC/MGI table); ``examples`` are up to five such names; ``has_version_suffix`` is True when
    most Ensembl-looking names carry a version (``ENSG00000141510.17``); ``note`` explains an
    ``"unknown"`` guess or a symbol guess kept by the shape rule.
    """

    id_type: str
    species: str
    fraction: float
    examples: list[str]
    has_version_suffix: bool
    note: str = ""

    def describe(self) -> str:
        """Readable phrase, e.g. ``human gene symbols (92% recognised)``."""
        label = {
            "symbol": "human gene symbols",
            "ensembl": "human Ensembl gene ids" + (" with version suffixes" if self.has_version_suffix else ""),
            "mouse_symbol": "mouse gene symbols",
            "mouse_ensembl": "mouse Ensembl gene ids" + (" with version suffixes" if self.has_version_suffix else ""),
            "entrez": "numeric (Entrez-like) gene ids",
            "unknown": "unrecognised gene names",
        }.get(self.id_type, self.id_type)
        if self.id_type == "unknown":
            return label + (f" ({self.note})" if self.note else "")
        return f"{label} ({self.fraction:.0%} recognised)"


def _as_series(genes: Sequence[str]) -> pd.Series:
    if isinstance(genes, str):
        genes = [genes]
    values = np.asarray(genes, dtype=object).ravel()
    values = values[~pd.isna(values)]
    text = np_strings.strip(values.astype(str))  # string ufuncs: C loops, not per-name Python
    keep = (text != "") & ~np.isin(text, ("nan", "NaN", "NAN", "Nan"))
    return pd.Series(text[keep].astype(object), dtype=object)


def ensembl_like(text: np.ndarray) -> np.ndarray:
    """Names starting with "ENS" in any case (the candidates for the Ensembl regexes)."""
    return np.isin(text.astype("<U3"), _ENS_ANY_CASE)


def regex_where(s: pd.Series, pattern: str, candidates: np.ndarray, case: bool = True) -> np.ndarray:
    """Boolean mask of names matching ``pattern``, tested only where ``candidates`` is True."""
    out = np.zeros(len(s), dtype=bool)
    if candidates.any():
        out[candidates] = s[candidates].str.match(pattern, case=case).to_numpy()
    return out


def _is_positional(s: pd.Series) -> bool:
    if s.str.len().max() > 15:
        return False
    values = np.sort(s.astype(np.int64).to_numpy())
    return bool(np.array_equal(values, np.arange(values.size))
                or np.array_equal(values, np.arange(1, values.size + 1)))


@functools.cache
def _symbol_tables() -> tuple[pd.Index, np.ndarray]:
    """All HGNC and MGI names in one Index, with bit 1 set for human and bit 2 for mouse names."""
    from scforge.genes._tables import species_index

    human, mouse = species_index("human").all_names, species_index("mouse").all_names
    names = human.append(mouse).drop_duplicates()
    bits = (names.isin(human).astype(np.int8) | (names.isin(mouse).astype(np.int8) << 1)).astype(np.int8)
    return names, bits


def detect_id_type(genes: Sequence[str]) -> IdTypeGuess:
    """Guess the identifier type of ``genes`` by majority (see the module docstring)."""
    s = _as_series(genes)
    n = len(s)
    if n == 0:
        return IdTypeGuess("unknown", "unknown", 0.0, [], False, note="no gene names given")

    text = s.to_numpy(dtype=str)
    ens_like = ensembl_like(text)
    hum_ens = regex_where(s, HUMAN_ENSEMBL_RE, ens_like, case=False)
    mus_ens = regex_where(s, MOUSE_ENSEMBL_RE, ens_like, case=False)
    entrez = regex_where(s, ENTREZ_RE, np_strings.isdigit(text))
    rest = ~(hum_ens | mus_ens | entrez)
    # one lookup in the union of both tables; its Index keeps its hash table between calls
    names, species_bits = _symbol_tables()
    pos = names.get_indexer(s)
    bits = np.where(pos >= 0, species_bits[pos], 0)
    in_h = rest & ((bits & 1) > 0)
    in_m = rest & ((bits & 2) > 0)
    h_only, m_only, both = in_h & ~in_m, in_m & ~in_h, in_h & in_m
    sym_type, sym_mask = (
        ("symbol", h_only | both) if h_only.sum() >= m_only.sum() else ("mouse_symbol", m_only | both)
    )
    masks = {"ensembl": hum_ens, "mouse_ensembl": mus_ens, sym_type: sym_mask, "entrez": entrez}
    counts = {k: int(v.sum()) for k, v in masks.items()}
    best = max(counts, key=lambda k: counts[k])  # dict order breaks ties: ensembl first
    frac = counts[best] / n
    note = ""
    id_type = best
    if best == "entrez" and _is_positional(s[entrez]):
        return IdTypeGuess("unknown", "unknown", frac, s[entrez].head(5).tolist(), False,
                           note="the names are a positional integer index 0, 1, 2, ..., not gene ids")
    if frac < 0.5:
        id_type = "unknown"
        if best == sym_type and frac >= 0.2:
            other = rest & ~in_h & ~in_m
            shape_re = _HUMAN_SHAPE_RE if best == "symbol" else _MOUSE_SHAPE_RE
            text = s[other].str.replace("orf", "", regex=False) if best == "symbol" else s[other]
            shaped = int(text.str.match(shape_re).sum())
            if (counts[best] + shaped) / n >= 0.5:
                id_type = best
                note = (f"{frac:.0%} found in the {'HGNC' if best == 'symbol' else 'MGI'} table; "
                        f"{shaped / n:.0%} more are shaped like symbols")
        if id_type == "unknown" and counts[best] == 0:
            note = (f"none of the {n} names is an Ensembl id, a numeric id or an HGNC/MGI symbol")
        elif id_type == "unknown":
            note = (f"best guess {best} with only {frac:.0%} of {n} names; the rest match neither "
                    "Ensembl ids nor HGNC/MGI symbols")
    chosen = masks[best] if id_type != "unknown" else np.ones(n, dtype=bool)
    examples = s[chosen].head(5).tolist()
    ens_mask = hum_ens if id_type in ("ensembl", "unknown") else mus_ens
    if id_type == "unknown":
        ens_mask = hum_ens | mus_ens
    has_version = bool(ens_mask.any() and s[ens_mask].str.contains(VERSION_RE).mean() > 0.5)
    return IdTypeGuess(id_type, species_of(id_type), float(frac), examples, has_version, note)
