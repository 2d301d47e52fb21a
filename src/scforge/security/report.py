"""Self-contained HTML (and JSON / CSV) reports of the security module: an audit, one attack, a sweep.

>>> write_audit_report(table, "audit_out", adata=adata)       # audit.json, audit.csv, report.html
>>> write_attack_report(result, "attack_out")                  # attack.json, results.csv, report.html
>>> write_sweep_report(sweep, "sweep_out")                     # sweep.csv, report.html

Figures are inlined as PNG (matplotlib, Agg backend) in the style of :mod:`scforge.bench.report`.
Inputs are never modified.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scforge.bench.report import CSS, _png, umap_coordinates
from scforge.errors import InputDataError

__all__ = ["write_audit_report", "write_attack_report", "write_sweep_report", "to_json"]

UMAP_MAX_CELLS = 20000
TOP_FLAGGED = 50
STAGES = ("clean", "poisoned", "defended")
BAR_METRICS = ("accuracy", "macro_f1", "asr")
_STAGE_COLORS = {"clean": "#4c72b0", "poisoned": "#c44e52", "defended": "#55a868"}


# ---- helpers ------------------------------------------------------------------------------------
def to_json(value: Any) -> Any:
    """``value`` with only plain JSON types: numpy scalars/arrays unwrapped, tuples as lists, NaN and
    infinities as None, other objects as their ``str``."""
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, pd.Index, pd.Series, np.ndarray)):
        return [to_json(v) for v in (sorted(value, key=str) if isinstance(value, set) else list(value))]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if value is pd.NA or value is pd.NaT:
        return None
    return str(value)


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(to_json(obj), indent=1, allow_nan=False))


def _agg() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        return f"{f:.{digits}f}" if math.isfinite(f) else "–"
    return str(v)


def _count(name: Any, v: Any) -> Any:
    """``v`` as an int when ``name`` is a count (``n_...``) and ``v`` a finite number."""
    if str(name).startswith("n_") and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v):
        return int(v)
    return v


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _setting(v: Any) -> str:
    """A setting as short text: numbers with ``:g``, lists / dicts as JSON."""
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(to_json(v))
    if isinstance(v, (float, np.floating)) and not isinstance(v, bool):
        return f"{float(v):g}"
    return str(v)


def _page(title: str, parts: list[str]) -> str:
    return "\n".join([f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}"
                      "</style></head>", f"<body><h1>{html.escape(title)}</h1>", *parts, "</body></html>"])


def _write_html(out: Path, title: str, parts: list[str]) -> Path:
    path = out / "report.html"
    path.write_text(_page(title, parts))
    return path


# ---- audit --------------------------------------------------------------------------------------
def _detectors(table: pd.DataFrame, summary: dict[str, Any]) -> list[str]:
    names = summary.get("detectors") or [c[:-2] for c in table.columns if c.endswith("_z")]
    return [d for d in names if f"{d}_z" in table.columns]


def _summary(table: pd.DataFrame) -> dict[str, Any]:
    summary = table.attrs.get("summary")
    if summary:
        return dict(summary)
    from scforge.security.audit import audit_summary

    names = [c[:-2] for c in table.columns if c.endswith("_z")]
    return audit_summary(table, threshold=5.0, detectors=names, label_key="label")


def audit_json(table: pd.DataFrame) -> dict[str, Any]:
    """The ``audit.json`` document of an audit table (plain JSON types)."""
    summary = _summary(table)
    dets = _detectors(table, summary)
    cols = ["label", "score", "flagged", "reasons"] + [c for d in dets for c in (d, f"{d}_z") if c in table.columns]
    cells = {str(name): {c: to_json(v) for c, v in zip(cols, row)}
             for name, row in zip(table.index, table[cols].itertuples(index=False, name=None))}
    flagged = table[table["flagged"].astype(bool)].sort_values("score", ascending=False, kind="stable")
    top = [{"cell": str(n), "label": to_json(r.label), "score": to_json(r.score), "reasons": to_json(r.reasons)}
           for n, r in zip(flagged.index, flagged.itertuples(index=False))]
    return to_json({"summary": summary, "cells": cells, "flagged": top})


def _histograms(table: pd.DataFrame, dets: list[str], threshold: float) -> str | None:
    """One histogram of robust z per detector (log y), flagged cells in red, threshold dashed."""
    if not dets:
        return None
    plt = _agg()
    ncols = min(3, len(dets))
    nrows = math.ceil(len(dets) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    flagged = table["flagged"].to_numpy(dtype=bool)
    for ax, d in zip(axes.ravel(), dets):
        z = table[f"{d}_z"].to_numpy(dtype=np.float64)
        ok = np.isfinite(z)
        lo, hi = (min(z[ok].min(), 0.0), max(z[ok].max(), threshold * 1.1)) if ok.any() else (0.0, threshold * 1.1)
        bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 61)
        ax.hist(z[ok], bins=bins, color="0.6", label="all cells")
        if (ok & flagged).any():
            ax.hist(z[ok & flagged], bins=bins, color="#d62728", alpha=0.85, label="flagged (any detector)")
        ax.axvline(threshold, color="black", linestyle="--", lw=1, label=f"threshold {threshold:g}")
        ax.set_yscale("log")
        ax.set_title(f"{d}: {int((z > threshold).sum())} cells above")
        ax.set_xlabel("robust z")
        ax.set_ylabel("cells")
        ax.grid(alpha=0.3)
    for ax in axes.ravel()[len(dets):]:
        ax.set_visible(False)
    axes.ravel()[0].legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _umap(table: pd.DataFrame, adata: Any, layer: str | None, seed: int) -> tuple[str, int]:
    """UMAP (of PCA of log1p CP10k, or of the values when not counts) with flagged cells in red on top."""
    import scipy.sparse as sp

    from scforge.baselines import log1p_cp10k
    from scforge.matrix import looks_like_counts
    from scforge.security.detect import top_variance_pca

    pos = adata.obs_names.get_indexer(table.index)
    if (pos < 0).any():
        raise InputDataError(f"{int((pos < 0).sum())} cells of the audit table are not in adata.obs_names; pass "
                             "the AnnData that was audited.")
    if layer is not None and layer not in adata.layers:
        raise InputDataError(f"layer {layer!r} not found; the AnnData has layers {list(adata.layers)}.")
    n = len(table)
    rows = np.sort(np.random.default_rng(seed).choice(n, UMAP_MAX_CELLS, replace=False)) if n > UMAP_MAX_CELLS \
        else np.arange(n)
    src = adata.layers[layer] if layer is not None else adata.X
    x = sp.csr_matrix(src[pos[rows]], dtype=np.float64, copy=True)
    logx = log1p_cp10k(x) if looks_like_counts(x) else x
    xy = umap_coordinates(top_variance_pca(logx, 50, seed), seed)
    plt = _agg()
    lab = table["label"].astype(str).to_numpy()[rows]
    flagged = table["flagged"].to_numpy(dtype=bool)[rows]
    cats = sorted(set(lab))
    cmap = plt.get_cmap("tab20")
    palette = [cmap(i) for i in range(20) if i not in (6, 7)]  # tab20 without its reds
    color_of = {c: palette[i % len(palette)] for i, c in enumerate(cats)}
    fig, ax = plt.subplots(figsize=(7.5, 6))
    ok = ~flagged
    ax.scatter(xy[ok, 0], xy[ok, 1], s=4, c=[color_of[c] for c in lab[ok]], linewidths=0)
    ax.scatter(xy[flagged, 0], xy[flagged, 1], s=16, c="#d62728", edgecolors="black", linewidths=0.4, zorder=3)
    handles = [plt.Line2D([], [], marker="o", ls="", color=color_of[c], label=c) for c in cats]
    handles.append(plt.Line2D([], [], marker="o", ls="", color="#d62728", markeredgecolor="black",
                              label=f"flagged ({int(flagged.sum())})"))
    ax.legend(handles=handles, fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title("UMAP: flagged cells (red) over the labels")
    return _png(fig), rows.size


def write_audit_report(table: pd.DataFrame, out: str | Path, *, adata: Any = None, layer: str | None = None,
                       title: str = "scforge audit", umap: bool = True, seed: int = 0) -> Path:
    """Write ``audit.json``, ``audit.csv`` and a self-contained ``report.html`` of an
    :func:`~scforge.security.audit` table under the folder ``out``; returns the HTML's path.

    With ``adata`` (the audited AnnData; ``layer`` as in the audit) and ``umap=True`` the report
    adds a UMAP (at most 20,000 cells, seeded) with the flagged cells marked."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = _summary(table)
    dets = _detectors(table, summary)
    threshold = float(summary.get("threshold", 5.0))
    _dump(audit_json(table), out / "audit.json")
    table.to_csv(out / "audit.csv")

    n_cells, n_flagged = int(len(table)), int(table["flagged"].sum())
    parts = [f"<p><b>{n_flagged}</b> of <b>{n_cells}</b> cells flagged ({n_flagged / max(n_cells, 1):.1%}); "
             f"a cell is flagged when its largest robust z-score exceeds <b>{threshold:g}</b>. Labels: "
             f"<code>{html.escape(str(summary.get('label_key', 'label')))}</code>.</p>",
             "<h2>Detectors</h2>",
             _table(["detector", "cells above the threshold"],
                    [[d, summary.get("flagged_by_detector", {}).get(d, int((table[f"{d}_z"] > threshold).sum()))]
                     for d in dets]),
             "<h2>Per class</h2>",
             _table(["label", "cells", "flagged", "share flagged", "median score"],
                    [[k, v.get("n_cells"), v.get("n_flagged"), f"{float(v.get('share_flagged', 0.0)):.1%}",
                      v.get("median_score")]
                     for k, v in sorted(summary.get("per_class", {}).items(),
                                        key=lambda kv: -float(kv[1].get("share_flagged", 0.0)))])]
    hist = _histograms(table, dets, threshold)
    if hist:
        parts.append(f"<h2>Robust z-scores per detector</h2><p class='note'>Log scale; grey: all cells, red: the "
                     f"flagged cells; dashed: the threshold.</p>{hist}")
    if adata is not None and umap and n_cells >= 20:
        img, shown = _umap(table, adata, layer, seed)
        note = f" (a seeded sample of {shown} of {n_cells} cells)" if shown < n_cells else ""
        parts.append(f"<h2>UMAP</h2><p class='note'>PCA of log1p CP10k (or of the values when they are not "
                     f"counts), then UMAP{note}. Flagged cells are red and drawn on top.</p>{img}")
    flagged = table[table["flagged"].astype(bool)].sort_values("score", ascending=False, kind="stable")
    parts.append(f"<h2>Top flagged cells</h2><p class='note'>{min(TOP_FLAGGED, len(flagged))} of {len(flagged)}, "
                 "by score.</p>")
    if len(flagged):
        zcols = [f"{d}_z" for d in dets]
        parts.append(_table(["cell", "label", "score", *zcols, "reasons"],
                            [[n, r["label"], r["score"], *(r[c] for c in zcols), r["reasons"]]
                             for n, r in flagged.head(TOP_FLAGGED).iterrows()]))
    return _write_html(out, title, parts)


