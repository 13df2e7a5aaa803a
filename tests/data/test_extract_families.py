"""Extraction drops three boilerplate families that shallow block features keep (issue 24 item 3):
related-article teasers ending in "Read More" (and their headlines), photo captions and gallery
counters ("Image 1 of 8"), and lists of editor names; the article itself stays whole."""

from __future__ import annotations

import pytest

from kiln.data.boilerplate import family_of

ARTICLE = [
    "The city council voted on Tuesday to expand the tram network to the eastern districts, ending a debate that had lasted more than three years and divided residents along the proposed route.",
    "Under the plan, two new lines will connect the central station with the hospital quarter and the university campus. Construction is expected to begin next spring and to take about four years, according to the transport department.",
    "Supporters argued that the extension would cut car traffic on the ring road by a fifth. Opponents, including several shop owners on Market Street, warned that years of building work would drive customers away.",
    "The mayor said the council had listened to both sides. \"We will compensate businesses that lose income during the works, and we will keep every shop accessible,\" she told reporters after the vote.",
    "The project is budgeted at 410 million euros, two thirds of which will come from national and European funds. The council will publish the detailed timetable in January.",
]
TEASERS = [
    ("Bus drivers announce a two-day strike over pay", "Union leaders said talks with the operator had broken down after the latest offer. Read More"),
    ("New cycle lanes open on the river embankment", "The three-kilometre route links the old town with the northern parks. Read More"),
    ("Parking fees to rise in the city centre from March", "Residents' permits are not affected by the change, officials said. Read More"),
]
CAPTIONS = ["Image 1 of 8", "A tram at the central station. Photo: Anna Berg / City Press", "Image 2 of 8",
            "Residents at the council meeting on Tuesday. (Photo: Jens Vogel)", "Image 3 of 8"]
EDITORS = ["Editor: Maria Lopez", "Deputy editor: Thomas Keller", "Photo editor: Sarah Nguyen", "Reporting by Lena Fischer and Omar Haddad; Editing by Paul Grant"]


def news_page() -> str:
    art = "".join(f"<p>{p}</p>" for p in ARTICLE)
    figs = "".join(
        f"<figure><img src='/img/{i}.jpg' alt=''><figcaption>{CAPTIONS[2 * i]}</figcaption><figcaption>{CAPTIONS[2 * i + 1]}</figcaption></figure>"
        for i in range(2)
    )
    teasers = "".join(f"<div class='teaser'><h3><a href='/n/{i}'>{t}</a></h3><p>{b.replace('Read More', '')}<a href='/n/{i}'>Read More</a></p></div>"
                      for i, (t, b) in enumerate(TEASERS))
    eds = "".join(f"<p>{e}</p>" for e in EDITORS)
    return (f"<html><head><title>Council backs tram extension</title></head><body><header><a href='/'>City News</a></header>"
            f"<main><h1>Council backs tram extension to the east</h1><p>By Lena Fischer</p>{figs}{art}"
            f"<div class='gallery'><p>{CAPTIONS[4]}</p></div><div class='staff'>{eds}</div>"
            f"<section class='related'><h2>More from City News</h2>{teasers}</section></main></body></html>")


def news_page_inline() -> str:
    """The same families written inside the article body as plain paragraphs (as many CMSs do)."""
    art = [f"<p>{p}</p>" for p in ARTICLE]
    body = (art[:1] + [f"<p>{CAPTIONS[0]}</p><p>{CAPTIONS[1]}</p>"] + art[1:3] + [f"<p>{CAPTIONS[2]}</p><p>{CAPTIONS[3]}</p>"]
            + art[3:] + [f"<p>{e}</p>" for e in EDITORS]
            + [f"<h3>{t}</h3><p>{b.replace('Read More', '')}<a href='/n/{i}'>Read More</a></p>" for i, (t, b) in enumerate(TEASERS)])
    return ("<html><head><title>Council backs tram extension</title></head><body><article>"
            "<h1>Council backs tram extension to the east</h1>" + "".join(body) + "</article></body></html>")


@pytest.mark.parametrize(("text", "family"), [
    ("Union leaders said talks with the operator had broken down. Read More", "read_more_teaser"),
    ("Die Gewerkschaft kündigt einen Streik an. Weiterlesen", "read_more_teaser"),
    ("Image 3 of 8", "gallery_counter"), ("Bild 2 von 12", "gallery_counter"),
    ("A tram at the central station. Photo: Anna Berg / City Press", "photo_caption"),
    ("Residents at the meeting. (Foto: Jens Vogel/dpa)", "photo_caption"),
    ("Editor: Maria Lopez", "staff_list"), ("Reporting by Lena Fischer; Editing by Paul Grant", "staff_list"),
    ("Maria Lopez\nThomas Keller\nSarah Nguyen", "staff_list"),
    (ARTICLE[0], None), (ARTICLE[3], None), ("The photo exhibition opens on Friday and runs until May.", None),
])
def test_family_rules(text: str, family: str | None) -> None:
    assert family_of(text) == family


def test_kiln_extraction_drops_the_families_and_keeps_the_article() -> None:
    pytest.importorskip("resiliparse")
    from kiln.data.extract import ExtractConfig, extract_text

    text = extract_text(news_page_inline(), None, ExtractConfig(method="kiln"))
    for para in ARTICLE:
        assert para in text
    for bad in ("Read More", "Image 1 of 8", "Photo:", "Editor: Maria Lopez", "Reporting by", "Bus drivers announce",
                "New cycle lanes open", "Parking fees to rise"):
        assert bad not in text, bad
