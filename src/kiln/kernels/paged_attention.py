"""Attention over a paged KV cache: the reference (gather the blocks, plain attention) and a Triton
decode kernel (one new query token per sequence; Kwon et al., arXiv:2309.06180).

The pool holds fixed-size blocks: ``k_pool``, ``v_pool`` (num_blocks, block_size, Hkv, D). Sequence
b owns blocks ``block_tables[b, :ceil(context_lens[b] / block_size)]``; its position p lives in block
``block_tables[b, p // block_size]`` at row ``p % block_size``. Queries are packed: sequence b's new
tokens are rows ``query_start[b]:query_start[b+1]`` of q (N, H, D) and sit at the last positions of its
context, so they attend causally to every cached key before them. Query head h reads key/value head
``h // (H // Hkv)`` (the Hugging Face Llama grouping).

The decode kernel runs one program per (sequence, key/value head, split): it loads that head's
G = H / Hkv queries once, walks its share of the sequence's blocks through the block table with an
online softmax (Milakov & Gimelshein, arXiv:1805.02867), and never materializes the gathered keys.
With more than one split (flash-decoding), each program writes its unnormalized partial and a second
kernel combines them, so a single long sequence at batch 1 still spreads over many SMs.
"""

from __future__ import annotations

import math

import torch

from kiln.kernels._backend import HAVE_TRITON, unsupported_reason, warn_fallback

