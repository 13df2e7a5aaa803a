"""Fused linear + cross-entropy vs the unfused reference: loss, dx, dW, ignore_index, chunking."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_rel_close, compute_dtypes, tol

from kiln.kernels import KernelFallbackWarning, linear_cross_entropy, linear_cross_entropy_ref


def _check(x, w, targets, chunk_size: int) -> None:
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    loss = linear_cross_entropy(x, w, targets, chunk_size=chunk_size)
    (2.0 * loss).backward()  # a non-unit upstream gradient
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    ref = linear_cross_entropy_ref(x64, w64, targets)
    (2.0 * ref).backward()
    r = tol(x.dtype, x.device)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_rel_close(loss, ref, r, "loss")
    assert_rel_close(x.grad, x64.grad, r, "dx")
    assert_rel_close(w.grad, w64.grad, r, "dW")
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype


@pytest.mark.parametrize("n,d,vocab,chunk", [(13, 32, 100, 4), (8, 16, 77, 64), (6, 48, 130, 6)])
def test_linear_ce_matches_reference(dev, n, d, vocab, chunk):
    for dtype in compute_dtypes(dev):
        torch.manual_seed(0)
        x = torch.randn(n, d, device=dev, dtype=dtype)
        w = torch.randn(vocab, d, device=dev, dtype=dtype) / d**0.5
        t = torch.randint(0, vocab, (n,), device=dev)
        t[1] = -100  # ignored token
        _check(x, w, t, chunk)


def test_linear_ce_batched_shape_and_int32_targets(dev):
    torch.manual_seed(1)
    dtype = compute_dtypes(dev)[-1]
    x = torch.randn(2, 5, 16, device=dev, dtype=dtype)
    w = torch.randn(50, 16, device=dev, dtype=dtype)
    t = torch.randint(0, 50, (2, 5), device=dev, dtype=torch.int32)
    _check(x, w, t.long(), 3)
    loss = linear_cross_entropy(x, w, t, chunk_size=3)
    torch.testing.assert_close(loss, linear_cross_entropy_ref(x.double(), w.double(), t.long()).float(),
                               rtol=tol(dtype, dev), atol=tol(dtype, dev))


def test_linear_ce_gpu_bf16(dev):
    if dev.type != "cuda":
        pytest.skip("GPU-sized shape")
    torch.manual_seed(0)
    x = torch.randn(3000, 256, device=dev, dtype=torch.bfloat16)
    w = (torch.randn(5003, 256, device=dev) / 16).to(torch.bfloat16)
    t = torch.randint(0, 5003, (3000,), device=dev)
    _check(x, w, t, 1024)


def test_linear_ce_no_grad_and_frozen_weight(dev):
    torch.manual_seed(2)
    dtype = compute_dtypes(dev)[-1]
    x = torch.randn(7, 16, device=dev, dtype=dtype)
    w = torch.randn(40, 16, device=dev, dtype=dtype)
    t = torch.randint(0, 40, (7,), device=dev)
    ref = linear_cross_entropy_ref(x.double(), w.double(), t).float()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(x, w, t, chunk_size=3), ref, rtol=tol(dtype, dev), atol=tol(dtype, dev))
    xg = x.clone().requires_grad_()
    linear_cross_entropy(xg, w, t, chunk_size=3).backward()
    x64 = x.double().requires_grad_()
    linear_cross_entropy_ref(x64, w.double(), t).backward()
    assert_rel_close(xg.grad, x64.grad, tol(dtype, dev), "dx (weight frozen)")


def test_linear_ce_falls_back_on_float64_with_warning():
    x = torch.randn(5, 8, dtype=torch.float64)
    w = torch.randn(20, 8, dtype=torch.float64)
    t = torch.randint(0, 20, (5,))
    with pytest.warns(KernelFallbackWarning):
        loss = linear_cross_entropy(x, w, t)
    torch.testing.assert_close(loss, linear_cross_entropy_ref(x, w, t))


def test_linear_ce_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
