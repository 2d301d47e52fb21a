"""Checkpoints can never run code: every format scforge accepts, loaded through its entry point.

For each entry point a crafted file whose unpickling would create a marker file (``os.system``
``touch``, ``open``, ``eval``) must (a) raise scforge's error, (b) name the refused global and the
file, (c) leave no marker behind. Also: listed sha256 digests are checked *before* a file is
deserialised, and safetensors files carry tensors only. (Finer cases of each reader live in
test_hub.py, test_safe_pickle.py and the family checkpoint tests.)
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import scforge
from scforge.errors import CheckpointError, UnsafeFileError
from scforge.genes import GeneVocab
from scforge.hub import load_model_folder, sha256_file, verify_listed_checksums
from scforge.hub.checksums import read_listed_checksums

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol", "ignore:.*weights_only")

PANEL = [f"G{i}" for i in range(9)]


# ---- payloads: each creates ``marker`` when unpickled by an unsafe loader -------------------------
class _System:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _Open:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class _Eval:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (eval, (f"open({str(self.marker)!r}, 'w').close()",))


#: payload class -> the global a refusal must name
PAYLOADS = {
    "os.system": (_System, f"{os.system.__module__}.system"),  # posix.system (nt.system on Windows)
    "open": (_Open, f"{open.__module__}.open"),  # io.open: how pickle spells builtins.open
    "eval": (_Eval, "builtins.eval"),
}


@pytest.mark.parametrize("kind", PAYLOADS)
def test_payloads_are_live(tmp_path, kind):
    """Control: a plain unpickler really runs each payload, so the absent markers below mean something."""
    cls, _ = PAYLOADS[kind]
    marker = tmp_path / "marker"
    f = pickle.loads(pickle.dumps(cls(marker)))
    if hasattr(f, "close"):
        f.close()
    assert marker.exists()


# ---- tiny, valid models of each family (built once) -----------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from scforge.models.geneformer import GeneformerConfig
    from scforge.models.geneformer.api import Geneformer
    from scforge.models.scbert import ScBERT
    from scforge.models.scgpt import ScGPT

    root = tmp_path_factory.mktemp("models")
    vocab = GeneVocab.from_gene_list([f"G{i}" for i in range(20)], specials=["<pad>", "<cls>", "<eoc>"])
    scgpt = ScGPT.new(vocab, d_model=8, n_heads=2, d_hid=16, n_layers=1)
    scgpt.save_published(root / "scgpt")
    scgpt.save(root / "scforge")
    cfg = GeneformerConfig.v1_10m(vocab_size=25_426, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=32)
    Geneformer.new(cfg, seed=0).save_published(root / "geneformer", safe_serialization=False)
    gene2vec = np.random.default_rng(0).normal(size=(len(PANEL), 8)).astype(np.float32)
    scbert = ScBERT.new(PANEL, gene2vec=gene2vec, dim=8, depth=1, heads=2, dim_head=4, nb_features=6)
    (root / "scbert").mkdir()
    scbert.save_published(root / "scbert" / "model.pth")
    return {"scgpt": root / "scgpt", "scforge": root / "scforge", "geneformer": root / "geneformer",
            "scbert": root / "scbert" / "model.pth"}


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
    else:
        dst.mkdir()
        shutil.copy(src, dst / src.name)
        dst = dst / src.name
    return dst


def _evil_state(payload) -> dict:
    return {"encoder.embedding.weight": torch.zeros(2, 2), "evil": payload}


# ---- every entry point: (build the crafted file, load it) -> (error type, file named) --------------
def _scgpt(tmp, models, payload, writer):
    folder = _copy(models["scgpt"], tmp / "scgpt")
    writer(_evil_state(payload), folder / "best_model.pt")
    return (lambda: scforge.load(folder)), folder / "best_model.pt"


def _torch_zip(obj, path):
    torch.save(obj, path)


def _torch_legacy(obj, path):
    torch.save(obj, path, _use_new_zipfile_serialization=False)


def _raw_pickle(obj, path):
    path.write_bytes(pickle.dumps(obj, protocol=2))


def case_scgpt_best_model_pt(tmp, models, payload):
    return _scgpt(tmp, models, payload, _torch_zip)


def case_scgpt_legacy_torch_format(tmp, models, payload):
    return _scgpt(tmp, models, payload, _torch_legacy)


def case_scgpt_raw_pickle_pt(tmp, models, payload):
    return _scgpt(tmp, models, payload, _raw_pickle)


def case_geneformer_pytorch_model_bin(tmp, models, payload):
    folder = _copy(models["geneformer"], tmp / "gf")
    torch.save({"bert.embeddings.word_embeddings.weight": torch.zeros(2, 2), "evil": payload},
               folder / "pytorch_model.bin")
    return (lambda: scforge.load(folder)), folder / "pytorch_model.bin"


def case_geneformer_token_dictionary(tmp, models, payload):
    folder = _copy(models["geneformer"], tmp / "gf")
    token_dict = tmp / "token_dictionary.pkl"
    token_dict.write_bytes(pickle.dumps({"<pad>": 0, "<mask>": 1, "ENSG00000000003": payload}))
    return (lambda: scforge.load(folder, dictionaries=token_dict)), token_dict


def case_scbert_pth(tmp, models, payload):
    path = tmp / "evil.pth"
    torch.save({"epoch": 1, "model_state_dict": {"token_emb.weight": torch.zeros(7, 8)}, "losses": payload}, path)
    return (lambda: scforge.load(path, gene_panel=PANEL)), path


def case_scbert_label_dict(tmp, models, payload):
    path = tmp / "label_dict"
    path.write_bytes(pickle.dumps(np.array(["B", payload], dtype=object)))
    return (lambda: scforge.load(models["scbert"], gene_panel=PANEL, label_dict=path)), path


def case_scbert_gene2vec_npy(tmp, models, payload):
    path = tmp / "gene2vec.npy"
    np.save(path, np.array([[payload]], dtype=object), allow_pickle=True)
    return (lambda: scforge.load(models["scbert"], gene_panel=PANEL, gene2vec=path)), path


def case_annotator_probe_npz(tmp, models, payload):
    from scforge.tasks.annotate import Annotator

    folder = _copy(models["scforge"], tmp / "annotator")
    meta = {"scforge_annotator": 1, "mode": "linear_probe", "label_key": "cell_type", "classes": ["a", "b", "c"],
            "settings": {}}
    (folder / "annotator.json").write_text(json.dumps(meta))
    np.savez(folder / "probe.npz", coef=np.zeros((3, 8)), intercept=np.array([payload, 0, 0], dtype=object))
    return (lambda: Annotator.load(folder)), folder / "probe.npz"


def case_lightning_ckpt(tmp, models, payload):
    from scforge.train.engine import AtomicCheckpointIO

    path = tmp / "last.ckpt"
    torch.save({"epoch": 1, "global_step": 10, "state_dict": {"model.w": torch.zeros(1)},
                "callbacks": {"ModelCheckpoint": payload}}, path)
    return (lambda: AtomicCheckpointIO().load_checkpoint(path)), path  # what fit(resume_from=...) uses


def case_data_pickle(tmp, models, payload):
    from scforge.safe_pickle import safe_load_pickle

    path = tmp / "dictionary.pkl"
    path.write_bytes(pickle.dumps({"genes": [payload]}))
    return (lambda: safe_load_pickle(path)), path


CASES: dict[str, Callable] = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}


@pytest.mark.parametrize("kind", PAYLOADS)
@pytest.mark.parametrize("case", CASES)
def test_malicious_file_is_refused_and_nothing_runs(tmp_path, models, case, kind):
    cls, refused_global = PAYLOADS[kind]
    marker = tmp_path / "MARKER"
    load, path = CASES[case](tmp_path, models, cls(marker))
    with pytest.raises(UnsafeFileError) as info:
        load()
    message = str(info.value)
    assert refused_global in message, message  # (b) what was refused
    assert str(path) in message, message  # (b) where
    assert "refus" in message.lower(), message
    assert not marker.exists()  # (c) nothing ran


def test_bench_cache_never_unpickles(tmp_path):
    from scforge.bench.cache import ArrayCache

    marker = tmp_path / "MARKER"
    cache = ArrayCache(tmp_path / "cache")
    cache.root.mkdir()
    np.save(cache.path("emb"), np.array([_System(marker)], dtype=object), allow_pickle=True)
    assert cache.get("emb") is None  # a damaged entry: recomputed, never unpickled
    assert not marker.exists()


# ---- sha256 listings: checked before deserialising --------------------------------------------------
def _sums(folder: Path, digests: dict[str, str]) -> None:
    (folder / "SHA256SUMS").write_text("".join(f"{d}  {n}\n" for n, d in digests.items()))


def _make(tmp: Path, models, family: str) -> tuple[Path, Path, Callable]:
    """(folder holding the listing, weights file, load) for one published format."""
    if family == "scgpt":
        folder = _copy(models["scgpt"], tmp / "scgpt")
        return folder, folder / "best_model.pt", lambda: scforge.load(folder)
    if family == "geneformer":
        folder = _copy(models["geneformer"], tmp / "gf")
        return folder, folder / "pytorch_model.bin", lambda: scforge.load(folder)
    weights = _copy(models["scbert"], tmp / "sb")
    return weights.parent, weights, lambda: scforge.load(weights, gene_panel=PANEL)


FAMILIES = ["scgpt", "geneformer", "scbert"]


@pytest.mark.parametrize("family", FAMILIES)
def test_matching_sha256sums_loads(tmp_path, models, family):
    folder, weights, load = _make(tmp_path, models, family)
    _sums(folder, {weights.name: sha256_file(weights)})
    assert load().module is not None
    assert verify_listed_checksums(folder, [weights.name]) == {weights.name: sha256_file(weights)}


@pytest.mark.parametrize("family", FAMILIES)
def test_sha256_mismatch_is_refused_before_the_file_is_unpickled(tmp_path, models, family):
    folder, weights, load = _make(tmp_path, models, family)
    expected = sha256_file(weights)
    _sums(folder, {weights.name: expected})
    marker = tmp_path / "MARKER"
    torch.save({"evil": _System(marker)}, weights)  # replaced by a malicious file after the listing
    with pytest.raises(CheckpointError) as info:  # the checksum, not the unpickler, stops it
        load()
    message = str(info.value)
    actual = sha256_file(weights)
    assert str(weights) in message and expected[:12] in message and actual[:12] in message
    assert "SHA256SUMS" in message and "Re-download" in message
    assert not marker.exists()


def test_other_files_of_the_folder_are_checked_too(tmp_path, models):
    folder, _, load = _make(tmp_path, models, "scgpt")
    _sums(folder, {"args.json": "0" * 64, "tokenizer.json": "1" * 64})  # a listed file scforge does not read
    with pytest.raises(CheckpointError, match=r"args\.json.*000000000000"):
        load()


def test_model_card_sha256_lines(tmp_path, models):
    folder, weights, load = _make(tmp_path, models, "geneformer")
    digest = sha256_file(weights)
    (folder / "README.md").write_text(f"# A model\n\n| file | sha256 |\n\n- `pytorch_model.bin`\n  sha256: {digest}\n")
    assert load().module is not None
    (folder / "README.md").write_text(f"Weights: pytorch_model.bin (sha256: {'ab' * 32})\n")
    with pytest.raises(CheckpointError, match=r"README\.md.*expected abababababab"):
        load()


def test_listing_formats(tmp_path):
    (tmp_path / "w.bin").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "v.json").write_text("{}")
    a, b, c = "a" * 64, "B" * 64, "c" * 64
    (tmp_path / "SHA256SUMS").write_text(f"# comment\n\n{a} *./w.bin\nSHA256 (sub/v.json) = {b}\nnot a line\n")
    (tmp_path / "card.md").write_text(f"- `w.bin` sha256: {c}\n- sha256 of nothing here: {a}\n")
    listed = {(e.name, e.sha256, e.source.name) for e in read_listed_checksums(tmp_path)}
    assert listed == {("w.bin", a, "SHA256SUMS"), ("sub/v.json", b.lower(), "SHA256SUMS"), ("w.bin", c, "card.md")}
    assert verify_listed_checksums(tmp_path / "nope") == {} and read_listed_checksums(tmp_path / "nope") == []


def test_listed_but_missing_file(tmp_path, models):
    folder, weights, _ = _make(tmp_path, models, "scgpt")
    _sums(folder, {"best_model.pt": sha256_file(weights)})
    weights.unlink()
    with pytest.raises(CheckpointError, match="lists best_model.pt"):
        verify_listed_checksums(folder, ["best_model.pt"])
    assert verify_listed_checksums(folder) == {}  # checking "whatever is listed" skips absent files


# ---- scforge's own folders: config.json and card.md carry the weights' sha256 ----------------------
def test_scforge_card_lists_the_weights_sha256(tmp_path, models):
    folder = _copy(models["scforge"], tmp_path / "m")
    digest = json.loads((folder / "config.json").read_text())["sha256"]["model.safetensors"]
    card = (folder / "card.md").read_text()
    assert f"`model.safetensors` sha256: {digest}" in card
    loaded = load_model_folder(folder)
    assert digest not in loaded.card and loaded.card.startswith("# scGPT model")  # the card as written
    (folder / "card.md").write_text(card.replace(digest, "f" * 64))  # card and weights disagree
    with pytest.raises(CheckpointError, match=r"card\.md.*ffffffffffff"):
        load_model_folder(folder)


def test_scforge_folder_honours_sha256sums(tmp_path, models):
    folder = _copy(models["scforge"], tmp_path / "m")
    _sums(folder, {"vocab.json": "0" * 64})
    with pytest.raises(CheckpointError, match=r"vocab\.json"):
        scforge.load(folder)


# ---- safetensors: no code, whatever the header says -----------------------------------------------
def _pickle_b64(marker: Path) -> str:
    return base64.b64encode(pickle.dumps(_System(marker))).decode()


def test_safetensors_metadata_is_never_executed(tmp_path, models):
    from safetensors.torch import save_file

    marker = tmp_path / "MARKER"
    folder = _copy(models["geneformer"], tmp_path / "gf")
    state = scforge.load(folder).module.state_dict()
    from scforge.models.geneformer.checkpoint import read_hf_weights, to_hf_state_dict

    hf = {k: v.clone().contiguous() for k, v in to_hf_state_dict(state).items()}
    metadata = {"format": "pt", "__reduce__": _pickle_b64(marker), "pickle": pickle.dumps(_System(marker)).decode(
        "latin-1"), "code": f"__import__('os').system('touch {marker}')", "scforge_key_order": '["evil"]'}
    (folder / "pytorch_model.bin").unlink()
    save_file(hf, str(folder / "model.safetensors"), metadata=metadata)
    raw, path = read_hf_weights(folder)
    assert path.name == "model.safetensors" and set(raw) == set(hf)
    assert all(type(v) is torch.Tensor for v in raw.values())
    assert scforge.load(folder).module is not None
    # the same header in scforge's own folder (its key-order entry is JSON, parsed and ignored when off)
    own = _copy(models["scforge"], tmp_path / "own")
    tensors = load_model_folder(own).state_dict
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(own / "model.safetensors"), metadata=metadata)
    cfg = json.loads((own / "config.json").read_text())
    cfg["sha256"]["model.safetensors"] = sha256_file(own / "model.safetensors")
    (own / "config.json").write_text(json.dumps(cfg))
    (own / "card.md").write_text("# card\n")
    loaded = load_model_folder(own)
    assert set(loaded.state_dict) == set(tensors) and all(type(v) is torch.Tensor for v in loaded.state_dict.values())
    assert not marker.exists()


def test_a_pickle_named_safetensors_is_not_unpickled(tmp_path, models):
    marker = tmp_path / "MARKER"
    folder = _copy(models["geneformer"], tmp_path / "gf")
    (folder / "pytorch_model.bin").unlink()
    (folder / "model.safetensors").write_bytes(pickle.dumps({"evil": _System(marker)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*re-download"):
        scforge.load(folder)
    assert not marker.exists()
