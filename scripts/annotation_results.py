"""Cell-type annotation on real data: default model (fine-tuned, linear probe) vs L1 logistic regression.

    python scripts/annotation_results.py [--model default] [--epochs 5] [--seeds 0 1 2]

Data: ../shared/data/ifnb/ifnb_sub_2000.h5ad (2,000 PBMCs, raw counts, 13 cell types in
``seurat_annotations``). One fixed stratified 80/20 split (seed 0); each method is trained with
every seed on the same 1,600 cells and scored on the same 400. Baseline as sc-foundation-eval:
``LogisticRegression(penalty="l1", solver="liblinear", C=0.1)`` one-vs-rest on log1p CP10k.
Prints a markdown table and writes the numbers to benchmarks/_work/annotation_results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
LABEL = "seurat_annotations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-hvg", type=int, default=None,
                        help="restrict the model's input to this many HVGs (seurat_v3 on the training cells' counts)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the model's)")
    args = parser.parse_args()
    import anndata as ad
    from sklearn.model_selection import train_test_split

    import scforge
    from scforge.baselines import LogisticBaseline
    from scforge.metrics import classification_metrics
    from scforge.tasks import annotate

    adata = ad.read_h5ad(DATA)
    labels = adata.obs[LABEL].astype(str).to_numpy()
    train_idx, test_idx = train_test_split(np.arange(adata.n_obs), test_size=0.2, random_state=0, stratify=labels)
    train, test = adata[np.sort(train_idx)].copy(), adata[np.sort(test_idx)].copy()
    y_test = test.obs[LABEL].astype(str).to_numpy()
    model = scforge.load(args.model)
    model_train, model_test = train, test  # the model's input; L1-LR always reads every gene
    if args.n_hvg:
        from scforge.baselines import highly_variable_genes

        keep = highly_variable_genes(train, args.n_hvg)
        model_train, model_test = train[:, keep].copy(), test[:, keep].copy()
    runs: dict[str, list[dict]] = {}

    def record(name: str, pred, seconds: float, seed: int) -> None:
        r = classification_metrics(y_test, np.asarray(pred).astype(str))
        runs.setdefault(name, []).append({"seed": seed, "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                                          "kappa": r.kappa, "seconds": seconds})
        print(f"{name} seed {seed}: accuracy {r.accuracy:.3f} macro-F1 {r.macro_f1:.3f} ({seconds:.0f} s)", flush=True)

    for seed in args.seeds:
        t0 = time.perf_counter()
        base = LogisticBaseline(C=0.1, seed=seed).fit(train, train.obs[LABEL])
        record("L1 logistic regression (log1p CP10k, C=0.1)", base.predict(test), time.perf_counter() - t0, seed)
        t0 = time.perf_counter()
        probe = annotate.linear_probe(model, model_train, LABEL, val_fraction=0.0, seed=seed, progress=False,
                                      max_length=args.max_length)
        p = probe.predict(model_test, progress=False)
        record("default model, linear probe", p.columns.to_numpy()[p.to_numpy().argmax(1)], time.perf_counter() - t0,
               seed)
        t0 = time.perf_counter()
        tuned = annotate.fine_tune(model, model_train, LABEL, epochs=args.epochs, lr=args.lr, val_fraction=0.1,
                                   seed=seed, progress=False, max_length=args.max_length)
        p = tuned.predict(model_test, progress=False)
        record("default model, fine-tuned", p.columns.to_numpy()[p.to_numpy().argmax(1)], time.perf_counter() - t0,
               seed)

    print(f"\n| method | accuracy (mean ± sd, {len(args.seeds)} seeds) | macro-F1 | kappa | seconds per run |")
    print("|---|---|---|---|---|")
    summary = {}
    for name, rs in runs.items():
        def ms(key: str) -> str:
            vals = [r[key] for r in rs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):.3f} ± {sd:.3f}"

        summary[name] = {k: ms(k) for k in ("accuracy", "macro_f1", "kappa")}
        print(f"| {name} | {ms('accuracy')} | {ms('macro_f1')} | {ms('kappa')} | "
              f"{statistics.mean(r['seconds'] for r in rs):.0f} |")
    out = ROOT / "benchmarks" / "_work" / "annotation_results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"runs": runs, "summary": summary, "epochs": args.epochs, "lr": args.lr,
                                "n_hvg": args.n_hvg, "max_length": args.max_length}, indent=2))


if __name__ == "__main__":
    main()
