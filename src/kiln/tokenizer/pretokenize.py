"""Pre-tokenization: split text on special tokens, then into pre-tokens with a regex.

BPE merges never cross a pre-token boundary (GPT-2, Radford et al. 2019, section 2.2), so a corpus
reduces to a multiset of pre-tokens ("words") and training only ever looks at that multiset.
This module is the pure-Python reference; ``kiln.tokenizer._native`` implements the same splits
in C and is tested equal to it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import lru_cache

import regex

log = logging.getLogger(__name__)

# GPT-2's split pattern (openai/gpt-2 encoder.py; tiktoken's "gpt2" pat_str is the same).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# GPT-4's (tiktoken "cl100k_base"): case-insensitive contractions, numbers in groups of 1-3.
CL100K_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
)
# GPT-2's pattern with every digit its own pre-token (digit splitting, as in Llama / PaLM).
GPT2_DIGITS_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Registry of named patterns (a plain dict literal).
PATTERNS: dict[str, str] = {
    "gpt2": GPT2_PATTERN,
    "cl100k": CL100K_PATTERN,
    "gpt2_digits": GPT2_DIGITS_PATTERN,
}

ENDOFTEXT = "<|endoftext|>"


def resolve_pattern(pattern: str) -> str:
    """A pattern name from ``PATTERNS`` or a literal regex -> the regex string."""
    return PATTERNS.get(pattern, pattern)


@lru_cache(maxsize=32)
def compile_pattern(pattern: str) -> regex.Pattern:
    """Compiled split regex for a pattern name or literal regex (cached)."""
    try:
        return regex.compile(resolve_pattern(pattern))
    except regex.error as e:
        raise ValueError(
            f"split pattern {pattern!r} is neither a name in {sorted(PATTERNS)} nor a valid regex: {e}"
        ) from e


@lru_cache(maxsize=32)
def _special_splitter(specials: tuple[str, ...]) -> regex.Pattern | None:
    if not specials:
        return None
    # Longest first so that a special token that contains another one wins.
    alts = "|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True))
    return regex.compile(f"({alts})")


def split_on_specials(text: str, specials: Sequence[str]) -> list[str]:
    """Split ``text`` at special tokens; odd indices of the result are the special tokens."""
    splitter = _special_splitter(tuple(specials))
    if splitter is None:
        return [text]
    return splitter.split(text)


def check_special_tokens(special_tokens: Iterable[object] | None) -> list[str]:
    """Validate special tokens: strings, non-empty, no duplicates. Returns them as a list."""
    out: list[str] = []
    for s in special_tokens or []:
        if not isinstance(s, str):
            raise TypeError(f"special token {s!r} is a {type(s).__name__}, not a str; pass strings like '<|endoftext|>'")
        if not s:
            raise ValueError("special token '' is empty; remove it")
        if s in out:
            raise ValueError(f"special token {s!r} is given twice; remove the duplicate")
        out.append(s)
    return out


def pretokenize(text: str, pattern: str = "gpt2") -> list[str]:
    """Pre-tokens of ``text`` (no special-token handling)."""
    return compile_pattern(pattern).findall(text)


def count_words(texts: Iterable[str], pattern: str = "gpt2", special_tokens: Sequence[str] = ()) -> Counter[bytes]:
    """Multiset of pre-tokens (as UTF-8 bytes) over ``texts``; special tokens are dropped.

    Text decoded with ``errors="surrogateescape"`` keeps invalid UTF-8 bytes: they come back here
    as the same raw bytes, so byte-level BPE loses nothing.
    """
    pat = compile_pattern(pattern)
    counts: Counter[str] = Counter()
    for text in texts:
        parts = split_on_specials(text, special_tokens)
        for part in parts[0::2]:
            counts.update(pat.findall(part))
    return Counter({w.encode("utf-8", "surrogateescape"): c for w, c in counts.items()})


_ESCAPED = regex.compile("[\udc80-\udcff]")  # invalid UTF-8 bytes under surrogateescape
_SAFE_CUT = regex.compile(r"(?r)\S(?= \p{L})")


def safe_cut(text: str, special_tokens: Sequence[str] = ()) -> int:
    """The last index where ``text`` can be cut without changing its pre-tokens (0 if none).

    Two kinds of cut are exact: just after a special token (text is split on them first), and
    between a non-space character and a space followed by a letter: with the GPT-2, digit-splitting
    and cl100k patterns no pre-token crosses that point, and matching restarts there as it would
    at the start of a string. (A custom pattern may not have this property.)
    """
    best = 0
    for s in special_tokens:
        k = text.rfind(s)
        if k >= 0:
            best = max(best, k + len(s))
    # Stay a special token's length from the end: a partial special token there must not be cut.
    end = len(text) - max((len(s) for s in special_tokens), default=0)
    m = _SAFE_CUT.search(text, best, end) if end > best else None
    if m is not None:
        cut = m.end()
        # Never cut inside a special token (one that contains " x", say).
        if not any(s in text[max(0, cut - len(s)) : cut + len(s)] for s in special_tokens if " " in s):
            best = max(best, cut)
    return best


def iter_text_chunks(
    path: str | os.PathLike, chunk_chars: int = 1 << 22, special_tokens: Sequence[str] = (ENDOFTEXT,)
) -> Iterator[str]:
    """Stream a text file in chunks of about ``chunk_chars`` characters, cut where ``safe_cut`` says.

    Pre-tokenizing the chunks one by one gives exactly the pre-tokens of the whole file. Invalid
    UTF-8 is kept through ``surrogateescape``. Memory stays bounded unless the file has no safe cut
    for a long stretch (then the chunk grows until one appears).
    """
    reported = False
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        buf = ""
        while True:
            block = f.read(chunk_chars)
            if not block:
                break
            if not reported and _ESCAPED.search(block):
                log.warning("%s: invalid UTF-8 (kept as raw bytes; reported once per file)", path)
                reported = True
            buf += block
            cut = safe_cut(buf, special_tokens)
            if cut <= 0:
                continue  # no safe cut yet: keep reading
            yield buf[:cut]
            buf = buf[cut:]
        if buf:
            yield buf
