"""Pre-train a tiny scCello on ifnb PBMCs with and without the ontology losses; compare them on the
same held-out cells.

    python scripts/sccello_results.py [--seeds 0 1] [--epochs 4] [--quick]

Protocol: ifnb_sub_2000 labels mapped to CL ids (the shipped table). Novel types (held out of
pre-training entirely): B Activated (CL: mature B cell), CD16 Mono (CD14-low, CD16-positive
monocyte) and pDC; each has close relatives among the seen types in the ontology (B cell,
CD14-positive monocyte, conventional DC), which zero-shot transfer through the ontology needs.
Seen-type cells are split 70/30 (stratified, seeded): pre-training cells / held-out cells. Both
models get the same initial weights, data, masking and schedule; the ablation trains L_MGP only.
Evaluated on the same cells: novel-type classification of the novel cells (prototypes from the
pre-training cells), clustering (NMI/ARI/ASW/AvgBio; held-out seen + novel cells), linear probe
(fit on pre-training cells, scored on held-out seen cells), marker-gene AUROC (a few held-out
cells). Untrained weights and 30 PCs of log-normalised expression are shown for reference.
Writes benchmarks/_work/sccello_results.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import scanpy as sc
import torch

from scforge.metrics.clustering import clustering_metrics
from scforge.models.sccello.api import ScCello
from scforge.models.sccello.tasks import (
    classify_novel_cell_types,
    linear_probe,
    marker_gene_prediction,
    marker_token_sets,
)
from scforge.models.sccello.training import pretrain
from scforge.ontology import cell_type_relations, load_cell_ontology, load_marker_table, map_labels
from scforge.train import OptimConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
NOVEL = ("B Activated", "CD16 Mono", "pDC")


def split_seen(labels: np.ndarray, seen: np.ndarray, seed: int, test_fraction: float = 0.3):
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels[seen]):
        idx = rng.permutation(np.flatnonzero(seen & (labels == label)))
        n_test = max(1, int(round(test_fraction * idx.size)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def evaluate(emb, *, labels, ids, train, test, novel_idx, novel_ids, relations, seed):
    eval_idx = np.concatenate([test, novel_idx])
    novel = classify_novel_cell_types(emb[novel_idx], emb[train], ids[train], novel_ids, relations,
                                      true_types=ids[novel_idx])
    clustering = clustering_metrics(emb[eval_idx], labels[eval_idx], seed=seed)
    probe = linear_probe(emb[train], labels[train], emb[test], labels[test], seed=seed)
    return {"novel_accuracy": novel.report.accuracy, "novel_macro_f1": novel.report.macro_f1,
            **{f"clustering_{k}": v for k, v in clustering.to_dict().items()},
            "probe_accuracy": probe.accuracy, "probe_macro_f1": probe.macro_f1}


def run(seed: int, args) -> dict:
    adata = ad.read_h5ad(DATA / "ifnb" / "ifnb_sub_2000.h5ad")
    cl = load_cell_ontology(DATA / "genes" / "ontology" / "CL-ontology-v2026-03-26.json.zst")
    labels = adata.obs["seurat_annotations"].astype(str).to_numpy()
    ids = np.array(map_labels(labels, ontology=cl).ids, dtype=object)
    is_novel = np.isin(labels, NOVEL)
    train, test = split_seen(labels, ~is_novel, seed)
    novel_idx = np.flatnonzero(is_novel)
    seen_ids = sorted(set(ids[train]))
    novel_ids = sorted(set(ids[novel_idx]))
    relations_all = cell_type_relations(cl, seen_ids + novel_ids)
    relations_seen = cell_type_relations(cl, seen_ids)
    arch = dict(num_hidden_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
                intermediate_size=2 * args.hidden, max_position_embeddings=args.max_length)
    out: dict = {"seed": seed, "n_pretrain": int(train.size), "n_heldout_seen": int(test.size),
                 "n_novel": int(novel_idx.size), "novel_types": list(NOVEL), "models": {}}

    base = ScCello.new(seen_ids, seed=seed, **arch)
    cells = base.tokenize(adata, max_length=args.max_length)
    initial = {k: v.clone() for k, v in base.module.state_dict().items()}
    markers = marker_token_sets(base, labels, load_marker_table())
    marker_cells = np.concatenate([test[labels[test] == t][:args.marker_cells_per_type] for t in np.unique(labels[test])])
    common = dict(labels=labels, ids=ids, train=train, test=test, novel_idx=novel_idx, novel_ids=novel_ids,
                  relations=relations_all, seed=seed)

    def score(model, name, seconds=None):
        emb = model.embed_cells(cells, batch_size=128, precision="fp32")
        row = evaluate(emb, **common)
        marker = marker_gene_prediction(model, cells.select(marker_cells), [markers[i] for i in marker_cells],
                                        batch_size=256, precision="fp32")
        row.update(marker_auroc=marker.auroc, marker_cells=marker.n_scored, train_seconds=seconds)
        out["models"][name] = row
        print(f"[seed {seed}] {name}: " + ", ".join(f"{k}={v:.3f}" for k, v in row.items()
                                                   if isinstance(v, float)), flush=True)

    score(base, "untrained")
    pca = ad.AnnData(adata.layers["lognorm"].copy())
    sc.pp.pca(pca, n_comps=30, random_state=seed)
    out["models"]["pca30_lognorm"] = evaluate(pca.obsm["X_pca"], **common)

    pretrain_cells = cells.select(train)
    pretrain_ids = [ids[i] for i in train]
    for name, ontology_losses in (("scCello (all losses)", True), ("MLM only (ablation)", False)):
        model = ScCello.new(seen_ids, seed=seed, **arch)
        model.module.load_state_dict(initial)
        cfg = TrainConfig(max_epochs=args.epochs, batch_size=args.batch_size, precision="fp32", progress=False,
                          val_fraction=0.0, seed=seed, grad_clip=1.0)
        optim = OptimConfig(lr=args.lr, weight_decay=0.001, warmup_steps=args.warmup, schedule="linear")
        start = time.perf_counter()
        pretrain(model, pretrain_cells, pretrain_ids, relations=relations_seen, ontology_losses=ontology_losses,
                 config=cfg, optim=optim, mgp_vocabulary="corpus")
        score(model, name, time.perf_counter() - start)
    return out


def table(results: list[dict]) -> str:
    keys = [("novel_accuracy", "novel acc"), ("novel_macro_f1", "novel F1"), ("clustering_avg_bio", "AvgBio"),
            ("clustering_nmi", "NMI"), ("clustering_ari", "ARI"), ("clustering_asw_label", "ASW"),
            ("probe_accuracy", "probe acc"), ("probe_macro_f1", "probe F1"), ("marker_auroc", "marker AUROC")]
    names = list(results[0]["models"])
    lines = ["| model | " + " | ".join(k[1] for k in keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for name in names:
        cells = []
        for key, _ in keys:
            vals = [r["models"][name].get(key) for r in results]
            vals = [v for v in vals if v is not None]
            if not vals:
                cells.append("-")
            elif len(vals) == 1:
                cells.append(f"{vals[0]:.3f}")
            else:
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--marker-cells-per-type", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1 epoch, for a smoke run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "_work" / "sccello_results.json")
    args = parser.parse_args()
    if args.quick:
        args.epochs = 1
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:  # the JSON is rewritten after each seed
        results.append(run(seed, args))
        runtime = time.perf_counter() - start
        payload = {"command": "python scripts/sccello_results.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k not in ("out", "quick")), "runtime_seconds": runtime,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "results": results}
        args.out.write_text(json.dumps(payload, indent=2, default=float))
    print(table(results))
    print(f"\nruntime {runtime:.0f} s; results in {args.out}")
    s = results[0]["models"]
    print(f"RESULT sccello_results novel_acc_sccello={s['scCello (all losses)']['novel_accuracy']:.3f} "
          f"novel_acc_mlm={s['MLM only (ablation)']['novel_accuracy']:.3f} "
          f"avgbio_sccello={s['scCello (all losses)']['clustering_avg_bio']:.3f} "
          f"avgbio_mlm={s['MLM only (ablation)']['clustering_avg_bio']:.3f} runtime_s={runtime:.0f}")


if __name__ == "__main__":
    main()
