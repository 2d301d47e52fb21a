"""How well the ``relabel`` defence restores the poisoned cells' labels (no training; docs/results.md, "Security").

    .venv/bin/python scripts/security_relabel_check.py     # ~1 min

For each split and target of the default-model security run (1,200 HVGs, sparsify trigger topnstop 5,
5% Gini-selected poisons): poison the training cells, audit them, relabel the flagged cells as
``run_attack(..., defence="relabel")`` does, and count how many poisons get their own label back,
how many keep the target, and how many flagged clean cells keep theirs. Writes ``relabel_check.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import anndata as ad
import numpy as np

from scforge.baselines import highly_variable_genes
from scforge.security import SparsifyTrigger, audit, poison, split_cells
from scforge.security.experiment import _relabel  # the relabelling step of the defence, as run_attack uses it

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
SPLITS = {"holdout": "random", "ctrl_to_stim": ("stim", "CTRL", "STIM")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "security_lr3e4")
    args = ap.parse_args()
    key = "seurat_annotations"
    adata = ad.read_h5ad(DATA)
    adata = adata[:, highly_variable_genes(adata, 1200)].copy()
    rows = []
    for split_name, split in SPLITS.items():
        train_idx, _ = split_cells(adata, key, split=split, seed=0)
        train = adata[train_idx].copy()
        truth = train.obs[key].astype(str).to_numpy()
        for target in ("B", "NK"):
            p = poison(train, key, target, rate=0.05, trigger=SparsifyTrigger(topnstop=5.0), selection="gini", seed=0)
            flagged = audit(p.adata, key, threshold=5.0, seed=0)["flagged"].to_numpy()
            relabelled = _relabel(p.adata, key, flagged, None, 0).obs[key].astype(str).to_numpy()
            hit, false_alarm = p.poisoned & flagged, flagged & ~p.poisoned
            rows.append({"split": split_name, "target": target, "n_flagged": int(flagged.sum()),
                         "n_poisoned_flagged": int(hit.sum()), "n_clean_flagged": int(false_alarm.sum()),
                         "poisons_back_to_own_label": float(np.mean(relabelled[hit] == truth[hit])),
                         "poisons_left_at_target": float(np.mean(relabelled[hit] == target)),
                         "clean_flagged_keep_label": float(np.mean(relabelled[false_alarm] == truth[false_alarm]))
                         if false_alarm.any() else None})
            print(rows[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "relabel_check.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
