"""Tokenized cells per second delivered to a training loop, and peak memory, by source.

Sources (all the ifnb full set, 13,999 cells, replicated to N cells; scGPT tokenizer, max_len 1200):

* backed ``.h5ad`` through :class:`scforge.data.stream.CellStream` (block shuffling, blocks of 512,
  buffers of 8 blocks, tokenized inside the stream on the tokenizer's threads);
* the same cells written once as an AnnData zarr store, through the same stream;
* the same cells ingested once into a TileDB-SOMA experiment (``tiledbsoma.io.from_h5ad``, X layer
  ``raw``), through the same stream (:mod:`scforge.data.soma`, a snapshot pinned at open);
* pre-tokenized shards (:mod:`scforge.data.shards`) through the same stream;
* the peer: anndata's ``AnnLoader`` over the backed file (shuffled), each minibatch tokenized with the
  same tokenizer; it reads rows at random, so it is timed on its first 3,000 cells;
* the peer ``scDataset`` (PyPI ``scdataset`` 0.3.0) over the backed file with its documented AnnData
  setup (``BlockShuffling(block_size=16)``, ``batch_size=64``, ``fetch_factor=16``, a fetch callback
  reading ``adata[indices].X``, kept sparse), each minibatch tokenized with the same tokenizer; timed on
  4 fetches (4,096 cells) after its first fetch of 1,024 cells (that one counts as setup).

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
import shutil
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
SCDATASET_FETCH = 16  # minibatches per scDataset fetch (its fetch_factor)
SCDATASET_CELLS = 4 * SCDATASET_FETCH * 64  # 4 fetches, timed after the first one
STREAMED = ("h5ad", "zarr", "soma", "shards")
KINDS = ("h5ad", "zarr", "soma", "shards", "annloader", "scdataset")
CHUNK = 100_000  # rows copied at a time when building the zarr store


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


def zarr_store(h5ad: Path, n_cells: int) -> Path:
    """The cells of ``h5ad`` as an AnnData zarr store (built once, in row chunks)."""
    import anndata as ad
    import h5py
    import pandas as pd
    import zarr
    from anndata.io import read_elem, sparse_dataset, write_elem

    path = WORK / f"ifnb_x{n_cells}.zarr"
    if path.is_dir():
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial.zarr")
    shutil.rmtree(tmp, ignore_errors=True)
    with h5py.File(h5ad, "r") as f:
        x = sparse_dataset(f["X"])
        ad.AnnData(X=x[: min(CHUNK, n_cells)], var=read_elem(f["var"])).write_zarr(tmp)
        group = zarr.open_group(str(tmp), mode="a", use_consolidated=False)
        matrix = sparse_dataset(group["X"])
        for lo in range(CHUNK, n_cells, CHUNK):
            matrix.append(x[lo : min(lo + CHUNK, n_cells)])
    del group["obs"]
    write_elem(group, "obs", pd.DataFrame(index=[f"c{i}" for i in range(n_cells)]))
    zarr.consolidate_metadata(str(tmp))  # readers use the consolidated metadata: bring it up to date
    tmp.rename(path)
    return path


def soma_store(h5ad: Path, n_cells: int) -> Path:
    """The cells of ``h5ad`` ingested into a TileDB-SOMA experiment (built once; X layer ``raw``)."""
    import tiledbsoma.io

    from scforge.data.soma import is_soma_experiment

    path = WORK / f"soma_x{n_cells}"
    if is_soma_experiment(path):
        return path
    WORK.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tiledbsoma.io.from_h5ad(str(tmp), str(h5ad), measurement_name="RNA", X_layer_name="raw", uns_keys=[])
    tmp.rename(path)  # member URIs are relative: the experiment moves with its folder
    return path


def tokenizer():
    from scforge.genes.builtin import builtin_vocab
    from scforge.tokenize import BinnedTokenizer

    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=1200, seed=0)


def worker(kind: str, path: str) -> dict:
    if kind in STREAMED:  # imported before the clock starts; the peers do not need it
        from scforge.data.stream import CellStream

    # the clock starts after the first minibatch: opening, gene matching and kernel compilation are
    # one-off costs, reported as setup_s
    t0 = time.perf_counter()
    start, n = None, 0
    if kind in STREAMED:
        stream = CellStream([path], tokenizer(), batch_size=64, block_size=512, buffer_blocks=8, seed=0)
        for batch in stream:
            if start is None:
                start = time.perf_counter()
                continue
            n += batch["cells"].size
    elif kind == "scdataset":  # peer: its documented block sampling over the backed AnnData
        import anndata as ad
        from scdataset import BlockShuffling, scDataset

        tok = tokenizer()
        adata = ad.read_h5ad(path, backed="r")
        dataset = scDataset(adata, BlockShuffling(block_size=16), batch_size=64, fetch_factor=SCDATASET_FETCH, seed=0,
                            fetch_callback=lambda a, indices: a[indices].X)
        for i, x in enumerate(dataset):
            tok.tokenize(x, var_names=adata.var_names)
            if i < SCDATASET_FETCH - 1:  # the first fetch is read before its first minibatch: all setup
                continue
            if start is None:
                start = time.perf_counter()
                continue
            n += x.shape[0]
            if n >= SCDATASET_CELLS:
                break
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
    ap.add_argument("--worker", choices=KINDS)
    ap.add_argument("--path")
    ap.add_argument("--reuse-shards", action="store_true", help="keep shard folders from an earlier run")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS),
                    help="loaders to measure (stores are built only for these)")
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
        kinds = tuple(k for k in KINDS if k in args.kinds)
        t0 = time.perf_counter()
        paths = {"h5ad": h5ad, "zarr": zarr_store(h5ad, n) if "zarr" in kinds else None, "shards": shard_dir,
                 "annloader": h5ad, "scdataset": h5ad}
        zarr_s, t0 = time.perf_counter() - t0, time.perf_counter()
        paths["soma"] = soma_store(h5ad, n) if "soma" in kinds else None
        soma_s = time.perf_counter() - t0
        runs: dict[str, list[dict]] = {k: [] for k in kinds}
        for rep in range(args.reps or (1 if args.quick else 2)):
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                runs[kind].append(measure(kind, paths[kind]))
        table[n] = {k: {m: statistics.median(r[m] for r in v) for m in ("cells_per_s", "peak_rss_mb", "seconds",
                                                                                   "setup_s")}
                    for k, v in runs.items()}
        table[n].update(shard_write_s=write_s, zarr_write_s=zarr_s, soma_ingest_s=soma_s)
        print(f"{n:>9,} cells: " + "  ".join(f"{k} {v['cells_per_s']:,.0f} cells/s ({v['peak_rss_mb']:.0f} MB)"
                                             for k, v in table[n].items() if isinstance(v, dict))
              + f"  shard write {write_s:.0f} s, zarr write {zarr_s:.0f} s, SOMA ingest {soma_s:.0f} s", flush=True)
    last, first = table[sizes[-1]], table[sizes[0]]
    growth = max((last[k]["peak_rss_mb"] - first[k]["peak_rss_mb"] for k in ("h5ad", "shards") if k in last),
                 default=float("nan"))
    print(json.dumps(table, indent=1))
    rate = {k: f"{last[k]['cells_per_s']:.0f}" if k in last else "nan" for k in KINDS}
    speedup = (f"{last['h5ad']['cells_per_s'] / last['annloader']['cells_per_s']:.1f}"
               if "h5ad" in last and "annloader" in last else "nan")
    print(f"RESULT loader shard_cells_per_s={rate['shards']} h5ad_cells_per_s={rate['h5ad']} rss_growth_mb={growth:.0f} "
          f"speedup_vs_annloader={speedup} cells={sizes[-1]} zarr_cells_per_s={rate['zarr']} "
          f"soma_cells_per_s={rate['soma']} scdataset_cells_per_s={rate['scdataset']}")


if __name__ == "__main__":
    main()
