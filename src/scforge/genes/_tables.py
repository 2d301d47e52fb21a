"""Lazy, cached access to the gene tables shipped in ``scforge/genes/tables/``.

Nothing is read at import time. Each table is parsed with pandas on first use and cached for the
life of the process (``functools.cache``). See ``tables/README.md`` for sources, sizes and licences
and ``scripts/build_gene_tables.py`` for how they are derived.

Rules applied when the tables are indexed (documented in ``docs/genes.md``):

* **Synonyms** (HGNC previous symbols and aliases, MGI synonyms) are usable only when
  *unambiguous*: every previous/alias association of the name points to one and the same approved
  symbol, and the name is not itself an approved symbol. The kind is ``"previous"`` when the name
  is a previous symbol of that gene, otherwise ``"alias"``.
* **Ensembl <-> symbol**: only Ensembl ids held by exactly one approved gene (and symbols with one
  Ensembl id) are used.
* **Orthologs** (Ensembl 105 human <-> mouse): both sides are first brought to current approved
  symbols (a name that is neither approved nor an unambiguous synonym is kept as written). For a
  mouse gene with several human orthologs the one whose symbol equals the mouse symbol in upper
  case is kept, otherwise the first in the Ensembl file order; the same rule picks one mouse
  ortholog per human gene. One-to-one pairs are therefore always kept and every choice is
  deterministic.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from scforge.errors import ScforgeError

logger = logging.getLogger("scforge")

SPECIES_TABLES = {"human": "hgnc_human.tsv.gz", "mouse": "mgi_mouse.tsv.gz"}
ORTHOLOG_TABLE = "orthologs_human_mouse.tsv.gz"


def table_path(name: str) -> Path:
    """Path of a shipped table file."""
    return Path(str(resources.files("scforge.genes") / "tables" / name))


def _read_tsv(name: str) -> pd.DataFrame:
    path = table_path(name)
    if not path.is_file():
        raise ScforgeError(
            f"The gene table {name!r} is missing from the scforge installation ({path}). Reinstall "
            "scforge, or regenerate the tables with scripts/build_gene_tables.py."
        )
    return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, na_filter=False)


@dataclass(frozen=True)
class SpeciesIndex:
    """Lookups for one species' approved gene table."""

    species: str
    approved: pd.Index            # approved symbols (unique)
    all_names: pd.Index           # approved + previous + alias names (for id-type detection)
    synonym_to_symbol: pd.Series  # unambiguous previous/alias name -> approved symbol
    synonym_kind: pd.Series       # same index: "previous" | "alias"
    symbol_to_ensembl: pd.Series  # approved symbol -> Ensembl id (unique both ways)
    ensembl_to_symbol: pd.Series  # Ensembl id (no version) -> approved symbol

    def canonical(self, names: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Approved symbol of each name and how it was found.

        Returns ``(symbols, kinds)``: object arrays; ``kinds`` is ``"approved"``, ``"previous"``,
        ``"alias"`` or ``None`` (``symbols`` is ``None`` there too).
        """
        names = pd.Index(np.asarray(names, dtype=object))
        out = np.full(len(names), None, dtype=object)
        kinds = np.full(len(names), None, dtype=object)
        is_app = np.asarray(names.isin(self.approved))
        out[is_app] = np.asarray(names[is_app], dtype=object)
        kinds[is_app] = "approved"
        pos = self.synonym_to_symbol.index.get_indexer(names)
        hit = (pos >= 0) & ~is_app
        out[hit] = self.synonym_to_symbol.to_numpy()[pos[hit]]
        kinds[hit] = self.synonym_kind.to_numpy()[pos[hit]]
        return out, kinds


def _explode(df: pd.DataFrame, column: str, kind: str) -> pd.DataFrame:
    col = df[column]
    has = col != ""
    ex = (
        pd.DataFrame({"name": col[has].str.split("|"), "symbol": df.loc[has, "symbol"]})
        .explode("name", ignore_index=True)
    )
    ex["kind"] = kind
    return ex[ex["name"] != ""]


@functools.cache
def species_index(species: str) -> SpeciesIndex:
    """Indexed approved-gene table of ``"human"`` (HGNC) or ``"mouse"`` (MGI)."""
    if species not in SPECIES_TABLES:
        raise ValueError(f"species must be 'human' or 'mouse', got {species!r}")
    df = _read_tsv(SPECIES_TABLES[species])
    approved = pd.Index(df["symbol"]).drop_duplicates()

    syn = pd.concat([_explode(df, "prev_symbols", "previous"), _explode(df, "alias_symbols", "alias")],
                    ignore_index=True)
    syn = syn[~syn["name"].isin(approved)]
    n_targets = syn.groupby("name", sort=False)["symbol"].nunique()
    unique_names = n_targets.index[n_targets.to_numpy() == 1]
    syn = syn[syn["name"].isin(unique_names)]
    # "previous" wins over "alias" when a name is both for the same gene
    syn = syn.sort_values(["name", "kind"], ascending=[True, False], kind="stable")
    syn = syn.drop_duplicates("name", keep="first")
    synonym_to_symbol = pd.Series(syn["symbol"].to_numpy(), index=pd.Index(syn["name"].to_numpy()))
    synonym_kind = pd.Series(syn["kind"].to_numpy(), index=synonym_to_symbol.index)

    ens = df[df["ensembl_id"] != ""][["symbol", "ensembl_id"]]
    ens = ens[~ens["ensembl_id"].duplicated(keep=False) & ~ens["symbol"].duplicated(keep=False)]
    symbol_to_ensembl = pd.Series(ens["ensembl_id"].to_numpy(), index=pd.Index(ens["symbol"].to_numpy()))
    ensembl_to_symbol = pd.Series(ens["symbol"].to_numpy(), index=pd.Index(ens["ensembl_id"].to_numpy()))

    all_names = approved.append(pd.Index(pd.concat([_explode(df, "prev_symbols", "p")["name"],
                                                    _explode(df, "alias_symbols", "a")["name"]])))
    all_names = all_names.drop_duplicates()
    logger.debug("loaded %s gene table: %d approved symbols, %d synonyms", species, len(approved),
                 len(synonym_to_symbol))
    return SpeciesIndex(species, approved, all_names, synonym_to_symbol, synonym_kind,
                        symbol_to_ensembl, ensembl_to_symbol)


@dataclass(frozen=True)
class OrthologIndex:
    mouse_to_human: pd.Series  # approved MGI symbol -> human symbol (approved HGNC where possible)
    human_to_mouse: pd.Series  # approved HGNC symbol -> mouse symbol


def _canonical_or_self(index: SpeciesIndex, names: pd.Series) -> np.ndarray:
    symbols, _ = index.canonical(names.to_numpy())
    return np.where(pd.isna(symbols), names.to_numpy(dtype=object), symbols)


def _pick(df: pd.DataFrame, key: str, value: str) -> pd.Series:
    """One ``value`` per ``key``: the case-insensitively identical name, else the first in file order."""
    same = df[value].str.upper() == df[key].str.upper()
    ordered = df.assign(_same=~same).sort_values([key, "_same", "_order"], kind="stable")
    ordered = ordered.drop_duplicates(key, keep="first")
    return pd.Series(ordered[value].to_numpy(), index=pd.Index(ordered[key].to_numpy()))


@functools.cache
def ortholog_index() -> OrthologIndex:
    """Human <-> mouse one-ortholog-per-gene lookups (see the module docstring for the rule)."""
    raw = _read_tsv(ORTHOLOG_TABLE)
    df = pd.DataFrame(
        {
            "human": _canonical_or_self(species_index("human"), raw["human_symbol"]),
            "mouse": _canonical_or_self(species_index("mouse"), raw["mouse_symbol"]),
        }
    )
    df["_order"] = np.arange(len(df))
    df = df.drop_duplicates(["human", "mouse"], keep="first")
    return OrthologIndex(mouse_to_human=_pick(df, "mouse", "human"), human_to_mouse=_pick(df, "human", "mouse"))
