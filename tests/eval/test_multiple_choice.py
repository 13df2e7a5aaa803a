"""Multiple-choice scoring on a hand-built bigram model: every number checked on paper."""

from __future__ import annotations

import math

import pytest

from kiln.eval.multiple_choice import MCItem, encode_pairs, plan_rows, score_items

LN2 = math.log(2)


def test_three_scoring_modes_hand_checked(bigram, char_tok):
    # P(' '|':') = 1/2; P(a|' ') = 1/4, P(b|' ') = 1/2, P(é|' ') = 1/8; P(b|b) = 1/2; P(é|é) = 1/2.
    #   " a"   : 1/2 * 1/4               -> -3 ln2, 2 tokens, 2 bytes: -1.5  ln2/token, -1.5   ln2/byte
    #   " bbb" : 1/2 * 1/2 * 1/2 * 1/2   -> -4 ln2, 4 tokens, 4 bytes: -1    ln2/token, -1     ln2/byte
    #   " ééé" : 1/2 * 1/8 * 1/2 * 1/2   -> -6 ln2, 4 tokens, 7 bytes: -1.5  ln2/token, -0.857 ln2/byte
    # (é is one token but two UTF-8 bytes), so each mode picks a different answer.
    item = MCItem.shared_context("q:", [" a", " bbb", " ééé"], gold=1)
    res = score_items(bigram, char_tok, [item])
    s = res.items[0]
    assert s.logprobs == pytest.approx([-3 * LN2, -4 * LN2, -6 * LN2], abs=1e-5)
    assert s.n_tokens == (2, 4, 4)
    assert s.n_bytes == (2, 4, 7)
    assert (s.pred("acc"), s.pred("acc_len"), s.pred("acc_norm")) == (0, 1, 2)
    assert (res.acc, res.acc_len, res.acc_norm) == (0.0, 1.0, 0.0)
    assert res.truncated == 0


def test_accuracy_and_stderr_over_items(bigram, char_tok):
    items = [MCItem.shared_context("q:", [" a", " ééé"], gold=g) for g in (0, 0, 1, 0)]
    res = score_items(bigram, char_tok, items)
    assert res.acc == 0.75  # " a" (-3 ln2) beats " ééé" (-6 ln2)
    assert res.stderr["acc"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))


def test_winogrande_partial_scoring_uses_only_the_continuation(bigram, char_tok):
    # Two contexts, one continuation " b": the context's last token decides (':' vs 'b').
    # after 'b': P(' '|b) * P(b|' ') = 1/12 * 1/2; after ':': P(' '|':') * P(b|' ') = 1/2 * 1/2
    item = MCItem((("qb", " b"), ("q:", " b")), gold=1)
    s = score_items(bigram, char_tok, [item]).items[0]
    assert s.logprobs == pytest.approx([math.log(1 / 12 * 1 / 2), math.log(1 / 2 * 1 / 2)], abs=1e-5)
    assert s.pred("acc") == 1


def test_lambada_greedy_last_word(bigram, char_tok):
    # argmax: ' ' after ':' (1/2), 'b' after ' ' (1/2), 'b' after 'b' (1/2); 'a' after ' ' is not
    right = MCItem(((":", " bb"),), 0, "lm")
    wrong = MCItem(((":", " a"),), 0, "lm")
    res = score_items(bigram, char_tok, [right, wrong])
    assert [s.correct("acc") for s in res.items] == [True, False]
    assert res.acc == 0.5


def test_shared_context_rows(bigram, char_tok):
    # four one-token continuations after one prompt need one row (one forward position)
    item = MCItem.shared_context("q:", [" ", "a", "b", "é"], gold=0)
    reqs = encode_pairs([item], char_tok, 64)[0]
    rows, where = plan_rows(reqs)
    assert rows == [(5, 6)] and all(w == (0, 1) for w in where)
    bigram.calls.clear()
    s = score_items(bigram, char_tok, [item]).items[0]
    assert bigram.calls == [(1, 2)]
    assert s.logprobs == pytest.approx([math.log(1 / 2), math.log(1 / 12), math.log(1 / 12), math.log(1 / 12)], abs=1e-5)
    # a continuation that is a prefix of another shares its row too
    item2 = MCItem.shared_context("q:", [" b", " bb"], gold=0)
    rows, _ = plan_rows(encode_pairs([item2], char_tok, 64)[0])
    assert len(rows) == 1


def test_batches_sorted_by_length_pad_little(bigram, char_tok):
    # " ab" and " ba" need different rows (inputs ctx+" a" and ctx+" b"): 8 rows of 12,12,11,11,5,5,4,4
    items = [MCItem.shared_context("q" * n + ":", [" ab", " ba"], 0) for n in (1, 9, 2, 8)]
    bigram.calls.clear()
    score_items(bigram, char_tok, items, batch_size=4)
    # sorted by length, the two long items share the first batch and the two short ones the second
    assert bigram.calls == [(4, 12), (4, 5)]


