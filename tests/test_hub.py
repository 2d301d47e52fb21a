"""scforge.hub: safe .pt loading, scforge model folders, checkpoint format detection."""

from __future__ import annotations

import json
import logging
import pathlib
import pickle
from collections import OrderedDict

import pytest
import torch

from scforge.errors import CheckpointError, ConfigError, ScforgeError, UnsafeFileError
from scforge.genes.vocab import GeneVocab
from scforge.hub import (
    ModelFolder,
    detect_format,
    load_model_folder,
    safe_torch_load,
    save_model_folder,
    scgpt_files,
    sha256_file,
)

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def _state_dict() -> OrderedDict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return OrderedDict(
        [
            ("encoder.weight", torch.randn(6, 4, generator=g)),
            ("encoder.bias", torch.randn(6, generator=g)),
            ("decoder.weight", torch.randn(3, 6, generator=g).to(torch.float16)),
            ("step", torch.tensor(7, dtype=torch.int64)),
        ]
    )


def _vocab() -> GeneVocab:
    return GeneVocab.from_gene_list(["GAPDH", "ACTB", "CD3E"], specials=["<pad>", "<cls>"])


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


class Touch:
    """Pickles to a call of ``Path.touch(marker)``: loading it unsafely creates the marker file."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


class Exec:
    """Pickles to ``exec(code)``, the classic remote-code-execution payload."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


# ---- safe_torch_load ----------------------------------------------------------------------------
def test_plain_state_dict_round_trip(tmp_path):
    sd = _state_dict()
    p = tmp_path / "best_model.pt"
    torch.save(sd, p)
    out = safe_torch_load(p)
    assert type(out) is dict
    _assert_same(out, sd)


def test_legacy_format_state_dict(tmp_path):
    sd = _state_dict()
    p = tmp_path / "legacy.pt"
    torch.save(sd, p, _use_new_zipfile_serialization=False)
    _assert_same(safe_torch_load(p), sd)


def test_parameters_become_plain_tensors(tmp_path):
    model = torch.nn.Linear(3, 2)
    p = tmp_path / "m.pt"
    torch.save(OrderedDict((k, torch.nn.Parameter(v)) for k, v in model.state_dict().items()), p)
    out = safe_torch_load(p)
    assert set(out) == {"weight", "bias"}
    assert all(type(v) is torch.Tensor for v in out.values())
    assert torch.equal(out["weight"], model.weight.detach())


@pytest.mark.parametrize("key", ["state_dict", "model_state_dict", "model"])
def test_wrapper_dict_is_unwrapped(tmp_path, caplog, key):
    sd = _state_dict()
    p = tmp_path / "trainer.ckpt"
    torch.save({"epoch": 3, "global_step": 120, key: sd, "optimizer_states": [{"lr": 0.1}]}, p)
    with caplog.at_level(logging.INFO, logger="scforge"):
        out = safe_torch_load(p)
    _assert_same(out, sd)
    assert any(key in r.getMessage() for r in caplog.records if r.name == "scforge")


def test_two_wrapped_state_dicts_are_ambiguous(tmp_path):
    p = tmp_path / "two.ckpt"
    torch.save({"state_dict": _state_dict(), "model": _state_dict()}, p)
    with pytest.raises(CheckpointError, match="several state dicts"):
        safe_torch_load(p)


