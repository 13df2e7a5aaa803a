"""Runs reproduce bitwise on the CPU at any thread count, and survive SIGKILL and SIGTERM bitwise,
at the ``tiny`` preset's model shape (the conftest pins one thread: these tests set their own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.train import train
from kiln.train.config import apply_overrides, tiny
from kiln.train.metrics import read_metrics

SRC = Path(__file__).resolve().parents[2] / "src"
# The tiny preset's model (d 128, 4 layers, vocab 4096, context 128), a smaller batch to stay quick.
OVERRIDES = ["device=cpu", "vocab_from_data=false", "batch_size=4", "warmup_steps=2", "sample_every=0",
             "log_every=1", "compile=false", "eval_batches=2"]


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_same_run_twice_is_bitwise_equal(tokens_dir, tmp_path, threads):
    torch.set_num_threads(threads)  # the conftest restores its own count afterwards
    cfg = apply_overrides(tiny(), OVERRIDES + ["max_steps=3", "eval_every=3", "save_every=0"])
    a = train(cfg, tokens_dir, tmp_path / "a")
    b = train(cfg, tokens_dir, tmp_path / "b")
    rows_a = [{k: v for k, v in r.items() if k not in ("tok_s", "time")} for r in read_metrics(a / "metrics.jsonl")]
    rows_b = [{k: v for k, v in r.items() if k not in ("tok_s", "time")} for r in read_metrics(b / "metrics.jsonl")]
    assert len([r for r in rows_a if "loss" in r]) == 3 and rows_a == rows_b  # losses, grad norms, val loss
    assert _same_weights(a, b)


def _kiln_train(tokens: Path, out: Path, steps: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    sets = [a for o in OVERRIDES + [f"eval_every={steps}", "save_every=2", "keep_last=3"] for a in ("--set", o)]
    cmd = [sys.executable, "-m", "kiln.cli.main", "train", "--tokens", str(tokens), "--out", str(out),
           "--preset", "tiny", "--max-steps", str(steps), *sets]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"kiln train ended early ({proc.returncode}): {proc.stdout.read()[-2000:]}"
        assert time.monotonic() < deadline, "kiln train made no progress"
        time.sleep(0.05)


def test_cli_kill_then_sigterm_then_resume_is_bitwise_with_two_threads(tokens_dir, tmp_path):
    steps = 6  # kill after step 2, pause after the resumed run's next step, finish: each CLI start is most of the cost
    torch.set_num_threads(2)  # the uninterrupted run in this process, as the CLI runs: same bits
    sets = OVERRIDES + [f"max_steps={steps}", f"eval_every={steps}", "save_every=2", "keep_last=3"]
    train(apply_overrides(tiny(), sets), tokens_dir, tmp_path / "a")
    run = tmp_path / "b"
    killed = _kiln_train(tokens_dir, run, steps)
    _wait_for(killed, lambda: (run / "checkpoints" / "step_000002" / "meta.json").is_file())
    killed.send_signal(signal.SIGKILL)  # no handler runs: whatever followed the checkpoint is lost
    killed.wait()
    assert not (run / "manifest.json").exists()
    paused = _kiln_train(tokens_dir, run, steps)  # resumes from the newest checkpoint
    log = run / "train.log"
    _wait_for(paused, lambda: "resuming at step" in log.read_text())  # signal handlers are set by now
    paused.send_signal(signal.SIGTERM)  # the pause lands after the next step, whatever the machine's speed
    out = paused.communicate(timeout=300)[0]
    assert paused.returncode == 75, out[-2000:]  # paused at a step boundary with a checkpoint
    newest = max((run / "checkpoints").glob("step_*"))
    at = json.loads((newest / "meta.json").read_text())["iteration"]
    assert 2 <= at < steps and f"paused at step {at}" in out
    final = _kiln_train(tokens_dir, run, steps)
    assert final.wait(timeout=600) == 0, final.stdout.read()[-2000:]
    assert [s for s, _ in _losses(run)] == list(range(1, steps + 1))
    assert _losses(run) == _losses(tmp_path / "a")  # float equality: bit-identical across the kill and the pause
    val = [[r["val_loss"] for r in read_metrics(d / "metrics.jsonl") if "val_loss" in r] for d in (run, tmp_path / "a")]
    assert val[0] == val[1] and len(val[0]) == 2
    assert _same_weights(run, tmp_path / "a")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kernels", ["kiln", "triton"])
def test_gpu_deterministic_mode_repeats_bitwise(tokens_dir, tmp_path, kernels):
    """deterministic=true on the GPU: two runs give the same bits, with torch's ops or Kiln's Triton
    attention and RMSNorm (context 512: the autotuned launch path, pinned to one config)."""
    sets = OVERRIDES + ["device=cuda", "deterministic=true", "max_steps=4", "eval_every=4", "save_every=0",
                        "model.context_length=512", f"model.attention_impl={'triton' if kernels == 'triton' else 'sdpa'}",
                        f"model.norm_impl={kernels if kernels == 'triton' else 'kiln'}"]
    cfg = apply_overrides(tiny(), sets)
    a, b = train(cfg, tokens_dir, tmp_path / "a"), train(cfg, tokens_dir, tmp_path / "b")
    assert _losses(a) == _losses(b) and len(_losses(a)) == 4
    assert _same_weights(a, b)
    assert not torch.are_deterministic_algorithms_enabled()  # the mode ends with the run
