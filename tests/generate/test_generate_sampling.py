"""sample_next / filter_logits: greedy, temperature, top-k and top-p are exactly what they claim."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.generate import filter_logits, sample_next


def test_greedy_is_argmax():
    logits = torch.randn(4, 50)
    assert torch.equal(sample_next(logits, temperature=0.0), logits.argmax(-1))
    assert sample_next(logits[0], temperature=0).shape == ()


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, -2.0])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_logits(logits, top_k=10)).all()


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])
    logits = probs.log()

    def kept(p):
        return torch.isfinite(filter_logits(logits, top_p=p)).tolist()

    assert kept(0.7) == [False, True, False, True]  # 0.5 + 0.3 >= 0.7
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.81) == [False, True, True, True]
    assert kept(1e-6) == [False, True, False, False]  # the best token always survives
    assert kept(1.0) == [True] * 4


def test_sampling_follows_tempered_distribution():
    logits = torch.tensor([0.0, 1.0, 2.0, 0.5])
    g = torch.Generator().manual_seed(0)
    n = 40_000
    draws = sample_next(logits.expand(n, 4), temperature=2.0, generator=g)
    freq = torch.bincount(draws, minlength=4).double() / n
    expected = torch.softmax(logits.double() / 2.0, -1)
    assert torch.allclose(freq, expected, atol=4 / math.sqrt(n))


def test_top_k_and_top_p_sampling_only_draw_allowed_tokens():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1000, 30, generator=g)
    draws = sample_next(logits, temperature=1.0, top_k=3, generator=g)
    top3 = logits.topk(3, -1).indices
    assert (top3 == draws[:, None]).any(-1).all()
    draws = sample_next(logits, temperature=1.0, top_p=0.3, generator=g)
    allowed = torch.isfinite(filter_logits(logits, top_p=0.3))
    assert allowed.gather(-1, draws[:, None]).all()


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(8, 100)
    a = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    b = sample_next(logits, 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0.0}, "top_p"),
     ({"top_p": 1.5}, "top_p"), ({"top_k": 2.5}, "top_k")],
)
def test_bad_sampling_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample_next(torch.randn(5), **kwargs)


def test_sample_rows_follows_each_rows_distribution_and_ignores_the_others():
    from kiln.generate.sampling import sample_rows

    logits = torch.tensor([[0.0, 1.0, 2.0, 0.5], [3.0, -1.0, 0.0, 0.0]])
    n = 20_000
    gens = [torch.Generator().manual_seed(i) for i in range(n)]
    draws = sample_rows(logits.repeat(n // 2, 1), 2.0, None, None, gens).view(-1, 2)
    for r in range(2):
        freq = torch.bincount(draws[:, r], minlength=4).double() / (n // 2)
        assert torch.allclose(freq, torch.softmax(logits[r].double() / 2.0, -1), atol=4 / math.sqrt(n // 2))
    # a row's draw depends on its logits and its generator only: alone == in a batch
    g = torch.Generator().manual_seed(5)
    batch = torch.randn(6, 50, generator=g)
    together = sample_rows(batch, 0.8, 10, 0.9, [torch.Generator().manual_seed(100 + i) for i in range(6)])
    alone = [int(sample_rows(batch[i : i + 1], 0.8, 10, 0.9, [torch.Generator().manual_seed(100 + i)])[0])
             for i in range(6)]
    assert together.tolist() == alone
    allowed = torch.isfinite(filter_logits(batch / 0.8, 10, 0.9))
    assert allowed.gather(-1, together[:, None]).all()  # top-k and top-p hold
