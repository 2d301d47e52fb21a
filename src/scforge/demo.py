"""``make demo`` / ``scforge demo``: cell-type annotation with the shipped default model, end to end.

On scanpy's bundled ``pbmc68k_reduced`` (700 PBMCs, 10 labels), offline: embed every cell with
``scforge.load("default")``, then on one stratified 80/20 split compare a linear probe on the frozen
embedding, a full fine-tune, and the L1 logistic-regression baseline on log1p CP10k; write
``demo-report/index.html`` (metrics table, confusion matrices, UMAP of the embedding) and
``demo-report/results.json``. :func:`tokenizer_overview` prints the three tokenizers' view of the
same cells.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np


def recover_counts(adata: Any) -> Any:
    """Integer UMI counts of pbmc68k_reduced, recovered from its log-normalized ``.raw``.

    The dataset ships ``raw.X = log1p(counts / n_counts * 1e4)`` (765 genes) and the per-cell totals
    ``obs['n_counts']`` over all genes, so ``expm1(raw.X) * n_counts / 1e4`` gives the counts back up
    to the float rounding of the stored values. Returns a new AnnData; the input is not changed.
    """
    import anndata as ad
    import scipy.sparse as sp

    raw = adata.raw.X.tocsr()
    scale = np.repeat(adata.obs["n_counts"].to_numpy(np.float64) / 1e4, np.diff(raw.indptr))
    approx = np.expm1(raw.data.astype(np.float64)) * scale
    counts = np.rint(approx)
    deviation = float(np.abs(approx - counts).max())
    if deviation > 0.25:
        raise RuntimeError(f"counts do not round cleanly (max deviation {deviation:.3f})")
    x = sp.csr_matrix((counts.astype(np.float32), raw.indices.copy(), raw.indptr.copy()), shape=raw.shape)
    out = ad.AnnData(X=x, obs=adata.obs[["n_counts", "bulk_labels"]].copy(), var=adata.raw.var[[]].copy())
    out.uns["count_recovery_max_deviation"] = deviation
    return out


def _row(model: str, vocab: str, report: Any, cells: Any, seconds: float) -> dict[str, Any]:
    s = cells.summary()
    return {
        "model": model,
        "vocabulary": vocab,
        "genes matched": f"{report.n_matched}/{report.n_genes}",
        "counts covered": f"{report.count_fraction:.1%}" if report.count_fraction is not None else "-",
        "cells": s["cells"],
        "tokens/cell (median, max)": f"{s['tokens_per_cell_median']:.0f}, {s['tokens_per_cell_max']}",
        "seconds": f"{seconds:.2f}",
    }


def tokenizer_overview() -> list[dict[str, Any]]:
    """Tokenize pbmc68k_reduced for scGPT, Geneformer (V2) and scBERT; print reports; return rows."""
    import scanpy as sc

    from scforge.genes import builtin, map_ensembl_to_symbols
    from scforge.tokenize import BinnedTokenizer, LogBinTokenizer, RankValueTokenizer

    adata = sc.datasets.pbmc68k_reduced()
    counts = recover_counts(adata)
    print(
        f"pbmc68k_reduced: {adata.n_obs} cells x {adata.raw.n_vars} genes (scanpy's bundled data). X is "
        "scaled, raw holds log-normalized values; integer counts recovered from raw and n_counts "
        f"(max rounding deviation {counts.uns['count_recovery_max_deviation']:.3f}).\n"
    )
    rows = []

    scgpt = BinnedTokenizer(builtin.builtin_vocab("scgpt-human"), max_len=1200, seed=0)
    report = scgpt.coverage(counts)
    t0 = time.perf_counter()
    cells = scgpt.tokenize(counts)
    rows.append(_row("scGPT (value bins)", "scgpt-human, 60,697", report, cells, time.perf_counter() - t0))
    print("== scGPT ==\n" + str(report))
    genes, values = cells[0]
    print(f"cell 0: {len(genes)} tokens; first ids {genes[:6].tolist()}; bins {values[:6].astype(int).tolist()}\n")

    dicts = builtin.builtin_geneformer("geneformer-v2")
    geneformer = RankValueTokenizer(dicts)  # n_counts from obs: totals over all genes, as required
    report = geneformer.coverage(counts)
    t0 = time.perf_counter()
    cells = geneformer.tokenize(counts)
    rows.append(_row("Geneformer V2 (rank values)", "geneformer-v2, 20,275", report, cells, time.perf_counter() - t0))
    print("== Geneformer V2 ==\n" + str(report))
    genes, _ = cells[0]
    top = [dicts.vocab.token(int(g)) for g in genes[1:4]]
    print(f"cell 0: {len(genes)} tokens (<cls> ... <eos>); top-ranked genes {map_ensembl_to_symbols(top).tolist()}\n")

    # scBERT's published 16,906-gene panel (panglao_10000.h5ad) is not distributable here; a
    # stand-in panel of the same kind (Geneformer V2's ~20k genes, as HGNC symbols) shows the shape.
    symbols = map_ensembl_to_symbols(dicts.vocab.gene_tokens)
    panel = sorted({s for s in symbols if isinstance(s, str)})
    scbert = LogBinTokenizer(panel, min_genes=0)
    report = scbert.coverage(counts)
    t0 = time.perf_counter()
    cells = scbert.tokenize(counts)
    rows.append(_row("scBERT (log bins)", f"stand-in panel, {len(panel):,}", report, cells, time.perf_counter() - t0))
    print("== scBERT (stand-in panel; pass the published one with --vocab) ==\n" + str(report))
    tokens = cells[0][1]
    print(f"cell 0: {len(tokens)} positions; token counts {np.bincount(tokens, minlength=6).tolist()}\n")

    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(str(r[h]).ljust(w) for h, w in zip(headers, widths)))
    return rows


# ---- the annotation demo ---------------------------------------------------------------------
def _confusion_png(report: Any, title: str, path: Any) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = report.confusion
    frac = cm.div(cm.sum(axis=1).replace(0, 1), axis=0)
    fig, ax = plt.subplots(figsize=(7, 6))
    im = ax.imshow(frac.to_numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(cm.shape[1]), cm.columns, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(cm.shape[0]), cm.index, fontsize=7)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm.iat[i, j]:
                ax.text(j, i, str(cm.iat[i, j]), ha="center", va="center", fontsize=6,
                        color="white" if frac.iat[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.04, label="share of true class")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _umap_png(adata: Any, key: str, label_key: str, path: Any, seed: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    view = adata.copy()
    sc.pp.neighbors(view, use_rep=key, random_state=seed)
    sc.tl.umap(view, random_state=seed)
    fig, ax = plt.subplots(figsize=(7, 5.5))
    sc.pl.umap(view, color=label_key, ax=ax, show=False, title=f"UMAP of {key} (default model, zero-shot)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _html(results: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{name}</td>" + "".join(f"<td>{m[k]:.3f}</td>" for k in ("accuracy", "macro_f1", "precision",
                                                                          "recall", "kappa"))
        + f"<td>{m['seconds']:.0f}</td></tr>"
        for name, m in results["methods"].items()
    )
    figs = "".join(f'<figure><img src="{f}" width="560"><figcaption>{c}</figcaption></figure>'
                   for f, c in results["figures"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>scforge demo</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>scforge demo: cell-type annotation on pbmc68k_reduced</h1>
<p>{results["data"]}. Model: {results["model"]}. Split: stratified 80/20, seed {results["seed"]}
({results["n_train"]} training, {results["n_test"]} test cells); the same split for every method.</p>
<table><tr><th>method</th><th>accuracy</th><th>macro-F1</th><th>precision</th><th>recall</th><th>kappa</th>
<th>seconds</th></tr>{rows}</table>
<p>{results["verdict"]}</p>{figs}</body></html>"""


