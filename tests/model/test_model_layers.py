"""Each from-scratch building block against its PyTorch reference: values and gradients."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kiln.model import (
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    scaled_dot_product_attention,
    silu,
    softmax,
)


def _grads(fn, *tensors):
    """Output of fn and the gradients of sum(out * fixed random weights) w.r.t. tensors."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*tensors)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(123), dtype=out.dtype)
    (out * w).sum().backward()
    return out.detach(), [t.grad for t in tensors]


def test_linear_matches_f_linear():
    torch.manual_seed(0)
    lin = Linear(7, 5)
    assert lin.weight.shape == (5, 7)
    x = torch.randn(3, 4, 7, requires_grad=True)
    out = lin(x)
    dout = torch.randn(out.shape)
    (out * dout).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    w2 = lin.weight.detach().clone().requires_grad_(True)
    ref = F.linear(x2, w2)
    (ref * dout).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(lin.weight.grad, w2.grad)


def test_linear_init_is_truncated_normal():
    torch.manual_seed(0)
    lin = Linear(256, 512)
    std = math.sqrt(2 / (256 + 512))
    assert lin.weight.abs().max() <= 3 * std + 1e-6
    assert abs(lin.weight.std().item() - std) < 0.1 * std
    assert Linear(4, 3, dtype=torch.float64).weight.dtype == torch.float64


def test_embedding_matches_f_embedding():
    torch.manual_seed(0)
    emb = Embedding(11, 6)
    idx = torch.tensor([[1, 3, 3, 10], [0, 0, 5, 7]])
    emb.weight.grad = None
    out = emb(idx)
    w = torch.randn(out.shape)
    (out * w).sum().backward()
    ref_weight = emb.weight.detach().clone().requires_grad_(True)
    ref = F.embedding(idx, ref_weight)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(emb.weight.grad, ref_weight.grad)


def _rms_ref(x, weight, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def test_rmsnorm_matches_reference_values_and_grads():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(8))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    w = norm.weight.detach().double()
    out, (gx, gw) = _grads(lambda x, w: _norm_with(norm, x, w), x, w)
    ref, (rgx, rgw) = _grads(lambda x, w: _rms_ref(x, w, 1e-5), x, w)
    torch.testing.assert_close(out.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx.double(), rgx, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.double(), rgw, atol=1e-6, rtol=1e-5)
    if hasattr(F, "rms_norm"):
        torch.testing.assert_close(norm(x.float()), F.rms_norm(x.float(), (8,), norm.weight, 1e-5))


def _norm_with(norm: RMSNorm, x, w):
    from kiln.model import rms_norm

    return rms_norm(x, w, norm.eps)


def test_rmsnorm_keeps_dtype_and_computes_in_fp32():
    norm = RMSNorm(16)
    x = (torch.randn(4, 16) * 300).to(torch.bfloat16)
    y = norm(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), _rms_ref(x.float(), 1.0, 1e-5), atol=1e-2, rtol=1e-2)


def test_silu_matches_torch():
    x = torch.randn(5, 9, dtype=torch.float64) * 4
    out, (g,) = _grads(silu, x)
    ref, (rg,) = _grads(F.silu, x)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, rg)


def test_swiglu_matches_reference():
    torch.manual_seed(0)
    mlp = SwiGLU(8, 24)
    assert mlp.gate_proj.weight.shape == (24, 8) and mlp.down_proj.weight.shape == (8, 24)
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = mlp(x)
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    ref = F.linear(F.silu(F.linear(x2, mlp.gate_proj.weight)) * F.linear(x2, mlp.up_proj.weight), mlp.down_proj.weight)
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


@pytest.mark.parametrize("scale", [1.0, 1e4])
@pytest.mark.parametrize("dim", [0, -1])
def test_softmax_matches_torch_even_for_large_values(scale, dim):
    x = torch.randn(6, 10, dtype=torch.float64) * scale
    out, (g,) = _grads(lambda t: softmax(t, dim), x)
    ref, (rg,) = _grads(lambda t: torch.softmax(t, dim), x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(g, rg)


def test_softmax_handles_minus_inf():
    x = torch.tensor([[0.0, float("-inf"), 1.0], [float("-inf"), 2.0, float("-inf")]])
    torch.testing.assert_close(softmax(x, -1), torch.softmax(x, -1))


@pytest.mark.parametrize("masking", ["none", "causal", "random"])
def test_attention_matches_torch_sdpa(masking):
    g = torch.Generator().manual_seed(0)
    B, H, T, S, D = 2, 3, 5, 7, 8
    q = torch.randn(B, H, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, S, D, generator=g, dtype=torch.float64)
    if masking == "none":
        mask = None
    elif masking == "causal":
        mask = torch.ones(T, S, dtype=torch.bool).tril(diagonal=S - T)
    else:
        mask = torch.rand(B, 1, T, S, generator=g) > 0.5
        mask[..., 0] = True  # every query sees at least one key
    out, grads = _grads(lambda q, k, v: scaled_dot_product_attention(q, k, v, mask), q, k, v)
    ref, rgrads = _grads(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask), q, k, v)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, rgrads):
        torch.testing.assert_close(a, b)


def test_attention_rejects_float_mask():
    q = torch.randn(1, 2, 4)
    with pytest.raises(TypeError, match="bool"):
        scaled_dot_product_attention(q, q, q, torch.zeros(2, 2))


def _rope_complex_ref(x, positions, theta):
    """RoPE with complex numbers; the pair (i, i + D/2) is one complex number (Llama/HF layout)."""
    D = x.shape[-1]
    freqs = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)  # (D/2,)
    angles = positions.double()[..., None] * freqs  # (..., T, D/2)
    z = torch.complex(x[..., : D // 2].double(), x[..., D // 2:].double())
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1).to(x.dtype)


def test_rope_matches_complex_reference():
    torch.manual_seed(0)
    rope = RotaryEmbedding(10000.0, 16, 64)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    pos = torch.tensor([0, 1, 2, 5, 8, 13, 21, 34, 63])
    torch.testing.assert_close(rope(x, pos), _rope_complex_ref(x, pos, 10000.0))
    # (B, T) positions against (B, H, T, D) inputs broadcast over heads
    xh = torch.randn(2, 3, 4, 16)
    pos_bt = torch.tensor([[0, 1, 2, 3], [10, 11, 12, 13]])
    out = rope(xh, pos_bt)
    for b in range(2):
        torch.testing.assert_close(out[b], _rope_complex_ref(xh[b], pos_bt[b], 10000.0))


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(500.0, 8, 128)
    q, k = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)

    def score(m, n):
        return (rope(q[None], torch.tensor([m])) * rope(k[None], torch.tensor([n]))).sum()

    torch.testing.assert_close(score(10, 3), score(110, 103))
    torch.testing.assert_close(rope(q[None], torch.tensor([7])).norm(), q.norm())


def test_rope_rejects_odd_dim():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(1e4, 7, 16)


def test_softmax_gradient_passes_gradcheck():
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax(t, 0), (x,))
    assert torch.autograd.gradgradcheck(lambda t: softmax(t, -1), (x,))