if HAVE_TRITON:
    import triton
    import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def gather_blocks(pool: torch.Tensor, table: torch.Tensor, length: int) -> torch.Tensor:
    """The first ``length`` cached rows of one sequence: pool (NB, bs, Hkv, D), table (>= blocks,)
    -> (length, Hkv, D), a copy in position order."""
    bs = pool.shape[1]
    n_blocks = -(-length // bs)
    return pool[table[:n_blocks].long()].reshape(n_blocks * bs, *pool.shape[2:])[:length]


def paged_attention_ref(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
) -> torch.Tensor:
    """Reference: for each sequence, gather its keys/values and run causal softmax attention in fp32.

    q (N, H, D); pools (NB, bs, Hkv, D); block_tables (B, max_blocks) int; context_lens (B,) int;
    query_start (B + 1,) int. Returns (N, H, D) in q's dtype.
    """
    _, H, D = q.shape
    Hkv = k_pool.shape[2]
    out = torch.empty_like(q)
    starts = query_start.tolist()
    for b, L in enumerate(context_lens.tolist()):
        s, e = starts[b], starts[b + 1]
        n = e - s
        k = gather_blocks(k_pool, block_tables[b], L).float().repeat_interleave(H // Hkv, dim=1)  # (L, H, D)
        v = gather_blocks(v_pool, block_tables[b], L).float().repeat_interleave(H // Hkv, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q[s:e].float(), k) / math.sqrt(D)  # (H, n, L)
        q_pos = torch.arange(L - n, L, device=q.device)  # the new tokens are the last n positions
        allowed = torch.arange(L, device=q.device)[None, :] <= q_pos[:, None]  # (n, L)
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        out[s:e] = torch.einsum("hnl,lhd->nhd", probs, v).to(q.dtype)
    return out


if HAVE_TRITON:

    @triton.jit
    def _paged_decode_kernel(
        Q, K, V, O, TABLES, LENS, PM, PL, PACC, scale, n_splits,
        stride_qb, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_ob, stride_oh,
        K_NEW, V_NEW, SLOTS, stride_nb, stride_nh, stride_vnb, stride_vnh, CNT,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr,
        SPLIT: tl.constexpr, WRITE: tl.constexpr = False, REDUCE: tl.constexpr = False, BLOCK_S: tl.constexpr = 1,
    ):
        # Program (b, kvh, s): sequence b, key/value head kvh, blocks [s * chunk, (s + 1) * chunk) of the
        # sequence, chunk = ceil(its blocks / n_splits) from its own length (all of them when not SPLIT):
        # every split gets a share of the blocks the sequence has, not of the table's width. SPLIT
        # writes the unnormalized partial (max, sum, acc) for _paged_reduce_kernel; otherwise the
        # normalized output. WRITE: the step's own key and value (K_NEW, V_NEW (B, Hkv, D)) are also
        # written to pool row SLOTS[b] here, by split 0 (the cache write without a launch of its
        # own), and the program that reads position L - 1 takes them from registers, not the pool
        # (another program may not have written it yet). REDUCE (with SPLIT): the last split of
        # (b, kvh) to finish, counted on CNT, combines the partials itself (``_combine_splits``, in
        # split order: the same sums whichever finishes last) and resets the count: no second launch.
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        t = tl.arange(0, BS)
        g_ok = g < G
        d_ok = d < D
        if WRITE:
            k_own = tl.load(K_NEW + b * stride_nb + kvh * stride_nh + d, mask=d_ok, other=0.0).to(K.dtype.element_ty)
            v_own = tl.load(V_NEW + b * stride_vnb + kvh * stride_vnh + d, mask=d_ok, other=0.0).to(V.dtype.element_ty)
            if sp == 0:
                slot = tl.load(SLOTS + b).to(tl.int64)
                dst = slot * stride_kt + kvh * stride_kh + d
                tl.store(K + dst, k_own, mask=d_ok)
                tl.store(V + dst, v_own, mask=d_ok)
        heads = kvh * G + g  # the query heads that read this key/value head
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32) * scale  # (G, D)
        L = tl.load(LENS + b)
        m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
        s_sum = tl.zeros((BLOCK_G,), tl.float32)
        acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
        n_blk = tl.cdiv(L, BS)
        chunk = tl.cdiv(n_blk, n_splits)
        lo = sp * chunk
        hi = tl.minimum(lo + chunk, n_blk)
        for j in range(lo, hi):
            blk = tl.load(TABLES + b * stride_tb + j).to(tl.int64)
            pos = j * BS + t
            kv_ok = (pos < L)[:, None] & d_ok[None, :]
            off = blk * stride_kb + t[:, None] * stride_kt + kvh * stride_kh + d[None, :]
            k = tl.load(K + off, mask=kv_ok, other=0.0).to(tl.float32)  # (BS, D)
            v = tl.load(V + off, mask=kv_ok, other=0.0).to(tl.float32)
            if WRITE:
                own = (pos == L - 1)[:, None]
                k = tl.where(own, k_own.to(tl.float32)[None, :], k)
                v = tl.where(own, v_own.to(tl.float32)[None, :], v)
            s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # (G, BS)
            s = tl.where((pos < L)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            s_sum = s_sum * alpha + tl.sum(p, axis=1)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
            m = m_new
        if SPLIT:
            row = ((b * tl.num_programs(1) + kvh) * n_splits + sp) * BLOCK_G + g  # (G,) rows of the partials
            tl.store(PM + row, m)
            tl.store(PL + row, s_sum)
            tl.store(PACC + row[:, None] * BLOCK_D + d[None, :], acc)
            if REDUCE:
                tl.debug_barrier()  # every thread's partials stored before the count says so
                done = tl.atomic_add(CNT + b * tl.num_programs(1) + kvh, 1, sem="acq_rel")
                if done == n_splits - 1:  # the last of this head's splits: combine, then reset the count
                    _combine_splits(O, PM, PL, PACC, b, kvh, tl.num_programs(1), n_splits, stride_ob, stride_oh,
                                    G, D, BLOCK_G, BLOCK_D, BLOCK_S, ".cg")
                    tl.atomic_xchg(CNT + b * tl.num_programs(1) + kvh, 0)
        else:
            out = acc / s_sum[:, None]
            tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                     mask=g_ok[:, None] & d_ok[None, :])

    @triton.jit
    def _combine_splits(O, PM, PL, PACC, b, kvh, n_kvh, n_splits, stride_ob, stride_oh,
                        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_S: tl.constexpr, CACHE: tl.constexpr):
        # Combine the splits of (b, kvh): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s.
        # CACHE: the loads' cache modifier (".cg", L2 only, where other SMs wrote the partials this launch).
        sp = tl.arange(0, BLOCK_S)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        sp_ok = sp < n_splits
        row = ((b * n_kvh + kvh) * n_splits + sp[:, None]) * BLOCK_G + g[None, :]  # (S, G)
        m = tl.load(PM + row, mask=sp_ok[:, None], other=float("-inf"), cache_modifier=CACHE)
        l_s = tl.load(PL + row, mask=sp_ok[:, None], other=0.0, cache_modifier=CACHE)
        acc = tl.load(PACC + row[:, :, None] * BLOCK_D + d[None, None, :], mask=sp_ok[:, None, None], other=0.0,
                      cache_modifier=CACHE)
        M = tl.max(m, axis=0)  # (G,): split 0 always holds a block, so M is finite
        w = tl.exp(m - M[None, :])  # empty splits: e^-inf = 0
        total = tl.sum(w * l_s, axis=0)
        out = tl.sum(w[:, :, None] * acc, axis=0) / total[:, None]  # (G, D)
        heads = kvh * G + g
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=(g < G)[:, None] & (d < D)[None, :])

    @triton.jit
    def _paged_reduce_kernel(
        O, PM, PL, PACC, n_splits, stride_ob, stride_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        _combine_splits(O, PM, PL, PACC, tl.program_id(0), tl.program_id(1), tl.num_programs(1), n_splits,
                        stride_ob, stride_oh, G, D, BLOCK_G, BLOCK_D, BLOCK_S, "")


_SPLIT_COUNTS: dict[torch.device, torch.Tensor] = {}  # per device: one zeroed int32 count per (sequence, head)


def _split_counts(device: torch.device, n: int) -> torch.Tensor | None:
    """The zeroed counts the fused split reduction uses (each reset by the program that finishes its
    head): allocated once per device outside any CUDA graph capture; None where that cannot be (the
    caller launches the separate reduce kernel)."""
    have = _SPLIT_COUNTS.get(device)
    if have is None or have.numel() < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        _SPLIT_COUNTS[device] = torch.zeros(max(n, 1 << 16), dtype=torch.int32, device=device)
    return _SPLIT_COUNTS[device]


def num_splits(max_blocks: int, programs: int = 1, target: int = 264) -> int:
    """Splits of a sequence's blocks across programs (flash-decoding, Dao et al. 2023): enough that the
    launch has about ``target`` programs (2 per SM of an H100) when ``programs`` (sequences x key/value
    heads) are too few, at most 16 and at most ``max_blocks`` / 2; 1 when the batch alone fills the
    GPU (then no combining kernel runs). A function of the batch and the block-table width only, which
    a CUDA graph keeps fixed; each program then takes its share of its sequence's actual blocks."""
    return max(1, min(16, max_blocks // 2, -(-target // max(1, programs))))


def _decode_reason(q: torch.Tensor, k_pool: torch.Tensor) -> str | None:
    reason = unsupported_reason(q, k_pool)
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_DTYPES or k_pool.dtype != q.dtype:
        return f"dtype {q.dtype} / pool {k_pool.dtype} (the kernel takes fp32/fp16/bf16, one dtype)"
    bs = k_pool.shape[1]
    if bs & (bs - 1):
        return f"block_size {bs} is not a power of two"
    return None


def paged_decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    split: int | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
    fused_reduce: bool = False,
) -> torch.Tensor:
    """One query token per sequence over its paged keys/values: q (B, H, D) -> (B, H, D).

    pools (NB, bs, Hkv, D), contiguous; block_tables (B, max_blocks) int32; context_lens (B,) int32
    (the query is the last position of each context). ``split``: programs per (sequence, head), each
    over a share of the blocks, combined by a second kernel (default ``num_splits(max_blocks, B * Hkv)``; 1 =
    one pass). Triton on CUDA (or the CPU under TRITON_INTERPRET=1); elsewhere
    ``paged_attention_ref`` with one warning. No host sync: safe to capture in a CUDA graph.

    ``k_new``, ``v_new`` (B, Hkv, D), last dim contiguous, and ``slots`` (B,): the step's own keys and
    values, written to the pools at ``slots`` by the same launch (``kv_write``'s effect, the cast to
    the pool's dtype included) before attending; the query is each sequence's position
    ``context_lens - 1``, whose slot ``slots`` names. ``fused_reduce``: with splits, the last split of
    each head to finish combines them (one launch); False (the default until timed on a GPU): a
    second kernel combines them.
    """
    reason = _decode_reason(q, k_pool)
    B, H, D = q.shape
    write = k_new is not None
    if write and (reason is not None or k_new.stride(2) != 1 or v_new.stride(2) != 1):
        kv_write(k_new, v_new, k_pool, v_pool, slots)  # the separate write, then attention as without
        write = False
    if reason is not None:
        warn_fallback("paged_decode_attention", reason)
        starts = torch.arange(B + 1, device=q.device, dtype=torch.int32)
        return paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens, starts)
    Hkv, bs = k_pool.shape[2], k_pool.shape[1]
    G = H // Hkv
    out = torch.empty_like(q)
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.stride() == v_pool.stride()
    q = q.contiguous()
    BLOCK_G, BLOCK_D = max(triton.next_power_of_2(G), 1), triton.next_power_of_2(D)
    splits = num_splits(block_tables.shape[1], B * Hkv) if split is None else split
    if splits > 1:
        pm = torch.empty(B * Hkv * splits * BLOCK_G, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B * Hkv * splits * BLOCK_G * BLOCK_D, device=q.device, dtype=torch.float32)
    else:
        pm = pl = pacc = out  # unused
    nk, nv, sl = (k_new, v_new, slots) if write else (q, q, context_lens)  # unused without WRITE
    counts = _split_counts(q.device, B * Hkv) if splits > 1 and fused_reduce else None
    BLOCK_S = triton.next_power_of_2(splits)
    _paged_decode_kernel[(B, Hkv, splits)](
        q, k_pool, v_pool, out, block_tables, context_lens, pm, pl, pacc, 1.0 / math.sqrt(D), splits,
        q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), nk, nv, sl, nk.stride(0), nk.stride(1),
        nv.stride(0), nv.stride(1), counts if counts is not None else context_lens,
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BS=bs, SPLIT=splits > 1, WRITE=write,
        REDUCE=counts is not None, BLOCK_S=BLOCK_S,
    )
    if splits > 1 and counts is None:
        _paged_reduce_kernel[(B, Hkv)](out, pm, pl, pacc, splits, out.stride(0), out.stride(1), G=G, D=D,
                                       BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_S=BLOCK_S)
    return out


# -- prefill: prompt chunks (and any decode rows beside them) straight from the pool -------------------------


if HAVE_TRITON:

    @triton.jit
    def _paged_prefill_kernel(
        Q, K, V, O, TABLES, LENS, QSTART, TILE_SEQ, TILE_M0, scale,
        stride_qn, stride_qh, stride_kb, stride_kt, stride_kh, stride_tb, stride_on, stride_oh,
        G: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        BS: tl.constexpr, IEEE: tl.constexpr,
    ):
        # Program (t, h): query tile t (BLOCK_M consecutive new tokens of one sequence: TILE_SEQ[t], from
        # row TILE_M0[t] of its chunk), query head h. Keys/values are read through the block table,
        # BLOCK_N positions at a time, up to the tile's last query position (causal), with an online
        # softmax (FlashAttention's loop, Dao et al., arXiv:2205.14135): no padding to the longest chunk
        # or context, and no gathered copy of the keys.
        t = tl.program_id(0)
        h = tl.program_id(1)
        b = tl.load(TILE_SEQ + t)
        m0 = tl.load(TILE_M0 + t)
        q0 = tl.load(QSTART + b)
        q_len = tl.load(QSTART + b + 1) - q0
        L = tl.load(LENS + b)
        rows = m0 + tl.arange(0, BLOCK_M)
        d = tl.arange(0, BLOCK_D)
        r_ok = rows < q_len
        d_ok = d < D
        q = tl.load(Q + (q0 + rows)[:, None] * stride_qn + h * stride_qh + d[None, :],
                    mask=r_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        q_pos = L - q_len + rows  # position of each query row (padded rows: past L, they see every key)
        kvh = h // G
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        hi = tl.minimum(L, L - q_len + m0 + BLOCK_M)  # keys at positions < hi: the tile's causal reach
        for n0 in range(0, hi, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            p_ok = pos < hi
            blk = tl.load(TABLES + b * stride_tb + pos // BS, mask=p_ok, other=0).to(tl.int64)
            off = blk * stride_kb + (pos % BS) * stride_kt + kvh * stride_kh  # (BLOCK_N,) pool rows
            kv_ok = p_ok[:, None] & d_ok[None, :]
            k = tl.load(K + off[:, None] + d[None, :], mask=kv_ok, other=0.0)  # (BLOCK_N, BLOCK_D)
            v = tl.load(V + off[:, None] + d[None, :], mask=kv_ok, other=0.0)
            if IEEE:  # fp32 products (an fp32 model; and the interpreter, whose bf16 dot is wrong)
                k, v = k.to(tl.float32), v.to(tl.float32)
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee") * scale  # (BLOCK_M, BLOCK_N)
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where((pos[None, :] <= q_pos[:, None]) & p_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: position 0 is in every row's first tile
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l_sum = l_sum * alpha + tl.sum(p, axis=1)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        out = acc / l_sum[:, None]
        tl.store(O + (q0 + rows)[:, None] * stride_on + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])


PREFILL_BLOCK_M = 64  # query rows a program (a decode row beside the chunks takes a tile of its own)


def prefill_tiles(query_lens: list[int], block_m: int = PREFILL_BLOCK_M) -> tuple[list[int], list[int]]:
    """The query tiles of a step: (sequence, first row of its chunk) for every ``block_m`` rows of each
    sequence's new tokens, in order; a sequence with no new tokens gets none."""
    seq, m0 = [], []
    for b, n in enumerate(query_lens):
        for r in range(0, n, block_m):
            seq.append(b)
            m0.append(r)
    return seq, m0


def tile_tensor(query_lens: list[int], device: torch.device | str) -> torch.Tensor:
    """``prefill_tiles`` as one (2, T) int32 tensor on ``device``: row 0 the sequences, row 1 the first
    rows of their chunks (one host-to-device copy)."""
    seq, m0 = prefill_tiles(query_lens)
    return torch.tensor([seq, m0], dtype=torch.int32).reshape(2, len(seq)).to(device, non_blocking=True)


def paged_prefill_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_start: torch.Tensor,
    query_lens: list[int],
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Any engine step (prompt chunks, decode rows, both) over the paged cache: q (N, H, D) packed ->
    (N, H, D), sequence b's new tokens rows ``query_start[b]:query_start[b+1]`` at the last positions
    of its ``context_lens[b]`` (keys/values already in the pool). One Triton launch over query tiles of
    64 rows: work and memory grow with the real tokens and contexts, not with the longest chunk times
    the number of sequences (``kiln.model.attention.paged_prefill_batched`` pads both). ``query_lens``:
    the host copy of the chunk lengths (no device sync). ``tiles``: ``tile_tensor(query_lens)`` on q's
    device, built here when None (a step's layers share one: ``PagedMetadata.prefill_tiles``). Triton
    on CUDA (or the CPU under TRITON_INTERPRET=1); elsewhere ``paged_attention_ref`` with one warning."""
    reason = _decode_reason(q, k_pool)
    if reason is not None:
        warn_fallback("paged_prefill_attention", reason)
        return paged_attention_ref(q, k_pool, v_pool, block_tables, context_lens, query_start)
    N, H, D = q.shape
    Hkv, bs = k_pool.shape[2], k_pool.shape[1]
    assert k_pool.is_contiguous() and v_pool.is_contiguous() and k_pool.stride() == v_pool.stride()
    q = q.contiguous()
    out = torch.empty_like(q)
    tiles = tile_tensor(query_lens, q.device) if tiles is None else tiles  # (2, T): sequence, first row
    if not tiles.shape[1]:
        return out
    BLOCK_D = max(16, triton.next_power_of_2(D))
    _paged_prefill_kernel[(tiles.shape[1], H)](
        q, k_pool, v_pool, out, block_tables, context_lens, query_start, tiles[0], tiles[1],
        1.0 / math.sqrt(D), q.stride(0), q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=H // Hkv, D=D, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=32, BLOCK_D=BLOCK_D, BS=bs,
        IEEE=q.dtype == torch.float32 or not q.is_cuda, num_warps=4,
    )
    return out


@torch.library.custom_op("kiln::paged_decode", mutates_args=())
def _paged_decode_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                     context_lens: torch.Tensor, fused_reduce: bool = False) -> torch.Tensor:
    return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, fused_reduce=fused_reduce)


@_paged_decode_op.register_fake
def _(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
      context_lens: torch.Tensor, fused_reduce: bool = False) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_decode_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, fused_reduce: bool = False) -> torch.Tensor:
    """``paged_decode_attention`` as the custom op ``kiln::paged_decode`` (same arguments, default
    split), opaque to ``torch.compile``: a compiled decode step keeps the Triton kernel whole and
    fuses everything around it (the cache write included) instead of breaking the graph at each
    layer's attention."""
    return _paged_decode_op(q, k_pool, v_pool, block_tables, context_lens, fused_reduce)


@torch.library.custom_op("kiln::paged_decode_write", mutates_args=("k_pool", "v_pool"))
def _paged_decode_write_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                           v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                           slots: torch.Tensor) -> torch.Tensor:
    return paged_decode_attention(q, k_pool, v_pool, block_tables, context_lens, k_new=k_new, v_new=v_new,
                                  slots=slots, fused_reduce=True)


@_paged_decode_write_op.register_fake
def _(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
      block_tables: torch.Tensor, context_lens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_decode_write_op(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor,
                          v_pool: torch.Tensor, block_tables: torch.Tensor, context_lens: torch.Tensor,
                          slots: torch.Tensor) -> torch.Tensor:
    """The cache write and decode attention as one launch (``paged_decode_attention`` with ``k_new``),
    the custom op ``kiln::paged_decode_write``, declared to mutate the pools (as ``kiln::kv_write``):
    one kernel a layer fewer than ``kv_write_op`` then ``paged_decode_op``."""
    return _paged_decode_write_op(q, k_new, v_new, k_pool, v_pool, block_tables, context_lens, slots)


# -- writing a step's keys and values into the pool ---------------------------------------------------------


if HAVE_TRITON:

    @triton.jit
    def _kv_write_kernel(K_NEW, V_NEW, K_POOL, V_POOL, SLOTS, stride_kn, stride_kh, stride_vn, stride_vh,
                         HKV: tl.constexpr, D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program per new token: its keys and values (Hkv, D), any strides, to pool row ``SLOTS[n]``
        (same dtype: the caller casts)."""
        n = tl.program_id(0)
        slot = tl.load(SLOTS + n).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        ok = (h < HKV) & (d < D)
        dst = slot * (HKV * D) + h * D + d
        k = tl.load(K_NEW + n * stride_kn + h * stride_kh + d, mask=ok)
        tl.store(K_POOL + dst, k, mask=ok)
        v = tl.load(V_NEW + n * stride_vn + h * stride_vh + d, mask=ok)
        tl.store(V_POOL + dst, v, mask=ok)


def kv_write(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k_new, v_new (N, Hkv, D), last dim contiguous, any dtype -> pool rows ``slots`` (N,) of
    k_pool, v_pool (NB, bs, Hkv, D), contiguous, cast to the pool's dtype first (under torch.compile
    the cast fuses into the kernel that produced them). One Triton launch for both; elsewhere two
    ``index_copy_``."""
    N, Hkv, D = k_new.shape
    k_new, v_new = k_new.to(k_pool.dtype), v_new.to(v_pool.dtype)  # torch's rounding (no-op when equal)
    if (unsupported_reason(k_new, k_pool) is not None or k_new.stride(2) != 1 or v_new.stride(2) != 1
            or not (k_pool.is_contiguous() and v_pool.is_contiguous())):
        k_pool.view(-1, Hkv, D).index_copy_(0, slots, k_new)
        v_pool.view(-1, Hkv, D).index_copy_(0, slots, v_new)
        return
    _kv_write_kernel[(N,)](k_new, v_new, k_pool, v_pool, slots, k_new.stride(0), k_new.stride(1),
                           v_new.stride(0), v_new.stride(1), HKV=Hkv, D=D,
                           BLOCK_H=triton.next_power_of_2(Hkv), BLOCK_D=triton.next_power_of_2(D))


@torch.library.custom_op("kiln::kv_write", mutates_args=("k_pool", "v_pool"))
def _kv_write_op(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                 slots: torch.Tensor) -> None:
    kv_write(k_new, v_new, k_pool, v_pool, slots)


@_kv_write_op.register_fake
def _(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
      slots: torch.Tensor) -> None:
    return None


def kv_write_op(k_new: torch.Tensor, v_new: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                slots: torch.Tensor) -> None:
    """``kv_write`` as the custom op ``kiln::kv_write``, declared to mutate the two pools, as vLLM's
    cache write is, so a compiled decode step updates the pools in place. Written as ``index_copy_``
    on a view of the pool, the compiled step (torch 2.11, CUDA) also ran two pool-sized
    ``copy_`` kernels a layer, 48 launches a token at 24 layers (H100 profile, docs/benchmarks.md);
    ``PagedKVCache.write_op = False`` brings that write back for comparison."""
    _kv_write_op(k_new, v_new, k_pool, v_pool, slots)
