"""PII masking on real formats (issue 24 items 1 and 7): no leak on any listed format, and the
near-misses (versions, section numbers, dates, ISBNs, prices, tables of numbers) stay."""

from __future__ import annotations

import pytest

from kiln.bench.pii import NEAR_MISSES, pii_eval_set, score_pii
from kiln.data.pii import mask_pii

pytest.importorskip("phonenumbers")


@pytest.mark.parametrize("text", [
    "The request came from 192.0.2.146.",          # IPv4 before a full stop
    "Blocked host (198.51.100.7).",                 # in brackets
    "Listening on 203.0.113.9:8080 now.",           # with a port
    "Ping [2001:db8:85a3::8a2e:370:7334]:443 and fe80::1ff:fe23:4567:890a%eth0.",
    "Call 2831823829 today.",                       # a bare ten-digit phone
    "Call +1 (415) 555-2671 ext. 204 or +44 20 7946 0958.",
    "Write to jane.doe+news@mail.example.co.uk.",
])
def test_listed_formats_are_masked(text: str) -> None:
    out, counts = mask_pii(text)
    assert sum(counts.values()) >= 1 and "@" not in out
    for token in ("192.0.2.146", "2831823829", "203.0.113.9", "2001:db8", "2671", "7946"):
        assert token not in out, out


@pytest.mark.parametrize("text", ["As stated in section 2.1.3.4, the tenant pays.", "Results: 12 34 56 78 90",
                                  "Install libfoo-1.2.3.4 today.", "ISBN 978-3-16-148410-0", "Latitude: 53.36724"])
def test_near_misses_stay(text: str) -> None:
    assert mask_pii(text) == (text, {})


def test_pii_eval_set_no_leak_full_precision() -> None:
    ex = pii_eval_set(n_per_kind=60, seed=1)
    assert sum(k is None for _, k, _ in ex) == len(NEAR_MISSES) >= 40
    r = score_pii(mask_pii, ex)
    assert r["leaks"] == [] and r["false_masks"] == [], (r["leaks"], r["false_masks"])
    assert all(row["recall"] == 1.0 and row["precision"] == 1.0 for row in r["per_kind"].values())
