"""Incremental detokenization: token ids in, complete UTF-8 text pieces out (``TextStreamer``), and
what generation needs of a tokenizer (``TokenizerLike``). Used by the one-call helpers (``engine``)
and by ``LLMEngine`` for its decoded deltas."""

from __future__ import annotations

import codecs
from typing import Any, Protocol


class TokenizerLike(Protocol):
    """What generation needs of a tokenizer (``kiln.tokenizer.Tokenizer`` has it)."""

    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class TextStreamer:
    """Incremental detokenizer: ``push(id)`` returns the newly completed text (maybe "").

    Uses the tokenizer's ``vocab`` (id -> bytes) and an incremental UTF-8 decoder when there is one,
    so bytes of a character split across tokens are held back until it is complete. Otherwise it
    re-decodes the ids so far and holds back trailing U+FFFD replacement characters.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = getattr(tokenizer, "vocab", None)
        is_bytes = isinstance(vocab, dict) and isinstance(next(iter(vocab.values()), b""), (bytes, bytearray))
        self._vocab: dict[int, bytes] | None = vocab if is_bytes else None
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the characters it completes ("" while a character is partial)."""
        if self._vocab is not None:
            b = self._vocab.get(token_id)
            if b is None:  # e.g. a special token kept outside the byte vocabulary
                b = self.tokenizer.decode([token_id]).encode("utf-8")
            return self._utf8.decode(b)
        self._ids.append(token_id)
        text = self.tokenizer.decode(self._ids)
        complete = len(text.rstrip("\ufffd"))
        piece = text[self._emitted:complete]
        self._emitted = max(self._emitted, complete)
        return piece

    def flush(self) -> str:
        """Whatever is held back (an incomplete character becomes U+FFFD)."""
        if self._vocab is not None:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._ids)
        piece = text[self._emitted:]
        self._emitted = len(text)
        return piece
