"""Text generation: prefill the prompt into a KV cache, then decode one token at a time.

``generate_tokens`` yields token ids; ``stream`` turns them into text pieces holding only complete
UTF-8 characters (a byte-level BPE token can end in the middle of a multi-byte character);
``generate`` joins the pieces. When the context fills up, the cache is rebuilt from the last 3/4 of
the context (a sliding window), so ``max_new_tokens`` may exceed ``context_length``.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import Tensor

from kiln.generate.sampling import check_sampling_args, sample_next
from kiln.model import KVCache, Transformer


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


def _next_logits(model: Transformer, ids: list[int], cache: KVCache) -> Tensor:
    """Feed ``ids`` through the model into ``cache``; logits of the last position, (1, V) fp32."""
    device = cache.k[0].device
    with torch.inference_mode():
        x = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
        h = model.hidden_states(x, kv_cache=cache)[:, -1]  # (1, d_model): only the last row is needed
        return model.lm_head(h).float()  # (1, V)


def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    vocab_limit: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` sampled token ids after ``prompt_ids``; stop before ``eot_id``.

    A prompt longer than the context keeps its last ``context_length`` tokens. ``seed`` makes the
    draw reproducible (on a given device). The model is put in eval mode while generating.
    ``vocab_limit`` (the tokenizer's vocabulary size) keeps sampling away from the padding rows of
    a model whose vocabulary was rounded up for speed (e.g. 50257 -> 50304).
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if not prompt_ids:
        raise ValueError("prompt_ids is empty; give at least one token (e.g. the end-of-text id)")
    V, ctx = model.config.vocab_size, model.config.context_length
    bad = [i for i in prompt_ids if not 0 <= i < V]
    if bad:
        raise ValueError(
            f"prompt token id {bad[0]} is outside the model's vocabulary of {V}; "
            "the tokenizer does not match this model"
        )
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    # Checked above, eagerly; the loop itself is a separate generator so bad input fails at the call.
    limit = V if vocab_limit is None else min(V, vocab_limit)
    return _decode_loop(
        model, list(prompt_ids[-ctx:]), max_new_tokens, temperature, top_k, top_p, generator, eot_id, limit
    )


def window_keep(context_length: int) -> int:
    """Tokens kept when a full context slides: the most recent 3/4, re-encoded from position 0
    (one re-encode per ``context_length // 4`` new tokens instead of one per token)."""
    return max(1, context_length - context_length // 4)


def _decode_loop(
    model: Transformer,
    ids: list[int],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    eot_id: int | None,
    vocab_limit: int,
) -> Iterator[int]:
    """Prefill ``ids`` into a fresh KV cache, then sample and feed one token at a time."""
    ctx = model.config.context_length
    keep = window_keep(ctx)
    cache = KVCache.for_model(model, batch_size=1)
    was_training = model.training
    model.eval()
    try:
        logits = _next_logits(model, ids, cache)
        for _ in range(max_new_tokens):
            nxt = int(sample_next(logits[:, :vocab_limit], temperature, top_k, top_p, generator)[0])
            if eot_id is not None and nxt == eot_id:
                return
            ids.append(nxt)
            yield nxt
            if cache.length >= ctx:  # context full: re-encode the most recent tokens from position 0
                cache.reset()
                ids = ids[-keep:]
                logits = _next_logits(model, ids, cache)
            else:
                logits = _next_logits(model, [nxt], cache)
    finally:
        model.train(was_training)


def stream(
    model: Transformer,
    tokenizer: TokenizerLike,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as they decode (prompt not included).

    Each piece holds only complete characters. An empty prompt starts from the end-of-text token.
    Stops after ``max_new_tokens`` tokens or, with ``stop_at_eot``, at the end-of-text token.
    """
    limit = tokenizer_vocab_limit(model, tokenizer)
    eot = getattr(tokenizer, "eot_id", None)
    tokens = generate_tokens(
        model, prompt_ids(tokenizer, prompt), max_new_tokens, temperature, top_k, top_p, seed,
        eot if stop_at_eot else None, vocab_limit=limit,
    )
    return _text_pieces(tokens, TextStreamer(tokenizer))


def tokenizer_vocab_limit(model: Transformer, tokenizer: TokenizerLike) -> int | None:
    """The tokenizer's vocabulary size, the bound sampling keeps to (a model's padded vocabulary has
    ids no tokenizer can decode); refuses a tokenizer larger than the model's vocabulary."""
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if not isinstance(tok_vocab, int):
        return None
    if tok_vocab > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok_vocab} tokens but the model's vocab_size is {model.config.vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    return tok_vocab


def prompt_ids(tokenizer: TokenizerLike, prompt: str) -> list[int]:
    """``prompt`` encoded; an empty prompt starts from the end-of-text token."""
    ids = list(tokenizer.encode(prompt))
    if not ids:
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token; give a prompt")
        ids = [eot]
    return ids


def _text_pieces(tokens: Iterator[int], streamer: TextStreamer) -> Iterator[str]:
    for t in tokens:
        piece = streamer.push(t)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail


def generate(
    model: Transformer,
    tokenizer: TokenizerLike,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
) -> str:
    """The continuation of ``prompt`` (without the prompt) as one string; see ``stream``."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eot))
