"""`kiln bench kernels`: Kiln's Triton kernels vs PyTorch eager, torch.compile and Liger, one run.

Every row is forward + backward on the same inputs, timed with CUDA events around each call,
calls queued back to back (median of many repetitions after a warm-up); peak memory is measured in a separate pass as the rise of
``torch.cuda.max_memory_allocated`` over what was allocated before the call (inputs held by all
rows; the gradients each row produces are counted). Liger-Kernel rows appear where
``liger_kernel`` imports. Metrics:

- RMSNorm: TB/s = 4 x N x D x 2 bytes (read x, write y, read dy, write dx) / time.
- Attention: TFLOP/s with fwd = 4 B H T^2 D (halved when causal) and bwd = 2.5 x fwd.
- Linear + cross-entropy: ms and extra GB at 16384 tokens, d 768, vocab 50304; extra GB excludes
  the inputs and the gradients (the issue's numbers include dx and dW, 0.10 GB).
- GEMV (batch-1 decode's weight products; ``kiln.bench.gemv``): GB/s of weight bytes streamed, bf16
  against Kiln's int8/int4 kernels and Inductor's one-row forms, beside the copy bandwidth.
- Paged prefill (forward only, the serving engine's prompt steps): one step's attention over the
  paged KV cache, Kiln's Triton prefill kernel against the padded one-call path it replaces (Kiln's
  plain attention, and torch's SDPA on the same padded batch); TFLOP/s over the real (unpadded)
  causal work, 4 x H x D x sum of (chunk x context) per sequence.

"ms" is host-inclusive: calls queued back to back, so launch-bound code (many small kernels, Python
dispatch) shows its host cost. "graph ms" replays a CUDA graph of one call: device time alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import platform
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from kiln.bench.kernel_rows import Row  # re-exported: one row of any table

KERNELS = ("rmsnorm", "attention", "ce", "paged_prefill", "gemv")
TABLES = (*KERNELS, "ce_rows_sweep")


def _time_ms(fn: Callable[[], None], warmup: int, iters: int) -> float:
    """Median milliseconds per call over ``iters`` calls after ``warmup`` calls, timed with CUDA events
    (a host clock where there is no GPU: the CPU smoke test)."""
    import time

    import torch

    for _ in range(warmup):
        fn()
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    # Events around each call, no sync in between (as triton.testing.do_bench): while the host
    # keeps ahead of the GPU this is device time; where it cannot (launch-bound code), host time.
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def _time_graph_ms(fn: Callable[[], None], iters: int) -> float:
    """Median ms per replay of a CUDA graph of one call: device time without host launch cost
    (what a CUDA-graphed training step sees). Raises where the call cannot be captured."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # capture needs warm-up off the default stream
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    ms = statistics.median(start.elapsed_time(end) for start, end in events)
    del graph
    return ms


def _extra_gb(fn: Callable[[], None]) -> float:
    import torch

    if not torch.cuda.is_available():
        fn()
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 1e9


def _rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _fwd(f: Callable, inputs: list) -> Callable[[], list]:
    """A closure running f(*inputs) (inference kernels: no backward); returns [out]."""
    return lambda: [f(*inputs)]


def _fwd_bwd(f: Callable, inputs: list, grad_out) -> Callable[[], list]:
    """A closure running f(*inputs).backward(grad_out) with fresh .grad; returns [out, *grads]."""

    def run():
        for t in inputs:
            if getattr(t, "requires_grad", False):
                t.grad = None
        out = f(*inputs)
        out.backward(grad_out) if grad_out is not None else out.backward()
        return [out.detach()] + [t.grad for t in inputs if getattr(t, "requires_grad", False)]

    return run


