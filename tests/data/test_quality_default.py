"""The shipped quality classifier (issue 24 item 2): loads offline with its SHA-256 checked, takes text
and returns a label and a score, separates reference prose from unedited web-like text, and serves as
the pipeline's quality filter under the name "default"."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from kiln.data.quality import QualityConfig, load_quality_classifier, quality_classifier_filter
from kiln.data.quality_default import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_SHA256,
    classify_quality,
    newsgroup_posts,
    read_wheel_files,
    wikipedia_articles,
    windows,
)

PROSE = ("The river rises in the northern hills and flows south for about 240 kilometres before it joins the sea. "
         "Its valley was settled in the early medieval period, and the towns along its banks grew with the wool "
         "trade. In the nineteenth century a canal linked the river to the industrial cities of the interior, and "
         "the population of the valley doubled between 1820 and 1880. Today the river is protected as a habitat "
         "for migratory birds, and the old canal is used mainly by pleasure boats.")
FORUM = ("lol ya i tried that too and it didnt work for me either... anyone got a fix?? my pc keeps crashing when i "
         "open the game, i have the latest drivers. thx in advance!!! > did u try reinstalling? yes twice. "
         "whatever, im gonna just buy a new card lol. PM me if u want my old one, cheap")


def test_shipped_model_is_small_pinned_and_labels_text() -> None:
    data = DEFAULT_MODEL.read_bytes()
    assert len(data) < 300_000 and hashlib.sha256(data).hexdigest() == DEFAULT_MODEL_SHA256
    label, p = classify_quality(PROSE)
    assert label == "high" and p > 0.6
    label, q = classify_quality(FORUM)
    assert label == "low" and q < 0.4
    assert load_quality_classifier("default").predict(PROSE)[0] == "high"


def test_default_as_pipeline_filter() -> None:
    check = quality_classifier_filter(QualityConfig(classifier="default", min_classifier_score=0.5))
    assert check(PROSE)[0] is None
    assert check(FORUM)[0] == "quality_classifier"


def test_altered_model_is_refused(tmp_path, monkeypatch) -> None:
    import kiln.data.quality_default as qd

    bad = tmp_path / "m.npz"
    bad.write_bytes(DEFAULT_MODEL.read_bytes()[:-10])
    monkeypatch.setattr(qd, "DEFAULT_MODEL", bad)
    with pytest.raises(ValueError, match="SHA-256"):
        qd.load_default_quality_classifier()


def test_sources_parse_without_unpickling(tmp_path) -> None:
    import pickle
    import zlib

    bunch = {"data": ["From: a@b.example\nSubject: hi\n\nbody text of the post here", "Newsgroups: x\n\nsecond body"]}
    assert newsgroup_posts(zlib.compress(pickle.dumps(bunch, protocol=0))) == ["body text of the post here", "second body"]
    import bz2

    xml = ("<page><text xml:space=\"preserve\">'''Kiln''' is a [[furnace|thermally insulated chamber]] {{cite|x}} used to "
           "harden pottery<ref>a ref</ref> and to dry wood; it has been used for thousands of years in many places.</text></page>")
    [art] = wikipedia_articles(bz2.compress(xml.encode()))
    assert art.startswith("Kiln is a thermally insulated chamber  used to harden pottery and")
    assert windows("a b c d e f g", 3, 2) == ["a b c", "d e f"]
    wheel = tmp_path / "gensim-4.4.0-x.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for name in ("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2", "lee_background.cor", "mini_newsgroup"):
            z.writestr("gensim/test/test_data/" + name, b"not the real file")
    with pytest.raises(ValueError, match="SHA-256"):
        read_wheel_files(wheel)
