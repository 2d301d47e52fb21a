"""Which detectors should decide the defence: the default-model victim retrained after removing the cells
flagged by a chosen set of detectors (docs/results.md, "Security").

    .venv/bin/python scripts/security_defence_detectors.py --seeds 0 1 2 3 4      # ~25 min

Hold-out split of ifnb, 1,200 HVGs, sparsify trigger topnstop 5, 5% Gini-selected poisons, the default
model fine-tuned 10 epochs at lr 3e-4 (the "steadier victim" of docs/results.md). For each target and
fine-tuning seed: poison the training cells (as ``run_attack`` does), audit them, flag with ``--combine``,
remove the flagged cells, retrain, and score clean accuracy and ASR on the triggered non-target test
cells. Only the defended fit runs here; the clean and poisoned stages are those of security_results.py
(same split, poisons, trigger and seeds). Writes ``defence_<detectors>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import anndata as ad

import scforge
from scforge.baselines import highly_variable_genes
from scforge.security import ModelVictim, SparsifyTrigger, audit, poison, split_cells
from scforge.security.experiment import trigger_cells

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
KEY = "seurat_annotations"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fine-tuning seeds")
    ap.add_argument("--targets", nargs="+", default=["B", "NK"])
    ap.add_argument("--combine", nargs="+", default=["level", "sparsity", "complexity", "anomaly"],
                    help="detectors whose z-scores flag a cell (the audit's default adds knn)")
    ap.add_argument("--threshold", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "security_lr3e4")
    args = ap.parse_args()
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, 1200)].copy()
    train_idx, test_idx = split_cells(adata, KEY, split="random", seed=0)
    train, test = adata[train_idx].copy(), adata[test_idx].copy()
    truth = test.obs[KEY].astype(str).to_numpy()
    trigger = SparsifyTrigger(topnstop=5.0)
    out = args.out / f"defence_{'_'.join(args.combine)}.json"
    rows = []
    for target in args.targets:
        p = poison(train, KEY, target, rate=0.05, trigger=trigger, selection="gini", seed=0)
        table = audit(p.adata, KEY, threshold=args.threshold, combine=tuple(args.combine), seed=0)
        flagged = table["flagged"].to_numpy()
        cleaned = p.adata[~flagged].copy()
        non_target = test[truth != target].copy()
        triggered = trigger_cells(non_target, trigger, seed=1)  # run_attack's test-time trigger (seed + 1)
        for seed in args.seeds:
            victim = ModelVictim(scforge.load("default"), epochs=10, lr=3e-4, batch_size=32, max_length=256, seed=seed)
            t0 = time.perf_counter()
            fitted = victim.fit(cleaned, KEY)
            rows.append({"target": target, "seed": seed, "combine": args.combine, "n_flagged": int(flagged.sum()),
                         "n_poisoned_flagged": int((flagged & p.poisoned).sum()),
                         "n_clean_flagged": int((flagged & ~p.poisoned).sum()),
                         "accuracy": float((fitted.predict(test) == truth).mean()),
                         "asr": float((fitted.predict(triggered) == target).mean()),
                         "seconds": time.perf_counter() - t0})
            print(rows[-1], flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
