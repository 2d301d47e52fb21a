"""The no-pretraining ablation: same architecture, fresh seeded weights, original untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError
from scforge.genes.builtin import builtin_vocab
from scforge.models.ablation import embedding_prefixes, untrained_copy
from scforge.models.geneformer import Geneformer, GeneformerConfig
from scforge.models.scbert import ScBERT
from scforge.models.scgpt import ScGPT


def _scgpt() -> ScGPT:
    torch.manual_seed(0)
    m = ScGPT.new(builtin_vocab("scgpt-human"), d_model=32, n_layers=1, n_heads=4, d_hid=48, max_seq_len=64)
    with torch.no_grad():  # "pretrained": move every weight away from its initialisation
        for p in m.module.parameters():
            p.add_(0.5)
    m.source = "pretrained.pt"
    return m


def _geneformer() -> Geneformer:
    cfg = GeneformerConfig(vocab_size=25426, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                           intermediate_size=64, max_position_embeddings=64)
    return Geneformer.new(cfg, "geneformer-v1", seed=0)


def _scbert() -> ScBERT:
    panel = [f"G{i}" for i in range(20)]
    g2v = np.random.default_rng(0).normal(size=(20, 16)).astype(np.float32)
    return ScBERT.new(panel, gene2vec=g2v, seed=0, dim=16, depth=1, heads=2, dim_head=8, nb_features=12)


def _sccello():
    from scforge.models.sccello import ScCello

    return ScCello.new(["CL:0000236", "CL:0000576"], seed=0, num_hidden_layers=1, hidden_size=32,
                       num_attention_heads=2, intermediate_size=64, max_position_embeddings=64, num_labels=2)


def _params(m) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.module.state_dict().items()}


@pytest.mark.parametrize("make", [_scgpt, _geneformer, _scbert, _sccello], ids=["scgpt", "geneformer", "scbert", "sccello"])
def test_untrained_copy_is_fresh_seeded_and_leaves_the_original(make):
    model = make()
    with torch.no_grad():  # "pretrained": move every trained weight away from its initialisation
        for p in model.module.parameters():
            if p.requires_grad:
                p.add_(0.25)
    before = _params(model)
    a, b, c = untrained_copy(model, seed=3), untrained_copy(model, seed=3), untrained_copy(model, seed=4)
    assert _params(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in _params(model).items())  # original untouched
    pa, pb, pc = _params(a), _params(b), _params(c)
    assert pa.keys() == before.keys() and all(pa[k].shape == before[k].shape for k in pa)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)  # same seed, same weights
    trainable = {n for n, p in model.module.named_parameters() if p.requires_grad}
    differ = [k for k in trainable if not torch.equal(pa[k], before[k]) and pa[k].numel() > 1]
    assert len(differ) >= 0.9 * len([k for k in trainable if before[k].numel() > 1])
    assert any(not torch.equal(pa[k], pc[k]) for k in trainable)  # another seed, other weights
    # frozen tables (scBERT gene2vec) are kept, as sc-foundation-eval's ablation keeps gene2vec
    for name, p in model.module.named_parameters():
        if not p.requires_grad:
            assert torch.equal(pa[name], before[name])
    assert "untrained copy" in (a.source or "")


def test_scgpt_untrained_copy_matches_a_new_model_with_the_same_seed():
    model = _scgpt()
    copy = untrained_copy(model, seed=5)
    torch.manual_seed(5)
    fresh = type(model.module)(model.module.config)
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in copy.module.state_dict().items())


def test_embedding_prefixes_name_the_input_tables():
    assert embedding_prefixes(_scgpt()) == ("encoder.", "value_encoder.")  # no flag_encoder in this model
    names = [n for n, _ in _scgpt().module.named_parameters()]
    # sc-foundation-eval: every name containing "encoder" but not "transformer_encoder"
    expected = {n for n in names if "encoder" in n and "transformer_encoder" not in n}
    assert {n for n in names if n.startswith(embedding_prefixes(_scgpt()))} == expected
    import scforge

    assert embedding_prefixes(scforge.load("default")) == ("encoder.", "value_encoder.", "flag_encoder.")
    assert embedding_prefixes(_geneformer()) == ("bert.embeddings.",)
    gf = [n for n, _ in _geneformer().module.named_parameters() if n.startswith("bert.embeddings.")]
    assert any("word_embeddings" in n for n in gf)
    assert embedding_prefixes(_sccello()) == ("bert.embeddings.",)


def test_untrained_copy_refuses_other_objects():
    with pytest.raises(ConfigError, match="scforge model"):
        untrained_copy(object())
