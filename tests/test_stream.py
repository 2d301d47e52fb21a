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
