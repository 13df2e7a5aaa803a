"""The one document type that flows through every data step."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Document:
    """One document: its text, a stable id, and free-form metadata.

    ``id`` is unique within a source (e.g. ``"books/alice.txt"``, ``"file.jsonl:1234"``,
    a WARC record id). ``metadata`` carries provenance (``source``, ``url``, ``offset``) and what
    the steps learn (``language``, ``language_score``, quality scores...).
    """

    text: str
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)
