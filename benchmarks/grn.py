"""Attention-network benchmark: scforge's streamed aggregation vs a direct, tutorial-style implementation.

Both build the STIM/CTRL-agnostic attention network (all cells of ifnb, all layers of the default
model, every gene of an HVG list tokenized in every cell) from the same tokens:

* streamed (``scforge.tasks.grn.attention_network``): per batch, ranks by one argsort + scatter, mean
  over heads, summed on the device into one running [G, G] float64 total;
* direct (the scGPT tutorial's loop): per batch, ranks by argsort of argsort, the per-cell maps
  copied to NumPy and added cell by cell.

Each run is a fresh subprocess (its own peak RSS), streamed and direct alternate, medians are
reported with the ratio; the two networks must agree. Also times the gene-embedding network.

    python benchmarks/grn.py [--quick]      # --quick: 1,000 cells
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # benchmarks/tokenize.py

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"


def direct_network(model, adata, genes, cells, batch_size: int = 16) -> np.ndarray:
    """The tutorial's aggregation: materialise each batch's per-cell maps, rank by argsort of argsort,
    move them to NumPy and add them one cell at a time."""
    import torch

    from scforge.tasks.grn.attention import layer_inputs, raw_scores, tokenize_genes

    tokens, names = tokenize_genes(model, adata, genes, cells)
    module = model.module.eval()
    n_layers = len(module.transformer_encoder.layers)
    g, width = len(names), len(names) + 1
    total = np.zeros((g, g), dtype=np.float64)
    with torch.inference_mode():
        for lo in range(0, tokens.n_cells, batch_size):
            b = tokens.pack(np.arange(lo, min(lo + batch_size, tokens.n_cells)))
            ids, values = b["genes"].view(-1, width), b["values"].view(-1, width)
            per_layer = []
            for _, block, x in layer_inputs(module, ids, values, list(range(n_layers))):
                s = raw_scores(block, x)
                rows = torch.argsort(torch.argsort(s, dim=-1, stable=True), dim=-1, stable=True).float()
                ranks = torch.argsort(torch.argsort(rows, dim=-2, stable=True), dim=-2, stable=True).float() / g
                per_layer.append(ranks.mean(dim=1).numpy())
            maps = np.mean(per_layer, axis=0)
            for cell_map in maps:
                total += cell_map
    return total / tokens.n_cells


def worker(kind: str, n_cells: int, n_genes: int, out: str) -> None:
    import anndata as ad

    import scforge
    from scforge.tasks.grn import attention_network
    from scforge.tokenize import select_hvg

    adata = ad.read_h5ad(DATA)
    genes = select_hvg(adata, n_genes)  # on all cells: the same genes for every cell count
    cells = np.sort(np.random.default_rng(0).choice(adata.n_obs, size=min(n_cells, adata.n_obs), replace=False))
    adata = adata[cells].copy()
    model = scforge.load("default")
    start = time.perf_counter()
    if kind == "streamed":
        weights = attention_network(model, adata, genes, batch_size=16, device="cpu", progress=False).weights
        weights = weights.to_numpy()
    else:
        weights = direct_network(model, adata, genes, np.arange(adata.n_obs))
    seconds = time.perf_counter() - start
    np.save(out, weights)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak}))


def run(kind: str, n_cells: int, n_genes: int, out: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--cells", str(n_cells), "--genes", str(n_genes), "--npy", out]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def embedding_seconds(n_genes: int, reps: int = 3) -> float:
    import anndata as ad

    import scforge
    from scforge.tasks.grn import embedding_network
    from scforge.tokenize import select_hvg

    genes = select_hvg(ad.read_h5ad(DATA), n_genes)
    model = scforge.load("default")
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        net = embedding_network(model, genes)
        net.programs(resolution=1.0, min_size=5, seed=0)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--worker", choices=["streamed", "direct"])
    parser.add_argument("--cells", type=int, default=None)
    parser.add_argument("--genes", type=int, default=64)
    parser.add_argument("--npy", default=None)
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.cells, args.genes, args.npy)
        return
    if not DATA.is_file():
        sys.exit(f"data not found: {DATA}")
    n_cells = args.cells or (1000 if args.quick else 14_000)
    reps = args.reps or (3 if args.quick else 2)
    results: dict[str, list[dict]] = {"streamed": [], "direct": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(reps):
            for kind in ("streamed", "direct") if i % 2 == 0 else ("direct", "streamed"):
                results[kind].append(run(kind, n_cells, args.genes, f"{tmp}/{kind}.npy"))
        diff = float(np.abs(np.load(f"{tmp}/streamed.npy") - np.load(f"{tmp}/direct.npy")).max())
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("seconds", "peak_rss_mb")} for k, v in results.items()}
    emb = embedding_seconds(1200)
    cells_label = "all 13,999" if n_cells >= 13_999 else f"{n_cells:,}"
    print(f"attention network, default model (4 layers x 4 heads), {cells_label} ifnb cells, {args.genes} HVGs, "
          f"CPU, {reps} alternating runs each")
    print(f"{'implementation':<12} {'median s':>10} {'peak RSS MB':>12}")
    for k in ("streamed", "direct"):
        print(f"{k:<12} {med[k]['seconds']:>10.1f} {med[k]['peak_rss_mb']:>12.0f}")
    ratio = med["direct"]["seconds"] / med["streamed"]["seconds"]
    print(f"speed-up of streamed over direct: {ratio:.2f}x; max |difference| of the networks: {diff:.2e}")
    print(f"gene-embedding network + programs, 1200 HVGs: {emb:.2f} s (median of 3)")
    print(f"RESULT grn seconds={med['streamed']['seconds']:.2f} peak_rss_mb={med['streamed']['peak_rss_mb']:.0f} "
          f"direct_seconds={med['direct']['seconds']:.2f} direct_peak_rss_mb={med['direct']['peak_rss_mb']:.0f} "
          f"speedup={ratio:.2f} max_abs_diff={diff:.1e} embedding_seconds={emb:.2f} cells={n_cells} "
          f"genes={args.genes}")


if __name__ == "__main__":
    main()
