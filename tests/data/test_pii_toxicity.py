"""PII masking and the toxicity word-list score."""

from __future__ import annotations

from kiln.data.pii import PIIConfig, mask_pii
from kiln.data.toxicity import ToxicityConfig, builtin_terms, toxicity_filter


def test_mask_pii_types_and_counts() -> None:
    text = "Write to jane.doe@example.org, call +44 20 7946 0958 or (030) 1234 5678; host 10.0.0.254 and 2001:db8::7."
    out, counts = mask_pii(text)
    assert "<EMAIL>" in out and "jane" not in out
    assert out.count("<PHONE>") == 2 and out.count("<IP>") == 2
    assert counts == {"pii_email": 1, "pii_phone": 2, "pii_ip": 2}


def test_mask_pii_leaves_ordinary_numbers() -> None:
    text = "In 1999 about 2000 people paid 12.50 each; version 1.2.3 shipped on 2024-05-01."
    assert mask_pii(text) == (text, {})
    assert mask_pii("a@b.co", PIIConfig(email=False))[0] == "a@b.co"


def test_toxicity_filter() -> None:
    check = toxicity_filter(ToxicityConfig())
    assert check("A calm text about pottery and kilns.")[0] is None
    term = min(builtin_terms())
    assert check(" ".join([term] * 5 + ["word"] * 20))[0] == "toxic_words"
    assert check("fine text", "https://www.pornsite.example/x")[0] == "toxic_url"
    assert toxicity_filter(ToxicityConfig(), scorer=lambda t: 1.0)("anything")[0] == "toxic_classifier"
    assert toxicity_filter(ToxicityConfig(), scorer=lambda t: 0.2)("anything") == (
        None, {"toxicity_words": 0.0, "toxicity_classifier": 0.2})
