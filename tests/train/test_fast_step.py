"""The sync-free training step: guarded AdamW (eager and Triton), spike threshold, doc-aligned
windows, Muon and time budgets in the trainer, the mean cross-entropy's backward, QK-norm."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch

from kiln.model import ModelConfig, build_model
from kiln.train import train
from kiln.train.data import TokenSampler, _aligned_starts
from kiln.train.loss import cross_entropy
from kiln.train.optim import AdamW
from kiln.train.spike import SpikeDetector


def _pair(fused_b: bool):
    torch.manual_seed(0)
    ps = [torch.randn(s, requires_grad=True) for s in [(37, 19), (3000,), (3,)]]
    qs = [p.detach().clone().requires_grad_() for p in ps]
    groups = lambda xs: [{"params": xs[:2], "weight_decay": 0.1}, {"params": xs[2:], "weight_decay": 0.0}]
    return ps, qs, AdamW(groups(ps), lr=1e-2, betas=(0.9, 0.95)), AdamW(groups(qs), lr=1e-2, betas=(0.9, 0.95), fused=fused_b)


@pytest.mark.parametrize("fused", [False, True, "multi"])
def test_guarded_adamw_matches_plain_and_skips_exactly(fused):
    """``"multi"``: the fused kernel in ``multi_tensor_mode`` (one launch for every tensor of a group)."""
    import contextlib

    from kiln.kernels.adamw import multi_tensor_mode

    mode = multi_tensor_mode() if fused == "multi" else contextlib.nullcontext()
    fused = bool(fused)
    if fused:
        from kiln.kernels._backend import HAVE_TRITON, TRITON_INTERPRET

        if not (HAVE_TRITON and TRITON_INTERPRET):
            pytest.skip("the Triton AdamW kernel runs on the CPU only with TRITON_INTERPRET=1 (as `make test` sets)")
    ps, qs, plain, guarded = _pair(fused)
    with warnings.catch_warnings(), mode:
        warnings.simplefilter("error")  # no fallback warning: the kernel itself ran
        for _ in range(4):
            grads = [torch.randn_like(p) for p in ps]
            for p, q, g in zip(ps, qs, grads):
                p.grad, q.grad = g.clone(), g.clone()
            plain.step()
            guarded.step(ok=torch.tensor(True))
            # A bad step: NaN gradients, ok=False -> nothing moves, not even the moments or the counter.
            before = [(q.detach().clone(), {k: v.clone() for k, v in guarded.state[q].items()}) for q in qs]
            for q in qs:
                q.grad = torch.full_like(q, float("nan"))
            guarded.step(ok=torch.tensor(False))
            for q, (w, st) in zip(qs, before):
                assert torch.equal(q, w)
                assert all(torch.equal(guarded.state[q][k], v) for k, v in st.items())
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert [float(guarded.state[q]["step"]) for q in qs] == [4.0, 4.0, 4.0]


def test_spike_threshold_matches_check():
    det = SpikeDetector(window=10, min_history=4, zscore=3.0, ratio=1.3)
    assert det.threshold() == math.inf
    for v in [2.0, 2.1, 1.9, 2.05, 2.0]:
        assert det.record(v, ok=True) is None
    thr = det.threshold()
    probe = SpikeDetector(10, 4, 3.0, 1.3)
    probe.history.extend(det.history)
    assert probe.check(thr * 1.001) == "spike" and probe.check(thr * 0.999) is None
    assert det.record(float("nan"), ok=False) == "non-finite"
    assert det.record(9.0, ok=False, grad_norm=float("inf")) == "non-finite"
    assert det.record(9.0, ok=False) == "spike"
    assert len(det.history) == 5


def test_doc_aligned_windows_start_at_documents():
    starts = _aligned_starts(np.array([0, 10, 45, 50]), 100, 16)
    # doc 0: 0; doc 1 (35 tokens): 10, 26, 42; doc 2: 45; doc 3: 50, 66, 82, (98: 98 + 17 > 100 -> dropped)
    assert starts.tolist() == [0, 10, 26, 42, 45, 50, 66, 82]
    tokens = np.arange(100, dtype=np.uint16)
    s = TokenSampler([tokens], 16, seed=0, doc_starts=[np.array([0, 10, 45, 50])])
    x, y = s.next_batch(64, "cpu")
    assert set(x[:, 0].tolist()) <= set(starts.tolist())
    assert torch.equal(y[:, :-1], x[:, 1:])


def test_mean_cross_entropy_backward_in_bf16():
    torch.manual_seed(0)
    logits = torch.randn(6, 50, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randint(0, 50, (6,))
    cross_entropy(logits, t).backward()
    ref = logits.detach().float().requires_grad_()
    torch.nn.functional.cross_entropy(ref, t).backward()
    assert logits.grad.dtype == torch.bfloat16
    torch.testing.assert_close(logits.grad.float(), ref.grad, rtol=2e-2, atol=2e-3)


def test_qk_norm_model_and_hf_export(tmp_path):
    from kiln.model import load_pretrained, save_pretrained

    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2, qk_norm=True)
    m = build_model(cfg)
    names = [n for n, _ in m.named_parameters()]
    assert "layers.0.self_attn.q_norm.weight" in names and "layers.1.self_attn.k_norm.weight" in names
    save_pretrained(m, tmp_path / "m")
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert hf["architectures"] == ["Qwen3ForCausalLM"]
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(load_pretrained(tmp_path / "m")(x), m(x))


def test_trainer_with_muon_and_a_time_budget(tokens_dir, tmp_path, make_config):
    run = train(make_config(optimizer="muon", max_steps=30, eval_every=30, save_every=0), tokens_dir, tmp_path / "muon")
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    assert stats["val_loss"] < 3.0  # ln(64) = 4.16 at init: Muon + AdamW learns the cycle
    run = train(make_config(max_steps=100_000, max_seconds=1.0, eval_every=0, save_every=0, warmup_steps=2),
                tokens_dir, tmp_path / "budget")
    log = (run / "train.log").read_text()
    assert "time budget of 1 s" in log
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    # cut by the clock (no upper bound on the seconds: a loaded machine may take any time per step),
    # not by the step count, and every counted step was a whole step
    assert stats["seconds"] >= 1.0 and 1 <= stats["steps"] < stats["max_steps"] == 100_000
    assert stats["tokens_seen"] == stats["steps"] * 8 * 16


def test_multi_tensor_adamw_equals_the_per_tensor_kernel_bitwise():
    """One launch over a table of addresses does per element exactly what one launch per tensor does;
    and a moved gradient (a new address) is picked up, not the stale table's."""
    from kiln.kernels._backend import HAVE_TRITON, TRITON_INTERPRET
    from kiln.kernels.adamw import multi_tensor_mode

    if not (HAVE_TRITON and TRITON_INTERPRET):
        pytest.skip("the Triton AdamW kernel runs on the CPU only with TRITON_INTERPRET=1 (as `make test` sets)")
    _, _, a, b = _pair(True)
    ps = [p for g in a.param_groups for p in g["params"]]
    qs = [p for g in b.param_groups for p in g["params"]]
    with torch.no_grad():
        for p, q in zip(ps, qs):
            p.copy_(q)
    for step in range(3):
        for p, q in zip(ps, qs):
            g = torch.randn_like(p)
            p.grad, q.grad = g.clone(), g.clone()  # fresh tensors: new addresses every step
        a.fused = True
        a.step(ok=torch.tensor(True))
        with multi_tensor_mode():
            b.step(ok=torch.tensor(True))
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert all(torch.equal(a.state[p][k], b.state[q][k]) for k in ("exp_avg", "exp_avg_sq", "step"))
