"""Gopher and C4 rules on synthetic texts."""

from __future__ import annotations

from kiln.data.filters import C4Config, c4_clean, gopher_quality, gopher_repetition

PROSE = (
    "The kiln was built by the potters of the village to fire their bowls and cups. "
    "It has a long chamber that they fill with wood, and the fire burns for two days. "
    "When the kiln cools, the potters open the door and carry out the finished work. "
    "Some pieces crack in the heat, but most of them come out strong and bright. "
)


def test_gopher_quality_keeps_prose_and_names_reasons() -> None:
    assert gopher_quality(PROSE * 2) is None
    assert gopher_quality("too short to keep") == "gopher_short_doc"
    assert gopher_quality(" ".join(["a1 b2"] * 60)) == "gopher_below_avg_word_length"
    assert gopher_quality("# " * 10 + PROSE * 2 + " #" * 30) == "gopher_symbol_word_ratio"
    no_stop = " ".join(["kiln pottery clay fire glaze wheel"] * 20)
    assert gopher_quality(no_stop) == "gopher_stop_words"
    ellipsis = "\n".join(f"line number {i} of the list with the words and more..." for i in range(20))
    assert gopher_quality(ellipsis) == "gopher_ellipsis_lines"


def test_gopher_repetition() -> None:
    assert gopher_repetition(PROSE * 2) is not None  # the whole text repeats
    assert gopher_repetition(PROSE) is None
    dup_lines = "\n".join(["Buy cheap kilns now!"] * 10 + ["A single real line of text here."])
    assert gopher_repetition(dup_lines) in {"gopher_dup_para_frac", "gopher_dup_line_frac"}


def test_c4_clean() -> None:
    text = "Home\nThis site uses cookies to improve things.\n" + PROSE.replace(". ", ".\n") + "\nShare"
    cleaned, reason, removed = c4_clean(text)
    assert reason is None and removed == 3
    assert "cookies" not in cleaned and "Home" not in cleaned and cleaned.startswith("The kiln")
    assert c4_clean("lorem ipsum dolor sit amet. " * 5)[1] == "c4_lorem_ipsum"
    assert c4_clean("function f() { return 1; }")[1] == "c4_curly_bracket"
    assert c4_clean("One sentence only.")[1] == "c4_too_few_sentences"
    kept, _, removed = c4_clean("A line without a stop\n" + PROSE, C4Config(require_terminal_punct=False))
    assert removed == 0 and kept.startswith("A line without a stop")
