"""Books: Project Gutenberg header and footer stripping.

A Project Gutenberg plain-text file wraps the book in boilerplate: a header (title, release date,
"*** START OF THE PROJECT GUTENBERG EBOOK ... ***", "Produced by ...") and a footer ("End of the
Project Gutenberg EBook ...", "*** END OF ... ***", then the full license). Older files (1990s to
about 2002) use other shapes: a long preamble, the "Small Print!" license ending in
"*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...*END*", and a closing line such as
"End of The Project Gutenberg Etext of ..." or a bare "*Project Gutenberg Etext of ...*".

:func:`strip_gutenberg` handles all the variants found in the shared 1,087-book corpus (every
book there has a start marker or an end-of-small-print marker, and an end marker). The markers are
searched in a bounded region (the header in the first part of the file, the footer after the
start) so a book that *talks about* Project Gutenberg in its body keeps its text.
"""

from __future__ import annotations

import re

# Lines after which the book begins. Modern: "*** START OF THE PROJECT GUTENBERG EBOOK X ***" (also
# "***START OF THIS PROJECT GUTENBERG EBOOK X***", sometimes with the title wrapped over 2-3 lines).
# Old: the end of the "Small Print!" license, "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*...".
_START_RE = re.compile(
    r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG.*$"
    r"|^[ \t]*\*[ \t]*END\*?[ \t]*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
# Lines where the book has ended: "*** END OF THE PROJECT GUTENBERG EBOOK X ***",
# "End of the Project Gutenberg EBook of X", "End of Project Gutenberg's X",
# "*Project Gutenberg Etext of X, by Y*" (old closing line), "***START**THE SMALL PRINT" at the end.
_END_RE = re.compile(
    r"^[ \t]*\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG.*$"
    r"|^[ \t]*\**[ \t]*END OF (?:THE |THIS )?PROJECT GUTENBERG.*$"
    r"|^[ \t]*\*[ \t]*(?:THE )?PROJECT GUTENBERG(?:'S)? E-?(?:TEXT|BOOK) OF .*\*[ \t]*$"
    r"|^[ \t]*\*{3}[ \t]*START\*+[ \t]*THE SMALL PRINT.*$",
    re.IGNORECASE | re.MULTILINE,
)
# A credit paragraph right after the start marker ("Produced by ...", "This etext was prepared by").
_CREDIT_RE = re.compile(
    r"^(?:produced by|prepared by|transcribed (?:from|by)|e-?text (?:prepared|produced|created) by"
    r"|this (?:project gutenberg )?e-?(?:text|book) was (?:prepared|produced|created|scanned)"
    r"|this e-?(?:text|book) was|scanned by|digitized by)",
    re.IGNORECASE,
)
# A short leading paragraph mentioning Project Gutenberg is a note about the file, not the book.
_BOILERPLATE_RE = re.compile(r"project gutenberg|gutenberg\.(?:org|net)|\bhtml version\b", re.IGNORECASE)
# Header markers are only believed in the first part of the file: old-style headers run to about
# 380 lines (~20 KB); a quarter of the text guards short books whose header is most of the file.
_HEADER_MAX_CHARS = 40_000


def _start_offset(text: str) -> int:
    """Offset where the book's text begins (0 when no start marker is found)."""
    limit = min(len(text), max(_HEADER_MAX_CHARS, len(text) // 4))
    start = 0
    for m in _START_RE.finditer(text, 0, limit):
        end = m.end()
        line = m.group(0).rstrip()
        # A modern marker whose title wraps: consume continuation lines up to the closing "***".
        if line.lstrip().startswith("***") and not line.endswith("***"):
            for _ in range(3):
                nl = text.find("\n", end + 1)
                if nl == -1:
                    break
                nxt = text[end + 1 : nl].rstrip()
                end = nl
                if nxt.endswith("***"):
                    break
        start = max(start, end)
    return start


def _end_offset(text: str, start: int) -> int:
    """Offset where the book's text ends (``len(text)`` when no end marker is found)."""
    m = _END_RE.search(text, start)
    return m.start() if m else len(text)


def _drop_credit_paragraph(body: str) -> str:
    """Drop leading boilerplate paragraphs: "Produced by ...", "Project Gutenberg also has an HTML
    version", the "THIS EBOOK WAS ONE OF PROJECT GUTENBERG'S EARLY FILES" banner.

    Only short paragraphs at the very top are considered (a few of them), so the book is never cut.
    """
    for _ in range(4):
        stripped = body.lstrip("\n \t")
        para_end = re.search(r"\n[ \t]*\n", stripped)
        para = stripped[: para_end.start()] if para_end else stripped
        if len(para) > 1_000 or not (_CREDIT_RE.match(para.lstrip()) or _BOILERPLATE_RE.search(para)):
            return body
        body = stripped[para_end.end() :] if para_end else ""
    return body


def strip_gutenberg(text: str) -> str:
    """The book's own text: Project Gutenberg header, credits, footer and license removed.

    Newlines are normalized to ``\\n`` and surrounding blank lines trimmed. Text without any
    Project Gutenberg marker is returned unchanged apart from that normalization, so the function
    is safe to run on any document.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.removeprefix("\ufeff")
    start = _start_offset(text)
    end = _end_offset(text, start)
    if end <= start:  # markers in an unexpected order: keep the text rather than lose it
        end = len(text)
    body = _drop_credit_paragraph(text[start:end]) if start else text[start:end]
    return body.strip("\n").rstrip() + ("\n" if body.strip() else "")


def is_gutenberg(text: str) -> bool:
    """True when the text carries a Project Gutenberg start or end marker."""
    head = text[: max(_HEADER_MAX_CHARS, len(text) // 4)]
    return bool(_START_RE.search(head) or _END_RE.search(text, len(text) // 2))
