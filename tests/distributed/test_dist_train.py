"""`kiln train` under 2 gloo ranks: equals one process (ddp), exact resume (zero1), fsdp save/load
and resume on a different number of ranks, a clear error on every rank for a bad batch."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from dist_launch import base_env, free_port, spawn, wait_all

VOCAB = 64
# A ~30k-parameter model, 4 steps of 8 x 16 tokens, a checkpoint every 2 steps.
CONFIG = ["--set", "device=cpu", "--set", f"model.vocab_size={VOCAB}", "--set", "model.context_length=16",
          "--set", "model.d_model=32", "--set", "model.n_layers=2", "--set", "model.n_heads=2", "--set", "model.d_ff=64",
          "--set", "batch_size=8", "--set", "micro_batch_size=0", "--set", "lr=1e-2", "--set", "warmup_steps=1",
          "--set", "eval_every=0", "--set", "sample_every=0", "--set", "save_every=2", "--set", "compile=false",
          "--max-steps", "4"]


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    from kiln.shards import write_shard

    d = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    cycle = rng.integers(0, VOCAB, 48)
    for name, n in (("train_00000.bin", 6_000), ("train_00001.bin", 6_000)):
        s = np.resize(cycle, n)
        noise = rng.random(n) < 0.05
        s[noise] = rng.integers(0, VOCAB, int(noise.sum()))
        write_shard(d / name, s, [0], VOCAB)
    return d


def kiln_train(tokens: Path, out: Path, world_size: int, *args: str, timeout: float = 90) -> list[tuple[int, str]]:
    """``kiln train`` on ``world_size`` ranks with torchrun's variables (one plain process when 1)."""
    port, procs = free_port(), []
    for r in range(world_size):
        env = base_env()
        env["OMP_NUM_THREADS"] = "1"
        if world_size > 1:
            env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, "-m", "kiln.cli.main", "train", "--tokens", str(tokens), "--out", str(out),
               *CONFIG, "--dist-timeout", "30", *args]
        procs.append(spawn(cmd, env))
    return wait_all(procs, timeout)


def ok(results: list[tuple[int, str]]) -> None:
    for rc, out in results:
        assert rc == 0, out


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def drop_after(out: Path, step: int) -> None:
    """Make ``out`` look like a run killed right after the checkpoint of ``step``."""
    for p in (out / "checkpoints").glob("step_*"):
        if int(p.name.split("_")[1]) > step:
            shutil.rmtree(p)
    (out / "manifest.json").unlink()


def close(a: dict[int, float], b: dict[int, float], steps, tol: float = 1e-5) -> bool:
    return all(abs(a[s] - b[s]) < tol for s in steps)


def test_ddp_two_ranks_equal_one_process_and_bad_batch_fails_everywhere(tokens, tmp_path):
    ok(kiln_train(tokens, tmp_path / "one", 1))
    ok(kiln_train(tokens, tmp_path / "two", 2, "--dist-strategy", "ddp", "--bucket-mb", "0.01"))
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4] and close(one, two, range(1, 5)), (one, two)
    assert (tmp_path / "two" / "manifest.json").is_file() and (tmp_path / "two" / "model").is_dir()
    assert not list((tmp_path / "two").glob("checkpoints/*/shards"))  # ddp: rank 0 saves the whole state
    bad = kiln_train(tokens, tmp_path / "bad", 2, "--set", "batch_size=6", "--set", "micro_batch_size=2", timeout=60)
    for rc, out in bad:
        assert rc == 1 and "not divisible by micro-batch x world size" in out, out


def test_zero1_resume_equals_uninterrupted_run(tokens, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    ok(kiln_train(tokens, full, 2, "--zero1"))
    ckpt = full / "checkpoints" / "step_000002"
    assert sorted(p.name for p in (ckpt / "shards").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "trainer" / "meta.json").is_file()
    shutil.copytree(full, cut)
    drop_after(cut, 2)
    ok(kiln_train(tokens, cut, 2, "--zero1"))
    a, b = losses(full), losses(cut)
    assert [a[s] for s in (3, 4)] == [b[s] for s in (3, 4)], (a, b)  # bit for bit
    assert (cut / "manifest.json").is_file()


def test_fsdp_trains_saves_and_resumes_on_one_process(tokens, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    ok(kiln_train(tokens, two, 2, "--dist-strategy", "fsdp"))
    a = losses(two)
    assert sorted(a) == [1, 2, 3, 4] and a[4] < a[1]
    assert (two / "manifest.json").is_file() and (two / "model").is_dir()
    assert sorted(p.name for p in (two / "checkpoints" / "step_000002" / "shards").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"]
    # Resume the 2-rank FSDP checkpoint of step 2 on one plain process (DCP reshards).
    shutil.copytree(two, one)
    drop_after(one, 2)
    ok(kiln_train(tokens, one, 1))
    b = losses(one)
    assert close(a, b, (3, 4)), (a, b)
