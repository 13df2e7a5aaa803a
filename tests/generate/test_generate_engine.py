"""generate / stream with a KV cache, on a tiny random model and a byte-level stand-in tokenizer."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kiln.generate import TextStreamer, generate, generate_tokens, stream
from kiln.model import ModelConfig, Transformer

EOT = 256


class ByteTokenizer:
    """Token i < 256 is byte i; 256 is <|endoftext|>. Stand-in for kiln.tokenizer.Tokenizer."""

    eot_id = EOT
    vocab_size = 257

    def __init__(self) -> None:
        self.vocab = {i: bytes([i]) for i in range(256)}
        self.vocab[EOT] = b"<|endoftext|>"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


class DecodeOnlyTokenizer(ByteTokenizer):
    """A tokenizer without a byte vocabulary (exercises the re-decoding path)."""

    def __init__(self) -> None:
        super().__init__()
        self._v = self.vocab
        del self.vocab

    def decode(self, ids: list[int]) -> str:
        return b"".join(self._v[i] for i in ids).decode("utf-8", errors="replace")


CFG = ModelConfig(vocab_size=257, context_length=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


def _model(cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg)


@pytest.mark.parametrize("tok_cls", [ByteTokenizer, DecodeOnlyTokenizer])
def test_streamer_yields_only_complete_characters(tok_cls):
    tok = tok_cls()
    text = "héllo 世界 🎉 ok"
    s = TextStreamer(tok)
    pieces = [s.push(b) for b in text.encode("utf-8")] + [s.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[text.encode().index("🎉".encode()) + 3] == "🎉"  # emitted whole, at its last byte


def test_streamer_flushes_an_incomplete_tail():
    s = TextStreamer(ByteTokenizer())
    assert s.push(0xE4) == "" and s.push(0xB8) == ""
    assert s.flush() == "\ufffd"


@torch.no_grad()
def test_cached_greedy_generation_equals_uncached_argmax():
    m = _model().eval()
    prompt = list(b"The kiln ")
    ids = torch.tensor([prompt])
    for _ in range(20):
        ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    expected = ids[0, len(prompt):].tolist()
    got = list(generate_tokens(m, prompt, max_new_tokens=20, temperature=0.0))
    assert got == expected


def test_stream_equals_generate_and_seed_reproduces():
    m, tok = _model(), ByteTokenizer()
    kw = {"max_new_tokens": 24, "temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 7, "stop_at_eot": False}
    text = generate(m, tok, "Once", **kw)
    assert "".join(stream(m, tok, "Once", **kw)) == text
    assert generate(m, tok, "Once", **kw) == text
    assert m.training  # mode restored


class _AlwaysEOT(nn.Module):
    def forward(self, h):  # (..., d) -> (..., V) with <|endoftext|> the most likely
        logits = torch.zeros(*h.shape[:-1], 257)
        logits[..., EOT] = 10.0
        return logits


def test_stops_at_end_of_text():
    m, tok = _model(), ByteTokenizer()
    m.lm_head = _AlwaysEOT()
    assert generate(m, tok, "hi", max_new_tokens=10, temperature=0) == ""
    out = generate(m, tok, "hi", max_new_tokens=2, temperature=0, stop_at_eot=False)
    assert out == "<|endoftext|>" * 2


def test_generation_slides_past_the_context_window():
    m = _model()
    long_prompt = list(range(40))  # longer than context_length=32: the last 32 are kept
    got = list(generate_tokens(m, long_prompt, max_new_tokens=70, temperature=0.0))
    assert len(got) == 70


def test_bad_inputs():
    m, tok = _model(), ByteTokenizer()
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        list(generate_tokens(m, [300], 3))
    with pytest.raises(ValueError, match="temperature"):
        generate(m, tok, "x", temperature=-1)
    small = _model(ModelConfig(vocab_size=200, context_length=16, d_model=16, n_layers=1, n_heads=2))
    with pytest.raises(ValueError, match="tokenizer has 257 tokens"):
        generate(small, tok, "x")


def test_empty_prompt_starts_from_eot():
    assert isinstance(generate(_model(), ByteTokenizer(), "", max_new_tokens=5, seed=0), str)


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40), st.lists(st.integers(1, 4), max_size=80))
def test_streamer_round_trips_any_text_in_any_token_split(text, cuts):
    """Tokens of 1-4 bytes cut anywhere (even inside characters): pieces are whole and join to the text."""
    data = text.encode("utf-8")
    vocab, ids, i, k = {}, [], 0, 0
    while i < len(data):
        n = cuts[k % len(cuts)] if cuts else 1
        vocab[len(vocab)] = data[i:i + n]
        ids.append(len(vocab) - 1)
        i, k = i + n, k + 1

    class Tok:
        pass

    tok = Tok()
    tok.vocab = vocab
    s = TextStreamer(tok)
    pieces = [s.push(t) for t in ids] + [s.flush()]
    assert "".join(pieces) == text
    for p in pieces:
        p.encode("utf-8")  # every piece is valid text on its own


def test_bad_input_fails_at_the_call_not_at_the_first_token():
    m, tok = _model(), ByteTokenizer()
    with pytest.raises(ValueError, match="top_p"):
        stream(m, tok, "x", top_p=2.0)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        generate_tokens(m, [999], 3)


def test_one_shot_engine_compile_turns_on_graphs_and_the_compiled_step():
    """``compile=True`` (``kiln generate --compile``) asks for CUDA graphs and the compiled decode step;
    the default one-shot engine has neither (a fresh engine per call would recapture them)."""
    from kiln.generate.engine import one_shot_engine

    m = _model()
    fast, plain = one_shot_engine(m, None, None, compile=True), one_shot_engine(m, None, None)
    assert fast.config.cuda_graphs and fast.config.compile_decode
    assert not plain.config.cuda_graphs and not plain.config.compile_decode
    assert fast.runner._decode != fast.runner._decode_core  # the step is wrapped by torch.compile
    assert plain.runner._decode == plain.runner._decode_core
