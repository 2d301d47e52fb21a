"""Shared transformer core: layers equal torch's own, packed equals padded, precision helpers."""

from __future__ import annotations

import pytest
import torch

from scforge.errors import ConfigError
from scforge.nn import (
    EncoderLayer,
    TransformerEncoder,
    autocast,
    cu_seqlens_from_lengths,
    pack_padded,
    resolve_device,
    resolve_precision,
    unpack_to_padded,
    varlen_attention,
)


def _torch_keys(state):
    return {k.replace("in_proj_weight", "Wqkv.weight").replace("in_proj_bias", "Wqkv.bias"): v for k, v in state.items()}


def _batch(b=4, length=17, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, length, d, generator=g)
    pad = torch.zeros(b, length, dtype=torch.bool)
    for i, n in enumerate([length, 11, 3, 9][:b]):
        pad[i, n:] = True
    return x, pad


@pytest.mark.parametrize("activation,norm_first", [("relu", False), ("gelu", False), ("relu", True)])
def test_layer_equals_torch_transformer_layer(activation, norm_first):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 48, 0.0, activation=activation, batch_first=True,
                                           norm_first=norm_first).eval()
    ours = EncoderLayer(32, 4, 48, 0.0, activation=activation, norm="pre" if norm_first else "post").eval()
    ours.load_state_dict(_torch_keys(ref.state_dict()))
    x, pad = _batch()
    with torch.no_grad():
        a = ref(x, src_key_padding_mask=pad)
        b = ours(x, key_padding_mask=pad)
        packed, cu = pack_padded(x, pad)
        c = ours(packed, cu_seqlens=cu)
    assert torch.allclose(a[~pad], b[~pad], atol=1e-5)
    assert torch.allclose(b[~pad], c, atol=1e-5)


def test_scgpt_pre_norm_scheme_normalises_the_stream():
    layer = EncoderLayer(16, 2, 16, 0.0, norm="scgpt_pre").eval()
    x = torch.randn(2, 5, 16) * 10
    with torch.no_grad():
        out = layer(x)
        h = layer.norm1(x)
        h = h + layer.self_attn(h)
        h = layer.norm2(h)
        expected = h + layer.linear2(torch.relu(layer.linear1(h)))
    assert torch.allclose(out, expected, atol=1e-6)


def test_stack_packed_equals_padded_and_returns_layers():
    torch.manual_seed(1)
    enc = TransformerEncoder(lambda: EncoderLayer(32, 4, 64, 0.1), 3).eval()
    x, pad = _batch(seed=3)
    with torch.no_grad():
        full, layers = enc(x, key_padding_mask=pad, return_layers=True)
        packed, cu = pack_padded(x, pad)
        out = enc(packed, cu_seqlens=cu)
    assert len(layers) == 3 and torch.equal(layers[-1], full)
    assert torch.allclose(full[~pad], out, atol=1e-5)
    back = unpack_to_padded(out, cu)
    assert back.shape == (4, 17, 32) and torch.allclose(back[~pad], out)


def test_varlen_attention_matches_per_sequence_sdpa_and_skips_empty():
    torch.manual_seed(2)
    lengths = torch.tensor([5, 0, 7, 1])
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v = (torch.randn(int(lengths.sum()), 2, 8) for _ in range(3))
    out = varlen_attention(q, k, v, cu)
    lo, hi = int(cu[2]), int(cu[3])
    ref = torch.nn.functional.scaled_dot_product_attention(*(t[lo:hi].transpose(0, 1)[None] for t in (q, k, v)))
    assert torch.allclose(out[lo:hi], ref[0].transpose(0, 1), atol=1e-6)
    # a length-1 sequence attends only to itself: output = its own value vector
    assert torch.allclose(out[-1], v[-1], atol=1e-6)


def test_attention_mask_restricts_attention():
    layer = EncoderLayer(16, 2, 16, 0.0).eval()
    x = torch.randn(1, 4, 16)
    only_self = torch.eye(4, dtype=torch.bool)[None]
    with torch.no_grad():
        out = layer(x, attn_mask=only_self)
        # attending only to itself, each position is independent of the others
        x2 = x.clone()
        x2[0, 1:] = torch.randn(3, 16)
        out2 = layer(x2, attn_mask=only_self)
    assert torch.allclose(out[0, 0], out2[0, 0], atol=1e-6)


def test_precision_and_device_resolution():
    cpu = resolve_device("cpu")
    assert resolve_precision("fp32", cpu) == torch.float32
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu) in (torch.float32, torch.bfloat16)
    with pytest.raises(ConfigError, match="precision"):
        resolve_precision("fp8", cpu)
    with pytest.raises(ConfigError):
        resolve_device("not-a-device")
    layer = EncoderLayer(16, 2, 16, 0.0).eval()
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), autocast(cpu, torch.bfloat16):
        low = layer(x)
        assert layer.linear1(x).dtype == torch.bfloat16  # matmuls run in bf16 (LayerNorm outputs fp32)
    with torch.no_grad():
        full = layer(x)
    assert torch.allclose(low.float(), full, atol=0.1)


def test_varlen_long_and_short_paths_agree():
    torch.manual_seed(5)
    lengths = torch.tensor([300, 20, 280])  # longest > 256: one SDPA call per sequence
    cu = cu_seqlens_from_lengths(lengths)
    q, k, v = (torch.randn(int(lengths.sum()), 2, 8) for _ in range(3))
    with torch.inference_mode():
        looped = varlen_attention(q, k, v, cu)
        import scforge.nn.attention as attention

        old = attention._CPU_PADDED_MAX_LEN
        attention._CPU_PADDED_MAX_LEN = 10_000  # force the padded path
        try:
            padded = varlen_attention(q, k, v, cu)
        finally:
            attention._CPU_PADDED_MAX_LEN = old
    assert torch.allclose(looped, padded, atol=1e-5)


def test_varlen_gradients_match_between_paths():
    import scforge.nn.attention as attention

    torch.manual_seed(6)
    lengths = torch.tensor([300, 40, 270])
    cu = cu_seqlens_from_lengths(lengths)
    base = [torch.randn(int(lengths.sum()), 2, 8) for _ in range(3)]
    grads = []
    for limit in (attention._CPU_PADDED_MAX_LEN, 10_000):  # per-sequence, then forced padded
        old = attention._CPU_PADDED_MAX_LEN
        attention._CPU_PADDED_MAX_LEN = limit
        try:
            q, k, v = (t.clone().requires_grad_() for t in base)
            varlen_attention(q, k, v, cu).square().sum().backward()
        finally:
            attention._CPU_PADDED_MAX_LEN = old
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-4)
