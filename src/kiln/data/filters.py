"""Heuristic quality rules: Gopher quality and repetition (Rae et al. 2021, arXiv:2112.11446, App. A)
and C4 (Raffel et al. 2020, arXiv:1910.10683, Sec. 2.2).

Each rule is a pure function ``text -> drop reason | None`` (C4 also rewrites lines, so it returns
the cleaned text and a reason). The thresholds are fields of frozen config dataclasses whose defaults
are the papers' values; the pipeline wraps them as steps and counts every reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*", re.UNICODE)
_PARA_SPLIT_RE = re.compile(r"\n\s*\n")
_ALPHA_RE = re.compile(r"[^\W\d_]", re.UNICODE)
_BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "–", "-", "*", "·", "◦", "‣")
_ELLIPSES = ("...", "…")
# Gopher's stop-word rule: a real English text uses at least two of these.
GOPHER_STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})


def words(text: str) -> list[str]:
    """Word tokens (Unicode word characters with inner apostrophes); punctuation is not a word."""
    return _WORD_RE.findall(text)


@dataclass(frozen=True)
class GopherQualityConfig:
    """Gopher "quality filter" thresholds (arXiv:2112.11446, Table A1)."""

    min_words: int = 50
    """Fewer words than this: too short to be a document."""
    max_words: int = 100_000
    """More words than this: a dump, not a document."""
    min_mean_word_length: float = 3.0
    """Mean word length in characters below this: lists of codes or symbols."""
    max_mean_word_length: float = 10.0
    """Mean word length above this: URLs, hashes, concatenated junk."""
    max_symbol_word_ratio: float = 0.1
    """Ratio of '#' and ellipses to words above this: tag clouds and teasers."""
    max_bullet_lines_ratio: float = 0.9
    """Fraction of lines starting with a bullet above this: navigation menus."""
    max_ellipsis_lines_ratio: float = 0.3
    """Fraction of lines ending with an ellipsis above this: truncated previews."""
    min_alpha_words_ratio: float = 0.8
    """Fraction of whitespace tokens with an alphabetic character below this: tables, code, numbers."""
    min_stop_words: int = 2
    """Fewer distinct Gopher stop words than this: not natural English prose."""


def gopher_quality(text: str, cfg: GopherQualityConfig = GopherQualityConfig()) -> str | None:
    """Drop reason under Gopher's quality rules, or None to keep."""
    ws = words(text)
    n = len(ws)
    if n < cfg.min_words:
        return "gopher_short_doc"
    if n > cfg.max_words:
        return "gopher_long_doc"
    mean_len = sum(map(len, ws)) / n
    if mean_len < cfg.min_mean_word_length:
        return "gopher_below_avg_word_length"
    if mean_len > cfg.max_mean_word_length:
        return "gopher_above_avg_word_length"
    symbols = text.count("#") + sum(text.count(e) for e in _ELLIPSES)
    if symbols / n > cfg.max_symbol_word_ratio:
        return "gopher_symbol_word_ratio"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if lines:
        if sum(ln.lstrip().startswith(_BULLETS) for ln in lines) / len(lines) > cfg.max_bullet_lines_ratio:
            return "gopher_bullet_lines"
        if sum(ln.rstrip().endswith(_ELLIPSES) for ln in lines) / len(lines) > cfg.max_ellipsis_lines_ratio:
            return "gopher_ellipsis_lines"
    tokens = text.split()
    if sum(1 for t in tokens if _ALPHA_RE.search(t)) / max(len(tokens), 1) < cfg.min_alpha_words_ratio:
        return "gopher_alpha_words_ratio"
    if len(GOPHER_STOP_WORDS.intersection(w.lower() for w in ws)) < cfg.min_stop_words:
        return "gopher_stop_words"
    return None


@dataclass(frozen=True)
class GopherRepetitionConfig:
    """Gopher repetition thresholds (arXiv:2112.11446, Table A1)."""

    max_dup_line_frac: float = 0.30
    """Fraction of lines that duplicate an earlier line."""
    max_dup_para_frac: float = 0.30
    """Fraction of paragraphs that duplicate an earlier paragraph."""
    max_dup_line_char_frac: float = 0.20
    """Fraction of characters in duplicated lines."""
    max_dup_para_char_frac: float = 0.20
    """Fraction of characters in duplicated paragraphs."""
    top_ngram_max_frac: tuple[tuple[int, float], ...] = ((2, 0.20), (3, 0.18), (4, 0.16))
    """(n, max fraction of characters covered by the most frequent n-gram)."""
    dup_ngram_max_frac: tuple[tuple[int, float], ...] = (
        (5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10),
    )
    """(n, max fraction of characters inside n-grams that occur more than once)."""


