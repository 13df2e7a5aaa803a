"""Every record is counted exactly once in the funnel (issue 24 item 5), for every reader and every
kind of damage: ``docs_in == kept + dropped + errors`` and ``docs_in == records in the file``. A
record with invalid UTF-8 is repaired and kept (the ``repaired_invalid_utf8`` counter), not also an
error; a file cut short loses the record it cut (one error)."""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import replace

import pytest
from webfixtures import english_paragraphs, html_page

from kiln.data.pipeline import minimal, run_pipeline

pytest.importorskip("fastwarc")
pytest.importorskip("resiliparse")


def _jsonl_lines() -> list[bytes]:
    """Ten records: five good, one of each kind of damage (blank lines are not records)."""
    good = [json.dumps({"text": english_paragraphs(i, 6), "id": i}).encode() for i in range(5)]
    return [
        good[0], b"{not json", good[1], b'{"text": "caf\xe9 au lait, invalid UTF-8 kept"}', b"", good[2],
        b'{"other": "no text field"}', b'{"text": 5}', b"[1, 2]", good[3], b"   ", good[4],
    ]


def _warc_record(rtype: str, block: bytes, i: int, declared: int | None = None, ctype: str = "") -> bytes:
    ctype = ctype or {"response": "application/http; msgtype=response", "request": "application/http; msgtype=request",
                      "conversion": "text/plain"}[rtype]
    head = (f"WARC/1.0\r\nWARC-Type: {rtype}\r\nWARC-Record-ID: <urn:test:{i}>\r\n"
            f"WARC-Target-URI: https://s{i}.example/\r\nWARC-Date: 2024-01-01T00:00:00Z\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {declared or len(block)}\r\n\r\n").encode()
    return head + block + (b"\r\n\r\n" if declared is None else b"")


def _http(body: bytes, ctype: str = "text/html; charset=utf-8") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\n\r\n".encode() + body


def _inputs(tmp_path) -> dict[str, tuple[str, int]]:
    """kind -> (path, records in the file)."""
    out = {}
    lines = _jsonl_lines()
    (tmp_path / "a.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    out["jsonl"] = (str(tmp_path / "a.jsonl"), sum(1 for ln in lines if ln.strip()))
    # JSONL.gz cut short: the records whose line is complete in what is left, plus the one cut.
    raw = b"\n".join(lines) + b"\n"
    cut = gzip.compress(raw)[: len(gzip.compress(raw)) * 2 // 3]
    (tmp_path / "b.jsonl.gz").write_bytes(cut)
    left = zlib.decompressobj(31).decompress(cut)
    whole = left[: left.rfind(b"\n") + 1]
    out["jsonl.gz"] = (str(tmp_path / "b.jsonl.gz"), sum(1 for ln in whole.split(b"\n") if ln.strip()) + 1)
    # WARC: two pages, one with bytes that are not UTF-8, an image, a request (not a record of a
    # document), and a response cut short at the end of the file.
    pages = [html_page(english_paragraphs(10 + i, 8)).encode() for i in range(3)]
    warc = b"".join([
        _warc_record("response", _http(pages[0]), 0),
        _warc_record("request", b"GET / HTTP/1.1\r\nHost: s1.example\r\n\r\n", 1),
        _warc_record("response", _http(pages[1].replace(b"<article>", b"<article>caf\xe9 ")), 2),
        _warc_record("response", _http(b"\x89PNG\r\n\x1a\n" + bytes(200), "image/png"), 3),
        _warc_record("response", _http(pages[2])[:300], 4, declared=len(_http(pages[2]))),
    ])
    (tmp_path / "c.warc").write_bytes(warc)
    out["warc"] = (str(tmp_path / "c.warc"), 4)
    texts = [english_paragraphs(20 + i, 8).encode() for i in range(3)]
    wet = b"".join([
        _warc_record("conversion", texts[0], 0),
        _warc_record("conversion", texts[1] + b" caf\xe9", 1),
        _warc_record("conversion", b"", 2),
        _warc_record("conversion", texts[2][:100], 3, declared=len(texts[2])),
    ])
    (tmp_path / "d.warc.wet").write_bytes(wet)
    out["wet"] = (str(tmp_path / "d.warc.wet"), 4)
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [english_paragraphs(30 + i, 6) for i in range(4)] + [None, "", "x" * 10]
    pq.write_table(pa.table({"text": rows, "n": list(range(len(rows)))}), tmp_path / "e.parquet")
    out["parquet"] = (str(tmp_path / "e.parquet"), len(rows))
    (tmp_path / "f.txt").write_bytes("na\u00efve text ".encode("latin-1") * 20)
    out["text"] = (str(tmp_path / "f.txt"), 1)
    (tmp_path / "g.txt.gz").write_bytes(gzip.compress(english_paragraphs(40).encode())[:200])
    out["text.gz"] = (str(tmp_path / "g.txt.gz"), 1)
    return out


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return _inputs(tmp_path_factory.mktemp("damaged"))


@pytest.mark.parametrize("kind", ["jsonl", "jsonl.gz", "warc", "wet", "parquet", "text", "text.gz"])
def test_every_record_is_counted_once(kind, inputs, tmp_path) -> None:
    path, records = inputs[kind]
    cfg = replace(minimal(), workers=1, report=False, dedup=None)
    stats = run_pipeline(cfg, [path], tmp_path / "out")
    stats.check_balance()
    assert stats.docs_in == stats.kept + sum(stats.dropped.values()) + sum(stats.errors.values())
    assert stats.docs_in == records, (stats.docs_in, records, dict(stats.errors), dict(stats.dropped))
    assert not any("utf8" in r for r in stats.errors)  # repaired and kept, never an error too
    if kind in ("jsonl", "text"):
        assert stats.counters["repaired_invalid_utf8"] == 1


def test_jsonl_damage_kinds_are_named(inputs, tmp_path) -> None:
    stats = run_pipeline(replace(minimal(), workers=1, report=False, dedup=None), [inputs["jsonl"][0]], tmp_path / "o")
    assert dict(stats.errors) == {"read_invalid_json": 1, "read_missing_text_key": 1, "read_text_not_a_string": 1,
                                  "read_not_an_object": 1}
    assert stats.kept == 6  # five good records and the repaired one