def _measure(kernel: str, shape: str, impls: dict[str, Callable], inputs: list, grad_out,
             metric: Callable[[float], float] | None, metric_name: str, warmup: int, iters: int,
             graphs: bool = True, no_graph: frozenset[str] = frozenset(), backward: bool = True) -> list[Row]:
    import torch

    rows, ref_vals = [], None
    for name, f in impls.items():
        run = _fwd_bwd(f, inputs, grad_out) if backward else _fwd(f, inputs)
        try:
            vals = run()
            if ref_vals is None:
                ref_vals = vals
                err = None
            else:
                err = max(_rel_err(a, b) for a, b in zip(vals, ref_vals))
            del vals
            ms = _time_ms(run, warmup, iters)
            gb = _extra_gb(run)
            row = Row(kernel, shape, name, ms, metric(ms) if metric else None, metric_name, gb, err)
            if name in no_graph:
                row.note = "not captured in a CUDA graph (host sync inside; a failed capture poisons the context)"
            elif graphs and torch.cuda.is_available():
                try:
                    g_ms = _time_graph_ms(run, iters)
                    row.extra["graph_ms"] = g_ms
                    row.extra["graph_metric"] = metric(g_ms) if metric else None
                except Exception as e:
                    row.note = f"no CUDA graph: {type(e).__name__}: {str(e)[:80]}"
            rows.append(row)
        except Exception as e:  # a competitor failing must not hide the others' numbers
            rows.append(Row(kernel, shape, name, float("nan"), None, metric_name, float("nan"), None,
                            note=f"{type(e).__name__}: {str(e)[:120]}"))
        for t in inputs:
            if getattr(t, "requires_grad", False):
                t.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


def bench_rmsnorm(shapes: list[tuple[int, int]], warmup: int, iters: int, device: str = "cuda") -> list[Row]:
    """RMSNorm forward+backward, bf16, on (N, D) shapes."""
    import torch

    from kiln.kernels.rmsnorm import rmsnorm, rmsnorm_ref

    rows = []
    for n, d in shapes:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        x = torch.randn(n, d, device=device, dtype=dtype, requires_grad=True)
        w = (1 + 0.1 * torch.randn(d, device=device)).to(dtype).requires_grad_()
        dy = torch.randn(n, d, device=device, dtype=dtype)
        impls: dict[str, Callable] = {"torch eager (reference)": lambda x, w: rmsnorm_ref(x, w, 1e-6)}
        if hasattr(torch.nn.functional, "rms_norm"):
            impls["torch F.rms_norm"] = lambda x, w: torch.nn.functional.rms_norm(x, (d,), w, 1e-6)
        if device == "cuda":
            impls["torch.compile(reference)"] = torch.compile(lambda x, w: rmsnorm_ref(x, w, 1e-6))
        impls["kiln triton"] = lambda x, w: rmsnorm(x, w, 1e-6)
        liger = _liger_rmsnorm() if device == "cuda" else None
        if liger is not None:  # last, as in bench_ce
            impls["liger"] = liger
        nbytes = 4 * n * d * 2
        rows += _measure("rmsnorm", f"{n}x{d}", impls, [x, w], dy, lambda ms: nbytes / (ms * 1e-3) / 1e12,
                         "TB/s", warmup, iters)
    return rows


def _liger_rmsnorm() -> Callable | None:
    try:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
    except Exception:
        return None
    # in_place=False: Liger otherwise overwrites dy with dx, which would change the next rows' inputs.
    return lambda x, w: LigerRMSNormFunction.apply(x, w, 1e-6, 0.0, "llama", False)


def bench_attention(
    shapes: list[tuple[int, int, int, int, int]], warmup: int, iters: int, device: str = "cuda"
) -> list[Row]:
    """Causal attention forward+backward, bf16, on (B, H, H_kv, T, D) shapes, vs torch SDPA."""
    import torch
    import torch.nn.functional as F

    from kiln.kernels.attention import flash_attention

    rows = []
    for b, h, hkv, t, d in shapes:
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        q = torch.randn(b, h, t, d, device=device, dtype=dtype, requires_grad=True)
        k = torch.randn(b, hkv, t, d, device=device, dtype=dtype, requires_grad=True)
        v = torch.randn(b, hkv, t, d, device=device, dtype=dtype, requires_grad=True)
        do = torch.randn(b, h, t, d, device=device, dtype=dtype)
        gqa = {"enable_gqa": True} if hkv != h else {}
        impls = {
            "torch SDPA": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa),
            "kiln triton": lambda q, k, v: flash_attention(q, k, v, causal=True),
        }
        flops = 3.5 * 4 * b * h * t * t * d * 0.5
        rows += _measure("attention", f"B{b} H{h}/{hkv} T{t} D{d}", impls, [q, k, v], do,
                         lambda ms: flops / (ms * 1e-3) / 1e12, "TFLOP/s", warmup, iters)
    return rows


