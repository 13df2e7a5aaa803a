"""Causal multi-head self-attention with grouped-query attention, RoPE, a KV cache, and swappable kernels.

The attention *kernel* is a function chosen by name (``ModelConfig.attention_impl``) from
``ATTENTION_IMPLS``. Every kernel has one signature::

    fn(q (B, H, T, D), k (B, Hkv, S, D), v (B, Hkv, S, D), q_offset: int) -> (B, H, T, D)

Causal: query i sits at cache slot ``q_offset + i`` and attends to keys ``j <= q_offset + i``
(``q_offset = 0`` and ``S = T`` in training; ``q_offset = tokens already cached`` in decoding).
Query head h reads key/value head ``h // (H // Hkv)`` (the Hugging Face Llama grouping).
A kernel that only handles some cases (say a Triton FlashAttention for ``q_offset == 0``) falls
back to ``kiln_attention`` for the rest.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.model.kv_cache import KVCache, PagedKVCache, PagedMetadata
from kiln.model.layers import Linear, RMSNorm, RotaryEmbedding, scaled_dot_product_attention

AttentionFn = Callable[[Tensor, Tensor, Tensor, int], Tensor]


@contextmanager
def attention_swapped(model: nn.Module, impl: Any) -> Iterator[None]:
    """Within the block, every attention layer of ``model`` (a Kiln ``Transformer``) runs ``impl``
    (an ``attention_impl`` name or a callable ``(q, k, v, q_offset) -> out``); the layers' own
    kernels are put back on exit, also after an error."""
    attns = [layer.self_attn for layer in model.layers]
    saved = [a.attention_impl for a in attns]
    try:
        for a in attns:
            a.attention_impl = impl
        yield
    finally:
        for a, s in zip(attns, saved):
            a.attention_impl = s


@contextmanager
def kernels_swapped(model: nn.Module, norm: str | None = None, rope: str | None = None,
                    fused_proj: bool | None = None) -> Iterator[None]:
    """Within the block, every RMSNorm of ``model`` (a Kiln ``Transformer``) runs ``norm`` (a
    ``NORM_IMPLS`` name), its rotary embedding ``rope`` ("kiln" or "triton": ``kiln.kernels.rope``), and
    with ``fused_proj`` each layer's q/k/v and gate/up projections run as one GEMM each (weights
    concatenated per call; a Triton norm then writes autocast's dtype for its one GEMM). The fused RoPE
    and q/k/v apply to calls without a KV cache. None leaves that kind alone.
    The saved config is untouched (an export writes the model's own settings), and everything is put
    back on exit, also after an error.
    """
    from kiln.model.layers import SwiGLU

    # with one GEMM per norm output, a Triton norm can write autocast's dtype itself (one cast fewer
    # each way, the same values; several consumers would sum their gradients in bf16 instead)
    autocast_out = True if fused_proj and norm == "triton" else None
    kinds = [(RMSNorm, "impl", norm), (RMSNorm, "autocast_out", autocast_out), (RotaryEmbedding, "impl", rope),
             (MultiHeadSelfAttention, "fused_proj", fused_proj), (SwiGLU, "fused_proj", fused_proj)]
    swaps = [(m, attr, value, getattr(m, attr)) for cls, attr, value in kinds if value is not None
             for m in model.modules() if isinstance(m, cls)]
    try:
        for m, attr, value, _ in swaps:
            setattr(m, attr, value)
        yield
    finally:
        for m, attr, _, saved in swaps:
            setattr(m, attr, saved)


def causal_mask(t_q: int, t_k: int, q_offset: int = 0, device: torch.device | str | None = None) -> Tensor:
    """Bool (t_q, t_k) mask, True where query i (at slot q_offset + i) may attend to key j <= q_offset + i."""
    q_pos = torch.arange(q_offset, q_offset + t_q, device=device)
    k_pos = torch.arange(t_k, device=device)
    return k_pos[None, :] <= q_pos[:, None]


def kiln_attention(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """Kiln's from-scratch causal GQA attention (the default and the reference).

    q: (B, H, T, D); k, v: (B, Hkv, S, D). The G = H / Hkv query heads that share a key/value head
    are folded into the query-length axis, so keys and values are never copied G times.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    # One new token after the whole cache sees every key: no mask needed (the decode step).
    mask = None if (T == 1 and q_offset + 1 == S) else causal_mask(T, S, q_offset, device=q.device)  # (T, S)
    if G > 1:
        q = q.reshape(B, Hkv, G * T, D)  # heads h = kv*G + g are contiguous in the HF layout
        mask = None if mask is None else mask.repeat(G, 1)  # (G*T, S)
    out = scaled_dot_product_attention(q, k, v, mask)  # (B, Hkv, G*T, D)
    return out.reshape(B, H, T, D)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """torch's fused ``F.scaled_dot_product_attention``: an *option* for speed on GPU, not Kiln's own.

    Same contract as ``kiln_attention``; picked with ``ModelConfig(attention_impl="sdpa")``.
    """
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if q_offset == 0 and T == S:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    mask = None if (T == 1 and q_offset + 1 == S) else causal_mask(T, S, q_offset, device=q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


def triton_attention(q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
    """Kiln's FlashAttention-2 Triton kernel (``kiln.kernels.attention``) for training-shaped calls.

    KV-cache decoding (``q_offset > 0`` or unequal lengths) goes to ``kiln_attention``; the kernel
    itself warns once and runs its reference where Triton cannot run (no GPU, no triton).
    """
    if q_offset != 0 or q.shape[2] != k.shape[2]:
        return kiln_attention(q, k, v, q_offset)
    from kiln.kernels.attention import flash_attention  # lazy: Triton is optional

    return flash_attention(q, k, v, causal=True)


# Attention kernels by name (ModelConfig.attention_impl). A plain dict: a new kernel is one more entry.
ATTENTION_IMPLS: dict[str, AttentionFn] = {
    "kiln": kiln_attention,
    "sdpa": sdpa_attention,
    "triton": triton_attention,
}


def paged_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: PagedMetadata, fused: bool = False) -> Tensor:
    """Attention of one engine step's packed queries over the paged cache: q (N, H, D) -> (N, H, D).

    The step's keys/values are already in the pool (``PagedKVCache.write``). Four paths, one answer:
    a decode step on CUDA runs Kiln's Triton kernel (``kiln.kernels.paged_attention``); any other step
    with ``meta.prefill_kernel`` (``EngineConfig.prefill_kernel``, CUDA) runs its Triton prefill kernel; a decode step
    elsewhere gathers every sequence's blocks into one padded batch and masks past each length; a step
    with prefill chunks gathers sequence by sequence and calls the causal kernel with the chunk's
    offset (``kiln_attention``, or torch's SDPA when ``fused``); on CUDA, with several sequences, it
    pads them into one batch instead (``paged_prefill_batched``: one call per layer, no Python loop),
    and so does the CPU when padding the chunks and contexts to the longest costs at most about as
    much as the step's own tokens and contexts.
    """
    if meta.decode and q.is_cuda:
        from kiln.kernels.paged_attention import paged_decode_attention  # lazy: Triton is optional

        # under autocast q may be bf16 over an fp32 pool: the kernel takes one dtype
        out = paged_decode_attention(q.to(k_pool.dtype), k_pool, v_pool, meta.block_tables, meta.context_lens)
        return out.to(q.dtype)
    if meta.decode:
        return _paged_decode_torch(q, k_pool, v_pool, meta)
    if meta.prefill_kernel:  # one launch over query tiles, no padding (``EngineConfig.prefill_kernel``)
        from kiln.kernels.paged_attention import paged_prefill_attention, tile_tensor

        if meta.prefill_tiles is None:  # the same for every layer of the step: built once
            meta.prefill_tiles = tile_tensor(meta.query_lens, q.device)
        out = paged_prefill_attention(q.to(k_pool.dtype), k_pool, v_pool, meta.block_tables, meta.context_lens,
                                      meta.query_start, meta.query_lens, meta.prefill_tiles)
        return out.to(q.dtype)
    if q.is_cuda and len(meta.query_lens) > 1:  # many sequences: one padded, masked call per layer
        return _paged_mixed_cuda(q, k_pool, v_pool, meta, fused)
    B, ctx = len(meta.query_lens), meta.context_lens_list
    if B > 1 and B * max(meta.query_lens) <= 2 * q.shape[0] + 64 and B * max(ctx) <= 2 * sum(ctx) + 1024:
        # On the CPU too, when padding costs little (chunks and contexts of like length: a GRPO
        # rollout's 64 prompt tails): one call per layer instead of B gathers and B kernel calls
        # (issue 18: the loop was ~40% of a CPU rollout's generation time on the bench's small plan).
        return paged_prefill_batched(q, k_pool, v_pool, meta, fused)
    from kiln.kernels.paged_attention import gather_blocks

    out = torch.empty_like(q)
    fn = sdpa_attention if fused else kiln_attention
    start = 0
    for b, (n, L) in enumerate(zip(meta.query_lens, meta.context_lens_list)):
        k = gather_blocks(k_pool, meta.block_tables[b], L).transpose(0, 1)[None]  # (1, Hkv, L, D)
        v = gather_blocks(v_pool, meta.block_tables[b], L).transpose(0, 1)[None]
        q_b = q[start:start + n].transpose(0, 1)[None]  # (1, H, n, D)
        out[start:start + n] = fn(q_b, k, v, L - n)[0].transpose(0, 1)
        start += n
    return out


def _fast_prefill(cache: PagedKVCache) -> bool:
    """An eager engine step on the prefill kernel's path (``EngineConfig.prefill_kernel``, CUDA; tests
    set it under Triton's interpreter): RoPE for q and k as one Triton launch (``kiln.kernels.rope``)
    instead of ~18 eager ops a layer. The decode graphs keep their own (compiled) path."""
    meta = cache.meta
    return meta is not None and meta.prefill_kernel and not meta.decode and not torch.compiler.is_compiling()


def _paged_mixed_cuda(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: PagedMetadata, fused: bool) -> Tensor:
    """A CUDA step mixing decoding sequences (one token) and prompt chunks: the decoders go through the
    Triton decode kernel, the chunks through ``paged_prefill_batched``, so a long chunk never pads the
    decoders' rows to its length."""
    from kiln.kernels.paged_attention import paged_decode_attention  # lazy: Triton is optional

    if meta.split is None:  # the same for every layer of the step: built once
        dev = q.device
        one = [b for b, n in enumerate(meta.query_lens) if n == 1]
        many = [b for b, n in enumerate(meta.query_lens) if n > 1]
        starts = [0, *itertools.accumulate(meta.query_lens)]
        tok_many = [t for b in many for t in range(starts[b], starts[b + 1])]
        sub = PagedMetadata(meta.slot_mapping, meta.block_tables[many], meta.context_lens[many],
                            torch.tensor([0, *itertools.accumulate(meta.query_lens[b] for b in many)],
                                         dtype=torch.int32, device=dev),
                            [meta.query_lens[b] for b in many], [meta.context_lens_list[b] for b in many])
        idx = {name: torch.tensor(v, dtype=torch.long, device=dev) for name, v in
               (("one", one), ("tok_one", [starts[b] for b in one]), ("tok_many", tok_many))}
        meta.split = (idx, sub)
    idx, sub = meta.split
    out = torch.empty_like(q)
    if idx["one"].numel():
        rows = paged_decode_attention(q.index_select(0, idx["tok_one"]).to(k_pool.dtype), k_pool, v_pool,
                                      meta.block_tables.index_select(0, idx["one"]),
                                      meta.context_lens.index_select(0, idx["one"]))
        out.index_copy_(0, idx["tok_one"], rows.to(q.dtype))
    out.index_copy_(0, idx["tok_many"], paged_prefill_batched(q.index_select(0, idx["tok_many"]), k_pool, v_pool,
                                                              sub, fused))
    return out


def paged_prefill_batched(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: PagedMetadata, fused: bool = False) -> Tensor:
    """Prompt chunks of B sequences in one masked attention call: q (N, H, D) packed -> (N, H, D).

    Queries are scattered into (B, Tq) rows (Tq the longest chunk), keys/values gathered into (B, S)
    (S the longest context), and the mask allows key j for the query at position p of sequence b when
    j <= p and j < its context length. Padded query rows see key 0 only (no empty softmax row) and are
    dropped on the way out.
    """
    N, H, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    B, Tq, dev = len(meta.query_lens), max(meta.query_lens), q.device
    n_blocks = -(-max(meta.context_lens_list) // bs)
    S = n_blocks * bs
    slots = (meta.block_tables[:, :n_blocks].long()[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(-1)
    k = k_pool.view(-1, Hkv, D).index_select(0, slots).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
    v = v_pool.view(-1, Hkv, D).index_select(0, slots).view(B, S, Hkv, D).transpose(1, 2)
    q_lens = torch.diff(meta.query_start.long())  # (B,)
    seq_of = torch.repeat_interleave(torch.arange(B, device=dev), q_lens, output_size=N)  # (N,)
    dest = seq_of * Tq + torch.arange(N, device=dev) - meta.query_start.long()[seq_of]  # (N,) row in B*Tq
    qp = q.new_zeros(B * Tq, H, D).index_copy_(0, dest, q).view(B, Tq, H, D).transpose(1, 2)  # (B, H, Tq, D)
    ctx = meta.context_lens.long()[:, None]  # (B, 1)
    t = torch.arange(Tq, device=dev)[None, :]  # (1, Tq)
    q_pos = ctx - q_lens[:, None] + t  # (B, Tq) position of each query row
    j = torch.arange(S, device=dev)[None, None, :]  # (1, 1, S)
    allowed = (j <= q_pos[:, :, None]) & (j < ctx[:, :, None])  # (B, Tq, S)
    allowed |= (t >= q_lens[:, None])[:, :, None] & (j == 0)  # padded query rows: key 0 only
    if fused:
        out = F.scaled_dot_product_attention(qp, k, v, attn_mask=allowed[:, None], enable_gqa=H != Hkv)
    else:
        G = H // Hkv  # fold the G query heads of a key/value head into the query axis (as kiln_attention)
        out = scaled_dot_product_attention(qp.reshape(B, Hkv, G * Tq, D), k, v, allowed.repeat(1, G, 1)[:, None])
        out = out.reshape(B, H, Tq, D)
    return out.transpose(1, 2).reshape(B * Tq, H, D).index_select(0, dest)


def _paged_decode_torch(q: Tensor, k_pool: Tensor, v_pool: Tensor, meta: PagedMetadata) -> Tensor:
    """Decode step in plain PyTorch: q (B, H, D), one token per sequence -> (B, H, D)."""
    B, H, D = q.shape
    bs, Hkv = k_pool.shape[1], k_pool.shape[2]
    if meta.decode_gather is None:  # the same for every layer of the step: built once
        n_blocks = -(-max(meta.context_lens_list) // bs)
        S = n_blocks * bs
        valid = torch.arange(S, device=q.device)[None, :] < meta.context_lens[:, None]  # (B, S)
        tables = meta.block_tables[:, :n_blocks].long()  # (B, nb)
        slots = (tables[:, :, None] * bs + torch.arange(bs, device=q.device)).reshape(-1)  # (B*S,) pool rows
        meta.decode_gather = (slots, valid[:, None, None, :])
    slots, valid = meta.decode_gather  # (B*S,), (B, 1, 1, S)
    S = valid.shape[-1]
    # index_select over pool rows: a few times faster on the CPU than advanced indexing by block
    k = k_pool.view(-1, Hkv, D).index_select(0, slots).view(B, S, Hkv, D).transpose(1, 2)  # (B, Hkv, S, D)
    v = v_pool.view(-1, Hkv, D).index_select(0, slots).view(B, S, Hkv, D).transpose(1, 2)
    G = H // Hkv
    qg = q.reshape(B, Hkv, G, D)  # heads h = kv*G + g are contiguous in the HF layout
    out = scaled_dot_product_attention(qg, k, v, valid)  # (B, Hkv, G, D)
    return out.reshape(B, H, D)


class MultiHeadSelfAttention(nn.Module):
    """Causal self-attention with optional RoPE and grouped-query attention (Ainslie et al., arXiv:2305.13245).

    Parameters (HF Llama names): q_proj (H*D, d_model), k_proj and v_proj (Hkv*D, d_model),
    o_proj (d_model, H*D), with D = d_model / num_heads. For inference ``kiln.model.fuse_projections``
    replaces q_proj, k_proj and v_proj (then None) by one ``qkv_proj`` ((H + 2 Hkv) D, d_model).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        rope: RotaryEmbedding | None = None,
        num_kv_heads: int | None = None,
        max_seq_len: int | None = None,
        rope_theta: float = 10000.0,
        attention_impl: str | AttentionFn = "kiln",
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        qk_norm: bool = False,
        norm_eps: float = 1e-5,
        linear_impl: str = "kiln",
    ) -> None:
        """``rope`` may be shared between layers; if None and ``max_seq_len`` is given, one is built
        with ``rope_theta``; if both are None, no position information is added (NoPE).
        ``attention_impl``: a name in ``ATTENTION_IMPLS`` or a kernel function.
        ``layer_idx``: which layer of a ``KVCache`` this module reads and writes. ``qk_norm``: RMSNorm
        each query and key head (over D, gains ``q_norm``/``k_norm``) before RoPE, which bounds the
        attention logits (Dehghani et al. 2023, arXiv:2302.05442; OLMo 2, Qwen3). ``linear_impl``: the
        projections' kernel, a name in ``kiln.model.layers.LINEAR_IMPLS``."""
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if d_model % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide d_model={d_model}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_kv_heads={num_kv_heads} does not divide num_heads={num_heads}")
        if isinstance(attention_impl, str) and attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl={attention_impl!r} is unknown; use one of {sorted(ATTENTION_IMPLS)}")
        self.d_model = d_model
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = d_model // num_heads
        self.layer_idx = layer_idx
        self.attention_impl = attention_impl
        if rope is None and max_seq_len is not None:
            rope = RotaryEmbedding(rope_theta, self.head_dim, max_seq_len, device=device)
        self.rope = rope
        D = self.head_dim
        kw = {"device": device, "dtype": dtype, "impl": linear_impl}
        self.q_proj = Linear(d_model, num_heads * D, **kw)
        self.k_proj = Linear(d_model, num_kv_heads * D, **kw)
        self.v_proj = Linear(d_model, num_kv_heads * D, **kw)
        self.o_proj = Linear(num_heads * D, d_model, **kw)
        self.fused_proj = False  # True: training-shaped calls run q, k, v as one GEMM (kernels_swapped)
        self.qkv_proj: nn.Module | None = None  # q, k, v stacked once, for inference (kiln.model.fuse)
        self.q_norm = RMSNorm(D, norm_eps, device=device, dtype=dtype) if qk_norm else None
        self.k_norm = RMSNorm(D, norm_eps, device=device, dtype=dtype) if qk_norm else None

    def forward(
        self,
        x: Tensor,
        token_positions: Tensor | None = None,
        kv_cache: KVCache | PagedKVCache | None = None,
    ) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model).

        token_positions: (T,) or (B, T) RoPE positions; default ``offset + arange(T)`` where offset is
        the number of tokens already in ``kv_cache`` (0 without one). With ``kv_cache``, this layer's
        new keys/values are appended to it (the caller advances the cache after all layers).
        With a ``PagedKVCache``, x is one engine step packed as (1, N, d_model) and token_positions
        (N,) is required; keys/values go to the pool by ``kv_cache.meta`` (see ``paged_attention``).
        """
        B, T, _ = x.shape
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        paged = isinstance(kv_cache, PagedKVCache)
        offset = kv_cache.length if isinstance(kv_cache, KVCache) else 0
        if self.qkv_proj is not None:  # fuse_projections: one GEMV for q, k and v, then views of its output
            q, k, v = self.qkv_proj(x).split((H * D, Hkv * D, Hkv * D), dim=-1)  # of (B, T, (H + 2 Hkv) D)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        elif self.fused_proj and kv_cache is None and self.q_proj.impl == "kiln":
            # one GEMM for q, k and v (and one for their input gradient): fewer launches, the same products
            w = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))  # ((H + 2 Hkv) D, d_model)
            q, k, v = torch.matmul(x, w.t()).split((H * D, Hkv * D, Hkv * D), dim=-1)
            q, k, v = q.view(B, T, H, D), k.view(B, T, Hkv, D), v.view(B, T, Hkv, D)
        else:
            q = self.q_proj(x).view(B, T, H, D)  # (B, T, H, D)
            k = self.k_proj(x).view(B, T, Hkv, D)  # (B, T, Hkv, D)
            v = self.v_proj(x).view(B, T, Hkv, D)  # (B, T, Hkv, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        fused_rope = self.rope is not None and (kv_cache is None and self.rope.impl == "triton"
                                                or paged and _fast_prefill(kv_cache))
        if fused_rope:  # one launch for q and k each way (kiln.kernels.rope) instead of ~19 forward
            from kiln.kernels.rope import rope_qk

            if token_positions is None:
                token_positions = torch.arange(T, device=x.device)  # (T,)
            q, k = rope_qk(q, k, self.rope.cos, self.rope.sin, token_positions)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D), (B, Hkv, T, D) x 2
        if self.rope is not None and not fused_rope:
            if token_positions is None:
                token_positions = torch.arange(offset, offset + T, device=x.device)  # (T,)
            q = self.rope(q, token_positions)
            k = self.rope(k, token_positions)
        if paged:
            return self.o_proj(self._paged(q, k, v, kv_cache).reshape(B, T, H * D))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, Hkv, offset + T, D)
        fn = ATTENTION_IMPLS[self.attention_impl] if isinstance(self.attention_impl, str) else self.attention_impl
        out = fn(q, k, v, offset)  # (B, H, T, D)
        out = out.transpose(1, 2).reshape(B, T, H * D)  # (B, T, H*D)
        return self.o_proj(out)

    def _paged(self, q: Tensor, k: Tensor, v: Tensor, cache: PagedKVCache) -> Tensor:
        """q (1, H, N, D), k/v (1, Hkv, N, D) of a packed engine step -> attention output (N, H, D).

        A decode step on CUDA stays traceable: under the engine's ``torch.compile`` the cache write is
        fused into the kernel that produces k and v, and the Triton kernel is one opaque custom op
        (``kiln::paged_decode``). Every other step runs eagerly (``_paged_eager``)."""
        meta = cache.meta
        if meta is not None and meta.decode and q.is_cuda:
            return self._paged_decode(q, k, v, cache)
        return self._paged_eager(q, k, v, cache)

    def _paged_decode(self, q: Tensor, k: Tensor, v: Tensor, cache: PagedKVCache) -> Tensor:
        """A decode step (one new token per row): with ``cache.decode_write``, the cache write,
        attention and the combining of its splits in one launch (``kiln::paged_decode_write``);
        otherwise three (``kiln::kv_write``, ``kiln::paged_decode``, the reduce kernel): traceable, no
        graph break."""
        from kiln.kernels.paged_attention import (  # lazy: Triton is optional
            kv_write_op,
            paged_decode_attention,
            paged_decode_op,
            paged_decode_write_op,
        )

        i, meta = self.layer_idx, cache.meta
        k_new, v_new = k[0].transpose(0, 1), v[0].transpose(0, 1)  # (N, Hkv, D)
        k_pool, v_pool = cache.k[i], cache.v[i]
        q_rows = q[0].transpose(0, 1).to(k_pool.dtype).contiguous()  # (N, H, D); autocast q over a wider pool
        compiling = torch.compiler.is_compiling()
        if cache.write_op and cache.decode_write:  # one launch writes the pools (in place) and attends
            if compiling:
                out = paged_decode_write_op(q_rows, k_new, v_new, k_pool, v_pool, meta.block_tables,
                                            meta.context_lens, meta.slot_mapping)
            else:
                out = paged_decode_attention(q_rows, k_pool, v_pool, meta.block_tables, meta.context_lens,
                                             k_new=k_new, v_new=v_new, slots=meta.slot_mapping, fused_reduce=True)
            return out.to(q.dtype)
        if cache.write_op:  # one launch, and the pools updated in place under torch.compile
            kv_write_op(k_new, v_new, k_pool, v_pool, meta.slot_mapping)
        else:
            cache.write(i, k_new, v_new)
        fn = paged_decode_op if compiling else paged_decode_attention  # eager: no dispatcher
        # the earlier form whole: write, attention, and the splits combined by a kernel of their own
        out = fn(q_rows, k_pool, v_pool, meta.block_tables, meta.context_lens, fused_reduce=False)
        return out.to(q.dtype)

    @torch.compiler.disable  # prefill chunks and CPU steps: the cache write and attention stay eager
    def _paged_eager(self, q: Tensor, k: Tensor, v: Tensor, cache: PagedKVCache) -> Tensor:
        """``_paged``'s general path (any mix of prefill chunks and decodes, any device)."""
        i = self.layer_idx
        cache.write(i, k[0].transpose(0, 1), v[0].transpose(0, 1))  # (N, Hkv, D) into the pool
        fused = self.attention_impl in ("sdpa", "triton")
        return paged_attention(q[0].transpose(0, 1), cache.k[i], cache.v[i], cache.meta, fused)
