"""Map free-text cell type labels to Cell Ontology ids: a reviewed table first, then exact CL
label / synonym matches; whatever does not map is listed, never dropped silently.

Shipped tables (``scforge/ontology/tables/``): ``ifnb_cell_ontology.tsv`` (the ifnb
``seurat_annotations`` labels, with the reasoning for each choice) and ``pbmc_markers.tsv``
(canonical marker genes per label, with sources).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from scforge.errors import ConfigError, InputDataError
from scforge.ontology.cell_ontology import CellOntology

__all__ = ["LabelMapping", "load_label_table", "load_marker_table", "map_labels"]

logger = logging.getLogger("scforge")

IFNB_TABLE = "ifnb_cell_ontology.tsv"
MARKER_TABLE = "pbmc_markers.tsv"


def _read_tsv(path: str | os.PathLike | None, default: str, columns: tuple[str, ...]) -> pd.DataFrame:
    if path is None:
        with resources.files("scforge.ontology").joinpath("tables", default).open("r") as f:
            frame = pd.read_csv(f, sep="\t", comment="#", dtype=str)
        where = f"scforge's shipped {default}"
    else:
        where = str(path)
        try:
            frame = pd.read_csv(Path(path), sep="\t", comment="#", dtype=str)
        except (OSError, ValueError) as exc:
            raise InputDataError(f"Could not read the table {where}: {exc}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise InputDataError(f"{where} lacks the column(s) {missing}; it needs tab-separated {list(columns)} "
                             "with a header line ('#' lines are comments).")
    return frame


def load_label_table(path: str | os.PathLike | None = None) -> dict[str, str]:
    """Label -> CL id from a TSV with columns ``label`` and ``cl_id`` (default: the shipped ifnb table)."""
    frame = _read_tsv(path, IFNB_TABLE, ("label", "cl_id"))
    duplicated = frame["label"][frame["label"].duplicated()].tolist()
    if duplicated:
        raise InputDataError(f"label table {path or IFNB_TABLE} lists {duplicated} more than once.")
    return dict(zip(frame["label"].str.strip(), frame["cl_id"].str.strip()))


def load_marker_table(path: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Label -> marker gene symbols from a TSV with columns ``label`` and ``gene`` (default: the shipped
    canonical PBMC markers for the ifnb labels)."""
    frame = _read_tsv(path, MARKER_TABLE, ("label", "gene"))
    out: dict[str, list[str]] = {}
    for label, gene in zip(frame["label"].str.strip(), frame["gene"].str.strip()):
        out.setdefault(label, []).append(gene)
    return out


@dataclass
class LabelMapping:
    """Result of :func:`map_labels`.

    ``ids``: one CL id per input label (``None`` for missing labels and for labels that did not map);
    ``mapping``: distinct label -> CL id; ``how``: label -> ``"table"``, ``"label"`` or ``"synonym"``;
    ``unmapped``: distinct labels with no CL id; ``n_missing``: inputs that were NaN/None/empty.
    """

    ids: list[str | None]
    mapping: dict[str, str] = field(default_factory=dict)
    how: dict[str, str] = field(default_factory=dict)
    unmapped: list[str] = field(default_factory=list)
    n_missing: int = 0

    @property
    def cell_type_ids(self) -> list[str]:
        """The distinct CL ids mapped to, sorted."""
        return sorted(set(self.mapping.values()))

    def report(self, ontology: CellOntology | None = None) -> str:
        lines = [f"{len(self.mapping)} label(s) mapped, {len(self.unmapped)} unmapped, {self.n_missing} missing value(s)"]
        for label, term in sorted(self.mapping.items()):
            name = f" ({ontology.label(term)})" if ontology is not None else ""
            lines.append(f"  {label!r} -> {term}{name} [{self.how[label]}]")
        lines += [f"  {label!r} -> not mapped" for label in self.unmapped]
        return "\n".join(lines)


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value)) or str(value).strip() in ("", "nan")


def map_labels(labels: Iterable[object], table: Mapping[str, str] | str | os.PathLike | None = None, *,
               ontology: CellOntology, on_unmapped: str = "error") -> LabelMapping:
    """Map cell type labels to CL ids.

    Order: an exact hit in ``table`` (a dict label -> CL id, a TSV path, or ``None`` for the shipped
    ifnb table), then a case-insensitive exact match of a current CL label, then of a synonym (only
    when it names a single term). Missing values (NaN, None, "") stay ``None`` and are counted.

    A table id that is not a current term of ``ontology`` raises :class:`InputDataError` (the table
    or the ontology release is wrong). Labels that map nowhere raise with a listing when
    ``on_unmapped="error"`` (default), or are logged and left ``None`` with ``"warn"``.
    """
    if on_unmapped not in ("error", "warn"):
        raise ConfigError(f"on_unmapped={on_unmapped!r}; use 'error' or 'warn'.")
    table = load_label_table(table) if table is None or isinstance(table, (str, os.PathLike)) else dict(table)
    values = list(labels)
    distinct = sorted({str(v).strip() for v in values if not _is_missing(v)})
    mapping: dict[str, str] = {}
    how: dict[str, str] = {}
    bad: list[str] = []
    for label in distinct:
        if label in table:
            term = table[label]
            if term not in ontology or ontology[term].deprecated:
                replaced = ontology[term].replaced_by if term in ontology else None
                bad.append(f"{label!r} -> {term}" + (" (deprecated" + (f"; replaced by {replaced})" if replaced
                                                                      else ")") if term in ontology else
                                                     " (not in the ontology)"))
                continue
            mapping[label], how[label] = term, "table"
            continue
        by_label = ontology.find(label, synonyms=False)
        if len(by_label) == 1:
            mapping[label], how[label] = by_label[0], "label"
            continue
        by_synonym = ontology.find(label)
        if len(by_synonym) == 1:
            mapping[label], how[label] = by_synonym[0], "synonym"
    if bad:
        raise InputDataError(f"The label table maps {len(bad)} label(s) to ids that are not current terms of the Cell "
                             f"Ontology {ontology.release or ''} ({ontology.source}): {'; '.join(bad)}. Fix the table "
                             "or load the CL release it was written for.")
    unmapped = [label for label in distinct if label not in mapping]
    if unmapped:
        hint = {label: ontology.find(label) for label in unmapped}
        ambiguous = {label: ids for label, ids in hint.items() if len(ids) > 1}
        message = (f"{len(unmapped)} of {len(distinct)} cell type label(s) have no Cell Ontology id: {unmapped}"
                   + (f" (ambiguous synonyms: {ambiguous})" if ambiguous else "")
                   + ". Add them to the label table (columns label, cl_id) or rename them to CL labels.")
        if on_unmapped == "error":
            raise InputDataError(message)
        logger.warning(message)
    ids = [None if _is_missing(v) else mapping.get(str(v).strip()) for v in values]
    n_missing = sum(_is_missing(v) for v in values)
    return LabelMapping(ids=ids, mapping=mapping, how=how, unmapped=unmapped, n_missing=n_missing)
