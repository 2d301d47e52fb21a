"""Stimulation-response prediction on Kang IFN-beta: foundation-model perturbation models against baselines.

    python scripts/perturb_ifnb.py                       # 5 held-out types x 3 seeds x every method
    python scripts/perturb_ifnb.py --types "CD14 Mono" --seeds 0 --methods scgpt_pretrained no_change

Task (issue 8): hold out the STIM cells of one cell type, train on everything else (every CTRL cell
and the STIM cells of the other types), predict that type's STIM expression from its CTRL cells.
Repeated for the 5 largest types and 3 seeds. The stimulus is modelled as a perturbation of one gene,
``IFNB1`` (the cytokine added to the culture): its flag is set in every STIM input, so the scGPT
perturbation model, scGenePT's language embeddings and the gene-based baselines all apply unchanged.

Genes: the ``--genes`` (500) most variable genes of ``layers['lognorm']`` (scanpy, Seurat flavour,
all 2,000 cells), plus ``IFNB1``; cell types with fewer than 3 CTRL or STIM cells are left out
(Eryth: no CTRL cell). Metrics (scforge.metrics.perturbation, GEARS definitions) compare
the predicted and observed mean STIM profile of the held-out type; the top-20 DE genes are its
STIM-vs-CTRL ranking (t-test, |score|). Deltas are taken twice: against the mean of all CTRL cells
(GEARS' reference: ``pearson_delta``, ``pearson_delta_de``) and against the held-out type's own CTRL
mean (``*_ctx``: the stimulation response proper; no_change predicts no delta there, so its Pearson
is undefined and reported as NaN).

Methods: ``no_change`` (the type's CTRL mean), ``train_mean`` (mean STIM profile of the training
types, Csendes et al.), ``train_mean_delta`` (CTRL mean + mean STIM-CTRL shift of the training types),
``linear_context`` (Ahlmann-Eltze's linear model with each type's CTRL profile as its embedding),
``scgpt_pretrained`` (scGPT perturbation model from scforge's default pretrained weights),
``scgpt_scratch`` (same architecture, random initialisation: the no-pretraining ablation),
``scgenept_go_all`` (default weights + MiniLM GO-all "concat" gene-text embeddings; ``--methods
scgenept_go_c`` etc. run the other GO variants). Models: at most 5 epochs, Adam lr 1e-4 (StepLR 0.9 per epoch), batch 32, a random
subset of 256 genes per minibatch in training (scGPT's ``max_seq_len`` rule; on 2 CPU cores attention
over all 501 genes is too slow for 60 runs), every gene at prediction, mean over up to 300 CTRL
cells of the held-out type; one training cell type (drawn per seed) is the validation set for early stopping (patience 3)
and best-model selection, as scGPT and scGenePT select on validation MSE.

Writes ``benchmarks/_work/perturb_ifnb/results.csv`` (tidy: method, heldout, seed, metric, value) and
prints the summary table (mean over held-out types and seeds) used in docs/results.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IFNB = SHARED / "ifnb" / "ifnb_sub_2000.h5ad"
OUT = ROOT / "benchmarks" / "_work" / "perturb_ifnb"
TYPES = ["CD14 Mono", "CD4 Naive T", "CD4 Memory T", "CD16 Mono", "B"]
BASELINES = ["no_change", "train_mean", "train_mean_delta", "linear_context"]
MODELS = ["scgpt_pretrained", "scgpt_scratch", "scgenept_go_all"]
METRICS = ["pearson_delta", "pearson_delta_de", "pearson_delta_ctx", "pearson_delta_de_ctx", "mse", "mse_de",
           "direction_accuracy_de_ctx", "pearson_delta_top20_de_non_dropout"]  # plus l2_top<n>
STIMULUS_GENE = "IFNB1"


def ifnb_perturbation_data(adata, n_genes: int = 1000):
    """The ifnb cells as a perturbation experiment: ``stim`` (CTRL control, STIM = IFNB1), cell type
    as context, log-normalised expression of the ``n_genes`` most variable genes plus IFNB1."""
    import anndata as ad
    import scanpy as sc

    from scforge.data.perturbation import from_anndata

    lognorm = ad.AnnData(adata.layers["lognorm"].copy(), obs=adata.obs[["stim", "seurat_annotations"]].copy(),
                         var=pd.DataFrame(index=adata.var_names.copy()))
    sc.pp.highly_variable_genes(lognorm, n_top_genes=n_genes, flavor="seurat")
    keep = lognorm.var["highly_variable"].to_numpy().copy()
    keep[lognorm.var_names.get_loc(STIMULUS_GENE)] = True
    counts = pd.crosstab(lognorm.obs["seurat_annotations"], lognorm.obs["stim"])
    usable = counts.index[(counts.min(axis=1) >= 3)]  # Eryth (5 cells) has no CTRL cell: dropped
    sub = lognorm[lognorm.obs["seurat_annotations"].isin(usable).to_numpy()][:, keep].copy()
    sub.obs["seurat_annotations"] = sub.obs["seurat_annotations"].astype(str)
    sub.obs["stim"] = sub.obs["stim"].astype(str)
    return from_anndata(sub, "stim", "CTRL", perturbation_genes={"STIM": (STIMULUS_GENE,)},
                        context_key="seurat_annotations")


@lru_cache(maxsize=2)
def cached_data(n_genes: int):
    import anndata as ad

    return ifnb_perturbation_data(ad.read_h5ad(IFNB), n_genes=n_genes)


@lru_cache(maxsize=4)
def text_embeddings(kind: str, genes: tuple[str, ...]):
    from scforge.genes.text import go_gene_embeddings

    return go_gene_embeddings(SHARED / "genes" / "go", list(genes), kind=kind, style="concat",
                              cache_dir=OUT / "text_cache")


def predict_baseline(method: str, data, train_groups, heldout):
    from scforge.baselines.perturbation import make_baseline

    base = make_baseline(method).fit(data.profiles(train_groups))
    return base.predict([("STIM", heldout)])[("STIM", heldout)]


def predict_model(method: str, data, train_groups, heldout, *, seed: int, epochs: int, max_seq_len: int,
                  lr: float = 1e-4):
    import scforge
    from scforge.tasks.perturb import PerturbationModel

    genes = list(map(str, data.gene_names))
    common = dict(dropout=0.0, max_seq_len=max_seq_len, seed=seed)
    if method == "scgpt_scratch":
        default = scforge.load("default")
        c = default.config
        model = PerturbationModel.new(default.vocab, genes, d_model=c.d_model, n_heads=c.n_heads, d_hid=c.d_hid,
                                      n_layers=c.n_layers, **common)
    else:
        model_type = "scgpt" if method == "scgpt_pretrained" else method
        text = None
        if method.startswith("scgenept_"):
            source = method.removeprefix("scgenept_")
            text = {source: text_embeddings(source, tuple(genes))}
        model = PerturbationModel.from_pretrained("default", genes, model_type=model_type, text_embeddings=text,
                                                  **common)
    rng = np.random.default_rng(seed)
    types = [g[1] for g in train_groups]
    val_types = list(rng.choice(types, size=max(1, len(types) // 10), replace=False))
    train = [g for g in train_groups if g[1] not in val_types]
    val = [g for g in train_groups if g[1] in val_types]
    model.fit(data, train=train, val=val, epochs=epochs, batch_size=32, lr=lr, seed=seed, early_stop=3)
    return model.predict(data, [("STIM", heldout)], seed=seed)[("STIM", heldout)], model.history


def run_one(heldout: str, method: str, *, seed: int = 0, n_genes: int = 500, epochs: int = 3,
            max_seq_len: int = 128, lr: float = 1e-4) -> pd.DataFrame:
    """Metrics of one method with one held-out cell type (tidy rows)."""
    from scforge.metrics.perturbation import perturbation_metrics, top_expressed_genes

    data = cached_data(n_genes)
    train_groups = [g for g in data.groups if g[0] == "STIM" and g[1] != heldout]
    t0 = time.perf_counter()
    if method in BASELINES:
        pred = predict_baseline(method, data, train_groups, heldout)
        extra = {}
    else:
        pred, history = predict_model(method, data, train_groups, heldout, seed=seed, epochs=epochs,
                                      max_seq_len=max_seq_len, lr=lr)
        extra = {"epochs_run": float(len(history))}
    seconds = time.perf_counter() - t0
    prof = data.profiles([("STIM", heldout)])
    truth = prof.means[("STIM", heldout)]
    kwargs = dict(de=data.de_genes("STIM", heldout, n=20),
                  de_non_dropout=data.de_genes("STIM", heldout, n=20, kind="non_dropout"),
                  top_expressed=top_expressed_genes(data, n=min(1000, data.n_genes)))
    # GEARS reference: the mean of all control cells; and the held-out type's own control cells
    all_ctrl = np.asarray(data.expression(data.control_cells(None)).mean(0), dtype=np.float64)
    values = perturbation_metrics(pred, truth, all_ctrl, **kwargs)
    own = perturbation_metrics(pred, truth, prof.control_mean(heldout), **kwargs)
    values.update({f"{k}_ctx": v for k, v in own.items() if "pearson_delta" in k or "direction" in k})
    values.update(extra, seconds=seconds)
    return pd.DataFrame([{"method": method, "heldout": heldout, "seed": seed, "metric": k, "value": float(v)}
                         for k, v in values.items()])


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (and sd over held-out types x seeds) per method and metric, best first by pearson_delta_de."""
    t = table[table["metric"].isin(METRICS) | table["metric"].str.startswith("l2_top")]
    agg = t.groupby(["method", "metric"])["value"].agg(["mean", "std"]).reset_index()
    wide = agg.pivot(index="method", columns="metric", values="mean")
    return wide.sort_values("pearson_delta_de", ascending=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", nargs="+", default=TYPES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=BASELINES + MODELS)
    parser.add_argument("--genes", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--out", type=Path, default=OUT / "results.csv")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    done = pd.read_csv(args.out) if args.out.exists() else pd.DataFrame(columns=["method", "heldout", "seed"])
    have = set(zip(done["method"], done["heldout"], done["seed"].astype(int)))
    for seed in args.seeds:
        for heldout in args.types:
            for method in args.methods:
                s = 0 if method in BASELINES else seed  # baselines are deterministic
                if (method, heldout, s) in have:
                    continue
                rows = run_one(heldout, method, seed=s, n_genes=args.genes, epochs=args.epochs,
                               max_seq_len=args.max_seq_len, lr=args.lr)
                done = pd.concat([done, rows], ignore_index=True)
                have.add((method, heldout, s))
                done.to_csv(args.out, index=False)  # resumable
                v = rows.set_index("metric")["value"]
                print(f"{heldout:14s} {method:18s} seed {s}: pearson_delta {v['pearson_delta']:.3f}  "
                      f"pearson_delta_de {v['pearson_delta_de']:.3f}  ctx: {v['pearson_delta_ctx']:.3f} / "
                      f"{v['pearson_delta_de_ctx']:.3f}  mse {v['mse']:.4f}  ({v['seconds']:.0f} s)",
                      flush=True)
    pd.set_option("display.width", 200)
    print(summary(done).round(3).to_string())


if __name__ == "__main__":
    sys.exit(main())
