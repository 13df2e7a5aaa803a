"""Byte <-> printable-character map of GPT-2 (and Hugging Face byte-level BPE files).

GPT-2's ``vocab.json`` and ``merges.txt`` spell each byte as a printable Unicode character, so
that byte strings are JSON strings without escapes or spaces: printable Latin-1 bytes map to
themselves and the other 68 bytes to U+0100 upwards, in byte order (Radford et al. 2019,
openai/gpt-2 ``encoder.py: bytes_to_unicode``). Kiln's own ``tokenizer.json`` uses the same
spelling so that it is readable.
"""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    out = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in out:
            out[b] = chr(256 + n)
            n += 1
    return out


@lru_cache(maxsize=1)
def unicode_to_byte() -> dict[str, int]:
    """Inverse of ``byte_to_unicode``."""
    return {c: b for b, c in byte_to_unicode().items()}


@lru_cache(maxsize=1)
def _tables() -> tuple[dict[int, str], dict[int, str | None]]:
    enc = {b: c for b, c in byte_to_unicode().items()}
    dec: dict[int, str | None] = {ord(c): chr(b) for b, c in byte_to_unicode().items()}
    for i in range(256):  # Latin-1 characters outside the alphabet are invalid: translate deletes them
        dec.setdefault(i, None)
    return enc, dec


def bytes_to_str(b: bytes) -> str:
    """Spell a byte string with GPT-2's printable characters."""
    return b.decode("latin-1").translate(_tables()[0])


def str_to_bytes(s: str, where: str = "token") -> bytes:
    """Inverse of ``bytes_to_str``; ``where`` names the thing in the error."""
    r = s.translate(_tables()[1])
    try:
        if len(r) == len(s):
            return r.encode("latin-1")
    except UnicodeEncodeError:
        pass
    bad = next((c for c in s if c not in unicode_to_byte()), "?")
    raise ValueError(f"{where} {s!r} has character {bad!r}, which is not in GPT-2's byte alphabet")
