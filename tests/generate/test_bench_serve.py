"""`kiln bench serve` on the CPU at toy scale: both tables, Kiln's rows measured, JSON written."""

from __future__ import annotations

import json

from kiln.bench.serve import format_tables, prompt_lengths
from kiln.cli.main import main


def test_bench_serve_runs_on_cpu(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"instruction": "x" * n}) for n in (40, 8, 100)) + "\n")
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--rows", "int8,int4,ngram",
            "--new-tokens", "6", "--prompt-len", "8", "--repeats", "1", "--requests", "6", "--concurrency", "1,3",
            "--max-tokens", "4", "--prompts", str(prompts), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    dec = {r["impl"]: r for r in rows if r["table"] == "decode"}
    assert set(dec) == {"kiln fp32", "kiln int8", "kiln int4", "kiln spec ngram"}
    assert all(r["tok_s"] > 0 and not r["error"] for r in dec.values())
    assert 0 < dec["kiln fp32"]["bound"] < 1
    thr = [r for r in rows if r["table"] == "throughput"]
    assert [r["concurrency"] for r in thr] == [1, 3] and all(r["tok_s"] > 0 and r["ttft_p50_ms"] for r in thr)
    assert "| tiny | kiln int8 |" in (tmp_path / "bench_serve.md").read_text()
    assert prompt_lengths(str(prompts), 4) == [10, 2, 25, 10]
    assert "ERROR" not in format_tables([])


def test_bench_serve_host_part_and_largest_preset(tmp_path):
    from kiln.bench.serve import largest_preset

    assert largest_preset() == "gpt2_small"  # Kiln's largest training preset is the GPT-2-small shape
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "host", "--new-tokens", "20",
            "--prompt-len", "4", "--repeats", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    assert [r["impl"] for r in rows] == ["general step", "lean step", "multi-step"]
    assert all(r["table"] == "host" and r["tok_s"] > 0 for r in rows)
    assert "| tiny | multi-step |" in (tmp_path / "bench_serve.md").read_text()
