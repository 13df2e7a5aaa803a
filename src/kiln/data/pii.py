"""PII masking: emails, phone numbers and IP addresses replaced by typed placeholders, and counted.

Regular expressions, deliberately conservative (a false mask costs a few characters of text, a missed
one leaks a person's address): emails per the common ``local@domain.tld`` shape; phone numbers as
international (``+`` country code) or North-American/European groupings of 9-15 digits with
separators; IPv4 addresses with each octet <= 255 (``0.0.0.0`` style version strings such as
``1.2.3`` are not touched); IPv6 in full or compressed form.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4_RE = re.compile(rf"(?<![\d.]){_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?![\d.]|\.\d)")
IPV6_RE = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?)(?![\w:])"
)
PHONE_RE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]\d{2,4}){1,4}(?![\w])"
    r"|(?<![\w+])\+\d{8,14}(?!\w)"
)


@dataclass(frozen=True)
class PIIConfig:
    """Which kinds of PII are masked and with what."""

    email: bool = True
    """Mask email addresses as ``<EMAIL>``."""
    phone: bool = True
    """Mask phone numbers as ``<PHONE>``."""
    ip: bool = True
    """Mask IPv4/IPv6 addresses as ``<IP>``."""


def _phone_ok(m: re.Match) -> bool:
    digits = sum(c.isdigit() for c in m.group(0))
    return 9 <= digits <= 15


def mask_pii(text: str, cfg: PIIConfig = PIIConfig()) -> tuple[str, Counter]:
    """Text with PII replaced by ``<EMAIL>``, ``<PHONE>``, ``<IP>``; and the count of each kind."""
    counts: Counter = Counter()

    def sub(pattern: re.Pattern, token: str, kind: str, text: str, check=None) -> str:
        def repl(m: re.Match) -> str:
            if check is not None and not check(m):
                return m.group(0)
            counts[kind] += 1
            return token

        return pattern.sub(repl, text)

    if cfg.email and "@" in text:
        text = sub(EMAIL_RE, "<EMAIL>", "pii_email", text)
    if cfg.ip:
        text = sub(IPV4_RE, "<IP>", "pii_ip", text)
        if "::" in text or text.count(":") >= 7:
            text = sub(IPV6_RE, "<IP>", "pii_ip", text, check=lambda m: any(c.isdigit() for c in m.group(0)) and len(m.group(0)) > 6)
    if cfg.phone:
        text = sub(PHONE_RE, "<PHONE>", "pii_phone", text, check=_phone_ok)
    return text, counts
