"""Batched decoding (left padding, key mask, per-row RoPE positions) against one-at-a-time decoding."""

from __future__ import annotations

import pytest
import torch
from test_generate_engine import (
    ByteTokenizer,  # this folder's byte-level stand-in tokenizer
)

from kiln.generate import generate_batch, generate_texts, generate_tokens
from kiln.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=257, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
PROMPTS = [list(b"The kiln "), list(b"A"), list(b"Once upon a time, far away"), list(b"xy"), list(b"hello w")]


def _model(cfg: ModelConfig = CFG) -> Transformer:
    """A tiny random model with sharp attention (q, k scaled up), so positions and masks matter."""
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return m


def _alone(m, prompt, n, eot=None):
    return list(generate_tokens(m, prompt, max_new_tokens=n, temperature=0.0, eot_id=eot))


@pytest.mark.parametrize("attention", ["kiln", "sdpa"])
def test_batched_greedy_equals_one_at_a_time(attention):
    from dataclasses import replace

    m = _model(replace(CFG, attention_impl=attention))
    expected = [_alone(m, p, 16) for p in PROMPTS]
    for bs in (2, 5):
        assert generate_batch(m, PROMPTS, max_new_tokens=16, temperature=0.0, batch_size=bs) == expected
    assert m.layers[0].self_attn.attention_impl == attention  # the model's own kernel is back


def test_rows_that_finish_early_drop_out_and_the_rest_is_unchanged():
    m = _model()
    full = [_alone(m, p, 16) for p in PROMPTS]
    # end-of-text = the token row 1 emits 3rd: row 1 (and any row that emits it) stops there and
    # leaves the batch; every other row must go on exactly as alone
    eot = full[1][2]
    got = generate_batch(m, PROMPTS, max_new_tokens=16, temperature=0.0, eot_id=eot, batch_size=5)
    for g, f in zip(got, full):
        assert g == (f[: f.index(eot)] if eot in f else f)
    assert len(got[1]) <= 2


def test_stop_callable_and_budget():
    m = _model()
    full = [_alone(m, p, 12) for p in PROMPTS]
    got = generate_batch(m, PROMPTS, max_new_tokens=12, temperature=0.0, stop=lambda new: len(new) >= 3 + new[0] % 5)
    for g, f in zip(got, full):
        assert g == f[: min(12, 3 + f[0] % 5)]


def test_sampled_output_is_reproducible_under_a_seed():
    m = _model()
    kw = {"max_new_tokens": 12, "temperature": 1.0, "top_k": 40, "top_p": 0.9, "batch_size": 3}
    a = generate_batch(m, PROMPTS, seed=3, **kw)
    assert a == generate_batch(m, PROMPTS, seed=3, **kw)
    assert a != generate_batch(m, PROMPTS, seed=4, **kw)
    assert all(len(x) == 12 for x in a)


def test_past_the_context_window_and_padded_vocab():
    m = _model(ModelConfig(vocab_size=300, context_length=16, d_model=32, n_layers=1, n_heads=2))
    with torch.no_grad():
        m.lm_head.weight[257:] = 0.0
        m.lm_head.weight[280] = 5.0  # a padding id made likely: must never be produced
    got = generate_batch(m, PROMPTS, max_new_tokens=40, temperature=1.0, seed=0, vocab_limit=257)
    assert [len(g) for g in got] == [40] * len(PROMPTS)
    assert max(max(g) for g in got) < 257
    # a single prompt slides exactly as the streaming engine does
    one = generate_batch(m, [PROMPTS[0]], max_new_tokens=40, temperature=0.0, vocab_limit=257)[0]
    assert one == list(generate_tokens(m, PROMPTS[0], 40, temperature=0.0, vocab_limit=257))


def test_generate_texts_cuts_at_stop_strings():
    m, tok = _model(), ByteTokenizer()
    prompts = ["The kiln ", "hello w", ""]
    full = generate_texts(m, tok, prompts, max_new_tokens=10, temperature=0.0, stop_at_eot=False)
    stop = full[0][3:5]
    got = generate_texts(m, tok, prompts, max_new_tokens=10, temperature=0.0, stop=(stop,), stop_at_eot=False)
    assert got[0] == full[0][: full[0].index(stop)]
    for g, f in zip(got, full):
        assert g == (f[: f.index(stop)] if stop in f else f)


def test_bad_inputs():
    m = _model()
    with pytest.raises(ValueError, match="empty"):
        generate_batch(m, [[1], []])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_batch(m, [[1, 999]])
    with pytest.raises(ValueError, match="temperature"):
        generate_batch(m, [[1]], temperature=-1.0)
    assert generate_batch(m, [[1], [2, 3]], max_new_tokens=0) == [[], []]
