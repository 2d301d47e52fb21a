"""Tokenizer benchmark: scforge's binned tokenizer against scGPT's own pipeline, plus memory scaling.

    python benchmarks/tokenize.py            # full: 5 alternating rounds, 10x / 100x streaming, RSS
    python benchmarks/tokenize.py --quick    # the 14k-cell comparison only, 2 rounds (about a minute)

Reference pipeline (scGPT 0.2.4 wheel): ``Preprocessor(normalize_total=1e4, log1p=True,
binning=51)`` then ``tokenize_and_pad_batch(max_len=3001, pad_value=-2, append_cls=True,
include_zero_gene=False)``, the cell-type annotation tutorial's settings. scforge does the same
work: ``BinnedTokenizer(max_len=3001)`` and padding of every cell into one batch. Both run on the
same cells (ifnb full, genes restricted to the scGPT vocabulary), alternating, medians reported.
Memory: each size runs in a fresh process and reports its peak RSS.
"""

from __future__ import annotations

import os
import sys

# This file is named like the stdlib module `tokenize`; keep its folder off the import path.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
IFNB = SHARED / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
WORK = ROOT / "benchmarks" / "_work"


def current_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load_inputs():
    import anndata as ad

    from scforge.genes import builtin

    vocab = builtin.resolve_vocab("scgpt-human")
    adata = ad.read_h5ad(IFNB)
    in_vocab = vocab.lookup(list(adata.var_names)) >= 0
    adata = adata[:, in_vocab].copy()  # the tutorial's vocabulary filter, done once for both sides
    return adata, vocab


def run_reference(adata, vocab) -> float:
    from scforge.testing.scgpt_reference import load_scgpt_reference, vocab_stand_in

    ref = load_scgpt_reference()
    t0 = time.perf_counter()
    work = adata.copy()
    ref.Preprocessor(normalize_total=1e4, log1p=True, binning=51, result_binned_key="X_binned")(work)
    gene_ids = vocab.lookup(list(work.var_names))
    mapping = {"<pad>": vocab.special_id("pad"), "<cls>": vocab.special_id("cls")}
    ref.tokenize_and_pad_batch(
        work.layers["X_binned"], gene_ids, max_len=3001, vocab=vocab_stand_in(mapping),
        pad_token="<pad>", pad_value=-2, append_cls=True, include_zero_gene=False,
    )
    return time.perf_counter() - t0


def run_scforge(adata, vocab, pad: bool = True) -> float:
    """Tokenize (ragged, scforge's output); with ``pad`` also pad every cell into one [cells, L]
    batch, the same output the reference returns."""
    from scforge.tokenize import BinnedTokenizer

    t0 = time.perf_counter()
    tok = BinnedTokenizer(vocab, max_len=3001)
    cells = tok.tokenize(adata)
    if pad:
        cells.pad()
    return time.perf_counter() - t0


def other_tokenizers(adata) -> dict[str, float]:
    """Cells/s of the rank-value and log-bin tokenizers on the same cells (in memory)."""
    from scforge.genes import builtin
    from scforge.tokenize import LogBinTokenizer, RankValueTokenizer

    out = {}
    rank = RankValueTokenizer(builtin.resolve_geneformer("geneformer-v2"))
    t0 = time.perf_counter()
    rank.tokenize(adata)
    out["rank_value_cells_per_s"] = adata.n_obs / (time.perf_counter() - t0)
    # scBERT's published panel is not distributable here: the data's own genes stand in for it
    panel = LogBinTokenizer(list(adata.var_names))
    t0 = time.perf_counter()
    panel.tokenize(adata)
    out["log_bin_cells_per_s"] = adata.n_obs / (time.perf_counter() - t0)
    return out


# ---- streaming memory scaling ------------------------------------------------------------------
def replicated_h5ad(times: int) -> Path:
    """ifnb full replicated ``times`` x along cells, written block by block (never all in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    WORK.mkdir(parents=True, exist_ok=True)
    path = WORK / f"ifnb_x{times}.h5ad"
    if path.exists():
        return path
    src = ad.read_h5ad(IFNB)
    tmp = path.with_suffix(".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        obs = pd.DataFrame(index=[f"{name}-{k}" for k in range(times) for name in src.obs_names])
        write_elem(f, "obs", obs)
        write_elem(f, "var", src.var)
        write_elem(f, "X", src.X)
        x = sparse_dataset(f["X"])
        for _ in range(times - 1):
            x.append(src.X)
    tmp.rename(path)
    return path


def stream_worker(times: int, mode: str) -> dict:
    """Tokenize a replicated file chunk by chunk, from its path (``mode="path"``: nothing per-cell
    is loaded up front) or from ``anndata.read_h5ad(backed="r")`` (anndata loads obs into memory);
    return cells/s and this process's peak RSS."""
    import anndata as ad

    from scforge.genes import builtin
    from scforge.tokenize import BinnedTokenizer

    path = IFNB if times == 1 else replicated_h5ad(times)
    vocab = builtin.resolve_vocab("scgpt-human")
    tok = BinnedTokenizer(vocab, max_len=3001)
    next(tok.iter_chunks(IFNB))  # load the compiled kernels before measuring
    data = str(path) if mode == "path" else ad.read_h5ad(path, backed="r")
    opened = current_rss_mb()
    t0 = time.perf_counter()
    n_cells = n_tokens = 0
    for chunk in tok.iter_chunks(data):
        n_cells += chunk.n_cells
        n_tokens += chunk.n_tokens
    elapsed = time.perf_counter() - t0
    return {"cells": n_cells, "tokens": n_tokens, "seconds": elapsed, "cells_per_s": n_cells / elapsed,
            "peak_rss_mb": peak_rss_mb(), "rss_before_tokenizing_mb": opened}


