"""Backdoor attack, detection and defence on ifnb (the numbers of docs/results.md, "Security").

    .venv/bin/python scripts/security_results.py                       # L1-LR and the default model
    .venv/bin/python scripts/security_results.py --victims logistic    # the fast half (about 2 minutes)

For each victim, split (a stratified 80/20 hold-out, and CTRL -> STIM as a batch shift) and target:
scBackdoor's sparsify trigger (topnstop 2 on log1p CP10k), 5% of the training cells poisoned by the
Gini rule, the victim trained clean / poisoned / after the audit's flagged cells are removed. Writes
``results.csv``, ``detection.csv``, ``summary.txt``, ``asr_breakdown.csv`` (each stage's ASR per true class
and per genes kept by the trigger) and one report folder per run under ``--out``.
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

from scforge.security import ModelVictim, SparsifyTrigger, run_attack, split_cells, sweep_attack
from scforge.security.victims import LogisticVictim

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
SPLITS = {"holdout": "random", "ctrl_to_stim": ("stim", "CTRL", "STIM")}
N_KEPT_BINS = [0, 5, 10, 15, 20, 30, 1000]  # genes the trigger keeps, for the ASR breakdown


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--label-key", default="seurat_annotations")
    ap.add_argument("--victims", nargs="+", default=["logistic", "default"])
    ap.add_argument("--targets", nargs="+", default=["B", "NK", "CD14 Mono"])
    ap.add_argument("--model-targets", nargs="+", default=["B", "NK"])
    ap.add_argument("--splits", nargs="+", default=list(SPLITS))
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--topnstops", type=float, nargs="+", default=[2.0], help="trigger thresholds (logistic victim)")
    ap.add_argument("--model-topnstops", type=float, nargs="+", default=[2.0], help="trigger thresholds (model)")
    ap.add_argument("--defence", default="remove", choices=["remove", "relabel", "unlearn", "fine_prune"],
                    help="defence after the audit (fine_prune: model victim only; the logistic victim then removes)")
    ap.add_argument("--selection", default="gini", choices=["gini", "gini_faithful", "random"],
                    help="which training cells are poisoned: gini (the highest-Gini cells of each non-target class), "
                         "gini_faithful (the published code's index behaviour) or random")
    ap.add_argument("--threshold", type=float, default=5.0,
                    help="audit threshold (robust z) above which a training cell is flagged and removed")
    ap.add_argument("--lr-sweep", action="store_true",
                    help="also sweep L1-LR's C x rate x topnstop for the first target (no defence)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--max-length", type=int, default=None,
                    help="tokens per cell for the model victim (default: the model's own)")
    ap.add_argument("--n-hvg", type=int, default=None,
                    help="restrict the data to this many HVGs (seurat_v3 on the counts of all cells) before "
                         "the experiment, as scBackdoor's preprocessed datasets are (3,000 HVGs)")
    ap.add_argument("--victim-seeds", type=int, nargs="+", default=[0],
                    help="fine-tuning seeds of the model victim; each runs every stage (clean, poisoned, defended) "
                         "on the same split and poisoned cells, to put the model's retraining noise beside the "
                         "attack's and the defence's effects")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="results.csv of earlier runs of the same settings to add to the summary (seed 0 if unnamed)")
    ap.add_argument("--out", default="benchmarks/_work/security")
    ap.add_argument("--detector-study", action="store_true",
                    help="only: audit detection on several triggers and selections (no training)")
    args = ap.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    adata = ad.read_h5ad(args.data)
    if args.n_hvg:
        from scforge.baselines import highly_variable_genes

        adata = adata[:, highly_variable_genes(adata, args.n_hvg)].copy()
        print(f"restricted to {adata.n_vars} HVGs; expressed genes per cell: median "
              f"{int(np.median(adata.X.getnnz(axis=1)))}, max {adata.X.getnnz(axis=1).max()}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.detector_study:
        detector_study(adata, args.label_key, args.targets[0], args.rate, out)
        return
    rows, detections, breakdown, summary = [], [], [], ""
    for victim_seed in args.victim_seeds:
        for victim_name in args.victims:
            if victim_name == "logistic":
                if victim_seed != args.victim_seeds[0]:
                    continue  # L1-LR (liblinear) does not depend on a seed: one run
                victim, targets, model_level, stops = LogisticVictim(C=0.1), args.targets, False, args.topnstops
                defence = "remove" if args.defence == "fine_prune" else args.defence
            else:
                import scforge

                victim = ModelVictim(scforge.load(victim_name), epochs=args.epochs, lr=args.lr, batch_size=32,
                                     max_length=args.max_length, seed=victim_seed)
                targets, model_level, stops, defence = args.model_targets, True, args.model_topnstops, args.defence
            for split_name in args.splits:
                run_split(adata, args, victim, victim_name, victim_seed, split_name, targets, stops, model_level,
                          defence, out, rows, detections, breakdown)
                summary = write_tables(rows, detections, out, args.merge)
                pd.DataFrame(breakdown).to_csv(out / "asr_breakdown.csv", index=False)
    print(summary)
    if args.lr_sweep:
        sweep = sweep_attack(adata, args.label_key, targets=args.targets[:1], rates=[0.01, 0.05, 0.1],
                             topnstops=[2.0, 4.0, 6.0, 8.0], victim=LogisticVictim(C=0.1), defence=None)
        parts = [sweep.assign(C=0.1)]
        for c in (1.0, 10.0):
            parts.append(sweep_attack(adata, args.label_key, targets=args.targets[:1], rates=[0.05],
                                      topnstops=[2.0, 4.0, 8.0], victim=LogisticVictim(C=c), defence=None).assign(C=c))
        sweep = pd.concat(parts, ignore_index=True)
        sweep.to_csv(out / "lr_sweep.csv", index=False)
        wide = sweep[sweep.metric.isin(["accuracy", "asr"])].pivot_table(
            index=["C", "rate", "topnstop"], columns=["stage", "metric"], values="value").round(3)
        (out / "lr_sweep.txt").write_text(wide.to_string())
        print(wide.to_string())


def run_split(adata, args, victim, victim_name: str, victim_seed: int, split_name: str, targets, stops,
              model_level: bool, defence: str, out: Path, rows: list, detections: list, breakdown: list) -> None:
    """One clean fit on the split, then an attack (poisoned fit, audit, defended fit) per target x threshold;
    ``breakdown`` gets each stage's ASR per true class and per genes kept by the trigger."""
    split = SPLITS[split_name]
    train_idx, _ = split_cells(adata, args.label_key, split=split, seed=0)
    t0 = time.perf_counter()
    clean = victim.fit(adata[train_idx].copy(), args.label_key)
    clean_s = time.perf_counter() - t0
    for target, stop in [(t, s) for s in stops for t in targets]:
        res = run_attack(adata, args.label_key, target, victim=victim, rate=args.rate, split=split,
                         trigger=SparsifyTrigger(topnstop=stop), defence=defence, clean_victim=clean,
                         model_level=model_level, threshold=args.threshold, selection=args.selection, seed=0)
        suffix = f"_seed{victim_seed}" if victim_seed else ""
        res.save(out / f"{victim_name}_{split_name}_{target.replace(' ', '_')}_topnstop{stop:g}{suffix}")
        wide = res.wide()
        key = {"victim": victim_name, "split": split_name, "target": target, "topnstop": stop,
               "victim_seed": victim_seed}
        for stage, row in wide.iterrows():
            rows.append({**key, "stage": stage, **{m: row.get(m) for m in ("accuracy", "macro_f1", "kappa", "asr")},
                         "n_removed": row.get("n_removed")})
        detections.append({**key, "n_poisoned": res.settings["n_poisoned"], **res.detection,
                           **{k: v for k, v in res.settings.items() if k.startswith("n_kept_median")},
                           "seconds": {**res.seconds, "clean_fit": clean_s}})
        for by, bins in (("label", None), ("n_kept", N_KEPT_BINS)):
            table = res.asr_by_stages(by, bins)
            breakdown += [{**key, "by": by, "group": str(group), **row, "n_cells": int(row["n_cells"])}
                          for group, row in table.iterrows()]
        print(f"{victim_name:8s} {split_name:12s} {target:10s} {stop:g} seed {victim_seed}",
              wide[["accuracy", "asr"]].round(3).to_dict(),
              {k: round(float(v), 3) for k, v in res.detection.items()}, flush=True)


