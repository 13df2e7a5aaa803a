"""Pausing a run on purpose (time limit, SIGTERM) and resuming it exactly."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from kiln.train import StopRequest, train
from kiln.train.checkpoint import load_checkpoint_extra
from kiln.train.metrics import read_metrics
from kiln.train.stop import PAUSED_EXIT_CODE, parse_duration


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_parse_duration():
    assert parse_duration("540") == 540
    assert parse_duration("90s") == 90
    assert parse_duration("9m") == 540
    assert parse_duration("3h50m") == 3 * 3600 + 50 * 60
    assert parse_duration("1d2h") == 26 * 3600
    assert parse_duration(" 0.5m ") == 30
    for bad in ("", "abc", "5x", "1h30", "0", "-5", "m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_pause_on_request_then_resume_is_bitwise(tokens_dir, tmp_path, make_config):
    cfg = make_config(max_steps=12, micro_batch_size=4, save_every=0, eval_every=4)
    straight = train(cfg, tokens_dir, tmp_path / "a")
    stop = StopRequest()

    def ask(step, loss):
        if step == 6:  # the pause lands at the next step boundary: after update 7
            stop.request("test")
        return loss

    out = train(cfg, tokens_dir, tmp_path / "b", stop=stop, fault_hook=ask)
    assert stop.paused and stop.paused_at == 7 and stop.reason() == "test"
    assert not (out / "manifest.json").exists()
    assert (out / "checkpoints" / "step_000007" / "meta.json").is_file()
    assert "paused at step 7/12 (test)" in (out / "train.log").read_text()
    assert [s for s, _ in _losses(out)] == list(range(1, 8))
    again = StopRequest()
    resumed = train(cfg, tokens_dir, tmp_path / "b", stop=again)
    assert not again.paused and (resumed / "manifest.json").is_file()
    assert _losses(straight) == _losses(resumed)  # bit-identical losses across the pause
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_time_limit_pauses_and_the_budget_excludes_each_process_first_step(tokens_dir, tmp_path, make_config):
    cfg = make_config(max_steps=200, max_seconds=3600.0, save_every=0, eval_every=0)
    stop = StopRequest(time_limit=1e-9)  # already over: pause after the first step
    out = train(cfg, tokens_dir, tmp_path / "run", stop=stop)
    assert stop.paused_at == 1 and stop.reason().startswith("time limit")
    extra = load_checkpoint_extra(out / "checkpoints" / "step_000001")
    c = extra["counters"]
    assert c["excluded_seconds"] == pytest.approx(c["seconds"])  # the only step so far is the first one
    train(cfg, tokens_dir, out, stop=StopRequest())
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["steps"] == 200
    # Both processes' first steps are off the budget, not only the last process's.
    assert stats["train_seconds"] < stats["seconds"] - stats["first_step_seconds"]


def test_bad_time_limit():
    with pytest.raises(ValueError, match="positive"):
        StopRequest(time_limit=0)


def test_signal_requests_a_pause_and_handlers_come_back():
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest()
    with stop.signals_handled():
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.reason() == "signal SIGTERM received"
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_time_limit_exits_75_then_resumes(tokens_dir, tmp_path, capsys):
    from kiln.cli.main import main

    args = ["train", "--tokens", str(tokens_dir), "--out", str(tmp_path / "run"), "--max-steps", "4",
            "--set", "model.context_length=16", "--set", "model.d_model=32", "--set", "model.n_heads=2",
            "--set", "model.n_layers=1", "--set", "batch_size=4", "--set", "warmup_steps=1", "--set", "device=cpu"]
    assert main([*args, "--time-limit", "0.000001"]) == PAUSED_EXIT_CODE
    assert "paused at step 1" in capsys.readouterr().out
    assert not (tmp_path / "run" / "manifest.json").exists()
    assert main(args) == 0
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["stats"]["steps"] == 4
    assert main([*args, "--time-limit", "soon"]) == 1
    assert "cannot read 'soon' as a duration" in capsys.readouterr().err
