"""Fused RoPE kernel vs the model's own rotary (values, dq, dk): positions (T,) and (B, T), GQA,
strided input; and the fallback."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import assert_rel_close, compute_dtypes, tol

from kiln.kernels import KernelFallbackWarning
from kiln.kernels.rope import rope_qk, rope_ref
from kiln.model.layers import RotaryEmbedding


def _model_rope(rope: RotaryEmbedding, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """The model's eager formula (B, T, H, D) in fp64: the independent reference."""
    return rope(x.double().transpose(1, 2), pos).transpose(1, 2)


@pytest.mark.parametrize("B,T,H,Hkv,D,per_row", [(2, 7, 4, 2, 16, False), (3, 5, 3, 3, 10, True), (1, 9, 8, 1, 64, True)])
def test_rope_qk_matches_model_rotary(dev, B, T, H, Hkv, D, per_row):
    rope = RotaryEmbedding(10000.0, D, 64, device=dev)
    torch.manual_seed(0)
    pos = torch.randint(0, 64, (B, T), device=dev) if per_row else torch.arange(3, 3 + T, device=dev)
    for dtype in compute_dtypes(dev):
        q = torch.randn(B, T, H, D, device=dev, dtype=dtype, requires_grad=True)
        k = torch.randn(B, T, Hkv, D, device=dev, dtype=dtype, requires_grad=True)
        yq, yk = rope_qk(q, k, rope.cos, rope.sin, pos)
        dq, dk = torch.randn_like(yq), torch.randn_like(yk)
        (yq * dq).sum().add((yk * dk).sum()).backward()
        q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
        rq, rk = _model_rope(rope, q64, pos), _model_rope(rope, k64, pos)
        (rq * dq.double()).sum().add((rk * dk.double()).sum()).backward()
        r = tol(dtype, dev)
        assert yq.dtype == dtype and yq.shape == q.shape and yk.shape == k.shape
        assert_rel_close(yq, rq, r, "q")
        assert_rel_close(yk, rk, r, "k")
        assert_rel_close(q.grad, q64.grad, r, "dq")
        assert_rel_close(k.grad, k64.grad, r, "dk")


def test_rope_qk_strided_input_and_wrong_angle_fails(dev):
    rope = RotaryEmbedding(10000.0, 8, 32, device=dev)
    torch.manual_seed(1)
    base = torch.randn(2, 4, 6, 8, device=dev)  # (B, H, T, D) storage: q as a transposed view
    q, k = base.transpose(1, 2), base[:, :2].transpose(1, 2)
    pos = torch.arange(6, device=dev)
    yq, yk = rope_qk(q, k, rope.cos, rope.sin, pos)
    assert_rel_close(yq, _model_rope(rope, q, pos), 1e-5, "strided q")
    assert_rel_close(yk, _model_rope(rope, k, pos), 1e-5, "strided k")
    # the check can fail: positions off by one are far outside the tolerance
    with pytest.raises(AssertionError):
        assert_rel_close(yq, _model_rope(rope, q, pos + 1), 1e-5, "shifted")


def test_rope_qk_falls_back_on_float64_with_warning():
    rope = RotaryEmbedding(10000.0, 8, 16)
    q = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    with pytest.warns(KernelFallbackWarning):
        yq, _ = rope_qk(q, q, rope.cos, rope.sin, torch.arange(3))
    torch.testing.assert_close(yq, rope_ref(q, rope.cos, rope.sin, torch.arange(3)))