def _dup_stats(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, characters in those items)."""
    seen: set[str] = set()
    n_dup = chars_dup = 0
    for it in items:
        if it in seen:
            n_dup += 1
            chars_dup += len(it)
        else:
            seen.add(it)
    return n_dup, chars_dup


_MULTS = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9, 0xD6E8FEB86659FD93,
                   0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 0x94D049BB133111EB, 0xBF58476D1CE4E5B9,
                   0x8CB92BA72F3D8DD7, 0xA0761D6478BD642F], dtype=np.uint64)


def _ngram_ids(word_ids: np.ndarray, n: int) -> np.ndarray:
    """One id per word n-gram: a 64-bit polynomial hash of the word ids (collisions ~2**-64), made
    dense with ``np.unique``. Shape (len - n + 1,)."""
    m = len(word_ids) - n + 1
    w = word_ids.astype(np.uint64) + np.uint64(1)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in range(n):
            h = (h ^ (w[k : k + m] * _MULTS[k % len(_MULTS)])) * np.uint64(0x100000001B3)
    return np.unique(h, return_inverse=True)[1].reshape(-1)


def _top_ngram_frac(word_ids: np.ndarray, lens: np.ndarray, n: int, total_chars: int) -> float:
    """Characters covered by the most frequent n-gram (occurrences x its length) / all characters."""
    if len(word_ids) < n:
        return 0.0
    gid = _ngram_ids(word_ids, n)
    counts = np.bincount(gid)
    top = int(counts.argmax())
    if counts[top] <= 1:
        return 0.0
    first = int(np.flatnonzero(gid == top)[0])
    return float(lens[first : first + n].sum()) * int(counts[top]) / total_chars


def _dup_ngram_frac(word_ids: np.ndarray, lens: np.ndarray, n: int, total_chars: int) -> float:
    """Characters of words inside n-grams occurring more than once (each word counted once)."""
    if len(word_ids) < n:
        return 0.0
    gid = _ngram_ids(word_ids, n)
    dup_start = np.bincount(gid)[gid] > 1  # (len - n + 1,) n-gram starting here is repeated
    if not dup_start.any():
        return 0.0
    # A word is covered when a repeated n-gram starts in [i - n + 1, i]: a difference array.
    diff = np.zeros(len(word_ids) + 1, dtype=np.int32)
    starts = np.flatnonzero(dup_start)
    np.add.at(diff, starts, 1)
    np.add.at(diff, starts + n, -1)
    covered = np.cumsum(diff[:-1]) > 0
    return float(lens[covered].sum()) / total_chars


def gopher_repetition(text: str, cfg: GopherRepetitionConfig = GopherRepetitionConfig()) -> str | None:
    """Drop reason under Gopher's repetition rules, or None to keep."""
    paras = [p.strip() for p in _PARA_SPLIT_RE.split(text) if p.strip()]
    if paras:
        n_dup, chars_dup = _dup_stats(paras)
        if n_dup / len(paras) > cfg.max_dup_para_frac:
            return "gopher_dup_para_frac"
        if chars_dup / max(len(text), 1) > cfg.max_dup_para_char_frac:
            return "gopher_dup_para_char_frac"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if lines:
        n_dup, chars_dup = _dup_stats(lines)
        if n_dup / len(lines) > cfg.max_dup_line_frac:
            return "gopher_dup_line_frac"
        if chars_dup / max(len(text), 1) > cfg.max_dup_line_char_frac:
            return "gopher_dup_line_char_frac"
    ws = [w.lower() for w in words(text)]
    total = sum(map(len, ws))
    if total == 0:
        return None
    vocab: dict[str, int] = {}
    word_ids = np.fromiter((vocab.setdefault(w, len(vocab)) for w in ws), dtype=np.int64, count=len(ws))
    lens = np.fromiter(map(len, ws), dtype=np.int64, count=len(ws))
    for n, max_frac in cfg.top_ngram_max_frac:
        if _top_ngram_frac(word_ids, lens, n, total) > max_frac:
            return f"gopher_top_{n}gram"
    for n, max_frac in cfg.dup_ngram_max_frac:
        if _dup_ngram_frac(word_ids, lens, n, total) > max_frac:
            return f"gopher_dup_{n}gram"
    return None


@dataclass(frozen=True)
class C4Config:
    """C4 clean-up rules (arXiv:1910.10683, Sec. 2.2)."""

    min_words_per_line: int = 3
    """Lines with fewer words are removed (C4 keeps lines of at least 3 words... of 5 in some ports)."""
    require_terminal_punct: bool = True
    """Remove lines not ending in terminal punctuation."""
    min_sentences: int = 3
    """Pages with fewer sentences after clean-up are dropped."""
    remove_javascript_lines: bool = True
    """Remove lines mentioning "javascript" (a "please enable JavaScript" banner)."""
    remove_policy_lines: bool = True
    """Remove lines about cookies, terms of use and privacy policies."""
    drop_lorem_ipsum: bool = True
    """Drop pages containing "lorem ipsum" (placeholder text)."""
    drop_curly_bracket: bool = True
    """Drop pages containing "{" (code, not prose)."""


_TERMINAL = (".", "!", "?", '"', "'", "”", "’", "。", "！", "？")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_SENTENCE_RE = re.compile(r"[.!?。！？]+(?:\s|$)")


def c4_clean(text: str, cfg: C4Config = C4Config()) -> tuple[str, str | None, int]:
    """Apply C4's rules: ``(cleaned text, drop reason or None, number of lines removed)``."""
    low = text.lower()
    if cfg.drop_lorem_ipsum and "lorem ipsum" in low:
        return text, "c4_lorem_ipsum", 0
    if cfg.drop_curly_bracket and "{" in text:
        return text, "c4_curly_bracket", 0
    kept: list[str] = []
    removed = 0
    for line in text.split("\n"):
        s = line.strip()
        if not s:
            kept.append("")
            continue
        ls = s.lower()
        if (
            (cfg.require_terminal_punct and not s.endswith(_TERMINAL))
            or len(s.split()) < cfg.min_words_per_line
            or (cfg.remove_javascript_lines and "javascript" in ls)
            or (cfg.remove_policy_lines and any(p in ls for p in _POLICY))
        ):
            removed += 1
            continue
        kept.append(line)
    cleaned = re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()
    if len(_SENTENCE_RE.findall(cleaned)) < cfg.min_sentences:
        return cleaned, "c4_too_few_sentences", removed
    return cleaned, None, removed
