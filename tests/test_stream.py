"""Streaming tokenized cells: every cell exactly once per epoch across ranks and workers, seeded block
shuffling, exact resume, tokens equal to direct tokenization, and every source kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.data.shards import write_shards
from scforge.data.stream import CellStream
from scforge.errors import ConfigError, InputDataError
from scforge.genes.builtin import builtin_vocab
from scforge.tokenize import BinnedTokenizer


def tok(**kw):
    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=kw.pop("max_len", 64), seed=0, **kw)


@pytest.fixture(scope="module")
def files(ifnb_small, tmp_path_factory):
    """An .h5ad (300 cells), a zarr store (100 cells) and an in-memory AnnData (50 cells)."""
    root = tmp_path_factory.mktemp("stream")
    ifnb_small[:300].copy().write_h5ad(root / "a.h5ad")
    ifnb_small[300:400].copy().write_zarr(root / "b.zarr")
    return root, ifnb_small[400:450].copy(), ifnb_small[:450].copy()


def sources(files):
    root, mem, _ = files
    return [root / "a.h5ad", root / "b.zarr", mem]


def run(stream: CellStream) -> list[dict]:
    return list(iter(stream))


def test_every_cell_exactly_once_across_ranks_and_workers(files):
    seen = []
    for rank in range(2):
        stream = CellStream(sources(files), tok(), batch_size=16, block_size=32, buffer_blocks=3, seed=1, rank=rank,
                            world_size=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2)
        seen += [b["cells"] for b in loader]
    cells = np.concatenate(seen)
    np.testing.assert_array_equal(np.sort(cells), np.arange(450))  # no duplicates, no omissions


def test_tokens_equal_direct_tokenization_and_order_is_seeded(files):
    _, mem, all_cells = files
    # each source tokenized directly on its own (the tokenizer's seeded rules follow the row in the source)
    direct = [tok().tokenize(all_cells[:300].copy()), tok().tokenize(all_cells[300:400].copy()), tok().tokenize(mem)]
    starts = [0, 300, 400]
    a = run(CellStream(sources(files), tok(), batch_size=20, block_size=50, seed=3))
    for batch in a:
        for j, cell in enumerate(batch["cells"]):
            k = int(np.searchsorted(starts, cell, side="right") - 1)
            genes, values = batch["tokens"].cell(j)
            dg, dv = direct[k].cell(int(cell) - starts[k])
            np.testing.assert_array_equal(genes, dg)
            np.testing.assert_array_equal(values, dv)
    cells = np.concatenate([b["cells"] for b in a])
    assert not np.array_equal(cells, np.arange(450))  # shuffled
    again = np.concatenate([b["cells"] for b in run(CellStream(sources(files), tok(), batch_size=20, block_size=50,
                                                                seed=3))])
    np.testing.assert_array_equal(cells, again)  # same seed and epoch: same order
    later = CellStream(sources(files), tok(), batch_size=20, block_size=50, seed=3)
    later.set_epoch(1)
    assert not np.array_equal(np.concatenate([b["cells"] for b in run(later)]), cells)
    # without shuffling: sources and rows in order
    plain = np.concatenate([b["cells"] for b in run(CellStream(sources(files), tok(), batch_size=20, block_size=50,
                                                                shuffle=False))])
    np.testing.assert_array_equal(plain, np.arange(450))


def test_resume_mid_epoch_gives_the_same_remaining_batches(files):
    full = run(CellStream(sources(files), tok(), batch_size=16, block_size=32, buffer_blocks=2, seed=5))
    first = CellStream(sources(files), tok(), batch_size=16, block_size=32, buffer_blocks=2, seed=5)
    it = iter(first)
    for _ in range(7):
        next(it)
    state = first.state_dict()
    assert state == {"epoch": 0, "consumed": 7}
    resumed = CellStream(sources(files), tok(), batch_size=16, block_size=32, buffer_blocks=2, seed=5)
    resumed.load_state_dict(state)
    rest = run(resumed)
    assert len(rest) == len(full) - 7
    for a, b in zip(rest, full[7:]):
        np.testing.assert_array_equal(a["cells"], b["cells"])
        np.testing.assert_array_equal(a["tokens"].gene_ids, b["tokens"].gene_ids)


def test_even_batches_for_ddp_and_length(files):
    """With even_batches every rank gets as many minibatches as the fullest one (DDP needs it) by repeating
    a few of its own cells; len() is a rank's count over its workers; without it, each cell exactly once."""
    per_rank, seen = [], []
    for rank in range(2):
        stream = CellStream(sources(files), tok(), batch_size=16, block_size=24, buffer_blocks=2, seed=1)
        stream.set_distributed(rank, 2, loader_workers=2)
        stream.even_batches = True
        batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=2))
        assert len(batches) == len(stream)
        per_rank.append(len(batches))
        seen.append(np.concatenate([b["cells"] for b in batches]))
        assert all(b["epoch"] == 0 for b in batches)
    assert per_rank[0] == per_rank[1]
    cells = np.concatenate(seen)
    np.testing.assert_array_equal(np.unique(cells), np.arange(450))  # nothing missed
    uneven = [len(CellStream(sources(files), tok(), batch_size=16, block_size=24, buffer_blocks=2, seed=1, rank=r,
                             world_size=2, loader_workers=2)) for r in range(2)]
    assert uneven != per_rank and max(uneven) == per_rank[0]  # this layout is uneven: padding was needed
    assert cells.size - 450 <= (max(uneven) - min(uneven)) * 16  # repeats only what the padding adds
    # the workers hint is for len(); iterated without workers, each rank is one consumer: every cell once
    direct = [b["cells"] for r in range(2) for b in CellStream(sources(files), tok(), batch_size=16, block_size=24,
                                                                 buffer_blocks=2, seed=1, rank=r, world_size=2,
                                                                 loader_workers=2)]
    np.testing.assert_array_equal(np.sort(np.concatenate(direct)), np.arange(450))


