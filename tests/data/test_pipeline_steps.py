"""The pipeline's steps as classes (issue 17 item 4): each owns its config and drop decision;
inputs are identified by content; `kiln data run --set key=value` reaches every step's knobs."""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

import pytest

from kiln.data import curation
from kiln.data.document import Document
from kiln.data.pipeline import build_steps, minimal, run_pipeline, web_en
from kiln.data.steps import Filter, Stats, run_steps


def test_every_step_is_a_class_with_its_config() -> None:
    cfg = replace(web_en(), langid=None, toxicity=None)  # skip the model loads
    steps = build_steps(cfg)
    assert [type(s).__name__ for s in steps] == [
        "SizeFilter", "ExtractFilter", "GopherRepetitionFilter", "GopherQualityFilter", "C4Filter", "PIIMask"]
    c4 = steps[4]
    assert c4.cfg is cfg.c4 and c4.name == "c4"
    with pytest.raises(dataclasses_frozen_error()):
        c4.cfg.min_words_per_line = 1  # type: ignore[misc]
    # A step's decision is a reason string, counted by the Filter base class.
    stats = Stats()
    docs = [Document("", "a"), Document("word " * 3, "b")]
    for d in docs:
        stats.add_input(d)
    assert list(run_steps(docs, steps[:1], stats)) == [docs[1]] and stats.dropped == {"empty": 1}


def dataclasses_frozen_error() -> type[Exception]:
    import dataclasses

    return dataclasses.FrozenInstanceError


def test_a_new_filter_is_one_class() -> None:
    class NoDigits(Filter):
        name = "no_digits"

        def decide(self, doc: Document) -> str | None:
            return "has_digits" if any(c.isdigit() for c in doc.text) else None

    stats = Stats()
    docs = [Document("abc", "1"), Document("a1", "2")]
    for d in docs:
        stats.add_input(d)
    kept = list(run_steps(docs, [NoDigits()], stats))
    assert [d.id for d in kept] == ["1"] and stats.dropped == {"has_digits": 1}
    stats.check_balance()


def test_set_overrides_reach_nested_step_configs() -> None:
    cfg = curation.apply_overrides(web_en(), [
        "langid.min_score=0.4", "dedup.minhash.threshold=0.7", "langid.languages=de,fr", "toxicity=none",
        "max_bytes=1e6", "dedup.line_min_docs=5"])
    assert cfg.langid.min_score == 0.4 and cfg.langid.languages == ("de", "fr")
    assert cfg.dedup.minhash.threshold == 0.7 and cfg.dedup.line_min_docs == 5
    assert cfg.toxicity is None and cfg.max_bytes == 1_000_000 and isinstance(cfg.max_bytes, int)
    # A key of a step the preset turns off turns it on from that step's defaults.
    assert curation.apply_overrides(minimal(), ["langid.min_score=0.3"]).langid.min_score == 0.3
    with pytest.raises(ValueError, match="did you mean langid.min_score"):
        curation.apply_overrides(web_en(), ["langid.min_scor=0.3"])
    with pytest.raises(ValueError, match="expected a float"):
        curation.apply_overrides(web_en(), ["langid.min_score=high"])
    with pytest.raises(ValueError, match="is a group"):
        curation.apply_overrides(web_en(), ["langid=0.3"])
    with pytest.raises(ValueError, match=r"val_fraction=1.5 must be in \[0, 1\)"):
        curation.apply_overrides(web_en(), ["val_fraction=1.5"])


def test_cli_set_flag() -> None:
    from kiln.cli.data import build_config, register

    top = argparse.ArgumentParser(prog="kiln")
    register(top.add_subparsers(dest="command"))
    args = top.parse_args(["data", "run", "--input", "x.jsonl", "--out", "o", "--languages", "de",
                           "--set", "langid.min_score=0.5", "--set", "dedup.minhash.threshold=0.7"])
    cfg = build_config(args)
    assert cfg.langid.languages == ("de",) and cfg.langid.min_score == 0.5
    assert cfg.dedup.minhash.threshold == 0.7


def test_inputs_are_identified_by_content(tmp_path, monkeypatch) -> None:
    """Same size and mtime, different bytes: recomputed (the old size+mtime key reused stale output);
    same bytes, new mtime: reused."""
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "alpha beta gamma"}) + "\n")
    st = src.stat()
    cfg = replace(minimal(), workers=1, report=False)
    out = tmp_path / "out"
    run_pipeline(cfg, [str(src)], out)
    first = json.loads((out / "manifest.json").read_text())
    assert len(first["inputs"][str(src)]) == 64  # a SHA-256, not (size, mtime)
    src.write_text(json.dumps({"text": "delta epsilon zz"}) + "\n")  # same length
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert src.stat().st_size == st.st_size
    monkeypatch.setattr("kiln.artifacts._HASH_CACHE", {})  # a new process: no hashes cached
    run_pipeline(cfg, [str(src)], out)
    from kiln.data.readers import read_documents

    (doc,) = read_documents(str(next(out.glob("train_*"))))
    assert doc.text == "delta epsilon zz"
    written = (out / "manifest.json").stat().st_mtime_ns
    os.utime(src, None)  # touched, unchanged: reused
    run_pipeline(cfg, [str(src)], out)
    assert (out / "manifest.json").stat().st_mtime_ns == written
