"""Held-out loss, perplexity and bits per byte; sliding windows score every token exactly once."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.eval.perplexity import evaluate_text, read_texts, text_loss, windows


def _bigram_nll(probs: torch.Tensor, seq: list[int]) -> float:
    return -sum(math.log(float(probs[a, b])) for a, b in zip(seq[:-1], seq[1:]))


def test_windows_cover_each_target_once():
    for n, T, s in [(1, 4, 4), (10, 4, 2), (10, 4, 4), (9, 4, 1), (4, 4, 3)]:
        scored = []
        for begin, end, done in windows(n, T, s):
            assert end - begin <= T and (done == 0 or done - begin >= T - s)
            scored += list(range(done + 1, end + 1))
        assert scored == list(range(1, n + 1))
    with pytest.raises(ValueError, match="stride"):
        list(windows(5, 4, 5))


@pytest.mark.parametrize("stride", [1, 3, 4])
def test_bigram_loss_is_exact_for_long_documents(make_bigram, char_tok, stride):
    # a bigram model sees only the previous token, so any window layout gives the exact sequence NLL
    model = make_bigram(context_length=4)
    docs = [char_tok.encode(":  b é a bqq"), char_tok.encode("ab")]
    res = text_loss(model, docs, char_tok.token_bytes(), bos=0, stride=stride)
    P = torch.exp(model.table.double())
    nll = sum(_bigram_nll(P, [0, *d]) for d in docs)
    assert res.tokens == 14 and res.documents == 2
    assert res.loss == pytest.approx(nll / 14, rel=1e-6)
    assert res.perplexity == pytest.approx(math.exp(nll / 14), rel=1e-6)
    assert res.bytes == len(":  b é a bqq".encode()) + 2
    assert res.bits_per_byte == pytest.approx(nll / math.log(2) / res.bytes, rel=1e-6)


def test_sliding_window_equals_full_context_when_the_document_fits():
    from kiln.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2)
    model = Transformer(cfg).eval()
    doc = torch.randint(1, 64, (12,)).tolist()
    seq = torch.tensor([[0, *doc]])
    with torch.no_grad():
        logp = torch.log_softmax(model(seq[:, :-1]).double(), -1)[0]
    full = -logp.gather(-1, seq[0, 1:, None]).sum().item()
    tb = [0] + [1] * 63
    for stride in (1, 5, 16):
        res = text_loss(model, [doc], tb, bos=0, stride=stride, batch_size=3)
        assert res.loss * res.tokens == pytest.approx(full, rel=1e-5)
    # longer than the context: stride T (no overlap) equals the sum over independent chunks
    long = torch.randint(1, 64, (48,)).tolist()
    seq = [0, *long]
    ref = 0.0
    with torch.no_grad():
        for a in range(0, 48, 16):
            x = torch.tensor([seq[a : a + 16]])
            y = torch.tensor(seq[a + 1 : a + 17])
            ref -= torch.log_softmax(model(x).double(), -1)[0].gather(-1, y[:, None]).sum().item()
    res = text_loss(model, [long], tb, bos=0, stride=16)
    assert res.tokens == 48 and res.windows == 3 and res.loss * 48 == pytest.approx(ref, rel=1e-5)


def test_evaluate_text_reads_txt_and_jsonl(tmp_path, bigram, char_tok):
    (tmp_path / "a.txt").write_text("q: ab")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "ab"}) + "\n\n" + json.dumps({"text": "ba"}) + "\n")
    res = evaluate_text(bigram, char_tok, [tmp_path / "a.txt", tmp_path / "b.jsonl"])
    assert res.documents == 3 and res.tokens == 9
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ab"}) + "\n" + json.dumps({"txt": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        list(read_texts(bad))


def test_evaluate_text_on_token_shards(tmp_path, bigram, char_tok):
    from kiln.shards import write_shard

    import numpy as np

    docs = [char_tok.encode("q: ab"), char_tok.encode("ba")]
    toks = np.array(docs[0] + [0] + docs[1] + [0], dtype=np.uint16)
    write_shard(tmp_path / "val_00000.bin", toks, np.array([0, 6]), vocab_size=7)
    res = evaluate_text(bigram, char_tok, [tmp_path / "val_00000.bin"])
    ref = text_loss(bigram, docs, char_tok.token_bytes(), bos=0)
    assert res.documents == 2 and res.loss == pytest.approx(ref.loss)
