"""A synthetic PII evaluation set of real-world formats and near-misses, and its per-type scoring.

Every positive example is one sentence holding one PII string of a known kind, in a format seen on
the web: emails with ``+tags``, dots and subdomains, in angle brackets or after ``mailto:``; phone
numbers national and ``+CC`` international, with and without separators, with extensions, for the
US, the UK, Germany, France and India (numbers drawn at random and kept only where
``phonenumbers`` calls them valid, formatted by its own formatters and by hand); IPv4 addresses at a
sentence end, in brackets, with ports, in URLs; IPv6 full, compressed, bracketed with a port, with a
zone. Negative examples are near-misses that must stay: version strings glued to words
(``libfoo-1.2.3.4``), section numbers (``section 2.1.3.4``), dates, ISBNs, prices, times, tables of
small numbers (``12 34 56 78 90``), coordinates, build numbers, postcodes.

:func:`score_pii` runs a masker over the set: a positive is *caught* when its string is gone and a
placeholder of its kind appeared (else it *leaks*); every placeholder beyond the caught ones is a
false mask of its kind. Precision and recall are per kind.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable
from typing import Any

KINDS = ("email", "phone", "ip")

_TEMPLATES = (
    "Contact us at {x}.", "For questions, write to {x} or call the office.", "Reach me: {x}",
    "The request came from {x}, according to the log.", "({x})", "Send your CV to {x} before Friday!",
    "Details: {x}; see the attached file.", "\"{x}\" was listed as the contact.", "{x} is the address on file.",
    "Call {x}.", "Phone: {x}\nFax: none", "If the line is busy, try {x} again later.",
)
_NAMES = ("jane.doe", "j.smith", "maria_garcia", "li.wei", "o'brien", "support", "k.mueller", "anna-lena",
          "mark.t", "info", "r2d2", "p.nguyen")
_DOMAINS = ("example.com", "mail.example.org", "cs.uni-example.de", "students.example.ac.uk", "example.co.in",
            "corp.mail.example.net", "example.fr", "sub.domain.example.io")


def _emails(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        name = rng.choice(_NAMES).replace("'", "")
        if i % 3 == 0:
            name += f"+{rng.choice(('news', 'shop', 'tag2024', 'work'))}"
        addr = f"{name}@{rng.choice(_DOMAINS)}"
        out.append(rng.choice((addr, f"<{addr}>", f"mailto:{addr}", addr.upper() if i % 7 == 0 else addr)))
    return out


def _phones(rng: random.Random, n: int) -> list[str]:
    import phonenumbers as pn

    fmt = pn.PhoneNumberFormat
    out: list[str] = ["2831823829", "(283) 182-3829"]  # the bare ten digits
    regions = ("US", "GB", "DE", "FR", "IN")
    while len(out) < n:
        region = rng.choice(regions)
        ex = pn.example_number_for_type(region, rng.choice((pn.PhoneNumberType.FIXED_LINE, pn.PhoneNumberType.MOBILE)))
        if ex is None:
            continue
        nat = str(ex.national_number)
        num = pn.parse(nat[:2] + "".join(rng.choice("0123456789") for _ in nat[2:]), region)
        if not pn.is_valid_number(num):
            continue
        national = pn.format_number(num, fmt.NATIONAL)
        intl = pn.format_number(num, fmt.INTERNATIONAL)
        e164 = pn.format_number(num, fmt.E164)
        digits = "".join(c for c in national if c.isdigit())
        styles = [national, intl, e164, intl.replace(" ", "-"), intl.replace(" ", ".")]
        if region == "US":
            a, b, c = digits[:3], digits[3:6], digits[6:]
            styles += [f"{a}.{b}.{c}", f"{a}-{b}-{c}", digits, f"+1 ({a}) {b}-{c}", f"1-{a}-{b}-{c}"]
        if region == "FR":
            styles.append(" ".join(digits[i : i + 2] for i in range(0, 10, 2)))
        s = rng.choice(styles)
        if rng.random() < 0.15:
            s += rng.choice((" ext. ", " x", " ext ", " #")) + str(rng.randint(1, 9999))
        out.append(s)
    return out[:n]


def _ips(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        if i % 3 == 2:  # IPv6
            groups = [f"{rng.randrange(1 << 16):x}" for _ in range(8)]
            full = ":".join(groups)
            comp = f"2001:db8:{groups[2]}::{groups[7]}"
            out.append(rng.choice((full, comp, f"[{comp}]:443", f"fe80::{groups[6]}:{groups[7]}%eth0", full.upper(),
                                   f"2001:db8::{groups[3]}:{groups[4]}")))
        else:
            a = f"{rng.randint(1, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"
            out.append(rng.choice((a, a, f"[{a}]", f"{a}:{rng.choice((22, 80, 8080, 443))}", f"http://{a}/login",
                                   f"{a}/24" if i % 5 == 0 else a)))
    return out


NEAR_MISSES = (
    "Install libfoo-1.2.3.4 from the mirror.", "Upgrade to v1.2.3.4 or later.", "This is version 1.2.3.4 of the spec.",
    "As stated in section 2.1.3.4, the tenant pays.", "See § 4.2.1.1 and clause 10.2.3.4.", "Figure 3.1.2.4 shows the loop.",
    "Chrome 120.0.6099.109 fixed it.", "Windows build 10.0.19045.3570 is affected.",
    "The meeting is on 2024-05-01 at 10:30.", "Born 05/01/1984 in Lyon.", "Am 12.05.2024 um 18 Uhr.", "Dated 1.5.2024.",
    "ISBN 978-3-16-148410-0", "ISBN-10: 0-306-40615-2", "ISBN 9780306406157 (paperback)", "ISSN 0317-8471",
    "doi:10.1000/182 is the handbook.", "It costs $1,299.99 or €2.499,00.", "Price: 1.234.567 Euro.",
    "The population was 1,234,567 in 2020.", "Results: 12 34 56 78 90", "Row: 3 14 15 92 65 35 89",
    "Scores 1999 2000 2001 2002 2003 were recorded.", "Final score 3-1 after 90 minutes.", "At 12:30:45 the alarm rang.",
    "Coordinates 48.8566, 2.3522 mark Paris.", "Postcode SW1A 1AA, London.", "75008 Paris, France.",
    "Python 3.11.4 and numpy 1.26.4 were used.", "Order no. 4402 9813 77 shipped.", "In 1999 about 2000 people paid 12.50 each.",
    "Use std::vector<int> and a::b in C++.", "The ratio was 16:9, not 4:3.", "Chapter 12, pages 234-256.",
    "Table 1: 0.25 0.50 0.75 1.00", "Temperature rose from 12.5 to 14.3 degrees.", "Call 911 in an emergency.",
    "Lot 20 45 18 was recalled.", "Matthew 5:3-12 is read.", "The answer is 42, not 4.2.1.",
    "Patch 3.2.1.0 is out.", "RFC 1918 reserves 10/8.", "Serial: 1234-5678-9012", "UUID 123e4567-e89b-12d3-a456-426614174000",
    "Between 1914-1918 and 1939-1945.", "Invoice 2023-0815-4711 is paid.",
    "Latitude: 53.36724\nLongitude: 7.20518", "Klasse 1 (IEC/EN 62053-21)", "des années 2021-2027 budget",
    "1 234 567 EUROS collectés", "Biol. Lett. 13: 20170050.", "Posted 2020-03-04 12:29:58 by admin",
    "13.609 Videos, 2.345.678 Views", "Population 8 336 817 (2019).",
)


def pii_eval_set(n_per_kind: int = 120, seed: int = 0) -> list[tuple[str, str | None, str | None]]:
    """``(text, kind or None, the PII string or None)``: ``n_per_kind`` positives of each kind (one per
    sentence) and every near-miss of :data:`NEAR_MISSES` (kind None). Needs ``phonenumbers``."""
    rng = random.Random(seed)
    out: list[tuple[str, str | None, str | None]] = []
    for kind, items in (("email", _emails(rng, n_per_kind)), ("phone", _phones(rng, n_per_kind)), ("ip", _ips(rng, n_per_kind))):
        for x in items:
            out.append((rng.choice(_TEMPLATES).format(x=x), kind, x))
    out += [(t, None, None) for t in NEAR_MISSES]
    return out


def score_pii(mask: Callable[[str], tuple[str, Counter]], examples: list[tuple[str, str | None, str | None]]) -> dict[str, Any]:
    """Per kind: true positives, leaks (false negatives), false masks, precision, recall; and the
    leaked strings and falsely masked texts (for the report)."""
    tp, fn, fp = Counter(), Counter(), Counter()
    leaks: list[str] = []
    false_masks: list[str] = []
    for text, kind, x in examples:
        out, counts = mask(text)
        counts = Counter({k.removeprefix("pii_"): v for k, v in counts.items()})
        caught = kind is not None and x not in out and counts[kind] >= 1
        if kind is not None:
            if caught:
                tp[kind] += 1
                counts[kind] -= 1
            else:
                fn[kind] += 1
                leaks.append(f"{kind}: {text!r} -> {out!r}")
        for k, v in counts.items():
            if v > 0:
                fp[k] += v
                false_masks.append(f"{k}: {text!r} -> {out!r}")
    rows = {k: {"true_positives": tp[k], "leaks": fn[k], "false_masks": fp[k],
                "precision": tp[k] / max(tp[k] + fp[k], 1), "recall": tp[k] / max(tp[k] + fn[k], 1)} for k in KINDS}
    return {"per_kind": rows, "leaks": leaks, "false_masks": false_masks, "near_misses": sum(k is None for _, k, _ in examples)}
