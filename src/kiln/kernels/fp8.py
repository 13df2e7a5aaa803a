"""FP8 linear layer: ``y = x @ W^T`` with all three GEMMs of training in float8 (e4m3).

Hopper tensor cores multiply float8 at twice the bf16 rate (1979 vs 989 TFLOP/s dense on an H100
SXM). This module quantizes the operands of each GEMM on the fly, multiplies with
``torch._scaled_mm`` (cuBLASLt), and keeps everything else in bf16/fp32:

=========  =============================  ======================  ===========================
GEMM       computes                        left operand, scales     right operand, scales
=========  =============================  ======================  ===========================
forward    y  (M,N) = x (M,K) @ W^T        x, one per row (M)       W, one per output row (N)
dgrad      dx (M,K) = dy (M,N) @ W         dy, one per row (M)      W, one per input column (K)
wgrad      dW (N,K) = dy^T (N,M) @ x       dy, one per column (N)   x, one per column (K)
=========  =============================  ======================  ===========================

Every scale is taken along the GEMM's reduction dimension ("row-wise" scaling), so one outlier
token or channel costs precision only in its own row. A scale is ``amax / 448`` (448: the largest
e4m3 value), so each row uses the whole e4m3 range; ``_scaled_mm`` multiplies the scales back in
its epilogue. e4m3 (3 mantissa bits, range +-448) is used for gradients too: with a scale per
row, the range e5m2 would add is not needed. This is the recipe torchao calls "rowwise" (all three
GEMMs float8, row-wise scales), written here from the formulas above.

What is kept in higher precision: the saved activation ``x`` (bf16, as a bf16 linear saves it:
the wgrad needs it scaled along a different axis than the forward did), the weight (fp32 master
copy, quantized fresh every step), the outputs (bf16 under autocast), and ``dW`` (returned in the
weight's dtype). Under ``torch.compile`` Inductor fuses each quantization (abs-max reduction,
divide, clamp, cast, and the transposed copy the GEMM layout needs) into one or two kernels.

Where it cannot run (a GPU before sm_89, a dimension not a multiple of 16, a dtype other than
fp32/bf16/fp16), :func:`fp8_linear` warns once and returns :func:`fp8_linear_ref`, the plain
matmul. On the CPU, ``_scaled_mm`` takes row-wise scales from torch 2.13 on (slowly, for tests:
the same numerics as on the GPU); an older torch's CPU build falls back the same way.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.kernels._backend import _capability, warn_fallback

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
_EPS = 1e-12  # floor of amax: an all-zero row gets a tiny scale, not a division by zero


def quantize_rows(t: Tensor) -> tuple[Tensor, Tensor]:
    """Row-wise e4m3 quantization of a 2-D tensor: ``(q, scale)`` with ``q`` (R,C) float8 in row-major
    order and ``scale`` (R,1) fp32 such that ``q.float() * scale`` approximates ``t``."""
    tf = t.float()
    scale = tf.abs().amax(dim=1, keepdim=True).clamp(min=_EPS) / E4M3_MAX  # (R,1)
    q = (tf / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).contiguous()  # contiguous: t may be a transposed view
    return q, scale


def _out_dtype(x: Tensor) -> torch.dtype:
    """The dtype a bf16 linear would produce here: autocast's if it is on, else the input's."""
    dt = x.device.type
    if torch.is_autocast_enabled(dt):
        return torch.get_autocast_dtype(dt)
    return x.dtype


def _mm(a_q: Tensor, a_scale: Tensor, b_q: Tensor, b_scale: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``(a_q * a_scale) @ (b_q * b_scale)^T``: a_q (M,K), b_q (N,K), both row-major float8; scales
    (M,1) and (N,1). ``_scaled_mm`` wants its right operand column-major: ``b_q.t()`` is."""
    # cuBLASLt's row-wise kernels produce bf16; other dtypes are a cast of that result.
    y = torch._scaled_mm(a_q, b_q.t(), scale_a=a_scale, scale_b=b_scale.t(), out_dtype=torch.bfloat16)
    return y if out_dtype == torch.bfloat16 else y.to(out_dtype)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: Tensor, weight: Tensor, out_dtype: torch.dtype) -> Tensor:
        """x2d (M,K), weight (N,K) -> (M,N) in ``out_dtype``."""
        x_q, x_s = quantize_rows(x2d)  # scales over K, one per token
        w_q, w_s = quantize_rows(weight)  # scales over K, one per output row
        ctx.save_for_backward(x2d, weight)
        return _mm(x_q, x_s, w_q, w_s, out_dtype)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x2d, weight = ctx.saved_tensors
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dy_q, dy_s = quantize_rows(dy)  # (M,N): scales over N, the reduction of dgrad
            wt_q, wt_s = quantize_rows(weight.t())  # (K,N): scales over N
            dx = _mm(dy_q, dy_s, wt_q, wt_s, x2d.dtype)  # (M,K)
        if ctx.needs_input_grad[1]:
            dyt_q, dyt_s = quantize_rows(dy.t())  # (N,M): scales over M, the reduction of wgrad
            xt_q, xt_s = quantize_rows(x2d.t())  # (K,M): scales over M
            dw = _mm(dyt_q, dyt_s, xt_q, xt_s, weight.dtype)  # (N,K)
        return dx, dw, None


