"""FlashAttention-2 style attention: reference, Triton forward/backward kernels, autograd wrapper.

Tiled online softmax (Dao 2023, arXiv:2307.08691): the forward streams K/V blocks past a resident Q
block, keeps a running max and sum per row, and saves only O and the row logsumexp (fp32, base 2).
The backward recomputes P = exp2(S - lse) block by block, as FA2 does, in two kernels without
atomics: one program per Q block accumulates dQ (and first computes delta = rowsum(O * dO) for its
rows), then one program per K/V block accumulates dK and dV over the query blocks (and over the
query heads of its group for grouped-query attention).
Causal masking is applied only on the diagonal blocks; blocks above the diagonal are skipped.

Layout: q (B, H, T, D), k and v (B, H_kv, T, D) with H % H_kv == 0; any strides with a unit last
stride (so ``x.view(B, T, H, D).transpose(1, 2)`` needs no copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln.kernels._backend import (
    HAVE_TRITON,
    TRITON_INTERPRET,
    compiling,
    deterministic,
    distinct_inputs,
    unsupported_reason,
    warn_fallback,
)

if HAVE_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
LOG2E = 1.4426950408889634


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """PyTorch reference. q (B, H, Tq, D), k/v (B, H_kv, Tk, D) -> (B, H, Tq, D).

    Causal masking is bottom-right aligned (query i sees keys j <= i + Tk - Tq), which is the usual
    self-attention mask when Tq == Tk and the right one for decoding with a KV cache.
    """
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    tq, tk = q.shape[2], k.shape[2]
    if not causal:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if tq == tk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    i = torch.arange(tq, device=q.device)[:, None]
    j = torch.arange(tk, device=q.device)[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=j <= i + (tk - tq), scale=scale)


if HAVE_TRITON:

    @triton.jit
    def _load_kv_block(K_base, V_base, stride_kt, stride_vt, offs_n, offs_d, T, BOUNDS_MASK: tl.constexpr):
        """The (BLOCK_N, D) tiles of K and V at key positions ``offs_n`` (zeros past ``T``)."""
        k_ptrs = K_base + offs_n[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = V_base + offs_n[:, None] * stride_vt + offs_d[None, :]
        if BOUNDS_MASK:
            kv_ok = offs_n < T
            k = tl.load(k_ptrs, mask=kv_ok[:, None], other=0.0)
            v = tl.load(v_ptrs, mask=kv_ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        return k, v

    @triton.jit
    def _fwd_inner(
        acc, l_i, m_i, q, K_base, V_base, stride_kt, stride_vt, offs_m, offs_d, lo, hi, T, qk_scale,
        BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v = _load_kv_block(K_base, V_base, stride_kt, stride_vt, offs_n, offs_d, T, BOUNDS_MASK)
            s = tl.dot(q, tl.trans(k)) * qk_scale  # (BLOCK_M, BLOCK_N), log2 units
            if CAUSAL_MASK:
                s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            if BOUNDS_MASK:
                s = tl.where((offs_n < T)[None, :], s, float("-inf"))
            # Every row sees key 0 in the first block it processes, so m_new is finite: no NaN.
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])  # accumulate in the MMA
            m_i = m_new
        return acc, l_i, m_i

    @triton.jit(do_not_specialize=["T"])  # one compile for every sequence length
    def _attn_fwd_kernel(
        Q, K, V, O, LSE,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
        H, T, GROUP, qk_scale,
        HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Causal work grows with the query block: hand out the last (heaviest) blocks first so the
        # light ones fill the tail of the grid.
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M if CAUSAL else tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_D)
        q_ok = offs_m < T
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        K_base = K + b * skb + hk * skh
        V_base = V + b * svb + hk * svh
        m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, HEAD_D), dtype=tl.float32)
        if CAUSAL:
            # Blocks left of the diagonal need no mask (start_m < T, so they are in bounds) ...
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, skt, svt, offs_m, offs_d,
                                       0, start_m, T, qk_scale, BLOCK_N, False, False)
            # ... the diagonal blocks get the causal and the bounds mask.
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, skt, svt, offs_m, offs_d,
                                       start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale,
                                       BLOCK_N, True, True)
        else:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K_base, V_base, skt, svt, offs_m, offs_d,
                                       0, T, T, qk_scale, BLOCK_N, False, True)
        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=q_ok[:, None])
        tl.store(LSE + bh * T + offs_m, m_i + tl.math.log2(l_i), mask=q_ok)

    @triton.jit
    def _bwd_dkdv_inner(
        dk, dv, k, v, Q_base, DO_base, LSE_base, D_base, sqt, sdot, offs_n, offs_d, lo, hi, T, qk_scale,
        BLOCK_M: tl.constexpr, CAUSAL_MASK: tl.constexpr,
    ):
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_ok = offs_m < T
            q = tl.load(Q_base + offs_m[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            do = tl.load(DO_base + offs_m[:, None] * sdot + offs_d[None, :], mask=q_ok[:, None], other=0.0)
            # Rows past T get lse = +inf, hence P = 0: they add nothing.
            lse = tl.load(LSE_base + offs_m, mask=q_ok, other=float("inf"))
            delta = tl.load(D_base + offs_m, mask=q_ok, other=0.0)
            s_t = tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :]  # (BLOCK_N, BLOCK_M), log2 units
            if CAUSAL_MASK:  # mask before exp2: masked scores may exceed lse and overflow
                s_t = tl.where(offs_m[None, :] >= offs_n[:, None], s_t, float("-inf"))
            p_t = tl.math.exp2(s_t)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        return dk, dv

    @triton.jit(do_not_specialize=["T"])  # one compile for every sequence length
    def _attn_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
        sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
        H, HKV, T, GROUP, qk_scale, sm_scale,
        HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        start_n = tl.program_id(0) * BLOCK_N
        bhk = tl.program_id(1)
        b = bhk // HKV
        hk = bhk % HKV
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D)
        kv_ok = offs_n < T
        k = tl.load(K + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svt + offs_d[None, :], mask=kv_ok[:, None], other=0.0)
        dk = tl.zeros((BLOCK_N, HEAD_D), dtype=tl.float32)
        dv = tl.zeros((BLOCK_N, HEAD_D), dtype=tl.float32)
        for g in range(0, GROUP):  # the query heads sharing this K/V head
            h = hk * GROUP + g
            Q_base = Q + b * sqb + h * sqh
            DO_base = DO + b * sdob + h * sdoh
            LSE_base = LSE + (b * H + h) * T
            D_base = DELTA + (b * H + h) * T
            if CAUSAL:
                # Query blocks on the diagonal need the mask; those below it do not.
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, D_base, sqt, sdot, offs_n,
                                         offs_d, start_n, start_n + BLOCK_N, T, qk_scale, BLOCK_M, True)
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, D_base, sqt, sdot, offs_n,
                                         offs_d, start_n + BLOCK_N, T, T, qk_scale, BLOCK_M, False)
            else:
                dk, dv = _bwd_dkdv_inner(dk, dv, k, v, Q_base, DO_base, LSE_base, D_base, sqt, sdot, offs_n,
                                         offs_d, 0, T, T, qk_scale, BLOCK_M, False)
        dk = dk * sm_scale
        tl.store(DK + b * sdkb + hk * sdkh + offs_n[:, None] * sdkt + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_ok[:, None])
        tl.store(DV + b * sdvb + hk * sdvh + offs_n[:, None] * sdvt + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_ok[:, None])

    @triton.jit
    def _bwd_dq_inner(
        dq, q, do, lse, delta, K_base, V_base, skt, svt, offs_m, offs_d, lo, hi, T, qk_scale,
        BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr, BOUNDS_MASK: tl.constexpr,
    ):
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            k, v = _load_kv_block(K_base, V_base, skt, svt, offs_n, offs_d, T, BOUNDS_MASK)
            s = tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]  # (BLOCK_M, BLOCK_N), log2 units
            if CAUSAL_MASK:  # mask before exp2: masked scores may exceed lse and overflow
                s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            if BOUNDS_MASK:
                s = tl.where((offs_n < T)[None, :], s, float("-inf"))
            p = tl.math.exp2(s)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        return dq

    @triton.jit(do_not_specialize=["T"])  # one compile for every sequence length
    def _attn_bwd_dq_kernel(
        Q, K, V, O, DO, LSE, DELTA, DQ,
        sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sdob, sdoh, sdot, sdqb, sdqh, sdqt,
        H, T, GROUP, qk_scale, sm_scale,
        HEAD_D: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        # Causal work grows with the query block: hand out the last (heaviest) blocks first so the
        # light ones fill the tail of the grid.
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M if CAUSAL else tl.program_id(0) * BLOCK_M
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        hk = h // GROUP
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_D)
        q_ok = offs_m < T
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqt + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdot + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=q_ok, other=float("inf"))
        # delta_i = sum_d O_id dO_id = rowsum(P * dP), the softmax-backward correction. Computed
        # here (this kernel runs first) and stored for the dK/dV kernel: no separate launch.
        o = tl.load(O + b * sob + h * soh + offs_m[:, None] * sot + offs_d[None, :], mask=q_ok[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
        tl.store(DELTA + bh * T + offs_m, delta, mask=q_ok)
        K_base = K + b * skb + hk * skh
        V_base = V + b * svb + hk * svh
        dq = tl.zeros((BLOCK_M, HEAD_D), dtype=tl.float32)
        if CAUSAL:
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, skt, svt, offs_m, offs_d,
                               0, start_m, T, qk_scale, BLOCK_N, False, False)
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, skt, svt, offs_m, offs_d,
                               start_m, tl.minimum(start_m + BLOCK_M, T), T, qk_scale, BLOCK_N, True, True)
        else:
            dq = _bwd_dq_inner(dq, q, do, lse, delta, K_base, V_base, skt, svt, offs_m, offs_d,
                               0, T, T, qk_scale, BLOCK_N, False, True)
        dq = dq * sm_scale
        tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqt + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_ok[:, None])

    def _configs(pairs: list[tuple[int, int, int, int]]) -> list:
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in pairs]

    # Autotuned on the GPU (all three kernels only write their outputs, so re-running them while
    # tuning is safe); fixed small blocks under the interpreter, where tuning would only cost time.
    # Shapes respect the loop structure: forward and dQ need BLOCK_M % BLOCK_N == 0, dK/dV the reverse.
    _FWD_CONFIGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3),
                    (128, 64, 4, 4), (128, 128, 8, 2), (128, 32, 4, 3), (64, 32, 4, 4)]
    _DQ_CONFIGS = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3),
                   (128, 32, 4, 5), (128, 32, 8, 3), (128, 64, 4, 3)]
    _DKDV_CONFIGS = [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3),
                     (32, 128, 4, 5), (32, 128, 8, 3), (64, 128, 4, 3),
                     (64, 128, 8, 2), (64, 128, 8, 4), (32, 128, 8, 4), (64, 64, 8, 3)]
    if TRITON_INTERPRET:
        _fwd_launch = _attn_fwd_kernel
        _dq_launch = _attn_bwd_dq_kernel
        _dkdv_launch = _attn_bwd_dkdv_kernel
    else:
        _key = ["T", "HEAD_D", "CAUSAL"]
        _fwd_launch = triton.autotune(_configs(_FWD_CONFIGS), key=_key)(_attn_fwd_kernel)
        _dq_launch = triton.autotune(_configs(_DQ_CONFIGS), key=_key)(_attn_bwd_dq_kernel)
        _dkdv_launch = triton.autotune(_configs(_DKDV_CONFIGS), key=_key)(_attn_bwd_dkdv_kernel)

_INTERPRET_BLOCKS = {"fwd": (32, 16), "dq": (32, 16), "dkdv": (16, 32)}  # (BLOCK_M, BLOCK_N)
_SHORT_BLOCKS = {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)}
SHORT_T = 512  # below this, one fixed launch shape: tuning would cost more than it saves


def _launcher(kind: str, T: int):
    """(kernel, extra launch kwargs): the plain kernel with fixed blocks under the interpreter and
    for short sequences, else the autotuned wrapper (which supplies blocks, warps and stages)."""
    plain = {"fwd": _attn_fwd_kernel, "dq": _attn_bwd_dq_kernel, "dkdv": _attn_bwd_dkdv_kernel}[kind]
    if TRITON_INTERPRET:
        m, n = _INTERPRET_BLOCKS[kind]
        return plain, {"BLOCK_M": m, "BLOCK_N": n}
    if T < SHORT_T:
        m, n = _SHORT_BLOCKS[kind]
        return plain, {"BLOCK_M": m, "BLOCK_N": n, "num_warps": 4, "num_stages": 2}
    if deterministic():  # the first (hand-picked) config: a tuner's choice may differ between runs
        m, n, w, s = {"fwd": _FWD_CONFIGS, "dq": _DQ_CONFIGS, "dkdv": _DKDV_CONFIGS}[kind][0]
        return plain, {"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": s}
    return {"fwd": _fwd_launch, "dq": _dq_launch, "dkdv": _dkdv_launch}[kind], {}


def attention_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton forward. q (B, H, T, D), k/v (B, H_kv, T, D) -> (o (B, H, T, D), lse (B, H, T) fp32, base 2)."""
    B, H, T, D = q.shape
    group = H // k.shape[1]
    o = torch.empty((B, H, T, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    kernel, launch = _launcher("fwd", T)
    kernel[grid](
        q, k, v, o, lse,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3],
        H, T, group, scale * LOG2E,
        HEAD_D=D, CAUSAL=causal, **launch,
    )
    return o, lse


def attention_backward(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton backward: dO (B, H, T, D) and the forward's tensors -> dq (B, H, T, D), dk, dv (B, H_kv, T, D)."""
    B, H, T, D = q.shape
    hkv = k.shape[1]
    group = H // hkv
    if do.stride(-1) != 1:
        do = do.contiguous()
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)  # written by the dQ kernel
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    qk_scale = scale * LOG2E

    def grid_q(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(T, meta["BLOCK_M"]), B * H)

    kernel, launch = _launcher("dq", T)
    kernel[grid_q](
        q, k, v, o, do, lse, delta, dq,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *o.stride()[:3], *do.stride()[:3], *dq.stride()[:3],
        H, T, group, qk_scale, scale,
        HEAD_D=D, CAUSAL=causal, **launch,
    )

    def grid_kv(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(T, meta["BLOCK_N"]), B * hkv)

    kernel, launch = _launcher("dkdv", T)
    kernel[grid_kv](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *do.stride()[:3], *dk.stride()[:3], *dv.stride()[:3],
        H, hkv, T, group, qk_scale, scale,
        HEAD_D=D, CAUSAL=causal, **launch,
    )
    return dq, dk, dv


# Custom ops: opaque to torch.compile (no graph break; autotuning at run time, never while tracing).
@torch.library.custom_op("kiln::flash_attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return attention_forward(q, k, v, causal, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, scale):
    B, H, T, D = q.shape
    return q.new_empty((B, H, T, D)), q.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("kiln::flash_attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    causal: bool, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return attention_backward(do, q, k, v, o, lse, causal, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, causal, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


class _FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):  # type: ignore[override]
        o, lse = (_attention_fwd_op if compiling() else attention_forward)(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal = causal
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):  # type: ignore[override]
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (_attention_bwd_op if compiling() else attention_backward)(do, q, k, v, o, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


def flash_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, scale: float | None = None
) -> torch.Tensor:
    """Attention with autograd. q (B, H, T, D), k/v (B, H_kv, T, D), H % H_kv == 0 -> (B, H, T, D).

    ``scale`` defaults to 1/sqrt(D). Runs the Triton kernels for bf16/fp16/fp32 with D in
    {16, 32, 64, 128} and equal query and key lengths; anything else warns once and runs
    :func:`attention_ref` (same mask convention).
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"flash_attention: q, k, v must be 4-D (B, H, T, D); got {q.dim()}, {k.dim()}, {v.dim()}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"flash_attention: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree")
    if q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"flash_attention: {q.shape[1]} query heads are not a multiple of {k.shape[1]} KV heads")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    reason = unsupported_reason(q, k, v)
    if reason is None:
        if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
            reason = f"dtypes q {q.dtype}, k {k.dtype}, v {v.dtype} (supported: one of bf16, fp16, fp32)"
        elif q.shape[-1] not in SUPPORTED_HEAD_DIMS:
            reason = f"head dim {q.shape[-1]} (supported: {SUPPORTED_HEAD_DIMS})"
        elif q.shape[2] != k.shape[2]:
            reason = f"query length {q.shape[2]} != key length {k.shape[2]} (KV-cache decoding)"
        elif q.numel() == 0:
            reason = "empty input"
    if reason is not None:
        warn_fallback("flash_attention", reason)
        return attention_ref(q, k, v, causal=causal, scale=scale)
    q, k, v = distinct_inputs(*(t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v)))
    return _FlashAttentionFunction.apply(q, k, v, bool(causal), float(scale))
