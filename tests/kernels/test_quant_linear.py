"""Weight-only int8 / int4 GEMV kernels against dequantize-then-matmul, and the quantizers' round trip."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.quant_linear import (
    dequantize_int4,
    gemv_block_n,
    dequantize_int8,
    int4_linear,
    int4_linear_ref,
    int4_linear_row,
    int8_linear,
    int8_linear_ref,
    int8_linear_row,
    quantize_int4,
    quantize_int8,
)


@pytest.mark.parametrize("M,N,K,block_n", [(1, 40, 64, None), (3, 17, 300, None), (1, 40, 32, 16)])
def test_int8_kernel_equals_reference(dev, M, N, K, block_n, monkeypatch):
    if block_n:  # the tile a large matrix gets (gemv_block_n), on a small one
        monkeypatch.setattr("kiln.kernels.quant_linear.gemv_block_n", lambda n, m: block_n)
    torch.manual_seed(0)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    q, s = quantize_int8(w)
    torch.testing.assert_close(int8_linear(x, q, s, use_kernel=True), int8_linear_ref(x, q, s), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("M,N,K,G,block_n", [(1, 40, 64, 32, None), (2, 17, 256, 64, None), (1, 40, 64, 16, 16),
                                             (1, 24, 1280, 128, None),  # 10 groups: the last tile of 4 partly past the end
                                             (3, 9, 60, 12, None),  # 6 bytes a group: the per-weight kernel
                                             (1, 8, 4, 2, 4)])  # one byte a group
def test_int4_kernel_equals_reference(dev, M, N, K, G, block_n, monkeypatch):
    if block_n:
        monkeypatch.setattr("kiln.kernels.quant_linear.gemv_block_n", lambda n, m: block_n)
    torch.manual_seed(0)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    p, s, z = quantize_int4(w, G)
    got = int4_linear(x, p, s, z, use_kernel=True)
    torch.testing.assert_close(got, int4_linear_ref(x, p, s, z), atol=1e-4, rtol=1e-4)


def test_quantizers_round_trip_within_half_a_step():
    torch.manual_seed(1)
    w = torch.randn(8, 128) * torch.linspace(0.1, 3, 8)[:, None]
    q, s = quantize_int8(w)
    assert (dequantize_int8(q, s, torch.float32) - w).abs().max() <= s.max() / 2 + 1e-6
    p, s4, z = quantize_int4(w, 32)
    err = (dequantize_int4(p, s4, z, torch.float32) - w).abs().reshape(8, 4, 32)
    assert (err <= s4[..., None] / 2 + 1e-5).all()
    assert p.dtype == torch.uint8 and p.shape == (8, 64)
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.randn(4, 100), 32)


def test_gemv_block_n_keeps_enough_programs():
    assert gemv_block_n(768, 1) == 4 and gemv_block_n(2304, 1) == 8 and gemv_block_n(50304, 1) == 16
    assert gemv_block_n(4100, 1) == 16 and gemv_block_n(768, 8) == 16


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_compiled_call_goes_through_the_custom_op_without_graph_breaks(dev, mode):
    """What the engine's compiled decode step traces: the kernel as ``kiln::int8_gemv``/``int4_gemv``
    (fullgraph: no break), same numbers as the eager kernel."""
    torch.manual_seed(3)
    w, x = torch.randn(40, 64, device=dev), torch.randn(2, 64, device=dev)  # 2 rows: the custom op (1: torch ops)
    if mode == "int8":
        args = quantize_int8(w)
        fn, ref = (lambda x: int8_linear(x, *args, use_kernel=True)), int8_linear_ref(x, *args)
    else:
        args = quantize_int4(w, 32)
        fn, ref = (lambda x: int4_linear(x, *args, use_kernel=True)), int4_linear_ref(x, *args)
    torch._dynamo.reset()
    graphs = []

    def backend(gm, inputs):
        graphs.append(gm)
        return gm

    got = torch.compile(fn, backend=backend, fullgraph=True)(x)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert f"kiln.{mode}_gemv" in str([n.target for n in graphs[0].graph.nodes])
    torch._dynamo.reset()
    one = torch.compile(fn, backend="aot_eager", fullgraph=True)(x[:1])  # one row: dequantize + matmul ops
    torch.testing.assert_close(one, ref[:1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_forms_equal_the_reference(dtype):
    """The forms the compiled one-row decode uses: scale after the int8 matmul; int4 by group sums of
    the nibbles (no dequantized weight). Same numbers as dequantize-then-matmul."""
    torch.manual_seed(4)
    w, x = torch.randn(48, 256), torch.randn(1, 256).to(dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    q, s = quantize_int8(w)
    torch.testing.assert_close(int8_linear_row(x, q, s).float(), int8_linear_ref(x.float(), q, s), atol=tol, rtol=tol)
    args = quantize_int4(w, 64)
    want = int4_linear_ref(x.float(), *args)
    torch.testing.assert_close(int4_linear_row(x, *args).float(), want, atol=tol, rtol=tol)
    assert int4_linear_row(x, *args).dtype == dtype


def _largest_buffer(fn, x) -> int:
    """Elements of the largest buffer Inductor's generated code allocates for fn(x)."""
    import math
    import re

    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    _, codes = run_and_get_code(torch.compile(fn), x)
    shapes = re.findall(r"empty_strided_\w+\(\(([\d, ]*)\)", "\n".join(codes))
    return max((math.prod(int(d) for d in sh.split(",") if d.strip()) for sh in shapes), default=0)


