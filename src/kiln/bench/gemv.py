"""`kiln bench kernels --kernels gemv`: batch-1 decode's weight GEMVs, bf16 against int8 and int4.

A decode token at batch 1 reads every weight once, so each projection is a matrix-vector product
bound by bytes. This table times one product on the shapes of a decode step (Llama-2-7B's, and
350m's, where launches dominate) and reports the weight bytes it streams per second beside the copy
bandwidth measured in the same run: how close each kernel gets to the bytes bound on its own, apart
from the rest of the step. That separates "the int8 kernel streams slowly" from "the step has
other costs" (docs/benchmarks.md).

Rows, each timed as a CUDA graph of back-to-back calls over distinct copies of the weight (enough
copies that they do not fit in L2: an H100's 50 MB would otherwise serve small matrices from cache,
as it never does in a decode step), median over replays:

- ``torch bf16``: ``x @ w.t()`` (cuBLAS's GEMV), the bf16 engine's product.
- ``kiln int8`` / ``kiln int4``: ``kiln.kernels.quant_linear`` as the engine calls it (fixed tile);
  ``... tuned``: the autotuned tile (``gemv_configs``); ``inductor int8/int4 row``: the one-row torch
  form compiled with coordinate-descent tuning (what the engine's compiled decode runs by default).
- ``--gemv-sweep``: every tile of the int8 kernel (``sweep_configs``: output channels, K tile, warps,
  tile accumulator, software-pipelined stages) and of the int4 word kernel (``_int4_gemv_kernel_w32``),
  the best few per shape: what a better default tile would buy.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable

from kiln.bench.kernel_rows import Row

COPY_TARGET_BYTES = 512 * 2**20  # bf16 weight copies per row sum past this (int4's quarter still > L2)


def gemv_cases(quick: bool = False) -> list[tuple[str, int, int]]:
    """(name, N out, K in) of one decode step's products: Llama-2-7B's (q, k, v and o are 4096 x 4096;
    fused q/k/v 12288; gate and up 11008, fused 22016; down 4096 x 11008; head 32000) and 350m's
    (d 1024, d_ff 2752, fused q/k/v 3072)."""
    seven = [("7b q/o", 4096, 4096), ("7b qkv fused", 12288, 4096), ("7b gate/up", 11008, 4096),
             ("7b gate+up fused", 22016, 4096), ("7b down", 4096, 11008), ("7b head", 32000, 4096)]
    small = [("350m o", 1024, 1024), ("350m qkv fused", 3072, 1024), ("350m down", 1024, 2752)]
    return seven[:2] + small[:1] if quick else seven + small


def sweep_configs(kind: str) -> list[dict]:
    """Launch tiles the sweep times: int8 (``_int8_gemv_kernel``: BLOCK_N, BLOCK_K, warps, ACC2D,
    STAGES), int4w (``_int4_gemv_kernel_w32``: BLOCK_N, GPT groups of 16 words, warps), and the
    tensor-core forms int8dot / int4dot (``_int8_gemv_dot_kernel``, ``_int4_gemv_dot_kernel``:
    BLOCK_N, BLOCK_K or GPT, pipelined STAGES, warps)."""
    if kind == "int8":
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "ACC2D": a, "STAGES": st}
                for bn in (4, 8, 16, 32) for bk in (256, 512, 1024, 2048) for a in (False, True)
                if bn * bk <= (4096 if a else 8192) for w in (4, 8) for st in (0, 3)]
    if kind == "int4w":
        return [{"BLOCK_N": bn, "GPT": gpt, "num_warps": w}
                for bn in (2, 4, 8, 16, 32) for gpt in (1, 2, 4) if 4 <= bn * gpt <= 64 for w in (2, 4, 8)]
    if kind == "int8dot":
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": w}
                for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 5) for w in (4, 8)]
    return [{"BLOCK_N": bn, "GPT": gpt, "STAGES": st, "num_warps": w}
            for bn in (16, 32, 64) for gpt in (1, 2) for st in (3, 5) for w in (4, 8)]


SWEEP_KINDS = ("int8", "int4w", "int8dot", "int4dot")


def _graph_us(calls: list[Callable[[], object]], reps: int) -> float:
    """Median microseconds per call: a CUDA graph of every call back to back, replayed ``reps`` times
    (a host clock over eager calls without CUDA: the CPU smoke run)."""
    import time

    import torch

    for c in calls:  # compile, autotune, allocate: outside the capture
        c()
    if not torch.cuda.is_available():
        t0 = time.perf_counter()
        for c in calls:
            c()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / len(calls))
    del graph
    return statistics.median(times)


def copy_gbs(reps: int = 20) -> float:
    """Device copy bandwidth: read + write bytes of a 1 GiB copy per second (the bound's denominator,
    as ``kiln bench serve`` measures it)."""
    import torch

    if not torch.cuda.is_available():
        return float("nan")
    a = torch.empty(2**29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    us = _graph_us([lambda: b.copy_(a)], reps)
    return 2 * a.numel() * 2 / (us * 1e-6) / 1e9


def _weights(N: int, K: int, copies: int, device: str, quick: bool) -> dict:
    """Per copy: the bf16 weight and its int8 and int4 forms (group 128; random normal rows)."""
    import torch

    from kiln.kernels.quant_linear import quantize_int4, quantize_int8

    out: dict[str, list] = {"bf16": [], "int8": [], "int4": []}
    g = torch.Generator(device="cpu").manual_seed(N * 7 + K)
    for i in range(copies):
        w = (torch.randn(N, K, generator=g) * 0.02).to(device)
        if i and not quick:  # the quantized forms of one copy, shifted: distinct bytes, no re-quantizing
            q, s = out["int8"][0]
            p, s4, z4 = out["int4"][0]
            out["int8"].append((q.roll(i, 1), s))
            out["int4"].append((p.roll(i, 1), s4, z4))
        else:
            out["int8"].append(quantize_int8(w))
            out["int4"].append(quantize_int4(w, 128))
        out["bf16"].append(w.to(torch.bfloat16 if device == "cuda" else torch.float32))
    return out


INDUCTOR_CASES = ("7b q/o", "7b down", "7b gate/up", "350m o")  # each compile with coordinate descent: ~10 s


def _named_impls(ws: dict, x, inductor: bool = True) -> dict[str, tuple[list[Callable], int, Callable | None]]:
    """name -> (one call per copy, bytes a call streams, reference of copy 0's output or None)."""
    import torch

    from kiln.kernels import quant_linear as ql

    int8_bytes = ws["int8"][0][0].numel() + ws["int8"][0][1].numel() * 4
    p, s4, _ = ws["int4"][0]
    int4_bytes = p.numel() + 2 * s4.numel() * 4
    bf16_bytes = ws["bf16"][0].numel() * ws["bf16"][0].element_size()
    ref8 = lambda: ql.int8_linear_ref(x.float(), *ws["int8"][0])  # noqa: E731
    ref4 = lambda: ql.int4_linear_ref(x.float(), *ws["int4"][0])  # noqa: E731
    impls = {
        "torch bf16": ([lambda w=w: x @ w.t() for w in ws["bf16"]], bf16_bytes, None),
        "kiln int8": ([lambda a=a: ql.int8_linear(x, *a, use_kernel=True) for a in ws["int8"]], int8_bytes, ref8),
        "kiln int8 tuned": ([lambda a=a: ql.int8_linear(x, *a, use_kernel=True, tuned=True) for a in ws["int8"]],
                            int8_bytes, ref8),
        "kiln int4": ([lambda a=a: ql.int4_linear(x, *a, use_kernel=True) for a in ws["int4"]], int4_bytes, ref4),
        "kiln int4 tuned": ([lambda a=a: ql.int4_linear(x, *a, use_kernel=True, tuned=True) for a in ws["int4"]],
                            int4_bytes, ref4),
    }
    if inductor and torch.cuda.is_available():  # Inductor's fused one-row forms (the engine's compiled default)
        import torch._inductor.config as icfg

        icfg.coordinate_descent_tuning = True
        row8, row4 = torch.compile(ql.int8_linear_row, dynamic=False), torch.compile(ql.int4_linear_row, dynamic=False)
        impls["inductor int8 row"] = ([lambda a=a: row8(x, *a) for a in ws["int8"]], int8_bytes, ref8)
        impls["inductor int4 row"] = ([lambda a=a: row4(x, *a) for a in ws["int4"]], int4_bytes, ref4)
    return impls


def _sweep_calls(kind: str, cfg: dict, ws: dict, x, y) -> list[Callable]:
    """One launch a copy of the kernel ``kind`` names at tile ``cfg``."""
    import torch
    import triton
    import triton.language as tl

    from kiln.kernels import quant_linear as ql

    tile = {k: v for k, v in cfg.items() if k != "num_warps"}
    warps = cfg["num_warps"]
    N, K = y.shape[1], x.shape[1]
    M = x.shape[0]
    grid = (triton.cdiv(N, cfg["BLOCK_N"]), 1)
    dot = {"DOT_DTYPE": tl.bfloat16 if x.is_cuda else tl.float16}  # the interpreter's bf16 dot is wrong
    if kind == "int8":
        return [lambda q=q, s=s: ql._int8_gemv_kernel[grid](x, q, s, y, N, K, x.stride(0), q.stride(0), y.stride(0),
                                                           **tile, num_warps=warps) for q, s in ws["int8"]]
    if kind == "int8dot":
        return [lambda q=q, s=s: ql._int8_gemv_dot_kernel[grid[:1]](
            x, q, s, y, M, N, K, x.stride(0), q.stride(0), y.stride(0), **tile, **dot, num_warps=warps)
            for q, s in ws["int8"]]
    calls = []
    for p, s, z in ws["int4"]:
        p32 = p.contiguous().view(torch.int32)  # (N, K / 8) words
        if kind == "int4w":
            calls.append(lambda p32=p32, s=s, z=z: ql._int4_gemv_kernel_w32[grid](
                x, p32, s, z, y, N, K, x.stride(0), p32.stride(0), s.stride(0), y.stride(0), WPG=16, **tile,
                num_warps=warps))
        else:
            calls.append(lambda p32=p32, s=s, z=z: ql._int4_gemv_dot_kernel[grid[:1]](
                x, p32, s, z, y, M, N, K, x.stride(0), p32.stride(0), s.stride(0), y.stride(0), WPG=16, **tile,
                **dot, num_warps=warps))
    return calls


def _row(shape: str, impl: str, us: float, nbytes: int, copy: float, err: float | None, note: str = "") -> Row:
    gbs = nbytes / (us * 1e-6) / 1e9
    pct = f"{100 * gbs / copy:.0f}% of copy" if math.isfinite(copy) else ""
    return Row("gemv", shape, impl, us / 1e3, gbs, "GB/s", float("nan"), err, note=", ".join(x for x in (pct, note) if x))


def _rel(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def bench_gemv(cases: list[tuple[str, int, int]], reps: int = 20, sweep: bool = False, top: int = 4,
               device: str = "cuda", quick: bool = False) -> list[Row]:
    """The table: per case, the named rows, then (``sweep``) the ``top`` fastest tiles of each sweep."""
    import torch

    rows: list[Row] = []
    copy = copy_gbs(reps) if device == "cuda" else float("nan")
    for name, N, K in cases:
        copies = 1 if device != "cuda" else max(1, min(128, -(-COPY_TARGET_BYTES // (N * K * 2))))
        ws = _weights(N, K, copies, device, quick)
        x = torch.randn(1, K, generator=torch.Generator().manual_seed(K)).to(device, ws["bf16"][0].dtype)
        shape = f"{name}: {N} x {K}, {copies} copies"
        for impl, (calls, nbytes, ref) in _named_impls(ws, x, name in INDUCTOR_CASES).items():
            try:
                err = _rel(calls[0](), ref()) if ref is not None else None
                rows.append(_row(shape, impl, _graph_us(calls, reps), nbytes, copy, err))
            except Exception as e:  # one failing row must not hide the others
                rows.append(Row("gemv", shape, impl, float("nan"), None, "GB/s", float("nan"), None,
                                note=f"{type(e).__name__}: {str(e)[:120]}"))
        if sweep:
            rows += _sweep(shape, ws, x, reps, copy, top)
        del ws
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _sweep(shape: str, ws: dict, x, reps: int, copy: float, top: int) -> list[Row]:
    """The ``top`` fastest tiles of each sweep kind on one case (tiles that fail to compile or launch on
    this GPU, e.g. past its shared memory, are counted in one note row)."""
    import torch

    from kiln.kernels import quant_linear as ql

    N = ws["int8"][0][0].shape[0]
    y = torch.empty(1, N, device=x.device, dtype=x.dtype)
    b8 = ws["int8"][0][0].numel() + 4 * N
    b4 = ws["int4"][0][0].numel() + 8 * ws["int4"][0][1].numel()
    ref8, ref4 = ql.int8_linear_ref(x.float(), *ws["int8"][0]), ql.int4_linear_ref(x.float(), *ws["int4"][0])
    out = []
    for kind in SWEEP_KINDS:
        nbytes, ref = (b8, ref8) if kind.startswith("int8") else (b4, ref4)
        timed, failed = [], []
        for cfg in sweep_configs(kind):
            try:
                calls = _sweep_calls(kind, cfg, ws, x, y)
                calls[0]()
                err = _rel(y, ref)
                timed.append((_graph_us(calls, reps), cfg, err))
            except Exception as e:  # a tile this GPU cannot run: counted, not fatal
                failed.append(f"{_cfg_name(cfg)}: {type(e).__name__}: {str(e)[:60]}")
        timed.sort(key=lambda t: t[0])
        for us, cfg, err in timed[:top]:
            out.append(_row(shape, f"{kind} sweep {_cfg_name(cfg)}", us, nbytes, copy, err, f"of {len(timed)} tiles"))
        if failed:
            out.append(Row("gemv", shape, f"{kind} sweep: {len(failed)} tiles failed", float("nan"), None, "GB/s",
                           float("nan"), None, note=failed[0]))
    return out


def _cfg_name(cfg: dict) -> str:
    short = {"BLOCK_N": "n", "BLOCK_K": "k", "num_warps": "w", "ACC2D": "acc2d", "STAGES": "s", "GPT": "g"}
    return " ".join(f"{short.get(k, k)}{int(v) if not isinstance(v, bool) else int(v)}" for k, v in cfg.items())
