"""Toxicity / NSFW scoring: a word-list score, plus any classifier passed in as a callable.

The bundled signal is lexical (as C4's "bad words" rule and FineWeb's URL filter are): the share of
words that are on a list of explicit sexual and slur terms, plus a flag for URLs of adult domains.
A list of a few dozen unambiguous terms is shipped in code (no download); a larger list
(e.g. LDNOOBW's) can be given as a file, one term a line. A model-based classifier fits the same
slot through ``ToxicityConfig`` + ``toxicity_filter(..., scorer=callable)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

# Unambiguous explicit terms only (common words with innocent senses are left out on purpose).
# Stored lightly obfuscated (reversed) so the source reads cleanly.
_BUILTIN_REVERSED = (
    "nrop", "onrop", "yhpargonrop", "xxx", "iatneh", "kcuf", "gnikcuf", "rekcufrehtom", "tnuc",
    "bojwolb", "bojdnah", "ekaknub", "eipmaerc", "gnimaerc", "gnibbab", "yggod", "noitabrutsam",
    "etabrutsam", "namtsehcnu", "tihs", "hctib", "eyogaf", "toggaf", "reggin", "aggin", "ekyk",
    "knihc", "kcips", "tellub", "elohssa", "onsrop", "mahmaerc", "nrobtuc", "ydlub", "tobkcuf",
)
_ADULT_URL_RE = re.compile(r"(?:porn|xxx|sex|nude|xvideos|xhamster|onlyfans|hentai)", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z]+")


def builtin_terms() -> frozenset[str]:
    """The built-in explicit-term list."""
    return frozenset(t[::-1] for t in _BUILTIN_REVERSED)


@dataclass(frozen=True)
class ToxicityConfig:
    """Drop documents that look toxic or pornographic."""

    max_score: float = 0.01
    """Drop when the share of listed words exceeds this (1 listed word in 100)."""
    word_list: str | None = None
    """Extra terms, one per line (added to the built-in list)."""
    check_url: bool = True
    """Drop documents whose URL names an adult site."""


def load_terms(cfg: ToxicityConfig) -> frozenset[str]:
    terms = set(builtin_terms())
    if cfg.word_list:
        terms |= {ln.strip().lower() for ln in Path(cfg.word_list).read_text().splitlines() if ln.strip()}
    return frozenset(terms)


def toxicity_score(text: str, terms: frozenset[str]) -> float:
    """Share of words (lower-cased ASCII letters runs) that are listed terms."""
    ws = _WORD_RE.findall(text.lower())
    if not ws:
        return 0.0
    return sum(w in terms for w in ws) / len(ws)


def toxicity_filter(
    cfg: ToxicityConfig, scorer: Callable[[str], float] | None = None
) -> Callable[[str, str | None], tuple[str | None, float]]:
    """A function ``(text, url) -> (drop reason or None, score)``; ``scorer`` replaces the word list."""
    terms = load_terms(cfg)
    score_fn = scorer or (lambda t: toxicity_score(t, terms))

    def check(text: str, url: str | None = None) -> tuple[str | None, float]:
        if cfg.check_url and url and _ADULT_URL_RE.search(url):
            return "toxic_url", 1.0
        s = score_fn(text)
        return ("toxic_words" if s > cfg.max_score else None), s

    return check
