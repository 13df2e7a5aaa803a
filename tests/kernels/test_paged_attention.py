"""Paged attention: the Triton decode kernel and the model's PyTorch paths against a reference that
gathers each sequence's blocks and calls plain causal attention (``kiln.model.kiln_attention``)."""

from __future__ import annotations

import pytest
import torch

from kiln.kernels.paged_attention import (
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_tiles,
)
from kiln.model import PagedMetadata, kiln_attention
from kiln.model.attention import _paged_mixed_cuda, paged_attention, paged_prefill_batched


def _pool(lens, bs, Hkv, D, dtype, dev, seed=0):
    """A shuffled pool holding sequences of ``lens`` tokens, their block tables and their dense K/V."""
    g = torch.Generator().manual_seed(seed)
    blocks = [-(-L // bs) for L in lens]
    nb = sum(blocks) + 3
    k_pool = torch.randn(nb, bs, Hkv, D, generator=g).to(dev, dtype)
    v_pool = torch.randn(nb, bs, Hkv, D, generator=g).to(dev, dtype)
    perm = torch.randperm(nb, generator=g).tolist()  # blocks land anywhere in the pool
    tables, i = [], 0
    for n in blocks:
        tables.append(perm[i:i + n])
        i += n
    width = max(blocks)
    bt = torch.tensor([t + [nb - 1] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev)
    return k_pool, v_pool, bt


def _dense_reference(q, k_pool, v_pool, bt, lens, q_lens):
    """Gather each sequence's K/V in position order and run Kiln's causal attention on them."""
    out, s = [], 0
    bs = k_pool.shape[1]
    for b, (L, n) in enumerate(zip(lens, q_lens)):
        nb = -(-L // bs)
        k = k_pool[bt[b, :nb].long()].reshape(nb * bs, *k_pool.shape[2:])[:L].transpose(0, 1)[None].double()
        v = v_pool[bt[b, :nb].long()].reshape(nb * bs, *v_pool.shape[2:])[:L].transpose(0, 1)[None].double()
        qb = q[s:s + n].transpose(0, 1)[None].double()
        out.append(kiln_attention(qb, k, v, L - n)[0].transpose(0, 1))
        s += n
    return torch.cat(out)


@pytest.mark.parametrize("H,Hkv,D,bs,split", [(4, 2, 16, 4, 1), (6, 6, 24, 8, 1), (8, 1, 32, 16, 1),
                                              (4, 2, 16, 4, 3), (4, 2, 16, 4, 16), (2, 1, 8, 4, None)])
def test_decode_kernel_equals_reference(dev, H, Hkv, D, bs, split):
    """One pass, 3 splits, 16 splits (more than most sequences here have blocks: each split takes a share
    of its own sequence's blocks, the rest stay empty), and the default count."""
    lens = [1, 5, bs, bs + 1, 3 * bs + 2] + ([17 * bs + 3] if split is None else [])  # None: 9 splits here
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, torch.float32, dev)
    q = torch.randn(len(lens), H, D, device=dev)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    got = paged_decode_attention(q, k_pool, v_pool, bt, cl, split=split)
    want = _dense_reference(q, k_pool, v_pool, bt, lens, [1] * len(lens))
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    ref = paged_attention_ref(q, k_pool, v_pool, bt, cl, torch.arange(len(lens) + 1, dtype=torch.int32))
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


def test_split_count_fills_the_gpu_and_no_more():
    """Flash-decoding splits: ~264 programs when (sequences x kv heads) are few, none for a full batch."""
    from kiln.kernels.paged_attention import num_splits

    assert num_splits(64, 12) == 16 and num_splits(64, 16) == 16  # batch 1 at 124M / 350m: capped at 16
    assert num_splits(256, 32) == 9  # batch 1 at Llama-2-7B's 32 heads
    assert num_splits(64, 64 * 12) == 1 and num_splits(64, 8 * 12) == 3  # c=64: one pass, no combine
    assert num_splits(4, 1) == 2 and num_splits(1, 1) == 1  # at most half the table's width


def test_decode_kernel_bf16_on_gpu(dev):
    if dev.type != "cuda":
        pytest.skip("bf16 through the interpreter is not exercised")
    lens = [7, 300, 1025]
    k_pool, v_pool, bt = _pool(lens, 16, 8, 128, torch.bfloat16, dev)
    q = torch.randn(3, 32, 128, device=dev, dtype=torch.bfloat16)
    got = paged_decode_attention(q, k_pool, v_pool, bt, torch.tensor(lens, dtype=torch.int32, device=dev))
    want = _dense_reference(q, k_pool, v_pool, bt, lens, [1, 1, 1])
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("case", ["decode", "chunks", "skewed", "long context"])
def test_model_paths_equal_reference(case):
    """The CPU paths the model takes in fp32: batched decode; prefill chunks of like length in one
    padded call (``paged_prefill_batched``); a long chunk beside one-token rows, or one long context
    beside short ones, sequence by sequence (padding every row to it would cost more than the loop)."""
    bs, H, Hkv, D = 4, 4, 2, 8
    lens = {"skewed": [45, 9, 4, 13], "long context": [3, 900, 4, 13]}.get(case, [3, 9, 4, 13])
    q_lens = {"decode": [1] * 4, "chunks": [3, 2, 4, 1], "skewed": [40, 1, 1, 1], "long context": [3, 2, 4, 1]}[case]
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, torch.float32, "cpu", seed=2)
    q = torch.randn(sum(q_lens), H, D)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = PagedMetadata(torch.zeros(sum(q_lens), dtype=torch.long), bt, torch.tensor(lens, dtype=torch.int32),
                         starts, q_lens, lens)
    got = paged_attention(q, k_pool, v_pool, meta)
    want = _dense_reference(q, k_pool, v_pool, bt, lens, q_lens)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    for fused in (False, True):  # the padded one-call path CUDA takes for several prompt chunks
        got = paged_prefill_batched(q, k_pool, v_pool, meta, fused)
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("H,Hkv,D,bs,dtype", [(4, 2, 16, 4, torch.float32), (6, 6, 24, 8, torch.float32),
                                              (8, 1, 32, 16, torch.float32), (4, 2, 16, 4, torch.bfloat16)])
def test_prefill_kernel_equals_reference(dev, H, Hkv, D, bs, dtype):
    """Kiln's Triton prefill kernel over the pool: chunks longer than a 64-row tile (130 rows: three
    tiles, the last partial), a chunk continuing a cached prefix, one-token decode rows beside them
    (one short, one with a long context), a sequence with no new tokens, GQA; fp32 (IEEE products)
    and bf16 (on the CPU the interpreter runs it in fp32; bf16 products on a GPU)."""
    lens, q_lens = [130, 9, 20 * bs + 3, 5, 75, 4], [130, 1, 1, 5, 40, 0]
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, dtype, dev, seed=4)
    q = torch.randn(sum(q_lens), H, D, device=dev).to(dtype)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    got = paged_prefill_attention(q, k_pool, v_pool, bt, cl, starts, q_lens)
    want = _dense_reference(q, k_pool, v_pool, bt, lens, q_lens)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol, rtol=tol)
    meta = PagedMetadata(torch.zeros(sum(q_lens), dtype=torch.long, device=dev), bt, cl, starts, q_lens, lens)
    meta.prefill_kernel = True  # the model's path when the engine asks for the kernel
    torch.testing.assert_close(paged_attention(q, k_pool, v_pool, meta).double(), want, atol=tol, rtol=tol)
    assert prefill_tiles(q_lens) == ([0, 0, 0, 1, 2, 3, 4], [0, 64, 128, 0, 0, 0, 0])


