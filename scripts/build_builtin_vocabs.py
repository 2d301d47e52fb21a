"""Derive the built-in model vocabularies shipped in ``scforge/genes/tables/`` (run once).

    python scripts/build_builtin_vocabs.py [--shared ../shared/data]

- ``scgpt_human_vocab.txt.gz``: scGPT's whole-human gene vocabulary (the ``scgpt`` wheel's
  ``default_census_vocab.json``, MIT), one symbol per line in id order; scforge appends the
  specials ``<pad>``, ``<cls>``, ``<eoc>`` (ids 60694..60696), as the published checkpoint does.
- ``geneformer_v1.tsv.gz`` / ``geneformer_v2.tsv.gz``: Geneformer token dictionaries in id order
  with each gene's non-zero median (Apache-2.0, ctheodoris/Geneformer). Read with the restricted
  unpickler; the Ensembl collapse mappings are not included (pass the dictionary folder for them).
Output is deterministic (gzip mtime 0).
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
from pathlib import Path

from scforge.safe_pickle import safe_load_pickle

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "src" / "scforge" / "genes" / "tables"


def write_gz(path: Path, text: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=9) as f:
        f.write(text.encode())
    path.write_bytes(buf.getvalue())
    print(f"{path.name}: {path.stat().st_size:,} bytes")


def build(shared: Path) -> None:
    vocab = json.loads((shared / "genes" / "scgpt_default_census_vocab.json").read_text())
    ordered = sorted(vocab.items(), key=lambda kv: kv[1])
    assert [i for _, i in ordered] == list(range(len(ordered))), "ids must be consecutive"
    write_gz(OUT / "scgpt_human_vocab.txt.gz", "\n".join(g for g, _ in ordered) + "\n")
    for name, folder, suffix in (("v1", "geneformer_v1", ""), ("v2", "geneformer_v2_gc95M", "_gc95M")):
        tokens = safe_load_pickle(shared / "genes" / folder / f"token_dictionary{suffix}.pkl")
        medians = safe_load_pickle(shared / "genes" / folder / f"gene_median_dictionary{suffix}.pkl")
        rows = sorted(((int(i), str(t)) for t, i in tokens.items()))
        assert [i for i, _ in rows] == list(range(len(rows)))
        lines = ["token\tmedian"]
        for _, tok in rows:
            med = medians.get(tok)
            lines.append(f"{tok}\t{'' if med is None else repr(float(med))}")
        write_gz(OUT / f"geneformer_{name}.tsv.gz", "\n".join(lines) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    build(parser.parse_args().shared)