def test_compiled_int4_row_builds_no_dequantized_weight():
    """Inductor's code for the one-row int4 form allocates nothing near the weight's N x K size; the
    reference's form does (the cause of int4 decoding slower than bf16 on the H100)."""
    torch.manual_seed(5)
    N, K = 96, 256
    args = quantize_int4(torch.randn(N, K), 64)
    x = torch.randn(1, K)
    try:
        row = _largest_buffer(lambda x: int4_linear_row(x, *args), x)
        ref = _largest_buffer(lambda x: int4_linear_ref(x, *args), x)
    except Exception as e:  # no C++ toolchain for inductor
        pytest.skip(f"inductor cannot build here: {type(e).__name__}")
    finally:
        torch._dynamo.reset()
    assert ref >= N * K, "the reference form should materialize the weight (the check would be vacuous)"
    assert row < N * K // 8, f"the one-row form allocates {row} elements"


@pytest.mark.parametrize("kind", ["int8", "int4", "int4w", "int8dot", "int4dot"])
def test_every_tuned_tile_equals_the_reference(dev, kind):
    """The autotuner picks one of ``gemv_configs`` by time on the GPU; each must give the same numbers
    (ragged N and K so that every tile has a partial edge). The tensor-core kinds round their operands
    to 16 bits (fp16 under the CPU interpreter, whose bf16 dot is wrong; bf16 on a GPU)."""
    import triton
    import triton.language as tl

    from kiln.kernels import quant_linear as ql

    torch.manual_seed(5)
    M, N, K = 2, 37, 640
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    y = torch.empty(M, N, device=dev)
    dot = "dot" in kind
    dt, tdt = (torch.float16, tl.float16) if dev.type == "cpu" else (torch.bfloat16, tl.bfloat16)
    xr = x.to(dt).float() if dot else x
    if kind.startswith("int8"):
        q, s = quantize_int8(w)
        want = int8_linear_ref(xr, q, s)
        if dot:
            args, kernel, extra = (x, q, s, y, M, N, K, x.stride(0), q.stride(0), y.stride(0)), ql._int8_gemv_dot_kernel, {"DOT_DTYPE": tdt}
        else:
            args, kernel, extra = (x, q, s, y, N, K, x.stride(0), q.stride(0), y.stride(0)), ql._int8_gemv_kernel, {}
    else:
        p, s, z = quantize_int4(w, 128)  # 5 groups of 64 bytes, 16 words
        want = int4_linear_ref(xr, p, s, z)
        p32 = p.view(torch.int32)
        if kind == "int4":
            args, kernel, extra = (x, p, s, z, y, N, K, x.stride(0), p.stride(0), s.stride(0), y.stride(0)), ql._int4_gemv_kernel, {"HALF": 64}
        elif kind == "int4w":
            args, kernel, extra = (x, p32, s, z, y, N, K, x.stride(0), p32.stride(0), s.stride(0), y.stride(0)), ql._int4_gemv_kernel_w32, {"WPG": 16}
        else:
            args = (x, p32, s, z, y, M, N, K, x.stride(0), p32.stride(0), s.stride(0), y.stride(0))
            kernel, extra = ql._int4_gemv_dot_kernel, {"WPG": 16, "DOT_DTYPE": tdt}
    configs = ql.gemv_configs(kind)
    assert len(configs) >= 12 and len({tuple(sorted(c.items())) for c in configs}) == len(configs)
    tol = 1e-3 if kind == "int4dot" else 1e-4
    for c in configs:
        y.zero_()
        tile = {k: v for k, v in c.items() if k != "num_warps"}
        grid = (triton.cdiv(N, c["BLOCK_N"]),) if dot else (triton.cdiv(N, c["BLOCK_N"]), M)
        kernel[grid](*args, **extra, **tile, num_warps=c["num_warps"])
        torch.testing.assert_close(y, want, atol=tol * want.abs().max().item(), rtol=tol, msg=f"{kind} tile {c}")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_tuned_layers_take_the_kernel_at_one_row_under_compile(dev, mode):
    """``quantize_model(..., tuned=True)``: the compiled one-row call goes through ``kiln::<mode>_gemv``
    (Kiln's kernel) instead of the fused torch ops, with the same numbers; untuned layers do not.
    (On the CPU the layers would take the dense reference: the call forces the kernel, as CUDA does.)"""
    from kiln.kernels.quant_linear import int4_linear, int8_linear
    from kiln.model.layers import Linear
    from kiln.model.quantize import quantize_model

    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(6)).to(dev)

    def traced(tuned: bool) -> tuple[torch.Tensor, str]:
        torch.manual_seed(7)
        net = torch.nn.Sequential(Linear(256, 48)).to(dev)
        quantize_model(net, mode, group_size=128, tuned=tuned)
        layer = net[0]
        assert layer.tuned is tuned
        if mode == "int8":
            call = lambda t: int8_linear(t, layer.q, layer.scale, use_kernel=True, tuned=layer.tuned)  # noqa: E731
        else:
            call = lambda t: int4_linear(t, layer.packed, layer.scale, layer.low, use_kernel=True,  # noqa: E731
                                         tuned=layer.tuned)
        graphs = []

        def backend(gm, inputs):
            graphs.append(gm)
            return gm

        torch._dynamo.reset()
        got = torch.compile(call, backend=backend, fullgraph=True)(x)
        torch.testing.assert_close(got, layer(x), atol=1e-4, rtol=1e-4)  # = the layer's own (eager) path
        return got, str([n.target for n in graphs[0].graph.nodes])

    got_t, nodes_t = traced(True)
    got_f, nodes_f = traced(False)
    assert f"kiln.{mode}_gemv" in nodes_t and f"kiln.{mode}_gemv" not in nodes_f
    torch.testing.assert_close(got_t, got_f, atol=1e-4, rtol=1e-4)


