"""Sample texts shared by the tokenizer tests."""

from pathlib import Path


def read_exact(path: Path) -> str:
    """A file's text with its line endings untouched (as the chunked readers see it)."""
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


# A varied sample: prose, contractions, numbers, code, whitespace runs, non-Latin scripts, emoji.
VARIED = [
    "Hello, world! It's a test: don't you think? We'll see, they've said, I'm sure, he'd go.",
    "   leading spaces and trailing   ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows line ends\r\n",
    "Numbers: 1234567890, 3.14159, 1,000,000 and 42nd.",
    "def f(x):\n    return x ** 2  # comment\n\n\tprint(f'{x!r}')\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский текст, 日本語のテキスト, 中文文本, 한국어",
    "Emoji 🎉🚀👍🏽 and symbols ©®™ §¶ — – “quotes” ‘single’ …",
    "CAPS'S and IT'S and 'tis and o'clock ''' \"\"\"",
    "a" * 300 + " " + "b c " * 50,
    "mixed123abc 456def ٣٤٥ ¼½ Ⅻ",
    "\u00a0non-breaking\u2003em space\u3000ideographic",
    "",
    " ",
    "\n",
    "<not special> <|end of text|> <|endoftext",
]
