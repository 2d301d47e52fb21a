"""Tokenized cells per second delivered to a training loop, and peak memory, by source.

Sources (all the ifnb full set, 13,999 cells, replicated to N cells; scGPT tokenizer, max_len 1200):

* backed ``.h5ad`` through :class:`scforge.data.stream.CellStream` (block shuffling, blocks of 512,
  buffers of 8 blocks, tokenized inside the stream on the tokenizer's threads);
* pre-tokenized shards (:mod:`scforge.data.shards`) through the same stream;
* the peer: anndata's ``AnnLoader`` over the backed file (shuffled), each minibatch tokenized with the
  same tokenizer; it reads rows at random, so it is timed on its first 3,000 cells.

Each measurement is a fresh process (its own peak RSS); the kinds alternate; medians are reported.
Throughput is counted after the first minibatch (the one-off setup is reported as ``setup_s``).

    python benchmarks/loader.py --quick          # 13,999 cells, under a minute
    python benchmarks/loader.py                  # 100,000 and 1,000,000 cells (files built once)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]  # benchmarks/tokenize.py

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ifnb" / "ifnb_full_13999_partial_labels.h5ad"
WORK = ROOT / "benchmarks" / "_work" / "loader"
PEER_CELLS = 3000


def replicated(n_cells: int) -> Path:
    """An .h5ad of ``n_cells`` cells: the ifnb cells repeated (appended on disk, never all in memory)."""
    import anndata as ad
    import h5py
    import pandas as pd
    from anndata.io import sparse_dataset, write_elem

    if n_cells <= 13_999:
        return DATA
    path = WORK / f"ifnb_x{n_cells}.h5ad"
    if path.is_file():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    base = ad.read_h5ad(DATA)
    x = base.X.tocsr()
    tmp = path.with_suffix(".partial.h5ad")
    ad.AnnData(X=x[: min(n_cells, x.shape[0])], var=base.var).write_h5ad(tmp)
    done = min(n_cells, x.shape[0])
    with h5py.File(tmp, "a") as f:
        matrix = sparse_dataset(f["X"])
        while done < n_cells:
            take = min(x.shape[0], n_cells - done)
            matrix.append(x[:take])
            done += take
        del f["obs"]
        write_elem(f, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    tmp.rename(path)
    return path


def tokenizer():
    from scforge.genes.builtin import builtin_vocab
    from scforge.tokenize import BinnedTokenizer

    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=1200, seed=0)


def worker(kind: str, path: str) -> dict:
    from scforge.data.stream import CellStream

    # the clock starts after the first minibatch: opening, gene matching and kernel compilation are
    # one-off costs, reported as setup_s
    t0 = time.perf_counter()
    start, n = None, 0
    if kind in ("h5ad", "shards"):
        stream = CellStream([path], tokenizer(), batch_size=64, block_size=512, buffer_blocks=8, seed=0)
        for batch in stream:
            if start is None:
                start = time.perf_counter()
                continue
            n += batch["cells"].size
    else:  # AnnLoader peer
        import anndata as ad
        from anndata.experimental import AnnLoader

        tok = tokenizer()
        adata = ad.read_h5ad(path, backed="r")
        for batch in AnnLoader(adata, batch_size=64, shuffle=True):
            x = batch.X
            tok.tokenize(x.numpy() if hasattr(x, "numpy") else x, var_names=adata.var_names)
            if start is None:
                start = time.perf_counter()
                continue
            n += batch.n_obs
            if n >= PEER_CELLS:
                break
    seconds = time.perf_counter() - start
    return {"cells": n, "seconds": seconds, "cells_per_s": n / seconds, "setup_s": start - t0,
            "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak resident memory: VmHWM (ru_maxrss would carry the parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(kind: str, path: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--path", str(path)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cells", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None, help="runs of each kind (default 1 with --quick, else 2)")
    ap.add_argument("--worker", choices=["h5ad", "shards", "annloader"])
    ap.add_argument("--path")
    ap.add_argument("--reuse-shards", action="store_true", help="keep shard folders from an earlier run")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.path)))
        return
    from scforge.data.shards import write_shards

    sizes = args.cells or ([13_999] if args.quick else [100_000, 1_000_000])
    table = {}
    for n in sizes:
        h5ad = replicated(n)
        shard_dir = WORK / f"shards_{n}"
        t0 = time.perf_counter()
        if not (args.reuse_shards and (shard_dir / "manifest.json").is_file()):
            write_shards(tokenizer(), h5ad, shard_dir, shard_cells=100_000, overwrite=True)
        write_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {"h5ad": [], "shards": [], "annloader": []}
        for rep in range(args.reps or (1 if args.quick else 2)):
            kinds = ["h5ad", "shards", "annloader"]
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                runs[kind].append(measure(kind, shard_dir if kind == "shards" else h5ad))
        table[n] = {k: {m: statistics.median(r[m] for r in v) for m in ("cells_per_s", "peak_rss_mb", "seconds",
                                                                                   "setup_s")}
                    for k, v in runs.items()}
        table[n]["shard_write_s"] = write_s
        print(f"{n:>9,} cells: " + "  ".join(f"{k} {v['cells_per_s']:,.0f} cells/s ({v['peak_rss_mb']:.0f} MB)"
                                             for k, v in table[n].items() if isinstance(v, dict))
              + f"  shard write {write_s:.0f} s", flush=True)
    last, first = table[sizes[-1]], table[sizes[0]]
    growth = max(last[k]["peak_rss_mb"] - first[k]["peak_rss_mb"] for k in ("h5ad", "shards"))
    print(json.dumps(table, indent=1))
    print(f"RESULT loader shard_cells_per_s={last['shards']['cells_per_s']:.0f} "
          f"h5ad_cells_per_s={last['h5ad']['cells_per_s']:.0f} rss_growth_mb={growth:.0f} "
          f"speedup_vs_annloader={last['h5ad']['cells_per_s'] / last['annloader']['cells_per_s']:.1f} "
          f"cells={sizes[-1]}")


if __name__ == "__main__":
    main()
