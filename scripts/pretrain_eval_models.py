"""Pretrain the small Geneformer-family model that the evaluation matrix compares with the default scGPT.

    python scripts/pretrain_eval_models.py        # writes benchmarks/_work/models/geneformer_ifnb/

Same corpus and size as the shipped default scGPT (scripts/train_default_model.py): ifnb full
(13,999 PBMCs, raw counts, CTRL + STIM), 4 layers x 128; 4 epochs (bf16 autocast where the CPU has
it; one fp32 epoch left MLM accuracy at 1%, the frequent-token guess). Geneformer's recipe otherwise:
rank-value encoding with the V1 dictionaries (top 128 genes per cell here, the V1 maximum is 2,048),
15% masked-LM, AdamW with warm-up. Pretraining is unsupervised, but the corpus contains the 2,000
labelled cells the matrix evaluates on (as for the default scGPT): a transductive setting, stated in
docs/results.md. Same seed, same weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IFNB = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
OUT = ROOT / "benchmarks" / "_work" / "models" / "geneformer_ifnb"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--precision", default="auto", help="auto (bf16 where the CPU supports it), bf16 or fp32")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    import torch

    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.training import pretrain_geneformer
    from scforge.train import OptimConfig, TrainConfig

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    config = GeneformerConfig(vocab_size=25426, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                              intermediate_size=256, max_position_embeddings=args.max_length)
    model, result = pretrain_geneformer(
        str(IFNB), config, dictionaries="geneformer-v1", max_length=args.max_length,
        train=TrainConfig(max_epochs=args.epochs, batch_size=32, val_fraction=0.05, seed=0, precision=args.precision,
                          progress=False),
        optim=OptimConfig(lr=5e-4, warmup_steps=100, schedule="cosine"))
    model.source = f"Geneformer-style 4x128 pretrained on ifnb full ({args.epochs} epochs, MLM)"
    model.save(args.out, overwrite=True)
    print(f"saved {args.out} in {(time.perf_counter() - t0) / 60:.1f} min; metrics {result.metrics}")


if __name__ == "__main__":
    main()
