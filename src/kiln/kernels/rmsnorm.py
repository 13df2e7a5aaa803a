"""Fused RMSNorm: reference, Triton forward/backward kernels, autograd wrapper.

y = x / sqrt(mean(x^2) + eps) * weight  (Zhang & Sennrich 2019, arXiv:1910.07467).

Statistics are in fp32 whatever the input dtype; y and dx come back in x's dtype. The forward saves
only rstd (one fp32 per row) beside x and weight, so the backward reads x, dy and writes dx: four
passes over an (N, D) tensor for forward+backward, the floor for this op. The weight gradient is
reduced in two steps without atomics (deterministic): each program of a persistent grid sums its
rows into one fp32 row of a (programs, D) buffer, and torch sums that buffer.
"""

from __future__ import annotations

import functools

import torch

from kiln.kernels._backend import (
    HAVE_TRITON,
    TRITON_INTERPRET,
    compiling,
    deterministic,
    unsupported_reason,
    warn_fallback,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

MAX_D = 32768  # one row must fit a block in registers; wider rows fall back
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """PyTorch reference. x (..., D), weight (D,) -> (..., D) in x's dtype; statistics in fp32."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (xf * rstd * weight.float()).to(x.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rmsnorm_fwd_kernel(
        X, W, Y, RSTD, n_rows, D, stride_x, stride_y, eps,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PPS: tl.constexpr,
    ):
        # One program normalizes ROWS rows of D columns (PPS: unused, shares the tuner's configs).
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_D)
        row_ok = rows < n_rows
        mask = row_ok[:, None] & (cols[None, :] < D)
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        w = tl.load(W + cols, mask=cols < D, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)  # (ROWS,)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + rows[:, None] * stride_y + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)

    @triton.jit
    def _rmsnorm_bwd_kernel(
        X, W, DY, DX, RSTD, DW_PARTIAL, n_rows, D, stride_x, stride_dy, stride_dx,
        ROWS: tl.constexpr, BLOCK_D: tl.constexpr, PPS: tl.constexpr,
    ):
        # Persistent grid: program p handles row blocks p, p + P, p + 2P, ... and accumulates its
        # share of dW in registers, written once to DW_PARTIAL[p]. The host sizes the grid (PPS per SM).
        pid = tl.program_id(0)
        n_programs = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_D)
        col_ok = cols < D
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
        n_blocks = tl.cdiv(n_rows, ROWS)
        for blk in range(pid, n_blocks, n_programs):
            rows = blk * ROWS + tl.arange(0, ROWS)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            g = dy * w[None, :]
            # dx = rstd * (g - xhat * mean(g * xhat))
            c = tl.sum(g * xhat, axis=1) / D
            dx = (g - xhat * c[:, None]) * rstd[:, None]
            tl.store(DX + rows[:, None] * stride_dx + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            dw += dy * xhat
        tl.store(DW_PARTIAL + pid * D + cols, tl.sum(dw, axis=0), mask=col_ok)


def _interpret_config(D: int) -> tuple[int, int, int]:
    """(BLOCK_D, ROWS, num_warps) under the interpreter: a few rows per program, to exercise masks."""
    return triton.next_power_of_2(D), 4, 4


def _configs(block_d: int, backward: bool) -> list:
    """Launch shapes to tune over: ROWS x BLOCK_D elements per program, 8..32 per thread (64 in
    the forward); the backward also picks its persistent grid size, PPS programs per SM. Narrow
    rows (BLOCK_D < 256) get one shape: 16 rows, 4 warps."""
    if block_d < 256:
        return [triton.Config({"ROWS": 16, "PPS": 2}, num_warps=4)]
    out = []
    for rows in (1, 2, 4, 8, 16):
        if rows * block_d > 16384 or (backward and rows > 8):
            continue
        for warps in (4, 8, 16):
            per_thread = rows * block_d // (32 * warps)
            if not 8 <= per_thread <= (32 if backward else 64):
                continue
            for pps in ((1, 2, 4) if backward else (1,)):
                out.append(triton.Config({"ROWS": rows, "PPS": pps}, num_warps=warps))
    return out or [triton.Config({"ROWS": 1, "PPS": 2}, num_warps=16)]


@functools.lru_cache(maxsize=None)
def _tuned(block_d: int, backward: bool):
    """The kernel autotuned (on the GPU) over :func:`_configs` for rows of width ``block_d``; the
    forward and backward only write their outputs, so running them while tuning is safe."""
    kernel = _rmsnorm_bwd_kernel if backward else _rmsnorm_fwd_kernel
    return triton.autotune(_configs(block_d, backward), key=["D"])(kernel)


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs exercise the persistent loop


def rmsnorm_forward(x2d: torch.Tensor, weight: torch.Tensor, eps: float,
                    out_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. x2d (N, D) with unit column stride -> (y (N, D) in ``out_dtype`` (default x's),
    rstd (N,) fp32)."""
    n, d = x2d.shape
    y = torch.empty_like(x2d, dtype=out_dtype or x2d.dtype)
    rstd = torch.empty(n, device=x2d.device, dtype=torch.float32)
    args = (x2d, weight, y, rstd, n, d, x2d.stride(0), y.stride(0), eps)
    if TRITON_INTERPRET:
        block_d, rows, warps = _interpret_config(d)
        _rmsnorm_fwd_kernel[(triton.cdiv(n, rows),)](*args, ROWS=rows, BLOCK_D=block_d, PPS=1, num_warps=warps)
    elif deterministic():  # one fixed config (the forward has no cross-row sum, but keep the plan simple)
        block_d = triton.next_power_of_2(d)
        c = _configs(block_d, False)[0]
        _rmsnorm_fwd_kernel[(triton.cdiv(n, c.kwargs["ROWS"]),)](*args, BLOCK_D=block_d, **c.kwargs, num_warps=c.num_warps)
    else:
        block_d = triton.next_power_of_2(d)
        _tuned(block_d, False)[lambda meta: (triton.cdiv(n, meta["ROWS"]),)](*args, BLOCK_D=block_d)
    return y, rstd


def rmsnorm_backward(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton backward. dy2d, x2d (N, D); rstd (N,) -> (dx (N, D) in x's dtype, dw (D,) in weight's dtype)."""
    n, d = x2d.shape
    dx = torch.empty_like(x2d)
    sms = _num_sms(x2d.device)
    block_d = triton.next_power_of_2(d)

    def n_programs(rows: int, pps: int) -> int:
        return max(1, min(triton.cdiv(n, rows), pps * sms))

    args = (x2d, weight, dy2d, dx, rstd)
    tail = (n, d, x2d.stride(0), dy2d.stride(0), dx.stride(0))
    if TRITON_INTERPRET:
        _, rows, warps = _interpret_config(d)
        used = n_programs(rows, 1)
        dw_partial = torch.empty((used, d), device=x2d.device, dtype=torch.float32)
        _rmsnorm_bwd_kernel[(used,)](*args, dw_partial, *tail, ROWS=rows, BLOCK_D=block_d, PPS=1, num_warps=warps)
    elif deterministic():  # one fixed config: the weight gradient's partial sums follow the grid it picks
        c = _configs(block_d, True)[0]
        used = n_programs(c.kwargs["ROWS"], c.kwargs["PPS"])
        dw_partial = torch.empty((used, d), device=x2d.device, dtype=torch.float32)
        _rmsnorm_bwd_kernel[(used,)](*args, dw_partial, *tail, BLOCK_D=block_d, **c.kwargs, num_warps=c.num_warps)
    else:
        tuned = _tuned(block_d, True)
        most = max(1, min(n, 4 * sms))  # every config has PPS <= 4 and ROWS >= 1
        dw_partial = torch.empty((most, d), device=x2d.device, dtype=torch.float32)
        tuned[lambda meta: (n_programs(meta["ROWS"], meta["PPS"]),)](*args, dw_partial, *tail, BLOCK_D=block_d)
        # The launch just made used the tuner's chosen config; only its programs' rows are valid.
        best = tuned.best_config.kwargs
        used = n_programs(best["ROWS"], best["PPS"])
    return dx, dw_partial[:used].sum(0).to(weight.dtype)


# Custom ops make the launches opaque to torch.compile: the graph calls them as black boxes (no
# graph break, and the autotuner runs at run time, never while tracing). Defining them registers
# two names in torch's op registry under "kiln::"; nothing else happens at import.
@torch.library.custom_op("kiln::rmsnorm_fwd", mutates_args=())
def _rmsnorm_fwd_op(x2d: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_forward(x2d, weight, eps)


@_rmsnorm_fwd_op.register_fake
def _(x2d, weight, eps):
    return torch.empty_like(x2d), x2d.new_empty((x2d.shape[0],), dtype=torch.float32)


@torch.library.custom_op("kiln::rmsnorm_bwd", mutates_args=())
def _rmsnorm_bwd_op(
    dy2d: torch.Tensor, x2d: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return rmsnorm_backward(dy2d, x2d, weight, rstd)


@_rmsnorm_bwd_op.register_fake
def _(dy2d, x2d, weight, rstd):
    return torch.empty_like(x2d), torch.empty_like(weight)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float,  # type: ignore[override]
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        if x2d.stride(-1) != 1:
            x2d = x2d.contiguous()
        if compiling():
            y, rstd = _rmsnorm_fwd_op(x2d, weight, eps)
            y = y if out_dtype is None else y.to(out_dtype)
        else:
            y, rstd = rmsnorm_forward(x2d, weight, eps, out_dtype)
        ctx.save_for_backward(x2d, weight, rstd)
        return y.view(shape)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):  # type: ignore[override]
        x2d, weight, rstd = ctx.saved_tensors
        dy2d = dy.reshape(-1, x2d.shape[-1])
        if dy2d.stride(-1) != 1:
            dy2d = dy2d.contiguous()
        dx, dw = (_rmsnorm_bwd_op if compiling() else rmsnorm_backward)(dy2d, x2d, weight, rstd)
        return dx.view(dy.shape), dw, None, None


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Fused RMSNorm with autograd. x (..., D), weight (D,) -> (..., D) in ``out_dtype`` (default x's).

    ``out_dtype`` (e.g. autocast's bf16 for a norm that feeds only a matmul): the result rounded once
    in the kernel, the values a separate cast would give, one launch fewer each way; dx stays in x's
    dtype. Runs the Triton kernels on CUDA (or CPU under TRITON_INTERPRET=1) for fp32/fp16/bf16 x
    with D <= 32768; anything else warns once and runs :func:`rmsnorm_ref`.
    """
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise ValueError(f"rmsnorm: weight {tuple(weight.shape)} must be ({x.shape[-1]},) for x {tuple(x.shape)}")
    reason = unsupported_reason(x, weight)
    if reason is None:
        if x.dtype not in SUPPORTED_DTYPES or weight.dtype not in SUPPORTED_DTYPES:
            reason = f"dtype x {x.dtype}, weight {weight.dtype} (supported: fp32, fp16, bf16)"
        elif x.shape[-1] > MAX_D:
            reason = f"D={x.shape[-1]} > {MAX_D}"
        elif x.numel() == 0:
            reason = "empty input"
    if reason is not None:
        warn_fallback("rmsnorm", reason)
        y = rmsnorm_ref(x, weight, eps)
        return y if out_dtype is None else y.to(out_dtype)
    return _RMSNormFunction.apply(x, weight.contiguous(), float(eps), out_dtype)
