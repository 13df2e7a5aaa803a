"""`kiln bench serve --parts profile` on the CPU at toy scale: the table of Kiln's decode names the
attention op and sums to 100%; the trace reader sums GPU kernels per token and sorts them into categories."""

from __future__ import annotations

import json

from kiln.bench.decode_profile import categorize, short_name, table_from_trace
from kiln.cli.main import main


def test_profile_part_runs_on_cpu_and_names_attention(tmp_path):
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "profile", "--profile-tokens", "6",
            "--prompt-len", "16", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    tables = json.loads((tmp_path / "profile" / "decode_profile_tiny.json").read_text())
    kiln = next(t for t in tables if t["impl"] == "kiln")
    assert not kiln["error"] and kiln["tokens"] == 6 and (tmp_path / "profile" / "kiln_cpu.json").is_file()
    assert abs(sum(r["share"] for r in kiln["rows"]) - 1.0) < 1e-6  # the "others" row keeps it whole
    assert abs(sum(r["us_per_token"] for r in kiln["rows"]) - kiln["busy_us_per_token"]) < 1e-3 * kiln["busy_us_per_token"]
    rows = {r["name"]: r for r in kiln["rows"]}
    attn = rows["kiln::paged_attention"]  # one range per layer per token (tiny: 2 layers)
    assert attn["category"] == "attention" and attn["calls_per_token"] == 2.0
    assert rows["kiln::lm_head"]["calls_per_token"] == 1.0
    spec = next(t for t in tables if t["impl"] == "kiln spec ngram")  # where a verify step's time goes
    assert not spec["error"] and spec["tokens"] >= 6 and "tokens/step" in spec["note"]
    assert spec["wall_us_per_token"] > 0 and (tmp_path / "profile" / "kiln_spec_ngram.json").is_file()
    steps = int(spec["note"].split(" steps, ")[0].split()[-1])
    assert 1 <= steps < spec["tokens"]  # drafts were accepted: fewer steps than tokens
    for n, name in ((1, "kiln prefill 1"), (64, "kiln prefill 64"), (64, "kiln prefill 64 skewed")):
        pre = next(t for t in tables if t["impl"] == name)  # one general step admitting n prompts
        assert not pre["error"] and pre["tokens"] == 1 and f"admitting {n} prompts" in pre["note"]
        assert 0 < pre["busy_us_per_token"] <= pre["wall_us_per_token"]
        assert next(r for r in pre["rows"] if r["name"] == "kiln::paged_attention")["calls_per_token"] == 2.0
    from kiln.bench.decode_profile import prefill_lengths
    from kiln.bench.serve_models import serve_shapes

    longest = max(prefill_lengths(64, 16, serve_shapes()["tiny"].context_length, skewed=True))
    assert f"longest {longest})" in next(t for t in tables if t["impl"] == "kiln prefill 64 skewed")["note"]
    assert not any("kernel" in t["impl"] for t in tables)  # the Triton prefill kernel's table: CUDA only
    assert next(t for t in tables if t["impl"] == "gpt-fast")["error"].startswith("skipped")
    md = (tmp_path / "bench_serve.md").read_text()
    assert "| 1 | `" in md and "| tiny | attention |" in md and "| tiny | total |" in md


def test_gpu_trace_is_summed_per_kernel_and_token(tmp_path):
    """A hand-made trace of 2 tokens x 2 layers: per-token times, calls, the LM head found as the largest
    once-per-token matmul, copies and the attention kernel named; CPU ops ignored when kernels exist."""
    ev = []
    for tok in range(2):
        for layer in range(2):
            ev.append({"ph": "X", "cat": "kernel", "name": "nvjet_tst_64x8_64x16_4x1_v_bz_TNT", "dur": 3.0})
            ev.append({"ph": "X", "cat": "kernel", "name": "_paged_decode_kernel", "dur": 2.0})
            ev.append({"ph": "X", "cat": "kernel", "name": "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0",
                       "dur": 1.0})
        ev.append({"ph": "X", "cat": "kernel", "name": "void gemv2T_kernel_val<int, 128>(float*)", "dur": 10.0})
        ev.append({"ph": "X", "cat": "kernel", "name": "triton_red_fused_embedding_mm_1", "dur": 1.0})
        ev.append({"ph": "X", "cat": "kernel", "name": "triton_red_fused_argmax_2", "dur": 1.0})
        ev.append({"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH (Device -> Pinned)", "dur": 1.0})
        ev.append({"ph": "X", "cat": "cpu_op", "name": "aten::mm", "ts": tok, "dur": 500.0})
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    t = table_from_trace(path, 2, "x", "s", gpu=True)
    assert t.busy_us_per_token == 2 * (3 + 2 + 1) + 10 + 1 + 1 + 1
    rows = {r.name: r for r in t.rows}
    assert rows["gemv2T_kernel_val"].category == "lm_head" and rows["gemv2T_kernel_val"].us_per_token == 10
    assert rows["triton_red_fused_embedding_mm_1"].category == "matmul/GEMV"  # once per token, but smaller
    assert rows["nvjet_tst_64x8_64x16_4x1_v_bz_TNT"].calls_per_token == 2
    assert rows["_paged_decode_kernel"].category == "attention"
    assert t.categories == {"matmul/GEMV": 7.0, "attention": 4.0, "norm/rope/elementwise": 2.0, "lm_head": 10.0,
                            "sampling/argmax": 1.0, "copies": 1.0}
    empty = tmp_path / "e.json"
    empty.write_text(json.dumps({"traceEvents": [{"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch"}]}))
    assert "1 graph launches" in table_from_trace(empty, 2, "x", "s", gpu=True).error
    assert short_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int)") == \
        "at::native::vectorized_elementwise_kernel"
    assert categorize("triton_per_fused__softmax_3", 1.0) == "sampling/argmax"
    assert categorize("triton_per_fused__softmax_3", 12.0) == "attention"
    assert categorize("_paged_prefill_kernel", 12.0) == "attention"  # not a fill (a copy) by its name


def test_prefill_lengths_plain_and_skewed():
    """The profiled prefill step's prompts: like lengths, or one long prompt among short chat ones."""
    from kiln.bench.decode_profile import prefill_lengths

    assert prefill_lengths(3, 128, 1024) == [64, 71, 78]
    skewed = prefill_lengths(64, 128, 1024, skewed=True)
    assert skewed[0] == 512 and len(skewed) == 64 and all(10 <= k <= 40 for k in skewed[1:])
    assert prefill_lengths(2, 16, 128, skewed=True)[0] == 64


def test_profile_prefill_tables_only(tmp_path):
    """``--profile-tables prefill``: the prefill steps' tables alone (no decode windows, no gpt-fast)."""
    args = ["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "profile", "--profile-tables",
            "prefill", "--prompt-len", "16", "--threads", "1", "--out", str(tmp_path)]
    assert main(args) == 0
    tables = json.loads((tmp_path / "profile" / "decode_profile_tiny.json").read_text())
    assert [t["impl"] for t in tables] == ["kiln prefill 1", "kiln prefill 64", "kiln prefill 64 skewed"]
    assert all(not t["error"] and t["tokens"] == 1 for t in tables)
