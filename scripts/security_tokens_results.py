"""scBackdoor's Geneformer attack on rank-value tokens, end to end on ifnb, with the token audit as defence.

    .venv/bin/python scripts/security_tokens_results.py --model random              # 4 x 128, no pretraining
    .venv/bin/python scripts/security_tokens_results.py --model path/to/geneformer  # a Geneformer-family folder
    .venv/bin/python scripts/security_tokens_results.py --model random --n-cells 300 --epochs 1 --max-length 64

For each target: a stratified 80/20 hold-out, 5% of the training cells (stratified random, as published)
get RankShuffleTrigger(top=20) on their tokens and the target label; the victim is fine-tuned clean /
poisoned / after the token audit's flagged cells are removed; ASR on the triggered non-target test
cells. Prints one markdown table row per run and writes ``results.csv``, ``detection.csv``,
``table.md`` and one report folder per run under ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from scforge.security import ModelVictim, RankShuffleTrigger, run_attack, split_cells

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"
HEADER = ("| model | target | acc clean | acc poisoned | acc defended | ASR clean | ASR poisoned | ASR defended | "
          "detection AUROC | flagged precision | flagged recall | seconds |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def random_geneformer(seed: int):
    """A Geneformer-family model with random weights: 4 layers x 128 hidden, geneformer-v1 dictionaries."""
    from scforge.models.geneformer import Geneformer, GeneformerConfig
    from scforge.models.geneformer.config import V1_VOCAB_SIZE

    config = GeneformerConfig(vocab_size=V1_VOCAB_SIZE, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=256, max_position_embeddings=2048)
    return Geneformer.new(config, "geneformer-v1", seed=seed)


def subsample(adata, n_cells: int | None, seed: int):
    """``n_cells`` cells drawn at random (seeded), in their original order; all cells when None."""
    if n_cells is None or n_cells >= adata.n_obs:
        return adata
    keep = np.sort(np.random.default_rng(seed).choice(adata.n_obs, size=n_cells, replace=False))
    return adata[keep].copy()


def _f(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{v:.3f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--label-key", default="seurat_annotations")
    ap.add_argument("--model", default="random", help="a Geneformer-family model folder, or 'random'")
    ap.add_argument("--targets", nargs="+", default=["B", "NK"])
    ap.add_argument("--rate", type=float, default=0.05)
    ap.add_argument("--selection", default="random", choices=["random", "gini"])
    ap.add_argument("--top", type=int, default=20, help="genes the trigger keeps (published: 20)")
    ap.add_argument("--defence", default="remove", choices=["remove", "relabel", "fine_prune"])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=None, help="tokens per cell (default: the model's)")
    ap.add_argument("--n-cells", type=int, default=None, help="random subsample of the data (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/_work/security_tokens")
    args = ap.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    adata = subsample(ad.read_h5ad(args.data), args.n_cells, args.seed)
    if args.model == "random":
        model, model_name = random_geneformer(args.seed), "random 4x128"
    else:
        import scforge

        model, model_name = scforge.load(args.model), Path(args.model).name
    victim = ModelVictim(model, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                         max_length=args.max_length, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(HEADER, flush=True)
    lines, tidy, detections = [HEADER], [], []
    t0 = time.perf_counter()  # the clean victim is the same for every target: fitted once
    train_idx, _ = split_cells(adata, args.label_key, seed=args.seed)
    train = adata[train_idx].copy()
    clean = victim.fit_tokens(victim.tokenize(train), train.obs[args.label_key].astype(str).to_numpy(),
                              args.label_key)
    clean_seconds = time.perf_counter() - t0
    for target in args.targets:
        t0 = time.perf_counter()
        res = run_attack(adata, args.label_key, target, victim=victim, rate=args.rate,
                         trigger=RankShuffleTrigger(top=args.top), selection=args.selection, defence=args.defence,
                         seed=args.seed, clean_victim=clean)
        seconds = time.perf_counter() - t0 + clean_seconds / len(args.targets)
        res.save(out / f"{args.model.replace('/', '_')}_{target.replace(' ', '_')}")
        d = res.detection
        line = (f"| {model_name} | {target} | " + " | ".join(_f(res.value(s, "accuracy")) for s in
                                                            ("clean", "poisoned", "defended"))
                + " | " + " | ".join(_f(res.value(s, "asr")) for s in ("clean", "poisoned", "defended"))
                + f" | {_f(d.get('auroc'))} | {_f(d.get('precision'))} | {_f(d.get('recall'))} | {seconds:.0f} |")
        print(line, flush=True)
        lines.append(line)
        tidy.append(res.tidy().assign(model=model_name, seconds=seconds))
        detections.append({"model": model_name, "target": target, "n_poisoned": res.settings["n_poisoned"],
                           "max_length": res.settings["max_length"], "n_cells": int(adata.n_obs),
                           "epochs": args.epochs, **{k: float(v) for k, v in d.items()}, "seconds": seconds})
    pd.concat(tidy, ignore_index=True).to_csv(out / "results.csv", index=False)
    pd.DataFrame(detections).to_csv(out / "detection.csv", index=False)
    (out / "table.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
