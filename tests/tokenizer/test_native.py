"""The C core equals the pure-Python reference: pre-tokens, counts, merges, encodings."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_samples import VARIED, read_exact

from kiln.tokenizer import Tokenizer, train_bpe
from kiln.tokenizer.pretokenize import PATTERNS, count_words
from kiln.tokenizer.train import (
    count_input_words,
    iter_corpus_bytes,
    merge_words_reference,
)

native = pytest.importorskip("kiln.tokenizer._native", reason="C core not built (pip install -e .)")
PATTERN_IDS = {"gpt2": native.PAT_GPT2, "gpt2_digits": native.PAT_GPT2_DIGITS, "cl100k": native.PAT_CL100K}
ALPHABET = list("ab AB1 2\n\r\t'sSltdmvre.,!?-_") + ["\u00a0", "\u3000", "é", "日", "٣", "🎉", "\x85", "\u2028", "\udcff"]


def _ref_pretokens(data: bytes, name: str) -> list[bytes]:
    text = data.decode("utf-8", "surrogateescape")
    return [w.encode("utf-8", "surrogateescape") for w in regex.findall(PATTERNS[name], text)]


@pytest.mark.parametrize("name", sorted(PATTERN_IDS))
def test_pretokenize_equals_regex_random(name: str) -> None:
    rng = random.Random(0)
    texts = [t.encode() for t in VARIED]
    texts += ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 30))).encode("utf-8", "surrogateescape") for _ in range(3000)]
    for data in texts:
        assert native.pretokenize(data, PATTERN_IDS[name]) == _ref_pretokens(data, name), data


@pytest.mark.parametrize("name", sorted(PATTERN_IDS))
@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=60), st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass"))))
def test_pretokenize_equals_regex_hypothesis(name: str, data: bytes) -> None:
    # Invalid UTF-8 (and UTF-8-encoded surrogates, which are invalid too) counts as "other" characters.
    assert native.pretokenize(data, PATTERN_IDS[name]) == _ref_pretokens(data, name)


@pytest.mark.parametrize("threads", [1, 2])
def test_word_counter_equals_reference(varied_corpus: Path, threads: int) -> None:
    text = read_exact(varied_corpus)
    ref = count_words([text], "gpt2", ["<|endoftext|>"])
    wc = native.WordCounter(native.PAT_GPT2, [b"<|endoftext|>"])
    wc.add((text * 3).encode(), threads)
    assert dict(wc.items()) == {w: 3 * c for w, c in ref.items()}


def test_byte_chunks_equal_whole(varied_corpus: Path) -> None:
    chunks = list(iter_corpus_bytes(varied_corpus, ["<|endoftext|>"], chunk_bytes=999))
    assert len(chunks) > 20 and b"".join(chunks) == varied_corpus.read_bytes()
    assert count_input_words(varied_corpus, backend="native") == count_input_words(varied_corpus, backend="python", workers=1)


def test_merges_equal_reference_random() -> None:
    rng = random.Random(1)
    for _ in range(500):
        words = {bytes(rng.choice(b"abc ") for _ in range(rng.randint(1, 8))): rng.randint(1, 4) for _ in range(rng.randint(1, 8))}
        assert native.merge_words(list(words.items()), 12) == merge_words_reference(words, 12), words


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_train_native_equals_python(varied_corpus: Path, tmp_path: Path, pattern: str) -> None:
    a = train_bpe(varied_corpus, 1000, ["<|endoftext|>"], pattern=pattern, backend="python")
    b = train_bpe(varied_corpus, 1000, ["<|endoftext|>"], pattern=pattern, backend="native", workers=2)
    assert a == b
    bad = tmp_path / "bad.txt"
    bad.write_bytes(varied_corpus.read_bytes()[:5000] + b"\xff\xfe caf\xe9 \xe2\x82 x" * 20)
    assert train_bpe(bad, 400, [], backend="python") == train_bpe(bad, 400, [], backend="native")


@pytest.mark.parametrize("pattern", ["gpt2", "gpt2_digits", "cl100k"])
def test_encoder_equals_python(varied_corpus: Path, pattern: str) -> None:
    vocab, merges = train_bpe(varied_corpus, 800, ["<|endoftext|>"], pattern=pattern)
    py = Tokenizer(vocab, merges, ["<|endoftext|>"], pattern=pattern, backend="python")
    c = Tokenizer(vocab, merges, ["<|endoftext|>"], pattern=pattern, backend="native")
    text = read_exact(varied_corpus)
    for t in [*VARIED, text]:
        assert c.encode(t) == py.encode(t)
        assert c.encode_ordinary(t) == py.encode_ordinary(t)
    assert c.encode_batch(VARIED * 50, num_threads=2) == [py.encode(t) for t in VARIED * 50]
    assert c.encode_bytes(text.encode()).tolist() == py.encode(text)
    for t in (c, py):
        flat, lengths = t.encode_batch_flat(VARIED * 50, num_threads=2, append_id=t.eot_id)
        assert flat.dtype == np.uint32 and lengths.dtype == np.int64
        assert flat.tolist() == [i for x in VARIED * 50 for i in py.encode(x) + [py.eot_id]]
        assert lengths.tolist() == [len(py.encode(x)) + 1 for x in VARIED * 50]
    assert c.encode_batch_flat(["a\udcff", "b"])[0].tolist() == py.encode("a\udcff") + py.encode("b")
    assert c.encode("a\udcff b") == py.encode("a\udcff b")  # lone surrogate: Python fallback


def test_unicode_table_matches_regex() -> None:
    # The C character classes are generated from the `regex` package (_gen_unicode.py); after a
    # `regex` upgrade with a newer Unicode, this fails until the header is regenerated.
    import re as _re

    header = (Path(native.__file__).parent / "_native_unicode.h").read_text()
    starts = [int(x, 16) for x in _re.findall(r"0x([0-9a-f]+)", header.split("kiln_uni_class")[0])]
    rng = random.Random(0)
    cps = {c for s in starts for c in (s - 1, s) if 0 <= c < 0x110000} | {rng.randrange(0x110000) for _ in range(20000)}
    for cp in sorted(cps):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        data = ("x" + chr(cp) + "1!").encode()
        assert native.pretokenize(data, native.PAT_GPT2) == _ref_pretokens(data, "gpt2"), hex(cp)
