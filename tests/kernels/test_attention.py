"""Flash attention kernel vs an fp64 reference: causal and not, GQA, odd T, head dims; fallbacks."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_rel_close, compute_dtypes, tol

from kiln.kernels import KernelFallbackWarning, attention_ref, flash_attention


def _check(q, k, v, causal: bool) -> None:
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = flash_attention(q, k, v, causal=causal)
    do = torch.randn_like(o)
    o.backward(do)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    o64 = attention_ref(q64, k64, v64, causal=causal)
    o64.backward(do.double())
    r = tol(q.dtype, q.device)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert_rel_close(o, o64, r, "o")
    assert_rel_close(q.grad, q64.grad, r, "dq")
    assert_rel_close(k.grad, k64.grad, r, "dk")
    assert_rel_close(v.grad, v64.grad, r, "dv")


def _qkv(b, h, hkv, t, d, device, dtype):
    q = torch.randn(b, h, t, d, device=device, dtype=dtype)
    k = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    v = torch.randn(b, hkv, t, d, device=device, dtype=dtype)
    return q, k, v


# (B, H, H_kv, T, D, causal): T not a multiple of any block, GQA groups 2 and 4, D 16..128.
CASES = [
    (1, 2, 2, 50, 32, True),
    (2, 4, 2, 37, 64, True),
    (1, 4, 1, 33, 16, True),
    (1, 2, 1, 40, 128, True),
    (1, 2, 2, 45, 32, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}H{}/{}T{}D{}{}".format(*c[:5], "c" if c[5] else "nc"))
def test_attention_matches_reference(dev, case):
    b, h, hkv, t, d, causal = case
    for dtype in compute_dtypes(dev):
        torch.manual_seed(0)
        _check(*_qkv(b, h, hkv, t, d, dev, dtype), causal)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hkv", [8, 2])
def test_attention_gpu_bf16(dev, d, hkv):
    if dev.type != "cuda":
        pytest.skip("GPU-sized shape")
    torch.manual_seed(0)
    _check(*_qkv(2, 8, hkv, 300, d, dev, torch.bfloat16), True)  # short path, odd length
    _check(*_qkv(1, 8, hkv, 1030, d, dev, torch.bfloat16), True)  # autotuned path, odd length


def test_attention_strided_btHd_layout(dev):
    """q from (B, T, H, D).transpose(1, 2), as a model produces it, needs no copy and is right."""
    torch.manual_seed(2)
    dtype = compute_dtypes(dev)[-1]
    b, t, h, d = 2, 24, 4, 32
    qkv = torch.randn(b, t, 3, h, d, device=dev, dtype=dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    assert q.stride(-1) == 1 and not q.is_contiguous()
    _check(q, k, v, True)


def test_attention_falls_back_for_odd_head_dim_with_warning():
    q, k, v = _qkv(1, 2, 2, 10, 24, "cpu", torch.float32)
    with pytest.warns(KernelFallbackWarning):
        o = flash_attention(q, k, v)
    torch.testing.assert_close(o, attention_ref(q, k, v))


def test_attention_decoding_falls_back_bottom_right_causal():
    """Tq != Tk (KV cache): reference path, query i sees keys up to i + Tk - Tq."""
    torch.manual_seed(3)
    q = torch.randn(1, 2, 3, 16)
    k = torch.randn(1, 2, 8, 16)
    v = torch.randn(1, 2, 8, 16)
    with pytest.warns(KernelFallbackWarning):
        o = flash_attention(q, k, v, causal=True)
    full_q = torch.cat([torch.randn(1, 2, 5, 16), q], dim=2)
    expected = torch.nn.functional.scaled_dot_product_attention(full_q, k, v, is_causal=True)[:, :, 5:]
    torch.testing.assert_close(o, expected)


def test_attention_rejects_bad_head_counts():
    q, k, v = _qkv(1, 3, 2, 8, 16, "cpu", torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention(q, k, v)
