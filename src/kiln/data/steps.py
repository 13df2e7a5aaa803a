"""Steps: generators over Documents, and the counters that make every drop a statistic.

A step is ``run(docs, stats) -> Iterator[Document]`` (the datatrove shape). A :class:`Filter`
decides ``Document -> drop reason | None`` (:class:`FilterStep` wraps a plain function), a
:class:`Map` changes documents and drops none; every reason is counted in :class:`Stats` with the
document's *input* bytes, so the funnel balances exactly:

    docs_in  == kept + sum(dropped.values()) + sum(errors.values())
    bytes_in == kept_bytes_in + sum(dropped_bytes.values()) + sum(error_bytes.values())

A fraction of dropped documents can be kept anyway (``keep_dropped_fraction``, decided by a hash of
the id, so reruns agree): they carry ``metadata["kept_despite"] = reason`` and count as kept.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kiln.data.document import Document

log = logging.getLogger(__name__)

BYTES_IN = "_bytes_in"
"""Metadata key holding a document's size when it entered the pipeline (removed on output)."""
MAX_WARNINGS_PER_REASON = 10
"""Errors of one reason logged at WARNING level per shard before the rest go to DEBUG."""
SAMPLE_CHARS = 600
"""Characters of each sampled document kept for the report."""


def bytes_in(doc: Document) -> int:
    """A document's input size in bytes (its UTF-8 size when it was not tagged on input)."""
    n = doc.metadata.get(BYTES_IN)
    return int(n) if n is not None else len(doc.text.encode("utf-8", errors="replace"))


def unit_hash(key: str, salt: str = "") -> float:
    """A deterministic number in [0, 1) from a string (for sampling that reruns reproduce)."""
    h = hashlib.blake2b(f"{salt}\x00{key}".encode("utf-8", errors="replace"), digest_size=8).digest()
    return int.from_bytes(h, "little") / 2**64


