"""Small real training problems shared by the engine tests (and run as a script by the fault and DDP tests)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ifnb" / "ifnb_sub_2000.h5ad"


def tiny_problem(n_cells: int = 96, max_len: int = 64, **config):
    """A tiny scGPT (1-2 layers, d=32) on real ifnb cells, with integer labels and batch labels."""
    import anndata as ad

    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT
    from scforge.tokenize import BinnedTokenizer

    adata = ad.read_h5ad(SHARED)[:n_cells]
    vocab = builtin_vocab("scgpt-human")
    cells = BinnedTokenizer(vocab, max_len=max_len, seed=0, cls_value=0.0).tokenize(adata)
    labels = adata.obs["seurat_annotations"].astype("category").cat.codes.to_numpy().astype(np.int64)
    batches = adata.obs["stim"].astype("category").cat.codes.to_numpy().astype(np.int64)
    base = {"d_model": 32, "n_heads": 4, "d_hid": 48, "n_layers": 2, "dropout": 0.1}
    base.update(config)
    torch.manual_seed(0)
    model = ScGPT.new(vocab, **base)
    return model, cells, labels, batches


def final_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


class KillAtStep:
    """A Lightning callback that SIGKILLs its own process once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __call__(self):  # pragma: no cover - runs in a subprocess
        import lightning as L

        outer = self

        class _Kill(L.Callback):
            def on_train_batch_end(self, trainer, *args, **kwargs):
                if trainer.global_step >= outer.step:
                    os.kill(os.getpid(), signal.SIGKILL)

        return _Kill()


def main() -> None:  # pragma: no cover - run in subprocesses by the tests
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--stream", default=None, help="an .h5ad to stream (fit_stream) instead of in-memory cells")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--strategy", default=None, help="Lightning strategy (default: ddp with --devices > 1)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stream:
        return stream_main(args)
    from scforge.train import Objectives, TrainConfig, fit

    model, cells, labels, _ = tiny_problem(n_cells=64, max_len=48, n_cls=int(13))
    callbacks = [KillAtStep(args.kill_at)()] if args.kill_at else []
    cfg = TrainConfig(max_epochs=100, max_steps=args.steps, batch_size=8, val_fraction=0.0, progress=False,
                      checkpoint_dir=args.ckpt, checkpoint_every=2, seed=3, devices=args.devices,
                      accelerator="cpu", strategy="ddp" if args.devices > 1 else "auto", extra_callbacks=callbacks)
    seen: list[int] = []

    import lightning as L

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.extend(batch["cells"].tolist())

    cfg.extra_callbacks.append(Record())
    result = fit(model.module, cells, objectives=Objectives(gep=True, mvc=True, cls=True), config=cfg,
                 labels=labels, resume_from=args.resume)
    rank = result.trainer.global_rank
    state = final_state(result.module)
    torch.save(state, f"{args.out}.rank{rank}.pt")
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"seen": seen, "step": result.trainer.global_step}))


def stream_main(args) -> None:  # pragma: no cover - run in subprocesses by the tests
    """fit_stream on a streamed .h5ad; records the cells of every step per epoch."""
    import lightning as L

    from scforge.data.stream import CellStream
    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT
    from scforge.tokenize import BinnedTokenizer
    from scforge.train import Corruption, Objectives, TrainConfig, fit_stream

    vocab = builtin_vocab("scgpt-human")
    stream = CellStream(args.stream, BinnedTokenizer(vocab, max_len=48, seed=0, cls_value=0.0), batch_size=8,
                        block_size=16, buffer_blocks=2, seed=4)
    torch.manual_seed(0)
    model = ScGPT.new(vocab, d_model=32, n_heads=4, d_hid=48, n_layers=2, dropout=0.1)
    seen: dict[int, list[int]] = {}

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.setdefault(trainer.current_epoch, []).extend(batch["cells"].tolist())

    callbacks = [Record()] + ([KillAtStep(args.kill_at)()] if args.kill_at else [])
    cfg = TrainConfig(max_epochs=args.epochs, max_steps=args.steps, val_fraction=0.0, progress=False,
                      checkpoint_dir=args.ckpt, checkpoint_every=2, seed=3, devices=args.devices, accelerator="cpu",
                      strategy=args.strategy or ("ddp" if args.devices > 1 else "auto"), extra_callbacks=callbacks)
    result = fit_stream(model.module, stream, objectives=Objectives(gep=True, mvc=True),
                        corruption=Corruption("mask", 0.4), config=cfg, num_workers=args.workers,
                        resume_from=args.resume)
    rank = result.trainer.global_rank
    torch.save(final_state(result.module), f"{args.out}.rank{rank}.pt")
    Path(f"{args.out}.rank{rank}.json").write_text(json.dumps({"seen": seen, "step": result.trainer.global_step,
                                                               "world": result.trainer.world_size}))


if __name__ == "__main__":
    sys.exit(main())
