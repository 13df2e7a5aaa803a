"""Tokenizer: round trips, special tokens, streaming, files, errors, GPT-2 equal to tiktoken."""

from __future__ import annotations

import functools
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizer_samples import VARIED, read_exact

from kiln.tokenizer import Tokenizer, train_bpe

BACKENDS = ["python", "auto"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list]:
    p = tmp_path_factory.mktemp("t") / "c.txt"
    p.write_text("\n".join(VARIED * 20) + "<|endoftext|>" + "\n".join(reversed(VARIED * 5)), encoding="utf-8")
    return train_bpe(p, 700, ["<|endoftext|>"], backend="python")


@pytest.fixture(scope="module", params=BACKENDS)
def tok(request: pytest.FixtureRequest, trained: tuple[dict, list]) -> Tokenizer:
    vocab, merges = trained
    return Tokenizer(vocab, merges, ["<|endoftext|>", "<|pad|>"], backend=request.param)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_roundtrip_arbitrary_unicode(tok: Tokenizer, text: str) -> None:
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(data=st.binary(max_size=100))
def test_roundtrip_arbitrary_bytes(tok: Tokenizer, data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")  # what a file read with surrogateescape yields
    assert tok.decode_bytes(tok.encode(text)) == data


@pytest.mark.parametrize("text", VARIED)
def test_roundtrip_varied(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_special_tokens(tok: Tokenizer) -> None:
    eot, pad = tok.special_tokens["<|endoftext|>"], tok.special_tokens["<|pad|>"]
    assert tok.eot_id == eot == 256 + len(tok.merges) and pad == eot + 1 and tok.vocab_size == pad + 1
    ids = tok.encode("a<|endoftext|>b<|pad|><|endoftext|>")
    assert ids.count(eot) == 2 and ids.count(pad) == 1
    assert tok.decode(ids) == "a<|endoftext|>b<|pad|><|endoftext|>"
    assert eot not in tok.encode_ordinary("<|endoftext|>")
    assert tok.decode(tok.encode_ordinary("<|endoftext|>")) == "<|endoftext|>"
    assert tok.token_bytes()[eot] == 0 and tok.token_bytes()[65] == 1


def test_overlapping_special_tokens() -> None:
    vocab = {i: bytes([i]) for i in range(256)}
    t = Tokenizer(vocab, [], ["<|a|>", "<|a|><|a|>"])
    ids = t.encode("x<|a|><|a|>y<|a|>")
    assert ids == [ord("x"), t.special_tokens["<|a|><|a|>"], ord("y"), t.special_tokens["<|a|>"]]


def test_encode_iterable_equals_encode(tok: Tokenizer, varied_corpus: Path) -> None:
    text = read_exact(varied_corpus)
    with open(varied_corpus, encoding="utf-8", newline="") as f:
        streamed = list(tok.encode_iterable(f, buffer_chars=500))
    assert streamed == tok.encode(text)
    assert list(tok.encode_iterable(io.StringIO(""))) == []


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(VARIED) == [tok.encode(t) for t in VARIED]
    assert tok.encode_batch([]) == []


def test_decode_out_of_range_names_id(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="token id 99999 is not in the vocab"):
        tok.decode([1, 2, 99999])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_save_load(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "tokenizer.json")
    for src in (path, tmp_path):
        t2 = Tokenizer.load(src)
        assert t2.vocab == tok.vocab and t2.merges == tok.merges and t2.special_tokens == tok.special_tokens
        assert t2.encode(VARIED[0]) == tok.encode(VARIED[0])


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run `kiln tokenizer train`"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(ValueError, match="is not a Kiln tokenizer"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        Tokenizer.load(tmp_path)


def test_constructor_errors() -> None:
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(ValueError, match="lacks single bytes"):
        Tokenizer({i: bytes([i]) for i in range(200)}, [])
    with pytest.raises(ValueError, match="merge 0"):
        Tokenizer(vocab, [(b"a", b"b")])
    with pytest.raises(TypeError, match="not a str"):
        Tokenizer(vocab, [], [b"<|x|>"])  # type: ignore[list-item]


def test_any_vocab_layout(trained: tuple[dict, list]) -> None:
    # Specials first, then bytes, then merges (CS336's layout): same tokens, shifted ids.
    vocab, merges = trained
    ordinary = [b for i, b in sorted(vocab.items()) if b != b"<|endoftext|>"]
    shifted = {0: b"<|endoftext|>", **{i + 1: b for i, b in enumerate(ordinary)}}
    a = Tokenizer(vocab, merges, ["<|endoftext|>"], backend="python")
    b = Tokenizer(shifted, merges, ["<|endoftext|>"], backend="python")
    assert b.eot_id == 0
    for text in VARIED:
        assert [i + 1 if i != a.eot_id else 0 for i in a.encode(text)] == b.encode(text)


# --------------------------------------------------------------------------- GPT-2 vs tiktoken
@functools.lru_cache(maxsize=4)
def _gpt2_pair(data_dir: str, backend: str) -> tuple[Tokenizer, object]:
    import tiktoken

    from kiln.tokenizer.formats import unicode_to_byte

    vocab_json, merges_txt = Path(data_dir) / "vocab.json", Path(data_dir) / "merges.txt"
    # tiktoken's ranks for gpt2 are the ids of vocab.json, whose keys spell bytes with GPT-2's
    # byte-to-unicode map. (tiktoken.load.data_gym_to_mergeable_bpe_ranks would drop the first line
    # of merges.txt as a "#version" header, which this copy does not have.)
    u2b = unicode_to_byte()
    encoder = json.loads(vocab_json.read_text(encoding="utf-8"))
    ranks = {bytes(u2b[c] for c in k): v for k, v in encoder.items() if k != "<|endoftext|>"}
    # tiktoken's "gpt2" pat_str (equivalent to GPT-2's, with possessive quantifiers for speed).
    pat = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    enc = tiktoken.Encoding("gpt2-local", pat_str=pat, mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    return Tokenizer.from_gpt2_files(vocab_json, merges_txt, backend=backend), enc


@pytest.fixture
def gpt2_pair(request: pytest.FixtureRequest, gpt2_files: tuple[Path, Path]) -> tuple[Tokenizer, object]:
    """(Kiln's GPT-2 tokenizer from the shared files, tiktoken's gpt2 Encoding built from the same files)."""
    pytest.importorskip("tiktoken")
    return _gpt2_pair(str(gpt2_files[0].parent), request.param)


@pytest.mark.parametrize("gpt2_pair", BACKENDS, indirect=True)
def test_gpt2_matches_tiktoken(gpt2_pair: tuple[Tokenizer, object], shared_data: Path) -> None:
    ours, enc = gpt2_pair
    texts = list(VARIED)
    for name in ("pretrain/wiki_demo.txt",):
        texts.append((shared_data / name).read_text(encoding="utf-8")[:200_000])
    for line in (shared_data / "pretrain/c4_demo.jsonl").read_text(encoding="utf-8").splitlines()[:100]:
        texts.append(json.loads(line)["text"])
    for text in texts:
        assert ours.encode_ordinary(text) == enc.encode_ordinary(text), text[:80]
    joined = "<|endoftext|>".join(texts[:5])
    assert ours.encode(joined) == enc.encode(joined, allowed_special="all")
    assert ours.vocab_size == 50257 and ours.eot_id == 50256


@pytest.mark.parametrize("gpt2_pair", BACKENDS, indirect=True)
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=["Cn", "Cs"]), max_size=100))
def test_gpt2_matches_tiktoken_hypothesis(gpt2_pair: tuple[Tokenizer, object], text: str) -> None:
    ours, enc = gpt2_pair
    assert ours.encode_ordinary(text) == enc.encode_ordinary(text)


def test_pickle(tok: Tokenizer) -> None:
    import pickle

    t2 = pickle.loads(pickle.dumps(tok))
    assert t2.backend == tok.backend and t2.special_tokens == tok.special_tokens
    assert t2.encode(VARIED[5] + "<|pad|>") == tok.encode(VARIED[5] + "<|pad|>")


def test_encode_iterable_special_token_with_spaces() -> None:
    # A special token holding " x" must not be cut when a chunk ends inside it.
    vocab = {i: bytes([i]) for i in range(256)}
    t = Tokenizer(vocab, [], ["<|end of text|>"], backend="python")
    text = ("some words here <|end of text|> more words " * 40)
    pieces = [text[i : i + 7] for i in range(0, len(text), 7)]
    assert list(t.encode_iterable(pieces, buffer_chars=20)) == t.encode(text)