def test_resume_with_dataloader_workers_takes_each_workers_share(files):
    """A rank's count of consumed minibatches (what the trainer saw) resumes the right place in every worker."""
    kw = dict(batch_size=8, block_size=16, buffer_blocks=2, seed=7)
    full = list(torch.utils.data.DataLoader(CellStream(sources(files), tok(), **kw), batch_size=None, num_workers=2))
    for consumed in (1, 5, len(full) - 3):
        resumed = CellStream(sources(files), tok(), **kw)
        resumed.load_state_dict({"epoch": 0, "consumed": consumed})
        rest = list(torch.utils.data.DataLoader(resumed, batch_size=None, num_workers=2))
        assert len(rest) == len(full) - consumed
        for a, b in zip(rest, full[consumed:]):
            np.testing.assert_array_equal(a["cells"], b["cells"])


def test_shards_as_a_source(files, tmp_path):
    root, _, _ = files
    shards = write_shards(tok(), root / "a.h5ad", tmp_path / "s", shard_cells=128)
    from_shards = run(CellStream([tmp_path / "s"], tok(), batch_size=25, block_size=40, seed=2))
    from_h5ad = run(CellStream([root / "a.h5ad"], tok(), batch_size=25, block_size=40, seed=2))
    for a, b in zip(from_shards, from_h5ad):
        np.testing.assert_array_equal(a["cells"], b["cells"])
        np.testing.assert_array_equal(a["tokens"].gene_ids, b["tokens"].gene_ids)
        np.testing.assert_array_equal(a["tokens"].values, b["tokens"].values)
    assert sum(b["cells"].size for b in run(CellStream([shards], batch_size=50))) == 300
    from scforge.data.shards import ShardError

    with pytest.raises(ShardError, match="other settings"):
        CellStream([tmp_path / "s"], tok(max_len=32))


def test_clear_errors(files, tmp_path):
    root, mem, _ = files
    with pytest.raises(InputDataError, match="does not exist"):
        CellStream([tmp_path / "missing.h5ad"], tok())
    with pytest.raises(ConfigError, match="pass tokenizer"):
        CellStream([mem])
    with pytest.raises(ConfigError, match="batch_size"):
        CellStream([mem], tok(), batch_size=0)


_APPEND = """
import sys, h5py, anndata as ad, pandas as pd
from anndata.io import read_elem, sparse_dataset, write_elem
extra = ad.read_h5ad(sys.argv[2])
try:
    with h5py.File(sys.argv[1], "a") as f:
        sparse_dataset(f["X"]).append(extra.X.tocsr())
        obs = pd.concat([read_elem(f["obs"]), extra.obs[[]]])
        obs.index = obs.index.astype(str) + "-" + pd.RangeIndex(len(obs)).astype(str)
        del f["obs"]
        write_elem(f, "obs", obs)
    print("appended")
except Exception as exc:
    print("refused", type(exc).__name__, exc)
"""


@pytest.mark.parametrize("locking", ["TRUE", "FALSE"])
def test_files_appended_during_reading_do_not_change_a_run(files, ifnb_small, tmp_path, locking):
    """Cells appended to an .h5ad by another process, and bytes appended to shard files, while a stream reads
    them: the run goes on with exactly the cells it started with; a new stream then sees a consistent file."""
    import os
    import shutil
    import subprocess
    import sys

    root, _, _ = files
    shutil.copy(root / "a.h5ad", tmp_path / "grow.h5ad")
    ifnb_small[1000:1100].copy().write_h5ad(tmp_path / "extra.h5ad")
    write_shards(tok(), root / "a.h5ad", tmp_path / "s", shard_cells=128)
    kw = dict(batch_size=16, block_size=32, buffer_blocks=2, seed=9)
    expected = run(CellStream([root / "a.h5ad", tmp_path / "s"], tok(), **kw))

    stream = CellStream([tmp_path / "grow.h5ad", tmp_path / "s"], tok(), **kw)
    it = iter(stream)
    got = [next(it) for _ in range(5)]
    proc = subprocess.run([sys.executable, "-c", _APPEND, str(tmp_path / "grow.h5ad"), str(tmp_path / "extra.h5ad")],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HDF5_USE_FILE_LOCKING=locking))  # FALSE: as on many network disks
    for data in sorted((tmp_path / "s").glob("shard-*.*s")):  # .genes / .values / .offsets
        with open(data, "ab") as f:
            f.write(b"\x7f" * 64)
    got += list(it)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a["cells"], b["cells"])
        np.testing.assert_array_equal(a["tokens"].gene_ids, b["tokens"].gene_ids)
        np.testing.assert_array_equal(a["tokens"].values, b["tokens"].values)
    # the stream holds no HDF5 handle between block reads, so the writer got in (locking or not)
    assert proc.stdout.strip() == "appended", proc.stdout + proc.stderr[-2000:]
    later = CellStream([tmp_path / "grow.h5ad"], tok(), **kw)
    assert later.n_cells == 400
    from scforge.data.shards import ShardError

    with pytest.raises(ShardError, match="truncated or damaged"):  # the grown shard files are refused on open
        CellStream([tmp_path / "s"], tok())
