"""HTML -> text, keeping paragraph structure; and how to measure extractors.

Methods (``ExtractConfig.method``):

- ``"kiln"`` (default): resiliparse's fast main-content pass (as ``minimal_html``), then Kiln's block
  classifier (:mod:`kiln.data.boilerplate`) drops the boilerplate blocks and three rule-matched
  families ("Read More" teasers, gallery counters and captions, staff lists); pages left with under
  ``min_chars_before_fallback`` characters (~3%) are re-extracted by trafilatura. 5-fold
  cross-validated F1 0.926 on the trafilatura evaluation set (trafilatura 0.918 on the same folds),
  ~5x trafilatura's speed (docs/data.md).
- ``"resiliparse"``: resiliparse's main-content extraction without comments, nav, footer, aside and
  forms (C++, ~150-280 pages/s/core here, F1 ~0.86 on the trafilatura evaluation set). ``pip install resiliparse``.
- ``"trafilatura"``: trafilatura without its fallbacks and comments (~28 pages/s/core here, F1 0.918).
  ``pip install trafilatura``.
- ``"hybrid"``: resiliparse first; trafilatura only for pages where resiliparse returns almost
  nothing (so a page is rarely lost), at nearly resiliparse's speed.

:func:`evaluate_extraction` scores any ``html, url -> text`` function against trafilatura's
``evaldata.json`` (text a good extractor must keep, boilerplate it must drop), the way trafilatura's
own evaluation does: a "with" snippet found is a true positive, a "without" snippet found a false
positive.
"""

from __future__ import annotations

import json
import re
import tarfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

METHODS = ("kiln", "resiliparse", "trafilatura", "hybrid")
SKIP_ELEMENTS = ("nav", "footer", "aside", "form")
"""Elements resiliparse never extracts from."""


