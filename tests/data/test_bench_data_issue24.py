"""The pieces `kiln bench data` reports for issue 24: PII table, text-length splits, the
cross-validation harness, the downstream run's byte tokens and AUC."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.bench.data import paragraphs, snippets
from kiln.bench.data_quality import EOT, _auc, _byte_tokens


def test_bench_pii_rows() -> None:
    pytest.importorskip("phonenumbers")
    from kiln.bench.data import bench_pii

    rows = bench_pii(n_per_kind=20)
    assert [r["kind"] for r in rows] == ["email", "phone", "ip"]
    assert all(r["precision"] == 1.0 and r["recall"] == 1.0 and r["true_positives"] == 20 for r in rows)


def test_snippets_paragraphs_auc_tokens() -> None:
    lines = [("one two three four five six seven eight nine ten eleven twelve", "en")] * 3 + [("这是一个很长的中文句子没有空格" * 3, "zh")]
    sn = snippets(lines, max_chars=20)
    assert sn[0] == ("one two three four", "en") and sn[-1][0] == ("这是一个很长的中文句子没有空格" * 3)[:10]
    ps = paragraphs(lines, min_chars=100)
    assert all(len(t) >= 100 for t, _ in ps) and {g for _, g in ps} <= {"en", "zh"}
    assert _auc([0.9, 0.8], [0.1, 0.8]) == pytest.approx(0.875)
    toks, starts = _byte_tokens(["ab", "é"])
    assert toks.tolist() == [97, 98, EOT, 0xC3, 0xA9, EOT] and starts.tolist() == [0, 3]


def test_cross_validation_harness(shared_data) -> None:
    pytest.importorskip("resiliparse")
    pytest.importorskip("trafilatura")
    from kiln.bench.extract_cv import build_cache, cross_validate
    from kiln.data.extract import load_trafilatura_eval

    pages = load_trafilatura_eval(str(shared_data / "web" / "trafilatura_eval_html.tar.gz"))[:24]
    cache = build_cache(pages)
    rows = cross_validate(pages, cache, k=2)
    assert [r["fold"] for r in rows] == [0, 1, "pooled held-out"]
    assert rows[-1]["pages"] == 24 and sum(r["pages"] for r in rows[:2]) == 24
    for r in rows:
        assert 0.5 < r["kiln (families) F1"] <= 1.0 and 0.5 < r["trafilatura F1"] <= 1.0
    assert set(cache.seconds) == {"kiln_blocks", "trafilatura", "kiln (default extract_text)", "resiliparse"}
    assert np.isfinite(rows[-1]["tuning_f1"])
