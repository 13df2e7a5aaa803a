"""Answer extraction and checking for generative math benchmarks (GSM8K, MATH).

GSM8K references end with ``#### 42``; a model's answer is taken from ``#### X``, else
"the answer is X", else the last number in the text. MATH answers are the last ``\\boxed{...}``.
Checking: exact string match after normalization (``\\dfrac`` -> ``\\frac``, ``\\left``, units, ``%``
and ``$`` dropped), then exact rational equality (``1/2`` == ``0.5`` == ``\\frac{1}{2}``), then
symbolic equivalence through ``math-verify`` when it is installed (``pip install math-verify``).
"""

from __future__ import annotations

import re
from fractions import Fraction

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_gsm8k(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style solution, commas and units stripped, or None."""
    m = re.search(r"####\s*(.+)", text)
    if m:
        nums = _NUM.findall(m.group(1))
        return _clean_number(nums[0]) if nums else None
    m = re.search(r"answer is\s*:?\s*\$?\s*(-?[\d,]*\.?\d+)", text, re.IGNORECASE)
    if m:
        return _clean_number(m.group(1))
    nums = _NUM.findall(text)
    return _clean_number(nums[-1]) if nums else None


def _clean_number(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    if "." in s:
        s = s.rstrip("0").rstrip(".") or "0"
    return s


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 5``), braces matched."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    m = re.match(r"\\(?:boxed|fbox)\s*\{", rest)
    if not m:
        m2 = re.match(r"\\boxed\s+([^\s$]+)", rest)
        return m2.group(1) if m2 else None
    depth, start = 1, m.end()
    for i in range(start, len(rest)):
        c = rest[i]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return rest[start:i]
    return None


def normalize_math(s: str) -> str:
    """Light LaTeX normalization so trivially different spellings compare equal."""
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{\s*([^{}]*)\}", r"\1", s)
    for a, b in [("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("\\ ", ""),
                 ("dfrac", "frac"), ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\$", ""),
                 ("\\%", ""), ("%", "")]:
        s = s.replace(a, b)
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if re.fullmatch(r"-?[\d,]+(\.\d+)?", s):
        s = _clean_number(s)
    return s


def to_number(s: str) -> Fraction | None:
    """Exact rational value of a plain number, ``a/b`` or ``\\frac{a}{b}`` (None otherwise)."""
    s = normalize_math(s)
    m = re.fullmatch(r"(-?)\\frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    try:
        if m:
            v = Fraction(m.group(2)) / Fraction(m.group(3))
            return -v if m.group(1) else v
        m = re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
        if m:
            return Fraction(m.group(1)) / Fraction(m.group(2))
        if re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def answers_match(pred: str | None, gold: str, symbolic: bool = True) -> bool:
    """Whether a predicted answer equals the reference: string, then numeric, then symbolic."""
    if pred is None:
        return False
    a, b = normalize_math(pred), normalize_math(gold)
    if a == b:
        return True
    x, y = to_number(a), to_number(b)
    if x is not None and y is not None:
        return x == y
    if symbolic:
        try:
            import math_verify  # optional: pip install math-verify
        except ImportError:
            return False
        try:
            return bool(math_verify.verify(math_verify.parse(f"${gold}$"), math_verify.parse(f"${pred}$")))
        except Exception:  # math-verify raises on unparsable LaTeX: count as wrong
            return False
    return False
