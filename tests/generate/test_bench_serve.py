"""`kiln bench serve` on the CPU at toy scale: both tables, Kiln's rows measured, JSON written."""

from __future__ import annotations

import json

from kiln.bench.serve import format_tables, prompt_lengths
from kiln.cli.main import main


def test_bench_serve_runs_on_cpu(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": "x" * n}) for n in (40, 8, 100)) + "\n")
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--rows", "unfused,int8,int4,ngram",
            "--new-tokens", "6", "--prompt-len", "8", "--repeats", "1", "--requests", "6", "--concurrency", "1,3",
            "--max-tokens", "4", "--prompts", str(prompts), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    dec = {r["impl"]: r for r in rows if r["table"] == "decode"}
    assert set(dec) == {"kiln fp32", "kiln fp32 unfused projections", "kiln int8", "kiln int4", "kiln spec ngram"}
    assert all(r["tok_s"] > 0 and not r["error"] for r in dec.values())
    assert 0 < dec["kiln fp32"]["bound"] < 1
    thr = [r for r in rows if r["table"] == "throughput"]
    assert [r["concurrency"] for r in thr] == [1, 3] and all(r["tok_s"] > 0 and r["ttft_p50_ms"] for r in thr)
    assert "| tiny | kiln int8 |" in (tmp_path / "bench_serve.md").read_text()
    assert "q/k/v and gate/up projections fused" in (tmp_path / "bench_serve.md").read_text()  # the default
    assert prompt_lengths(str(prompts), 4) == [10, 2, 25, 10]
    assert "ERROR" not in format_tables([])


def test_bench_serve_host_part_and_largest_preset(tmp_path):
    from kiln.bench.serve import largest_preset

    assert largest_preset() == "gpt2_small"  # Kiln's largest training preset is the GPT-2-small shape
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "host", "--new-tokens", "20",
            "--prompt-len", "4", "--repeats", "1", "--rows", "ngram", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    assert [r["impl"] for r in rows] == ["general step", "lean step", "multi-step", "spec ngram k=4"]
    assert all(r["table"] == "host" and r["tok_s"] > 0 for r in rows)
    accepted, proposed = map(int, rows[-1]["note"].split("accepted ")[1].split(" ")[0].split("/"))
    assert proposed > 0 and accepted == proposed  # zero logits repeat one token: every draft holds
    assert "| tiny | multi-step |" in (tmp_path / "bench_serve.md").read_text()


def test_transformers_references_match_kiln_greedy_on_the_exported_weights(tmp_path):
    """The throughput table compares like with like: transformers' batched generate and its continuous
    batching, on the weights Kiln exports, produce Kiln's greedy tokens; every token is counted."""
    import torch

    from kiln.bench.serve import (
        bench_model,
        export_for_references,
        synthetic_prompts,
        throughput_engine,
    )
    from kiln.bench.serve_http import run_direct
    from kiln.bench.serve_refs import hf_cb_manager, hf_cb_run, hf_generate_run, load_hf
    from kiln.generate import SamplingParams

    cpu = torch.device("cpu")
    model = bench_model("tiny", cpu, torch.float32, None)
    prompts = synthetic_prompts([5, 11, 3, 8, 2], model.config.vocab_size)
    engine = throughput_engine(model, 3)
    want = [list(o.token_ids) for o in engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0,
                                                                                ignore_eos=True))]
    direct = run_direct(engine, prompts, 3, 6)
    assert direct.tokens == 30 and len(direct.ttft) == 5 and len(direct.itl) == 25
    hf = load_hf(export_for_references(model, tmp_path / "hf"), cpu)
    got: list = []
    t = hf_generate_run(hf, prompts, 2, 6, outputs=got)  # batches of 2, 2, 1: left padding in the first two
    assert got == want
    assert t.tokens == 30 and len(t.ttft) == 5 and len(t.itl) == 25 and all(x > 0 for x in t.itl)
    manager = hf_cb_manager(hf, 6, 3)
    try:
        cb: dict = {}
        t = hf_cb_run(manager, prompts, 3, 6, outputs=cb)
    finally:
        manager.stop(block=True, timeout=30)
    assert [cb[i] for i in range(5)] == want
    assert t.tokens == 30 and t.errors == 0 and len(t.ttft) == 5 and len(t.itl) == 25


