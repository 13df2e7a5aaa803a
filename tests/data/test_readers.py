"""read_documents on every supported source, built in tmp_path; bad records counted, never fatal."""

from __future__ import annotations

import bz2
import collections
import functools
import gzip
import http.server
import io
import json
import lzma
import sys
import tarfile
import threading
import types

import pytest
import zstandard

from kiln.data.readers import parse_hf_source, read_documents

RECORDS = [{"text": "first doc", "url": "a"}, {"text": "second doc", "url": "b"}, {"text": "third"}]


def _jsonl(records=RECORDS) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


def texts(docs):
    return [d.text for d in docs]


def test_txt_file(tmp_path):
    p = tmp_path / "a.txt"
    p.write_text("hello\nworld\n")
    (doc,) = read_documents(str(p))
    assert doc.text == "hello\nworld\n" and doc.id == "a.txt" and doc.metadata["source"] == str(p)


def test_folder_and_glob(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.jsonl").write_bytes(_jsonl())
    (tmp_path / "skip.bin").write_bytes(b"\0\1")
    (tmp_path / ".hidden.txt").write_text("no")
    (tmp_path / "LICENSE.txt").write_text("no")
    docs = list(read_documents(tmp_path))
    assert texts(docs) == ["A", "B", "first doc", "second doc", "third"]
    assert docs[0].id == "a.txt" and docs[2].id == "sub/c.jsonl:1"
    assert texts(read_documents(str(tmp_path / "*.txt"))) == ["A"]
    assert len(list(read_documents(str(tmp_path / "**" / "*.jsonl")))) == 3


@pytest.mark.parametrize("name, compress", [
    ("d.jsonl", lambda b: b),
    ("d.jsonl.gz", gzip.compress),
    ("d.json.gz", gzip.compress),
    ("d.jsonl.zst", lambda b: zstandard.ZstdCompressor().compress(b)),
    ("d.jsonl.bz2", bz2.compress),
    ("d.ndjson.xz", lzma.compress),
])
def test_jsonl_formats(tmp_path, name, compress):
    p = tmp_path / name
    p.write_bytes(compress(_jsonl()))
    docs = list(read_documents(str(p)))
    assert texts(docs) == ["first doc", "second doc", "third"]
    assert docs[1].id == f"{name}:2" and docs[1].metadata == {"url": "b", "source": str(p)}


def test_json_array_and_keys(tmp_path):
    p = tmp_path / "arr.json"
    p.write_text(json.dumps([{"body": "x", "key": 7}, {"body": "y", "key": 8}]))
    docs = list(read_documents(str(p), text_key="body", id_key="key"))
    assert texts(docs) == ["x", "y"] and [d.id for d in docs] == ["7", "8"]
    gz = tmp_path / "arr.json.gz"
    gz.write_bytes(gzip.compress(b"\n  " + json.dumps([{"text": "z"}]).encode()))
    assert texts(read_documents(str(gz))) == ["z"]


def test_bad_records_counted_not_fatal(tmp_path, caplog):
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "ok"}\n{not json\n\n[1, 2]\n{"other": 1}\n{"text": "caf\xe9"}\n{"text": 5}\n')
    errors, repairs = collections.Counter(), collections.Counter()
    docs = list(read_documents(str(p), errors=errors, repairs=repairs))
    assert texts(docs) == ["ok", "caf\ufffd"]
    # The invalid UTF-8 line is kept, repaired: a repair, not an error (each record counted once).
    assert errors == {"invalid_json": 1, "not_an_object": 1, "missing_text_key": 1, "text_not_a_string": 1}
    assert repairs == {"invalid_utf8": 1}
    assert "bad.jsonl:2: invalid_json" in caplog.text


def test_compressed_text_file(tmp_path):
    p = tmp_path / "a.txt.gz"
    p.write_bytes(gzip.compress("héllo".encode()))
    assert texts(read_documents(str(p))) == ["héllo"]


def test_invalid_utf8_text_file(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("naïve".encode("latin-1"))
    errors, repairs = collections.Counter(), collections.Counter()
    (doc,) = read_documents(str(p), errors=errors, repairs=repairs)
    assert doc.text == "na\ufffdve" and repairs["invalid_utf8"] == 1 and not errors


def test_truncated_gzip_counted(tmp_path):
    p = tmp_path / "cut.jsonl.gz"
    p.write_bytes(gzip.compress(_jsonl(RECORDS * 200))[:-40])
    errors = collections.Counter()
    docs = list(read_documents(str(p), errors=errors))
    assert 0 < len(docs) < 600 and errors["truncated_file"] == 1


def _tar(path, members: dict[str, bytes], mode: str) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w" if mode == "zst" else mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    data = buf.getvalue()
    path.write_bytes(zstandard.ZstdCompressor().compress(data) if mode == "zst" else data)


@pytest.mark.parametrize("name, mode", [
    ("a.tar", "w"), ("a.tar.gz", "w:gz"), ("a.tgz", "w:gz"), ("a.tar.xz", "w:xz"), ("a.tar.zst", "zst"),
])
def test_tar_archives(tmp_path, name, mode):
    p = tmp_path / name
    _tar(p, {"books/one.txt": b"Book one", "data/x.jsonl.gz": gzip.compress(_jsonl()),
             "README.md": b"about the data: skipped", "img.png": b"\x89PNG\0\0",
             "books/A title cut at 255 byt": "Book twö".encode(), "bin/blob": b"\0\1\2"}, mode)
    errors = collections.Counter()
    docs = list(read_documents(str(p), errors=errors))
    assert texts(docs) == ["Book one", "first doc", "second doc", "third", "Book twö"]
    assert errors == {"unsupported_member": 2}  # img.png, and bin/blob is not text
    assert docs[0].id == "books/one.txt" and docs[1].id == "data/x.jsonl.gz:1"
    assert docs[0].metadata["source"] == f"{p}/books/one.txt"


def test_limit_stops_early(tmp_path):
    p = tmp_path / "many.jsonl"
    p.write_bytes(_jsonl(RECORDS * 100))
    assert len(list(read_documents(str(p), limit=5))) == 5


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "t.parquet"
    pq.write_table(pa.table({"text": ["a", "b", None], "n": [1, 2, 3]}), p)
    errors = collections.Counter()
    docs = list(read_documents(str(p), errors=errors))
    assert texts(docs) == ["a", "b"] and docs[1].id == "t.parquet:1" and docs[1].metadata["n"] == 2
    assert errors["missing_text_key"] == 1


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    p = tmp_path / "t.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(read_documents(str(p)))


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(read_documents(str(tmp_path / "nope.jsonl")))
    (tmp_path / "x.docx").write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported file type"):
        list(read_documents(str(tmp_path / "x.docx")))
    with pytest.raises(FileNotFoundError, match="no supported files"):
        list(read_documents(str(tmp_path / "*.csv")))


@pytest.fixture
def http_root(tmp_path):
    """A local http.server on 127.0.0.1 serving tmp_path/www."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_url_download_cached(http_root, tmp_path):
    root, base = http_root
    (root / "c4.jsonl.gz").write_bytes(gzip.compress(_jsonl()))
    cache = tmp_path / "cache"
    docs = list(read_documents(f"{base}/c4.jsonl.gz", cache_dir=cache))
    assert texts(docs) == ["first doc", "second doc", "third"]
    assert docs[0].id == "c4.jsonl.gz:1" and docs[0].metadata["source"] == f"{base}/c4.jsonl.gz"
    (root / "c4.jsonl.gz").unlink()  # second read comes from the cache
    assert len(list(read_documents(f"{base}/c4.jsonl.gz", cache_dir=cache))) == 3
    assert not [p for p in cache.iterdir() if p.name.endswith(".part")]


def test_url_errors(http_root, tmp_path):
    _, base = http_root
    with pytest.raises(RuntimeError, match="could not download"):
        list(read_documents(f"{base}/missing.txt", cache_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="cannot tell the file type"):
        list(read_documents(f"{base}/download?id=3", cache_dir=tmp_path / "c"))


def test_hf_source_parsing():
    assert parse_hf_source("hf://roneneldan/TinyStories") == ("roneneldan/TinyStories", None, "train")
    assert parse_hf_source("hf://HuggingFaceFW/fineweb/sample-10BT:validation") == (
        "HuggingFaceFW/fineweb", "sample-10BT", "validation")
    assert parse_hf_source("hf://imdb:test") == ("imdb", None, "test")
    with pytest.raises(ValueError):
        parse_hf_source("hf://")


def test_hf_streaming(monkeypatch):
    calls = []

    def load_dataset(name, config=None, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "story one", "id": 1}, {"story": "no text"}, {"text": "story two", "id": 2}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    errors = collections.Counter()
    docs = list(read_documents("hf://roneneldan/TinyStories:validation", errors=errors))
    assert calls == [("roneneldan/TinyStories", None, "validation", True)]
    assert texts(docs) == ["story one", "story two"] and errors["missing_text_key"] == 1
    assert docs[1].id == "roneneldan/TinyStories:validation:2"


def test_hf_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        list(read_documents("hf://a/b"))


def test_real_gutenberg_first_members(shared_data):
    tar = shared_data / "pretrain" / "gutenberg_books.tar.gz"
    if not tar.is_file():
        pytest.skip("gutenberg_books.tar.gz is absent")
    docs = list(read_documents(str(tar), limit=3))
    assert len(docs) == 3
    assert all(d.id.endswith(".txt") and len(d.text) > 1000 for d in docs)
    assert "Gutenberg" in docs[0].text


def test_corrupt_parquet_counted(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "junk.parquet"
    p.write_bytes(b"this is not parquet at all")
    errors = collections.Counter()
    assert list(read_documents(str(p), errors=errors)) == []
    assert errors["unreadable_parquet"] == 1