def test_a_failing_tuned_launch_falls_back_to_the_fixed_tile_once(monkeypatch):
    """The autotuned GEMV (int4's default on CUDA) must not take a quantized model down if a tile fails
    to compile: one warning, False (the caller launches the fixed tile), and no retry afterwards."""
    import warnings

    from kiln.kernels import quant_linear as ql
    from kiln.kernels._backend import KernelFallbackWarning

    calls = []

    class Launcher:
        def __init__(self, fail):
            self.fail = fail

        def __getitem__(self, grid):
            def launch(*args, **meta):
                calls.append(meta)
                if self.fail:
                    raise RuntimeError("PassManager::run failed")
            return launch

    monkeypatch.setattr(ql, "_TUNE_FAILED", set())
    monkeypatch.setattr(ql, "_tuned_kernel", lambda kind: Launcher(fail=kind == "int4"))
    assert ql._launch_tuned("int8", None, ()) is True and len(calls) == 1
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert ql._launch_tuned("int4", None, (), HALF=64) is False
    assert calls[-1] == {"HALF": 64} and any(issubclass(x.category, KernelFallbackWarning) for x in w)
    assert ql._launch_tuned("int4", None, (), HALF=64) is False and len(calls) == 2  # not tried again
    assert ql._launch_tuned("int8", None, ()) is True


@pytest.mark.parametrize("M,N,K,G,block_n,gpt", [(1, 37, 640, 128, 8, 2),  # 5 groups: the last tile half past the end
                                                (2, 20, 256, 64, 4, 4), (1, 16, 96, 32, 16, 1),
                                                (1, 3, 2048, 128, 4, 4)])
