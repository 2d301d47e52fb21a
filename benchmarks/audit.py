"""Benchmark of ``scforge audit`` on the 14k-cell ifnb set against scBackdoor's detector as written.

    python benchmarks/audit.py              # 3 alternating rounds, data level + model level
    python benchmarks/audit.py --rounds 1 --no-model

Input: ``ifnb_full_13999_partial_labels.h5ad`` (13,999 cells x 14,053 genes, raw counts). Labels exist
for 2,000 cells; the others get the label of their nearest labelled cell in PCA space (a fine-tuning
set is fully labelled; this is a timing input, not a result). 5% of the cells are then poisoned with
scBackdoor's trigger (target "B", Gini selection, topnstop 2 on log1p CP10k).

* **scforge, data level**: ``scforge.security.audit`` (level consistency, sparsity, the rank-combined
  anomaly ensemble on 50 PCs, kNN labels; sparse throughout).
* **scforge, model level**: the same plus spectral signatures and activation clustering on the
  shipped default model's cell embeddings (the embedding pass is included in the time).
* **reference**: ``detect_tools.get_abnormal_cells`` as published: dense z-scores over all genes,
  per-class centroids on the dense matrix, IsolationForest (contamination 0.1) on the dense matrix,
  the three raw scores averaged; input the log1p CP10k matrix (the published detector reads
  log-normalised X).

Each variant runs in its own child process (peak resident memory = the child's ``ru_maxrss``,
including reading the data); scforge and the reference alternate, medians over rounds.
Ends with ``RESULT audit seconds=<s> auroc=<a> speedup_vs_reference=<x>``.
"""

from __future__ import annotations

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
KEY = "seurat_annotations"


def prepare(path: Path) -> None:
    """Write the labelled, poisoned 14k-cell input and its ground truth to ``path`` (.h5ad)."""
    import anndata as ad
    from sklearn.neighbors import KNeighborsClassifier

    from scforge.baselines import log1p_cp10k
    from scforge.security import poison
    from scforge.security.detect import top_variance_pca

    adata = ad.read_h5ad(DATA)
    pcs = top_variance_pca(log1p_cp10k(adata.X), 50, 0)
    known = adata.obs[KEY].notna().to_numpy()
    labels = adata.obs[KEY].astype(object).to_numpy()
    labels[~known] = KNeighborsClassifier(1).fit(pcs[known], labels[known].astype(str)).predict(pcs[~known])
    adata.obs[KEY] = labels.astype(str)
    poisoned = poison(adata, KEY, "B", rate=0.05, seed=0)
    out = poisoned.adata
    out.obs["_truth_poisoned"] = poisoned.poisoned
    out.write_h5ad(path)


def reference_detector(x_log: np.ndarray, labels: np.ndarray, top_percent: float = 10.0) -> np.ndarray:
    """``detect_tools.get_abnormal_cells`` written out: dense, all genes, raw scores averaged."""
    from scipy.stats import zscore
    from sklearn.ensemble import IsolationForest

    z = np.nan_to_num(zscore(x_log, axis=0))
    mean_abs = np.abs(z).mean(axis=1)
    classes = np.unique(labels)
    centroids = np.stack([x_log[labels == c].mean(axis=0) for c in classes])
    dist = np.min(np.stack([np.linalg.norm(x_log - c, axis=1) for c in centroids], axis=1), axis=1)
    forest = IsolationForest(contamination=top_percent / 100.0, random_state=0).fit(x_log)
    iso = -forest.decision_function(x_log)
    return (mean_abs + dist + iso) / 3.0


def child(kind: str, path: str) -> None:
    """One timed run in this process; prints a JSON line."""
    import anndata as ad

    from scforge.security.detect import detection_metrics

    adata = ad.read_h5ad(path)
    truth = adata.obs["_truth_poisoned"].to_numpy().astype(bool)
    t0 = time.perf_counter()
    if kind == "reference":
        from scforge.baselines import log1p_cp10k

        x = log1p_cp10k(adata.X).toarray()
        score = reference_detector(x, adata.obs[KEY].astype(str).to_numpy())
        flagged = score >= np.quantile(score, 0.9)
    else:
        from scforge.security import audit

        model = None
        if kind == "scforge_model":
            import scforge

            model = scforge.load("default")
        table = audit(adata, KEY, model=model)
        score, flagged = table["score"].to_numpy(), table["flagged"].to_numpy()
    seconds = time.perf_counter() - t0
    m = detection_metrics(score, truth, flagged)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_gib": rss, **{k: float(v) for k, v in m.items()}}))


def run_child(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", kind, "--input", str(path)], capture_output=True,
                         text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-model", action="store_true", help="skip the model-level variant")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--input", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.input)
        return
    if not DATA.exists():
        sys.exit(f"data not found: {DATA}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ifnb_poisoned.h5ad"
        t = time.perf_counter()
        prepare(path)
        print(f"prepared the poisoned 14k-cell input in {time.perf_counter() - t:.1f} s", flush=True)
        kinds = ["scforge", "reference"] + ([] if args.no_model else ["scforge_model"])
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for r in range(args.rounds):
            for kind in kinds:
                res = run_child(kind, path)
                runs[kind].append(res)
                print(f"round {r}: {json.dumps(res)}", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0] if m != "kind"} for k, v in runs.items()}
    for k, v in med.items():
        print(f"{k:14s} median seconds {v['seconds']:.1f}, peak RSS {v['peak_rss_gib']:.2f} GiB, AUROC "
              f"{v.get('auroc', float('nan')):.4f}, precision {v['precision']:.3f}, recall {v['recall']:.3f}")
    speedup = med["reference"]["seconds"] / med["scforge"]["seconds"]
    print(f"RESULT audit seconds={med['scforge']['seconds']:.2f} auroc={med['scforge']['auroc']:.4f} "
          f"speedup_vs_reference={speedup:.1f}")


if __name__ == "__main__":
    main()
