"""``make demo`` / ``scforge demo``: tokenize scanpy's bundled pbmc68k_reduced for every model family.

Runs offline on data that ships with scanpy and vocabularies that ship with scforge, and prints a
gene coverage report and a token summary per model family.
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


def run_demo() -> list[dict[str, Any]]:
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
