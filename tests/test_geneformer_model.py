"""Geneformer equals transformers' BertForMaskedLM: same logits and every hidden state, padded and packed,
on real tokenized ifnb cells, after a round trip through HF folders (safetensors and pytorch_model.bin)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.errors import InputDataError
from scforge.models.geneformer import GeneformerConfig, GeneformerForMaskedLM
from scforge.models.geneformer.api import Geneformer
from scforge.models.geneformer.checkpoint import load_hf_folder

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=128)


def hf_model(config: GeneformerConfig, seed: int = 0):
    """A BertForMaskedLM with random (non-default) weights: LayerNorms and biases are random too."""
    torch.manual_seed(seed)
    model = transformers.BertForMaskedLM(transformers.BertConfig(**config.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0, 0.05)
    return model


def save_hf(model, folder, fmt: str):
    """A HF folder as published: safetensors (tied decoder absent) or an old-style .bin (tied keys and the
    position_ids buffer present)."""
    if fmt == "safetensors":
        model.save_pretrained(folder)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        model.config.save_pretrained(folder)
        state = dict(model.state_dict())
        state["bert.embeddings.position_ids"] = torch.arange(model.config.max_position_embeddings)[None]
        torch.save(state, folder / "pytorch_model.bin")
    return folder


@pytest.fixture(scope="module")
def v1_cells(ifnb_small):
    """Real V1 rank-value encodings of 8 ifnb cells with different lengths."""
    model = Geneformer.new(GeneformerConfig.v1_10m(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
                                                   intermediate_size=8))
    cells = model.tokenize(ifnb_small[:8].copy())
    assert len(set(cells.lengths.tolist())) > 4
    return cells


def compare(hf, ours, cells, max_len, full_logits=True):
    """Every hidden state and the logits agree within 1e-5 (fp32), padded and packed. ``full_logits=False``
    checks the logits at every 7th real position only (the [tokens, 25,426] tensor is large)."""
    seqs = [cells.cell(i)[0][:max_len].astype(np.int64) for i in range(cells.n_cells)]
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.from_numpy(s)
    mask = (torch.arange(width)[None] < lengths[:, None]).long()
    real = mask.bool()
    pick = torch.zeros_like(real)
    pick.view(-1)[::1 if full_logits else 7] = True
    pick &= real
    with torch.no_grad():
        ref_states = hf.bert(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        ref_logits = hf.cls(ref_states[-1][pick])
        if full_logits:  # the whole HF model, as users call it
            torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits[pick], ref_logits)
        logits = ours(ids, mask, token_index=pick)
        _, states = ours.bert(ids, mask, return_layers=True)
        packed_ids = ids[mask.bool()]
        cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        packed_logits = ours(packed_ids, cu_seqlens=cu, token_index=pick[real])
        _, packed_states = ours.bert(packed_ids, cu_seqlens=cu, return_layers=True)
    assert len(states) == len(ref_states) == ours.config.num_hidden_layers + 1
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(packed_logits, ref_logits, atol=1e-5, rtol=0)
    for layer, (a, b, c) in enumerate(zip(ref_states, states, packed_states)):
        torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=0, msg=f"hidden state {layer}")
        torch.testing.assert_close(c, a[real], atol=1e-5, rtol=0, msg=f"packed hidden state {layer}")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_tiny_parity_with_transformers(tmp_path, v1_cells, fmt):
    config = GeneformerConfig.v1_10m(**TINY)
    hf = hf_model(config)
    ours, report = load_hf_folder(save_hf(hf, tmp_path / fmt, fmt))
    assert not report.initialized and not report.unexpected
    compare(hf, ours.eval(), v1_cells, config.max_position_embeddings)


def test_v1_shape_parity_with_transformers(tmp_path, v1_cells):
    config = GeneformerConfig.v1_10m()
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.intermediate_size,
            config.max_position_embeddings, config.vocab_size) == (6, 256, 4, 512, 2048, 25_426)
    hf = hf_model(config, seed=1)
    ours, _ = load_hf_folder(save_hf(hf, tmp_path / "v1", "safetensors"))
    compare(hf, ours.eval(), v1_cells.select(np.arange(4)), 2048, full_logits=False)


def test_written_hf_folder_loads_in_transformers(tmp_path, v1_cells):
    """to_hf_state_dict / write_hf_folder: transformers reads what scforge writes, with equal outputs."""
    config = GeneformerConfig.v1_10m(**TINY)
    torch.manual_seed(3)
    ours = GeneformerForMaskedLM(config).eval()
    model = Geneformer(ours, Geneformer.new(config).dictionaries)
    for fmt, safe, weights in (("st", True, "model.safetensors"), ("bin", False, "pytorch_model.bin")):
        folder = model.save_published(tmp_path / fmt, safe_serialization=safe)
        assert (folder / weights).is_file() and (folder / "config.json").is_file()
        hf = transformers.BertForMaskedLM.from_pretrained(folder).eval()
        assert torch.equal(hf.bert.embeddings.word_embeddings.weight, ours.bert.embeddings.word_embeddings.weight)
        compare(hf, ours, v1_cells.select(np.arange(3)), config.max_position_embeddings)  # asserts within 1e-5


def test_hf_initialisation():
    config = GeneformerConfig.v1_10m(**TINY)
    torch.manual_seed(0)
    model = GeneformerForMaskedLM(config)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is emb  # tied
    assert torch.all(emb[config.pad_token_id] == 0)
    assert abs(float(emb[1:].detach().std()) - 0.02) < 0.002
    layer = model.bert.encoder.layers[0]
    assert torch.all(layer.self_attn.Wqkv.bias == 0) and torch.all(layer.norm1.weight == 1)
    assert torch.all(model.mlm_head.bias == 0)


def test_too_long_input_is_a_clear_error():
    model = GeneformerForMaskedLM(GeneformerConfig.v1_10m(**TINY)).eval()
    with pytest.raises(InputDataError, match="129 tokens but the model has 128 positions"):
        model(torch.ones(1, 129, dtype=torch.long))
    with pytest.raises(InputDataError, match="positions"):
        model(torch.ones(300, dtype=torch.long), cu_seqlens=torch.tensor([0, 300]))
