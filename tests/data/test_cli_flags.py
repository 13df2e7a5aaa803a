"""`kiln data run` flags -> PipelineConfig: extraction method, output format, language-ID model,
toxicity classifier and threshold; and one small CLI run writing Parquet that `kiln tokenize` reads."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest
from webfixtures import english_paragraphs

from kiln.cli.data import _DefaultsHelpFormatter, build_config, register
from kiln.data.extract import METHODS
from kiln.data.langid import MODELS
from kiln.data.pipeline import OUTPUT_FORMATS, PRESETS, web_en
from kiln.data.toxicity import ToxicityConfig

NEW_FLAGS = ("--extract", "--output-format", "--langid-model", "--toxicity-classifier", "--toxicity-threshold")


def _run_parser() -> argparse.ArgumentParser:
    """The `kiln data run` parser alone (the full `kiln` parser imports torch)."""
    top = argparse.ArgumentParser(prog="kiln")
    register(top.add_subparsers(dest="command"))
    data = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction)).choices["data"]
    return next(a for a in data._actions if isinstance(a, argparse._SubParsersAction)).choices["run"]


def _config(*flags: str, preset: str = "web_en"):
    args = _run_parser().parse_args(["--preset", preset, "--input", "x.jsonl", "--out", "o", *flags])
    return build_config(args)


def _action(flag: str) -> argparse.Action:
    return next(a for a in _run_parser()._actions if flag in a.option_strings)


@pytest.mark.parametrize("preset", list(PRESETS))
def test_no_flags_is_the_preset(preset: str) -> None:
    assert _config(preset=preset) == PRESETS[preset]()


def test_every_run_flag_has_help_with_its_default() -> None:
    fmt = _DefaultsHelpFormatter("kiln data run")
    for action in _run_parser()._actions:
        if action.required or isinstance(action, argparse._HelpAction):
            continue
        text = fmt._get_help_string(action)
        assert "default" in text, action.option_strings
    for flag in NEW_FLAGS[1:]:
        assert "the preset's" in _action(flag).help


def test_extract_choices_are_the_librarys() -> None:
    assert tuple(_action("--extract").choices) == METHODS and "kiln" in METHODS


@pytest.mark.parametrize("method", METHODS)
def test_extract_method(method: str) -> None:
    assert _config("--extract", method, preset="minimal").extract.method == method
    assert _config("--extract", method).extract.method == method


def test_output_format() -> None:
    assert set(OUTPUT_FORMATS) <= set(_action("--output-format").choices)
    assert _config().output_format == "jsonl.zst"
    assert _config("--output-format", "parquet").output_format == "parquet"
    assert _config("--output-format", "jsonl").output_format == "jsonl.zst"
    for fmt in OUTPUT_FORMATS:
        assert _config("--output-format", fmt, preset="books").output_format == fmt
    with pytest.raises(SystemExit):
        _config("--output-format", "csv")


@pytest.mark.parametrize("model", MODELS)
def test_langid_model(model: str) -> None:
    assert tuple(_action("--langid-model").choices) == MODELS
    cfg = _config("--langid-model", model)
    assert cfg.langid == replace(web_en().langid, model=model)
    both = _config("--langid-model", model, "--languages", "de,fr", preset="books")
    assert both.langid.model == model and both.langid.languages == ("de", "fr")


def test_langid_model_errors() -> None:
    with pytest.raises(SystemExit):
        _config("--langid-model", "nope")
    with pytest.raises(ValueError, match="no language-ID step"):
        _config("--langid-model", "cld3", preset="minimal")


def test_toxicity_classifier_off_and_threshold() -> None:
    base = web_en().toxicity
    assert base.classifier  # web_en scores with the classifier
    off = _config("--no-toxicity-classifier").toxicity
    assert off == replace(base, classifier=None)
    assert _config("--toxicity-classifier").toxicity == base
    assert _config("--toxicity-threshold", "0.7").toxicity == replace(base, max_classifier_score=0.7)
    assert _config("--toxicity-classifier", "--toxicity-threshold", "1").toxicity.max_classifier_score == 1.0
    assert _config("--no-toxicity-classifier", preset="books").toxicity is None  # already off


def test_toxicity_classifier_on_where_the_preset_has_it_off(monkeypatch) -> None:
    monkeypatch.setitem(PRESETS, "words_only", lambda: replace(web_en(), toxicity=ToxicityConfig(classifier=None)))
    cfg = _config("--toxicity-classifier", "--toxicity-threshold", "0.8", preset="words_only")
    assert cfg.toxicity == ToxicityConfig(classifier=ToxicityConfig().classifier, max_classifier_score=0.8)
    with pytest.raises(ValueError, match="classifier, which is off"):
        _config("--toxicity-threshold", "0.8", preset="words_only")


@pytest.mark.parametrize("value", ["1.5", "-0.1", "high"])
def test_toxicity_threshold_must_be_a_probability(value: str) -> None:
    with pytest.raises(SystemExit):
        _config("--toxicity-threshold", value)


def test_toxicity_flags_errors() -> None:
    with pytest.raises(ValueError, match="classifier, which is off"):
        _config("--no-toxicity-classifier", "--toxicity-threshold", "0.5")
    with pytest.raises(ValueError, match="no toxicity step"):
        _config("--toxicity-classifier", preset="books")
    with pytest.raises(ValueError, match="no toxicity step"):
        _config("--toxicity-threshold", "0.5", preset="minimal")


def test_cli_parquet_output_feeds_kiln_tokenize(tmp_path, capsys) -> None:
    """`kiln data run --output-format parquet` writes Parquet shards that `kiln tokenize` reads."""
    pq = pytest.importorskip("pyarrow.parquet")
    pytest.importorskip("kiln.shards.tokenize")
    from kiln.artifacts import read_manifest
    from kiln.cli.main import main
    from kiln.tokenizer import Tokenizer

    src = tmp_path / "in.jsonl"
    texts = [english_paragraphs(i, 4) for i in range(4)]
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts + texts[:1]))  # + one exact duplicate
    out = tmp_path / "data"
    rc = main(["data", "run", "--preset", "minimal", "--input", str(src), "--out", str(out), "--workers", "1",
               "--output-format", "parquet"])
    assert rc == 0
    shard = out / "train_00000.parquet"
    assert [p.name for p in out.glob("train_*")] == [shard.name]
    assert shard.read_bytes()[:4] == b"PAR1"
    table = pq.read_table(shard)
    assert table.column_names == ["id", "text", "metadata"] and table.column("text").to_pylist() == texts
    assert json.loads((out / "manifest.json").read_text())["config"]["output_format"] == "parquet"

    Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"]).save(tmp_path / "tok.json")
    rc = main(["tokenize", "--corpus", str(out), "--tokenizer", str(tmp_path / "tok.json"),
               "--out", str(tmp_path / "tokens"), "--workers", "1"])
    assert rc == 0 and list((tmp_path / "tokens").glob("train_*.bin"))
    stats = read_manifest(tmp_path / "tokens", "tokens")["stats"]["train"]
    assert stats["docs"] == len(texts)
    assert stats["tokens"] == sum(len(t.encode()) for t in texts) + len(texts)  # bytes + one <|endoftext|> each


def test_flags_a_preset_cannot_use_are_errors():
    import argparse

    import pytest

    from kiln.cli.data import register

    top = argparse.ArgumentParser()
    register(top.add_subparsers(dest="command"))
    from kiln.cli import data as cli_data

    for argv, msg in ((["data", "run", "--preset", "books", "--extract", "kiln"], "--extract does not apply"),
                      (["data", "run", "--preset", "minimal", "--languages", "de"], "--languages does not apply")):
        args = top.parse_args([*argv, "--input", "x", "--out", "y"])
        with pytest.raises(ValueError, match=msg):
            cli_data.build_config(args)
