"""Packing: a packed conversation's loss equals its loss alone (document mask + restarted positions);
SFT batches are a function of (seed, position), so a resumed source continues identically."""

from __future__ import annotations

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