def test_int4_word_kernel_equals_reference(dev, M, N, K, G, block_n, gpt):
    """``_int4_gemv_kernel_w32`` reads the packed bytes as int32 words: nibble i of word j is input
    8 j + i, each through the mantissa trick at its own bit position (a wrong position, shift or
    scale changes the sum)."""
    import triton

    from kiln.kernels import quant_linear as ql

    torch.manual_seed(3)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    p, s, z = quantize_int4(w, G)
    p32 = p.view(torch.int32)
    y = torch.full((M, N), float("nan"), device=dev)
    ql._int4_gemv_kernel_w32[(triton.cdiv(N, block_n), M)](
        x, p32, s, z, y, N, K, x.stride(0), p32.stride(0), s.stride(0), y.stride(0), WPG=G // 8, GPT=gpt,
        BLOCK_N=block_n)
    torch.testing.assert_close(y, int4_linear_ref(x, p, s, z), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,M,N,K,block_n,tile", [("int8", 1, 37, 640, 16, 128), ("int8", 3, 40, 256, 32, 128),
                                                    ("int4", 1, 37, 640, 16, 1), ("int4", 5, 40, 2048, 32, 2)])
def test_tensor_core_gemv_kernels_equal_reference(dev, kind, M, N, K, block_n, tile):
    """The tl.dot forms (rows padded to 16; int4 one dot per nibble position over the words): equal to
    the dequantized reference up to the operands' 16-bit rounding (fp16 under the CPU interpreter,
    whose bf16 dot is wrong; bf16 on a GPU)."""
    import triton
    import triton.language as tl

    from kiln.kernels import quant_linear as ql

    torch.manual_seed(4)
    w, x = torch.randn(N, K, device=dev), torch.randn(M, K, device=dev)
    y = torch.full((M, N), float("nan"), device=dev)
    dt, tdt = (torch.float16, tl.float16) if dev.type == "cpu" else (torch.bfloat16, tl.bfloat16)
    if kind == "int8":
        q, s = quantize_int8(w)
        ql._int8_gemv_dot_kernel[(triton.cdiv(N, block_n),)](x, q, s, y, M, N, K, x.stride(0), q.stride(0), y.stride(0),
                                                             BLOCK_N=block_n, BLOCK_K=tile, DOT_DTYPE=tdt)
        want, tol = int8_linear_ref(x.to(dt).float(), q, s), 1e-5
    else:
        p, s, z = quantize_int4(w, 128)
        p32 = p.view(torch.int32)
        ql._int4_gemv_dot_kernel[(triton.cdiv(N, block_n),)](x, p32, s, z, y, M, N, K, x.stride(0), p32.stride(0),
                                                             s.stride(0), y.stride(0), WPG=16, GPT=tile,
                                                             BLOCK_N=block_n, DOT_DTYPE=tdt)
        want, tol = int4_linear_ref(x.to(dt).float(), p, s, z), 1e-3 if dt == torch.float16 else 8e-3
    rel = ((y - want).norm() / want.norm()).item()
    assert rel < tol, rel


def test_fastest_form_times_each_launchable_kind_once_and_keeps_the_choice(monkeypatch):
    """``tuned`` GEMVs choose among kernel kinds by timing each (after its own tile autotune); a kind
    whose launch fails is not a candidate; the choice is cached per (kind, N, K, M)."""
    import triton.testing

    from kiln.kernels import quant_linear as ql

    speed = {"slow": 3.0, "fast": 1.0, "broken": 0.1}
    calls = []

    def launcher(name):
        def launch():
            calls.append(name)
            return name != "broken"
        launch.name = name
        return launch

    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kw: speed[fn.name])
    monkeypatch.setattr(ql, "_FORM", {})
    forms = {n: launcher(n) for n in ("slow", "broken", "fast")}
    assert ql._fastest_form(("int8", 64, 128, 1), forms) == "fast"
    assert calls == ["slow", "broken", "fast"]
    assert ql._fastest_form(("int8", 64, 128, 1), {}) == "fast" and len(calls) == 3  # kept
    assert ql._fastest_form(("int8", 64, 128, 2), {"broken": launcher("broken")}) is None
    # with the output every launch writes: a fast kind that disagrees with the first is refused
    out = torch.zeros(4)

    def writer(name, value):
        def launch():
            out.fill_(value)
            return True
        launch.name = name
        return launch

    with pytest.warns(Warning, match="disagrees"):
        got = ql._fastest_form(("int8", 64, 128, 3), {"slow": writer("slow", 1.0), "fast": writer("fast", 1.5)}, out)
    assert got == "slow"
    assert ql._fastest_form(("int8", 64, 128, 4), {"slow": writer("slow", 1.0), "fast": writer("fast", 1.001)}, out) == "fast"
