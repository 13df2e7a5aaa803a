"""`kiln bench train`, `kiln bench speedrun` and `kiln profile` run end to end on the CPU (smoke size)."""

from __future__ import annotations

import json

from kiln.cli.main import main


def test_bench_train_tiny_cpu(tmp_path):
    rc = main(["bench", "train", "--shapes", "tiny", "--variants", "torch,kiln", "--steps", "2", "--warmup", "1",
               "--device", "cpu", "--compile", "off", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "bench_train.json").read_text())
    assert [r["variant"] for r in rows] == ["torch", "kiln"] and not any(r["error"] for r in rows)
    # Same shape, same data, same init scale: both start near ln(512) = 6.24 nats.
    assert all(5.5 < r["final_loss"] < 7.0 and r["tok_s"] > 0 for r in rows)
    assert "| tiny | kiln |" in (tmp_path / "bench_train.md").read_text()


def test_bench_speedrun_tiny_cpu(tokens_dir, tmp_path):
    shape = ["--set", "model.vocab_size=64", "--set", "model.context_length=16", "--set", "model.d_model=32",
             "--set", "model.n_layers=1", "--set", "model.n_heads=2", "--set", "batch_size=4", "--set", "warmup_steps=2"]
    rc = main(["bench", "speedrun", "--tokens", str(tokens_dir), "--preset", "tiny", *shape, "--seconds", "1",
               "--eval-batches", "2", "--device", "cpu", "--out", str(tmp_path / "sr")])
    assert rc == 0
    rows = json.loads((tmp_path / "sr" / "bench_speedrun.json").read_text())
    assert {r["side"] for r in rows} == {"torch", "kiln"}
    assert all(r["steps"] >= 1 and 0 < r["val_loss"] < 6 for r in rows)


def test_profile_tiny_cpu(tmp_path):
    rc = main(["profile", "--shape", "tiny", "--steps", "1", "--warmup", "1", "--batch", "2", "--device", "cpu",
               "--out", str(tmp_path / "prof")])
    assert rc == 0
    ops = (tmp_path / "prof" / "ops.md").read_text()
    assert "matmul" in ops and (tmp_path / "prof" / "trace.json").is_file()