def prefill_step(q_lens: list[int], ctx_lens: list[int], H: int, Hkv: int, D: int, bs: int, device: str, dtype,
                 seed: int = 0):
    """One engine step's attention inputs: a shuffled pool holding each sequence's ``ctx_lens`` tokens,
    its block table, and ``q_lens`` new tokens a sequence (the last of its context) packed in q (N, H, D);
    returns (q, k_pool, v_pool, PagedMetadata)."""
    import torch

    from kiln.model import PagedMetadata

    g = torch.Generator().manual_seed(seed)
    blocks = [-(-L // bs) for L in ctx_lens]
    nb = sum(blocks) + 1
    k_pool = torch.randn(nb, bs, Hkv, D, generator=g).to(device, dtype)
    v_pool = torch.randn(nb, bs, Hkv, D, generator=g).to(device, dtype)
    perm, tables, i = torch.randperm(nb - 1, generator=g).tolist(), [], 0
    for n in blocks:
        tables.append(perm[i:i + n])
        i += n
    width = max(blocks)
    bt = torch.tensor([t + [nb - 1] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
    q = torch.randn(sum(q_lens), H, D, generator=g).to(device, dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=device)
    meta = PagedMetadata(torch.zeros(sum(q_lens), dtype=torch.long, device=device), bt,
                         torch.tensor(ctx_lens, dtype=torch.int32, device=device), starts, list(q_lens), list(ctx_lens))
    return q, k_pool, v_pool, meta


def bench_paged_prefill(cases: list[tuple[str, list[int], int, int, int]], warmup: int, iters: int,
                        device: str = "cuda") -> list[Row]:
    """Prompt steps over the paged cache, forward only: (name, prompt lengths, H, Hkv, D) per case,
    each prompt whole in the step (chunk = context), block size 16; bf16 on CUDA."""
    import torch

    from kiln.kernels.paged_attention import paged_prefill_attention
    from kiln.model.attention import paged_prefill_batched

    rows = []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for name, lens, H, Hkv, D in cases:
        q, kp, vp, meta = prefill_step(lens, lens, H, Hkv, D, 16, device, dtype)

        def padded(q, fused=False, meta=meta, kp=kp, vp=vp):
            return paged_prefill_batched(q, kp, vp, meta, fused)

        impls: dict[str, Callable] = {
            "padded, Kiln plain attention (reference)": padded,
            "padded, torch SDPA": lambda q, padded=padded: padded(q, True),
            "kiln triton prefill": lambda q, meta=meta, kp=kp, vp=vp: paged_prefill_attention(
                q, kp, vp, meta.block_tables, meta.context_lens, meta.query_start, meta.query_lens),
        }
        flops = 4 * H * D * sum(n * (n + 1) / 2 for n in lens)  # causal: each query sees its prefix
        shape = f"{name}: {len(lens)} prompts, {sum(lens)} tokens (longest {max(lens)}), H{H}/{Hkv} D{D}"
        rows += _measure("paged_prefill", shape, impls, [q], None, lambda ms: flops / (ms * 1e-3) / 1e12,
                         "TFLOP/s", warmup, iters, graphs=False, backward=False)
    return rows


def prefill_cases(quick: bool = False) -> list[tuple[str, list[int], int, int, int]]:
    """Prompt steps a serving engine meets: a wave of chat prompts (one long among short ones, as
    AlpacaEval's through GPT-2's tokenizer: mean 34, max 503) and prompts of like length, at GPT-2
    small's heads and at Llama-2-7B's."""
    chat = [503] + [10 + (i * 7) % 31 for i in range(63)]
    like = [96 + (i * 5) % 33 for i in range(16)]
    cases = [("chat wave", chat, 12, 12, 64), ("like lengths", like, 12, 12, 64)]
    return cases[:1] if quick else cases + [("chat wave", chat, 32, 32, 128)]


def bench_ce(n: int, d: int, vocab: int, chunks: list[int], warmup: int, iters: int, device: str = "cuda") -> list[Row]:
    """Linear + cross-entropy forward+backward, bf16, (n, d) x (vocab, d)."""
    import torch

    from kiln.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x = (torch.randn(n, d, device=device) / math.sqrt(d)).to(dtype).requires_grad_()
    w = torch.randn(vocab, d, device=device, dtype=dtype).requires_grad_()
    tgt = torch.randint(0, vocab, (n,), device=device)
    impls: dict[str, Callable] = {"torch eager (reference)": lambda x, w, t: linear_cross_entropy_ref(x, w, t)}
    if device == "cuda":
        impls["torch.compile(reference)"] = torch.compile(lambda x, w, t: linear_cross_entropy_ref(x, w, t))
    for c in chunks:
        impls[f"kiln triton chunk {c}"] = lambda x, w, t, c=c: linear_cross_entropy(x, w, t, chunk_size=c)
    # Liger last, so a failure of its call disturbs no other row.
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        impls["liger"] = lambda x, w, t: liger(w, x, t)
    except Exception:
        pass

    # Liger's fused CE syncs with the host, so its capture fails and leaves the CUDA context unusable
    # (seen 2026-11-22): time it without a graph.
    return _measure("ce", f"N{n} d{d} V{vocab}", impls, [x, w, tgt], None, None, "", warmup, iters,
                    no_graph=frozenset({"liger"}))


def sweep_ce_rows(n: int, vocab: int, warmup: int, iters: int) -> list[Row]:
    """Launch shapes of the fused CE's row kernel alone on an (n, vocab) bf16 logits chunk.

    GB/s counts 3 x n x vocab x 2 bytes (read twice, write once); the second read may hit L2.
    """
    import torch

    from kiln.kernels.linear_cross_entropy import _ce_rows

    logits = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16)
    tgt = torch.randint(0, vocab, (n,), device="cuda")
    loss = torch.empty(n, device="cuda", dtype=torch.float32)
    rows = []
    for block_v in (1024, 2048, 4096, 8192):
        for warps in (4, 8, 16):
            def f():
                _ce_rows(logits, tgt, loss, -100, True, block_v=block_v, num_warps=warps)
            try:
                ms = _time_ms(f, warmup, iters)
                gbs = 3 * n * vocab * 2 / (ms * 1e-3) / 1e9
                rows.append(Row("ce_rows_sweep", f"{n}x{vocab}", f"BLOCK_V {block_v} warps {warps}", ms, gbs,
                                "GB/s", 0.0))
            except Exception as e:
                rows.append(Row("ce_rows_sweep", f"{n}x{vocab}", f"BLOCK_V {block_v} warps {warps}", float("nan"),
                                None, "GB/s", 0.0, note=f"{type(e).__name__}: {str(e)[:100]}"))
    return rows


def _tuned_notes() -> dict:
    """The launch configs the autotuner chose in this process (for docs/LOG.md)."""
    import importlib

    notes = {}
    try:
        # importlib: the package re-exports the function rmsnorm under the module's name.
        attention = importlib.import_module("kiln.kernels.attention")
        rmsnorm = importlib.import_module("kiln.kernels.rmsnorm")

        for name in ("_fwd_launch", "_dq_launch", "_dkdv_launch"):
            cfg = getattr(getattr(attention, name, None), "best_config", None)
            if cfg is not None:
                notes[f"attention{name}"] = str(cfg)
        for (block_d, backward), tuned in [(k, rmsnorm._tuned(*k)) for k in [(1024, False), (1024, True), (4096, False), (4096, True)]]:
            cfg = getattr(tuned, "best_config", None)
            if cfg is not None:
                notes[f"rmsnorm_{'bwd' if backward else 'fwd'}_{block_d}"] = str(cfg)
    except Exception as e:  # notes are a convenience; never fail the benchmark on them
        notes["error"] = repr(e)
    return notes


def profile_kiln(device_rows: int = 12) -> str:
    """torch.profiler summary of Kiln's kernels (forward+backward, target shapes): GPU time per
    kernel and host time per call, to separate launch overhead from device time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from kiln.kernels import flash_attention, linear_cross_entropy, rmsnorm

    cases = []
    for n, d in ((16384, 768), (16384, 4096)):
        x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.ones(d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn_like(x)
        cases.append((f"rmsnorm {n}x{d}", lambda x=x, w=w, dy=dy: rmsnorm(x, w).backward(dy)))
    for b, h, t, d in ((16, 12, 1024, 64), (4, 16, 4096, 128)):
        q, k, v = (torch.randn(b, h, t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        cases.append((f"attention B{b} H{h} T{t} D{d}",
                      lambda q=q, k=k, v=v, do=do: flash_attention(q, k, v).backward(do)))
    x = torch.randn(16384, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(50304, 768, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    tgt = torch.randint(0, 50304, (16384,), device="cuda")
    cases.append(("linear_ce chunk default", lambda: linear_cross_entropy(x, w, tgt).backward()))
    out = []
    for name, fn in cases:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            dev_us = getattr(e, "self_device_time_total", None)
            if dev_us is None:
                dev_us = getattr(e, "self_cuda_time_total", 0)
            if dev_us > 0:
                rows.append((dev_us / 5, e.count / 5, e.key[:70]))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        out.append(f"\n#### profile: {name}: GPU {total:.1f} us per fwd+bwd")
        out += [f"  {us:9.1f} us  x{cnt:4.1f}  {key}" for us, cnt, key in rows[:device_rows]]
    return "\n".join(out)


def _versions() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    try:
        import importlib.metadata as md

        info["liger_kernel"] = md.version("liger-kernel")
    except Exception:
        info["liger_kernel"] = None
    info["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return info


def to_markdown(rows: list[Row]) -> str:
    """Markdown tables, one per kernel, best first within a shape is left to the reader: fixed order."""
    out = []
    for kernel in TABLES:
        krows = [r for r in rows if r.kernel == kernel]
        if not krows:
            continue
        name = krows[0].metric_name
        out.append(f"\n### {kernel}\n")
        out.append(f"| shape | impl | ms | {name or '-'} | graph ms | graph {name or '-'} | extra GB | rel err vs first row | note |")
        out.append("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
        for r in krows:
            metric = f"{r.metric:.2f}" if r.metric is not None else ""
            err = f"{r.max_rel_err:.1e}" if r.max_rel_err is not None else ""
            g_ms = f"{r.extra['graph_ms']:.3f}" if "graph_ms" in r.extra else ""
            g_metric = f"{r.extra['graph_metric']:.2f}" if r.extra.get("graph_metric") is not None else ""
            out.append(f"| {r.shape} | {r.impl} | {r.ms:.3f} | {metric} | {g_ms} | {g_metric} | {r.extra_gb:.3f} | {err} | {r.note} |")
    return "\n".join(out) + "\n"


def run(args: argparse.Namespace) -> int:
    """Run the selected kernel benchmarks on the current CUDA device; print and optionally save."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("kiln bench kernels needs a CUDA GPU (the kernels' CPU path is the interpreter, for tests)")
    selected = [k.strip() for k in args.kernels.split(",") if k.strip()]
    for k in selected:
        if k not in KERNELS:
            raise ValueError(f"unknown kernel {k!r}; choose from {','.join(KERNELS)}")
    warmup, iters = (3, 10) if args.quick else (args.warmup, args.iters)
    torch.manual_seed(0)
    rows: list[Row] = []
    if "rmsnorm" in selected:
        shapes = [(16384, 4096)] if args.quick else [(16384, 768), (16384, 4096)]
        rows += bench_rmsnorm(shapes, warmup, iters)
        print(to_markdown([r for r in rows if r.kernel == "rmsnorm"]), flush=True)
        _save(args.out, rows)  # partial results survive a later failure
    if "attention" in selected:
        shapes = [(8, 12, 12, 1024, 64), (8, 16, 16, 2048, 128)]
        if not args.quick:
            shapes = [(16, 12, 12, 1024, 64), (8, 12, 12, 2048, 64), (4, 12, 12, 4096, 64), (2, 12, 12, 8192, 64),
                      (16, 16, 16, 1024, 128), (8, 16, 16, 2048, 128), (4, 16, 16, 4096, 128), (2, 16, 16, 8192, 128),
                      (8, 16, 4, 2048, 128)]
        rows += bench_attention(shapes, warmup, iters)
        print(to_markdown([r for r in rows if r.kernel == "attention"]), flush=True)
        _save(args.out, rows)  # partial results survive a later failure
    if "ce" in selected:
        chunks = [int(c) for c in args.ce_chunks.split(",")]
        rows += bench_ce(16384, 768, 50304, chunks, warmup, iters)
        print(to_markdown([r for r in rows if r.kernel == "ce"]), flush=True)
        _save(args.out, rows)  # partial results survive a later failure
    if "paged_prefill" in selected:
        rows += bench_paged_prefill(prefill_cases(args.quick), warmup, iters)
        print(to_markdown([r for r in rows if r.kernel == "paged_prefill"]), flush=True)
        _save(args.out, rows)  # partial results survive a later failure
    if "gemv" in selected:
        from kiln.bench.gemv import bench_gemv, gemv_cases

        for case in gemv_cases(args.quick):  # a case at a time: partial results survive a time limit
            case_rows = bench_gemv([case], 5 if args.quick else 20, args.gemv_sweep)
            rows += case_rows
            print(to_markdown(case_rows), flush=True)
            _save(args.out, rows)
    if args.profile:
        print(profile_kiln(), flush=True)
    if args.sweep:
        rows += sweep_ce_rows(1024, 50304, warmup, iters)
        print(to_markdown([r for r in rows if r.kernel == "ce_rows_sweep"]), flush=True)
    header = _save(args.out, rows)
    print(json.dumps(header))
    return 0


def _save(out_dir: str | None, rows: list[Row]) -> dict:
    """Write bench_kernels.json and .md (header: date, command, versions, tuned configs); return the header."""
    header = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        **_versions(),
        "tuned": _tuned_notes(),
    }
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench_kernels.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]}, indent=1))
        (out / "bench_kernels.md").write_text("```\n" + json.dumps(header, indent=1) + "\n```\n" + to_markdown(rows))
    return header


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench kernels``."""
    p = bench_subparsers.add_parser(
        "kernels",
        help="Kiln's Triton kernels vs torch eager, torch.compile and Liger (forward+backward, one GPU)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma list from {','.join(KERNELS)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes and repetitions (a smoke run)")
    p.add_argument("--warmup", type=int, default=10, help="untimed calls before timing")
    p.add_argument("--iters", type=int, default=50, help="timed calls; the median is reported")
    p.add_argument("--ce-chunks", default="256,1024,4096,8192,16384", help="chunk sizes (tokens) for the fused CE rows")
    p.add_argument("--out", default=None, help="directory for bench_kernels.json and bench_kernels.md")
    p.add_argument("--sweep", action="store_true", help="also time launch shapes of the fused CE's row kernel")
    p.add_argument("--gemv-sweep", action="store_true",
                   help="gemv: also time every tile of the int8 kernel and the int4 word kernel (best few per shape)")
    p.add_argument("--profile", action="store_true", help="also print a torch.profiler GPU-time summary of Kiln's kernels")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.kernels ...``: the same benchmark without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.kernels")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    args = parser.parse_args(["kernels", *(sys.argv[1:] if argv is None else argv)])
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
