"""Evidence for scforge's multi-omic scGPT model on the offline multi-omic data (../shared/data/multiomics).

(a) CITE-seq, two 10x PBMC files (200 cells each) as two batches with different protein panels
    (29 and 14 proteins, 14 shared). Coarse cell types come from the shared protein markers (gating
    rule below). Joint model (GEP + MVC, and GEP + MVC + DAR) vs concatenated per-modality PCA vs
    RNA-only PCA vs protein-only PCA, scored with scforge.metrics.integration_metrics (labels = the
    gated types, batch = the file).
(b) The 10x Multiome fixture (1,000 cells, 45 genes, 174 peaks): fit, embed, shapes and time.

Gating rule (both panels have these): CLR per cell over the 14 shared proteins, z-score of each protein
within each file, label = argmax over {T: CD3, B: CD19, Monocyte: CD14, NK: CD56}; T cells are split
into CD4 T / CD8 T by the larger z-score of CD4 vs CD8a. The labels are derived from protein data, so
they favour embeddings that see the proteins (protein-only PCA is shown for that reason).

Run:  .venv/bin/python scripts/multiomic_results.py [--epochs 5] [--out benchmarks/_work/multiomic]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scforge.baselines.multiomic import clr, concat_pca
from scforge.metrics.integration import integration_metrics
from scforge.tasks.multiomic import MultiOmicData, MultiOmicModel

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "multiomics"
GATES = {"T": "CD3", "B": "CD19", "Monocyte": "CD14", "NK": "CD56"}
SUFFIX = "_TotalSeqB"
METRICS = ["avg_bio", "nmi", "ari", "silhouette_label", "avg_batch", "silhouette_batch", "graph_connectivity",
           "ilisi", "clisi"]


def gate(adata: ad.AnnData, shared: list[str]) -> np.ndarray:
    """Coarse labels of one file from its shared proteins (module docstring)."""
    names = [str(p).removesuffix(SUFFIX) for p in adata.uns["protein_names"]]
    prot = pd.DataFrame(np.asarray(adata.obsm["protein_expression"], dtype=float), columns=names)[shared]
    z = pd.DataFrame(clr(prot.to_numpy()), columns=shared)
    z = (z - z.mean()) / z.std(ddof=0)
    kinds = list(GATES)
    best = np.array(kinds)[np.argmax(z[[GATES[k] for k in kinds]].to_numpy(), axis=1)]
    t_sub = np.where(z["CD4"] >= z["CD8a"], "CD4 T", "CD8 T")
    return np.where(best == "T", t_sub, best)


def cite_seq(epochs: int, seed: int) -> dict:
    files = {"5k": "pbmc_5k_protein_v3.h5ad", "10k": "pbmc_10k_protein_v3.h5ad"}
    adatas = {k: ad.read_h5ad(DATA / f) for k, f in files.items()}
    panels = {k: [str(p).removesuffix(SUFFIX) for p in a.uns["protein_names"]] for k, a in adatas.items()}
    shared = [p for p in panels["10k"] if p in panels["5k"]]
    labels = np.concatenate([gate(a, shared) for a in adatas.values()])
    parts = [MultiOmicData.from_cite_seq(a, protein_names=panels[k]) for k, a in adatas.items()]
    data = MultiOmicData.concat(parts, batch_key="file", names=list(files))
    batches = data.obs["file"].astype(str).to_numpy()
    emb, times, losses = {}, {}, {}
    for name, batch_key in (("scGPT multi-omic (GEP+MVC)", None), ("scGPT multi-omic (GEP+MVC+DAR)", "file")):
        t0 = time.perf_counter()
        model = MultiOmicModel.new(data, d_model=32, n_layers=2, n_heads=4, n_hvg=500, batch_key=batch_key, seed=seed)
        model.fit(data, epochs=epochs, batch_size=32, lr=1e-3, mask_ratio=0.4, seed=seed, precision="fp32",
                  device="cpu")
        emb[name] = model.embed(data, device="cpu", precision="fp32")
        times[name], losses[name] = time.perf_counter() - t0, model.history
    t0 = time.perf_counter()
    emb["concat PCA (RNA 20 + ADT 10)"] = concat_pca(data, {"rna": 20, "adt": 10}, n_top_genes=500, seed=seed)
    rna_only = MultiOmicData({"rna": data.modalities["rna"]}, data.obs)
    adt_only = MultiOmicData({"adt": data.modalities["adt"]}, data.obs)
    emb["RNA-only PCA (20)"] = concat_pca(rna_only, 20, n_top_genes=500, seed=seed)
    emb["protein-only PCA (10)"] = concat_pca(adt_only, 10, seed=seed)
    times["PCA baselines (all three)"] = time.perf_counter() - t0
    report = integration_metrics(emb, labels, batches, neighbors="exact", seed=seed)
    table = report.table[METRICS]
    return {"n_cells": int(data.n_obs), "shared_proteins": shared, "panels": {k: len(v) for k, v in panels.items()},
            "labels": pd.Series(labels).value_counts().to_dict(), "table": table.round(4).to_dict(orient="index"),
            "seconds": {k: round(v, 1) for k, v in times.items()}, "final_train_losses": losses,
            "notes": report.notes}


def multiome(epochs: int, seed: int) -> dict:
    t0 = time.perf_counter()
    data = MultiOmicData.from_mudata(DATA / "test_rna_atac.h5mu", modalities=("rna", "atac"))
    model = MultiOmicModel.new(data, d_model=32, n_layers=2, n_heads=4, n_hvg=None, seed=seed)
    cells = model.tokenize(data)
    t1 = time.perf_counter()
    model.fit(data, epochs=epochs, batch_size=64, lr=1e-3, seed=seed, precision="fp32", device="cpu")
    t2 = time.perf_counter()
    out = model.embed(data, return_adata=True, device="cpu", precision="fp32")
    t3 = time.perf_counter()
    pca = concat_pca(data, {"rna": 10, "atac": 10}, seed=seed)
    return {"n_cells": int(data.n_obs), "features": {k: len(v) for k, v in model.vocab.per_modality.items()},
            "tokens_per_cell_mean": round(float(cells.lengths.mean()), 1), "tokens_per_cell_max": int(cells.lengths.max()),
            "embedding_shape": list(out.obsm["X_scGPT_multiomic"].shape), "concat_pca_shape": list(pca.shape),
            "finite": bool(np.isfinite(out.obsm["X_scGPT_multiomic"]).all()), "final_train_losses": model.history,
            "seconds": {"read+tokenize": round(t1 - t0, 1), "fit": round(t2 - t1, 1), "embed": round(t3 - t2, 1)}}


def markdown(res: dict, command: str) -> str:
    a, b = res["cite_seq"], res["multiome"]
    cols = METRICS
    lines = ["# Multi-omic scGPT: evidence run", "", f"Command: `{command}`", "",
             f"Epochs {res['epochs']}, seed {res['seed']}, torch threads {res['threads']}, total "
             f"{res['total_seconds']:.0f} s (CPU).", "",
             f"## (a) CITE-seq, two PBMC files as batches ({a['n_cells']} cells; panels {a['panels']}; "
             f"{len(a['shared_proteins'])} shared proteins)", "",
             f"Gated labels (shared markers): {a['labels']}", "",
             "| embedding | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for name, row in a["table"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in cols) + " |")
    lines += ["", f"Time (s): {a['seconds']}", "",
              "Labels are gated on protein markers, which favours embeddings that include the proteins.", "",
              f"## (b) Multiome fixture (RNA + ATAC, {b['n_cells']} cells)", "",
              f"- features: {b['features']}; tokens per cell: mean {b['tokens_per_cell_mean']}, max "
              f"{b['tokens_per_cell_max']}",
              f"- embedding {b['embedding_shape']} (finite: {b['finite']}); concat PCA {b['concat_pca_shape']}",
              f"- time (s): {b['seconds']}",
              "- final training losses: " + ", ".join(f"{k} {v:.3f}" for k, v in b["final_train_losses"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/_work/multiomic"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    res = {"epochs": args.epochs, "seed": args.seed, "threads": args.threads,
           "cite_seq": cite_seq(args.epochs, args.seed), "multiome": multiome(args.epochs, args.seed)}
    res["total_seconds"] = round(time.perf_counter() - t0, 1)
    command = " ".join([".venv/bin/python", "scripts/multiomic_results.py", *sys.argv[1:]])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str))
    (args.out / "results.md").write_text(markdown(res, command))
    sys.stdout.write(markdown(res, command) + "\n")
    best = max(res["cite_seq"]["table"].items(), key=lambda kv: kv[1]["avg_bio"])[0]
    sys.stdout.write(f"RESULT multiomic total_s={res['total_seconds']} best_avg_bio={best!r}\n")


if __name__ == "__main__":
    main()
