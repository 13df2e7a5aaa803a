"""`kiln bench kernels` plumbing on tiny CPU shapes (the real numbers come from a GPU)."""

from __future__ import annotations

import argparse
import math

from kiln.bench.kernels import (
    add_bench_parser,
    bench_attention,
    bench_ce,
    bench_paged_prefill,
    bench_rmsnorm,
    prefill_cases,
    to_markdown,
)


def test_bench_functions_run_on_cpu(dev):
    if dev.type != "cpu":
        return  # on a GPU the real benchmark covers this
    rows = bench_rmsnorm([(8, 32)], 0, 1, device="cpu")
    rows += bench_attention([(1, 2, 1, 16, 16)], 0, 1, device="cpu")
    rows += bench_ce(8, 16, 40, [4], 0, 1, device="cpu")
    assert {r.kernel for r in rows} == {"rmsnorm", "attention", "ce"}
    kiln_rows = [r for r in rows if r.impl.startswith("kiln")]
    assert kiln_rows and all(not r.note and math.isfinite(r.ms) for r in kiln_rows), [r.note for r in rows]
    assert all(r.max_rel_err is not None and r.max_rel_err < 1e-3 for r in kiln_rows)
    table = to_markdown(rows)
    assert "| kiln triton |" in table and "### attention" in table


def test_bench_parser_registers_kernels():
    parser = argparse.ArgumentParser()
    add_bench_parser(parser.add_subparsers(dest="bench"))
    args = parser.parse_args(["kernels", "--kernels", "rmsnorm", "--quick"])
    assert args.kernels == "rmsnorm" and args.quick and callable(args.func)


def test_paged_prefill_bench_runs_on_cpu(dev):
    """The prompt-step rows: Kiln's prefill kernel (interpreted) and the padded paths agree, and the
    cases are the serving engine's (a chat wave with one long prompt; like lengths)."""
    if dev.type != "cpu":
        return
    rows = bench_paged_prefill([("tiny wave", [20, 3, 5, 1], 4, 2, 16)], 0, 1, device="cpu")
    assert [r.impl for r in rows] == ["padded, Kiln plain attention (reference)", "padded, torch SDPA",
                                      "kiln triton prefill"]
    assert all(not r.note and math.isfinite(r.ms) for r in rows), [r.note for r in rows]
    assert all(r.max_rel_err < (1e-3 if "dot" in r.impl else 1e-5) for r in rows[1:])  # dot: fp16 weights and "longest 20" in rows[0].shape
    chat = prefill_cases(quick=True)[0][1]
    assert max(chat) == 503 and len(chat) == 64 and sum(chat) / 64 < 45


def test_gemv_bench_runs_on_cpu(dev, monkeypatch):
    """The decode-GEMV rows (named kernels and the tile sweep) run and agree with the dequantized
    reference; the sweep's tiles are distinct and its int4 word kernel is among them."""
    if dev.type != "cpu":
        return
    import kiln.bench.gemv as gemv

    every = {k: gemv.sweep_configs(k) for k in gemv.SWEEP_KINDS}
    assert len({tuple(sorted(c.items())) for c in every["int8"]}) == len(every["int8"]) >= 32
    assert any(c["STAGES"] for c in every["int8"]) and any(c["ACC2D"] for c in every["int8"])
    monkeypatch.setattr(gemv, "sweep_configs", lambda kind: every[kind][:2])
    rows = gemv.bench_gemv([("tiny", 40, 256)], reps=1, sweep=True, device="cpu", quick=True, top=2)
    impls = [r.impl for r in rows]
    assert impls[:5] == ["torch bf16", "kiln int8", "kiln int8 tuned", "kiln int4", "kiln int4 tuned"]
    for kind in gemv.SWEEP_KINDS:
        assert sum(i.startswith(f"{kind} sweep") for i in impls) == 2, (kind, impls)
    assert all(not r.note.startswith(("Runtime", "Type", "Value")) and math.isfinite(r.ms) for r in rows), [r.note for r in rows]
    assert all(r.max_rel_err < (1e-3 if "dot" in r.impl else 1e-5) for r in rows[1:])  # dot: fp16 weights
    assert [c[0] for c in gemv.gemv_cases()][:2] == ["7b q/o", "7b qkv fused"]
