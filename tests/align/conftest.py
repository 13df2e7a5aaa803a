"""Fixtures for kiln.align tests: a small trained tokenizer with chat tokens and a tiny model."""

from __future__ import annotations

import pytest
import torch

from kiln.align.chat import add_chat_tokens
from kiln.tokenizer import Tokenizer, train_bpe

TEXT = (
    "The quick brown fox jumps over the lazy dog. What is two plus two? Two plus two is four.\n"
    "Hello! How are you today? I am fine, thank you. Answer: 42. The sum of 12 and 30 is 42.\n"
) * 20


@pytest.fixture(scope="session")
def base_tokenizer(tmp_path_factory) -> Tokenizer:
    p = tmp_path_factory.mktemp("tok") / "corpus.txt"
    p.write_text(TEXT)
    vocab, merges = train_bpe(p, 320, ["<|endoftext|>"])
    return Tokenizer(vocab, merges, ["<|endoftext|>"])


@pytest.fixture(scope="session")
def chat_tokenizer(base_tokenizer) -> Tokenizer:
    return add_chat_tokens(base_tokenizer)


def _tiny_model(vocab_size: int, seed: int = 0, context_length: int = 64, dtype=torch.float32):
    from kiln.model import ModelConfig
    from kiln.model.transformer import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab_size, context_length=context_length, d_model=32, n_layers=2, n_heads=2)
    return build_model(cfg, dtype=dtype)


@pytest.fixture
def tiny_model():
    """A factory: ``tiny_model(vocab_size, seed=0, context_length=64)`` -> a 2-layer Kiln Transformer."""
    return _tiny_model
