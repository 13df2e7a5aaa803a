"""PII masking: emails, phone numbers and IP addresses replaced by typed placeholders, and counted.

Two steps, as presidio does: a permissive regular expression finds *candidates*, then a validator
decides (a false mask costs a few characters of text, a missed one leaks a person's address):

- **Emails**: the common ``local@domain.tld`` shape (``+tags``, dots, subdomains).
- **IP addresses**: dotted quads and IPv6 (full, compressed, bracketed, with ``%zone`` or ``:port``),
  each parsed by :mod:`ipaddress`. A quad that ends a sentence (``from 192.0.2.146.``) is masked; one
  glued to a word (``libfoo-1.2.3.4``, ``v1.2.3.4``) or introduced as a section, version, figure...
  (``section 2.1.3.4``) is not.
- **Phone numbers**: digit groups with separators, an optional ``+CC`` prefix and extension
  (``ext. 204``, ``x204``), and bare runs of 10-11 digits; parsed by ``phonenumbers`` (Google's
  libphonenumber metadata): a ``+CC`` number must be *possible* for its country, a national number
  written with separators must be *valid* in one of ``PIIConfig.phone_regions``, a bare run *possible*
  in one of them (a bare 10-digit number in prose is almost always a phone number or an account
  id). Dates, ISBNs/ISSNs/DOIs, prices and tables of small numbers fail these checks or are excluded
  by their context. Without ``phonenumbers`` installed the candidates are checked by digit count only
  (9-15), the earlier behaviour.

``kiln bench data --what pii`` measures precision and recall per type on a synthetic set of real
formats and near-misses (:func:`kiln.data.pii_eval.pii_eval_set`).
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

EMAIL_RE = re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@(?:[A-Za-z0-9-]{1,63}\.)+[A-Za-z]{2,24}(?![\w-])")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# A dotted quad not glued to a word or another number; a trailing full stop is allowed (sentence end)
# but not a fifth ".digit" group. An optional :port is swallowed with the address.
IPV4_RE = re.compile(rf"(?<![\w.-]){_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}(?::\d{{1,5}})?(?!\w|\.\d|-\w)")
IPV6_RE = re.compile(
    r"(?<![\w:])(?:(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}"
    r"|(?:[0-9A-Fa-f]{1,4}:){1,7}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6})?"
    r"|::(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4}){0,6}))"
    r"(?:(?<=[0-9A-Fa-f]):(?:\d{1,3}\.){3}\d{1,3})?(?:%[\w.]+)?(?![\w:])"
)
# Candidates: +CC or (area) prefixes, 2-5 digit groups joined by one separator, an extension; or a
# bare run of digits. The validator decides.
PHONE_RE = re.compile(
    r"(?<![\w+.,/-])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,5}\)[\s.-]?)?\d{1,15}(?:[\s./-]\d{1,12}){0,6}"
    r"(?:\s*(?:ext\.?|x|#)\s*\d{1,6})?(?![\w]|[.,]\d|-\d)",
    re.IGNORECASE,
)
# Words that introduce a number that is not an address: "section 2.1.3.4", "version 1.2.3.4", "ISBN ..."
_NOT_IP_CONTEXT = re.compile(
    r"(?:\b(?:sections?|sec|chapters?|ch|clauses?|articles?|art|paragraphs?|para|versions?|ver|v|releases?|patch|"
    r"figures?|fig|tables?|tab|steps?|items?|rules?|appendix|build|oid)\.?|§|\bv)\s*$",
    re.IGNORECASE,
)
_NOT_PHONE_CONTEXT = re.compile(
    r"(?:\b(?:isbn(?:-1[03])?|issn|doi|arxiv|pmid|isin|iban|invoice|order|ticket|serial|sku|"
    r"vol|volume|pp|pages?|no|nr|pmc|pmcid|lett|iso|din|en|iec|n°|nº)\.?:?|[$€£¥°])\s*$",
    re.IGNORECASE,
)
# starts with a date ("2020-03-04 12"), or is a range of years ("2021-2027", "1914/18")
_DATE_RE = re.compile(
    r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})(?!\d)"
    r"|^(?:1[5-9]|20)\d\d\s*[-/]\s*(?:(?:1[5-9]|20)\d\d|\d\d)$"
)
_EXT_RE = re.compile(r"\s*(?:ext\.?|x|#)\s*\d{1,6}$", re.IGNORECASE)


@dataclass(frozen=True)
class PIIConfig:
    """Which kinds of PII are masked and with what."""

    email: bool = True
    """Mask email addresses as ``<EMAIL>``."""
    phone: bool = True
    """Mask phone numbers as ``<PHONE>``."""
    ip: bool = True
    """Mask IPv4/IPv6 addresses as ``<IP>``."""
    phone_regions: tuple[str, ...] = ("US", "GB", "DE", "FR", "IN")
    """Regions (ISO 3166 alpha-2) whose national numbering plans a number without ``+CC`` is checked
    against (by ``phonenumbers``); more regions mask more national formats and risk more false masks."""


def _context(text: str, start: int, width: int = 16) -> str:
    return text[max(0, start - width) : start]


def valid_ip(candidate: str, before: str = "") -> bool:
    """Whether an IP candidate (quad with optional ``:port``, or IPv6 with optional ``%zone``) parses
    as an address and is not introduced as a section/version/figure number (``before``: the text
    just before it)."""
    if _NOT_IP_CONTEXT.search(before):
        return False
    addr = candidate
    if "." in addr and addr.count(":") == 1:  # IPv4:port
        addr = addr.split(":", 1)[0]
    addr = addr.split("%", 1)[0]
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        return False
    return True


def _phonenumbers() -> Any:
    try:
        import phonenumbers
    except ImportError:
        return None
    return phonenumbers


def valid_phone(candidate: str, before: str = "", regions: tuple[str, ...] = PIIConfig.phone_regions) -> bool:
    """Whether a phone candidate is a phone number (see the module doc for the rules)."""
    core = _EXT_RE.sub("", candidate).strip()
    digits = sum(c.isdigit() for c in core)
    if digits < 7 or digits > 15 or _DATE_RE.match(core) or _NOT_PHONE_CONTEXT.search(before):
        return False
    groups = re.findall(r"\d+", core)
    if not core.startswith(("+", "0", "(")):
        # a table row ("12 34 56 78 90") or decimals ("0.25 0.50 0.75"), not a number to dial
        if len(groups) >= 4 and max(map(len, groups)) <= 2:
            return False
        if len(groups) >= 2 and len(groups[0]) <= 3 and all(len(g) == 3 for g in groups[1:]):
            return False  # thousands grouping ("1 234 567 euros", "1.234.567")
    if not core.startswith(("+", "(")) and "." in core and (any(c.isspace() for c in core) or core.count(".") == 1):
        return False  # decimals ("0.25 0.50", "53.36724"), not a number to dial
    bare = core.isdigit()
    if bare and digits < 10 and not core.startswith("0"):
        return False  # a bare short number is a count, a year, an id; a local number has separators
    pn = _phonenumbers()
    if pn is None:  # the regex-only fallback
        return 9 <= digits
    try:
        if core.startswith("+"):
            return bool(pn.is_possible_number(pn.parse(core, None)))
        for region in regions:
            n = pn.parse(core, region)
            if pn.is_valid_number(n) or (bare and 10 <= digits <= 11 and pn.is_possible_number(n)):
                return True
    except pn.NumberParseException:
        return False
    return False


def mask_pii(text: str, cfg: PIIConfig = PIIConfig()) -> tuple[str, Counter]:
    """Text with PII replaced by ``<EMAIL>``, ``<PHONE>``, ``<IP>``; and the count of each kind."""
    counts: Counter = Counter()

    def sub(pattern: re.Pattern, token: str, kind: str, text: str, check) -> str:
        def repl(m: re.Match) -> str:
            if not check(m.group(0), _context(text, m.start())):
                return m.group(0)
            counts[kind] += 1
            return token

        return pattern.sub(repl, text)

    if cfg.email and "@" in text:
        text = sub(EMAIL_RE, "<EMAIL>", "pii_email", text, lambda s, b: True)
    if cfg.ip:
        if "." in text:
            text = sub(IPV4_RE, "<IP>", "pii_ip", text, valid_ip)
        if "::" in text or text.count(":") >= 7:
            text = sub(IPV6_RE, "<IP>", "pii_ip", text, lambda s, b: len(s) > 6 and any(c.isdigit() for c in s) and valid_ip(s, b))
    if cfg.phone:
        def phone(m: re.Match) -> str:
            cand, before = m.group(0), _context(text, m.start())
            # The pattern is greedy ("202-555-0143 2 times" is one candidate): try shorter prefixes,
            # cut at separators, until one validates or too few digits are left.
            cut = len(cand)
            while cut > 0 and sum(c.isdigit() for c in cand[:cut]) >= 7:
                if valid_phone(cand[:cut], before, cfg.phone_regions):
                    counts["pii_phone"] += 1
                    return "<PHONE>" + cand[cut:]
                cut = max((cand.rfind(sep, 0, cut) for sep in " ./-"), default=-1)
                cut = cut if cut > 0 else 0
            return cand

        text = PHONE_RE.sub(phone, text)
    return text, counts