@dataclass(frozen=True)
class ExtractConfig:
    """HTML to text extraction."""

    method: str = "kiln"
    """One of ``kiln``, ``resiliparse``, ``trafilatura``, ``hybrid`` (see the module doc)."""
    min_chars_before_fallback: int = 200
    """``kiln`` and ``hybrid``: a result shorter than this is retried with trafilatura."""
    block_threshold: float = 0.5
    """``kiln``: keep blocks whose content probability is at least this (higher: more precision)."""
    min_words_per_line: int = 0
    """Drop extracted lines with fewer words (0 keeps all; 3-5 trades recall for precision)."""
    drop_families: bool = True
    """``kiln``: drop "Read More" teasers (and their headline), gallery counters and photo captions,
    and staff lists (:func:`kiln.data.boilerplate.family_of`), also from trafilatura's fallback text."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.block_threshold <= 1.0:
            raise ValueError(f"block_threshold={self.block_threshold} must be a probability in [0, 1]")
        if self.method not in METHODS:
            raise ValueError(f"extract method {self.method!r} is unknown; pick one of {', '.join(METHODS)}")


def _resiliparse(html: str, url: str | None = None) -> str:
    try:
        from resiliparse.extract.html2text import extract_plain_text
    except ImportError as e:
        raise ImportError("extraction with resiliparse needs it: pip install resiliparse") from e
    # comments=False and skipping nav/footer/aside/form: +0.015 F1 and faster on the evaluation set
    # (docs/LOG.md); class-name selectors (share, related, date...) cost more recall than
    # they gain in precision.
    return extract_plain_text(html, main_content=True, alt_texts=False, comments=False, skip_elements=list(SKIP_ELEMENTS))


def _trafilatura(html: str, url: str | None = None) -> str:
    if "<" not in html:  # not HTML at all: nothing to extract (and trafilatura would log an error)
        return ""
    try:
        import trafilatura
    except ImportError as e:
        raise ImportError("extraction with trafilatura needs it: pip install trafilatura") from e
    # include_comments=False: user comments are boilerplate for a pretraining corpus (and the
    # evaluation set's "without" snippets); +0.004 F1, and faster
    return trafilatura.extract(html, url=url, fast=True, include_comments=False) or ""


def _kiln(html: str, threshold: float, families: bool = True) -> str:
    try:
        from resiliparse.extract.html2text import extract_plain_text
    except ImportError as e:
        raise ImportError("extraction needs resiliparse: pip install resiliparse") from e
    from kiln.data.boilerplate import block_probabilities, drop_families, html_blocks

    mh = extract_plain_text(
        html, preserve_formatting="minimal_html", main_content=True, alt_texts=False, comments=False,
        links=True, skip_elements=list(SKIP_ELEMENTS),
    )
    blocks = html_blocks(mh)
    keep = [bool(q >= threshold) for q in block_probabilities(blocks)]
    if families:
        keep = drop_families(blocks, keep)
    return "\n\n".join(b.text for b, k in zip(blocks, keep) if k)


def _drop_family_lines(text: str) -> str:
    from kiln.data.boilerplate import family_of

    return "\n".join(ln for ln in text.split("\n") if not ln.strip() or family_of(ln) is None)


def extract_text(html: str, url: str | None = None, cfg: ExtractConfig = ExtractConfig()) -> str:
    """Main text of an HTML page; paragraphs separated by blank lines, lines by newlines."""
    if cfg.method == "trafilatura":
        text = _trafilatura(html, url)
    elif cfg.method == "kiln":
        text = _kiln(html, cfg.block_threshold, cfg.drop_families)
        if len(text) < cfg.min_chars_before_fallback:
            alt = _trafilatura(html, url)
            if cfg.drop_families:
                alt = _drop_family_lines(alt)
            if len(alt) > len(text):
                text = alt
    else:
        text = _resiliparse(html, url)
        if cfg.method == "hybrid" and len(text) < cfg.min_chars_before_fallback:
            alt = _trafilatura(html, url)
            if len(alt) > len(text):
                text = alt
    if cfg.min_words_per_line:
        text = "\n".join(ln for ln in text.split("\n") if not ln.strip() or len(ln.split()) >= cfg.min_words_per_line)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ---- evaluation -------------------------------------------------------------------------------------


def load_trafilatura_eval(tar_path: str) -> list[dict[str, Any]]:
    """Pages of trafilatura's evaluation archive: ``[{"url", "html", "with", "without"}]``.

    Reads ``evaldata.json`` and the HTML files (``tests/cache`` or ``tests/eval``) from the tarball
    in memory; the HTML bytes are decoded with :func:`kiln.data.warc.decode_html`.
    """
    from kiln.data.warc import decode_html

    files: dict[str, bytes] = {}
    evaldata: dict[str, Any] = {}
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            if m.name.endswith("evaldata.json"):
                evaldata = json.loads(tar.extractfile(m).read())
            elif "/tests/cache/" in m.name or "/tests/eval/" in m.name:
                files[m.name.rsplit("/", 1)[1]] = tar.extractfile(m).read()
    pages = []
    for url, item in evaldata.items():
        raw = files.get(item["file"])
        if raw is not None:
            pages.append({"url": url, "html": decode_html(raw), "with": item["with"], "without": item["without"]})
    return pages


def evaluate_extraction(
    fn: Callable[[str, str], str], pages: Iterable[dict[str, Any]]
) -> dict[str, float]:
    """Precision, recall, F1 and pages/s of ``fn(html, url) -> text`` (one process, wall clock)."""
    pages = list(pages)
    t0 = time.perf_counter()
    outs = []
    for p in pages:
        try:
            outs.append(fn(p["html"], p["url"]) or "")
        except Exception:  # noqa: BLE001 - an extractor crash on a page counts as an empty extraction
            outs.append("")
    seconds = time.perf_counter() - t0
    tp = fp = fn_ = 0
    for p, out in zip(pages, outs):
        for s in p["with"]:
            if s in out:
                tp += 1
            else:
                fn_ += 1
        fp += sum(1 for s in p["without"] if s in out)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn_, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    return {
        "pages": len(pages), "precision": precision, "recall": recall, "f1": f1,
        "pages_per_s": len(pages) / max(seconds, 1e-9),
    }