def _with_merged(rows: list, merge: list[str]) -> pd.DataFrame:
    parts = [pd.DataFrame(rows)]
    for path in merge:  # rows of an earlier run of this script (before --victim-seeds: seed 0)
        earlier = pd.read_csv(path)
        parts.insert(0, earlier if "victim_seed" in earlier else earlier.assign(victim_seed=0))
    return pd.concat(parts, ignore_index=True)


def write_tables(rows: list, detections: list, out: Path, merge: list[str]) -> str:
    """Write what has run so far (a long run can be read, or stopped, part-way); return the summary."""
    pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
    (out / "detection.json").write_text(json.dumps(detections, indent=2, default=float))
    pd.DataFrame([{k: v for k, v in d.items() if k != "seconds"} for d in detections]).to_csv(
        out / "detection.csv", index=False)
    summary = summarise(rows, merge, out)
    (out / "summary.txt").write_text(summary)
    return summary


def summarise(rows: list, merge: list[str], out: Path) -> str:
    """Accuracy and ASR per stage; with several victim seeds, their mean and sd, and the per-seed
    (paired) accuracy change of the poisoned and the defended model against the clean one (written to
    ``results_all_seeds.csv`` and ``summary_seeds.csv`` under ``out``)."""
    results = _with_merged(rows, merge)
    index = ["victim", "split", "target", "topnstop"]
    text = results.pivot_table(index=index, columns="stage", values=["accuracy", "asr"], sort=False).round(3).to_string()
    if results["victim_seed"].nunique() < 2:
        return text
    results.to_csv(out / "results_all_seeds.csv", index=False)
    wide = results.pivot_table(index=[*index, "victim_seed"], columns="stage", values=["accuracy", "asr"])
    paired = pd.DataFrame({"acc_poisoned_minus_clean": wide[("accuracy", "poisoned")] - wide[("accuracy", "clean")],
                           "acc_defended_minus_clean": wide[("accuracy", "defended")] - wide[("accuracy", "clean")]})
    flat = pd.concat([wide.set_axis([f"{m}_{s}" for m, s in wide.columns], axis=1), paired], axis=1)
    stats = flat.groupby(level=index, sort=False).agg(["mean", "std", "count"]).round(3)
    stats.to_csv(out / "summary_seeds.csv")
    means, sds = stats.xs("mean", axis=1, level=1), stats.xs("std", axis=1, level=1)
    compact = (means.map("{:.3f}".format) + " ± " + sds.map("{:.3f}".format)).assign(
        seeds=stats[("accuracy_clean", "count")])
    lines = [text, "", "mean ± sd over victim seeds (per-seed differences against the same seed's clean model):",
             compact.to_string()]
    return "\n".join(lines)


