"""Kiln's extraction: block parsing, the logistic fit, the shipped block classifier, and its F1."""

from __future__ import annotations

import numpy as np
import pytest
from webfixtures import english_paragraphs

from kiln.data import boilerplate as bp


def test_html_blocks_tags_links_and_entities() -> None:
    mh = ('<h2>Title &amp; more</h2>\n\n<p>First line<br>\nsecond <a href="x">linked words</a>.</p>\n\n'
          '<ul>\n<li><a href="/a">Related one</a></li>\n<li><a href="/b">Related two</a></li>\n</ul>\n\n bare text ')
    blocks = bp.html_blocks(mh)
    assert [b.tag for b in blocks] == ["h2", "p", "ul", ""]
    assert blocks[0].text == "Title & more" and blocks[1].text == "First line\nsecond linked words."
    assert blocks[1].link_chars == len("linked words") and blocks[1].links == 1
    assert blocks[2].link_chars == len("Related one") + len("Related two")
    f = bp.block_features(blocks)
    assert f.shape == (4, len(bp.FEATURES)) and np.isfinite(f).all()
    assert f[2, bp.FEATURES.index("link_density")] > 0.8 and f[1, bp.FEATURES.index("is_p")] == 1.0
    assert bp.block_features([]).shape == (0, len(bp.FEATURES))


def test_fit_logistic_separates_and_scales_back() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 10.0, 0.1] + [0.0, 50.0, 0.0]  # features on different scales
    y = (x[:, 0] + 0.1 * (x[:, 1] - 50) > 0).astype(float)
    b, w = bp.fit_logistic(x, y, c=10.0)
    acc = (((b + x @ w) > 0) == (y > 0.5)).mean()
    assert acc > 0.95 and w[0] > 0 and w[1] > 0 and abs(w[2]) < abs(w[0])


def test_shipped_weights_have_the_feature_count() -> None:
    assert len(bp.STAGE1[1]) == len(bp.FEATURES)
    assert len(bp.STAGE2[1]) == len(bp.FEATURES) + len(bp.CONTEXT_FEATURES)


def _page_with_boilerplate(body: str) -> str:
    paras = "".join(f"<p>{p}</p>" for p in body.split("\n\n"))
    related = "".join(f'<li><a href="/r{i}">Another story number {i} about kilns</a></li>' for i in range(8))
    return (f"<html><head><title>Kilns</title></head><body><nav><a href='/'>Home</a></nav><main><article>"
            f"<h1>How kilns work</h1>{paras}<p>Share this article: <a href='/fb'>Facebook</a> "
            f"<a href='/tw'>Twitter</a></p><h3>Related articles</h3><ul>{related}</ul></article></main>"
            f"<footer>Copyright 2024</footer></body></html>")


def test_kiln_extraction_keeps_text_and_drops_link_lists() -> None:
    pytest.importorskip("resiliparse")
    from kiln.data.extract import ExtractConfig, extract_text

    body = english_paragraphs(3, n_sentences=30)
    text = extract_text(_page_with_boilerplate(body), None, ExtractConfig(method="kiln"))
    for para in body.split("\n\n"):
        assert para.strip() in text
    assert "Another story number" not in text and "Copyright" not in text
    # the share prompt and the "Related articles" heading survive resiliparse; the block classifier drops them
    plain = extract_text(_page_with_boilerplate(body), None, ExtractConfig(method="resiliparse"))
    assert "Share this article" in plain and "Related articles" in plain
    assert "Share this article" not in text and "Related articles" not in text
    assert text.startswith("How kilns work")


def test_kiln_extraction_beats_resiliparse_on_eval_slice(shared_data) -> None:
    pytest.importorskip("resiliparse")
    from kiln.data.extract import (
        ExtractConfig,
        evaluate_extraction,
        extract_text,
        load_trafilatura_eval,
    )

    # odd pages: the half the shipped weights were not fit on
    pages = load_trafilatura_eval(str(shared_data / "web" / "trafilatura_eval_html.tar.gz"))[1:160:2]
    # no trafilatura fallback here: the check is about the block classifier itself
    kiln = evaluate_extraction(lambda h, u: extract_text(h, u, ExtractConfig(method="kiln", min_chars_before_fallback=0)), pages)
    base = evaluate_extraction(lambda h, u: extract_text(h, u, ExtractConfig(method="resiliparse")), pages)
    assert kiln["precision"] > base["precision"] + 0.05 and kiln["f1"] > base["f1"] + 0.02


def test_kiln_extraction_survives_junk_and_huge_pages() -> None:
    pytest.importorskip("resiliparse")
    import time

    from kiln.data.extract import ExtractConfig, extract_text

    cfg = ExtractConfig(method="kiln")
    assert extract_text("", None, cfg) == ""
    assert isinstance(extract_text("\x00\x01\ufffd binary \x89PNG" * 50, None, cfg), str)
    assert isinstance(extract_text("<html><body><p>unclosed <a href='x'>link <b>bold", None, cfg), str)
    def page(n: int) -> str:
        return "<html><body>" + "".join(f"<p>{english_paragraphs(i % 7, 3)}</p>" for i in range(n)) + "</body></html>"

    def seconds(html: str) -> float:  # the fastest of three runs: a loaded machine only adds time
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            text = extract_text(html, None, cfg)
            best = min(best, time.perf_counter() - t0)
        assert len(text) > len(html) // 3
        return best

    # Linear time: four times the HTML (~0.5 -> 2 MB) takes about four times as long; quadratic
    # would be 16x. The 8x bound leaves room for a shared machine's noise (measured 4.2x when idle).
    one, four = seconds(page(1000)), seconds(page(4000))
    assert four < 8 * one, (one, four)
