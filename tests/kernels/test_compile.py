"""The kernels inside torch.compile: custom ops keep them opaque; values and gradients unchanged."""

from __future__ import annotations

import importlib

import pytest
import torch
from kernel_testing import assert_rel_close, compute_dtypes, tol

from kiln.kernels import flash_attention, linear_cross_entropy, rmsnorm


# aot_eager needs no C++ toolchain (CI's CPU); inductor runs where there is a GPU. The model below
# calls attention as f(y, y, y): on torch 2.11 (the GPU image) that lost dq and dk under compile
# until flash_attention passed distinct objects (kiln.kernels._backend.distinct_inputs).
BACKENDS = ["aot_eager", "inductor"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_kernels_under_torch_compile(dev, backend):
    if backend == "inductor" and dev.type != "cuda":
        pytest.skip("inductor is exercised on the GPU only")
    torch.manual_seed(0)
    dtype = compute_dtypes(dev)[0]
    d, vocab, h, hd = 32, 50, 2, 16

    def model(x, w_norm, w_out, targets):  # (B, T, d): norm -> self-attention on heads -> LM loss
        b, t, _ = x.shape
        y = rmsnorm(x, w_norm, 1e-6)
        q = y.view(b, t, h, hd).transpose(1, 2)
        a = flash_attention(q, q, q, causal=True).transpose(1, 2).reshape(b, t, d)
        return linear_cross_entropy(a + y, w_out, targets, chunk_size=8)

    x = torch.randn(2, 12, d, device=dev, dtype=dtype)
    w_norm = torch.randn(d, device=dev, dtype=dtype)
    w_out = torch.randn(vocab, d, device=dev, dtype=dtype)
    targets = torch.randint(0, vocab, (2, 12), device=dev)
    grads = []
    for fn in (model, torch.compile(model, backend=backend)):
        xs = [t.clone().requires_grad_() for t in (x, w_norm, w_out)]
        loss = fn(*xs, targets)
        loss.backward()
        grads.append([loss.detach()] + [t.grad for t in xs])
    for a, b, name in zip(grads[1], grads[0], ["loss", "dx", "dw_norm", "dw_out"]):
        assert_rel_close(a, b, tol(dtype, dev), name)


def test_repeated_attention_inputs_reach_the_autograd_function_as_distinct_objects(dev, monkeypatch):
    """The workaround for torch 2.11's merged-duplicate-inputs bug (pytorch/pytorch#181146): whatever
    the torch version, the autograd.Function never sees one object twice, and self-attention's
    gradient is still dq + dk + dv."""
    attention = importlib.import_module("kiln.kernels.attention")
    seen = []
    real_apply = attention._FlashAttentionFunction.apply

    def spy(*args):
        seen.append([id(a) for a in args[:3]])
        return real_apply(*args)

    monkeypatch.setattr(attention._FlashAttentionFunction, "apply", spy)
    torch.manual_seed(0)
    x = torch.randn(1, 2, 8, 16, device=dev, requires_grad=True)
    flash_attention(x, x, x).sum().backward()
    assert len(seen) == 1 and len(set(seen[0])) == 3
    ref = x.detach().clone().requires_grad_()
    attention.attention_ref(ref, ref, ref).sum().backward()
    assert_rel_close(x.grad, ref.grad, tol(torch.float32, dev), "dx")