def fp8_linear_ref(x: Tensor, weight: Tensor) -> Tensor:
    """The reference: ``x @ weight^T`` (what :class:`kiln.model.layers.Linear` computes)."""
    return torch.matmul(x, weight.t())


_CPU_ROWWISE: list[bool] = []  # probed once: does this torch's CPU _scaled_mm take row-wise scales?


def cpu_rowwise_supported() -> bool:
    """Whether ``torch._scaled_mm`` on the CPU accepts row-wise scales (torch 2.13's does; 2.11's
    asserts per-tensor scales only). Probed once with a 16x16 product."""
    if not _CPU_ROWWISE:
        a = torch.ones(16, 16).to(E4M3)
        try:
            torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
            _CPU_ROWWISE.append(True)
        except RuntimeError:
            _CPU_ROWWISE.append(False)
    return _CPU_ROWWISE[0]


def fp8_unsupported_reason(x: Tensor, weight: Tensor) -> str | None:
    """None if :func:`fp8_linear` can run on these tensors, else why not."""
    if x.device != weight.device:
        return f"x on {x.device}, weight on {weight.device}"
    ok = (torch.float32, torch.bfloat16, torch.float16)
    if x.dtype not in ok or weight.dtype not in ok:
        return f"dtypes {x.dtype} x {weight.dtype} (fp32, bf16 or fp16 expected)"
    m = x.numel() // max(x.shape[-1], 1)
    n, k = weight.shape
    if m % 16 or n % 16 or k % 16 or m == 0:
        return "every GEMM dimension (tokens, in, out features) must be a positive multiple of 16"
    if x.device.type == "cuda":
        if torch.version.hip is not None:
            return "ROCm: the row-wise float8 GEMM is written for cuBLASLt"
        if _capability(x.device.index) < (8, 9):
            return "GPU older than sm_89 (float8 tensor cores need Ada or Hopper)"
    elif x.device.type == "cpu":
        if not cpu_rowwise_supported():
            return f"torch {torch.__version__}'s CPU float8 GEMM has no row-wise scales (torch >= 2.13 has)"
    else:
        return f"device {x.device.type} has no float8 GEMM here"
    return None


def fp8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight^T`` with float8 GEMMs in forward and backward. x: (..., K); weight: (N, K);
    returns (..., N) in the dtype a bf16 linear would (autocast's, else x's). Falls back to
    :func:`fp8_linear_ref` with one warning where it cannot run (see :func:`fp8_unsupported_reason`)."""
    reason = fp8_unsupported_reason(x, weight)
    if reason is not None:
        warn_fallback("fp8_linear", reason)
        return fp8_linear_ref(x, weight)
    x2d = x.reshape(-1, x.shape[-1])
    y = _FP8Linear.apply(x2d, weight, _out_dtype(x))
    return y.reshape(*x.shape[:-1], weight.shape[0])
