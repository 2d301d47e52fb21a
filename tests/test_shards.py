"""Pre-tokenized shards: round trip equals direct tokenization; damaged or mismatched shards are refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scforge.data.shards import ShardError, TokenShards, write_shards
from scforge.errors import ConfigError
from scforge.genes.builtin import builtin_geneformer, builtin_vocab
from scforge.tokenize import BinnedTokenizer, RankValueTokenizer


@pytest.fixture(scope="module")
def h5ad(ifnb_small, tmp_path_factory):
    path = tmp_path_factory.mktemp("shards") / "cells.h5ad"
    ifnb_small[:300].copy().write_h5ad(path)
    return path


def binned(**kw):
    return BinnedTokenizer(builtin_vocab("scgpt-human"), max_len=kw.pop("max_len", 128), seed=0, chunk_size=64, **kw)


def assert_same(a, b):
    np.testing.assert_array_equal(a.offsets, b.offsets)
    for name in ("gene_ids", "values"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None)
        if x is not None:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(a.obs_names).astype(str), np.asarray(b.obs_names).astype(str))


def test_round_trip_equals_direct_tokenization_across_shard_boundaries(h5ad, ifnb_small, tmp_path):
    tok = binned()
    direct = tok.tokenize(ifnb_small[:300].copy())
    shards = write_shards(tok, h5ad, tmp_path / "s", shard_cells=70)  # chunks of 64 split across shards of 70
    assert shards.n_shards == 5 and shards.n_cells == 300
    assert [shards.shard(i).n_cells for i in range(5)] == [70, 70, 70, 70, 20]
    assert isinstance(shards.shard(0).gene_ids, np.memmap)  # read at disk speed, not loaded
    assert_same(shards.to_tokenized(), direct)
    pick = np.array([299, 0, 69, 70, 150, 3])
    assert_same(shards.cells(pick), direct.select(pick))
    again = TokenShards.open(tmp_path / "s", tokenizer=binned())
    assert_same(again.to_tokenized(), direct)
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["n_tokens"] == direct.n_tokens and manifest["source"]["path"].endswith("cells.h5ad")
    assert manifest["tokenizer"]["max_len"] == 128 and manifest["vocab"]["size"] == 60697


def test_rank_value_tokens_without_values(h5ad, ifnb_small, tmp_path):
    tok = RankValueTokenizer(builtin_geneformer("geneformer-v2"), model_input_size=64, chunk_size=100)
    shards = write_shards(tok, h5ad, tmp_path / "gf", shard_cells=128)
    assert shards.shard(0).values is None
    assert_same(shards.to_tokenized(), tok.tokenize(ifnb_small[:300].copy()))


def test_mismatched_use_is_refused(h5ad, tmp_path):
    write_shards(binned(), h5ad, tmp_path / "s", shard_cells=100)
    with pytest.raises(ShardError, match="other settings.*max_len"):
        TokenShards.open(tmp_path / "s", tokenizer=binned(max_len=256))
    with pytest.raises(ShardError, match="another vocabulary"):
        TokenShards.open(tmp_path / "s", vocab=builtin_geneformer("geneformer-v1").vocab)
    with pytest.raises(ConfigError, match="exists"):
        write_shards(binned(), h5ad, tmp_path / "s")
    (tmp_path / "not_shards").mkdir()
    (tmp_path / "not_shards" / "keep.txt").write_text("user data")
    with pytest.raises(ConfigError, match="not a shard folder"):
        write_shards(binned(), h5ad, tmp_path / "not_shards", overwrite=True)
    assert (tmp_path / "not_shards" / "keep.txt").read_text() == "user data"


def test_damaged_shards_give_clear_errors(h5ad, tmp_path):
    write_shards(binned(), h5ad, tmp_path / "s", shard_cells=100)
    genes = tmp_path / "s" / "shard-00001.genes"
    data = genes.read_bytes()
    genes.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ShardError, match="shard-00001.genes is .* bytes, expected .*truncated"):
        TokenShards.open(tmp_path / "s")
    genes.write_bytes(data)
    manifest = tmp_path / "s" / "manifest.json"
    m = json.loads(manifest.read_text())
    m["version"] = 99
    manifest.write_text(json.dumps(m))
    with pytest.raises(ShardError, match="version 99"):
        TokenShards.open(tmp_path / "s")
    manifest.unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        TokenShards.open(tmp_path / "s")
    with pytest.raises(ConfigError, match="shard_cells"):
        write_shards(binned(), h5ad, tmp_path / "t", shard_cells=0)


def test_cli_shard(h5ad, tmp_path, capsys):
    from scforge.cli import main

    assert main(["shard", str(h5ad), "--model", "scgpt", "--max-len", "128", "--chunk-size", "64",
                 "--shard-cells", "100", "--out", str(tmp_path / "cli")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_cells"] == 300 and out["n_shards"] == 3
    assert_same(TokenShards.open(tmp_path / "cli", tokenizer=binned()).to_tokenized(),
                TokenShards.open(tmp_path / "cli").to_tokenized())