# ---- one attack ---------------------------------------------------------------------------------
def _attack_bars(wide: pd.DataFrame) -> str | None:
    metrics = [m for m in BAR_METRICS if m in wide.columns]
    stages = [s for s in STAGES if s in wide.index]
    if not metrics or not stages:
        return None
    plt = _agg()
    fig, ax = plt.subplots(figsize=(1.9 * len(metrics) * len(stages) / 2 + 2.5, 4))
    width = 0.8 / len(stages)
    for i, stage in enumerate(stages):
        vals = [float(wide.loc[stage, m]) for m in metrics]
        xs = np.arange(len(metrics)) + (i - (len(stages) - 1) / 2) * width
        bars = ax.bar(xs, vals, width, label=stage, color=_STAGE_COLORS[stage])
        ax.bar_label(bars, labels=[_fmt(v, 2) for v in vals], fontsize=7, padding=1)
    ax.set_xticks(range(len(metrics)), [m.replace("_", "-") for m in metrics])
    ax.set_ylim(0, 1.08)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    ax.set_title("Clean accuracy / macro-F1 and attack success rate per stage")
    return _png(fig)


def attack_verdict(wide: pd.DataFrame, settings: dict[str, Any] | None = None) -> str:
    """One plain-language line from a stage x metric table, e.g. ``ASR 0.05 on the clean model, 0.97
    after poisoning -> 0.02 after the defence; clean accuracy 0.90 -> 0.90 -> 0.89``."""
    def get(stage: str, metric: str) -> float | None:
        if stage in wide.index and metric in wide.columns and np.isfinite(float(wide.loc[stage, metric])):
            return float(wide.loc[stage, metric])
        return None

    settings = settings or {}
    stages = [s for s in STAGES if s in wide.index]
    asr = {s: get(s, "asr") for s in stages}
    acc = [get(s, "accuracy") for s in stages]
    bits = []
    if asr.get("poisoned") is not None:
        line = f"ASR {asr['poisoned']:.2f} after poisoning"
        if asr.get("clean") is not None:
            line = f"ASR {asr['clean']:.2f} on the clean model, {asr['poisoned']:.2f} after poisoning"
        if asr.get("defended") is not None:
            line += f" -> {asr['defended']:.2f} after the defence"
        bits.append(line)
    if any(a is not None for a in acc):
        bits.append("clean accuracy " + " -> ".join("–" if a is None else f"{a:.2f}" for a in acc)
                    + f" ({' / '.join(stages)})")
    text = "; ".join(bits) + "." if bits else "No stage results."
    c, p, d = asr.get("clean"), asr.get("poisoned"), asr.get("defended")
    if c is not None and p is not None:
        gain = p - c
        if gain < 0.1:
            text += " The backdoor barely took hold (ASR rose by less than 0.1)."
        elif d is not None:
            undone = min(max((p - d) / gain, 0.0), 1.0)
            n = next((v for v in (get("defended", "n_removed"), get("defended", "n_relabelled")) if v is not None),
                     None)
            copies = get("defended", "n_unlearn_copies")
            what = f"{int(round(n or 0))} cells" + ("" if copies is None else
                                                    f" removed, {int(round(copies))} triggered copies added")
            how = f" ({settings['defence']}: {what})" if settings.get("defence") and n is not None else ""
            text += f" The defence undid {undone:.0%} of the attack's ASR gain{how}."
            if d < c - 0.02:
                text += f" The defended model's ASR is below the clean model's own ({c:.2f})."
        else:
            text += f" The backdoor raised the ASR by {gain:.2f}; no defence was run."
    return text