def test_left_truncation_is_counted_and_exact(make_bigram, char_tok):
    model = make_bigram(context_length=4)
    long = MCItem.shared_context("qqqqqq:", [" a", " bb"], gold=1)
    res = score_items(model, char_tok, [long])
    assert res.truncated == 1
    short = score_items(model, char_tok, [MCItem.shared_context("q:", [" a", " bb"], gold=1)])
    # a bigram model only sees the previous token, so truncation leaves the scores unchanged
    assert res.items[0].logprobs == pytest.approx(short.items[0].logprobs)
    assert score_items(make_bigram(context_length=64), char_tok, [long]).truncated == 0


def test_whitespace_moves_to_the_continuation(bigram, char_tok):
    a = score_items(bigram, char_tok, [MCItem.shared_context("q: ", ["a", "bb"], 0)]).items[0]
    b = score_items(bigram, char_tok, [MCItem.shared_context("q:", [" a", " bb"], 0)]).items[0]
    assert a.logprobs == pytest.approx(b.logprobs) and a.n_bytes == b.n_bytes == (2, 3)


def test_no_items_is_an_error(bigram, char_tok):
    with pytest.raises(ValueError, match="no items"):
        score_items(bigram, char_tok, [])


class _ByteTok:
    eot_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def _tiny_transformer(context_length: int = 64):
    import torch

    from kiln.model import ModelConfig, Transformer

    torch.manual_seed(0)
    m = Transformer(ModelConfig(vocab_size=257, context_length=context_length, d_model=32, n_layers=2,
                                n_heads=4, n_kv_heads=2, d_ff=64)).eval()
    with torch.no_grad():  # sharp attention, so a wrong mask or position shows in the scores
        for layer in m.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    return m


MIXED_ITEMS = [
    MCItem.shared_context("The cat sat on the", [" mat", " hat and then left", " dog", " a"], 0),
    MCItem.shared_context("Q: 2+2?\nAnswer:", [" A", " B", " C", " D"], 1),  # one-token choices
    MCItem.shared_context("x", [" yes it is", " no"], 1),
    MCItem.shared_context("A much longer context that goes on and on before the choices", [" ok", " fine."], 0),
    MCItem.shared_context("z" * 88, [" a", " b"], 0),  # long context, short choices, long ones in the batch
    MCItem((("He took the ", " bus"), ("She took the ", " bus")), 0),  # partial scoring: by rows
    MCItem((("The last word is", " kiln"),), 0, "lm"),
]


@pytest.mark.parametrize("context_length", [96, 24])  # 24: some items are truncated from the left
def test_kv_cache_scoring_equals_per_choice_rows(context_length):
    m, tok = _tiny_transformer(context_length), _ByteTok()
    rows = score_items(m, tok, MIXED_ITEMS, batch_size=5, method="rows")
    for bs in (3, 16):
        cache = score_items(m, tok, MIXED_ITEMS, batch_size=bs, method="cache")
        for r, c in zip(rows.items, cache.items):
            assert c.logprobs == pytest.approx(r.logprobs, abs=1e-4)
            assert c.greedy == r.greedy and c.n_tokens == r.n_tokens
        assert cache.truncated == rows.truncated
    assert (rows.truncated > 0) == (context_length == 24)
    auto = score_items(m, tok, MIXED_ITEMS)  # auto picks the cache for a Kiln Transformer
    for a, c in zip(auto.items, cache.items):
        assert a.logprobs == pytest.approx(c.logprobs, abs=1e-6)


def test_cache_method_needs_a_kiln_transformer(bigram, char_tok):
    with pytest.raises(ValueError, match="Kiln Transformer"):
        score_items(bigram, char_tok, [MCItem.shared_context("q:", [" a", " b"], 0)], method="cache")
    with pytest.raises(ValueError, match="method"):
        score_items(bigram, char_tok, [MCItem.shared_context("q:", [" a", " b"], 0)], method="fast")


def test_auto_uses_the_cache_only_where_it_saves_tokens():
    from kiln.eval.multiple_choice import cache_saves, token_counts

    tok = _ByteTok()
    long_ctx = encode_pairs([MCItem.shared_context("A long shared context. " * 3, [" one", " two"], 0)], tok, 96)
    letters = encode_pairs([MCItem.shared_context("Q?\nAnswer:", [" A", " B"], 0)], tok, 96)
    # the context's trailing space moves to the continuations: 68 context tokens, "  one", "  two"
    assert token_counts(long_ctx) == (2 * (68 + 5 - 1), 68 + 2 * 4) and cache_saves(long_ctx)
    assert token_counts(letters) == (11, 12) and not cache_saves(letters)  # one row serves both letters
