"""BPE training: hand-checked merges, determinism, bad input, the stage and its CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_samples import read_exact

from kiln.tokenizer import Tokenizer, TokenizerTrainConfig, train_bpe, train_tokenizer
from kiln.tokenizer.train import merge_words_reference


def test_hand_checked_merges(tiny_corpus: Path) -> None:
    vocab, merges = train_bpe(tiny_corpus, 256 + 6 + 1, ["<|endoftext|>"], backend="python")
    # (a,t) occurs 5x (cat sat mat ate hat); (h,e) 4x; then three pairs tie at 3 -- (w,e), (e,r) and
    # (l,o), (o,w) -- and the lexicographically greatest, (w,e), wins; merging it leaves (e,r) at 1 and
    # (o,w) at 1, so (l,o) is next; then (we,r) beats the other pairs at 2 as the greatest.
    assert merges == [(b"a", b"t"), (b"h", b"e"), (b"w", b"e"), (b"l", b"o"), (b"we", b"r"), (b"t", b"he")]
    assert vocab[256] == b"at" and vocab[261] == b"the" and vocab[262] == b"<|endoftext|>"
    assert [vocab[i] for i in range(256)] == [bytes([i]) for i in range(256)]


def test_textbook_example() -> None:
    # Sennrich et al.'s example as in CS336: low 5, lower 2, widest 3, newest 6 (no spaces).
    counts = {b"low": 5, b"lower": 2, b"widest": 3, b"newest": 6}
    merges = merge_words_reference(counts, 6)
    assert merges == [(b"s", b"t"), (b"e", b"st"), (b"o", b"w"), (b"l", b"ow"), (b"w", b"est"), (b"n", b"e")]


def test_tie_break_is_lexicographic_on_bytes() -> None:
    # Every pair occurs once; the greatest as (bytes, bytes) is ("z", "a")... then prefix ordering.
    assert merge_words_reference({b"az": 1, b"za": 1}, 1) == [(b"z", b"a")]
    # (b"ab", b"c") vs (b"a", b"bc"): tuple order compares b"ab" > b"a" first.
    merges = merge_words_reference({b"abc": 2, b"ab": 1, b"bc": 1}, 2)
    assert merges[0] in {(b"a", b"b"), (b"b", b"c")} and merges[0] == (b"b", b"c")


def test_special_tokens_never_merged_across(tmp_path: Path) -> None:
    p = tmp_path / "c.txt"
    p.write_text("ab<|endoftext|>" * 50 + "ab")
    _, merges = train_bpe(p, 300, ["<|endoftext|>"], backend="python")
    assert all(b"<|" not in a + b and b"|>" not in a + b for a, b in merges)
    assert merges[0] == (b"a", b"b") and len(merges) == 1  # nothing else to merge


def test_jsonl_input_and_corpus_dir(tmp_path: Path) -> None:
    docs = [{"id": str(i), "text": f"doc {i} says hello hello"} for i in range(20)]
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "train.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    txt = tmp_path / "same.txt"
    txt.write_text("<|endoftext|>".join(x["text"] for x in docs))
    a = train_bpe(d / "train.jsonl", 280, ["<|endoftext|>"], backend="python")
    b = train_bpe(d, 280, ["<|endoftext|>"], backend="python")
    c = train_bpe(txt, 280, ["<|endoftext|>"], backend="python")
    assert a == b == c


def test_invalid_utf8_kept_as_bytes(tmp_path: Path) -> None:
    p = tmp_path / "bad.txt"
    p.write_bytes(b"caf\xe9 caf\xe9 caf\xe9 ok \xff\xfe ok")
    vocab, merges = train_bpe(p, 270, [], backend="python")
    assert (b"\xe9", b" ") not in merges  # a pre-token never extends past the invalid byte... into the space
    assert Tokenizer(vocab, merges).decode_bytes(Tokenizer(vocab, merges).encode("caf\udce9")) == b"caf\xe9"
    # "caf" and the invalid byte are separate pre-tokens: "caf" is learned, "\xe9" never merges;
    # the invalid pair "\xff\xfe" is one pre-token of its own
    assert merges == [(b"c", b"a"), (b"ca", b"f"), (b"o", b"k"), (b" ", b"ok"), (b" ", b"caf"),
                      (b"\xff", b"\xfe"), (b" ", b"\xff\xfe")]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vocab_size": 100}, "vocab_size 100 is too small"),
        ({"vocab_size": 256}, "at least 256 bytes \\+ 1 special"),
    ],
)
def test_bad_vocab_size(tiny_corpus: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        train_bpe(tiny_corpus, special_tokens=["<|endoftext|>"], **kwargs)


def test_bad_inputs(tmp_path: Path, tiny_corpus: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty corpus"):
        train_bpe(empty, 300, ["<|endoftext|>"])
    with pytest.raises(TypeError, match="special token 5 is a int"):
        train_bpe(tiny_corpus, 300, [5])  # type: ignore[list-item]
    with pytest.raises(FileNotFoundError, match="nope.txt does not exist"):
        train_bpe(tmp_path / "nope.txt", 300)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        train_bpe(bad, 300)


def test_corpus_smaller_than_vocab(tiny_corpus: Path) -> None:
    vocab, merges = train_bpe(tiny_corpus, 5000, ["<|endoftext|>"], backend="python")
    assert len(vocab) == 256 + len(merges) + 1 < 5000


def test_parallel_counting_equals_serial(varied_corpus: Path) -> None:
    a = train_bpe(varied_corpus, 600, ["<|endoftext|>"], workers=1, backend="python")
    b = train_bpe(varied_corpus, 600, ["<|endoftext|>"], workers=2, backend="python")
    assert a == b


def test_chunked_reading_equals_whole(varied_corpus: Path) -> None:
    from kiln.tokenizer.pretokenize import count_words, iter_text_chunks

    text = read_exact(varied_corpus)
    whole = count_words([text], "gpt2", ["<|endoftext|>"])
    chunks = list(iter_text_chunks(varied_corpus, chunk_chars=1000))
    assert len(chunks) > 10 and "".join(chunks) == text
    assert count_words(chunks, "gpt2", ["<|endoftext|>"]) == whole


def test_stage_writes_and_reuses(varied_corpus: Path, tmp_path: Path) -> None:
    cfg = TokenizerTrainConfig(inputs=(str(varied_corpus),), vocab_size=400, heldout=(str(varied_corpus),))
    out = train_tokenizer(cfg, tmp_path / "tok")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tokenizer"
    stats = manifest["stats"]
    assert stats["vocab_size"] == 400 and stats["merges"] == 400 - 257
    assert stats["heldout_bytes_per_token"] > 1.5
    tok = Tokenizer.load(out)
    assert tok.vocab_size == 400 and tok.eot_id == 399
    mtime = (out / "manifest.json").stat().st_mtime_ns
    train_tokenizer(cfg, tmp_path / "tok")
    assert (out / "manifest.json").stat().st_mtime_ns == mtime  # reused


def test_config_errors() -> None:
    with pytest.raises(ValueError, match="raise --vocab-size"):
        TokenizerTrainConfig(inputs=("x",), vocab_size=10)
    with pytest.raises(TypeError, match="not a str"):
        TokenizerTrainConfig(inputs=("x",), special_tokens=(1,))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not one of"):
        TokenizerTrainConfig(inputs=("x",), pattern="gpt5")


def test_cli_train(tiny_corpus: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from kiln.cli.main import main

    assert main(["tokenizer", "train", "--input", str(tiny_corpus), "--out", str(tmp_path / "t"), "--vocab-size", "263"]) == 0
    assert Tokenizer.load(tmp_path / "t").vocab_size == 263
    assert main(["tokenizer", "train", "--input", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "u")]) == 1
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("backend", ["python", "native"])
def test_invalid_utf8_reported_once(tmp_path: Path, backend: str, caplog: pytest.LogCaptureFixture) -> None:
    from kiln.tokenizer import native

    if backend == "native" and not native.available():
        pytest.skip("C core not built")
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ok \xff ok \xfe ok " * 100)
    with caplog.at_level("WARNING"):
        train_bpe(p, 260, [], backend=backend)
    assert sum("invalid UTF-8" in r.message for r in caplog.records) == 1
