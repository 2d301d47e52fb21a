"""Training-speed benchmark: scforge's scGPT training step against scGPT's own TransformerModel.

    python benchmarks/train.py            # 16-cell batches, max 1,200 tokens per cell, 3 rounds
    python benchmarks/train.py --quick    # 4-cell batches, max 512 tokens, 1 step a side, 2 rounds (bf16: 1)

Both sides: the same small scGPT (4 layers x 256, 4 heads, FFN 512, dropout 0.2, vocabulary
``scgpt-human``, MVC decoder), the same initial weights (the reference is built, its state dict is
copied into scforge), the same real batches: ifnb cells (raw counts) tokenized once with
``BinnedTokenizer`` (``<cls>`` value -2), masked by scGPT's GEP masking at ratio 0.4 by
``CellCollator``. The loss is scGPT's published one, GEP + MVC masked MSE, and a step is forward,
loss, backward, clip to norm 1.0, optimizer step; fp32, train mode (dropout on).

Reference: ``TransformerModel`` from the scgpt 0.2.4 wheel (its PyTorch path: flash-attn is not
installed), batches in input order padded to the longest cell as scGPT's tutorials train,
``scgpt.loss.masked_mse_loss``, Adam (as its tutorials). scforge: ``ScGPTTrainingModule._losses``
on the padding-free packed batch, the module's own AdamW, fp32 and bf16 autocast.

Timed: the training step only (batches are built beforehand, identically for every side); a few
warm-up steps untimed; rounds alternate reference, scforge fp32, scforge bf16; medians over rounds
(``--quick``: no bf16 warm-up, and bf16 is timed in the last round only, to stay near a minute).
Throughput counts real (non-padding) tokens. Before any training, one dropout-free forward and
backward on the first batch checks that both sides compute the same loss and gradient norm.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the stdlib `tokenize` when this folder is on the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import importlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IFNB = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
CPU = torch.device("cpu")


def padded_batch(batch: dict[str, torch.Tensor], pad_id: int, pad_value: float = -2.0) -> dict[str, torch.Tensor]:
    """The packed batch as the reference takes it: ``[B, L]`` padded at the end to the longest cell."""
    from scforge.nn import unpack_to_padded

    cu = batch["cu_seqlens"]
    genes = unpack_to_padded(batch["genes"], cu, pad_id)
    lengths = cu[1:] - cu[:-1]
    return {"genes": genes, "values": unpack_to_padded(batch["values"], cu, pad_value),
            "target": unpack_to_padded(batch["target"], cu, pad_value),
            "predict": unpack_to_padded(batch["predict"], cu, False),
            "padding_mask": torch.arange(genes.shape[1])[None, :] >= lengths[:, None]}


def grad_norm(params) -> float:
    return float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params if p.grad is not None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=None, help="cells per training step (16; quick 4)")
    parser.add_argument("--max-len", type=int, default=None, help="tokens per cell incl. <cls> (1200; quick 512)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per side per round (fp32)")
    parser.add_argument("--bf16-steps", type=int, default=None, help="timed bf16 steps per round (slow on AVX2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per side before the rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    import anndata as ad

    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT, to_scforge_keys
    from scforge.nn import autocast, cpu_has_fast_bf16
    from scforge.testing.scgpt_reference import load_scgpt_model_module
    from scforge.tokenize import BinnedTokenizer
    from scforge.train import CellCollator, Corruption, Objectives, OptimConfig, ScGPTTrainingModule

    if not IFNB.exists():
        raise SystemExit(f"needs {IFNB}")
    n_layers, d, d_hid, heads = 4, 256, 512, 4
    max_len = args.max_len or (512 if args.quick else 1200)
    steps = args.steps or (1 if args.quick else 2)
    bf16_steps = args.bf16_steps or 1
    warmup = args.warmup if args.warmup is not None else 1
    rounds = args.rounds or (2 if args.quick else 3)
    bf16_rounds = 1 if args.quick else rounds  # quick: bf16 (emulated on AVX2, slow) in the last round only
    bs = args.batch or (4 if args.quick else 16)
    n_batches = max(steps, bf16_steps, warmup)
    n_cells = bs * n_batches

    # ---- models: the reference, and scforge with the reference's weights ---------------------
    vocab = builtin_vocab("scgpt-human")
    pad_id = vocab.special_id("pad")
    ref_module = load_scgpt_model_module()
    ref_loss = importlib.import_module("scgpt.loss").masked_mse_loss  # the bare package is installed above
    torch.manual_seed(0)
    ref = ref_module.TransformerModel(
        len(vocab), d, heads, d_hid, n_layers, vocab={"<pad>": pad_id}, dropout=0.2, pad_token="<pad>",
        pad_value=-2, do_mvc=True)
    model = ScGPT.new(vocab, d_model=d, n_heads=heads, d_hid=d_hid, n_layers=n_layers, dropout=0.2,
                      max_seq_len=max_len, do_mvc=True)
    loaded = model.module.load_state_dict(to_scforge_keys(ref.state_dict()), strict=False)
    if loaded.missing_keys:
        raise SystemExit(f"reference weights do not cover scforge's model: {loaded.missing_keys[:5]}")
    total_steps = warmup * 3 + rounds * (steps + bf16_steps)
    trainer = ScGPTTrainingModule(model.module, Objectives(gep=True, mvc=True),
                                  OptimConfig(lr=1e-4, schedule="constant"), total_steps=total_steps)
    sf_opt = trainer.configure_optimizers()["optimizer"]
    ref_opt = torch.optim.Adam(ref.parameters(), lr=1e-4, eps=1e-8)
    ref_params = [p for p in ref.parameters() if p.requires_grad]
    sf_params = [p for p in model.module.parameters() if p.requires_grad]

    # ---- data: tokenized once, masked once, the same batches for every side -------------------
    full = ad.read_h5ad(IFNB)
    rng = np.random.default_rng(0)
    cells = full[np.sort(rng.choice(full.n_obs, n_cells, replace=False))].copy()
    tokens = BinnedTokenizer(vocab, normalize_total=None, log1p=False, cls_value=-2, max_len=max_len,
                             seed=0).tokenize(cells)
    collate = CellCollator(tokens, corruption=Corruption("mask", 0.4), seed=0, pad_id=pad_id)
    packed = [collate([(0, i) for i in range(lo, lo + bs)]) for lo in range(0, n_cells, bs)]
    padded = [padded_batch(b, pad_id) for b in packed]
    real = [int(b["cu_seqlens"][-1]) for b in packed]
    positions = [int(p["genes"].numel()) for p in padded]
    seq = [(b["cu_seqlens"][1:] - b["cu_seqlens"][:-1]).double() for b in packed]
    scores = [float((s**2).sum()) / float(s.numel() * s.max() ** 2) for s in seq]  # packed / padded attention
    lengths = tokens.lengths
    print(f"{n_cells} ifnb cells in {n_batches} batches of {bs}: {sum(real)} real tokens (mean {lengths.mean():.0f}, "
          f"max {lengths.max()} per cell), {sum(positions)} padded positions ({sum(real) / sum(positions):.0%} real); "
          f"{int(sum(b['predict'].sum() for b in packed))} masked; model {n_layers} x {d}, FFN {d_hid}, "
          f"vocab {len(vocab)}; torch threads {torch.get_num_threads()}; CPU native bf16: {cpu_has_fast_bf16()}")

    # ---- the two training steps ---------------------------------------------------------------
    def ref_forward_loss(i: int) -> torch.Tensor:
        b = padded[i]
        out = ref(b["genes"], b["values"], b["padding_mask"], MVC=True)
        return ref_loss(out["mlm_output"], b["target"], b["predict"]) + ref_loss(out["mvc_output"], b["target"],
                                                                                  b["predict"])

    def sf_forward_loss(i: int, dtype: torch.dtype) -> torch.Tensor:
        with autocast(CPU, dtype):
            return trainer._losses(packed[i])[0]

    def ref_step(i: int) -> float:
        ref_opt.zero_grad(set_to_none=True)
        loss = ref_forward_loss(i)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref_params, 1.0)
        ref_opt.step()
        return loss.item()

    def sf_step(i: int, dtype: torch.dtype) -> float:
        sf_opt.zero_grad(set_to_none=True)
        loss = sf_forward_loss(i, dtype)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(sf_params, 1.0)
        sf_opt.step()
        return loss.item()

    # ---- loss check: same weights, same batch, dropout off, before any step -------------------
    ref.eval()
    model.module.eval()
    ref.zero_grad(set_to_none=True)
    model.module.zero_grad(set_to_none=True)
    l_ref = ref_forward_loss(0)
    l_ref.backward()
    l_sf = sf_forward_loss(0, torch.float32)
    l_sf.backward()
    g_ref, g_sf = grad_norm(ref_params), grad_norm(sf_params)
    l_ref, l_sf = l_ref.item(), l_sf.item()
    loss_rel = abs(l_sf - l_ref) / abs(l_ref)
    grad_rel = abs(g_sf - g_ref) / g_ref
    print(f"first-batch loss, dropout off: reference {l_ref:.6f}  scforge {l_sf:.6f}  "
          f"(rel. diff {loss_rel:.1e}); gradient norm {g_ref:.6f} vs {g_sf:.6f} (rel. diff {grad_rel:.1e})")
    ref.train()
    model.module.train()

    t_setup = time.perf_counter() - t_start

    # ---- timing -------------------------------------------------------------------------------
    for i in range(warmup):  # untimed (quick mode: no bf16 warm-up, it costs several fp32 steps)
        ref_step(i % n_batches)
        sf_step(i % n_batches, torch.float32)
        if not args.quick:
            sf_step(i % n_batches, torch.bfloat16)

    def timed(step, n: int) -> tuple[float, int]:
        t0 = time.perf_counter()
        for i in range(n):
            step(i)
        return time.perf_counter() - t0, sum(real[:n])

    tps: dict[str, list[float]] = {"ref": [], "fp32": [], "bf16": []}
    for r in range(rounds):
        t_ref, n_ref = timed(ref_step, steps)
        t32, n32 = timed(lambda i: sf_step(i, torch.float32), steps)
        tps["ref"].append(n_ref / t_ref)
        tps["fp32"].append(n32 / t32)
        line = f"round {r + 1}: reference {t_ref / steps:.2f} s/step  scforge fp32 {t32 / steps:.2f} s/step"
        if r >= rounds - bf16_rounds:
            t16, n16 = timed(lambda i: sf_step(i, torch.bfloat16), bf16_steps)
            tps["bf16"].append(n16 / t16)
            line += f"  scforge bf16 {t16 / bf16_steps:.2f} s/step"
        print(line)

    med = {k: statistics.median(v) for k, v in tps.items()}
    auto = "bf16" if cpu_has_fast_bf16() else "fp32"
    print()
    print(f"{'':26s}{'tokens/s':>10s}{'s/step':>9s}{'vs ref':>9s}")
    mean_tokens = sum(real[:steps]) / steps
    for key, label in (("ref", "scGPT reference (fp32)"), ("fp32", "scforge fp32"), ("bf16", "scforge bf16")):
        n = steps if key != "bf16" else bf16_steps
        per_step = sum(real[:n]) / n / med[key]
        print(f"{label:26s}{med[key]:10.0f}{per_step:9.2f}{med[key] / med['ref']:8.2f}x")
    print(f"real tokens per step {mean_tokens:.0f}; the reference computes on {sum(positions[:steps]) / steps:.0f} "
          f"padded positions per step and {1 / statistics.mean(scores[:steps]):.2f}x scforge's attention scores")
    print(f"scforge's default precision on this CPU (precision='auto'): {auto}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s (setup {t_setup:.0f} s)")
    print(f"RESULT train speedup_vs_scgpt={med[auto] / med['ref']:.2f} tokens_per_s={med[auto]:.0f} precision={auto} "
          f"ref_tokens_per_s={med['ref']:.0f} fp32_speedup={med['fp32'] / med['ref']:.2f} "
          f"bf16_speedup={med['bf16'] / med['ref']:.2f} loss_match={loss_rel:.1e} grad_norm_match={grad_rel:.1e} "
          f"real_fraction={sum(real[:steps]) / sum(positions[:steps]):.2f}")


if __name__ == "__main__":
    main()
