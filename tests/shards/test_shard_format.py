"""Token shard files: round trips, header validation with errors naming the file, ShardWriter rollover."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.shards import (
    HEADER_BYTES,
    ShardFormatError,
    ShardWriter,
    read_header,
    read_shard,
    write_shard,
)


@pytest.mark.parametrize("vocab_size, dtype", [(1000, np.uint16), (65536, np.uint16), (100_000, np.uint32)])
def test_round_trip(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, vocab_size, size=1234)
    starts = np.array([0, 10, 500, 1200])
    path = write_shard(tmp_path / "s.bin", tokens, starts, vocab_size)
    shard = read_shard(path)
    assert shard.tokens.dtype == dtype
    np.testing.assert_array_equal(shard.tokens, tokens)
    np.testing.assert_array_equal(shard.doc_starts, starts)
    assert shard.vocab_size == vocab_size and len(shard) == 1234 and shard.n_docs == 4
    assert path.stat().st_size == HEADER_BYTES + 1234 * np.dtype(dtype).itemsize + 4 * 8
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_header_layout(tmp_path):
    path = write_shard(tmp_path / "s.bin", [1, 2, 3], [0], 300)
    raw = path.read_bytes()[:HEADER_BYTES]
    assert raw[:8] == b"KILNTOKS"
    assert struct.unpack_from("<IIQQQ", raw, 8) == (1, 1, 3, 1, 300)
    assert raw[40:] == b"\0" * 24


def test_empty_shard(tmp_path):
    shard = read_shard(write_shard(tmp_path / "e.bin", np.zeros(0, np.int64), [], 10))
    assert len(shard) == 0 and shard.n_docs == 0


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset:offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_wrong_magic_names_file(tmp_path):
    path = write_shard(tmp_path / "bad.bin", [1, 2, 3], [0], 300)
    _corrupt(path, 0, b"NOTKILN!")
    with pytest.raises(ShardFormatError, match=r"bad\.bin.*not a Kiln token shard"):
        read_shard(path)


def test_wrong_version_names_file(tmp_path):
    path = write_shard(tmp_path / "v.bin", [1, 2, 3], [0], 300)
    _corrupt(path, 8, struct.pack("<I", 7))
    with pytest.raises(ShardFormatError, match=r"v\.bin.*version 7"):
        read_shard(path)


def test_unknown_dtype(tmp_path):
    path = write_shard(tmp_path / "d.bin", [1, 2, 3], [0], 300)
    _corrupt(path, 12, struct.pack("<I", 9))
    with pytest.raises(ShardFormatError, match=r"d\.bin.*dtype code 9"):
        read_header(path)


def test_truncated_tokens_names_file(tmp_path):
    path = write_shard(tmp_path / "t.bin", np.arange(100), [0, 50], 300)
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ShardFormatError, match=r"t\.bin: truncated.*100 tokens"):
        read_shard(path)


def test_truncated_header_names_file(tmp_path):
    path = tmp_path / "h.bin"
    path.write_bytes(b"KILNTOKS\x01")
    with pytest.raises(ShardFormatError, match=r"h\.bin: truncated"):
        read_shard(path)


def test_trailing_bytes(tmp_path):
    path = write_shard(tmp_path / "x.bin", [1, 2], [0], 300)
    path.write_bytes(path.read_bytes() + b"junk")
    with pytest.raises(ShardFormatError, match="trailing bytes"):
        read_shard(path)


def test_missing_shard(tmp_path):
    with pytest.raises(FileNotFoundError, match="kiln tokenize"):
        read_shard(tmp_path / "nope.bin")


def test_out_of_vocab_rejected(tmp_path):
    with pytest.raises(ValueError, match="outside"):
        write_shard(tmp_path / "o.bin", [1, 300], [0], 300)
    assert not list(tmp_path.iterdir())


def test_writer_rollover(tmp_path):
    docs = [np.arange(7) + 1, np.arange(5) + 10, np.arange(12) + 20, np.arange(3) + 40]
    with ShardWriter(tmp_path, "train", vocab_size=100, shard_tokens=10) as w:
        for d in docs:
            w.add_document(d)
    assert [p.name for p in w.paths] == ["train_00000.bin", "train_00001.bin", "train_00002.bin"]
    shards = [read_shard(p) for p in w.paths]
    assert [len(s) for s in shards] == [10, 10, 7]
    np.testing.assert_array_equal(np.concatenate([s.tokens for s in shards]), np.concatenate(docs))
    # doc starts 0, 7, 12, 24 in stream positions -> per shard [0, 7], [2], [4]
    assert [s.doc_starts.tolist() for s in shards] == [[0, 7], [2], [4]]
    assert w.n_tokens == 27 and w.n_docs == 4


def test_writer_exact_boundary(tmp_path):
    with ShardWriter(tmp_path, "val", vocab_size=70000, shard_tokens=4) as w:
        w.add_document([1, 2, 3, 4])
        w.add_document([5, 6, 7, 8])
    shards = [read_shard(p) for p in w.paths]
    assert [s.doc_starts.tolist() for s in shards] == [[0], [0]]
    assert shards[0].tokens.dtype == np.uint32


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 40), min_size=0, max_size=30),
    shard_tokens=st.integers(1, 50),
)
def test_writer_stream_round_trip(tmp_path_factory, lengths, shard_tokens):
    """Any documents and any shard size: shards read back to back give the stream and doc starts."""
    d = tmp_path_factory.mktemp("w")
    rng = np.random.default_rng(len(lengths) * 100 + shard_tokens)
    docs = [rng.integers(0, 500, size=n) for n in lengths]
    with ShardWriter(d, "train", vocab_size=500, shard_tokens=shard_tokens) as w:
        for doc in docs:
            w.add_document(doc)
    shards = [read_shard(p) for p in w.paths]
    assert all(len(s) == shard_tokens for s in shards[:-1])
    stream = np.concatenate([s.tokens for s in shards]) if shards else np.zeros(0)
    np.testing.assert_array_equal(stream, np.concatenate(docs) if docs else np.zeros(0))
    offsets = np.cumsum([0] + [len(s) for s in shards])
    starts = [int(o + x) for s, o in zip(shards, offsets) for x in s.doc_starts]
    nonempty = [n for n in lengths if n]
    assert starts == (np.cumsum([0] + nonempty)[:-1].tolist() if nonempty else [])
