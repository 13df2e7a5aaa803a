"""cross_entropy, AdamW, clip_grad_norm_, schedules and get_batch against PyTorch references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kiln.train import (
    AdamW,
    clip_grad_norm_,
    cosine_lr,
    cross_entropy,
    get_batch,
    param_groups,
    wsd_lr,
)
from kiln.train.data import TokenSampler


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_cross_entropy_matches_torch_values_and_grads(shape):
    g = torch.Generator().manual_seed(0)
    V = 11
    logits = torch.randn(*shape, V, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, shape, generator=g)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    ours = cross_entropy(a, targets)
    ref = F.cross_entropy(b.reshape(-1, V).float(), targets.reshape(-1))
    torch.testing.assert_close(ours, ref.to(ours.dtype))
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5)


def test_cross_entropy_large_logits_is_finite_and_correct():
    logits = torch.tensor([[1e4, 0.0, -1e4], [5e3, 5e3, 0.0]], requires_grad=True)
    targets = torch.tensor([1, 0])
    loss = cross_entropy(logits, targets)
    ref = F.cross_entropy(logits.detach(), targets)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_cross_entropy_ignore_index_and_reductions():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 9, generator=g)
    targets = torch.randint(0, 9, (4, 6), generator=g)
    targets[0, :3] = -100
    ref = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=-100), ref)
    ref_sum = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(cross_entropy(logits, targets, ignore_index=-100, reduction="sum"), ref_sum)
    assert cross_entropy(logits, targets, ignore_index=-100, reduction="none").shape == (4, 6)
    with pytest.raises(ValueError):
        cross_entropy(logits, targets[:, :2])


def _two_models(seed=0):
    torch.manual_seed(seed)
    m1 = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m2 = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    m2.load_state_dict(m1.state_dict())
    return m1, m2


def test_adamw_matches_torch_over_several_steps_with_weight_decay():
    m1, m2 = _two_models()
    ours = AdamW(m1.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref = torch.optim.AdamW(m2.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    g = torch.Generator().manual_seed(3)
    for step in range(10):
        x = torch.randn(16, 5, generator=g)
        for m, opt in ((m1, ours), (m2, ref)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
        if step == 4:  # a schedule changes lr between steps
            for opt in (ours, ref):
                for group in opt.param_groups:
                    group["lr"] = 3e-3
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-5)


def test_adamw_param_groups_skip_decay_and_state_dict_round_trip():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = torch.nn.Parameter(torch.randn(10, 4))
            self.proj = torch.nn.Parameter(torch.randn(4, 4))
            self.norm = torch.nn.Parameter(torch.ones(4))

    m = M()
    groups = param_groups(m, 0.5)
    assert [len(g["params"]) for g in groups] == [1, 2]
    assert groups[0]["params"][0] is m.proj
    opt = AdamW(groups, lr=0.1)
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt.step()
    torch.testing.assert_close(m.proj, before["proj"] * (1 - 0.1 * 0.5))
    torch.testing.assert_close(m.norm, before["norm"])
    opt2 = AdamW(param_groups(m, 0.5), lr=0.1)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[m.proj]["step"].item() == 1


def test_clip_grad_norm_matches_torch():
    m1, m2 = _two_models(1)
    x = torch.randn(8, 5)
    for m in (m1, m2):
        (m(x) * 100).sum().backward()
    ours = clip_grad_norm_(m1.parameters(), 1.0)
    ref = torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
    torch.testing.assert_close(ours, ref)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad)
    # Below the threshold nothing changes.
    g_before = [p.grad.clone() for p in m1.parameters()]
    clip_grad_norm_(m1.parameters(), 1e6)
    for p, g in zip(m1.parameters(), g_before):
        torch.testing.assert_close(p.grad, g)


def test_cosine_schedule_key_points():
    kw = {"max_lr": 1.0, "min_lr": 0.1, "warmup_steps": 10, "cosine_steps": 110}
    assert cosine_lr(0, **kw) == 0.0
    assert cosine_lr(5, **kw) == pytest.approx(0.5)
    assert cosine_lr(10, **kw) == pytest.approx(1.0)
    assert cosine_lr(60, **kw) == pytest.approx(0.55)
    assert cosine_lr(110, **kw) == pytest.approx(0.1)
    assert cosine_lr(1000, **kw) == pytest.approx(0.1)
    lrs = [cosine_lr(t, **kw) for t in range(10, 111)]
    assert all(a >= b for a, b in itertools.pairwise(lrs))


def test_wsd_schedule_key_points():
    kw = {"max_lr": 1.0, "min_lr": 0.0, "warmup_steps": 10, "stable_steps": 50, "decay_steps": 20}
    assert wsd_lr(0, **kw) == 0.0
    assert wsd_lr(10, **kw) == 1.0
    assert wsd_lr(59, **kw) == 1.0
    assert wsd_lr(60, **kw) == 1.0
    assert wsd_lr(70, **kw) == pytest.approx(0.5)
    assert wsd_lr(80, **kw) == 0.0
    assert wsd_lr(500, **kw) == 0.0


def test_get_batch_shapes_bounds_and_targets():
    tokens = np.arange(100, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = get_batch(tokens, 8, 16, "cpu", generator=g)
        assert x.shape == y.shape == (8, 16) and x.dtype == torch.int64
        assert torch.equal(y, x + 1)  # consecutive tokens: y is x shifted by one
        assert int(x.min()) >= 0 and int(y.max()) <= 99
    x1, _ = get_batch(tokens, 4, 16, "cpu", generator=torch.Generator().manual_seed(5))
    x2, _ = get_batch(tokens, 4, 16, "cpu", generator=torch.Generator().manual_seed(5))
    assert torch.equal(x1, x2)
    x3, _ = get_batch(tokens, 4, 16, "cpu", generator=np.random.default_rng(0))
    assert x3.shape == (4, 16)
    # The last start offset is reachable: a 17-token array has exactly one window.
    x, y = get_batch(np.arange(17), 3, 16)
    assert torch.equal(x[0], torch.arange(16)) and int(y[0, -1]) == 16
    with pytest.raises(ValueError, match="context_length"):
        get_batch(np.arange(10), 2, 16)


def test_token_sampler_spans_shards_and_resumes():
    shards = [np.arange(0, 50, dtype=np.uint16), np.arange(1000, 1010, dtype=np.uint16)]
    s = TokenSampler(shards, context_length=8, seed=0)
    seen = set()
    for _ in range(200):
        x, y = s.next_batch(4, "cpu")
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y, x + 1)  # never crosses a shard boundary
        seen.update(int(v) for v in x[:, 0])
    assert any(v >= 1000 for v in seen) and any(v < 50 for v in seen)
    state = s.state_dict()
    a = s.next_batch(4, "cpu")[0]
    s2 = TokenSampler(shards, context_length=8, seed=99)
    s2.load_state_dict(state)
    assert torch.equal(s2.next_batch(4, "cpu")[0], a)
    with pytest.raises(ValueError, match="context_length"):
        TokenSampler([np.arange(5)], context_length=8, seed=0)
