"""Evaluation-harness benchmark: the ifnb annotation matrix end to end, and scib-metrics on 14k cells.

    python benchmarks/bench_matrix.py --quick   # matrix with one fraction (1.0) and one seed
    python benchmarks/bench_matrix.py           # the full matrix (5 fractions x 3 seeds; about an hour)

Part 1 runs ``examples/ifnb_annotation.yaml`` (ifnb_sub_2000; quick: fraction 1.0, seed 0, every mode; L1-LR, HVG+PCA kNN/logistic, default
scGPT and the small Geneformer: kNN, linear probe, fine-tune, no-pretraining) in a child process
with an empty cache, and reports its wall time and peak resident memory (``ru_maxrss`` of the
child). The Geneformer model must exist (``python scripts/pretrain_eval_models.py``); without it the
matrix runs with the scGPT model only and says so.

Part 2 scores three embeddings of the full ifnb set (13,999 cells: HVG+PCA, Harmony, the default
scGPT model) with scforge's ``integration_metrics`` (scib-metrics' Benchmarker: one neighbour graph
per embedding) against the same metrics computed one function at a time, each kNN metric with its
own neighbour search. Labels exist for 2,000 cells only; for this timing the others get the label
of their nearest labelled cell in PCA space (a timing input, not a result). Alternating rounds;
medians.
Ends with ``RESULT bench_matrix seconds=<s> metrics_speedup=<x>``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "ifnb_annotation.yaml"
IFNB_FULL = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
WORK = ROOT / "benchmarks" / "_work"

CHILD = """
import sys, dataclasses, yaml
from pathlib import Path
from scforge.bench import parse_config, run_matrix
cfg_path, out, quick = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
data = yaml.safe_load(cfg_path.read_text())
if quick:
    data["fractions"], data["seeds"] = [1.0], [0]
    data.pop("train_fractions", None), data.pop("train_seeds", None)
models = data.get("models", {})
for name, spec in list(models.items()):
    p = spec["path"]
    if p != "default" and not (cfg_path.parent / p).exists():
        print(f"model {name} not found at {p}; running without it", file=sys.stderr)
        del models[name]
data["output"], data["cache"] = str(out), str(out / "cache")
cfg = parse_config(data, cfg_path.parent)
run = run_matrix(cfg, log=None)
print(len(run.computed), len(run.results))
"""


def run_matrix_child(quick: bool) -> tuple[float, float, int]:
    out = Path(tempfile.mkdtemp(prefix="bench_matrix_", dir=WORK))
    try:
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(CONFIG), str(out), "1" if quick else "0"],
                              capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        if proc.returncode:
            sys.exit(f"matrix run failed:\n{proc.stderr[-4000:]}")
        units = int(proc.stdout.split()[0])
        print(proc.stderr.strip()[-500:] if proc.stderr.strip() else "", file=sys.stderr)
        peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        return seconds, peak_gib, units
    finally:
        shutil.rmtree(out, ignore_errors=True)


def integration_inputs() -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    import anndata as ad
    from sklearn.neighbors import KNeighborsClassifier

    import scforge
    from scforge.baselines import harmony_integrate, hvg_pca
    from scforge.bench import embed_cells

    adata = ad.read_h5ad(IFNB_FULL)
    pca = hvg_pca(adata, n_top_genes=2000, n_comps=50, seed=0)
    batches = adata.obs["stim"].astype(str).to_numpy()
    embs = {"pca": pca, "harmony": harmony_integrate(pca, batches, seed=0),
            "scgpt_default": embed_cells(scforge.load("default"), adata)}
    labels = adata.obs["seurat_annotations"]
    known = labels.notna().to_numpy()
    knn = KNeighborsClassifier(n_neighbors=1).fit(pca[known], labels[known].astype(str))
    filled = labels.astype(object).to_numpy()
    filled[~known] = knn.predict(pca[~known])
    return embs, filled.astype(str), batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="matrix with one fraction and one seed")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the metrics timing")
    parser.add_argument("--metrics-only", action="store_true", help="skip the matrix run (part 1)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, _HERE)
    from _scib_timing import time_metrics

    summary: dict = {"quick": args.quick}
    if not args.metrics_only:
        seconds, peak, units = run_matrix_child(args.quick)
        print(f"matrix ({'quick' if args.quick else 'full'}): {units} units in {seconds:.0f} s, peak RSS "
              f"{peak:.2f} GiB", flush=True)
        summary.update(matrix_seconds=seconds, matrix_peak_rss_gib=peak, matrix_units=units)

    embs, labels, batches = integration_inputs()
    t = time_metrics(embs, labels, batches, "pca", repeats=args.rounds)  # alternating, after a warm-up
    print(f"scib metrics on {labels.size} cells x {len(embs)} embeddings: neighbours once {t['scforge_s']:.1f} s, "
          f"each metric on its own {t['peer_s']:.1f} s (x{t['speedup']:.2f}; of which the peer's neighbour "
          f"searches {t['peer_neighbor_search_s']:.1f} s); max |difference| {t['max_abs_diff']:.2e}")
    summary["metrics"] = {k: v for k, v in t.items() if k != "table"}
    (WORK / "bench_matrix.json").write_text(json.dumps(summary, indent=1, default=float))
    seconds = summary.get("matrix_seconds", float("nan"))
    print(f"RESULT bench_matrix seconds={seconds:.0f} metrics_speedup={t['speedup']:.2f} "
          f"peak_rss_gib={summary.get('matrix_peak_rss_gib', float('nan')):.2f} metrics_seconds={t['scforge_s']:.1f}")


if __name__ == "__main__":
    main()