def test_mixed_step_split_equals_reference(dev):
    """CUDA's mixed steps: one-token sequences through the decode kernel, chunks through the padded call."""
    bs, H, Hkv, D = 4, 4, 2, 8
    lens, q_lens = [3, 9, 4, 13, 6], [1, 2, 1, 5, 1]
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, torch.float32, dev, seed=3)
    q = torch.randn(sum(q_lens), H, D, device=dev)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    meta = PagedMetadata(torch.zeros(sum(q_lens), dtype=torch.long, device=dev), bt,
                         torch.tensor(lens, dtype=torch.int32, device=dev), starts, q_lens, lens)
    want = _dense_reference(q, k_pool, v_pool, bt, lens, q_lens)
    torch.testing.assert_close(_paged_mixed_cuda(q, k_pool, v_pool, meta, True).double(), want, atol=1e-5, rtol=1e-5)
    ref = paged_attention_ref(q, k_pool, v_pool, bt, meta.context_lens, starts)
    torch.testing.assert_close(ref.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend,decode_write", [("aot_eager", True), ("inductor", True), ("inductor", False)])
def test_traced_decode_compiles_whole_and_equals_eager(backend, decode_write):
    """The engine's compiled decode step: the cache write plus ``kiln::paged_decode`` trace as one
    graph (fullgraph: no break at attention) and give the eager path's output and pool contents.
    Needs the Triton interpreter (the op runs the kernel) and, for inductor, a C++ compiler."""
    from kiln.kernels._backend import unsupported_reason
    from kiln.model import PagedKVCache
    from kiln.model.attention import MultiHeadSelfAttention

    if unsupported_reason(torch.zeros(1)) is not None:
        pytest.skip("the Triton kernel does not run here (set TRITON_INTERPRET=1)")
    bs, H, Hkv, D = 4, 4, 2, 8
    lens = [1, 6, 9]  # after this step: a first token, a block boundary crossed, a longer row
    attn = MultiHeadSelfAttention(H * D, H, num_kv_heads=Hkv, layer_idx=1)
    caches = []
    for _ in range(2):
        c = PagedKVCache(2, 8, bs, Hkv, D)
        c.decode_write = decode_write  # the write inside the attention launch, or kiln::kv_write before it
        for pool in c.k + c.v:
            pool.copy_(torch.randn(pool.shape, generator=torch.Generator().manual_seed(4)))
        caches.append(c)
    bt = torch.tensor([[5, 8, 8], [0, 3, 8], [7, 1, 2]], dtype=torch.int32)
    slots = torch.tensor([int(bt[b, (L - 1) // bs]) * bs + (L - 1) % bs for b, L in enumerate(lens)])
    for c in caches:
        c.meta = PagedMetadata(slots, bt, torch.tensor(lens, dtype=torch.int32), torch.arange(4, dtype=torch.int32),
                               [1] * 3, lens)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, n, 3, D, generator=g) for n in (H, Hkv, Hkv))
    want = attn._paged_eager(q, k, v, caches[0])
    step = torch.compile(attn._paged_decode, fullgraph=True, backend=backend)
    try:
        got = step(q, k, v, caches[1])
    except Exception as e:  # inductor without a working C++ toolchain
        if backend == "inductor" and "compil" in str(e).lower() and "C++" in str(e):
            pytest.skip(f"inductor cannot build on this machine: {e}")
        raise
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a, b, atol=0, rtol=0)  # the compiled write landed in the real pool


@pytest.mark.parametrize("Hkv,D,dtype", [(2, 8, torch.float32), (3, 24, torch.bfloat16)])
def test_kv_write_lands_in_the_slots_only(dev, Hkv, D, dtype):
    """``kv_write`` (one Triton launch for keys and values) puts each new token at its slot, cast to the
    pool's dtype, from the strided (N, Hkv, D) views attention hands it, and touches nothing else;
    the custom op mutates the pools it is given."""
    from kiln.kernels.paged_attention import kv_write, kv_write_op

    g = torch.Generator().manual_seed(7)
    N, nb, bs = 5, 6, 4
    k = torch.randn(1, Hkv, N, D, generator=g).to(dev)[0].transpose(0, 1)  # (N, Hkv, D), rows not contiguous
    v = torch.randn(1, N, Hkv, D, generator=g).to(dev)[0]  # (N, Hkv, D), contiguous
    slots = torch.tensor([3, 22, 0, 9, 17], device=dev)
    pools = [torch.randn(nb, bs, Hkv, D, generator=g).to(dev, dtype) for _ in range(2)]
    want = [p.clone() for p in pools]
    want[0].view(-1, Hkv, D)[slots] = k.to(dtype)
    want[1].view(-1, Hkv, D)[slots] = v.to(dtype)
    kv_write(k, v, *pools, slots)
    for p, w in zip(pools, want):
        assert torch.equal(p, w)
    fresh = [torch.zeros_like(p) for p in pools]
    kv_write_op(k, v, *fresh, slots)
    assert torch.equal(fresh[0].view(-1, Hkv, D)[slots], k.to(dtype))
    assert fresh[1].view(-1, Hkv, D)[[1, 2]].abs().sum() == 0  # slots not written stay as they were


@pytest.mark.parametrize("split", [1, 3, None])
def test_decode_kernel_with_its_own_write_equals_write_then_attend(dev, split):
    """``paged_decode_attention(..., k_new, v_new, slots)``: the step's keys/values written by the
    attention launch (split 0 of each head) and read from registers at the last position, equal to
    ``kv_write`` then attention: the same output and the same pools, bit for bit, whichever split
    holds the last block."""
    from kiln.kernels.paged_attention import kv_write, paged_decode_write_op

    H, Hkv, D, bs = 4, 2, 16, 4
    lens = [1, 5, bs, bs + 1, 3 * bs + 2, 9 * bs + 3]  # after this step: the new token is position L - 1
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, torch.float32, dev)
    g = torch.Generator().manual_seed(9)
    q = torch.randn(len(lens), H, D, generator=g).to(dev)
    k_new = torch.randn(1, Hkv, len(lens), D, generator=g).to(dev)[0].transpose(0, 1)  # strided, as attention hands it
    v_new = torch.randn(len(lens), Hkv, D, generator=g).to(dev)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    slots = torch.tensor([int(bt[b, (L - 1) // bs]) * bs + (L - 1) % bs for b, L in enumerate(lens)], device=dev)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    kv_write(k_new, v_new, ref_k, ref_v, slots)
    want = paged_decode_attention(q, ref_k, ref_v, bt, cl, split=split)
    got = paged_decode_attention(q, k_pool, v_pool, bt, cl, split=split, k_new=k_new, v_new=v_new, slots=slots,
                                 fused_reduce=True)
    assert torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    fresh_k, fresh_v = [p.clone() for p in _pool(lens, bs, Hkv, D, torch.float32, dev)[:2]]
    op = paged_decode_write_op(q, k_new, v_new, fresh_k, fresh_v, bt, cl, slots)  # the custom op mutates its pools
    assert torch.equal(fresh_k, ref_k) and torch.equal(fresh_v, ref_v)
    torch.testing.assert_close(op, paged_decode_attention(q, ref_k, ref_v, bt, cl), atol=1e-6, rtol=1e-6)


def test_split_decode_combines_in_its_last_program_and_resets_the_counts(dev):
    """With splits, the last program of each head to finish combines the partials (counted with an
    atomic, reset after): the same output bit for bit as the separate reduce kernel, call after call
    (a count left behind would make the next call combine too early or never)."""
    from kiln.kernels import paged_attention as pa

    H, Hkv, D, bs = 4, 2, 16, 4
    lens = [1, 5, 3 * bs + 2, 9 * bs + 3]
    k_pool, v_pool, bt = _pool(lens, bs, Hkv, D, torch.float32, dev)
    cl = torch.tensor(lens, dtype=torch.int32, device=dev)
    for seed in range(3):
        q = torch.randn(len(lens), H, D, generator=torch.Generator().manual_seed(seed)).to(dev)
        want = paged_decode_attention(q, k_pool, v_pool, bt, cl, split=4)  # the reduce kernel (the default)
        got = paged_decode_attention(q, k_pool, v_pool, bt, cl, split=4, fused_reduce=True)
        assert torch.equal(got, want)
        assert int(pa._SPLIT_COUNTS[q.device][: len(lens) * Hkv].abs().sum()) == 0


def test_engine_one_launch_decode_gives_the_same_tokens_on_a_gpu(dev):
    """On CUDA, the engine's decode graphs with the one-launch attention (``PagedKVCache.decode_write``:
    the cache write and the split combine inside the kernel, racing programs of one head) give the
    greedy tokens of the three-launch form, batch 1 (splits) and a batch of 4, over block boundaries.
    The decode path is CUDA-only: on the CPU this skips (the kernel tests above cover the logic)."""
    if dev.type != "cuda":
        pytest.skip("the engine's decode graphs run on CUDA only")
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams
    from kiln.model import ModelConfig, Transformer

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, context_length=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256)
    model = Transformer(cfg).to(dev, torch.bfloat16).eval()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (5, 17, 33, 9)]
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    outs = []
    for one_launch in (False, True):
        eng = LLMEngine(model, None, EngineConfig(block_size=16, max_num_seqs=4, num_blocks=64))
        eng.runner.cache.decode_write = one_launch
        single = [o.token_ids for o in eng.generate(prompts[:1], p)]
        outs.append((single, [o.token_ids for o in eng.generate(prompts, p)]))
    assert outs[0] == outs[1]
