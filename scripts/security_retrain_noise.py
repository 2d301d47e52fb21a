"""Retraining noise of the default-model security victim (hold-out split, 1,200 HVGs, 10 epochs).

    python scripts/security_retrain_noise.py   # ~10 min; writes benchmarks/_work/security_model_hvg_t5/retrain_noise.json

Clean fits with seeds 1 and 2 (seed 0 is the security run's clean stage) and one fit without a random
85 training cells (the size of the poison), to compare the defence's accuracy cost with the noise.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np

import scforge
from scforge.baselines import highly_variable_genes
from scforge.security import ModelVictim, split_cells

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
OUT = ROOT / "benchmarks" / "_work" / "security_model_hvg_t5" / "retrain_noise.json"


def main() -> None:
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, 1200)].copy()
    key = "seurat_annotations"
    train, test = split_cells(adata, key, split="random", seed=0)
    y = adata.obs[key].astype(str).to_numpy()
    rows = []
    for kind, seed in [("clean", 1), ("drop_random_85", 0), ("clean", 2)]:
        cells = train if kind == "clean" else np.sort(
            np.random.default_rng(seed).choice(train, size=len(train) - 85, replace=False))
        victim = ModelVictim(scforge.load("default"), epochs=10, lr=1e-3, batch_size=32, max_length=256,
                             seed=seed if kind == "clean" else 0)
        t0 = time.perf_counter()
        victim = victim.fit(adata[cells].copy(), key)
        acc = float((victim.predict(adata[test].copy()) == y[test]).mean())
        rows.append({"kind": kind, "seed": seed, "n_train": int(len(cells)), "accuracy": acc,
                     "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
