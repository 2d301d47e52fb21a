"""Loading published Geneformer folders: formats, classifier checkpoints, errors, unsafe pickles, vocabulary."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from scforge.errors import CheckpointError, UnsafeFileError, VocabularyError
from scforge.models.geneformer import GeneformerConfig, GeneformerForSequenceClassification
from scforge.models.geneformer.api import Geneformer
from scforge.models.geneformer.checkpoint import from_hf_state_dict, load_hf_folder, to_hf_state_dict

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64)


def hf_folder(tmp_path, cls_name="BertForMaskedLM", vocab_size=25_426, **extra):
    config = GeneformerConfig.v1_10m(vocab_size=vocab_size, **TINY)
    hf_config = transformers.BertConfig(**config.to_hf_dict(), **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(hf_config).eval()
    folder = tmp_path / cls_name
    model.save_pretrained(folder)
    return model, folder


def write_bin(folder, state):
    (folder / "model.safetensors").unlink(missing_ok=True)
    torch.save(state, folder / "pytorch_model.bin")


def test_key_mapping_round_trip():
    config = GeneformerConfig.v1_10m(**TINY)
    hf = transformers.BertForMaskedLM(transformers.BertConfig(**config.to_hf_dict()))
    state = {k: v for k, v in hf.state_dict().items()}
    ours, skipped = from_hf_state_dict(state)
    assert "bert.encoder.layers.1.self_attn.Wqkv.weight" in ours
    assert ours["bert.encoder.layers.1.self_attn.Wqkv.weight"].shape == (96, 32)
    assert set(skipped) <= {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
    back = to_hf_state_dict(ours, include_tied=True)
    assert set(back) == set(state)
    for key, value in state.items():
        assert torch.equal(back[key], value), key


def test_sequence_classification_checkpoint(tmp_path):
    hf, folder = hf_folder(tmp_path, "BertForSequenceClassification", num_labels=3)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.05)
    hf.save_pretrained(folder)
    model = Geneformer.from_published(folder)
    assert isinstance(model.module, GeneformerForSequenceClassification)
    assert model.config.num_labels == 3 and not model.report.initialized and not model.report.unexpected
    ids = torch.randint(2, 25_426, (3, 20))
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        ours = model.module(ids, mask)
        lengths = mask.sum(1)
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        packed = model.module(ids[mask.bool()], cu_seqlens=cu)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed, ref, atol=1e-5, rtol=0)


def test_missing_and_misshaped_backbone_keys_are_named(tmp_path):
    hf, folder = hf_folder(tmp_path)
    state = dict(hf.state_dict())
    del state["bert.encoder.layer.1.output.dense.weight"]
    write_bin(folder, state)
    with pytest.raises(CheckpointError, match=r"bert\.encoder\.layers\.1\.linear2\.weight"):
        load_hf_folder(folder)
    state = dict(hf.state_dict())
    state["bert.embeddings.position_embeddings.weight"] = torch.zeros(32, 32)
    write_bin(folder, state)
    with pytest.raises(CheckpointError, match=r"position_embeddings\.weight file \(32, 32\) vs model \(64, 32\)"):
        load_hf_folder(folder)
    state = dict(hf.state_dict())
    del state["bert.encoder.layer.0.attention.self.key.bias"]
    write_bin(folder, state)
    with pytest.raises(CheckpointError, match=r"attention\.self\.key\.bias"):
        load_hf_folder(folder)


def test_unused_keys_and_missing_head_are_reported(tmp_path):
    hf, folder = hf_folder(tmp_path)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("cls.predictions.transform.dense")}
    state["extra.thing"] = torch.zeros(2)
    write_bin(folder, state)
    _, report = load_hf_folder(folder)
    assert report.unexpected == ["extra.thing"]
    assert set(report.initialized) == {"mlm_head.dense.weight", "mlm_head.dense.bias"}
    assert "extra.thing" in report.summary()


def test_bare_bert_model_folder_loads(tmp_path):
    hf, folder = hf_folder(tmp_path, "BertModel")
    model, report = load_hf_folder(folder)
    ids = torch.randint(2, 25_426, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(model.eval().bert(ids), hf(input_ids=ids).last_hidden_state, atol=1e-5, rtol=0)
    assert "pooler.weight" in report.unexpected  # BertModel's pooler is not part of a masked-LM model


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    hf, folder = hf_folder(tmp_path)
    marker = tmp_path / "PWNED"
    state = dict(hf.state_dict())
    state["evil"] = _Payload(marker)
    (folder / "model.safetensors").unlink()
    with open(folder / "pytorch_model.bin", "wb") as f:  # a plain pickle, as an attacker would write it
        pickle.dump(state, f)
    with pytest.raises(UnsafeFileError):
        Geneformer.from_published(folder)
    assert not marker.exists()
    torch.save(state, folder / "pytorch_model.bin")  # the same payload inside torch's zip format
    with pytest.raises(UnsafeFileError):
        Geneformer.from_published(folder)
    assert not marker.exists()


def test_dictionaries_must_match_the_embeddings(tmp_path, shared_data):
    _, folder = hf_folder(tmp_path)
    model = Geneformer.from_published(folder)  # V1 size: built-in V1 dictionaries
    assert model.dictionaries.version == "V1" and len(model.vocab) == 25_426
    model = Geneformer.from_published(folder, shared_data / "genes" / "geneformer_v1")
    assert model.dictionaries.version == "V1"
    with pytest.raises(VocabularyError, match="20,275 tokens but the model has 25,426"):
        Geneformer.from_published(folder, shared_data / "genes" / "geneformer_v2_gc95M")
    _, odd = hf_folder(tmp_path / "odd", vocab_size=1000)
    with pytest.raises(VocabularyError, match="neither Geneformer V1"):
        Geneformer.from_published(odd)


def test_bad_config_is_a_checkpoint_error(tmp_path):
    _, folder = hf_folder(tmp_path)
    data = json.loads((folder / "config.json").read_text())
    data["position_embedding_type"] = "relative_key"
    (folder / "config.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="relative_key"):
        load_hf_folder(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="Cannot parse"):
        load_hf_folder(folder)


def test_scforge_folder_round_trip(tmp_path, ifnb_small):
    _, folder = hf_folder(tmp_path)
    model = Geneformer.from_published(folder)
    saved = model.save(tmp_path / "scforge")
    again = Geneformer.from_folder(saved)
    cells = ifnb_small[:20].copy()
    np.testing.assert_array_equal(again.tokenize(cells).gene_ids, model.tokenize(cells).gene_ids)
    np.testing.assert_allclose(again.embed(cells, key_added=None), model.embed(cells, key_added=None), atol=1e-6)
    with pytest.raises(CheckpointError):
        Geneformer.from_folder(tmp_path / "missing")