@dataclass
class Stats:
    """Counters of one shard (or, merged, of a whole run). JSON-able through :meth:`to_dict`."""

    docs_in: int = 0
    bytes_in: int = 0
    kept: int = 0
    kept_bytes_in: int = 0
    kept_bytes_out: int = 0
    dropped: Counter = field(default_factory=Counter)
    dropped_bytes: Counter = field(default_factory=Counter)
    errors: Counter = field(default_factory=Counter)
    error_bytes: Counter = field(default_factory=Counter)
    counters: Counter = field(default_factory=Counter)
    """Events that are not drops: ``pii_email``, ``c4_lines_removed``, ``kept_despite:<reason>``..."""
    languages: Counter = field(default_factory=Counter)
    domains: Counter = field(default_factory=Counter)
    """Kept documents per domain."""
    drop_domains: dict[str, Counter] = field(default_factory=dict)
    """Per drop reason (and ``dedup_*``), dropped documents per domain."""
    samples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Up to ``max_samples`` examples per drop reason, and of kept documents under ``"kept"``."""
    error_samples: list[dict[str, Any]] = field(default_factory=list)
    max_samples: int = 5

    # ---- recording -------------------------------------------------------------------------------
    def add_input(self, doc: Document) -> None:
        """Count a document entering the pipeline and tag its input size."""
        n = len(doc.text.encode("utf-8", errors="replace")) if BYTES_IN not in doc.metadata else bytes_in(doc)
        doc.metadata[BYTES_IN] = n
        self.docs_in += 1
        self.bytes_in += n

    def add_error(self, reason: str, where: str, nbytes: int = 0, detail: str = "") -> None:
        """Count an input record that could not be read (it enters and leaves as an error)."""
        self.docs_in += 1
        self.bytes_in += nbytes
        self.errors[reason] += 1
        self.error_bytes[reason] += nbytes
        if len(self.error_samples) < 50:
            self.error_samples.append({"reason": reason, "where": where, "detail": detail[:300]})
        # The first few errors of each reason are warnings; the rest (a bad crawl has millions) debug.
        level = logging.WARNING if self.errors[reason] <= MAX_WARNINGS_PER_REASON else logging.DEBUG
        log.log(level, "%s: %s%s", where, reason, f" ({detail})" if detail else "")

    def add_drop(self, doc: Document, reason: str) -> None:
        n = bytes_in(doc)
        self.dropped[reason] += 1
        self.dropped_bytes[reason] += n
        domain = doc.metadata.get("domain")
        if domain:
            self.drop_domains.setdefault(reason, Counter())[domain] += 1
        self._sample(reason, doc)

    def add_kept(self, doc: Document) -> None:
        self.kept += 1
        self.kept_bytes_in += bytes_in(doc)
        self.kept_bytes_out += len(doc.text.encode("utf-8", errors="replace"))
        lang = doc.metadata.get("language")
        if lang:
            self.languages[lang] += 1
        domain = doc.metadata.get("domain")
        if domain:
            self.domains[domain] += 1
        self._sample("kept", doc)

    def _sample(self, key: str, doc: Document) -> None:
        bucket = self.samples.setdefault(key, [])
        if len(bucket) < self.max_samples:
            bucket.append({
                "id": doc.id,
                "url": doc.metadata.get("url"),
                "text": doc.text[:SAMPLE_CHARS],
            })

    # ---- combining and checking --------------------------------------------------------------------
    def merge(self, other: Stats) -> Stats:
        """Add ``other``'s counts into this one (samples are topped up to ``max_samples``)."""
        for name in ("docs_in", "bytes_in", "kept", "kept_bytes_in", "kept_bytes_out"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for name in ("dropped", "dropped_bytes", "errors", "error_bytes", "counters", "languages", "domains"):
            getattr(self, name).update(getattr(other, name))
        for reason, counts in other.drop_domains.items():
            self.drop_domains.setdefault(reason, Counter()).update(counts)
        for key, items in other.samples.items():
            bucket = self.samples.setdefault(key, [])
            bucket.extend(items[: max(0, self.max_samples - len(bucket))])
        self.error_samples.extend(other.error_samples[: max(0, 50 - len(self.error_samples))])
        return self

    def check_balance(self) -> None:
        """Raise if documents or bytes in differ from kept + dropped + errors (a bug, never data)."""
        docs_out = self.kept + sum(self.dropped.values()) + sum(self.errors.values())
        bytes_out = self.kept_bytes_in + sum(self.dropped_bytes.values()) + sum(self.error_bytes.values())
        if docs_out != self.docs_in or bytes_out != self.bytes_in:
            raise AssertionError(
                f"funnel does not balance: docs in {self.docs_in} vs out {docs_out}, "
                f"bytes in {self.bytes_in} vs out {bytes_out}"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "docs_in": self.docs_in, "bytes_in": self.bytes_in, "kept": self.kept,
            "kept_bytes_in": self.kept_bytes_in, "kept_bytes_out": self.kept_bytes_out,
            "dropped": dict(self.dropped), "dropped_bytes": dict(self.dropped_bytes),
            "errors": dict(self.errors), "error_bytes": dict(self.error_bytes),
            "counters": dict(self.counters), "languages": dict(self.languages),
            "domains": dict(self.domains.most_common(200)),
            "drop_domains": {r: dict(c.most_common(50)) for r, c in self.drop_domains.items()},
            "samples": self.samples,
            "error_samples": self.error_samples,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Stats:
        s = cls()
        for name in ("docs_in", "bytes_in", "kept", "kept_bytes_in", "kept_bytes_out"):
            setattr(s, name, int(d.get(name, 0)))
        for name in ("dropped", "dropped_bytes", "errors", "error_bytes", "counters", "languages", "domains"):
            setattr(s, name, Counter(d.get(name, {})))
        s.drop_domains = {r: Counter(c) for r, c in d.get("drop_domains", {}).items()}
        s.samples = {k: list(v) for k, v in d.get("samples", {}).items()}
        s.error_samples = list(d.get("error_samples", []))
        return s


class Step:
    """One stage of document processing: consumes documents, yields the ones that go on."""

    name: str = "step"

    def run(self, docs: Iterable[Document], stats: Stats) -> Iterator[Document]:
        raise NotImplementedError


class Filter(Step):
    """A step that keeps each document or drops it with a reason (datatrove's filter shape).

    A subclass sets ``name`` and implements :meth:`decide` (``None`` keeps the document, a string
    is the drop reason, counted in :class:`Stats`). ``decide`` may change the document in place
    (C4 removes lines, extraction replaces the text) and count events with :meth:`count`.
    ``keep_dropped_fraction`` keeps that share of dropped documents anyway, tagged
    ``metadata["kept_despite"]`` (decided by a hash of the id, so reruns agree).
    """

    keep_dropped_fraction: float = 0.0

    def decide(self, doc: Document) -> str | None:
        raise NotImplementedError

    def count(self, key: str, n: int = 1) -> None:
        """Count ``n`` events of ``key`` (not drops: ``c4_lines_removed``...) in the running Stats."""
        self._stats.counters[key] += n

    def run(self, docs: Iterable[Document], stats: Stats) -> Iterator[Document]:
        if not 0.0 <= self.keep_dropped_fraction <= 1.0:
            raise ValueError(f"keep_dropped_fraction={self.keep_dropped_fraction} must be in [0, 1]")
        self._stats = stats
        for doc in docs:
            reason = self.decide(doc)
            if reason is None:
                yield doc
            elif self.keep_dropped_fraction and unit_hash(doc.id, reason) < self.keep_dropped_fraction:
                doc.metadata["kept_despite"] = reason
                stats.counters[f"kept_despite:{reason}"] += 1
                yield doc
            else:
                stats.add_drop(doc, reason)


class Map(Step):
    """A step that changes every document and drops none; :meth:`apply` may :meth:`count` events."""

    def apply(self, doc: Document) -> Document:
        raise NotImplementedError

    def count(self, key: str, n: int = 1) -> None:
        """Count ``n`` events of ``key`` (``pii_email``...) in the running Stats."""
        self._stats.counters[key] += n

    def run(self, docs: Iterable[Document], stats: Stats) -> Iterator[Document]:
        self._stats = stats
        for doc in docs:
            yield self.apply(doc)


class MapStep(Map):
    """Apply ``fn(doc) -> doc`` to every document (a transform that drops nothing)."""

    def __init__(self, name: str, fn: Callable[[Document], Document]) -> None:
        self.name = name
        self.fn = fn

    def apply(self, doc: Document) -> Document:
        return self.fn(doc)


class FilterStep(Filter):
    """A :class:`Filter` from a function: keep documents for which ``fn(doc)`` returns None; count
    the reason string of the others."""

    def __init__(
        self, name: str, fn: Callable[[Document], str | None], keep_dropped_fraction: float = 0.0
    ) -> None:
        if not 0.0 <= keep_dropped_fraction <= 1.0:
            raise ValueError(f"keep_dropped_fraction={keep_dropped_fraction} must be in [0, 1]")
        self.name = name
        self.fn = fn
        self.keep_dropped_fraction = keep_dropped_fraction

    def decide(self, doc: Document) -> str | None:
        return self.fn(doc)


def run_steps(
    docs: Iterable[Document], steps: list[Step], stats: Stats, count_kept: bool = True
) -> Iterator[Document]:
    """Chain the steps lazily; documents leaving the chain are counted as kept when ``count_kept``
    (a later pass, such as global dedup, counts them otherwise)."""
    it: Iterable[Document] = docs
    for step in steps:
        it = step.run(it, stats)
    for doc in it:
        if count_kept:
            stats.add_kept(doc)
        yield doc
