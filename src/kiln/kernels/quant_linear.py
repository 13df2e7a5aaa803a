"""Weight-only quantized matrix-vector products for decoding: int8 per output channel and int4 per
group of input channels (as gpt-fast's ``WeightOnlyInt8Linear`` / ``WeightOnlyInt4Linear``; GPTQ's
and AWQ's group-wise layout, Frantar et al., arXiv:2210.17323).

At batch 1 a decode step reads every weight once and does two FLOPs per weight: it is bound by memory
bandwidth, so halving (int8) or quartering (int4) the bytes of the weights is the speed-up. The kernels
stream the compressed weights and dequantize in registers:

- int8: ``w[n, k] = q[n, k] * scale[n]``; q int8 (N, K), scale (N,). y = (x @ q^T) * scale.
- int4: ``w[n, k] = q[n, k] * scale[n, g] + low[n, g]``, g = k // group_size, q in [0, 15] packed two
  per byte along K (low nibble: even k), packed uint8 (N, K / 2), scale and low (N, K / group_size).
  Asymmetric (min/max) groups fit skewed rows better than symmetric ones at 4 bits.

Each GEMV program computes ``BLOCK_N`` outputs of one input row, walking K in ``BLOCK_K`` tiles. Rows
beyond ``GEMV_MAX_ROWS`` (prefill) dequantize the whole matrix and use a dense matmul instead: there
the weights are read once for many rows, so compression buys nothing.
"""

from __future__ import annotations

import warnings

import torch

from kiln.kernels._backend import HAVE_TRITON, KernelFallbackWarning, compiling, unsupported_reason, warn_fallback

if HAVE_TRITON:
    import triton
    import triton.language as tl

