"""``kiln tokenizer inspect``: compression and the tokens that betray bad training data.

Looking at a tokenizer's longest and rarest tokens is the cheap way to spot boilerplate,
markup and duplicated text in the corpus it was trained on: a merge is only learned when its
string is frequent, so a 30-byte token such as ``" Project Gutenberg-tm"`` means that string was
repeated thousands of times.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from kiln.tokenizer.pretokenize import ENDOFTEXT
from kiln.tokenizer.tokenizer import Tokenizer
from kiln.tokenizer.train import iter_corpus_bytes

# Substrings typical of web/ebook boilerplate (licences, navigation, markup, URLs).
BOILERPLATE_MARKERS = (
    "http", "www", ".com", ".org", ".html", "copyright", "license", "licence", "gutenberg", "ebook",
    "rights reserved", "terms of", "privacy", "cookie", "subscribe", "click", "newsletter", "&nbsp",
    "<div", "<span", "</", "{{", "}}", "javascript", "trademark", "donat",
)


def _show(b: bytes) -> str:
    return repr(b.decode("utf-8", "backslashreplace"))


def looks_like_boilerplate(b: bytes) -> str | None:
    """A reason why token bytes ``b`` look like boilerplate, or None."""
    s = b.decode("utf-8", "replace").lower()
    for m in BOILERPLATE_MARKERS:
        if m in s:
            return f"contains {m!r}"
    core = s.strip()
    if len(core) >= 4 and len(set(core)) == 1:
        return "repeated character"
    if len(core) >= 6 and sum(ch.isalpha() for ch in core) < len(core) / 3 and not core.replace(",", "").isdigit():
        return "mostly punctuation or symbols"
    return None


def inspect_tokenizer(
    tok: Tokenizer, heldout: Sequence[str | os.PathLike] = (), max_bytes: int = 20_000_000, top: int = 20
) -> dict[str, Any]:
    """Report: sizes, bytes/token per held-out file, longest, rarest and boilerplate-like tokens."""
    specials = set(tok.special_tokens.values())
    ordinary = {i: b for i, b in tok.vocab.items() if i not in specials}
    report: dict[str, Any] = {
        "vocab_size": tok.vocab_size, "merges": len(tok.merges), "special_tokens": tok.special_tokens,
        "pattern": tok.pattern, "backend": tok.backend,
        "mean_token_bytes": round(float(np.mean([len(b) for b in ordinary.values()])), 3),
    }
    counts = np.zeros(tok.vocab_size, dtype=np.int64)
    files = []
    for path in heldout:
        n_bytes = n_tokens = 0
        for chunk in iter_corpus_bytes([path], list(tok.special_tokens) or [ENDOFTEXT], max_bytes=max_bytes):
            ids = tok.encode_bytes(chunk)
            counts += np.bincount(ids, minlength=tok.vocab_size)[: tok.vocab_size]
            n_tokens += len(ids)
            n_bytes += len(chunk)
        files.append({"path": os.fspath(path), "bytes": n_bytes, "tokens": n_tokens,
                      "bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)})
    report["heldout"] = files
    by_len = sorted(ordinary, key=lambda i: (-len(ordinary[i]), i))
    report["longest"] = [{"id": i, "bytes": len(ordinary[i]), "token": _show(ordinary[i])} for i in by_len[:top]]
    if files:
        merged = [i for i in ordinary if len(ordinary[i]) > 1]
        unused = [i for i in merged if counts[i] == 0]
        report["unused_in_heldout"] = len(unused)
        rare = sorted(merged, key=lambda i: (counts[i], -len(ordinary[i]), i))
        report["least_frequent"] = [{"id": i, "count": int(counts[i]), "token": _show(ordinary[i])} for i in rare[:top]]
    flagged = []
    for i in sorted(ordinary):
        reason = looks_like_boilerplate(ordinary[i]) if len(ordinary[i]) > 3 else None
        if reason:
            flagged.append({"id": i, "token": _show(ordinary[i]), "why": reason})
    report["boilerplate_like"] = flagged[:top]
    report["boilerplate_like_total"] = len(flagged)
    return report


def format_report(r: dict[str, Any]) -> str:
    """Human-readable form of ``inspect_tokenizer``'s report."""
    out = [(f"vocab {r['vocab_size']} | merges {r['merges']} | pattern {r['pattern']} | specials {r['special_tokens']} "
            f"| mean token {r['mean_token_bytes']} bytes")]
    for f in r.get("heldout", []):
        out.append(f"  {f['path']}: {f['bytes']:,} bytes -> {f['tokens']:,} tokens = {f['bytes_per_token']} bytes/token")
    out.append("longest tokens:")
    out += [f"  {t['id']:>6} {t['bytes']:>3} B  {t['token']}" for t in r["longest"]]
    if "least_frequent" in r:
        out.append(f"least frequent merged tokens in the held-out text ({r['unused_in_heldout']} never used):")
        out += [f"  {t['id']:>6} x{t['count']:<6} {t['token']}" for t in r["least_frequent"]]
    out.append(f"boilerplate-like tokens ({r['boilerplate_like_total']} in all; a low id means a frequent string):")
    out += [f"  {t['id']:>6} {t['token']}  ({t['why']})" for t in r["boilerplate_like"]]
    return "\n".join(out)
