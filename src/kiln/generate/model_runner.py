"""``ModelRunner``: packs one scheduler step into a single forward pass over the paged KV cache.

The step's sequences are concatenated into one row of N tokens (no padding): token ids (1, N), their
positions (N,) inside each sequence's window, and the pool slot each token's keys/values go to. The
attention layers read the per-sequence lengths and block tables from ``PagedMetadata``. Only the last
hidden state of each sequence goes through ``lm_head``.

On CUDA, a decode step (one token per sequence) replays a CUDA graph captured for the smallest
captured batch size that holds it (padded rows write to the cache's scratch block), so the step costs
one launch instead of a few per layer (as nano-vllm and gpt-fast do; PyTorch's ``torch.cuda.graph``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from kiln.generate.sequence import Sequence
from kiln.model import PagedKVCache, PagedMetadata, Transformer


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every multiple of 16 up to max."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class ModelRunner:
    """Owns the paged cache of ``model`` and runs packed steps through it."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cuda_graph_max_batch: int = 0) -> None:
        cfg = model.config
        p = next(model.parameters())
        self.model = model
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  device=self.device, dtype=self.dtype)
        self.max_blocks_per_seq = -(-cfg.context_length // block_size)
        self.graph_max = cuda_graph_max_batch if self.device.type == "cuda" else 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self._static: dict[str, Tensor] = {}

    def prepare(self, batch: list[tuple[Sequence, int]]) -> tuple[list[int], list[int], PagedMetadata]:
        """Token ids (N,), positions (N,) and the attention metadata of one step (lists on the host)."""
        bs, scratch = self.block_size, self.cache.scratch_block
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens, ctx_lens, tables = [], [], []
        for seq, n in batch:
            c = seq.num_computed
            ids += seq.token_ids[seq.window_start + c: seq.window_start + c + n]
            pos += range(c, c + n)
            table = seq.block_table
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            q_lens.append(n)
            ctx_lens.append(c + n)
            tables.append(table)
        width = max(map(len, tables))
        dev = self.device
        meta = PagedMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor([t + [scratch] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            query_start=torch.tensor([0] + list(_cumsum(q_lens)), dtype=torch.int32, device=dev),
            query_lens=q_lens,
            context_lens_list=ctx_lens,
        )
        return ids, pos, meta

    @torch.inference_mode()
    def run(self, batch: list[tuple[Sequence, int]]) -> Tensor:
        """Logits (B, vocab_size) fp32 at the last scheduled token of each of the B sequences."""
        ids, pos, meta = self.prepare(batch)
        B = len(batch)
        if meta.decode and 0 < B <= self.graph_max:
            return self._replay(ids, pos, meta)
        dev = self.device
        self.cache.meta = meta
        was_training = self.model.training
        self.model.eval()  # the caller (a GRPO loop, the trainer's samples) keeps its own mode
        try:
            h = self.model.hidden_states(torch.tensor([ids], device=dev), torch.tensor(pos, device=dev), self.cache)
            last = (meta.query_start[1:] - 1).long()  # (B,) index of each sequence's last token in N
            return self.model.lm_head(h[0, last]).float()  # (B, V)
        finally:
            self.model.train(was_training)

    # -- CUDA graphs for decode ------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture one decode graph per size in ``graph_batch_sizes`` (largest first, one memory pool)."""
        if not self.graph_max or self.graphs:
            return
        G, dev = self.graph_max, self.device
        s = self._static = {
            "ids": torch.zeros(G, dtype=torch.long, device=dev),
            "pos": torch.zeros(G, dtype=torch.long, device=dev),
            "slots": torch.full((G,), self.cache.scratch_block * self.block_size, dtype=torch.long, device=dev),
            "tables": torch.full((G, self.max_blocks_per_seq), self.cache.scratch_block, dtype=torch.int32, device=dev),
            "lens": torch.ones(G, dtype=torch.int32, device=dev),
        }
        pool = None
        with torch.inference_mode():
            for b in reversed(graph_batch_sizes(G)):
                meta = PagedMetadata(s["slots"][:b], s["tables"][:b], s["lens"][:b],
                                     torch.arange(b + 1, dtype=torch.int32, device=dev), [1] * b, [1] * b)

                def fwd(b: int = b, meta: PagedMetadata = meta) -> Tensor:
                    self.cache.meta = meta
                    h = self.model.hidden_states(s["ids"][:b][None], s["pos"][:b], self.cache)
                    return self.model.lm_head(h[0]).float()  # (b, V)

                stream = torch.cuda.Stream(device=dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    fwd()  # warm-up outside the graph (Triton compiles, cuBLAS picks its kernels)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = fwd()
                pool = graph.pool() if pool is None else pool
                self.graphs[b] = (graph, out)
        torch.cuda.synchronize(dev)

    def _replay(self, ids: list[int], pos: list[int], meta: PagedMetadata) -> Tensor:
        if not self.graphs:
            self.capture()
        B = len(ids)
        b = min(g for g in self.graphs if g >= B)
        s = self._static
        s["ids"][:B].copy_(torch.tensor(ids), non_blocking=True)
        s["pos"][:B].copy_(torch.tensor(pos), non_blocking=True)
        s["slots"][:B].copy_(meta.slot_mapping)
        s["slots"][B:b].fill_(self.cache.scratch_block * self.block_size)  # padded rows: the scratch block
        s["lens"][:B].copy_(meta.context_lens)
        s["lens"][B:b].fill_(1)
        w = meta.block_tables.shape[1]
        s["tables"][:B, :w].copy_(meta.block_tables)
        s["tables"][:B, w:].fill_(self.cache.scratch_block)
        s["tables"][B:b].fill_(self.cache.scratch_block)
        graph, out = self.graphs[b]
        graph.replay()
        return out[:B]


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
