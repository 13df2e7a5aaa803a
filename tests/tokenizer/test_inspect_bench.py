"""`kiln tokenizer inspect`, streaming file encoding, and a smoke run of `kiln bench tokenizer`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizer_samples import read_exact

from kiln.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from kiln.tokenizer.inspect import inspect_tokenizer, looks_like_boilerplate


@pytest.fixture(scope="module")
def tok_dir(varied_corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tokenizer(TokenizerTrainConfig(inputs=(str(varied_corpus),), vocab_size=600),
                           tmp_path_factory.mktemp("tok") / "t")


def test_inspect_report(tok_dir: Path, varied_corpus: Path) -> None:
    r = inspect_tokenizer(Tokenizer.load(tok_dir), [varied_corpus], top=5)
    assert r["vocab_size"] == 600 and len(r["longest"]) == 5
    assert r["heldout"][0]["bytes_per_token"] > 1.5
    assert len(r["least_frequent"]) == 5 and r["longest"][0]["bytes"] >= r["longest"][-1]["bytes"]


def test_boilerplate_heuristics() -> None:
    assert looks_like_boilerplate(b" Gutenberg") == "contains 'gutenberg'"
    assert looks_like_boilerplate(b"--------") == "repeated character"
    assert looks_like_boilerplate(b" house") is None


def test_cli_inspect(tok_dir: Path, varied_corpus: Path, capsys: pytest.CaptureFixture) -> None:
    from kiln.cli.main import main

    assert main(["tokenizer", "inspect", str(tok_dir), "--heldout", str(varied_corpus), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["vocab_size"] == 600
    assert main(["tokenizer", "inspect", str(tok_dir / "nope")]) == 1


def test_cli_export(tok_dir: Path, tmp_path: Path) -> None:
    from kiln.cli.main import main
    from kiln.tokenizer.interop import from_hf_json, load_tiktoken_ranks

    assert main(["tokenizer", "export", str(tok_dir), "--hf", str(tmp_path / "hf.json"),
                 "--tiktoken", str(tmp_path / "t.tiktoken")]) == 0
    assert from_hf_json(tmp_path / "hf.json").vocab == Tokenizer.load(tok_dir).vocab
    assert len(load_tiktoken_ranks(tmp_path / "t.tiktoken")) == 599
    assert main(["tokenizer", "export", str(tok_dir)]) == 1


@pytest.mark.parametrize("backend", ["python", "auto"])
def test_encode_file_streams_equal(tok_dir: Path, varied_corpus: Path, backend: str) -> None:
    tok = Tokenizer.load(tok_dir, backend=backend)
    parts = list(tok.encode_file(varied_corpus, chunk_bytes=5000))
    assert len(parts) > 5 and all(p.dtype == np.uint32 for p in parts)
    assert np.concatenate(parts).tolist() == tok.encode(read_exact(varied_corpus))


def test_bench_smoke(tmp_path: Path, varied_corpus: Path, capsys: pytest.CaptureFixture) -> None:
    from kiln.bench.tokenizer import bench_tokenizer, to_markdown

    rows = bench_tokenizer(varied_corpus, None, mb=0.05, vocab_size=300, threads=(1,), train_libs=("kiln",),
                           encode_libs=(), work_dir=tmp_path)
    assert rows[0]["lib"] == "kiln" and rows[0]["seconds"] > 0 and "error" not in rows[0]
    assert "| train 300 | kiln |" in to_markdown(rows)
