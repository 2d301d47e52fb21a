"""Retraining noise of the default-model security victim (hold-out split, 1,200 HVGs, clean training cells).

    python scripts/security_retrain_noise.py                       # lr 1e-3 (the security run's): seeds 1, 2 and a drop
    python scripts/security_retrain_noise.py --lr 1e-4 --epochs 10 --seeds 0 1 2 --drop-seeds
    python scripts/security_retrain_noise.py --lr 3e-4 --seeds --drop-seeds 0 1 2 --drop-poison-target B

Clean fits with the given fine-tuning seeds, and (unless ``--drop-seeds`` is empty) fits without a random
85 training cells (the size of the poison), to compare the defence's accuracy cost with the noise. Writes
``retrain_noise_lr<lr>_e<epochs>.json`` (``retrain_noise.json`` for lr 1e-3, 10 epochs) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np

import scforge
from scforge.baselines import highly_variable_genes
from scforge.security import ModelVictim, split_cells
from scforge.security.poison import gini_coefficient, select_poison_cells

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, nargs="*", default=[1, 2], help="fine-tuning seeds of the clean fits")
    ap.add_argument("--drop-seeds", type=int, nargs="*", default=[0],
                    help="seeds of the random 85 cells left out (the fit itself uses seed 0)")
    ap.add_argument("--drop-poison-target", default=None,
                    help="instead of random cells, leave out exactly the cells the Gini rule poisons for this target "
                         "(a removal with perfect precision and recall), once per fine-tuning seed in --drop-seeds")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "security_model_hvg_t5")
    args = ap.parse_args()
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    out = args.out / ("retrain_noise.json" if args.lr == 1e-3 and args.epochs == 10
                      else f"retrain_noise_lr{args.lr:g}_e{args.epochs}.json")
    if args.drop_poison_target is not None:
        out = out.with_name(f"{out.stem}_without_poisons_{args.drop_poison_target}.json")
    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, 1200)].copy()
    key = "seurat_annotations"
    train, test = split_cells(adata, key, split="random", seed=0)
    y = adata.obs[key].astype(str).to_numpy()
    rows = []
    if args.drop_poison_target is not None:  # the cells poison() takes (same rule, rate and seed as security_results.py)
        poisons = select_poison_cells(y[train], args.drop_poison_target, 0.05, method="gini",
                                      gini=gini_coefficient(adata.X[train]), seed=0)
    drop_kind = "drop_random_85" if args.drop_poison_target is None else f"drop_poisons_{args.drop_poison_target}"
    runs = [("clean", s) for s in args.seeds] + [(drop_kind, s) for s in args.drop_seeds]
    for kind, seed in runs:
        if kind == "clean":
            cells = train
        elif args.drop_poison_target is None:  # a random 85 cells left out; the fit uses seed 0
            cells = np.sort(np.random.default_rng(seed).choice(train, size=len(train) - 85, replace=False))
        else:
            cells = np.delete(train, poisons)
        fit_seed = 0 if kind == "drop_random_85" else seed
        victim = ModelVictim(scforge.load("default"), epochs=args.epochs, lr=args.lr, batch_size=32, max_length=256,
                             seed=fit_seed)
        t0 = time.perf_counter()
        victim = victim.fit(adata[cells].copy(), key)
        acc = float((victim.predict(adata[test].copy()) == y[test]).mean())
        rows.append({"kind": kind, "seed": seed, "fit_seed": fit_seed, "lr": args.lr, "epochs": args.epochs,
                     "n_train": int(len(cells)), "accuracy": acc, "seconds": time.perf_counter() - t0})
        print(rows[-1], flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
