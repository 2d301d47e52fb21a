"""Markdown tables of an experiment matrix's results (for docs/results.md).

    python scripts/bench_tables.py benchmarks/_work/ifnb_annotation/results.parquet
"""

from __future__ import annotations

import argparse

import pandas as pd

from scforge.bench import summarize
from scforge.bench.report import AGGREGATE, BATCH, BIO, series_name


def annotation(results: pd.DataFrame) -> str:
    s = summarize(results, ("accuracy", "macro_f1"))
    if s.empty:
        return ""
    s["series"] = [series_name(a, b, c) for a, b, c in zip(s.method, s["mode"], s.kind)]
    fractions = sorted(s.fraction.unique())
    lines = []
    for metric in ("accuracy", "macro_f1"):
        d = s[s.metric == metric]
        lines.append(f"\n{metric} (mean ± sd over seeds; n = seeds)\n")
        lines.append("| method | " + " | ".join(f"{f:g}" for f in fractions) + " |")
        lines.append("|---|" + "---|" * len(fractions))
        for name in dict.fromkeys(d.series):
            row = d[d.series == name].set_index("fraction")
            cells = []
            for f in fractions:
                if f not in row.index:
                    cells.append("–")
                    continue
                r = row.loc[f]
                best = d[d.fraction == f]["mean"].max()
                text = f"{r['mean']:.3f} ± {r['sd']:.3f} (n={int(r['n'])})"
                cells.append(f"**{text}**" if r["mean"] == best else text)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def integration(results: pd.DataFrame) -> str:
    d = results[results.get("task", "") == "integration"]
    if d.empty:
        return ""
    wide = d.pivot_table(index=["method", "kind"], columns="metric", values="value")
    cols = [c for c in (*AGGREGATE, *BIO, *BATCH) if c in wide.columns]
    wide = wide.sort_values("avg_bio", ascending=False)
    lines = ["| embedding | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for (method, kind), row in wide.iterrows():
        name = series_name(method, "", kind) if kind == "baseline" else f"{method} (zero-shot)"
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results")
    args = parser.parse_args()
    results = pd.read_parquet(args.results)
    for block in (annotation(results), integration(results)):
        if block:
            print(block, "\n")
    secs = results[results.metric == "seconds"].groupby(["method", "mode"]).value.median()
    print("median seconds per unit:\n" + secs.round(1).to_string())


if __name__ == "__main__":
    main()
