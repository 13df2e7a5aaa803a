"""Muon's fused elementwise passes (kiln.kernels.muon) against the eager reference, and the fused
optimizer against the eager one (interpreted on the CPU in CI, compiled on a GPU)."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from kiln.kernels import KernelFallbackWarning
from kiln.kernels import muon as kmuon
from kiln.model import ModelConfig, build_model
from kiln.train import cross_entropy
from kiln.train.muon import Muon, _muon_apply_reference, _muon_momentum_reference

SHAPE = (40, 130)  # 5,200 elements: two 4096-element blocks, the second one partial


def _lists(dev, k=3, seed=0, nan=False):
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(SHAPE, generator=g).to(dev) for _ in range(k)]
    bufs = [torch.randn(SHAPE, generator=g).to(dev) for _ in range(k)]
    if nan:
        grads[1][3, 7] = float("nan")
        grads[2][0, 0] = float("inf")
    return grads, bufs


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("ok_value", [None, True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_momentum_pass_matches_reference(dev, nesterov, ok_value, dtype):
    grads, bufs = _lists(dev, nan=ok_value is False)
    ref_bufs = [b.clone() for b in bufs]
    ok = torch.tensor(True if ok_value is None else ok_value, device=dev)
    U, sumsq = kmuon.muon_momentum_(grads, bufs, ok, 0.95, nesterov, dtype)
    U_ref, sumsq_ref = _muon_momentum_reference(grads, ref_bufs, None if ok_value is None else ok, 0.95,
                                                nesterov, dtype)
    assert U.shape == (3, *SHAPE) and U.dtype == dtype and sumsq.shape == (3,)
    for b, r in zip(bufs, ref_bufs, strict=True):
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(U.float(), U_ref.float(), rtol=1e-6 if dtype == torch.float32 else 1e-2, atol=1e-6)
    torch.testing.assert_close(sumsq, sumsq_ref, rtol=1e-5, atol=0)
    assert torch.isfinite(U).all() and torch.isfinite(torch.stack(bufs)).all()
    if ok_value is False:  # a skipped step leaves the momentum exactly as it was
        _, fresh = _lists(dev, nan=True)
        for b, f in zip(bufs, fresh, strict=True):
            assert torch.equal(b, f)


@pytest.mark.parametrize("ok_value", [None, True, False])
def test_apply_pass_matches_reference(dev, ok_value):
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(SHAPE, generator=g).to(dev) for _ in range(3)]
    before = [p.clone() for p in params]
    ref = [p.clone() for p in params]
    O = torch.randn(3, *SHAPE, generator=g).to(dev, torch.bfloat16)
    ok = torch.tensor(True if ok_value is None else ok_value, device=dev)
    kmuon.muon_apply_(params, O, ok, decay=0.01, alpha=-0.5)
    _muon_apply_reference(ref, O, None if ok_value is None else ok, 0.01, -0.5)
    for p, r, b, o in zip(params, ref, before, O.unbind(0), strict=True):
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
        if ok_value is False:
            assert torch.equal(p, b)
        else:  # and it did move: p * 0.99 - 0.5 * O
            torch.testing.assert_close(p, b * 0.99 - 0.5 * o.float(), rtol=1e-6, atol=1e-6)


CFG = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2)


def _run(dev, fused: bool, steps: int = 4, skip_at: int = -1) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = build_model(CFG).to(dev)
    mats = [p for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2]
    opt = Muon(mats, lr=2e-2, weight_decay=0.1, fused=fused)
    g = torch.Generator().manual_seed(5)
    for i in range(steps):
        x = torch.randint(0, CFG.vocab_size, (4, CFG.context_length + 1), generator=g).to(dev)
        cross_entropy(model(x[:, :-1]), x[:, 1:]).backward()
        opt.step(ok=torch.tensor(i != skip_at, device=dev))
        opt.zero_grad(set_to_none=True)
    return [p.detach().clone() for p in mats] + [opt.state[p]["momentum_buffer"].clone() for p in mats]


@pytest.mark.parametrize("skip_at", [-1, 2])
def test_fused_muon_matches_eager(dev, skip_at):
    """Four steps (one skipped by the guard, or none) of the fused and the eager optimizer on a model with
    square, wide, tall and GQA-shaped matrices: same parameters and momentum (rounding aside)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)  # the fused run must really be fused
        fused = _run(dev, True, skip_at=skip_at)
    eager = _run(dev, False, skip_at=skip_at)
    tol = 1e-5 if dev.type == "cpu" else 2e-2  # bf16 Newton-Schulz on CUDA
    for a, b in zip(fused, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert all(torch.equal(a, b) for a, b in zip(fused, _run(dev, True, skip_at=skip_at), strict=True)), \
        "the fused step is not deterministic"


def test_fused_muon_falls_back_with_one_warning_on_non_contiguous_params():
    w = torch.nn.Parameter(torch.randn(24, 16).mT)  # (16, 24), non-contiguous
    w.grad = torch.randn(24, 16).mT
    ref = torch.nn.Parameter(w.detach().clone())
    ref.grad = w.grad.clone()
    fused, eager = Muon([w], lr=0.1, fused=True), Muon([ref], lr=0.1)
    with pytest.warns(KernelFallbackWarning, match="muon"):
        fused.step()
    eager.step()
    torch.testing.assert_close(w.detach(), ref.detach())


def test_gqa_config_is_what_the_test_model_has():
    """The model above must have all four matrix shapes (square, wide, tall, GQA k/v)."""
    model = build_model(dataclasses.replace(CFG))
    shapes = {tuple(p.shape) for n, p in model.named_parameters() if n.startswith("layers.") and p.ndim == 2}
    assert any(r < c for r, c in shapes) and any(r > c for r, c in shapes) and any(r == c for r, c in shapes)
    assert len(shapes) >= 4, shapes
