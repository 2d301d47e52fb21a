"""The defended stage alone, with a chosen defence and detector set: the default-model victim retrained
after removing (or unlearning) the cells flagged by the chosen detectors (docs/results.md, "Security").

    .venv/bin/python scripts/security_defence_detectors.py --seeds 0 1 2 3 4      # ~25 min
    .venv/bin/python scripts/security_defence_detectors.py --defence unlearn --combine level sparsity \
        complexity anomaly knn --splits holdout ctrl_to_stim --seeds 0 1 2 3 4     # ~55 min

ifnb, 1,200 HVGs, sparsify trigger topnstop 5, 5% Gini-selected poisons, the default model fine-tuned
10 epochs at lr 3e-4 (the "steadier victim" of docs/results.md). For each split, target and
fine-tuning seed (CTRL -> STIM: seeds 0-2 only, as in security_results.py): poison the training cells
(as ``run_attack`` does), audit them, flag with ``--combine``, apply ``--defence`` (``remove``: drop the
flagged cells; ``unlearn``: drop them and add triggered copies of unflagged cells with their labels,
:func:`scforge.security.unlearning_set`), retrain, and score clean accuracy and ASR on the triggered
non-target test cells. Only the defended fit runs here; the clean and removal stages come from
``--reference`` (security_results.py's ``results_all_seeds.csv``: same splits, poisons, trigger and
seeds) or, with ``--fit-clean``, the clean victim is fitted here too; the differences against the same
seed's clean model are printed at the end. Writes ``defence_[<defence>_]<detectors>.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

import scforge
from scforge.baselines import highly_variable_genes
from scforge.security import ModelVictim, SparsifyTrigger, audit, poison, split_cells, unlearning_set
from scforge.security.experiment import trigger_cells

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
KEY = "seurat_annotations"
SPLITS = {"holdout": "random", "ctrl_to_stim": ("stim", "CTRL", "STIM")}
STIM_SEEDS = (0, 1, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="fine-tuning seeds")
    ap.add_argument("--targets", nargs="+", default=["B", "NK"])
    ap.add_argument("--combine", nargs="+", default=["level", "sparsity", "complexity", "anomaly"],
                    help="detectors whose z-scores flag a cell (the audit's default adds knn)")
    ap.add_argument("--threshold", type=float, default=5.0)
    ap.add_argument("--defence", choices=("remove", "unlearn"), default="remove")
    ap.add_argument("--splits", nargs="+", choices=list(SPLITS), default=["holdout"])
    ap.add_argument("--reference", type=Path,
                    default=ROOT / "benchmarks" / "_work" / "security_lr3e4_5seeds" / "results_all_seeds.csv",
                    help="security_results.py's per-seed table with the clean and removal stages")
    ap.add_argument("--fit-clean", action="store_true",
                    help="also fit the clean victim per split and seed (for seeds the reference lacks)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "security_lr3e4")
    args = ap.parse_args()
    for name in ("lightning", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)
    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, 1200)].copy()
    trigger = SparsifyTrigger(topnstop=5.0)
    prefix = "" if args.defence == "remove" else f"{args.defence}_"
    out = args.out / f"defence_{prefix}{'_'.join(args.combine)}.json"
    rows = []
    for split_name in args.splits:
        train_idx, test_idx = split_cells(adata, KEY, split=SPLITS[split_name], seed=0)
        train, test = adata[train_idx].copy(), adata[test_idx].copy()
        truth = test.obs[KEY].astype(str).to_numpy()
        seeds = [s for s in args.seeds if split_name == "holdout" or s in STIM_SEEDS]
        clean_fits = {}
        for target in args.targets:
            p = poison(train, KEY, target, rate=0.05, trigger=trigger, selection="gini", seed=0)
            table = audit(p.adata, KEY, threshold=args.threshold, combine=tuple(args.combine), seed=0)
            flagged = table["flagged"].to_numpy()
            non_target = test[truth != target].copy()
            triggered = trigger_cells(non_target, trigger, seed=1)  # run_attack's test-time trigger (seed + 1)
            info: dict = {}
            if args.defence == "remove":
                cleaned = p.adata[~flagged].copy()
            else:  # run_attack's defence uses the attack's seed (0) for its copies
                cleaned, info = unlearning_set(p.adata, KEY, flagged, seed=0)
            for seed in seeds:
                victim = ModelVictim(scforge.load("default"), epochs=10, lr=3e-4, batch_size=32, max_length=256,
                                     seed=seed)
                t0 = time.perf_counter()
                fitted = victim.fit(cleaned, KEY)
                rows.append({"split": split_name, "target": target, "seed": seed, "defence": args.defence,
                             "combine": args.combine, "n_flagged": int(flagged.sum()),
                             "n_poisoned_flagged": int((flagged & p.poisoned).sum()),
                             "n_clean_flagged": int((flagged & ~p.poisoned).sum()), "unlearn": info,
                             "accuracy": float((fitted.predict(test) == truth).mean()),
                             "asr": float((fitted.predict(triggered) == target).mean()),
                             "seconds": time.perf_counter() - t0})
                if args.fit_clean:  # the same seed's clean victim, fitted once per split
                    if seed not in clean_fits:
                        clean_fits[seed] = victim.fit(train, KEY)
                    rows[-1]["clean_accuracy"] = float((clean_fits[seed].predict(test) == truth).mean())
                    rows[-1]["clean_asr"] = float((clean_fits[seed].predict(triggered) == target).mean())
                print(rows[-1], flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(rows, indent=1))
    reference = pd.read_csv(args.reference) if args.reference.exists() else None
    print(compare(pd.DataFrame(rows), reference).to_string())


def _mean_sd(values: np.ndarray) -> str:
    return f"{values.mean():+.1f} ± {values.std(ddof=1) if values.size > 1 else 0:.1f}" if values.size else "–"


def compare(rows: pd.DataFrame, reference: pd.DataFrame | None) -> pd.DataFrame:
    """Mean and sd over seeds of this defence against the clean victim of the same seed (fitted here with
    ``--fit-clean``, else the reference's) and the reference's removal stage where it has the seed."""
    ref = None if reference is None else reference.pivot_table(
        index=["split", "target", "victim_seed"], columns="stage", values=["accuracy", "asr"])
    out = []
    for (split, target), part in rows.groupby(["split", "target"], sort=False):
        clean_acc, clean_asr, removal = [], [], []
        for _, row in part.iterrows():
            key = (split, target, row["seed"])
            known = ref is not None and key in ref.index
            if pd.notna(row.get("clean_accuracy", np.nan)):
                clean_acc.append(row["clean_accuracy"])
                clean_asr.append(row["clean_asr"])
            elif known:
                clean_acc.append(ref.loc[key, ("accuracy", "clean")])
                clean_asr.append(ref.loc[key, ("asr", "clean")])
            else:
                clean_acc.append(np.nan)
                clean_asr.append(np.nan)
            removal.append(ref.loc[key, ("accuracy", "defended")] - clean_acc[-1] if known else np.nan)
        clean_acc, clean_asr, removal = map(np.asarray, (clean_acc, clean_asr, removal))
        diff = 100 * (part["accuracy"].to_numpy() - clean_acc)
        out.append({"split": split, "target": target, "seeds": len(part), "acc_clean": f"{np.nanmean(clean_acc):.3f}",
                    "defended_minus_clean": _mean_sd(diff[np.isfinite(diff)]),
                    "removal_minus_clean": _mean_sd(100 * removal[np.isfinite(removal)]),
                    "per_seed": " ".join(f"{d:+.1f}" for d in diff),
                    "asr_clean": f"{np.nanmean(clean_asr):.3f}", "asr_defended": f"{part['asr'].mean():.3f}",
                    "asr_per_seed": " ".join(f"{a:.3f}" for a in part["asr"]), "max_asr": float(np.max(part["asr"]))})
    return pd.DataFrame(out)


if __name__ == "__main__":
    main()
