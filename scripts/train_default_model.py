"""Pretrain scforge's shipped default model (``scforge.load("default")``) on the ifnb corpus.

    python scripts/train_default_model.py            # writes src/scforge/models/default/

The corpus is ifnb full (../shared/data/ifnb/ifnb_full_13999_partial_labels.h5ad: 13,999 PBMCs, raw
counts, CTRL and IFN-beta stimulated); the vocabulary is its 14,053 gene symbols. scGPT's generative
pretraining (GEP + MVC, generated share drawn from {0.25, 0.5, 0.75}), 5% of cells held out for the
validation loss. Same seed, same weights (CPU, deterministic).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IFNB = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
OUT = ROOT / "src" / "scforge" / "models" / "default"
SETTINGS = {"d_model": 128, "n_layers": 4, "n_heads": 4, "d_hid": 256, "dropout": 0.1, "max_length": 192,
            "objective": "generative", "mask_ratio": (0.25, 0.5, 0.75), "batch_size": 32, "lr": 5e-4,
            "warmup_steps": 100, "val_fraction": 0.05, "seed": 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    import torch

    from scforge.tasks.pretrain import pretrain

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    result = pretrain(str(IFNB), epochs=args.epochs, max_steps=args.max_steps, precision="fp32",
                      log_dir=str(ROOT / "benchmarks" / "_work" / "default_model_logs"), **SETTINGS)
    minutes = (time.perf_counter() - t0) / 60
    model = result.model
    model.source = "scforge default model (pretrained on ifnb, scripts/train_default_model.py)"
    metrics = {k: round(v, 4) for k, v in result.metrics.items()}
    info = {"settings": {**SETTINGS, "mask_ratio": list(SETTINGS["mask_ratio"]), "epochs": args.epochs,
                         "max_steps": args.max_steps},
            "train_cells": result.n_train_cells, "validation_cells": result.n_val_cells, "metrics": metrics,
            "minutes": round(minutes, 1), "torch": torch.__version__}
    out = model.save(args.out, overwrite=True)
    (out / "training.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
