"""Weight-only int8 / int4 GEMV kernels against dequantize-then-matmul, and the quantizers' round trip."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    int4_linear,
    int4_linear_ref,
    int8_linear,
    int8_linear_ref,
    quantize_int4,
    quantize_int8,
)


@pytest.mark.parametrize("M,N,K", [(1, 40, 64), (3, 17, 300)])
def test_int8_kernel_equals_reference(dev, M, N, K):
    torch.manual_seed(0)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    q, s = quantize_int8(w)
    torch.testing.assert_close(int8_linear(x, q, s, use_kernel=True), int8_linear_ref(x, q, s), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M,N,K,G", [(1, 40, 64, 32), (2, 17, 256, 64)])
def test_int4_kernel_equals_reference(dev, M, N, K, G):
    torch.manual_seed(0)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    p, s, z = quantize_int4(w, G)
    got = int4_linear(x, p, s, z, use_kernel=True)
    torch.testing.assert_close(got, int4_linear_ref(x, p, s, z), atol=1e-4, rtol=1e-4)


def test_quantizers_round_trip_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(8, 128) * torch.linspace(0.1, 3, 8)[:, None]
    q, s = quantize_int8(w)
    assert (dequantize_int8(q, s, torch.float32) - w).abs().max() <= s.max() / 2 + 1e-6
    p, s4, z = quantize_int4(w, 32)
    err = (dequantize_int4(p, s4, z, torch.float32) - w).abs().reshape(8, 4, 32)
    assert (err <= s4[..., None] / 2 + 1e-5).all()
    assert p.dtype == torch.uint8 and p.shape == (8, 64)
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.randn(4, 100), 32)
