"""The HTML report of an experiment matrix: few-shot curves with 95% confidence bands, bar charts per
metric with the baselines marked, UMAPs of every embedding, and scib-style summary tables.

One self-contained file (figures inlined as PNG). Confidence intervals are t-intervals over seeds:
``t(0.975, n-1) * sd / sqrt(n)`` as sc-foundation-eval reports them.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

BIO = ("nmi", "ari", "silhouette_label", "clisi", "isolated_labels")
BATCH = ("silhouette_batch", "bras", "ilisi", "kbet", "graph_connectivity", "pcr")
AGGREGATE = ("avg_bio", "avg_batch", "bio_conservation", "batch_correction", "total")
CURVE_METRICS = ("accuracy", "macro_f1")
BAR_METRICS = ("accuracy", "macro_f1", "kappa")
UMAP_MAX_CELLS = 4000


def series_name(method: str, mode: str, kind: str) -> str:
    """Display name of a (method, mode) series."""
    from scforge.bench.runner import BASELINE_LABELS

    if kind == "baseline":
        return BASELINE_LABELS.get(method, method)
    return f"{method} · {mode}"


def summarize(results: pd.DataFrame, metrics: tuple[str, ...] = CURVE_METRICS) -> pd.DataFrame:
    """Mean, sd, n and 95% t-interval half-width over seeds per dataset/method/mode/fraction/metric."""
    from scipy import stats

    ann = results[(results.get("task", "annotation") == "annotation") & results.metric.isin(metrics)]
    if ann.empty:
        return pd.DataFrame(columns=["dataset", "method", "kind", "mode", "fraction", "metric", "mean", "sd", "n",
                                     "ci95"])
    g = ann.groupby(["dataset", "method", "kind", "mode", "fraction", "metric"], sort=False)["value"]
    out = g.agg(mean="mean", sd="std", n="count").reset_index()
    out["sd"] = out["sd"].fillna(0.0)
    tcrit = np.where(out["n"] > 1, stats.t.ppf(0.975, np.maximum(out["n"] - 1, 1)), np.nan)
    out["ci95"] = np.where(out["n"] > 1, tcrit * out["sd"] / np.sqrt(out["n"]), 0.0)
    return out


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _style(i: int, kind: str) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    return {"color": "0.35" if kind == "baseline" else colors[i % 10],
            "linestyle": "--" if kind == "baseline" else "-", "marker": "s" if kind == "baseline" else "o"}


def few_shot_figure(summary: pd.DataFrame, dataset: str) -> str | None:
    """Metric vs training fraction, one line per method/mode, shaded 95% CI; baselines dashed grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = summary[summary.dataset == dataset]
    if d.empty or d.fraction.nunique() < 2:
        return None
    metrics = [m for m in CURVE_METRICS if m in set(d.metric)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    series = d[["method", "mode", "kind"]].drop_duplicates().to_numpy().tolist()
    for ax, metric in zip(axes[0], metrics):
        for i, (method, mode, kind) in enumerate(series):
            s = d[(d.method == method) & (d["mode"] == mode) & (d.metric == metric)].sort_values("fraction")
            st = _style(i, kind)
            ax.plot(s.fraction, s["mean"], label=series_name(method, mode, kind), color=st["color"],
                    linestyle=st["linestyle"], marker=st["marker"], ms=4)
            ax.fill_between(s.fraction, s["mean"] - s.ci95, s["mean"] + s.ci95, color=st["color"], alpha=0.15, lw=0)
        ax.set_xlabel("fraction of training cells")
        ax.set_ylabel(metric.replace("_", "-"))
        ax.set_title(f"{dataset}: {metric.replace('_', '-')}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def bar_figure(results: pd.DataFrame, dataset: str) -> str | None:
    """Per metric, mean ± 95% CI at the largest training fraction; the best baseline is a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(results[results.dataset == dataset], BAR_METRICS)
    if s.empty:
        return None
    s = s[s.fraction == s.fraction.max()]
    metrics = [m for m in BAR_METRICS if m in set(s.metric)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        d = s[s.metric == metric].reset_index(drop=True)
        names = [series_name(a, b, c) for a, b, c in zip(d.method, d["mode"], d.kind)]
        colors = [_style(i, k)["color"] for i, k in enumerate(d.kind)]
        ax.bar(range(len(d)), d["mean"], yerr=d.ci95, color=colors, capsize=3,
               edgecolor=["black" if k == "baseline" else "none" for k in d.kind])
        base = d[d.kind == "baseline"]
        if len(base):
            ax.axhline(base["mean"].max(), color="black", linestyle="--", lw=1, label="best baseline")
            ax.legend(fontsize=8)
        ax.set_xticks(range(len(d)), names, rotation=60, ha="right", fontsize=8)
        ax.set_title(f"{dataset}: {metric.replace('_', '-')} (fraction {d.fraction.max():g})")
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def umap_coordinates(emb: np.ndarray, seed: int = 0) -> np.ndarray:
    """2-D UMAP of an embedding (umap-learn, 15 neighbours, seeded)."""
    import umap

    return umap.UMAP(n_neighbors=15, min_dist=0.3, random_state=seed, n_jobs=1).fit_transform(
        np.asarray(emb, dtype=np.float32))


def umap_figure(dataset: str, embeddings: dict[str, np.ndarray], labels: np.ndarray, batches: np.ndarray | None,
                cache: Any = None) -> str:
    """UMAP of each embedding coloured by label (and by batch when given); at most 4,000 cells (seeded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(labels)
    rows = np.sort(np.random.default_rng(0).choice(n, UMAP_MAX_CELLS, replace=False)) if n > UMAP_MAX_CELLS \
        else np.arange(n)
    lab = pd.Series(labels[rows]).astype(object).fillna("unlabelled").astype(str).to_numpy()
    cats = sorted(set(lab) - {"unlabelled"}) + (["unlabelled"] if "unlabelled" in set(lab) else [])
    cmap = plt.get_cmap("tab20")
    color_of = {c: ("0.85" if c == "unlabelled" else cmap(i % 20)) for i, c in enumerate(cats)}
    ncols = 2 if batches is not None else 1
    fig, axes = plt.subplots(len(embeddings), ncols, figsize=(5.2 * ncols, 4.2 * len(embeddings)), squeeze=False)
    for r, (name, emb) in enumerate(embeddings.items()):
        digest = hashlib.sha256(np.ascontiguousarray(emb[rows], dtype=np.float32).tobytes()).hexdigest()[:20]
        key = f"umap-{dataset}-{name}-{digest}"
        xy = cache.get(key) if cache is not None else None
        if xy is None:
            xy = umap_coordinates(emb[rows])
            if cache is not None:
                cache.put(key, xy, {"what": f"UMAP of {name} on {dataset}", "cells": int(rows.size)})
        ax = axes[r][0]
        order = np.argsort(lab != "unlabelled")  # unlabelled cells underneath
        ax.scatter(xy[order, 0], xy[order, 1], s=3, c=[color_of[x] for x in lab[order]], linewidths=0)
        ax.set_title(f"{name}: cell type")
        ax.set_xticks([])
        ax.set_yticks([])
        if batches is not None:
            b = np.asarray(batches)[rows].astype(str)
            bcats = sorted(set(b))
            bcol = {c: plt.get_cmap("Set1")(i % 9) for i, c in enumerate(bcats)}
            perm = np.random.default_rng(1).permutation(rows.size)
            axes[r][1].scatter(xy[perm, 0], xy[perm, 1], s=3, c=[bcol[x] for x in b[perm]], linewidths=0)
            axes[r][1].set_title(f"{name}: batch")
            axes[r][1].set_xticks([])
            axes[r][1].set_yticks([])
            if r == 0:
                for c in bcats:
                    axes[r][1].scatter([], [], color=bcol[c], label=c, s=12)
                axes[r][1].legend(fontsize=7, loc="best")
    handles = [plt.Line2D([], [], marker="o", ls="", color=color_of[c], label=c) for c in cats]
    fig.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def _color(v: float, lo: float, hi: float) -> str:
    t = 0.5 if not np.isfinite(v) or hi <= lo else (v - lo) / (hi - lo)
    # white -> teal, like scib's summary tables
    r, g, b = (int(255 - t * (255 - c)) for c in (38, 139, 150))
    return f"background:rgb({r},{g},{b})"


def scib_table(results: pd.DataFrame, dataset: str) -> str | None:
    """scib-style table: embeddings x integration metrics, each column shaded from its min to its max."""
    d = results[(results.get("task", "") == "integration") & (results.dataset == dataset)]
    if d.empty:
        return None
    wide = d.pivot_table(index=["method", "kind"], columns="metric", values="value", aggfunc="mean")
    cols = [c for c in (*BIO, *BATCH, *AGGREGATE) if c in wide.columns]
    sort_col = "total" if "total" in wide.columns else cols[-1]
    wide = wide.sort_values(sort_col, ascending=False)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["embedding", *cols])
    body = []
    for (method, kind), row in wide.iterrows():
        cells = [f"<td>{html.escape(series_name(method, 'zero-shot', kind) if kind == 'baseline' else method)}</td>"]
        for c in cols:
            col = wide[c].astype(float)
            v = float(row[c])
            cells.append(f'<td style="{_color(v, col.min(), col.max())}">{v:.3f}</td>' if np.isfinite(v)
                         else "<td>–</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table class="scib"><tr>{head}</tr>{"".join(body)}</table>'


def annotation_table(results: pd.DataFrame, dataset: str) -> str | None:
    """Mean ± sd over seeds of accuracy and macro-F1 per method at each fraction; best per column in bold."""
    s = summarize(results[results.dataset == dataset])
    if s.empty:
        return None
    s["text"] = [f"{m:.3f} ± {sd:.3f}" for m, sd in zip(s["mean"], s["sd"])]
    s["series"] = [series_name(a, b, c) for a, b, c in zip(s.method, s["mode"], s.kind)]
    table = s.pivot_table(index="series", columns=["metric", "fraction"], values="mean", sort=False)
    text = s.pivot_table(index="series", columns=["metric", "fraction"], values="text", aggfunc="first", sort=False)
    head = "<tr><th>method</th>" + "".join(f"<th>{html.escape(m)} @ {f:g}</th>" for m, f in table.columns) + "</tr>"
    rows = []
    for name in table.index:
        cells = []
        for col in table.columns:
            best = table[col].max()
            v = table.loc[name, col]
            t = html.escape(str(text.loc[name, col]))
            cells.append(f"<td><b>{t}</b></td>" if v == best else f"<td>{t}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;
margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child{text-align:left}
th{background:#f3f3f3}img{max-width:100%}h2{border-bottom:1px solid #ddd;padding-bottom:.2em}.note{color:#555}"""


def write_report(results: pd.DataFrame, path: str | Path, *, title: str = "scforge bench",
                 embeddings: dict[str, dict[str, Any]] | None = None, cache: Any = None,
                 skipped: list[str] | None = None) -> Path:
    """Write the HTML report of tidy ``results`` to ``path``. ``embeddings``: per dataset a dict with
    ``embeddings`` (name -> [cells, dims]), ``labels`` and ``batches`` for the UMAPs."""
    path = Path(path)
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head>"
             f"<body><h1>{html.escape(title)}</h1>",
             "<p class='note'>Baselines are grey and dashed. Bands and error bars: 95% t-intervals over seeds "
             "(t(0.975, n-1)·sd/√n). Every method was trained and tested on the same splits.</p>"]
    if skipped:
        parts.append("<p class='note'>Not run: " + "; ".join(html.escape(s) for s in skipped) + ".</p>")
    summary = summarize(results)
    for dataset in dict.fromkeys(results.dataset):
        parts.append(f"<h2>{html.escape(str(dataset))}</h2>")
        for block, heading in ((annotation_table(results, dataset), "Annotation (mean ± sd over seeds)"),
                               (few_shot_figure(summary, dataset), "Few-shot curves"),
                               (bar_figure(results, dataset), "Metrics at the largest training fraction"),
                               (scib_table(results, dataset), "Integration metrics (scib-metrics; labelled cells)")):
            if block:
                parts.append(f"<h3>{heading}</h3>{block}")
        if embeddings and dataset in embeddings:
            e = embeddings[dataset]
            parts.append("<h3>UMAPs of each embedding</h3>"
                         + umap_figure(str(dataset), e["embeddings"], np.asarray(e["labels"], dtype=object),
                                       e.get("batches"), cache))
    parts.append("</body></html>")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(parts))
    return path
