"""The Transformer: names, causality, KV-cache equivalence, init, meta-device build, FLOPs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from kiln.model import KVCache, ModelConfig, Transformer, build_model

CFG = ModelConfig(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _model(cfg: ModelConfig = CFG, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


def test_parameter_names_follow_hf_llama():
    names = set(_model().state_dict())
    expected = {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"layers.{i}.input_layernorm.weight", f"layers.{i}.post_attention_layernorm.weight"}
        expected |= {f"layers.{i}.self_attn.{p}_proj.weight" for p in "qkvo"}
        expected |= {f"layers.{i}.mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert names == expected


def test_forward_shape_and_causality():
    m = _model()
    idx = torch.randint(0, 97, (3, 20))
    logits = m(idx)
    assert logits.shape == (3, 20, 97)
    idx2 = idx.clone()
    idx2[:, 12:] = (idx2[:, 12:] + 1) % 97
    torch.testing.assert_close(m(idx2)[:, :12], logits[:, :12])


def test_every_parameter_gets_a_gradient():
    m = _model(dataclasses.replace(CFG, tie_embeddings=True))
    m(torch.randint(0, 97, (2, 10))).logsumexp(-1).mean().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("impl", ["kiln", "sdpa"])
def test_kv_cache_logits_match_uncached(impl):
    m = _model(dataclasses.replace(CFG, attention_impl=impl))
    idx = torch.randint(0, 97, (2, 17))
    full = m(idx)
    cache = KVCache.for_model(m, batch_size=2)
    parts = [m(idx[:, :9], kv_cache=cache)]
    for t in range(9, 17):
        parts.append(m(idx[:, t:t + 1], kv_cache=cache))
    assert cache.length == 17
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_decode_same_tokens_with_and_without_cache():
    m = _model()
    prompt = torch.randint(0, 97, (1, 5))
    uncached = prompt.clone()
    for _ in range(30):
        nxt = m(uncached)[:, -1].argmax(-1, keepdim=True)
        uncached = torch.cat([uncached, nxt], 1)
    cache = KVCache.for_model(m)
    logits = m(prompt, kv_cache=cache)[:, -1]
    cached = prompt.clone()
    for _ in range(30):
        nxt = logits.argmax(-1, keepdim=True)
        cached = torch.cat([cached, nxt], 1)
        logits = m(nxt, kv_cache=cache)[:, -1]
    assert cached.tolist() == uncached.tolist()


def test_explicit_positions_equal_default_positions():
    m = _model()
    idx = torch.randint(0, 97, (2, 8))
    torch.testing.assert_close(m(idx, token_positions=torch.arange(8)), m(idx))
    torch.testing.assert_close(m(idx, token_positions=torch.arange(8).expand(2, 8)), m(idx))


def test_too_long_input_and_full_cache_raise():
    m = _model()
    with pytest.raises(ValueError, match="exceeds context_length=48"):
        m(torch.zeros(1, 49, dtype=torch.long))
    cache = KVCache.for_model(m, max_seq_len=4)
    m(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match="KVCache is full"):
        m(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        m(torch.zeros(5, dtype=torch.long))


def test_tied_embeddings_share_one_matrix():
    m = _model(dataclasses.replace(CFG, tie_embeddings=True))
    assert m.lm_head.weight is m.embed_tokens.weight
    untied = _model()
    assert untied.num_params() - m.num_params() == 97 * 32
    assert m.num_params(exclude_embeddings=True) == m.num_params()
    assert untied.num_params(exclude_embeddings=True) == untied.num_params() - 97 * 32


def test_gpt2_style_init():
    cfg = ModelConfig(vocab_size=512, context_length=16, d_model=256, n_layers=8, n_heads=4)
    m = _model(cfg)
    assert abs(m.layers[0].self_attn.q_proj.weight.std().item() - 0.02) < 0.002
    resid = 0.02 / (2 * 8) ** 0.5
    assert abs(m.layers[3].mlp.down_proj.weight.std().item() - resid) < 0.1 * resid
    assert torch.all(m.norm.weight == 1)


def test_build_on_meta_then_init():
    cfg = dataclasses.replace(CFG, tie_embeddings=True)
    m = build_model(cfg, device="cpu")
    assert not any(p.is_meta for p in m.parameters()) and not any(b.is_meta for b in m.buffers())
    assert m.lm_head.weight is m.embed_tokens.weight
    ref = _model(cfg)
    torch.testing.assert_close(m.rope.cos, ref.rope.cos)
    assert set(m.state_dict()) == set(ref.state_dict())
    assert torch.isfinite(m(torch.randint(0, 97, (1, 6)))).all()


def test_flops_per_token_formula():
    m = _model()
    n = m.num_params(exclude_embeddings=True)
    assert m.flops_per_token() == 6 * n + 12 * 2 * 32 * 48
    assert m.flops_per_token(seq_len=10) == 6 * n + 12 * 2 * 32 * 10


def test_bf16_weights_forward():
    m = Transformer(CFG, dtype=torch.bfloat16)
    out = m(torch.randint(0, 97, (1, 7)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_triton_impls_match_reference_or_fall_back():
    """Where the Triton kernels can run (a GPU, or the CPU under TRITON_INTERPRET=1) the model's
    forward runs them -- a fallback to the reference is an error here, or the test would compare the
    reference with itself -- and gives the reference's logits; elsewhere they warn and fall back."""
    import warnings

    pytest.importorskip("kiln.kernels.attention")
    from kiln.kernels import KernelFallbackWarning, unsupported_reason

    cfg = dataclasses.replace(CFG, d_model=64)  # head dim 16: one the attention kernel supports
    m = _model(cfg)
    fast = Transformer(dataclasses.replace(cfg, attention_impl="triton", norm_impl="triton")).eval()
    fast.load_state_dict(m.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    can_run = unsupported_reason(torch.empty(0)) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error" if can_run else "ignore", KernelFallbackWarning)
        torch.testing.assert_close(fast(idx), m(idx), atol=1e-5, rtol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", KernelFallbackWarning)  # one token against a cache: the reference, by design
        cache = KVCache.for_model(fast, batch_size=2)
        fast(idx[:, :10], kv_cache=cache)
        torch.testing.assert_close(fast(idx[:, 10:11], kv_cache=cache), m(idx[:, :11])[:, 10:], atol=1e-5, rtol=1e-5)
