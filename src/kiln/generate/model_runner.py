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

from dataclasses import dataclass

import torch
from torch import Tensor

from kiln.generate.sequence import Sequence
from kiln.model import PagedKVCache, PagedMetadata, Transformer

MAX_ROW_TOKENS = 8  # most tokens of one sequence run as per-token decode rows (speculative verification)


@dataclass
class StepItem:
    """One sequence's share of a step: ``tokens`` fed at window positions ``start, start + 1, ...``
    (their keys/values land in ``seq``'s blocks), and logits wanted at the last ``n_logits`` of them."""

    seq: Sequence
    start: int
    tokens: list[int]
    n_logits: int = 1


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every multiple of 16 up to max."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class ModelRunner:
    """Owns the paged cache of ``model`` and runs packed steps through it."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cuda_graph_max_batch: int = 0,
                 compile_decode: bool = False) -> None:
        """``cuda_graph_max_batch``: the most decode rows (tokens) replayed from CUDA graphs; 0: none.
        ``compile_decode``: run the captured decode forward through ``torch.compile`` (fuses the norms,
        RoPE and SwiGLU between the matmuls; the paged attention stays eager), as gpt-fast does."""
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
        self._decode = torch.compile(self._decode_core, dynamic=False) if compile_decode else self._decode_core
        self._static: dict[str, Tensor] = {}

    def prepare(self, items: list[StepItem]) -> tuple[list[int], list[int], PagedMetadata]:
        """Token ids (N,), positions (N,) and the attention metadata of one step (lists on the host).

        On CUDA (or with graphs), when every item wants logits at all its tokens and has at most
        ``MAX_ROW_TOKENS`` (decode, and speculative verification), each token becomes its own attention row (its sequence's block
        table, context up to itself): the step is then a decode step for the attention kernel and for
        the CUDA graphs, whatever the number of draft tokens.
        """
        bs, scratch = self.block_size, self.cache.scratch_block
        # On the CPU without graphs a verify chunk is cheaper as one query block than as k+1 rows that
        # each gather the whole context.
        rows_ok = self.device.type == "cuda" or self.graph_max > 0
        per_token = rows_ok and all(len(it.tokens) == it.n_logits <= MAX_ROW_TOKENS for it in items)
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_lens, ctx_lens, tables = [], [], []
        for it in items:
            c, n, table = it.start, len(it.tokens), it.seq.block_table
            ids += it.tokens
            pos += range(c, c + n)
            slots += [table[p // bs] * bs + p % bs for p in range(c, c + n)]
            if per_token:
                q_lens += [1] * n
                ctx_lens += range(c + 1, c + n + 1)
                tables += [table] * n
            else:
                q_lens.append(n)
                ctx_lens.append(c + n)
                tables.append(table)
        width = max(map(len, tables))
        dev = self.device
        meta = PagedMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            block_tables=torch.tensor([t + [scratch] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev),
            context_lens=torch.tensor(ctx_lens, dtype=torch.int32, device=dev),
            query_start=torch.tensor([0, *_cumsum(q_lens)], dtype=torch.int32, device=dev),
            query_lens=q_lens,
            context_lens_list=ctx_lens,
        )
        return ids, pos, meta

    @torch.inference_mode()
    def run(self, items: list[StepItem]) -> Tensor:
        """Logits (sum of n_logits, vocab_size) fp32: the last ``n_logits`` positions of each item, in order."""
        ids, pos, meta = self.prepare(items)
        if meta.decode and all(it.n_logits == len(it.tokens) for it in items) and len(ids) <= self.graph_max:
            return self._replay(ids, pos, meta)
        dev = self.device
        self.cache.meta = meta
        rows: list[int] = []
        for it, end in zip(items, _cumsum([len(it.tokens) for it in items])):
            rows += range(end - it.n_logits, end)
        was_training = self.model.training
        if was_training:  # the caller (a GRPO loop, the trainer's samples) keeps its own mode
            self.model.eval()
        try:
            h = self.model.hidden_states(torch.tensor([ids], device=dev), torch.tensor(pos, device=dev), self.cache)
            return self.model.lm_head(h[0, torch.tensor(rows, device=dev)]).float()  # (rows, V)
        finally:
            if was_training:
                self.model.train()

    # -- CUDA graphs for decode ------------------------------------------------------------------------

    def capture(self) -> None:
        """Capture one decode graph per row count in ``graph_batch_sizes`` (largest first, one memory pool)."""
        if not self.graph_max or self.graphs:
            return
        G, dev = self.graph_max, self.device
        self._static = {
            "ids": torch.zeros(G, dtype=torch.long, device=dev),
            "pos": torch.zeros(G, dtype=torch.long, device=dev),
            "slots": torch.full((G,), self.cache.scratch_block * self.block_size, dtype=torch.long, device=dev),
            "tables": torch.full((G, self.max_blocks_per_seq), self.cache.scratch_block, dtype=torch.int32, device=dev),
            "lens": torch.ones(G, dtype=torch.int32, device=dev),
        }
        pool = None
        with torch.inference_mode():
            for b in reversed(graph_batch_sizes(G)):
                meta = self._static_meta(b, [1] * b)
                if dev.type != "cuda":  # emulation for tests: the same static buffers, run eagerly
                    self.graphs[b] = (None, None)
                    continue
                stream = torch.cuda.Stream(device=dev)
                stream.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(stream):
                    self._static_forward(b, meta)  # warm-up outside the graph (Triton compiles, cuBLAS picks)
                torch.cuda.current_stream(dev).wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    out = self._static_forward(b, meta)
                pool = graph.pool() if pool is None else pool
                self.graphs[b] = (graph, out)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)

    def _static_meta(self, b: int, lens: list[int]) -> PagedMetadata:
        """Metadata over the first ``b`` rows of the static buffers (``lens``: host copy, for the
        PyTorch attention path; the CUDA kernel reads the device lengths)."""
        s, dev = self._static, self.device
        return PagedMetadata(s["slots"][:b], s["tables"][:b], s["lens"][:b],
                             torch.arange(b + 1, dtype=torch.int32, device=dev), [1] * b, lens)

    def _static_forward(self, b: int, meta: PagedMetadata) -> Tensor:
        """The decode forward over static buffers: logits (b, V) fp32."""
        s = self._static
        self.cache.meta = meta
        return self._decode(s["ids"][:b], s["pos"][:b])

    def _decode_core(self, ids: Tensor, pos: Tensor) -> Tensor:
        """ids, pos (b,) -> logits (b, V) fp32, one token per row (the cache's ``meta`` is set)."""
        h = self.model.hidden_states(ids[None], pos, self.cache)
        return self.model.lm_head(h[0]).float()

    def _replay(self, ids: list[int], pos: list[int], meta: PagedMetadata) -> Tensor:
        """Run a decode step of len(ids) rows through the smallest captured graph that holds it."""
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
        if graph is None:  # emulated on the CPU (tests)
            return self._static_forward(b, self._static_meta(b, s["lens"][:b].tolist()))[:B]
        graph.replay()
        return out[:B]


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