GEMV_MAX_ROWS = 8  # input rows up to which the streaming kernel beats dequantize + matmul


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: w (N, K) -> (q int8 (N, K), scale fp32 (N,))."""
    amax = w.float().abs().amax(dim=1).clamp_min(1e-8)
    scale = amax / 127.0
    q = torch.round(w.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale[:, None]).to(dtype)


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4: w (N, K) -> (packed uint8 (N, K/2), scale (N, G), low (N, G)) fp32,
    G = K / group_size. K must be divisible by group_size, and group_size even."""
    N, K = w.shape
    if K % group_size or group_size % 2:
        raise ValueError(f"int4: in_features {K} must be a multiple of an even group_size {group_size}")
    g = w.float().reshape(N, K // group_size, group_size)
    low, high = g.amin(dim=2), g.amax(dim=2)
    scale = ((high - low) / 15.0).clamp_min(1e-8)
    q = torch.round((g - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).reshape(N, K)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, scale, low


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    N = packed.shape[0]
    q = torch.stack((packed & 0xF, packed >> 4), dim=2).reshape(N, -1).float()  # (N, K)
    gs = q.shape[1] // scale.shape[1]
    w = q.reshape(N, -1, gs) * scale[..., None] + low[..., None]
    return w.reshape(N, -1).to(dtype)


def int8_linear_ref(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Reference: x (..., K) -> (..., N) in x's dtype, through the dequantized weight."""
    return x @ dequantize_int8(q, scale, x.dtype).t()


def int4_linear_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Reference: x (..., K) -> (..., N) in x's dtype, through the dequantized weight."""
    return x @ dequantize_int4(packed, scale, low, x.dtype).t()


def int8_linear_row(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The one-row form ``torch.compile`` fuses into a single reduction that reads the int8 bytes:
    (x @ q^T) * scale, the scale applied once per output (gpt-fast's ``WeightOnlyInt8Linear``; int8
    values are exact in bf16). x (..., K) -> (..., N) in x's dtype."""
    return ((x @ q.to(x.dtype).t()) * scale).to(x.dtype)


def int4_linear_row(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """The one-row form ``torch.compile`` fuses into one kernel reading the packed bytes: per group g,
    sum_k (q_k s + z) x_k = s * sum_k q_k x_k + z * sum_k x_k, with the low and high nibbles of each
    byte multiplied by the even and odd inputs. No (N, K) dequantized weight is ever built (the
    reference's ``dequantize_int4`` is: compiled, it materializes N x K floats every step).
    x (1, K) -> (1, N) in x's dtype; packed (N, K/2) uint8, scale and low (N, G) fp32."""
    N, G = scale.shape
    half = packed.shape[1] // G  # bytes per group
    p = packed.view(N, G, half)
    xg = x.float().reshape(G, half, 2)  # (G, half, even/odd)
    t = ((p & 0xF).float() * xg[..., 0] + (p >> 4).float() * xg[..., 1]).sum(-1)  # (N, G)
    y = (t * scale + low * xg.sum((-1, -2))).sum(-1)  # (N,)
    return y.reshape(*x.shape[:-1], N).to(x.dtype)


# Integer -> float conversions issue at a quarter of the integer-logic rate and an eighth of the FMA
# rate on Hopper (CUDA C programming guide, arithmetic instruction throughput), so a GEMV that streams
# one int8 weight (or two int4 ones) per byte spends its time converting, not loading. The kernels
# convert with a bit trick instead: OR a small integer u (< 2^23) into the mantissa of 2^23
# (0x4B000000) and the float is exactly 2^23 + u; one subtraction gives u. One logic op and one add
# per weight, both at full rate (8388608.0 below is 2^23).

if HAVE_TRITON:

    @triton.jit
    def _i8_to_f32(q):
        """int8 tile -> the same values in fp32, without an int->float conversion: the byte's bits
        b = q mod 256, and b ^ 0x80 = q + 128 in [0, 255], ORed into 2^23's mantissa."""
        b = q.to(tl.uint8, bitcast=True).to(tl.int32)
        return (b ^ 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0  # 2^23 + 128

    @triton.jit
    def _u4_to_f32(nib):
        """int32 tile of values in [0, 15] -> fp32, the same way."""
        return (nib | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0

    @triton.jit
    def _int8_gemv_tile(X, Q, m, n, n_ok, k0, K, stride_x, stride_q, acc, acc2,
                        BLOCK_K: tl.constexpr, ACC2D: tl.constexpr):
        """One BLOCK_K tile of the int8 GEMV's loop: acc (BLOCK_N,) or acc2 (BLOCK_N, BLOCK_K) updated."""
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        x = tl.load(X + m * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
        q = tl.load(Q + n[:, None] * stride_q + k[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0,
                    eviction_policy="evict_first")  # streamed once: keep x and the scales in cache
        if ACC2D:
            acc2 += _i8_to_f32(q) * x[None, :]
        else:
            acc += tl.sum(_i8_to_f32(q) * x[None, :], axis=1)
        return acc, acc2

    @triton.jit
    def _int8_gemv_kernel(X, Q, S, Y, N, K, stride_x, stride_q, stride_y,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, ACC2D: tl.constexpr = False,
                          STAGES: tl.constexpr = 0):
        # ACC2D: accumulate a (BLOCK_N, BLOCK_K) tile and reduce it once after the loop, instead of a
        # cross-thread reduction every iteration (more registers, no shuffles or barriers in the loop).
        # STAGES > 0: the loop software-pipelined that deep (tl.range's num_stages: the next tiles'
        # loads issued before this one's arithmetic), more bytes in flight per program.
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc2 = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        if STAGES > 0:
            for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
                acc, acc2 = _int8_gemv_tile(X, Q, m, n, n_ok, k0, K, stride_x, stride_q, acc, acc2, BLOCK_K, ACC2D)
        else:
            for k0 in range(0, K, BLOCK_K):
                acc, acc2 = _int8_gemv_tile(X, Q, m, n, n_ok, k0, K, stride_x, stride_q, acc, acc2, BLOCK_K, ACC2D)
        if ACC2D:
            acc = tl.sum(acc2, axis=1)
        s = tl.load(S + n, mask=n_ok, other=0.0)
        tl.store(Y + m * stride_y + n, (acc * s).to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int4_gemv_kernel(X, P, S, Z, Y, N, K, stride_x, stride_p, stride_s, stride_y,
                          HALF: tl.constexpr, GPT: tl.constexpr, BLOCK_N: tl.constexpr, ACC2D: tl.constexpr = False):
        """Each program: BLOCK_N outputs of one row, GPT groups of 2 * HALF inputs per iteration.
        Per group: s * sum_b (lo_b x_2b + hi_b x_2b+1) + z * sum(x): every packed byte is read once,
        each group's scale and offset once per output (not per weight). ACC2D: the per-byte terms,
        scaled, accumulate in a (BLOCK_N, GPT, HALF) tile reduced once after the loop (no reduction
        inside it, at one more multiply-add a byte)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        n_ok = n < N
        b = tl.arange(0, HALF)  # byte within a group
        t = tl.arange(0, GPT)  # group within the tile
        n_groups = K // (2 * HALF)
        acc = tl.zeros((BLOCK_N,), tl.float32)
        acc3 = tl.zeros((BLOCK_N, GPT, HALF), tl.float32)
        for g0 in range(0, n_groups, GPT):
            g = g0 + t
            g_ok = g < n_groups
            byte_idx = g[:, None] * HALF + b[None, :]  # (GPT, HALF) bytes; inputs 2 * byte_idx (+1)
            x_lo = tl.load(X + m * stride_x + 2 * byte_idx, mask=g_ok[:, None], other=0.0).to(tl.float32)
            x_hi = tl.load(X + m * stride_x + 2 * byte_idx + 1, mask=g_ok[:, None], other=0.0).to(tl.float32)
            w_ok = n_ok[:, None, None] & g_ok[None, :, None]
            byte = tl.load(P + n[:, None, None] * stride_p + byte_idx[None, :, :], mask=w_ok, other=0).to(tl.int32)
            prod = (_u4_to_f32(byte & 0xF) * x_lo[None, :, :]
                    + _u4_to_f32(byte >> 4) * x_hi[None, :, :])  # (BLOCK_N, GPT, HALF)
            sg_ok = n_ok[:, None] & g_ok[None, :]
            sc = tl.load(S + n[:, None] * stride_s + g[None, :], mask=sg_ok, other=0.0)
            lo = tl.load(Z + n[:, None] * stride_s + g[None, :], mask=sg_ok, other=0.0)
            if ACC2D:
                acc3 += sc[:, :, None] * prod + lo[:, :, None] * (x_lo + x_hi)[None, :, :]
            else:
                xsum = tl.sum(x_lo + x_hi, axis=1)  # (GPT,)
                acc += tl.sum(sc * tl.sum(prod, axis=2) + lo * xsum[None, :], axis=1)
        if ACC2D:
            acc = tl.sum(tl.sum(acc3, axis=2), axis=1)
        tl.store(Y + m * stride_y + n, acc.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _int8_gemv_dot_kernel(X, Q, S, Y, M, N, K, stride_x, stride_q, stride_y,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr = 3,
                              DOT_DTYPE: tl.constexpr = tl.bfloat16):
        """int8 through the tensor cores: the rows (up to 16, padded) times a (BLOCK_K, BLOCK_N) weight
        tile converted to bf16 in registers, ``tl.dot`` accumulating in fp32. The multiply-adds leave
        the CUDA cores, and the weight loads feed a dot, so Triton's pipeliner streams them
        asynchronously STAGES tiles ahead (cp.async into shared memory): bytes in flight without
        registers held. Each program: BLOCK_N outputs of every row. DOT_DTYPE: the operands' type,
        bf16 (fp16 only where Triton's CPU interpreter multiplies bf16 wrongly: tests)."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, 16)
        n_ok = n < N
        acc = tl.zeros((16, BLOCK_N), tl.float32)
        for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            x = tl.load(X + r[:, None] * stride_x + k[None, :], mask=(r < M)[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(Q + n[None, :] * stride_q + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0,
                        eviction_policy="evict_first")  # (BLOCK_K, BLOCK_N)
            acc = tl.dot(x.to(DOT_DTYPE), _i8_to_f32(q).to(DOT_DTYPE), acc)  # int8 values are exact in bf16
        s = tl.load(S + n, mask=n_ok, other=0.0)
        y = acc * s[None, :]
        tl.store(Y + r[:, None] * stride_y + n[None, :], y.to(Y.dtype.element_ty), mask=(r < M)[:, None] & n_ok[None, :])

    @triton.jit
    def _nib_term(w, MASK: tl.constexpr, SCALE: tl.constexpr, xi):
        """nib * x for the nibble of ``w`` under MASK (a nibble within bits 0-19): ORed into the mantissa
        of 1.0, minus 1.0, it is exactly nib * 2^(pos - 23); SCALE = 2^(23 - pos) undoes that on x's
        side (exact: a power of two). One logic op, one subtraction, one multiply-add a weight."""
        u = ((w & MASK) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
        return u * (xi * SCALE)[None, :, :]

    @triton.jit
    def _int4_gemv_kernel_w32(X, P, S, Z, Y, N, K, stride_x, stride_p, stride_s, stride_y,
                              WPG: tl.constexpr, GPT: tl.constexpr, BLOCK_N: tl.constexpr):
        """int4 with the packed bytes read as int32 words (P: (N, K / 8) int32; nibble i of word j is
        input k = 8 j + i, little-endian, the same bytes as ``quantize_int4``'s layout). Each program:
        BLOCK_N outputs of one row, GPT groups of WPG words per iteration. Per group:
        s * sum(nib x) + z * sum(x), with nib * x from ``_nib_term`` (nibbles 5-7 shifted down once a
        word): ~2 integer and ~4 float ops a byte, against ~5 and ~6 for ``_int4_gemv_kernel``."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        n_ok = n < N
        j = tl.arange(0, WPG)  # word within a group
        t = tl.arange(0, GPT)  # group within the tile
        n_groups = K // (8 * WPG)
        acc = tl.zeros((BLOCK_N, GPT, WPG), tl.float32)
        for g0 in range(0, n_groups, GPT):
            g = g0 + t
            g_ok = g < n_groups
            word = g[:, None] * WPG + j[None, :]  # (GPT, WPG)
            w = tl.load(P + n[:, None, None] * stride_p + word[None, :, :],
                        mask=n_ok[:, None, None] & g_ok[None, :, None], other=0, eviction_policy="evict_first")
            hi = w >> 12  # nibbles 5, 6, 7 to bits 8-19
            xp = X + m * stride_x + 8 * word  # (GPT, WPG): each word's first input
            x_ok = g_ok[:, None]
            x0 = tl.load(xp, mask=x_ok, other=0.0).to(tl.float32)
            x1 = tl.load(xp + 1, mask=x_ok, other=0.0).to(tl.float32)
            x2 = tl.load(xp + 2, mask=x_ok, other=0.0).to(tl.float32)
            x3 = tl.load(xp + 3, mask=x_ok, other=0.0).to(tl.float32)
            x4 = tl.load(xp + 4, mask=x_ok, other=0.0).to(tl.float32)
            x5 = tl.load(xp + 5, mask=x_ok, other=0.0).to(tl.float32)
            x6 = tl.load(xp + 6, mask=x_ok, other=0.0).to(tl.float32)
            x7 = tl.load(xp + 7, mask=x_ok, other=0.0).to(tl.float32)
            part = (_nib_term(w, 0xF, 8388608.0, x0) + _nib_term(w, 0xF0, 524288.0, x1)
                    + _nib_term(w, 0xF00, 32768.0, x2) + _nib_term(w, 0xF000, 2048.0, x3)
                    + _nib_term(w, 0xF0000, 128.0, x4) + _nib_term(hi, 0xF00, 32768.0, x5)
                    + _nib_term(hi, 0xF000, 2048.0, x6) + _nib_term(hi, 0xF0000, 128.0, x7))  # (BLOCK_N, GPT, WPG)
            xsum = x0 + x1 + x2 + x3 + x4 + x5 + x6 + x7  # (GPT, WPG)
            sg_ok = n_ok[:, None] & g_ok[None, :]
            sc = tl.load(S + n[:, None] * stride_s + g[None, :], mask=sg_ok, other=0.0)  # (BLOCK_N, GPT)
            lo = tl.load(Z + n[:, None] * stride_s + g[None, :], mask=sg_ok, other=0.0)
            acc += sc[:, :, None] * part + lo[:, :, None] * xsum[None, :, :]
        y = tl.sum(tl.sum(acc, axis=2), axis=1)
        tl.store(Y + m * stride_y + n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _nib_weight(w, MASK: tl.constexpr, SHIFT: tl.constexpr, sc, lo, DOT_DTYPE: tl.constexpr):
        """The dequantized weights s * nib + z of the nibble under MASK (at bit 23 - log2(SHIFT)):
        ``_nib_term``'s exact nib * 2^(pos - 23), times the scale carried up by SHIFT, plus the low."""
        u = ((w & MASK) | 0x3F800000).to(tl.float32, bitcast=True) - 1.0
        return (u * (sc * SHIFT) + lo).to(DOT_DTYPE)

    @triton.jit
    def _int4_gemv_dot_kernel(X, P, S, Z, Y, M, N, K, stride_x, stride_p, stride_s, stride_y,
                              WPG: tl.constexpr, GPT: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr = 3,
                              DOT_DTYPE: tl.constexpr = tl.bfloat16):
        """int4 through the tensor cores, as ``_int8_gemv_dot_kernel``: the packed bytes read as int32
        words (P (N, K / 8), as ``_int4_gemv_kernel_w32``), each word's 8 nibbles dequantized in
        registers to 8 (words, BLOCK_N) weight tiles, one ``tl.dot`` each against the inputs they
        multiply (k = 8 word + nibble). Rows up to 16; GPT groups of WPG words an iteration."""
        WORDS: tl.constexpr = GPT * WPG
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        r = tl.arange(0, 16)
        n_ok = n < N
        r_ok = r < M
        acc = tl.zeros((16, BLOCK_N), tl.float32)
        n_words = K // 8
        for w0 in tl.range(0, n_words, WORDS, num_stages=STAGES):
            word = w0 + tl.arange(0, WORDS)
            w_ok = word < n_words
            wt = tl.load(P + n[None, :] * stride_p + word[:, None], mask=w_ok[:, None] & n_ok[None, :], other=0,
                         eviction_policy="evict_first")  # (WORDS, BLOCK_N)
            hi = wt >> 12
            g = word // WPG  # each word's group
            sg_ok = w_ok[:, None] & n_ok[None, :]
            sc = tl.load(S + n[None, :] * stride_s + g[:, None], mask=sg_ok, other=0.0)  # (WORDS, BLOCK_N)
            lo = tl.load(Z + n[None, :] * stride_s + g[:, None], mask=sg_ok, other=0.0)
            xp = X + r[:, None] * stride_x + 8 * word[None, :]  # (16, WORDS)
            x_ok = r_ok[:, None] & w_ok[None, :]
            acc = tl.dot(tl.load(xp, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(wt, 0xF, 8388608.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 1, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(wt, 0xF0, 524288.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 2, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(wt, 0xF00, 32768.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 3, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(wt, 0xF000, 2048.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 4, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(wt, 0xF0000, 128.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 5, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(hi, 0xF00, 32768.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 6, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(hi, 0xF000, 2048.0, sc, lo, DOT_DTYPE), acc)
            acc = tl.dot(tl.load(xp + 7, mask=x_ok, other=0.0).to(DOT_DTYPE), _nib_weight(hi, 0xF0000, 128.0, sc, lo, DOT_DTYPE), acc)
        tl.store(Y + r[:, None] * stride_y + n[None, :], acc.to(Y.dtype.element_ty), mask=r_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _int4_gemv_kernel_any(X, P, S, Z, Y, N, K, stride_x, stride_p, stride_s, stride_y,
                              GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Any even group size (the tiled kernel needs group_size / 2 a power of two): per weight."""
        n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        m = tl.program_id(1)
        n_ok = n < N
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            mask = n_ok[:, None] & k_ok[None, :]
            x = tl.load(X + m * stride_x + k, mask=k_ok, other=0.0).to(tl.float32)
            byte = tl.load(P + n[:, None] * stride_p + (k // 2)[None, :], mask=mask, other=0).to(tl.int32)
            q = (byte >> ((k % 2) * 4)[None, :]) & 0xF
            g = (k // GROUP)[None, :]
            s = tl.load(S + n[:, None] * stride_s + g, mask=mask, other=0.0)
            z = tl.load(Z + n[:, None] * stride_s + g, mask=mask, other=0.0)
            acc += tl.sum((_u4_to_f32(q) * s + z) * x[None, :], axis=1)
        tl.store(Y + m * stride_y + n, acc.to(Y.dtype.element_ty), mask=n_ok)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def gemv_block_n(n_out: int, rows: int, min_programs: int = 256) -> int:
    """Output channels per GEMV program: 16, halved (down to 4) while the launch would have fewer
    than ``min_programs`` programs. At batch 1 a 768 x 768 matrix in blocks of 16 is 48 programs,
    too few to keep an H100's 132 SMs streaming; in blocks of 4 it is 192."""
    bn = 16
    while bn > 4 and -(-n_out // bn) * rows < min_programs:
        bn //= 2
    return bn


def gemv_configs(kind: str) -> list[dict]:
    """The tile shapes the tuned GEMVs (``tuned=True``, CUDA) choose from by timing each on its first
    (N, K): output channels a program (BLOCK_N), bytes a row per iteration (BLOCK_K for int8; GPT
    groups for int4) and warps. Wider K tiles put more bytes in flight per program; fewer channels a
    program make more programs for narrow matrices. Kinds: ``int8`` and ``int4`` (the CUDA-core
    kernels), ``int4w`` (the int32-word int4 kernel), ``int8dot`` and ``int4dot`` (tensor cores,
    pipelined STAGES deep)."""
    # at most 8K weights a tile (held in fp32 registers: larger tiles only spill)
    # ACC2D (a tile-sized accumulator, reduced once after the loop) only where it fits in registers
    if kind == "int8":
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "ACC2D": a}
                for bn in (4, 8, 16, 32) for bk in (256, 512, 1024) for w in (4, 8) for a in (False, True)
                if bn * bk <= (4096 if a else 8192)]
    if kind == "int4":
        return [{"BLOCK_N": bn, "GPT": gpt, "num_warps": w, "ACC2D": a}  # GPT groups of (at group size 128) 64 bytes
                for bn in (4, 8, 16, 32) for gpt in (1, 2, 4, 8) for w in (4, 8) for a in (False, True)
                if bn * gpt <= (64 if a else 128)]
    if kind == "int4w":
        return [{"BLOCK_N": bn, "GPT": gpt, "num_warps": w}
                for bn in (4, 8, 16) for gpt in (1, 2, 4) if 4 <= bn * gpt <= 32 for w in (4, 8)]
    if kind == "int8dot":
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "STAGES": st, "num_warps": 4}
                for bn in (16, 32, 64) for bk in (128, 256, 512) for st in (3, 4)]
    if kind == "int4dot":
        return [{"BLOCK_N": bn, "GPT": gpt, "STAGES": st, "num_warps": 4}
                for bn in (16, 32, 64) for gpt in (1, 2) for st in (3, 4)]
    raise ValueError(f"no GEMV kind {kind!r}")


_TUNED: dict[str, object] = {}
_TUNE_FAILED: set[str] = set()  # kinds whose autotuned launch raised: the fixed tile from then on
_FORM: dict[tuple, str] = {}  # (kind, N, K, M) -> the fastest kernel kind, timed on first use
_DOT_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16} if HAVE_TRITON else {}


def _launch_tuned(kind: str, grid: object, args: tuple, **meta: object) -> bool:
    """Launch the autotuned ``kind`` kernel; False (with one warning, and never this kind again) if it
    raises: a tile that fails to compile on some GPU must not take quantized models down (the caller
    uses another kind, or its fixed tile)."""
    if kind in _TUNE_FAILED:
        return False
    try:
        _tuned_kernel(kind)[grid](*args, **meta)
        return True
    except Exception as e:  # noqa: BLE001 - any compile or launch failure of the tuned variant
        _TUNE_FAILED.add(kind)
        warnings.warn(f"kiln.kernels.quant_linear: the autotuned {kind} GEMV failed ({type(e).__name__}: "
                      f"{str(e)[:200]}); not used from now on (another kind or the fixed tile runs)",
                      KernelFallbackWarning, stacklevel=3)
        return False


def _tuned_kernel(kind: str) -> object:
    """The autotuned launcher of a kernel (built on first use, keyed on N and K: the engine's warm-up
    and compilation call it before any CUDA graph capture, so a capture only replays a chosen tile)."""
    if kind not in _TUNED:
        configs = [triton.Config({k: v for k, v in c.items() if k != "num_warps"}, num_warps=c["num_warps"])
                   for c in gemv_configs(kind)]
        fn = {"int8": _int8_gemv_kernel, "int4": _int4_gemv_kernel, "int4w": _int4_gemv_kernel_w32,
              "int8dot": _int8_gemv_dot_kernel, "int4dot": _int4_gemv_dot_kernel}[kind]
        _TUNED[kind] = triton.autotune(configs, key=["N", "K"])(fn)
    return _TUNED[kind]


def _fastest_form(key: tuple, forms: dict[str, object], out: torch.Tensor | None = None,
                  rtol: float = 2e-2) -> str | None:
    """The kind whose (autotuned) launch ``forms[kind]()`` is fastest for ``key`` (kind, N, K, M): each
    runs once (tuning itself), then is timed; the choice is kept. With ``out`` (the tensor every launch
    writes), a kind is a candidate only if its output agrees with the first kind's (the established
    kernel) within ``rtol`` of its norm: a form that computes wrongly on some GPU is refused with one
    warning, never chosen for speed. None during a CUDA graph capture before a choice was made (the
    caller launches its fixed tile), or when no form launches."""
    if key in _FORM:
        return _FORM[key]
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    from triton.testing import do_bench

    times, ref = {}, None
    for name, launch in forms.items():
        if not launch():  # the kind failed to tune (warned once): not a candidate
            continue
        if out is not None:
            got = out.float().clone()
            if ref is None:
                ref = got
            elif not (got - ref).norm() <= rtol * ref.norm() + 1e-6:
                warnings.warn(f"kiln.kernels.quant_linear: the {name} GEMV disagrees with {next(iter(forms))} at "
                              f"{key}; not used", KernelFallbackWarning, stacklevel=3)
                continue
        times[name] = do_bench(launch, warmup=5, rep=20)
    if not times:
        return None
    _FORM[key] = min(times, key=times.get)
    return _FORM[key]


def _int8_gemv(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, tuned: bool = False) -> torch.Tensor:
    """The int8 launch: x2 (M, K) contiguous rows -> (M, N) in x2's dtype. ``tuned`` (CUDA): the faster
    of the CUDA-core kernel and the tensor-core one, each at its autotuned tile (elsewhere the fixed
    CUDA-core tile)."""
    (M, K), N = x2.shape, q.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    args = (x2, q, scale, y, N, K, x2.stride(0), q.stride(0), y.stride(0))
    if tuned and x2.is_cuda:
        forms = {"int8": lambda: _launch_tuned("int8", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M), args)}
        if x2.dtype in _DOT_DTYPES:  # the tensor cores take 16-bit inputs: not for fp32 activations
            forms["int8dot"] = lambda: _launch_tuned("int8dot", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),),
                                                     (x2, q, scale, y, M, N, K, x2.stride(0), q.stride(0), y.stride(0)),
                                                     DOT_DTYPE=_DOT_DTYPES[x2.dtype])
        form = _fastest_form(("int8", N, K, M), forms, y)
        if form is not None and forms[form]():
            return y
    BLOCK_N, BLOCK_K = gemv_block_n(N, M), 256
    _int8_gemv_kernel[(triton.cdiv(N, BLOCK_N), M)](*args, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K)
    return y


def _int4_word_forms(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                     y: torch.Tensor) -> dict[str, object]:
    """The int32-word int4 launches (CUDA-core and tensor-core) where the layout allows them: K a
    multiple of 8, groups of a power-of-two number of words, the packed rows 4-byte aligned."""
    (M, K), N = x2.shape, packed.shape[0]
    wpg = K // scale.shape[1] // 8
    if K % 8 or wpg < 1 or wpg & (wpg - 1) or packed.stride(0) % 4 or packed.data_ptr() % 4 or packed.stride(1) != 1:
        return {}
    p32 = packed.view(torch.int32)  # (N, K / 8)
    forms = {
        "int4w": lambda: _launch_tuned("int4w", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M),
                                       (x2, p32, scale, low, y, N, K, x2.stride(0), p32.stride(0), scale.stride(0),
                                        y.stride(0)), WPG=wpg),
    }
    if x2.dtype in _DOT_DTYPES:  # the tensor cores take 16-bit inputs: not for fp32 activations
        forms["int4dot"] = lambda: _launch_tuned("int4dot", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),),
                                                 (x2, p32, scale, low, y, M, N, K, x2.stride(0), p32.stride(0),
                                                  scale.stride(0), y.stride(0)), WPG=wpg,
                                                 DOT_DTYPE=_DOT_DTYPES[x2.dtype])
    return forms


def _int4_gemv(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
               tuned: bool = False) -> torch.Tensor:
    """The int4 launch: x2 (M, K) contiguous rows -> (M, N) in x2's dtype. ``tuned`` (CUDA): the fastest
    of the byte kernel, the int32-word kernel and the tensor-core one, each at its autotuned tile."""
    (M, K), N = x2.shape, packed.shape[0]
    y = torch.empty(M, N, device=x2.device, dtype=x2.dtype)
    BLOCK_N, group = gemv_block_n(N, M), K // scale.shape[1]
    half = group // 2
    grid = (triton.cdiv(N, BLOCK_N), M)
    args = (x2, packed, scale, low, y, N, K, x2.stride(0), packed.stride(0), scale.stride(0), y.stride(0))
    if half & (half - 1) == 0:  # bytes per group a power of two: the tiled kernel, ~256 bytes a row per tile
        if tuned and x2.is_cuda:
            forms = {"int4": lambda: _launch_tuned("int4", lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), M), args,
                                                   HALF=half), **_int4_word_forms(x2, packed, scale, low, y)}
            form = _fastest_form(("int4", N, K, M), forms, y)
            if form is not None and forms[form]():
                return y
        gpt = min(triton.next_power_of_2(scale.shape[1]), max(1, 256 // half))
        _int4_gemv_kernel[grid](*args, HALF=half, GPT=gpt, BLOCK_N=BLOCK_N)
    else:
        _int4_gemv_kernel_any[grid](*args, GROUP=group, BLOCK_N=BLOCK_N, BLOCK_K=256)
    return y


# Custom ops make the launches opaque to torch.compile (as kiln.kernels.rmsnorm's): the engine's
# compiled decode step calls them as black boxes, with no graph break between the fused elementwise
# work around them. Defining them registers two names under "kiln::"; nothing else happens at import.
@torch.library.custom_op("kiln::int8_gemv", mutates_args=())
def _int8_gemv_op(x2: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, tuned: bool = False) -> torch.Tensor:
    return _int8_gemv(x2, q, scale, tuned)


@_int8_gemv_op.register_fake
def _(x2, q, scale, tuned=False):
    return x2.new_empty((x2.shape[0], q.shape[0]))


@torch.library.custom_op("kiln::int4_gemv", mutates_args=())
def _int4_gemv_op(x2: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                  tuned: bool = False) -> torch.Tensor:
    return _int4_gemv(x2, packed, scale, low, tuned)


@_int4_gemv_op.register_fake
def _(x2, packed, scale, low, tuned=False):
    return x2.new_empty((x2.shape[0], packed.shape[0]))


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, use_kernel: bool | None = None,
                tuned: bool = False) -> torch.Tensor:
    """y = x @ (q * scale)^T: x (..., K) -> (..., N) in x's dtype. The Triton GEMV for up to
    ``GEMV_MAX_ROWS`` rows on CUDA; otherwise dequantize and matmul (the CPU's fast path).
    ``use_kernel=True`` runs the kernel on the CPU too (interpreted, for tests).

    Under torch.compile: one row is written as dequantize-then-matmul in torch ops, which Inductor
    (with ``coordinate_descent_tuning``, as the engine's compiled decode sets it) turns into one fused
    reduction reading the int8 weights, together with the norm or activation before it (gpt-fast's
    ``WeightOnlyInt8Linear`` relies on the same); 2-8 rows call the kernel as the custom op
    ``kiln::int8_gemv``, opaque to the compiler (no graph break).

    ``tuned=True``: Kiln's kernel at every row count up to ``GEMV_MAX_ROWS``, one row under the
    compiler included, with its tile autotuned on CUDA (``gemv_configs``): the alternative to
    Inductor's fusion that ``kiln bench serve --rows int8-tuned`` times beside it."""
    x2 = _rows(x)
    M = x2.shape[0]
    if use_kernel is None:
        use_kernel = x.is_cuda and M <= GEMV_MAX_ROWS
    if not use_kernel:
        return int8_linear_ref(x, q, scale)
    reason = unsupported_reason(x2, q)
    if reason is not None:
        warn_fallback("int8_linear", reason)
        return int8_linear_ref(x, q, scale)
    if compiling() and M == 1 and not tuned:  # Inductor fuses the dequantization into its one-row matmul
        return int8_linear_row(x, q, scale)
    y = (_int8_gemv_op if compiling() else _int8_gemv)(x2, q, scale, tuned)
    return y.reshape(*x.shape[:-1], q.shape[0])


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor,
                use_kernel: bool | None = None, tuned: bool = False) -> torch.Tensor:
    """y = x @ dequant(packed, scale, low)^T: x (..., K) -> (..., N); see ``int8_linear`` (``tuned``
    too; the autotuned tile needs group_size / 2 a power of two)."""
    x2 = _rows(x)
    M = x2.shape[0]
    if use_kernel is None:
        use_kernel = x.is_cuda and M <= GEMV_MAX_ROWS
    if not use_kernel:
        return int4_linear_ref(x, packed, scale, low)
    reason = unsupported_reason(x2, packed)
    if reason is not None:
        warn_fallback("int4_linear", reason)
        return int4_linear_ref(x, packed, scale, low)
    if compiling() and M == 1 and not tuned:  # one fused reduction over the packed bytes (``int4_linear_row``)
        return int4_linear_row(x, packed, scale, low)
    y = (_int4_gemv_op if compiling() else _int4_gemv)(x2, packed, scale, low, tuned)
    return y.reshape(*x.shape[:-1], packed.shape[0])
