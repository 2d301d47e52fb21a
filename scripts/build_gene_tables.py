#!/usr/bin/env python
"""Derive the compact gene tables shipped in ``src/scforge/genes/tables/`` from the real sources.

Run once (re-run when a source changes)::

    .venv/bin/python scripts/build_gene_tables.py [--data ../shared/data/genes] [--out src/scforge/genes/tables]

Inputs (``../shared/data/genes``):

* ``hgnc_human_gene_table.parquet`` (HGNC, CC0): ensembl_id, symbol, alias_symbols, prev_symbols, ...
* ``mgi_mouse_gene_table.parquet`` (MGI): the same columns for mouse.
* ``Ensembl105_Human2Mouse_Genes.csv`` (Ensembl 105): no header; human symbol, mouse symbol
  (mouse empty when there is no ortholog).

Outputs (gzip with mtime 0, so the bytes are the same on every run):

* ``hgnc_human.tsv.gz``: symbol, ensembl_id, prev_symbols, alias_symbols ("|"-joined), all HGNC
  approved genes in the source order (sorted by symbol).
* ``mgi_mouse.tsv.gz``: the same for MGI, without the 12,507 transgenes (``Tg(...)`` constructs
  are not gene ids of a count matrix).
* ``orthologs_human_mouse.tsv.gz``: (human_symbol, mouse_symbol) pairs that have a mouse
  ortholog, de-duplicated, in the source file order (the order breaks ties; see
  ``scforge.genes._tables``).
* ``gene_tables_manifest.json``: row counts, byte sizes and sha256 of every output and of each source.

Only what mapping needs is kept: gene types, statuses and source ids are dropped.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "genes"
DEFAULT_OUT = REPO / "src" / "scforge" / "genes" / "tables"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clean(series: pd.Series) -> pd.Series:
    """Strings stripped of surrounding blanks; None/NaN -> ''."""
    return series.fillna("").astype(str).str.strip()


def _clean_list(series: pd.Series, drop: pd.Series) -> pd.Series:
    """'|'-joined synonym lists: blanks and repeats removed (first kept), the gene's own symbol removed."""
    out = []
    for value, own in zip(_clean(series), drop):
        seen: list[str] = []
        for item in value.split("|"):
            item = item.strip()
            if item and item != own and item not in seen:
                seen.append(item)
        out.append("|".join(seen))
    return pd.Series(out, index=series.index)


def _write_tsv_gz(df: pd.DataFrame, path: Path) -> None:
    text = df.to_csv(sep="\t", index=False, lineterminator="\n")
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    path.write_bytes(buf.getvalue())


def build_species_table(parquet: Path, drop_types: tuple[str, ...] = ()) -> pd.DataFrame:
    raw = pd.read_parquet(parquet)
    if drop_types:
        raw = raw[~raw["gene_type"].isin(drop_types)]
    df = pd.DataFrame(
        {
            "symbol": _clean(raw["symbol"]),
            "ensembl_id": _clean(raw["ensembl_id"]),
        }
    )
    df["prev_symbols"] = _clean_list(raw["prev_symbols"], df["symbol"])
    df["alias_symbols"] = _clean_list(raw["alias_symbols"], df["symbol"])
    df = df[df["symbol"] != ""].reset_index(drop=True)
    return df


def build_orthologs(csv: Path) -> pd.DataFrame:
    raw = pd.read_csv(csv, header=None, names=["human_symbol", "mouse_symbol"], dtype=str,
                      keep_default_na=False)
    df = pd.DataFrame({"human_symbol": _clean(raw["human_symbol"]),
                       "mouse_symbol": _clean(raw["mouse_symbol"])})
    df = df[(df["human_symbol"] != "") & (df["mouse_symbol"] != "")]
    return df.drop_duplicates().reset_index(drop=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    data: Path = args.data
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    sources = {
        "hgnc": data / "hgnc_human_gene_table.parquet",
        "mgi": data / "mgi_mouse_gene_table.parquet",
        "orthologs": data / "Ensembl105_Human2Mouse_Genes.csv",
    }
    for path in sources.values():
        if not path.is_file():
            raise SystemExit(f"missing source {path}; pass --data pointing at shared/data/genes")

    tables = {
        "hgnc_human.tsv.gz": build_species_table(sources["hgnc"]),
        "mgi_mouse.tsv.gz": build_species_table(sources["mgi"], drop_types=("transgene",)),
        "orthologs_human_mouse.tsv.gz": build_orthologs(sources["orthologs"]),
    }
    manifest: dict = {"sources": {}, "tables": {}}
    for key, path in sources.items():
        manifest["sources"][key] = {"file": path.name, "sha256": _sha256(path),
                                    "bytes": path.stat().st_size}
    for name, df in tables.items():
        path = out / name
        _write_tsv_gz(df, path)
        manifest["tables"][name] = {
            "rows": int(len(df)),
            "columns": list(df.columns),
            "bytes": path.stat().st_size,
            "sha256": _sha256(path),
        }
        print(f"{name}: {len(df):,} rows, {path.stat().st_size:,} bytes")
    (out / "gene_tables_manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