@pytest.mark.parametrize("payload", [Touch, Exec])
def test_malicious_torch_save_is_refused_and_nothing_runs(tmp_path, payload):
    # control: the payload is live, an unsafe load really would run it
    control = tmp_path / "control"
    torch.save({"evil": payload(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()

    marker = tmp_path / "marker"
    p = tmp_path / "evil.pt"
    torch.save({"w": torch.zeros(1), "evil": payload(marker)}, p)
    with pytest.raises(UnsafeFileError) as info:
        safe_torch_load(p, what="scGPT weights")
    assert not marker.exists()
    msg = str(info.value)
    assert "scGPT weights" in msg and str(p) in msg
    assert "execute code" in msg and "torch.save(model.state_dict(), path)" in msg
    assert ("getattr" in msg) if payload is Touch else ("exec" in msg)
    assert isinstance(info.value, ScforgeError)


@pytest.mark.parametrize("protocol", [0, 2, 4, pickle.HIGHEST_PROTOCOL])
@pytest.mark.parametrize("payload", [Touch, Exec])
def test_malicious_raw_pickle_is_refused_and_nothing_runs(tmp_path, payload, protocol):
    marker = tmp_path / "marker"
    p = tmp_path / "evil.pkl"
    p.write_bytes(pickle.dumps({"w": 1, "evil": payload(marker)}, protocol=protocol))
    with pytest.raises(UnsafeFileError, match="refuses"):
        safe_torch_load(p)
    assert not marker.exists()


def test_legacy_format_malicious_is_refused(tmp_path):
    marker = tmp_path / "marker"
    p = tmp_path / "evil_legacy.pt"
    torch.save({"evil": Touch(marker)}, p, _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeFileError):
        safe_torch_load(p)
    assert not marker.exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_file_is_corrupt_not_unsafe(tmp_path, legacy):
    good = tmp_path / "good.pt"
    torch.save(_state_dict(), good, _use_new_zipfile_serialization=not legacy)
    data = good.read_bytes()
    p = tmp_path / "half.pt"
    for cut in sorted({len(data) // 2, len(data) // 3, 100, 150, 200, len(data) - 1}):
        p.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated or corrupt") as info:
            safe_torch_load(p)
        assert "Re-download" in str(info.value)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.pt"
    p.touch()
    with pytest.raises(CheckpointError, match="empty"):
        safe_torch_load(p)


def test_missing_path_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a folder"):
        safe_torch_load(tmp_path)


def test_garbage_and_safetensors_files(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"this is not a checkpoint at all")
    with pytest.raises(CheckpointError):
        safe_torch_load(p)
    from safetensors.torch import save_file

    st = tmp_path / "model.pt"
    save_file({"a": torch.zeros(2)}, str(st))
    with pytest.raises(CheckpointError, match="safetensors"):
        safe_torch_load(st)


@pytest.mark.parametrize(
    "obj, expected",
    [
        (torch.zeros(3, 2), "single tensor"),
        ([torch.zeros(1)], "list"),
        ({"w": torch.zeros(1), "lr": 0.1}, "'lr'"),
        ({}, "empty"),
        ({"config": {"d": 1}, "epoch": 1}, "'config'"),
    ],
)
def test_not_a_state_dict(tmp_path, obj, expected):
    p = tmp_path / "x.pt"
    torch.save(obj, p)
    with pytest.raises(CheckpointError, match="not a model state dict") as info:
        safe_torch_load(p)
    assert expected in str(info.value)


# ---- model folders -------------------------------------------------------------------------------
def _save(path, **kw):
    args = dict(family="scgpt", config={"d_model": 4, "nlayers": 1, "dropout": 0.1}, state_dict=_state_dict(),
                vocab=_vocab(), card="# Tiny model\n\nFor tests.\n")
    args.update(kw)
    return save_model_folder(path, **args)


def test_folder_round_trip(tmp_path):
    target = tmp_path / "out" / "tiny"
    assert _save(target) == target
    assert sorted(p.name for p in target.iterdir()) == ["card.md", "config.json", "model.safetensors", "vocab.json"]
    assert [p.name for p in tmp_path.joinpath("out").iterdir()] == ["tiny"]  # no temp folder left behind
    cfg = json.loads((target / "config.json").read_text())
    assert cfg["scforge_format"] == 1 and cfg["family"] == "scgpt"
    assert cfg["sha256"]["model.safetensors"] == sha256_file(target / "model.safetensors")
    import scforge

    assert cfg["scforge_version"] == scforge.__version__
    assert json.loads((target / "vocab.json").read_text())["format"] == "scforge.GeneVocab"

    mf = load_model_folder(target)
    assert isinstance(mf, ModelFolder)
    assert mf.path == target and mf.family == "scgpt"
    assert mf.config == {"d_model": 4, "nlayers": 1, "dropout": 0.1}
    _assert_same(mf.state_dict, _state_dict())
    assert mf.vocab == _vocab() and mf.vocab.pad_id == 3
    assert mf.card == "# Tiny model\n\nFor tests.\n"


def test_tied_and_non_contiguous_tensors_save(tmp_path):
    emb = torch.randn(5, 3)
    sd = {"encoder.embedding.weight": emb, "decoder.weight": emb, "view": emb[:, 1], "t": emb.t()}
    _save(tmp_path / "tied", state_dict=sd)
    out = load_model_folder(tmp_path / "tied").state_dict
    assert torch.equal(out["decoder.weight"], emb) and torch.equal(out["encoder.embedding.weight"], emb)
    assert torch.equal(out["view"], emb[:, 1]) and torch.equal(out["t"], emb.t())


def test_tampered_weights_fail_checksum(tmp_path):
    _save(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="modified or corrupt"):
        load_model_folder(tmp_path / "m")


def test_overwrite(tmp_path):
    target = _save(tmp_path / "m")
    with pytest.raises(CheckpointError, match="overwrite=True"):
        _save(target, family="other")
    assert load_model_folder(target).family == "scgpt"  # untouched
    _save(target, family="geneformer", card="new card", overwrite=True)
    mf = load_model_folder(target)
    assert mf.family == "geneformer" and mf.card == "new card"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # old copy and temp folder removed


def test_existing_empty_folder_is_fine(tmp_path):
    (tmp_path / "m").mkdir()
    _save(tmp_path / "m")
    assert load_model_folder(tmp_path / "m").family == "scgpt"


def test_overwrite_refuses_unrelated_folder_and_files(tmp_path):
    other = tmp_path / "data"
    other.mkdir()
    (other / "precious.h5ad").write_text("x")
    with pytest.raises(CheckpointError, match="not a scforge model folder"):
        _save(other, overwrite=True)
    assert (other / "precious.h5ad").exists()
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        _save(f, overwrite=True)


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(CheckpointError, match="'lr'"):
        _save(tmp_path / "m", state_dict={"w": torch.zeros(1), "lr": 0.1})
    with pytest.raises(ConfigError, match="JSON"):
        _save(tmp_path / "m", config={"fn": print})
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_named(tmp_path):
    _save(tmp_path / "m")
    (tmp_path / "m" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="missing vocab.json"):
        load_model_folder(tmp_path / "m")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model_folder(tmp_path / "nope")


def test_bad_config(tmp_path):
    _save(tmp_path / "m")
    cfg = tmp_path / "m" / "config.json"
    good = json.loads(cfg.read_text())
    cfg.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model_folder(tmp_path / "m")
    cfg.write_text(json.dumps({**good, "scforge_format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_model_folder(tmp_path / "m")
    cfg.write_text(json.dumps({k: v for k, v in good.items() if k != "family"}))
    with pytest.raises(CheckpointError, match="family"):
        load_model_folder(tmp_path / "m")


# ---- format detection ----------------------------------------------------------------------------
def _scgpt_folder(folder: pathlib.Path, weights: tuple[str, ...] = ("best_model.pt",)) -> pathlib.Path:
    folder.mkdir()
    (folder / "args.json").write_text(json.dumps({"embsize": 4, "nlayers": 1}))
    _vocab().to_scgpt_json(folder / "vocab.json")
    for name in weights:
        torch.save(_state_dict(), folder / name)
    return folder


def test_detect_formats(tmp_path):
    assert detect_format(_save(tmp_path / "sf")) == "scforge"

    sc = _scgpt_folder(tmp_path / "scgpt")
    assert detect_format(sc) == "scgpt"
    assert detect_format(sc / "best_model.pt") == "scgpt"
    assert scgpt_files(sc) == (sc / "best_model.pt", sc / "args.json", sc / "vocab.json")
    assert scgpt_files(sc / "best_model.pt")[0] == sc / "best_model.pt"

    one = _scgpt_folder(tmp_path / "scgpt_one", weights=("model_epoch5.pt",))
    assert detect_format(one) == "scgpt"
    assert scgpt_files(one)[0] == one / "model_epoch5.pt"

    for weights in ("model.safetensors", "pytorch_model.bin"):
        hf = tmp_path / f"hf_{weights}"
        hf.mkdir()
        (hf / "config.json").write_text(json.dumps({"model_type": "bert"}))
        (hf / weights).write_bytes(b"x")
        assert detect_format(hf) == "huggingface"


def test_detect_unknown_and_missing(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "weights.h5").write_text("x")
    with pytest.raises(CheckpointError) as info:
        detect_format(odd)
    msg = str(info.value)
    assert "weights.h5" in msg and "args.json" in msg and "scforge_format" in msg
    with pytest.raises(CheckpointError, match="does not exist"):
        detect_format(tmp_path / "nope")
    (odd / "model.pt").write_text("x")
    with pytest.raises(CheckpointError, match="args.json"):
        detect_format(odd / "model.pt")


def test_scgpt_ambiguous_and_missing_files(tmp_path):
    many = _scgpt_folder(tmp_path / "many", weights=("a.pt", "b.pt"))
    with pytest.raises(CheckpointError, match=r"a\.pt, b\.pt"):
        detect_format(many)
    with pytest.raises(CheckpointError, match=r"several \.pt files \(a\.pt, b\.pt\)"):
        scgpt_files(many)
    assert scgpt_files(many / "b.pt")[0] == many / "b.pt"

    sc = _scgpt_folder(tmp_path / "novocab")
    (sc / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match="missing vocab.json"):
        scgpt_files(sc)
    with pytest.raises(CheckpointError, match="no vocab.json"):
        detect_format(sc)
    (sc / "args.json").unlink()
    with pytest.raises(CheckpointError, match="missing args.json, vocab.json"):
        scgpt_files(sc)
