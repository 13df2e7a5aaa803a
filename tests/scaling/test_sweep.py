"""Shapes, FLOPs, the sweep's plan, a CPU sweep end to end (resume and reuse), executors, the CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from scaling_toy import write_toy_shards

from kiln.model import ModelConfig, Transformer
from kiln.scaling.shapes import (
    ShapeRule,
    count_params,
    flops_per_token,
    shape_for_params,
)
from kiln.scaling.sweep import ScalingConfig, make_point, plan, run_point


@pytest.fixture(scope="module")
def toy_tokens(tmp_path_factory) -> Path:
    return write_toy_shards(tmp_path_factory.mktemp("scaling") / "tokens", n_train=100_000, n_val=4_000)


def tiny_sweep() -> ScalingConfig:
    """Two budgets x three sizes of 2-35k-parameter models, 1,024 tokens a step: ~500 steps in all."""
    return ScalingConfig(budgets=(2e9, 6e9), sizes_per_budget=3, size_spread=16.0, context_length=32,
                         head_dim=8, aspect=16, batch_size=32, evals=3, eval_tokens=1024, saves=2, device="cpu")


def test_count_params_and_flops_match_the_model():
    cfg = ModelConfig(vocab_size=128, context_length=32, d_model=32, n_layers=2, n_heads=2, tie_embeddings=True)
    with torch.device("meta"):
        m = Transformer(cfg)
    assert count_params(cfg, "total") == m.num_params()
    assert count_params(cfg, "compute") == m.num_params(exclude_embeddings=True)  # tied: the head stays
    assert count_params(cfg, "non_embedding") == m.num_params() - 128 * 32
    assert flops_per_token(cfg, "exact") == m.flops_per_token(32)
    assert flops_per_token(cfg, "exact") == 6 * count_params(cfg, "compute") + 12 * 2 * 32 * 32
    assert flops_per_token(cfg, "6N", "non_embedding") == 6 * count_params(cfg, "non_embedding")


def test_shape_rule_picks_the_nearest_rung():
    rule = ShapeRule(vocab_size=4096, context_length=256, head_dim=64, aspect=64)
    ladder = rule.ladder()[:8]
    assert [m.n_layers for m in ladder[:4]] == [1, 2, 3, 4] and ladder[3].n_heads == 4 and ladder[3].d_model == 256
    ns = [count_params(m) for m in ladder]
    assert ns == sorted(ns)
    for i in (1, 4):  # a target just off a rung's N returns that rung
        assert shape_for_params(ns[i] * 1.05, rule) == ladder[i]
    with pytest.raises(ValueError, match="must be > 0"):
        shape_for_params(0, rule)


def test_plan_tokens_follow_the_budget_and_the_epoch_guard():
    cfg = tiny_sweep()
    pts = plan(cfg, vocab_size=64)
    assert {p.budget for p in pts} == {2e9, 6e9}
    for p in pts:
        assert p.tokens == p.steps * cfg.tokens_per_step
        assert abs(p.flops - p.budget) <= p.flops_per_token * cfg.tokens_per_step / 2  # within half a step
    skipped: list[str] = []
    with pytest.raises(ValueError, match="three or more"):
        plan(cfg, vocab_size=64, train_tokens=5_000, skipped=skipped)
    assert skipped and "epochs" in skipped[0]


def test_cpu_sweep_end_to_end_reuses_and_reports(toy_tokens, tmp_path):
    from kiln.scaling.study import StudyConfig, run_study

    cfg = tiny_sweep()
    out = tmp_path / "study"
    rep = run_study(cfg, toy_tokens, out, StudyConfig(check_multiple=1.5, bootstrap=0))
    assert rep["status"] == "done" and rep["points"] == 6
    assert rep["stability"] and rep["stability"][0]["sizes_per_budget"] == 3
    assert (out / "manifest.json").is_file() and (out / "report.md").is_file() and (out / "isoflops.png").is_file()
    rows = (out / "runs.csv").read_text().splitlines()
    assert len(rows) == 7
    check = rep["check"]
    assert check["budget"] == 9e9 and check["loss"] > 0
    assert set(check["predictions"]) >= {"approach3"} or rep["errors"]
    results = sorted(out.glob("points/*/result.json"))
    stamps = [p.stat().st_mtime_ns for p in results]
    losses = [json.loads(p.read_text())["val_loss"] for p in results]
    # the smaller model trained on more tokens of the same budget is not the only winner: losses differ
    assert len(set(losses)) == len(losses)
    rep2 = run_study(cfg, toy_tokens, out, StudyConfig(check_multiple=1.5, bootstrap=0))
    assert rep2["check"]["loss"] == check["loss"]
    assert [p.stat().st_mtime_ns for p in results] == stamps  # finished points reused, not retrained


class _StopAfter:
    """A StopRequest stand-in that asks for a pause after ``n`` polls (one poll per step)."""

    def __init__(self, n: int) -> None:
        self.n, self.paused_at = n, None

    def reason(self):
        self.n -= 1
        return "test pause" if self.n < 0 else None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None


def test_killed_point_resumes_to_the_same_loss(toy_tokens, tmp_path):
    cfg = replace(tiny_sweep(), saves=4)
    p = make_point(cfg, ShapeRule(vocab_size=64, context_length=32, head_dim=8, aspect=16).shape(16), 1e9)
    whole = run_point(cfg, p, toy_tokens, tmp_path / "whole")
    stop = _StopAfter(p.steps // 2)
    assert run_point(cfg, p, toy_tokens, tmp_path / "cut", stop=stop) is None  # paused: no result yet
    assert not (tmp_path / "cut" / "result.json").exists()
    resumed = run_point(cfg, p, toy_tokens, tmp_path / "cut")
    assert resumed["val_loss"] == whole["val_loss"] and resumed["curve_loss"] == whole["curve_loss"]


def _two_points(toy_tokens, out):
    from kiln.scaling.study import _jobs

    cfg = replace(tiny_sweep(), evals=1, saves=1)
    rule = ShapeRule(vocab_size=64, context_length=32, head_dim=8, aspect=16)
    pts = [make_point(cfg, rule.shape(8), 2e8), make_point(cfg, rule.shape(16), 2e8)]
    return cfg, pts, _jobs(cfg, pts, toy_tokens, out)


def test_process_executor_runs_one_process_per_slot(toy_tokens, tmp_path):
    from kiln.scaling.executors import ProcessExecutor

    _, pts, jobs = _two_points(toy_tokens, tmp_path)
    jobs = jobs[:1]  # one worker process (each pays torch's import)
    status = ProcessExecutor(devices=("cpu",), per_device=2).run(jobs)
    assert status == {pts[0].id: "done"}
    for j in jobs:
        assert json.loads((Path(j.out) / "result.json").read_text())["val_loss"] > 0
        assert "kiln train" in (Path(j.out) / "train.log").read_text()


def test_ray_executor_wiring_with_a_stand_in(toy_tokens, tmp_path, monkeypatch):
    """The Ray executor's calls (init, remote with num_gpus, get) against a stand-in module: the
    swappable executor is tested without starting a cluster."""
    import sys
    import types

    from kiln.scaling.executors import RayExecutor

    calls = {}
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: False
    fake.init = lambda **kw: calls.setdefault("init", kw)

    def remote(num_gpus):
        calls["num_gpus"] = num_gpus
        return lambda fn: types.SimpleNamespace(remote=lambda *a: (fn, a))

    fake.remote = remote
    fake.get = lambda ref: ref[0](*ref[1])
    monkeypatch.setitem(sys.modules, "ray", fake)
    _, pts, jobs = _two_points(toy_tokens, tmp_path)
    status = RayExecutor(address="auto", num_gpus=0.5).run(jobs)
    assert status == {p.id: "done" for p in pts}
    assert calls["num_gpus"] == 0.5 and calls["init"]["address"] == "auto"