def reference_worker(times: int) -> dict:
    """The reference pipeline on ``times`` x the cells (it needs everything in memory)."""
    import anndata as ad

    adata, vocab = load_inputs()
    if times > 1:
        adata = ad.concat([adata] * times, index_unique="-")
    seconds = run_reference(adata, vocab)
    return {"cells": adata.n_obs, "seconds": seconds, "cells_per_s": adata.n_obs / seconds,
            "peak_rss_mb": peak_rss_mb()}


def in_subprocess(kind: str, times: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, "--times", str(times)],
        check=True, capture_output=True, text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="14k-cell comparison only")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--worker", choices=["stream", "stream-anndata", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--times", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "reference":
            result = reference_worker(args.times)
        else:
            result = stream_worker(args.times, "path" if args.worker == "stream" else "anndata")
        print(json.dumps(result))
        return
    if not IFNB.exists():
        sys.exit(f"benchmark data not found: {IFNB} (needs ../shared/data)")

    adata, vocab = load_inputs()
    print(f"cells {adata.n_obs:,} x genes in vocab {adata.n_vars:,}, nnz {adata.X.nnz:,}")
    rounds = args.rounds or (2 if args.quick else 5)
    # warm-up, untimed, for both sides: imports, caches and the first touches of fresh memory
    run_scforge(adata, vocab)
    run_reference(adata, vocab)
    ref_t, padded_t, ragged_t = [], [], []
    for r in range(rounds):
        padded_t.append(run_scforge(adata, vocab, pad=True))
        ragged_t.append(run_scforge(adata, vocab, pad=False))
        ref_t.append(run_reference(adata, vocab))
        print(f"round {r + 1}: scGPT reference {ref_t[-1]:.2f} s   scforge {padded_t[-1]:.3f} s "
              f"(padded)  {ragged_t[-1]:.3f} s (ragged)")
    ref_med = statistics.median(ref_t)
    padded_med, ragged_med = statistics.median(padded_t), statistics.median(ragged_t)
    speedup = ref_med / padded_med
    cells_per_s = adata.n_obs / padded_med
    # the headline: scforge's tokenizer output (ragged, padded per minibatch later) vs the reference
    ragged_speedup = ref_med / ragged_med
    ragged_cells_per_s = adata.n_obs / ragged_med
    print(f"\n{'':34}{'median s':>10}{'cells/s':>12}{'vs scGPT':>10}")
    print(f"{'scGPT reference (padded tensors)':34}{ref_med:10.2f}{adata.n_obs / ref_med:12,.0f}{1:>9}x")
    print(f"{'scforge, padded like the reference':34}{padded_med:10.3f}{cells_per_s:12,.0f}{speedup:>9.1f}x")
    print(f"{'scforge, ragged (TokenizedCells)':34}{ragged_med:10.3f}{ragged_cells_per_s:12,.0f}"
          f"{ragged_speedup:>9.1f}x")

    rss_growth = float("nan")
    if not args.quick:
        for name, value in other_tokenizers(adata).items():
            print(f"{name}: {value:,.0f}")
        print("\nstreaming from .h5ad (fresh process per size; peak RSS of that process):")
        stream = {t: in_subprocess("stream", t) for t in (1, 10, 100)}
        for t, res in stream.items():
            print(f"  scforge path  x{t:<4} {res['cells']:>10,} cells {res['cells_per_s']:>10,.0f} cells/s  "
                  f"peak RSS {res['peak_rss_mb']:8.0f} MB")
        rss_growth = stream[100]["peak_rss_mb"] - stream[1]["peak_rss_mb"]
        for t in (1, 100):
            res = in_subprocess("stream-anndata", t)
            print(f"  scforge backed AnnData x{t:<4} {res['cells']:>10,} cells {res['cells_per_s']:>10,.0f} "
                  f"cells/s  peak RSS {res['peak_rss_mb']:8.0f} MB (anndata's obs: "
                  f"{res['rss_before_tokenizing_mb']:.0f} MB before tokenizing)")
        for t in (1, 2):
            res = in_subprocess("reference", t)
            print(f"  scGPT  x{t:<4} {res['cells']:>10,} cells {res['cells_per_s']:>10,.0f} cells/s  "
                  f"peak RSS {res['peak_rss_mb']:8.0f} MB (in memory, densified)")
    print(f"RESULT tokenize speedup_vs_scgpt={ragged_speedup:.1f} cells_per_s={ragged_cells_per_s:.0f} "
          f"rss_growth_mb={rss_growth:.0f}")


if __name__ == "__main__":
    main()
