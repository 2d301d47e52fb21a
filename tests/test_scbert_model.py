"""scBERT's FAVOR+ attention and model against performer-pytorch (the reference implementation)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from scforge.errors import ConfigError
from scforge.models.scbert import FavorSelfAttention, ScBERTConfig, ScBERTModel, favor_attention
from scforge.models.scbert.checkpoint import infer_config, load_state_into, to_scforge_keys
from scforge.models.scbert.performer import gaussian_orthogonal_random_matrix
from scbert_helpers import (  # noqa: F401 - fixtures
    PANEL_SIZE,
    PublishedHead,
    ifnb_cells,
    ifnb_tokens,
    published_state,
    random_gene2vec,
    reference_lm,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from performer_pytorch.performer_pytorch import FastAttention


def _qkv(b=2, h=3, n=257, d=64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g) * scale for _ in range(3)]


@pytest.mark.parametrize("chunk", [None, 64, 1000])
@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_favor_attention_matches_reference_fast_attention(chunk, scale):
    q, k, v = _qkv(scale=scale)
    ref = FastAttention(64, nb_features=40)
    expected = ref(q, k, v)
    got = favor_attention(q, k, v, ref.projection_matrix, chunk_size=chunk)
    assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (got - expected).abs().max()


def test_key_padding_mask_gives_the_unpadded_result():
    q, k, v = _qkv(b=1, n=100)
    projection = gaussian_orthogonal_random_matrix(30, 64, generator=torch.Generator().manual_seed(1))
    alone = favor_attention(q[..., :70, :], k[..., :70, :], v[..., :70, :], projection)
    pad = torch.zeros(1, 100, dtype=torch.bool)
    pad[:, 70:] = True
    for chunk in (None, 32):
        padded = favor_attention(q, k, v, projection, key_padding_mask=pad, chunk_size=chunk)
        assert torch.allclose(padded[..., :70, :], alone, atol=1e-6)


def test_random_features_are_orthogonal_blocks_and_seeded():
    a = gaussian_orthogonal_random_matrix(266, 64, generator=torch.Generator().manual_seed(3))
    b = gaussian_orthogonal_random_matrix(266, 64, generator=torch.Generator().manual_seed(3))
    assert a.shape == (266, 64) and torch.equal(a, b)
    block = a[:64] / a[:64].norm(dim=1, keepdim=True)  # rows of one block: orthogonal directions
    assert torch.allclose(block @ block.T, torch.eye(64), atol=1e-5)
    norms = a.norm(dim=1)  # chi(64)-distributed row norms, mean ~ 8
    assert 7.0 < float(norms.mean()) < 9.0


def test_attention_rejects_packed_input():
    attn = FavorSelfAttention(16, 2, 8, 10)
    with pytest.raises(ConfigError, match="packed"):
        attn(torch.randn(10, 16), cu_seqlens=torch.tensor([0, 10]))


def test_bf16_autocast_stays_close_to_fp32():
    torch.manual_seed(0)
    model = ScBERTModel(ScBERTConfig(dim=32, depth=2, heads=2, nb_features=24, max_seq_len=300,
                                     g2v_position_emb=False)).eval()
    tokens = torch.randint(0, 6, (2, 300))
    with torch.no_grad():
        full = model.encode(tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model.encode(tokens)
    assert half.dtype == torch.float32 and torch.isfinite(half).all()  # final LayerNorm runs in fp32
    assert (half - full).abs().max() < 0.1


def test_config_defaults_are_the_published_model():
    c = ScBERTConfig()
    assert (c.num_tokens, c.dim, c.depth, c.heads, c.dim_head, c.nb_features, c.ff_mult, c.max_seq_len) == (
        7, 200, 6, 10, 64, 266, 4, 16907)
    assert c.mask_token_id == 6 and c.max_bin == 5 and c.panel_size == 16906
    with pytest.raises(ConfigError, match="n_classes"):
        ScBERTConfig(n_classes=0)


def _load_reference(ref, **overrides) -> ScBERTModel:
    state = to_scforge_keys(published_state(ref))
    model = ScBERTModel(infer_config(state, **overrides))
    load_state_into(model, state, source="reference")
    return model.eval()


@pytest.mark.shared_data
@pytest.mark.parametrize("chunk", [None, 128])
def test_logits_match_performer_lm_on_real_cells(ifnb_tokens, chunk):  # noqa: F811
    g2v = random_gene2vec(PANEL_SIZE, 32)
    ref = reference_lm(gene2vec=g2v)
    model = _load_reference(ref, attention_chunk=chunk)
    assert {0, 3, 4, 5} <= set(np.unique(ifnb_tokens).tolist())  # zeros and several expression bins
    # 16 real cells, plus 2 rows of random tokens so every id (bins 1, 2 and <mask> too) is exercised
    noise = torch.randint(0, 7, (2, PANEL_SIZE + 1), generator=torch.Generator().manual_seed(0))
    x = torch.cat([torch.from_numpy(ifnb_tokens[:16]), noise])
    with torch.no_grad():
        expected, got = ref(x), model(x)
    assert got.shape == (18, PANEL_SIZE + 1, 7)
    assert (got - expected).abs().max() < 1e-5


@pytest.mark.shared_data
def test_classifier_logits_match_the_published_head(ifnb_tokens):  # noqa: F811
    g2v = random_gene2vec(PANEL_SIZE, 32, seed=2)
    ref = reference_lm(gene2vec=g2v, dim_head=16, nb_features=12)
    torch.manual_seed(5)
    ref.to_out = PublishedHead(32, PANEL_SIZE + 1, n_classes=4).eval()
    model = _load_reference(ref)
    assert model.has_classifier and model.config.n_classes == 4 and model.config.dim_head == 16
    x = torch.from_numpy(ifnb_tokens[:8])
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-5


def test_inference_never_redraws_features():
    torch.manual_seed(0)
    model = ScBERTModel(ScBERTConfig(dim=16, depth=1, heads=2, dim_head=8, nb_features=10, max_seq_len=50,
                                     g2v_position_emb=False, feature_redraw_interval=1))
    before = model.performer.layers[0].self_attn.projection_matrix.clone()
    model.train()
    for _ in range(3):
        model(torch.randint(0, 7, (1, 50)))
    assert torch.equal(model.performer.layers[0].self_attn.projection_matrix, before)
    model.redraw_projections(torch.Generator().manual_seed(1))
    assert not torch.equal(model.performer.layers[0].self_attn.projection_matrix, before)


def test_classifier_needs_every_position():
    model = ScBERTModel(ScBERTConfig(dim=16, depth=1, heads=2, dim_head=8, nb_features=10, max_seq_len=50,
                                     g2v_position_emb=False, n_classes=3))
    with pytest.raises(ConfigError, match="all 50 positions"):
        model(torch.zeros(1, 40, dtype=torch.long))
    with pytest.raises(ConfigError, match="51 positions"):
        model.encode(torch.zeros(1, 51, dtype=torch.long))


@pytest.mark.slow
def test_published_shape_matches_performer_lm():
    """dim 200, depth 6, heads 10 x 64, 266 features, 16,907 positions, as scBERT instantiates it."""
    g2v = random_gene2vec(16906, 200)
    ref = reference_lm(dim=200, depth=6, heads=10, dim_head=64, nb_features=None, seq_len=16907, gene2vec=g2v)
    model = _load_reference(ref)
    assert model.config == ScBERTConfig(projection_seed=0)
    x = torch.randint(0, 6, (1, 16907), generator=torch.Generator().manual_seed(0))
    x[:, torch.rand(16907, generator=torch.Generator().manual_seed(1)) < 0.9] = 0
    x[:, -1] = 0
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() < 1e-5
