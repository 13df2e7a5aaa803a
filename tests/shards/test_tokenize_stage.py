"""tokenize_corpus: shards match the encoder, output independent of workers, reuse, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kiln.artifacts import read_manifest
from kiln.data.corpus import CorpusConfig, prepare_corpus
from kiln.shards import (
    ShardLoader,
    TokenDataset,
    TokenizeConfig,
    read_shard,
    shard_paths,
    tokenize_corpus,
)


class ByteTokenizer:
    """A byte-level stand-in with the interface the tokens stage uses (load, encode, vocab_size, eot_id).

    Token id = byte value; ``eot_id`` = 256; ``vocab_size`` may be set larger to force uint32."""

    def __init__(self, vocab_size: int = 257) -> None:
        self.vocab_size = vocab_size
        self.eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"vocab_size": self.vocab_size}))

    @classmethod
    def load(cls, path: str | Path) -> ByteTokenizer:
        return cls(json.loads(Path(path).read_text())["vocab_size"])


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "raw.jsonl"
    rng = np.random.default_rng(0)
    words = ["the", "king", "said", "unto", "them", "héllo", "wörld", "🙂", "and", "it", "was", "so"]
    recs = [{"text": " ".join(rng.choice(words, size=int(rng.integers(5, 120))))} for i in range(300)]
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    return prepare_corpus(CorpusConfig(source=str(src), val_fraction=0.1), tmp_path / "corpus")


def _real_tokenizer():
    """Kiln's Tokenizer with a few merges (no training needed), or None where it is not importable."""
    try:
        from kiln.tokenizer import Tokenizer
    except ImportError:
        return None
    vocab = {i: bytes([i]) for i in range(256)}
    merges = [(b"t", b"h"), (b"th", b"e"), (b" ", b"the"), (b"i", b"n"), (b"u", b"n"), (b"un", b"t")]
    for a, b in merges:
        vocab[len(vocab)] = a + b
    return Tokenizer(vocab, merges, special_tokens=["<|endoftext|>"])


@pytest.fixture
def tok(tmp_path):
    """(tokenizer, saved path): the real kiln Tokenizer, or the byte-level stand-in before it existed."""
    t = _real_tokenizer() or ByteTokenizer()
    p = tmp_path / "tokenizer.json"
    t.save(p)
    return t, p


@pytest.fixture
def tok_path(tok):
    return tok[1]


def _docs(path):
    from kiln.data.writers import read_records

    return [rec["text"] for rec in read_records(path)]


def test_shards_hold_every_document_then_eot(tmp_path, corpus, tok):
    tokenizer, tok_path = tok
    cfg = TokenizeConfig(corpus=str(corpus), tokenizer=str(tok_path), shard_tokens=5000, num_workers=1)
    out = tokenize_corpus(cfg, tmp_path / "tokens", progress=False)  # loads tok_path with Tokenizer.load
    for split in ("train", "val"):
        ds = TokenDataset(out, split)
        texts = _docs(corpus / f"{split}_00000.jsonl.zst")
        expected = np.concatenate([np.array(tokenizer.encode(t) + [tokenizer.eot_id]) for t in texts])
        assert tokenizer.decode(ds.get(0, len(ds)).tolist()).startswith(texts[0])
        np.testing.assert_array_equal(ds.get(0, len(ds)), expected)
        assert len(ds.doc_starts) == len(texts)
        assert all(read_shard(p).tokens.dtype == np.uint16 for p in shard_paths(out, split))
    m = read_manifest(out, "tokens")
    s = m["stats"]
    assert len(shard_paths(out, "train")) == s["train"]["shards"] > 1
    assert s["train"]["docs"] == len(_docs(corpus / "train_00000.jsonl.zst"))
    assert s["train"]["bytes"] == sum(len(t.encode()) for t in _docs(corpus / "train_00000.jsonl.zst"))
    assert s["tokens"] == s["train"]["tokens"] + s["val"]["tokens"]
    assert 0.9 < s["bytes_per_token"] < 1.5  # a few merges: about one token per byte
    assert str(tok_path) in m["inputs"] and str(corpus) in m["inputs"]
    ShardLoader(out, 4, 64, doc_aligned=True).next_batch()


