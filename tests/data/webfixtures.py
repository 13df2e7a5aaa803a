"""Synthetic web pages and documents for the data tests (no third-party text)."""

from __future__ import annotations

import random

NOUNS = ["potter", "student", "teacher", "neighbour", "baker", "guide", "farmer", "sailor", "doctor", "painter", "writer", "child", "miller", "bowl", "kiln", "bridge", "table", "wall", "map", "river", "garden", "window", "letter", "basket", "lamp", "road", "market", "field", "boat", "hill", "forest", "village", "city", "school", "station", "harbour", "kitchen", "library", "tower", "stone", "clock", "song", "story"]
VERBS = ["carried", "painted", "studied", "built", "repaired", "described", "found", "measured", "opened", "closed", "watched", "followed", "cleaned", "moved", "sold", "bought", "drew", "wrote", "read", "heard", "remembered", "answered", "visited", "crossed", "planted"]
ADJS = ["heavy", "old", "small", "quiet", "bright", "narrow", "wooden", "broken", "new", "green", "distant", "warm", "cold", "early", "late", "simple", "strange", "careful", "busy", "empty", "famous", "gentle", "hidden", "long", "short", "round"]
PREPS = ["near", "behind", "beside", "under", "across", "along", "inside", "above", "beyond", "past", "toward"]
ENDS = ("before the rain came", "with great care", "for the whole afternoon", "and then went home",
        "while the others watched", "because it was needed", "as the sun went down", "after a long day")


def english_paragraphs(seed: int, n_sentences: int = 40) -> str:
    """Varied, plausible English prose that passes the Gopher and C4 rules (deterministic per seed)."""
    rng = random.Random(seed)
    c = rng.choice
    sents = []
    for _ in range(n_sentences):
        s = f"{c(['The', 'A', 'One', 'That'])} {c(ADJS)} {c(NOUNS)} {c(VERBS)} {c(['the', 'a', 'my', 'our', 'every'])} {c(ADJS)} {c(NOUNS)} {c(PREPS)} {c(['the', 'a', 'that', 'this'])} {c(NOUNS)}."
        if rng.random() < 0.3:
            s += f" {c(['It', 'This', 'That'])} {c(['was', 'seemed', 'felt'])} {c(ADJS)} to {c(['her', 'him', 'them', 'us'])} {c(['then', 'again', 'too'])}."
        sents.append(s)
    return "\n\n".join(" ".join(sents[i : i + 4]) for i in range(0, len(sents), 4))


FRENCH = ("Le potier a porté un grand bol d'argile avant la pluie. Les enfants regardaient le four du village "
          "pendant tout l'après-midi. ") * 12


def html_page(body_text: str, title: str = "Page") -> str:
    paras = "".join(f"<p>{p}</p>" for p in body_text.split("\n\n"))
    return (f"<html><head><title>{title}</title></head><body><nav><a href='/'>Home</a> <a href='/a'>About</a></nav>"
            f"<article><h1>{title}</h1>{paras}</article><footer>Copyright footer links</footer></body></html>")