def run_demo(out_dir: str = "demo-report", *, model: str = "default", epochs: int = 5, seed: int = 0,
             progress: bool = True) -> dict[str, Any]:
    """Embed, linear-probe, fine-tune and compare with logistic regression on pbmc68k_reduced; write
    ``out_dir/index.html`` and ``out_dir/results.json``; return the results."""
    import json
    from pathlib import Path

    import scanpy as sc
    from sklearn.model_selection import train_test_split

    import scforge
    from scforge.baselines import LogisticBaseline
    from scforge.metrics import classification_metrics
    from scforge.tasks import annotate

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    label_key = "bulk_labels"
    counts = recover_counts(sc.datasets.pbmc68k_reduced())
    labels = counts.obs[label_key].astype(str).to_numpy()
    net = scforge.load(model)
    print(f"[1/5] data: pbmc68k_reduced, {counts.n_obs} cells x {counts.n_vars} genes, {len(set(labels))} labels "
          f"(counts recovered from raw). Model: {net}")
    idx = np.arange(counts.n_obs)
    train_idx, test_idx = train_test_split(idx, test_size=0.2, random_state=seed, stratify=labels)
    train, test = counts[np.sort(train_idx)].copy(), counts[np.sort(test_idx)].copy()
    methods: dict[str, Any] = {}
    reports: dict[str, Any] = {}

    print("[2/5] embedding every cell with the default model (zero-shot)")
    t0 = time.perf_counter()
    net.embed(counts, key_added="X_scforge", progress=progress, seed=seed)
    embed_seconds = time.perf_counter() - t0

    def record(name: str, y_pred: Any, seconds: float) -> None:
        report = classification_metrics(test.obs[label_key].astype(str).to_numpy(), np.asarray(y_pred).astype(str))
        reports[name] = report
        methods[name] = {k: float(getattr(report, k)) for k in ("accuracy", "macro_f1", "precision", "recall",
                                                                "kappa")} | {"seconds": seconds}
        print(f"      {name}: accuracy {report.accuracy:.3f}, macro-F1 {report.macro_f1:.3f} ({seconds:.0f} s)")

    print("[3/5] baseline: L1 logistic regression on log1p CP10k (liblinear, C=0.1)")
    t0 = time.perf_counter()
    base = LogisticBaseline(C=0.1, seed=seed).fit(train, train.obs[label_key])
    record("logistic regression (L1, log1p CP10k)", base.predict(test), time.perf_counter() - t0)

    print("[4/5] linear probe on the frozen default-model embedding")
    t0 = time.perf_counter()
    probe = annotate.linear_probe(net, train, label_key, val_fraction=0.0, seed=seed, progress=progress)
    pred = probe.predict(test, progress=progress)
    record("default model, linear probe", pred.columns.to_numpy()[pred.to_numpy().argmax(1)],
           time.perf_counter() - t0 + embed_seconds * len(train_idx) / counts.n_obs)

    print(f"[5/5] fine-tuning the default model for annotation ({epochs} epochs)")
    t0 = time.perf_counter()
    tuned = annotate.fine_tune(net, train, label_key, epochs=epochs, lr=1e-3, val_fraction=0.1, seed=seed,
                               progress=progress, batch_size=32)
    pred = tuned.predict(test, progress=progress)
    record("default model, fine-tuned", pred.columns.to_numpy()[pred.to_numpy().argmax(1)], time.perf_counter() - t0)

    figures = []
    _umap_png(counts, "X_scforge", label_key, out / "umap.png", seed)
    figures.append(("umap.png", "UMAP of the default model's zero-shot embedding, coloured by label"))
    for i, (name, report) in enumerate(reports.items()):
        _confusion_png(report, name, out / f"confusion_{i}.png")
        figures.append((f"confusion_{i}.png", f"confusion matrix (test cells): {name}"))
    best = max(methods, key=lambda k: methods[k]["macro_f1"])
    verdict = (f"Best macro-F1 on this split: {best}. The baseline is listed first on purpose: on small, "
               "clean PBMC data a linear model on expression is hard to beat, and this demo reports "
               "whichever wins.")
    results = {
        "data": f"pbmc68k_reduced (scanpy), {counts.n_obs} cells, {counts.n_vars} genes, labels '{label_key}'",
        "model": str(net), "seed": seed, "n_train": int(len(train_idx)), "n_test": int(len(test_idx)),
        "methods": methods, "best": best, "verdict": verdict, "figures": figures,
        "confusion": {k: r.to_dict()["confusion"] for k, r in reports.items()},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "index.html").write_text(_html(results))
    print("\nSummary (test cells, stratified 80/20 split):")
    width = max(len(k) for k in methods)
    for name, m in methods.items():
        print(f"  {name.ljust(width)}  accuracy {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
              f"kappa {m['kappa']:.3f}")
    print(f"  {verdict}\nReport: {out / 'index.html'}")
    return results