def test_workers_do_not_change_output(tmp_path, corpus, tok_path):
    outs = []
    for w in (1, 2):
        cfg = TokenizeConfig(corpus=str(corpus), tokenizer=str(tok_path), shard_tokens=3000, num_workers=w)
        outs.append(tokenize_corpus(cfg, tmp_path / f"t{w}", progress=False))
    names = sorted(p.name for p in outs[0].glob("*.bin"))
    assert names == sorted(p.name for p in outs[1].glob("*.bin"))
    for n in names:
        assert (outs[0] / n).read_bytes() == (outs[1] / n).read_bytes()


def test_uint32_for_large_vocab(tmp_path, corpus, tok_path):
    cfg = TokenizeConfig(corpus=str(corpus), tokenizer=str(tok_path), num_workers=1)
    out = tokenize_corpus(cfg, tmp_path / "t", tokenizer=ByteTokenizer(vocab_size=70_000), progress=False)
    assert read_shard(shard_paths(out)[0]).tokens.dtype == np.uint32


def test_reuse_and_recompute(tmp_path, corpus, tok_path):
    cfg = TokenizeConfig(corpus=str(corpus), tokenizer=str(tok_path), num_workers=1)
    out = tokenize_corpus(cfg, tmp_path / "t", progress=False)
    created = read_manifest(out)["created"], read_manifest(out)["seconds"]
    tokenize_corpus(cfg, out, progress=False)
    assert (read_manifest(out)["created"], read_manifest(out)["seconds"]) == created
    cfg2 = TokenizeConfig(corpus=str(corpus), tokenizer=str(tok_path), num_workers=1, shard_tokens=2000)
    tokenize_corpus(cfg2, out, progress=False)
    assert read_manifest(out)["config"]["shard_tokens"] == 2000 and len(shard_paths(out)) > 1


def test_explicit_sources(tmp_path, tok_path):
    (tmp_path / "a.txt").write_text("just one file")
    cfg = TokenizeConfig(train=(str(tmp_path / "a.txt"),), tokenizer=str(tok_path), num_workers=1)
    out = tokenize_corpus(cfg, tmp_path / "t", tokenizer=ByteTokenizer(), progress=False)
    s = read_manifest(out)["stats"]
    assert s["train"]["docs"] == 1 and s["train"]["tokens"] == len("just one file") + 1 and "val" not in s
    # the tokenizer file changed -> recomputed
    ByteTokenizer(vocab_size=300).save(tok_path)
    tokenize_corpus(cfg, out, tokenizer=ByteTokenizer(vocab_size=300), progress=False)
    assert read_manifest(out)["stats"]["vocab_size"] == 300


def test_missing_corpus_and_eot(tmp_path, tok_path):
    with pytest.raises(ValueError, match="corpus"):
        TokenizeConfig()
    with pytest.raises(FileNotFoundError, match="prepare_corpus"):
        tokenize_corpus(TokenizeConfig(corpus=str(tmp_path / "nope")), tmp_path / "t")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no train documents"):
        tokenize_corpus(TokenizeConfig(corpus=str(empty)), tmp_path / "t")
    (empty / "train.jsonl").write_text('{"text": "x"}\n')
    no_eot = ByteTokenizer()
    no_eot.eot_id = None
    with pytest.raises(ValueError, match="endoftext"):
        tokenize_corpus(TokenizeConfig(corpus=str(empty), tokenizer=str(tok_path)), tmp_path / "t",
                        tokenizer=no_eot, progress=False)
    assert not (tmp_path / "t").exists()


def test_cli(tmp_path, corpus, tok_path, monkeypatch, capsys):
    import kiln.shards.tokenize as stage
    from kiln.cli.main import main

    with pytest.raises(SystemExit) as e:
        main(["tokenize", "--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for opt in ("--corpus", "--tokenizer", "--out", "--shard-tokens", "--workers"):
        assert opt in help_text
    if _real_tokenizer() is None:
        monkeypatch.setattr(stage, "load_tokenizer", ByteTokenizer.load)
    rc = main(["tokenize", "--corpus", str(corpus), "--tokenizer", str(tok_path), "--out", str(tmp_path / "t"),
               "--shard-tokens", "4000", "--workers", "1"])
    assert rc == 0
    assert "train:" in capsys.readouterr().out
    assert read_manifest(tmp_path / "t", "tokens")["config"]["shard_tokens"] == 4000
    assert main(["tokenize", "--corpus", str(tmp_path / "missing"), "--tokenizer", str(tok_path),
                 "--out", str(tmp_path / "t2")]) == 1
