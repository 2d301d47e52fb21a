"""TokenizedCells: selection, concatenation, padding, packing, files."""

from __future__ import annotations

import numpy as np
import pytest

from scforge.errors import ConfigError
from scforge.tokenize import TokenizedCells


def make() -> TokenizedCells:
    return TokenizedCells(
        offsets=np.array([0, 3, 4, 8]),
        gene_ids=np.array([9, 1, 2, 9, 9, 5, 6, 7], dtype=np.int32),
        values=np.array([0, 1, 2, 0, 0, 3, 4, 5], dtype=np.float32),
        obs_names=np.array(["a", "b", "c"]),
        meta={"pad_id": 99, "pad_value": -2.0},
    )


def test_cell_select_concat():
    t = make()
    assert t.n_cells == 3 and list(t.lengths) == [3, 1, 4]
    g, v = t[2]
    assert g.tolist() == [9, 5, 6, 7] and v.tolist() == [0, 3, 4, 5]
    s = t.select([2, 0])
    assert s.gene_ids.tolist() == [9, 5, 6, 7, 9, 1, 2] and list(s.obs_names) == ["c", "a"]
    c = TokenizedCells.concat([t.select([0]), t.select([1, 2])])
    assert np.array_equal(c.gene_ids, t.gene_ids) and np.array_equal(c.offsets, t.offsets)
    with pytest.raises(IndexError):
        t[3]


def test_pad_and_pack():
    t = make()
    b = t.pad()
    assert b["genes"].shape == (3, 4)
    assert b["genes"][1].tolist() == [9, 99, 99, 99]
    assert b["values"][1].tolist() == [0, -2, -2, -2]
    assert b["padding_mask"][0].tolist() == [False, False, False, True]
    capped = t.pad([2], max_len=2)
    assert capped["genes"].tolist() == [[9, 5]]
    p = t.pack([0, 2])
    assert p["genes"].tolist() == [9, 1, 2, 9, 5, 6, 7]
    assert p["cu_seqlens"].tolist() == [0, 3, 7] and p["max_seqlen"] == 4


def test_fixed_panel_positions_and_integer_values():
    t = TokenizedCells(offsets=np.array([0, 3, 6]), gene_ids=None,
                       values=np.array([1, 0, 5, 2, 2, 0], dtype=np.uint8), obs_names=np.array(["x", "y"]))
    b = t.pad()
    assert b["genes"].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert b["values"].dtype.is_floating_point is False


def test_bad_shapes_and_files(tmp_path):
    with pytest.raises(ConfigError):
        TokenizedCells(offsets=np.array([0, 2]), gene_ids=np.array([1]), values=None, obs_names=np.array(["a"]))
    (tmp_path / "x.npz").write_bytes(b"not a file")
    with pytest.raises(ConfigError, match="not a tokenized-cells file"):
        TokenizedCells.load(tmp_path / "x.npz")
    path = make().save(tmp_path / "t.npz")
    back = TokenizedCells.load(path)
    assert np.array_equal(back.gene_ids, make().gene_ids) and back.meta["pad_id"] == 99
