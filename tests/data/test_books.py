"""Project Gutenberg stripping on synthetic books in each header/footer style, and on real books."""

from __future__ import annotations

import tarfile

import pytest

from kiln.data.books import is_gutenberg, strip_gutenberg

BODY = "CHAPTER I\n\nThe kiln was hot. Nobody minded.\n\nCHAPTER II\n\nIt cooled by morning.\n"

MODERN = (
    "The Project Gutenberg EBook of Kilns, by A. Potter\n\nThis eBook is for the use of anyone...\n\n"
    "Title: Kilns\n\nRelease Date: May 1, 2004 [EBook #1234]\n\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK KILNS ***\n\n\n\nProduced by A Volunteer\n\n\n\n"
    + BODY
    + "\n\n\nEnd of the Project Gutenberg EBook of Kilns, by A. Potter\n\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK KILNS ***\n\n***** This file should be named 1234.txt *****\n"
    "Updated editions will replace the previous one.\n"
)

WRAPPED_TITLE = (
    "Title: Tales\n\n***START OF THE PROJECT GUTENBERG EBOOK TALES OF\nTROUBLED KILNS***\n\n"
    + BODY
    + "\n***END OF THE PROJECT GUTENBERG EBOOK TALES OF TROUBLED KILNS***\nlicense text\n"
)

OLD_SMALL_PRINT = (
    "*Project Gutenberg Etext of Kilns, by A. Potter*\n#2 in our series\n\nCopyright laws are changing.\n\n"
    "***START**THE SMALL PRINT!**FOR PUBLIC DOMAIN ETEXTS**START***\nWhy is this here? Lawyers.\n"
    "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
    "This etext was prepared by A Volunteer <a@b.c>\n\n\n"
    + BODY
    + "\n\n*Project Gutenberg Etext of Kilns, by A. Potter*\n"
)

OLD_END_OF = (
    "The Project Gutenberg Etext of Kilns\n\nPlease take a look at the important information.\n"
    "*END THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.07.00*END*\n\n"
    + BODY
    + "\n\nEnd of The Project Gutenberg Etext of Kilns\n"
)


@pytest.mark.parametrize("raw", [MODERN, WRAPPED_TITLE, OLD_SMALL_PRINT, OLD_END_OF], ids=["modern", "wrapped", "smallprint", "endof"])
def test_strip_variants(raw: str) -> None:
    assert strip_gutenberg(raw) == BODY
    assert strip_gutenberg(raw.replace("\n", "\r\n")) == BODY
    assert is_gutenberg(raw)


def test_plain_text_unchanged() -> None:
    text = "Just a story.\n\nIt mentions Project Gutenberg in passing, mid-line.\n"
    assert strip_gutenberg(text) == text
    assert not is_gutenberg(text)
    assert strip_gutenberg("") == ""


def test_body_mentioning_end_marker_later_is_cut_only_at_marker() -> None:
    raw = MODERN.replace("It cooled by morning.", "It cooled by morning.\n\nThe end of the kiln.")
    out = strip_gutenberg(raw)
    assert out.endswith("The end of the kiln.\n") and "START OF" not in out


def test_real_books(shared_data) -> None:
    """A sample of the shared corpus: markers found, the book's text kept, no license left."""
    # Streamed: only the first members are decompressed, so the test stays fast.
    seen = 0
    with tarfile.open(shared_data / "pretrain" / "gutenberg_books.tar.gz", "r|gz") as tar:
        for m in tar:
            if not (m.isfile() and m.name.endswith(".txt")):
                continue
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            out = strip_gutenberg(raw)
            assert 0.05 * len(raw) < len(out) < len(raw), m.name
            upper = out.upper()
            assert "START OF THE PROJECT" not in upper and "SMALL PRINT" not in upper, m.name
            assert "END OF THE PROJECT GUTENBERG" not in upper, m.name
            assert "END OF THIS PROJECT GUTENBERG" not in upper, m.name
            seen += 1
            if seen == 8:
                break
    assert seen == 8