def detector_study(adata, label_key: str, target: str, rate: float, out: Path) -> None:
    """Audit detection (combined score and each detector) for each trigger x selection; no training."""
    from scforge.security import FixedGeneTrigger, audit, poison
    from scforge.security.detect import detection_metrics

    triggers = {
        "sparsify topnstop 2 (published)": SparsifyTrigger(topnstop=2.0),
        "sparsify topnstop 4": SparsifyTrigger(topnstop=4.0),
        "sparsify topnstop 2, proportional levels (adaptive)": SparsifyTrigger(topnstop=2.0, levels="proportional"),
        "sparsify topnstop 4, proportional levels (adaptive)": SparsifyTrigger(topnstop=4.0, levels="proportional"),
        "fixed genes ISG15 IFI6 MX1 IFIT3 at q0.99": FixedGeneTrigger(("ISG15", "IFI6", "MX1", "IFIT3")),
        "fixed genes CD79A MS4A1 (B markers) at q0.99": FixedGeneTrigger(("CD79A", "MS4A1")),
    }
    rows = []
    for name, trig in triggers.items():
        for selection in ("gini", "random"):
            p = poison(adata, label_key, target, rate=rate, trigger=trig, selection=selection, seed=0)
            t0 = time.perf_counter()
            table = audit(p.adata, label_key)
            secs = time.perf_counter() - t0
            m = detection_metrics(table["score"].to_numpy(), p.poisoned, table["flagged"].to_numpy())
            per = {f"auroc_{c[:-2]}": detection_metrics(table[c].to_numpy(), p.poisoned)["auroc"]
                   for c in table.columns if c.endswith("_z")}
            rows.append({"trigger": name, "selection": selection, "n_poisoned": p.n_poisoned, **m, **per,
                         "seconds": secs})
            print(rows[-1], flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "detector_study.csv", index=False)
    (out / "detector_study.txt").write_text(frame.round(3).to_string(index=False))


if __name__ == "__main__":
    main()
