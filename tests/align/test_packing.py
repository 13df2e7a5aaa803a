"""Packing: a packed conversation's loss equals its loss alone (document mask + restarted positions);
SFT batches are a function of (seed, position), so a resumed source continues identically."""

from __future__ import annotations

import pytest
import torch

from kiln.align.chat import ChatTemplate
from kiln.align.packing import build_row, pack
from kiln.align.sft import SFTBatches, masked_nll, sft_forward

CONVS = [
    [{"role": "user", "content": "What is two plus two?"}, {"role": "assistant", "content": "Four."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
     {"role": "assistant", "content": "Hello! How are you today?"}],
    [{"role": "user", "content": "The sum of 12 and 30?"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "Thank you."}, {"role": "assistant", "content": "I am fine, thank you."}],
]


def test_pack_next_fit():
    ex = [([0] * n, [1] * n) for n in (5, 4, 3, 6, 2)]
    assert pack(ex, 9) == [[0, 1], [2, 3], [4]]


def test_packed_loss_equals_unpacked(chat_tokenizer, tiny_model):
    tpl = ChatTemplate.from_tokenizer(chat_tokenizer)
    examples = [tpl.render_with_mask(c) for c in CONVS]
    model = tiny_model(chat_tokenizer.vocab_size, context_length=128)
    T = sum(len(e[0]) for e in examples) + 7
    packed = tuple(t[None] for t in build_row(examples, T))
    nll_packed, n_packed = masked_nll(sft_forward(model, model, packed), packed[1], packed[2])
    alone, n_alone = 0.0, 0
    for e in examples:
        ids = torch.tensor([e[0]])
        logits = model(ids[:, :-1])
        nll, n = masked_nll(logits, ids[:, 1:], torch.tensor([e[1][1:]], dtype=torch.bool))
        alone, n_alone = alone + nll, n_alone + n
    assert n_packed == n_alone == sum(sum(e[1]) for e in examples)
    torch.testing.assert_close(nll_packed, alone, rtol=1e-5, atol=1e-5)
    # without the document mask the later conversations see the earlier ones: a different loss
    plain = model(packed[0], packed[3])
    assert abs(masked_nll(plain, packed[1], packed[2])[0].item() - alone.item()) > 1e-3


def test_sft_batches_resume(chat_tokenizer):
    tpl = ChatTemplate.from_tokenizer(chat_tokenizer)
    examples = [tpl.render_with_mask(c) for c in CONVS] * 5
    for packed in (True, False):
        a = SFTBatches(examples, 64, 2, packed, seed=3)
        draws = a.rows_per_epoch // 2 + 3
        first = [next(a) for _ in range(draws)]  # crosses an epoch boundary
        assert a.epoch >= 1
        b = SFTBatches(examples, 64, 2, packed, seed=3)
        for _ in range(4):
            next(b)
        c = SFTBatches(examples, 64, 2, packed, seed=99)
        c.load_state_dict(b.state_dict())
        for want in first[4:]:
            got = next(c)
            assert all(torch.equal(x, y) for x, y in zip(want, got))


def _row_by_loops(examples, T, pad):
    """build_row's definition, one token at a time (the reference of the vectorized builder)."""
    ids, learn, doc, pos = [pad] * (T + 1), [False] * (T + 1), [-1] * (T + 1), [0] * (T + 1)
    at = 0
    for d, (e_ids, e_mask) in enumerate(examples):
        for j, (t, m) in enumerate(zip(e_ids, e_mask)):
            ids[at], learn[at], doc[at], pos[at] = t, bool(m), d, j
            at += 1
    mask = [learn[t + 1] and doc[t + 1] == doc[t] and doc[t + 1] >= 0 for t in range(T)]
    padded = [d if d >= 0 else len(examples) for d in doc[:T]]
    return (torch.tensor(ids[:T]), torch.tensor(ids[1:]), torch.tensor(mask), torch.tensor(pos[:T]),
            torch.tensor(padded))


def test_store_rows_equal_the_definition():
    from kiln.align.packing import ExampleStore

    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(40):
        n = int(torch.randint(1, 30, (1,), generator=g))
        examples.append((torch.randint(1, 100, (n,), generator=g).tolist(),
                         torch.randint(0, 2, (n,), generator=g).tolist()))
    T = 47
    rows = pack(examples, T)
    got = ExampleStore(examples).rows(rows, T, pad_id=5)
    for b, r in enumerate(rows):
        want = _row_by_loops([examples[i] for i in r], T, 5)
        for name, x, y in zip(("ids", "labels", "mask", "positions", "doc"), got, want):
            assert torch.equal(x[b], y), (b, name)
    # a row that does not fit is refused, not silently cut
    with pytest.raises(ValueError, match="pack the examples first"):
        ExampleStore(examples).rows([list(range(10))], 20)


def test_dpo_batches_equal_collate_pairs():
    from kiln.align.dpo import DPOBatches, collate_pairs

    g = torch.Generator().manual_seed(1)
    rand = lambda lo, hi: torch.randint(1, 50, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()  # noqa: E731
    pairs = [(rand(3, 20), rand(1, 9), rand(1, 12)) for _ in range(12)]
    ref = torch.randn(12, 2, generator=g)
    src = DPOBatches(pairs, ref, 4, seed=0, pad_id=7)
    for idx in ([0, 1, 2, 3], [11, 4, 9], [5]):
        ids, labels, mask, r, lengths = src.collate(idx)
        want = collate_pairs([pairs[i] for i in idx], pad_id=7)
        for x, y in zip((ids, labels, mask), want):
            assert torch.equal(x, y)
        assert torch.equal(r, ref[idx])
        assert lengths.tolist() == [[len(pairs[i][1]), len(pairs[i][2])] for i in idx]