def test_rows_past_the_budget_are_listed_as_skipped(tmp_path):
    args = ["bench", "serve", "--device", "cpu", "--parts", "throughput,rollouts", "--shapes", "tiny",
            "--requests", "4", "--concurrency", "1,2", "--max-tokens", "2", "--budget-s", "1e-9",
            "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    assert len(rows) == 3 * 2 + 2 and all("skipped" in r["note"] and r["tok_s"] is None for r in rows)
    assert json.loads((tmp_path / "bench_serve.partial.json").read_text()) == rows
    assert main(["bench", "serve", "--parts", "nope"]) == 2


def test_http_part_fails_at_once_when_the_server_stack_does_not_import(monkeypatch, tmp_path, capsys):
    """``--parts http`` checks fastapi/uvicorn before any row: a broken install is one clear error
    naming the module and the fix, not a traceback per row minutes later."""
    import sys

    import pytest

    from kiln.bench.serve_http import check_server_stack

    check_server_stack()  # this environment has them
    monkeypatch.setitem(sys.modules, "fastapi", None)  # importing it now raises ImportError
    with pytest.raises(RuntimeError, match=r"importing fastapi failed.*pip install 'kiln\[serve\]'"):
        check_server_stack()
    rc = main(["bench", "serve", "--device", "cpu", "--shapes", "preset_tiny", "--parts", "latency,http",
               "--out", str(tmp_path)])
    assert rc != 0 and "importing fastapi failed" in capsys.readouterr().err
    assert not (tmp_path / "bench_serve.partial.json").exists()  # nothing ran before the check


def test_bench_serve_sampled_rows(tmp_path):
    """Row 'sampled': batch-1 decode at --temperature (also with --top-p; single-step on CUDA) and the
    throughput of the same requests sampled, beside the greedy rows; rows 'penalties' and 'structured':
    the sampled decode with penalties and min-p, and in JSON mode; all measured."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": "x" * n}) for n in (40, 8, 100)) + "\n")
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--rows", "sampled,penalties,structured", "--temperature", "0.8",
            "--top-p", "0.9", "--new-tokens", "6", "--prompt-len", "8", "--repeats", "1", "--requests", "4",
            "--concurrency", "2", "--max-tokens", "4", "--prompts", str(prompts), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    dec = [r["impl"] for r in rows if r["table"] == "decode"]
    assert dec == ["kiln fp32", "kiln fp32 sampled T=0.8", "kiln fp32 sampled T=0.8 top-p 0.9",
                   "kiln fp32 sampled T=0.8 + JSON object", "kiln fp32 sampled T=0.8 + penalties"]
    thr = [r["impl"] for r in rows if r["table"] == "throughput"]
    assert thr == ["kiln engine", "kiln engine T=0.8"]
    assert all(r["tok_s"] > 0 and not r["error"] for r in rows)
    assert "sampled at temperature 0.8" in (tmp_path / "bench_serve.md").read_text()


def test_kiln_rows_fuse_projections_unless_told_not_to(tmp_path, monkeypatch):
    """The Kiln model of the latency, throughput, profile and http rows is fused as ``kiln serve`` loads
    one (before quantize_model, so int8/int4 too); ``--no-fuse-projections`` is the A/B switch, passed
    on to the servers the http part starts."""
    import argparse

    import torch

    from kiln.bench.serve import bench_model, build_draft
    from kiln.bench.serve_http import kiln_server
    from kiln.model import is_fused

    cpu = torch.device("cpu")
    model = bench_model("tiny", cpu, torch.float32, None, fuse=True)
    assert is_fused(model) and not is_fused(bench_model("tiny", cpu, torch.float32, None))
    assert is_fused(build_draft(model, cpu, torch.float32, fuse=True))
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "latency", "--rows", "",
            "--new-tokens", "4", "--prompt-len", "4", "--repeats", "1", "--no-fuse-projections", "--out", str(tmp_path)]
    assert main(args) == 0
    assert "projections not fused" in (tmp_path / "bench_serve.md").read_text()
    import kiln.bench.serve_http as serve_http

    monkeypatch.setattr(serve_http, "Server", lambda cmd, port, env=None: cmd)  # the command, not a process
    for fuse in (True, False):
        ns = argparse.Namespace(concurrency=[1], threads=0, engine={}, fuse_projections=fuse)
        assert ("--no-fuse-projections" in kiln_server(ns, tmp_path, cpu)) == (not fuse)
