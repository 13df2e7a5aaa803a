"""Multi-head self-attention (GQA, RoPE, KV cache, kernels) against a torch-SDPA reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kiln.model import (
    ATTENTION_IMPLS,
    KVCache,
    MultiHeadSelfAttention,
    RotaryEmbedding,
    kiln_attention,
    sdpa_attention,
)


def _reference_mhsa(attn: MultiHeadSelfAttention, x, rope=None):
    """Plain MHSA written with F.linear, repeated K/V heads and torch's causal SDPA."""
    B, T, _ = x.shape
    H, Hkv, D = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = F.linear(x, attn.q_proj.weight).view(B, T, H, D).transpose(1, 2)
    k = F.linear(x, attn.k_proj.weight).view(B, T, Hkv, D).transpose(1, 2)
    v = F.linear(x, attn.v_proj.weight).view(B, T, Hkv, D).transpose(1, 2)
    if rope is not None:
        pos = torch.arange(T)
        q, k = rope(q, pos), rope(k, pos)
    k = k.repeat_interleave(H // Hkv, dim=1)  # query head h reads kv head h // G
    v = v.repeat_interleave(H // Hkv, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.linear(out.transpose(1, 2).reshape(B, T, H * D), attn.o_proj.weight)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
@pytest.mark.parametrize("use_rope", [False, True])
def test_mhsa_matches_reference_values_and_grads(num_kv_heads, use_rope):
    torch.manual_seed(0)
    rope = RotaryEmbedding(10000.0, 8, 32) if use_rope else None
    attn = MultiHeadSelfAttention(32, 4, rope=rope, num_kv_heads=num_kv_heads).double()
    assert attn.k_proj.weight.shape == (num_kv_heads * 8, 32)
    x = torch.randn(2, 11, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    dout = torch.randn(out.shape, dtype=torch.float64)
    (out * dout).sum().backward()
    grads = [x.grad] + [p.grad for p in attn.parameters()]
    x2 = x.detach().clone().requires_grad_(True)
    attn.zero_grad()
    ref = _reference_mhsa(attn, x2, rope)
    (ref * dout).sum().backward()
    rgrads = [x2.grad] + [p.grad for p in attn.parameters()]
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("q_offset,T", [(0, 6), (5, 1), (3, 4)])
def test_kernels_agree_with_offsets_and_gqa(q_offset, T):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, T, 8, generator=g)
    k = torch.randn(2, 3, q_offset + T, 8, generator=g)
    v = torch.randn(2, 3, q_offset + T, 8, generator=g)
    ref = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=torch.ones(T, q_offset + T, dtype=torch.bool).tril(q_offset),
    )
    torch.testing.assert_close(kiln_attention(q, k, v, q_offset), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sdpa_attention(q, k, v, q_offset), ref, atol=1e-5, rtol=1e-5)


def test_attention_is_causal():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 2, max_seq_len=16)
    x = torch.randn(1, 8, 16)
    y = x.clone()
    y[:, 5:] += 1.0
    torch.testing.assert_close(attn(x)[:, :5], attn(y)[:, :5])


def test_kv_cache_decode_matches_full_attention():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4, num_kv_heads=2, max_seq_len=16)
    x = torch.randn(2, 9, 16)
    full = attn(x)
    cache = KVCache(1, 2, 2, 16, 4)
    parts = [attn(x[:, :5], kv_cache=cache)]
    cache.advance(5)
    for t in range(5, 9):
        parts.append(attn(x[:, t:t + 1], kv_cache=cache))
        cache.advance(1)
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_attention_impl_accepts_a_custom_kernel():
    calls = []

    def spy(q, k, v, q_offset):
        calls.append((tuple(q.shape), tuple(k.shape), q_offset))
        return kiln_attention(q, k, v, q_offset)

    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(16, 4, num_kv_heads=2, attention_impl=spy)
    x = torch.randn(1, 3, 16)
    attn(x)
    assert calls == [((1, 4, 3, 4), (1, 2, 3, 4), 0)]
    assert set(ATTENTION_IMPLS) >= {"kiln", "sdpa"}


def test_bad_head_counts_are_rejected():
    with pytest.raises(ValueError, match="num_heads=3 does not divide d_model=16"):
        MultiHeadSelfAttention(16, 3)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        MultiHeadSelfAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="attention_impl"):
        MultiHeadSelfAttention(16, 4, attention_impl="flash9")


def test_attention_swapped_runs_the_given_kernel_and_puts_the_layers_back():
    """Every layer runs the swapped-in kernel inside the block (the output equals the model with
    that kernel by name), and each layer's own kernel is back after the block, even after an error."""
    from kiln.model import ModelConfig, Transformer
    from kiln.model.attention import attention_swapped

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    model = Transformer(cfg).eval()
    idx = torch.randint(0, 64, (2, 8))
    calls = []

    def counted(q, k, v, q_offset=0):
        calls.append(q.shape)
        return sdpa_attention(q, k, v, q_offset)

    with torch.no_grad():
        ref = model(idx)
        with attention_swapped(model, counted):
            got = model(idx)
    assert len(calls) == cfg.n_layers
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert [layer.self_attn.attention_impl for layer in model.layers] == ["kiln", "kiln"]
    with pytest.raises(RuntimeError), attention_swapped(model, counted):
        raise RuntimeError("boom")
    assert [layer.self_attn.attention_impl for layer in model.layers] == ["kiln", "kiln"]
