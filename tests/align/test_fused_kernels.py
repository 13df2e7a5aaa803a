"""SFT and DPO with the fused kernels (Kiln's Triton RMSNorm and RoPE, q/k/v and gate/up as one GEMM each: what
``kiln dpo`` runs on CUDA) gives the
loss and gradients of the PyTorch formulas within 1e-5 relative on a tiny model (GQA, 2 layers; SFT's
packed rows with per-row positions and the document mask), and the check is tight enough to catch a
kernel 0.1% off. Under TRITON_INTERPRET=1 the kernels run on the CPU."""

from __future__ import annotations

import pytest
import torch

from kiln.align.dpo import DPOBatches, DPOConfig, DPOMetrics, dpo_loss_fn
from kiln.kernels import unsupported_reason, untuned_mode
from kiln.model import ModelConfig
from kiln.model.attention import kernels_swapped
from kiln.model.transformer import build_model

RTOL = 1e-5


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = dpo_loss_fn(model, DPOConfig(beta=0.5), DPOMetrics())(*batch)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _worst(run, ref) -> float:
    (l1, g1), (l0, g0) = run, ref
    return max([_rel(l1, l0)] + [_rel(g1[k], g0[k]) for k in g0])


@pytest.fixture(scope="module")
def setup():
    if unsupported_reason(torch.zeros(1)) is not None:
        pytest.skip("the Triton kernels cannot run here (CPU without TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      attention_impl="sdpa")
    model = build_model(cfg)
    g = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(0, 60, (3 + i,), generator=g).tolist(), [1, 2, 5, 7][: 2 + i % 3], [1, 3, 9])
             for i in range(3)]
    ref = torch.randn(3, 2, generator=g) - 12.0  # reference log-probs near the random model's
    batch = next(iter(DPOBatches(pairs, ref, 3, seed=0)))
    return model, batch, _loss_and_grads(model, batch)


def test_fused_kernels_give_the_same_dpo_loss_and_gradients(setup):
    model, batch, plain = setup
    with kernels_swapped(model, norm="triton", rope="triton", fused_proj=True), untuned_mode():
        fused = _loss_and_grads(model, batch)
    assert _worst(fused, plain) <= RTOL
    assert model.rope.impl == "kiln" and model.norm.impl == "kiln"  # put back on exit
    assert not model.layers[0].self_attn.fused_proj and not model.layers[0].mlp.fused_proj


def test_the_check_catches_a_rope_kernel_slightly_off(setup):
    model, batch, plain = setup
    rope = model.rope
    saved = rope.sin.clone()
    try:
        rope.sin.mul_(1.001)  # a kernel whose angles are 0.1% off
        with kernels_swapped(model, rope="triton"):
            off = _loss_and_grads(model, batch)
    finally:
        rope.sin.copy_(saved)
    assert _worst(off, plain) > RTOL


def test_kernel_check_passes_the_kernels_and_catches_a_wrong_one(monkeypatch):
    """``fused_kernels`` runs this check first on the GPU: a kernel that fails to build or agree is left off."""
    import sys

    from kiln.align.stage import kernels_fail

    if unsupported_reason(torch.zeros(1)) is not None:
        pytest.skip("the Triton kernels cannot run here (CPU without TRITON_INTERPRET=1)")
    cpu = torch.device("cpu")
    assert kernels_fail(cpu) is None
    rope = sys.modules["kiln.kernels.rope"]
    launch = rope._launch
    monkeypatch.setattr(rope, "_launch", lambda q, k, c, s, p, sign: launch(q, k, c, s * 1.1, p, sign))
    assert "differs" in kernels_fail(cpu)
    monkeypatch.setattr(rope, "_launch", lambda *a: 1 / 0)
    assert kernels_fail(cpu).startswith("ZeroDivisionError")
    monkeypatch.setattr(rope, "_launch", launch)
    adamw = sys.modules["kiln.kernels.adamw"]
    multi = adamw._multi_update
    monkeypatch.setattr(adamw, "_multi_update", lambda p, g, m, v, s, lr, *a: multi(p, g, m, v, s, lr * 1.01, *a))
    assert "differs" in kernels_fail(cpu)  # a learning rate 1% off in the one-launch AdamW


def test_fused_kernels_give_the_same_packed_sft_loss_and_gradients(setup):
    from kiln.align.sft import SFTBatches, sft_loss_fn

    model = setup[0]
    g = torch.Generator().manual_seed(3)
    examples = [(torch.randint(0, 60, (n,), generator=g).tolist(), [0] * (n // 2) + [1] * (n - n // 2))
                for n in (5, 9, 4, 7, 6)]
    batch = next(iter(SFTBatches(examples, 16, 2, packed=True, seed=0)))  # rows of several documents

    def run():
        model.zero_grad(set_to_none=True)
        loss = sft_loss_fn(model, model)(*batch)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    plain = run()
    with kernels_swapped(model, norm="triton", rope="triton", fused_proj=True), untuned_mode():
        fused = run()
    assert batch[3][0].max() < batch[3].shape[1] - 1  # positions restart inside a row
    assert _worst(fused, plain) <= RTOL
