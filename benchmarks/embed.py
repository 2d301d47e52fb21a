"""Embedding benchmark: scforge's scGPT against scGPT's own TransformerModel, same weights, same cells.

    python benchmarks/embed.py            # whole-human size (12 x 512, 60,697 tokens), 3 rounds
    python benchmarks/embed.py --quick    # 4 x 256, fewer cells, 2 rounds (under a minute)

Reference: ``TransformerModel`` from the scgpt 0.2.4 wheel (its PyTorch path: flash-attn is not
installed), eval mode, fp32, batches of 64 cells in input order padded to the longest cell, as
``embed_data`` does; only its model forward is timed (its slow preprocessing is not). scforge:
``model.embed`` end to end (tokenization included), fp32 and bf16, padding-free packed batches.
Both run on the same ifnb cells (max 1,200 tokens, ``<cls>`` value -2), alternating; medians.
Achieved GFLOP/s count the matmul FLOPs of real tokens (projections, FFN, attention) and are set
against a matmul peak measured in the same run in the same dtype.
"""

from __future__ import annotations

import os
import sys

# benchmarks/tokenize.py shadows the stdlib `tokenize` when this folder is on the import path
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IFNB = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"


def matmul_peak(dtype: torch.dtype, seconds: float = 0.5) -> float:
    """GFLOP/s of ``nn.Linear``'s product (``x @ W.T``, the layout every model matmul uses here) for
    [8192 x 512] x [512 x 2048] in ``dtype``, best over repeats."""
    a = torch.randn(8192, 512).to(dtype)
    w = torch.randn(2048, 512).to(dtype)
    torch.nn.functional.linear(a, w)
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * 8192 * 512 * 2048 / best / 1e9


