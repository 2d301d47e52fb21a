"""Published scGPT checkpoints: the three attention layouts at whole-human shapes, errors, round trips."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import scforge
from scgpt_helpers import VOCAB, close, real_tokens, reference_model
from scforge.errors import CheckpointError, UnsafeFileError
from scforge.models.scgpt import ScGPT, to_published_keys, to_scforge_keys

WHOLE_HUMAN_ARGS = {"embsize": 512, "nheads": 8, "d_hid": 512, "nlayers": 12, "n_layers_cls": 3, "dropout": 0.2,
                    "pad_token": "<pad>", "pad_value": -2, "mask_value": -1, "n_bins": 51,
                    "input_emb_style": "continuous", "max_seq_len": 1200, "MVC": True}
TINY_ARGS = dict(WHOLE_HUMAN_ARGS, embsize=32, nheads=4, d_hid=48, nlayers=2)


def write_folder(path, state, args, vocab=VOCAB):
    path.mkdir(parents=True, exist_ok=True)
    torch.save(state, path / "best_model.pt")
    (path / "args.json").write_text(json.dumps(args))
    vocab.to_scgpt_json(path / "vocab.json")
    return path


def published_state(ref, layout):
    """The reference model's state dict as each published layout names it."""
    return to_published_keys(to_scforge_keys(ref.state_dict()), layout)


@pytest.fixture(scope="module")
def whole_human_reference():
    torch.manual_seed(0)
    return reference_model(d_model=512, nhead=8, d_hid=512, nlayers=12, do_mvc=True)


@pytest.mark.parametrize("layout", ["flash", "torch", "wrapped"])
def test_whole_human_shapes_load_and_match_reference(tmp_path, ifnb_small, whole_human_reference, layout):
    ref = whole_human_reference
    state = published_state(ref, layout)
    assert ("transformer_encoder.layers.0.self_attn.Wqkv.weight" in state) == (layout == "flash")
    assert ("transformer_encoder.layers.0.self_attn.in_proj_weight" in state) == (layout == "torch")
    assert ("transformer_encoder.layers.0.self_attn._impl.Wqkv.weight" in state) == (layout == "wrapped")
    folder = write_folder(tmp_path / layout, state, WHOLE_HUMAN_ARGS)
    model = scforge.load(folder)
    assert isinstance(model, ScGPT) and model.report.layout == layout
    assert model.config.n_layers == 12 and model.config.d_model == 512 and model.config.vocab_size == 60697
    assert not model.report.mismatched and not model.report.unexpected
    assert all(k.startswith("cls_decoder.") for k in model.report.initialized)  # the file has no classifier
    _, batch = real_tokens(ifnb_small, n_cells=4, max_len=300)
    with torch.no_grad():
        a = ref(batch["genes"], batch["values"], batch["padding_mask"], MVC=True)
        b = model.module(batch["genes"], batch["values"], batch["padding_mask"], MVC=True)
    keep = ~batch["padding_mask"]
    assert close(a["cell_emb"], b["cell_emb"])
    assert close(a["mlm_output"][keep], b["mlm_output"][keep])
    assert close(a["mvc_output"][keep], b["mvc_output"][keep])


def test_classifier_logits_match_and_new_heads_are_listed(tmp_path, ifnb_small):
    torch.manual_seed(1)
    ref = reference_model(n_cls=4, do_mvc=True)
    folder = write_folder(tmp_path / "cls", published_state(ref, "flash"), TINY_ARGS)
    model = scforge.load(folder)
    assert model.config.n_cls == 4 and not model.report.initialized
    _, batch = real_tokens(ifnb_small, n_cells=5)
    with torch.no_grad():
        a = ref(batch["genes"], batch["values"], batch["padding_mask"], CLS=True)
        b = model.module(batch["genes"], batch["values"], batch["padding_mask"], CLS=True)
    assert close(a["cls_output"], b["cls_output"])
    # asking for another number of classes re-initialises the classifier's last layer, and says so
    other = scforge.load(folder, n_cls=7)
    assert [k for k, _, _ in other.report.mismatched] == ["cls_decoder.out_layer.weight", "cls_decoder.out_layer.bias"]
    assert "re-initialised" in other.report.summary()
    with pytest.raises(CheckpointError, match="heads do not match"):
        ScGPT.from_published(folder, n_cls=7, strict_heads=True)


def test_missing_or_misshaped_backbone_is_an_error(tmp_path):
    torch.manual_seed(2)
    state = published_state(reference_model(do_mvc=True), "flash")
    missing = dict(state)
    del missing["transformer_encoder.layers.1.linear2.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1 backbone tensors .*layers\.1\.linear2\.weight"):
        scforge.load(write_folder(tmp_path / "missing", missing, TINY_ARGS))
    wrong_args = dict(TINY_ARGS, d_hid=64)
    with pytest.raises(CheckpointError, match=r"mis-shaped: .*linear1\.weight file \(48, 32\) vs model \(64, 32\)"):
        scforge.load(write_folder(tmp_path / "shape", state, wrong_args))
    small_vocab = dict(state)
    small_vocab["encoder.embedding.weight"] = state["encoder.embedding.weight"][:100]
    with pytest.raises(CheckpointError, match="gene embeddings but"):
        scforge.load(write_folder(tmp_path / "vocab", small_vocab, TINY_ARGS))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_code_executing_and_truncated_checkpoints_are_refused(tmp_path):
    torch.manual_seed(3)
    state = published_state(reference_model(), "flash")
    marker = tmp_path / "pwned"
    evil = dict(state)
    evil["payload"] = _RunsCode(marker)
    folder = write_folder(tmp_path / "evil", evil, TINY_ARGS)
    with pytest.raises(UnsafeFileError):
        scforge.load(folder)
    assert not marker.exists()
    (folder / "best_model.pt").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(UnsafeFileError):
        scforge.load(folder)
    assert not marker.exists()
    good = write_folder(tmp_path / "trunc", state, TINY_ARGS)
    data = (good / "best_model.pt").read_bytes()
    (good / "best_model.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="(?i)truncated|corrupt"):
        scforge.load(good)


@pytest.mark.parametrize("layout", ["flash", "torch", "wrapped"])
def test_published_to_scforge_to_published_keeps_tensors(tmp_path, layout):
    torch.manual_seed(4)
    state = published_state(reference_model(do_mvc=True, explicit_zero_prob=True), layout)
    model = scforge.load(write_folder(tmp_path / "in", state, TINY_ARGS))
    ours = model.save(tmp_path / "ours")
    assert sorted(p.name for p in ours.iterdir()) == ["card.md", "config.json", "model.safetensors", "vocab.json"]
    again = scforge.load(ours)
    assert isinstance(again, ScGPT) and again.config == model.config
    out = again.save_published(tmp_path / "out", layout=layout)
    back = torch.load(out / "best_model.pt", weights_only=True)
    assert set(back) >= set(state)
    for key, tensor in state.items():
        assert torch.equal(back[key], tensor), key
    assert json.loads((out / "args.json").read_text())["embsize"] == 32
    assert again.vocab.to_dict() == VOCAB.to_dict()