def _asr_breakdown(result: Any) -> list[str]:
    """HTML tables of each stage's ASR per true class of the triggered test cells, and per how many
    genes the trigger kept (the sparsify trigger); nothing for a result without per-cell predictions."""
    frame = getattr(result, "triggered", None)
    if frame is None:
        return []
    groupings = [("label", None, "true class")]
    if "n_kept" in frame.columns:
        groupings.append(("n_kept", [0, 5, 10, 15, 20, 30, float("inf")], "genes kept by the trigger"))
    parts = []
    for by, bins, title in groupings:
        table = result.asr_by_stages(by, bins)
        rows = [[str(group), int(row["n_cells"]), *row.iloc[1:].astype(float)] for group, row in table.iterrows()]
        parts += [f"<h2>ASR by {html.escape(title)}</h2>", _table([by, "cells", *result.stages], rows)]
    return parts


def write_attack_report(result: Any, out: str | Path) -> Path:
    """Write ``attack.json``, ``results.csv``, ``triggered.csv`` (and ``audit.csv``) and ``report.html`` of an
    :class:`~scforge.security.AttackResult` under the folder ``out``; returns the HTML's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _dump(result.to_dict(), out / "attack.json")
    result.table.to_csv(out / "results.csv", index=False)
    if result.audit is not None:
        result.audit.to_csv(out / "audit.csv")
    if getattr(result, "triggered", None) is not None:
        result.triggered.to_csv(out / "triggered.csv")
    wide = result.wide()
    wide = wide.loc[[s for s in STAGES if s in wide.index] + [s for s in wide.index if s not in STAGES]]
    settings = dict(result.settings)
    target = settings.get("target", "?")
    parts = [f"<p><b>{html.escape(attack_verdict(wide, settings))}</b></p>",
             "<p class='note'>Accuracy, macro-F1, precision, recall and kappa: on the untouched test cells. ASR: the "
             f"share of triggered non-target test cells predicted as the target ({html.escape(str(target))}).</p>",
             "<h2>Results (stage x metric)</h2>",
             _table(["stage", *map(str, wide.columns)],
                    [[s, *(_count(m, v) for m, v in row.items())] for s, row in wide.iterrows()])]
    bars = _attack_bars(wide)
    if bars:
        parts.append(bars)
    parts += _asr_breakdown(result)
    if result.detection:
        parts += ["<h2>Detection</h2><p class='note'>The audit's scores against the known poisoned training "
                  "cells.</p>", _table(["metric", "value"], [[k, _count(k, v)] for k, v in result.detection.items()])]
    parts += ["<h2>Settings</h2>", _table(["setting", "value"], [[k, _setting(v)] for k, v in settings.items()])]
    if result.seconds:
        parts.append("<p class='note'>Wall time: " + html.escape(", ".join(
            f"{k} {float(v):.1f} s" for k, v in result.seconds.items())) + ".</p>")
    return _write_html(out, f"scforge attack: {settings.get('victim', 'victim')} -> {target}", parts)


# ---- sweep --------------------------------------------------------------------------------------
def _sweep_figure(table: pd.DataFrame, axis: str, other: str) -> str:
    """ASR (poisoned, defended) against ``axis``, one line per target (per value of ``other`` when it varies)."""
    plt = _agg()
    asr = table[table.metric == "asr"]
    stages = [s for s in ("poisoned", "defended") if s in set(asr.stage)]
    fig, axes = plt.subplots(1, len(stages), figsize=(5.5 * len(stages), 4), squeeze=False)
    targets = list(dict.fromkeys(asr.target))
    others = sorted(set(asr[other]))
    colors = plt.get_cmap("tab10").colors
    styles = ["-", "--", ":", "-."]
    for ax, stage in zip(axes[0], stages):
        for i, target in enumerate(targets):
            for j, o in enumerate(others):
                s = asr[(asr.stage == stage) & (asr.target == target) & (asr[other] == o)]
                s = s.groupby(axis)["value"].mean().sort_index()
                label = str(target) if len(others) == 1 else f"{target} ({other} {o:g})"
                ax.plot(s.index, s.to_numpy(), marker="o", ms=4, color=colors[i % 10],
                        linestyle=styles[j % len(styles)], label=label)
        ax.set_xlabel(axis)
        ax.set_ylabel("ASR")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"ASR {stage} vs {axis}")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def write_sweep_report(table: pd.DataFrame, out: str | Path, *, title: str = "scforge attack sweep") -> Path:
    """Write ``sweep.csv`` and ``report.html`` of a :func:`~scforge.security.sweep_attack` table under
    the folder ``out``: ASR against rate and against ``topnstop`` (where they vary) and a wide table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "sweep.csv", index=False)
    keys = [k for k in ("target", "rate", "topnstop") if k in table.columns]
    parts = [f"<p>{table[keys].drop_duplicates().shape[0]} runs: targets "
             f"{html.escape(', '.join(map(str, dict.fromkeys(table.target))))}; rates "
             f"{html.escape(', '.join(f'{r:g}' for r in sorted(set(table.rate))))}; topnstop "
             f"{html.escape(', '.join(f'{t:g}' for t in sorted(set(table.topnstop))))}.</p>"]
    for axis, other in (("rate", "topnstop"), ("topnstop", "rate")):
        if table[axis].nunique() > 1 and (table.metric == "asr").any():
            parts.append(f"<h2>ASR against {axis}</h2>{_sweep_figure(table, axis, other)}")
    order = {s: i for i, s in enumerate((*STAGES, "detection"))}
    wide = table.pivot_table(index=keys, columns=["stage", "metric"], values="value", aggfunc="mean", sort=False)
    cols = sorted(wide.columns, key=lambda c: (order.get(c[0], len(order)), list(wide.columns).index(c)))
    wide = wide[cols]
    parts += ["<h2>All runs</h2>",
              _table([*keys, *(f"{s} {m}" for s, m in cols)],
                     [[*(_setting(i) for i in (idx if isinstance(idx, tuple) else (idx,))),
                       *(_count(m, v) for (_, m), v in row.items())] for idx, row in wide.iterrows()])]
    return _write_html(out, title, parts)