def model_flops(lengths: np.ndarray, d: int, d_hid: int, n_layers: int) -> float:
    """Matmul FLOPs of the encoder over real tokens (value encoder, q/k/v/out, FFN, attention)."""
    tokens = float(lengths.sum())
    per_token_layer = 2 * (4 * d * d + 2 * d * d_hid)
    attention = 4.0 * d * float((lengths.astype(np.float64) ** 2).sum())
    return n_layers * (tokens * per_token_layer + attention) + tokens * 2 * d * d


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cells", type=int, default=None)
    parser.add_argument("--bf16-cells", type=int, default=None, help="cells for the bf16 run (slow on AVX2 CPUs)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import anndata as ad

    from scforge.genes.builtin import builtin_vocab
    from scforge.models.scgpt import ScGPT, to_scforge_keys
    from scforge.nn import cpu_has_fast_bf16
    from scforge.testing.scgpt_reference import load_scgpt_model_module

    if not IFNB.exists():
        raise SystemExit(f"needs {IFNB}")
    size = (4, 256, 256, 4) if args.quick else (12, 512, 512, 8)
    n_layers, d, d_hid, heads = size
    n_cells = args.cells or (24 if args.quick else 64)
    bf16_cells = args.bf16_cells or (4 if args.quick else 16)
    rounds = args.rounds or (2 if args.quick else 3)

    vocab = builtin_vocab("scgpt-human")
    pad_id = vocab.special_id("pad")
    torch.manual_seed(0)
    ref = load_scgpt_model_module().TransformerModel(
        len(vocab), d, heads, d_hid, n_layers, vocab={"<pad>": pad_id}, dropout=0.2, pad_token="<pad>",
        pad_value=-2, do_mvc=True).eval()
    model = ScGPT.new(vocab, d_model=d, n_heads=heads, d_hid=d_hid, n_layers=n_layers, max_seq_len=1200)
    model.module.load_state_dict(to_scforge_keys(ref.state_dict()), strict=False)
    model.module.eval()

    full = ad.read_h5ad(IFNB)
    rng = np.random.default_rng(0)
    cells = full[np.sort(rng.choice(full.n_obs, n_cells, replace=False))].copy()
    tokens = model.tokenizer(seed=0).tokenize(cells)
    lengths = tokens.lengths
    flops = model_flops(lengths, d, d_hid, n_layers)
    padded_tokens = sum(int(lengths[i : i + 64].max()) * len(lengths[i : i + 64]) for i in range(0, n_cells, 64))
    print(f"{n_cells} ifnb cells, {int(lengths.sum())} tokens (mean {lengths.mean():.0f}, max {lengths.max()}); "
          f"reference batches hold {padded_tokens} positions with padding; model {n_layers} x {d}, "
          f"vocab {len(vocab)}; torch threads {torch.get_num_threads()}; CPU native bf16: {cpu_has_fast_bf16()}")

    def run_reference() -> tuple[float, np.ndarray]:
        out = np.zeros((n_cells, d), dtype=np.float32)
        t0 = time.perf_counter()
        with torch.no_grad():
            for lo in range(0, n_cells, 64):
                batch = tokens.pad(np.arange(lo, min(lo + 64, n_cells)), pad_id=pad_id, pad_value=-2.0)
                out[lo : lo + 64] = ref._encode(batch["genes"], batch["values"], batch["padding_mask"])[:, 0].numpy()
        return time.perf_counter() - t0, out

    def run_scforge(precision: str, subset: int) -> tuple[float, np.ndarray]:
        data = cells if subset == n_cells else cells[:subset].copy()
        t0 = time.perf_counter()
        emb = model.embed(data, key_added="", precision=precision, normalize=False, progress=False, device="cpu")
        return time.perf_counter() - t0, emb

    # warm-up (untimed): both sides once on a few cells
    run_scforge("fp32", 4)
    with torch.no_grad():
        b = tokens.pad(np.arange(2), pad_id=pad_id, pad_value=-2.0)
        ref._encode(b["genes"], b["values"], b["padding_mask"])

    times: dict[str, list[float]] = {"ref": [], "fp32": [], "bf16": []}
    parity = 0.0
    for r in range(rounds):
        t_ref, e_ref = run_reference()
        t32, e32 = run_scforge("fp32", n_cells)
        t16, _ = run_scforge("bf16", bf16_cells)
        times["ref"].append(t_ref)
        times["fp32"].append(t32)
        times["bf16"].append(t16)
        parity = max(parity, float(np.abs(e_ref - e32).max()))
        print(f"round {r + 1}: reference {t_ref:.2f}s  scforge fp32 {t32:.2f}s  scforge bf16 ({bf16_cells} cells) {t16:.2f}s")

    cps = {"ref": n_cells / statistics.median(times["ref"]), "fp32": n_cells / statistics.median(times["fp32"]),
           "bf16": bf16_cells / statistics.median(times["bf16"])}
    peak32, peak16 = matmul_peak(torch.float32), matmul_peak(torch.bfloat16)
    bf16_flops = model_flops(lengths[:bf16_cells], d, d_hid, n_layers)
    gflops32 = flops / statistics.median(times["fp32"]) / 1e9
    gflops16 = bf16_flops / statistics.median(times["bf16"]) / 1e9
    auto = "bf16" if cpu_has_fast_bf16() else "fp32"
    print()
    print(f"{'':28s}{'cells/s':>10s}{'vs ref':>9s}{'GFLOP/s':>10s}{'peak':>9s}{'of peak':>9s}")
    print(f"{'scGPT reference (fp32)':28s}{cps['ref']:10.2f}{1:9.2f}x{flops / statistics.median(times['ref']) / 1e9:10.1f}"
          f"{peak32:9.1f}{flops / statistics.median(times['ref']) / 1e9 / peak32:9.0%}")
    print(f"{'scforge fp32':28s}{cps['fp32']:10.2f}{cps['fp32'] / cps['ref']:9.2f}x{gflops32:10.1f}{peak32:9.1f}"
          f"{gflops32 / peak32:9.0%}")
    print(f"{'scforge bf16':28s}{cps['bf16']:10.2f}{cps['bf16'] / cps['ref']:9.2f}x{gflops16:10.1f}{peak16:9.1f}"
          f"{gflops16 / peak16:9.0%}")
    print(f"fp32 parity (max |scforge - reference| over cell embeddings): {parity:.2e}")
    print(f"scforge's default precision on this CPU (precision='auto'): {auto}")
    best = cps[auto] / cps["ref"]
    frac = (gflops16 / peak16) if auto == "bf16" else (gflops32 / peak32)
    print(f"RESULT embed speedup_vs_scgpt={best:.2f} parity_max_abs_diff={parity:.2e} peak_fraction={frac:.2f} "
          f"precision={auto} bf16_speedup_vs_scgpt={cps['bf16'] / cps['ref']:.2f} "
          f"bf16_peak_fraction={gflops16 / peak16:.2f} cells_per_s={cps[auto]:.2f}")


if __name__ == "__main__":
    main()
