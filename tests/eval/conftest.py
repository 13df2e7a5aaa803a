"""Tiny stand-ins for evaluation tests: a character tokenizer and a bigram model whose log-probs
are chosen by hand, so every score in these tests can be checked on paper."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch


class CharTokenizer:
    """One token per character of ``chars`` (id 0 is ``<|endoftext|>``)."""

    def __init__(self, chars: str) -> None:
        self.chars = ["<|endoftext|>", *chars]
        self.ids = {c: i for i, c in enumerate(self.chars)}
        self.eot_id = 0
        self.vocab_size = len(self.chars)

    def encode(self, text: str) -> list[int]:
        return [self.ids[c] for c in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids if i != 0)

    def token_bytes(self) -> list[int]:
        return [0] + [len(c.encode("utf-8")) for c in self.chars[1:]]


@dataclass(frozen=True)
class _Cfg:
    context_length: int
    vocab_size: int


class BigramModel(torch.nn.Module):
    """logits[b, t] = log P(. | idx[b, t]) from a table of next-token probabilities."""

    def __init__(self, probs: torch.Tensor, context_length: int = 64) -> None:
        super().__init__()
        assert torch.allclose(probs.sum(-1), torch.ones(len(probs), dtype=probs.dtype))
        self.table = torch.nn.Parameter(probs.log().float(), requires_grad=False)
        self.config = _Cfg(context_length, probs.shape[0])
        self.calls: list[tuple[int, int]] = []

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        assert idx.shape[1] <= self.config.context_length
        self.calls.append(tuple(idx.shape))
        return self.table[idx]  # (B, T, V)


CHARS = " abéq:"  # ids: eot 0, ' ' 1, a 2, b 3, é 4, q 5, : 6


def hand_table() -> torch.Tensor:
    """Next-token probabilities, rows = previous token (see test_multiple_choice for the sums)."""
    V = 7
    P = torch.full((V, V), 1 / V, dtype=torch.float64)
    sp, a, b, e, q, colon = 1, 2, 3, 4, 5, 6

    def row(prev: int, fixed: dict[int, float]) -> None:
        rest = (1 - sum(fixed.values())) / (V - len(fixed))
        P[prev] = rest
        for k, v in fixed.items():
            P[prev, k] = v

    row(colon, {sp: 1 / 2})
    row(sp, {a: 1 / 4, b: 1 / 2, e: 1 / 8})
    row(b, {b: 1 / 2})
    row(e, {e: 1 / 2})
    return P


@pytest.fixture
def char_tok() -> CharTokenizer:
    return CharTokenizer(CHARS)


@pytest.fixture
def bigram() -> BigramModel:
    return BigramModel(hand_table())




@pytest.fixture
def make_bigram():
    """Factory: ``make_bigram(probs=None, context_length=64)``."""
    return lambda probs=None, context_length=64: BigramModel(hand_table() if probs is None else probs, context_length)


@pytest.fixture
def make_char_tok():
    """Factory: ``make_char_tok(chars)``."""
    return CharTokenizer
