"""Access to the optional C core ``kiln.tokenizer._native`` (built by pip from ``_native.c``).

Everything the core does has a pure-Python reference in this package; the core is used when it
imports, and ``available()`` says whether it did. Importing this module loads nothing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from types import ModuleType

_STATE: dict[str, object] = {}


def _load() -> ModuleType | None:
    if "mod" not in _STATE:
        try:
            from kiln.tokenizer import _native  # type: ignore[attr-defined]

            _STATE["mod"], _STATE["err"] = _native, None
        except ImportError as e:
            _STATE["mod"], _STATE["err"] = None, str(e)
    return _STATE["mod"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the C core imported."""
    return _load() is not None


def import_error() -> str | None:
    """Why the C core did not import (None when it did)."""
    _load()
    return _STATE["err"]  # type: ignore[return-value]


def module() -> ModuleType:
    """The C core module; raises RuntimeError naming the fix when it is missing."""
    mod = _load()
    if mod is None:
        raise RuntimeError(f"the native tokenizer core is not built ({_STATE['err']}); run `pip install -e .` with a C compiler")
    return mod


# Split patterns the C pre-tokenizer implements (by name); others use the Python regex path.
NATIVE_PATTERNS = {"gpt2": 0, "gpt2_digits": 1, "cl100k": 2}


def pattern_id(pattern: str) -> int | None:
    """The C core's id for a split pattern name or regex, or None if the core lacks it."""
    from kiln.tokenizer.pretokenize import PATTERNS

    if pattern in NATIVE_PATTERNS:
        return NATIVE_PATTERNS[pattern]
    for name, regex in PATTERNS.items():
        if pattern == regex and name in NATIVE_PATTERNS:
            return NATIVE_PATTERNS[name]
    return None


def merge_words(word_counts: Mapping[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """C twin of ``train.merge_words_reference``."""
    return module().merge_words(list(word_counts.items()), num_merges)


def count_words_bytes(chunks: Iterable[bytes], pattern: str, special_tokens: Sequence[str], num_threads: int) -> Counter[bytes]:
    """Pre-token counts of UTF-8 byte chunks (each cut where ``safe_cut_bytes`` allows), on threads."""
    pid = pattern_id(pattern)
    if pid is None:
        raise ValueError(f"the C core has no pre-tokenizer for pattern {pattern!r}")
    counter = module().WordCounter(pid, [s.encode("utf-8") for s in special_tokens])
    for chunk in chunks:
        counter.add(chunk, num_threads)
    return Counter(dict(counter.items()))


def make_encoder(tok: object) -> object | None:
    """The C encoder for a ``Tokenizer``, or None where the core cannot serve its pattern."""
    pid = pattern_id(tok.pattern)  # type: ignore[attr-defined]
    if pid is None:
        return None
    triples = sorted((r, a, b, new) for (a, b), (r, new) in tok._ranks.items())  # type: ignore[attr-defined]
    specials = [(s.encode("utf-8"), i) for s, i in tok.special_tokens.items()]  # type: ignore[attr-defined]
    return module().Encoder(tok._byte_ids, [(a, b, new) for _, a, b, new in triples], specials, pid)  # type: ignore[attr-defined]
