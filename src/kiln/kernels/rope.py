"""Fused rotary position embedding of the queries and keys: reference, Triton kernel, autograd wrapper.

``y = x * cos + rotate_half(x) * sin`` (RoPE, Su et al., arXiv:2104.09864; Llama's "rotate_half"
pairing of channel i with channel i + D/2), applied to q (B, T, H, D) and k (B, T, Hkv, D) at
``positions`` (T,) or (B, T). Why a kernel: in eager mode the PyTorch formula is ~19 launches per
layer in the forward (two table gathers and two casts per tensor, then mul, neg, cat, mul, add for
each of q and k) and ~16 in the backward. A small model's training step on an H100 is bound by the
host's launches, not by the GPU (docs/LOG.md, 2026-12-07, "DPO"), so one launch forward and one
backward for q and k together is what the fusion buys; the arithmetic is a few FLOPs per element.

The backward of a rotation by the angle a is the rotation by -a: ``dx1 = dy1 c + dy2 s``,
``dx2 = dy2 c - dy1 s``; the same kernel with the sine's sign flipped. Math in fp32, each output
rounded once to the input's dtype (the eager formula under autocast rounds after every op, so bf16
results differ from it by about one bf16 ulp). No autotuning: one launch shape, so the first call
costs one compilation and runs reproduce bitwise.
"""

from __future__ import annotations

import torch

from kiln.kernels._backend import HAVE_TRITON, compiling, unsupported_reason, warn_fallback

if HAVE_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """PyTorch reference: x (B, T, H, D) rotated at ``positions`` (T,) or (B, T); cos, sin (S, D) tables
    with the D/2 frequencies repeated twice (``cat(f, f)``). Math in fp32, result in x's dtype."""
    c = cos[positions].float()  # (T, D) or (B, T, D)
    s = sin[positions].float()
    c, s = (c[:, None], s[:, None]) if c.ndim == 2 else (c[:, :, None], s[:, :, None])  # broadcast over heads
    xf = x.float()
    half = x.shape[-1] // 2
    rot = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * c + rot * s).to(x.dtype)


if HAVE_TRITON:

    @triton.jit
    def _rotate_rows(X, Y, b, t, c, s, n_heads, half, sxb, sxt, sxh,
                     BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
        # Every head of token (b, t) of one tensor: (n_heads, D), rotated by the angles (c, s) of its
        # position, into Y: that token's (n_heads, D) block of a contiguous output.
        j = tl.arange(0, BLOCK_HALF)
        h = tl.arange(0, BLOCK_H)
        m = (h[:, None] < n_heads) & (j[None, :] < half)
        xo = X + b.to(tl.int64) * sxb + t.to(tl.int64) * sxt + h[:, None] * sxh + j[None, :]
        yo = Y + h[:, None] * (2 * half) + j[None, :]
        x1 = tl.load(xo, mask=m, other=0.0).to(tl.float32)
        x2 = tl.load(xo + half, mask=m, other=0.0).to(tl.float32)
        tl.store(yo, (x1 * c[None, :] - x2 * s[None, :]).to(Y.dtype.element_ty), mask=m)
        tl.store(yo + half, (x2 * c[None, :] + x1 * s[None, :]).to(Y.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["T"])  # one binary whatever the batch's length
    def _rope_kernel(
        Q, K, QO, KO, COS, SIN, POS, H, HK, T, half,
        sqb, sqt, sqh, skb, skt, skh, spb, s_tab, sign,
        BLOCK_H: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    ):
        # One program rotates every query and key head of one token (b, t); the table row is read once.
        row = tl.program_id(0)
        b = row // T
        t = row - b * T
        pos = tl.load(POS + b * spb + t)
        j = tl.arange(0, BLOCK_HALF)
        jm = j < half
        c = tl.load(COS + pos * s_tab + j, mask=jm, other=0.0).to(tl.float32)
        s = tl.load(SIN + pos * s_tab + j, mask=jm, other=0.0).to(tl.float32) * sign
        _rotate_rows(Q, QO + row.to(tl.int64) * H * 2 * half, b, t, c, s, H, half, sqb, sqt, sqh, BLOCK_H, BLOCK_HALF)
        _rotate_rows(K, KO + row.to(tl.int64) * HK * 2 * half, b, t, c, s, HK, half, skb, skt, skh, BLOCK_HK, BLOCK_HALF)


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
            sign: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, H, D), k (B, T, Hkv, D), each with unit stride over D -> rotated copies, contiguous;
    ``sign`` -1 rotates back (the backward)."""
    B, T, H, D = q.shape
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    if pos.stride(-1) != 1:
        pos = pos.contiguous()
    qo, ko = torch.empty(q.shape, device=q.device, dtype=q.dtype), torch.empty(k.shape, device=k.device, dtype=k.dtype)
    spb = pos.stride(0) if pos.ndim == 2 else 0  # (T,) positions: the same row for every batch entry
    Hk = k.shape[2]
    _rope_kernel[(B * T,)](q, k, qo, ko, cos, sin, pos, H, Hk, T, D // 2, q.stride(0), q.stride(1), q.stride(2),
                           k.stride(0), k.stride(1), k.stride(2), spb, cos.stride(0), sign,
                           BLOCK_H=triton.next_power_of_2(H), BLOCK_HK=triton.next_power_of_2(Hk),
                           BLOCK_HALF=triton.next_power_of_2(D // 2), num_warps=4 if H * D >= 2048 else 2)
    return qo, ko


class _RopeQK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin, pos):  # type: ignore[override]
        ctx.save_for_backward(cos, sin, pos)
        return _launch(q, k, cos, sin, pos, 1.0)

    @staticmethod
    def backward(ctx, dq, dk):  # type: ignore[override]
        cos, sin, pos = ctx.saved_tensors
        return (*_launch(dq, dk, cos, sin, pos, -1.0), None, None, None)


def rope_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q (B, T, H, D) and k (B, T, Hkv, D) at ``positions`` (T,) or (B, T) long, with autograd.

    ``cos``, ``sin``: (S, D) fp32 tables (``RotaryEmbedding``'s buffers), S > every position. Returns
    (B, T, H, D) and (B, T, Hkv, D), contiguous, in q's and k's dtypes. Runs the Triton kernel on CUDA
    (or CPU under TRITON_INTERPRET=1); under torch.compile, or where the kernel cannot run (one
    warning), :func:`rope_ref`, which Inductor fuses by itself.
    """
    if q.ndim != 4 or k.ndim != 4 or q.shape[-1] % 2 or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"rope_qk: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, heads, D) with even D")
    if compiling():
        return rope_ref(q, cos, sin, positions), rope_ref(k, cos, sin, positions)
    reason = unsupported_reason(q, k, cos, sin, positions)
    if reason is None and not all(t.dtype in SUPPORTED_DTYPES for t in (q, k)):
        reason = f"dtype q {q.dtype}, k {k.dtype} (supported: fp32, fp16, bf16)"
    if reason is None and (cos.stride(-1) != 1 or sin.stride() != cos.stride()):
        reason = "cos/sin tables must share strides with a unit last stride"
    if reason is not None:
        warn_fallback("rope", reason)
        return rope_ref(q, cos, sin, positions), rope_ref(k, cos, sin, positions)
    return _RopeQK.apply(q, k, cos, sin, positions)
