"""Parquet output, tar archives of web files, per-domain drop counts, and bad documents counted."""

from __future__ import annotations

import gzip
import io
import json
import tarfile
from dataclasses import replace

import pytest
from webfixtures import english_paragraphs, html_page

from kiln.data.document import Document
from kiln.data.steps import Stats

pytest.importorskip("fastwarc")
pytest.importorskip("resiliparse")


def _warc_bytes(tmp_path, n: int) -> bytes:
    from kiln.bench.data import write_eval_warc

    p = tmp_path / "x.warc.gz"
    write_eval_warc([{"url": f"https://w{i}.example/p", "html": html_page(english_paragraphs(i))} for i in range(n)], p)
    return p.read_bytes()


def _tar(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_tar_of_warc_html_and_jsonl(tmp_path) -> None:
    from kiln.data.pipeline import minimal, read_shard

    members = {
        "crawl/a.warc.gz": _warc_bytes(tmp_path, 3),
        "crawl/page.html": html_page(english_paragraphs(7)).encode(),
        "crawl/docs.jsonl": (json.dumps({"text": "one"}) + "\n{broken\n" + json.dumps({"text": "two"}) + "\n").encode(),
        "crawl/README.md": b"about this archive",
        "crawl/image.png": b"\x89PNG...",
    }
    _tar(tmp_path / "crawl.tar.gz", members)
    stats = Stats()
    docs = list(read_shard(str(tmp_path / "crawl.tar.gz"), minimal(), stats))
    fmts = sorted(d.metadata.get("format", "text") for d in docs)
    assert len(docs) == 6 and fmts.count("html") == 4
    assert {d.metadata["domain"] for d in docs if d.metadata.get("domain")} == {"w0.example", "w1.example", "w2.example"}
    assert stats.errors == {"tar_unsupported_member": 1, "read_invalid_json": 1}
    assert docs[0].metadata["source"].endswith("crawl.tar.gz/crawl/a.warc.gz")
    where = {e["reason"]: e["where"] for e in stats.error_samples}
    assert where["read_invalid_json"].endswith("crawl.tar.gz/crawl/docs.jsonl:2")

    # a truncated archive: what was read stays, the break is one counted error, nothing raises
    raw = (tmp_path / "crawl.tar.gz").read_bytes()
    (tmp_path / "cut.tar.gz").write_bytes(raw[: len(raw) // 2])
    stats = Stats()
    docs = list(read_shard(str(tmp_path / "cut.tar.gz"), minimal(), stats))
    assert sum(stats.errors.values()) >= 1 and any(k in stats.errors for k in ("tar_broken", "warc_broken"))


def test_parquet_output_reads_back_and_feeds_tokenize(tmp_path) -> None:
    pytest.importorskip("pyarrow")
    from kiln.data.pipeline import minimal, run_pipeline
    from kiln.data.readers import read_documents
    from kiln.shards.tokenize import TokenizeConfig, split_sources

    src = tmp_path / "in.jsonl"
    texts = [english_paragraphs(i, 6) for i in range(5)]
    src.write_text("".join(json.dumps({"text": t, "url": f"https://d{i}.example/"}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "out"
    stats = run_pipeline(replace(minimal(), workers=1, report=False, output_format="parquet"), [str(src)], out)
    assert stats.kept == 5
    shard = out / "train_00000.parquet"
    back = list(read_documents(str(shard)))
    assert [d.text for d in back] == texts
    assert json.loads(back[0].metadata["metadata"])["url"] == "https://d0.example/"
    assert split_sources(TokenizeConfig(corpus=str(out)))["train"] == [str(shard)]
    with pytest.raises(ValueError, match="output_format"):
        replace(minimal(), output_format="csv")


def test_drop_domains_are_counted_merged_and_reported() -> None:
    from kiln.data.report import render_html

    a, b = Stats(), Stats()
    for s, dom in ((a, "spam.example"), (a, "spam.example"), (b, "ok.example")):
        d = Document("x", "id", {"domain": dom})
        s.add_input(d)
        s.add_drop(d, "gopher_short_doc")
    a.merge(b)
    assert a.drop_domains["gopher_short_doc"] == {"spam.example": 2, "ok.example": 1}
    again = Stats.from_dict(json.loads(json.dumps(a.to_dict())))
    assert again.drop_domains == a.drop_domains
    page = render_html(again, "t")
    assert "Top domains per drop reason" in page and "spam.example (2)" in page


def test_empty_gigantic_and_binary_documents_are_counted(tmp_path) -> None:
    from kiln.data.pipeline import minimal, run_pipeline

    src = tmp_path / "bad.jsonl"
    docs = ["", "   ", "x" * 3000, "\x00\x01\x02" * 500 + "abc", english_paragraphs(1, 5)]
    with open(src, "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in docs)
    with open(src, "ab") as f:
        f.write(b'{"text": "caf\xe9 invalid utf-8 here"}\n')
    gz = tmp_path / "trunc.jsonl.gz"
    gz.write_bytes(gzip.compress(b"".join(json.dumps({"text": english_paragraphs(i, 3)}).encode() + b"\n" for i in range(50)))[:400])
    stats = run_pipeline(replace(minimal(), workers=1, report=False, max_bytes=2000), [str(src), str(gz)], tmp_path / "out")
    stats.check_balance()
    assert stats.dropped["empty"] == 2 and stats.dropped["too_large"] == 1
    assert stats.dropped["binary_or_bad_encoding"] == 1
    # The line with invalid UTF-8 is repaired and kept (a counter, not an error: issue 24 item 5).
    assert "read_invalid_utf8" not in stats.errors and stats.counters["repaired_invalid_utf8"] == 1
    assert stats.errors["read_truncated_file"] == 1


def test_extraction_crash_is_a_counted_drop(monkeypatch) -> None:
    from kiln.data import curation, pipeline
    from kiln.data.steps import run_steps

    def flaky(html, url=None, cfg=None):
        if "boom" in html:
            raise RuntimeError("parser choked")
        return english_paragraphs(0, 5)

    monkeypatch.setattr(curation, "extract_text", flaky)  # the extraction step's class lives there
    cfg = replace(pipeline.minimal(), langid=None)
    stats = Stats()
    docs = [Document(h, f"d{i}", {"format": "html"}) for i, h in enumerate(["<p>boom</p>", "<p>fine</p>"])]
    for d in docs:
        stats.add_input(d)
    kept = list(run_steps(docs, pipeline.build_steps(cfg, stats), stats))
    assert len(kept) == 1 and stats.dropped["extract_error"] == 1
    stats.check_balance()
