"""Hugging Face tokenizer.json and tiktoken ranks: export, import, and equal ids in those libraries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_samples import VARIED, read_exact

from kiln.tokenizer import Tokenizer, train_bpe
from kiln.tokenizer.interop import (
    from_hf_json,
    from_tiktoken,
    load_tiktoken_ranks,
    save_hf,
    save_tiktoken,
    to_tiktoken,
    to_tiktoken_ranks,
)


@pytest.fixture(scope="module", params=["gpt2", "cl100k"])
def tok(request: pytest.FixtureRequest, varied_corpus: Path) -> Tokenizer:
    vocab, merges = train_bpe(varied_corpus, 900, ["<|endoftext|>", "<|pad|>"], pattern=request.param)
    return Tokenizer(vocab, merges, ["<|endoftext|>", "<|pad|>"], pattern=request.param)


def _texts(corpus: Path) -> list[str]:
    return [*VARIED, read_exact(corpus)[:50_000]]


def test_hf_roundtrip(tok: Tokenizer, tmp_path: Path, varied_corpus: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    path = save_hf(tok, tmp_path / "hf.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    for text in [*_texts(varied_corpus), "a<|endoftext|>b<|pad|>"]:
        ids = tok.encode(text)
        assert hf.encode(text).ids == ids, text[:60]
        assert hf.decode(ids, skip_special_tokens=False) == text
    back = from_hf_json(path)
    assert back.vocab == tok.vocab and back.merges == tok.merges and back.special_tokens == tok.special_tokens
    assert back.pattern == tok.pattern


def test_hf_import_of_gpt2_layout(gpt2_files: tuple[Path, Path], tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    gpt2 = Tokenizer.from_gpt2_files(*gpt2_files)
    path = save_hf(gpt2, tmp_path / "gpt2.json")
    hf = tokenizers.Tokenizer.from_file(str(path))
    text = " ".join(VARIED)
    assert hf.encode(text).ids == gpt2.encode(text)
    assert from_hf_json(path).encode(text) == gpt2.encode(text)


def test_hf_import_errors(tmp_path: Path) -> None:
    p = tmp_path / "wp.json"
    p.write_text(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    with pytest.raises(ValueError, match="not a byte-level BPE"):
        from_hf_json(p)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_hf_json(tmp_path / "missing.json")


def test_tiktoken_roundtrip(tok: Tokenizer, tmp_path: Path, varied_corpus: Path) -> None:
    pytest.importorskip("tiktoken")
    enc = to_tiktoken(tok)
    for text in _texts(varied_corpus):
        assert enc.encode(text, allowed_special="all") == tok.encode(text), text[:60]
    path = save_tiktoken(tok, tmp_path / "kiln.tiktoken")
    ranks = load_tiktoken_ranks(path)
    assert ranks == to_tiktoken_ranks(tok)
    back = from_tiktoken(path, pattern=tok.pattern, special_tokens=tok.special_tokens)
    assert back.merges == tok.merges and back.vocab == tok.vocab


def test_tiktoken_import_of_gpt2(gpt2_files: tuple[Path, Path]) -> None:
    gpt2 = Tokenizer.from_gpt2_files(*gpt2_files)
    back = from_tiktoken(to_tiktoken_ranks(gpt2), special_tokens={"<|endoftext|>": 50256})
    text = " ".join(VARIED)
    assert back.encode(text) == gpt2.encode(text) and back.vocab_size == 50257
