"""Batch integration on ifnb (CTRL vs STIM as batches): scGPT's integration fine-tuning of the default
model (and of the same architecture from random weights), zero-shot embeddings, unintegrated PCA and
Harmony, scored with scib-metrics on the labelled cells; a results table and UMAPs.

    .venv/bin/python scripts/integration_ifnb.py --n-hvg 400 --epochs 5

Writes benchmarks/_work/integration_ifnb/{results.csv,results.md,history.json,umap.png} (--out changes the folder).
"""

from __future__ import annotations

import argparse
import textwrap
import json
import time
from pathlib import Path

import anndata as ad
import numpy as np

import scforge
from scforge.tasks.integrate import evaluate_integration, integrate, zero_shot_integration

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
OUT = ROOT / "benchmarks" / "_work" / "integration_ifnb"
COLUMNS = ["avg_bio", "avg_batch", "nmi", "ari", "silhouette_label", "clisi", "isolated_labels", "silhouette_batch",
           "bras", "ilisi", "kbet", "graph_connectivity", "pcr", "total"]


def random_init_like(model):
    """The same architecture and vocabulary with fresh seeded weights (the no-pretraining ablation)."""
    from scforge.models.scgpt import ScGPT

    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("vocab_size", "pad_token_id")}
    import torch

    torch.manual_seed(0)
    return ScGPT.new(model.vocab, **fields)


def markdown(table, seconds) -> str:
    head = "| embedding | " + " | ".join(COLUMNS) + " | seconds |"
    rows = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, row in table.iterrows():
        cells = [f"{row[c]:.3f}" if np.isfinite(row[c]) else "–" for c in COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {seconds.get(name, 0):.0f} |")
    return "\n".join(rows)


def umaps(adata, keys, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    fig, axes = plt.subplots(2, len(keys), figsize=(3.2 * len(keys), 6.4))
    for j, key in enumerate(keys):
        view = ad.AnnData(obs=adata.obs[["seurat_annotations", "stim"]].copy())
        view.obsm["X_rep"] = adata.obsm[key]
        sc.pp.neighbors(view, use_rep="X_rep", random_state=0)
        sc.tl.umap(view, random_state=0)
        for i, color in enumerate(("seurat_annotations", "stim")):
            sc.pl.umap(view, color=color, ax=axes[i, j], show=False, legend_loc=None if j < len(keys) - 1 else
                       "right margin", frameon=False, title="\n".join(textwrap.wrap(key, 28)) if i == 0 else color, size=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-hvg", type=int, default=400)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-ablation", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    adata = ad.read_h5ad(DATA)
    seconds: dict[str, float] = {}
    default = scforge.load("default")
    recipe = {"n_hvg": args.n_hvg, "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
    runs = [("scGPT default, integration fine-tune", default)]
    if not args.skip_ablation:
        runs.append(("same arch, random init, integration fine-tune", random_init_like(default)))
    history = {}
    for name, model in runs:
        t0 = time.perf_counter()
        tuned = integrate(model, adata, "stim", key_added=name, seed=args.seed, progress=False, **recipe)
        seconds[name] = time.perf_counter() - t0
        history[name] = tuned.history
        print(f"{name}: {seconds[name]:.0f} s {tuned.history}", flush=True)
    zero = {"scGPT default, zero-shot": default}
    gf = ROOT / "benchmarks" / "_work" / "models" / "geneformer_ifnb"
    if gf.is_dir():
        zero["Geneformer-ifnb, zero-shot"] = scforge.load(gf)
    for name, model in zero.items():
        t0 = time.perf_counter()
        zero_shot_integration(model, adata, key_added=name)
        seconds[name] = time.perf_counter() - t0
    keys = [name for name, _ in runs] + list(zero)
    t0 = time.perf_counter()
    table = evaluate_integration(adata, keys, "seurat_annotations", "stim", seed=args.seed)
    table = table.rename(index={"pca": "HVG+PCA, unintegrated", "harmony": "Harmony (on HVG+PCA)"})
    print(table[COLUMNS].round(3).to_string())
    table.to_csv(out / "results.csv")
    command = ("scripts/integration_ifnb.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in recipe.items())
               + (" --skip-ablation" if args.skip_ablation else ""))
    (out / "results.md").write_text(f"`.venv/bin/python {command}`\n\n" + markdown(table, seconds) + "\n")
    args_text = {k: str(v) for k, v in vars(args).items()}
    (out / "history.json").write_text(json.dumps({"args": args_text, "history": history, "seconds": seconds},
                                                 indent=1))
    from scforge.baselines import harmony_integrate, hvg_pca

    adata.obsm["HVG+PCA"] = hvg_pca(adata, n_top_genes=2000, n_comps=50, seed=args.seed)
    adata.obsm["Harmony"] = harmony_integrate(adata.obsm["HVG+PCA"], adata.obs["stim"].astype(str), seed=args.seed)
    umaps(adata, ["HVG+PCA", "Harmony"] + keys, out / "umap.png")
    print(f"evaluation {time.perf_counter() - t0:.0f} s; wrote {out}")


if __name__ == "__main__":
    main()
