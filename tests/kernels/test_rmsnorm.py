"""RMSNorm kernel vs its fp32 reference: values, dx, dw; odd widths; strided input; fallbacks."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_rel_close, compute_dtypes, tol

from kiln.kernels import KernelFallbackWarning, rmsnorm, rmsnorm_ref


def _check(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> None:
    x = x.detach().requires_grad_()
    w = w.detach().requires_grad_()
    y = rmsnorm(x, w, eps)
    dy = torch.randn_like(y)
    y.backward(dy)
    # Reference in fp64 on upcast inputs.
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y64 = rmsnorm_ref(x64, w64, eps)
    y64.backward(dy.double())
    r = tol(x.dtype, x.device)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_rel_close(y, y64, r, "y")
    assert_rel_close(x.grad, x64.grad, r, "dx")
    assert_rel_close(w.grad, w64.grad, r, "dw")


@pytest.mark.parametrize("shape", [(3, 5, 64), (37, 100), (2, 3), (70, 48)])
def test_rmsnorm_matches_reference(dev, shape):
    for dtype in compute_dtypes(dev):
        torch.manual_seed(0)
        x = torch.randn(*shape, device=dev, dtype=dtype) * 3
        w = (1 + 0.1 * torch.randn(shape[-1], device=dev)).to(dtype)
        _check(x, w)


def test_rmsnorm_gpu_large_bf16(dev):
    if dev.type != "cuda":
        pytest.skip("GPU-sized shape")
    torch.manual_seed(0)
    x = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)
    _check(x, torch.randn(4096, device=dev, dtype=torch.bfloat16))
    _check(torch.randn(1000, 768, device=dev, dtype=torch.bfloat16), torch.randn(768, device=dev, dtype=torch.bfloat16))


def test_rmsnorm_strided_input(dev):
    torch.manual_seed(1)
    dtype = compute_dtypes(dev)[-1]
    base = torch.randn(8, 6, 32, device=dev, dtype=dtype)
    x = base.transpose(0, 1)  # non-contiguous rows
    _check(x, torch.randn(32, device=dev, dtype=dtype))


def test_rmsnorm_falls_back_on_float64_with_warning():
    x = torch.randn(4, 16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64)
    with pytest.warns(KernelFallbackWarning):
        y = rmsnorm(x, w)
    torch.testing.assert_close(y, rmsnorm_ref(x, w))


def test_rmsnorm_falls_back_on_huge_width():
    x = torch.randn(1, 40000)
    w = torch.ones(40000)
    with pytest.warns(KernelFallbackWarning):
        y = rmsnorm(x, w)
    torch.testing.assert_close(y, rmsnorm_ref(x, w))


def test_rmsnorm_rejects_wrong_weight():
    with pytest.raises(ValueError, match="weight"):
        rmsnorm(torch.randn(2, 8), torch.randn(7))


def test_rmsnorm_out_dtype_equals_a_cast_after(dev):
    """``out_dtype`` (autocast's dtype, written by the kernel): the values and gradients of the fp32 norm
    followed by a cast, the kernel's dx still in x's dtype."""
    half = torch.bfloat16 if dev.type == "cuda" else torch.float16  # numpy (the interpreter) has no bf16
    torch.manual_seed(2)
    x = (torch.randn(6, 5, 48, device=dev) * 2).requires_grad_()
    w = (1 + 0.1 * torch.randn(48, device=dev)).requires_grad_()
    dy = torch.randn(6, 5, 48, device=dev).to(half)
    y = rmsnorm(x, w, 1e-5, out_dtype=half)
    y.backward(dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = rmsnorm(x2, w2, 1e-5).to(half)
    y2.backward(dy)
    assert y.dtype == half and x.grad.dtype == torch.float32
    torch.testing.assert_close(y, y2, rtol=0, atol=0)
    assert_rel_close(x.grad, x2.grad, 1e-6, "dx")
    assert_rel_close(w.grad, w2.grad, 1e-6, "dw")
