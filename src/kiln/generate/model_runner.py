"""``ModelRunner``: packs one scheduler step into a single forward pass over the paged KV cache.

The step's sequences are concatenated into one row of N tokens (no padding): token ids (1, N), their
positions (N,) inside each sequence's window, and the pool slot each token's keys/values go to. The
attention layers read the per-sequence lengths and block tables from ``PagedMetadata``. Only the last
hidden state of each sequence goes through ``lm_head``.

On CUDA, a decode step (one token per sequence) replays a CUDA graph captured for the smallest
captured batch size that holds it (padded rows write to the cache's scratch block), so the step costs
one launch instead of a few per layer (as nano-vllm and gpt-fast do; PyTorch's ``torch.cuda.graph``).
The engine's pure decode steps go through ``decode``: one host->device copy of the step's inputs, the
greedy ids computed in the graph, one device->host copy of B ids; with ``decode_steps`` K > 1 a second
set of graphs runs K greedy steps per replay (multi-step decode, as vLLM's multi-step scheduling), so
the host's per-step work is paid once per K tokens. Batches with sampled rows replay graphs that also
hold the sampler (``sampling.sample_tokens``: per-row temperature, top-k, top-p, seed and position in
a second static buffer), one step or K steps alike; those graphs are captured at their first use.
Batches with rows whose logits are processed (penalties, logit bias, min-tokens, min-p:
``processors``) replay graphs of a '+proc' variant, which read a third buffer (each row's slot of the
engine's ``ProcessorTable`` and its settings) and count each drawn token into its slot before the
next step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from kiln.generate.processors import ProcessorTable, ProcRow, ProcTensors, count_tokens, process_logits
from kiln.generate.sampling import (
    RowSampling,
    mode_args,
    row_keys,
    row_sampling,
    sample_with_uniform,
    sampling_mode,
    uniform,
)
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
    prompt_rows: bool = False
    """The logits rows are a prompt chunk's, every position (for prompt log-probs), not drafts'."""


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The decode batch sizes that get a CUDA graph: 1, 2, 4, 8, then every multiple of 16 up to max."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 16))
    if sizes[-1] < max_batch:
        sizes.append(max_batch)
    return sizes


class ModelRunner:
    """Owns the paged cache of ``model`` and runs packed steps through it."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int, cuda_graph_max_batch: int = 0,
                 compile_decode: bool = False, decode_steps: int = 1, vocab_limit: int | None = None,
                 compile_sampler: bool = False, prefill_kernel: bool = False) -> None:
        """``cuda_graph_max_batch``: the most decode rows (tokens) replayed from CUDA graphs; 0: none.
        ``compile_decode``: run the captured decode forward through ``torch.compile`` (fuses the norms,
        RoPE and SwiGLU between the matmuls, and at one row the matmuls too; the paged attention stays
        eager), as gpt-fast does.
        ``decode_steps``: also capture graphs that run this many greedy decode steps in a row
        (multi-step decode, ``decode(seqs, steps)``). ``vocab_limit``: greedy ids are taken below it.
        ``compile_sampler``: on CUDA, ``torch.compile`` the sampler of the sampled graphs (fewer
        kernels; dynamic batch: one compilation per variant). ``prefill_kernel``: steps with prompt
        chunks run their attention through ``kiln.kernels.paged_attention.paged_prefill_attention``
        (Triton, reading the pool through the block tables) instead of the padded batched call."""
        cfg = model.config
        self.prefill_kernel = prefill_kernel
        p = next(model.parameters())
        self.model = model
        self.device, self.dtype = p.device, p.dtype
        self.block_size = block_size
        self.cache = PagedKVCache(cfg.n_layers, num_blocks, block_size, cfg.n_kv_heads, cfg.head_dim,
                                  device=self.device, dtype=self.dtype)
        self.max_blocks_per_seq = -(-cfg.context_length // block_size)
        self.max_pos = cfg.context_length - 1
        self.graph_max = cuda_graph_max_batch if self.device.type == "cuda" else 0
        self.decode_steps = max(1, decode_steps)
        self.vocab_limit = cfg.vocab_size if vocab_limit is None else vocab_limit
        self.graphs: dict[int, _Graph] = {}  # batch rows -> one-step graph
        self.multi_graphs: dict[int, _Graph] = {}  # batch rows -> ``decode_steps``-step graph
        self.sampled_graphs: dict[tuple[int, int, str], _Graph] = {}  # (rows, steps, ``sampling_mode``)
        self._pool: Any = None  # the graphs' shared memory pool
        # coordinate_descent_tuning, as gpt-fast sets it: Inductor then also rewrites a one-row matmul
        # as a multiply-and-sum that it fuses with the norms, activations and dequantization around it
        # (torch/_inductor/decomposition.py, mm), instead of one cuBLAS call per projection.
        self._decode = (torch.compile(self._decode_core, dynamic=False, options={"coordinate_descent_tuning": True})
                        if compile_decode else self._decode_core)
        # the multi-step graph's between-steps bookkeeping (ids, positions, lengths, slots: ~10 small
        # kernels eagerly) as one fused kernel when compiled
        self._advance_fn = torch.compile(self._advance, dynamic=False) if compile_decode else self._advance
        self._sample_fn = (torch.compile(sample_with_uniform, dynamic=True)
                           if compile_sampler and self.device.type == "cuda" else sample_with_uniform)
        self.procs: ProcessorTable | None = None  # set by the engine at its first processed request
        self._s: dict[str, Tensor] = {}
        self._metas: dict[int, PagedMetadata] = {}
        self._uploaded: Any = None  # a CUDA event after the last host->device copy of the pinned rows

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
        meta.prefill_kernel = self.prefill_kernel
        return ids, pos, meta

    @torch.inference_mode()
    def run(self, items: list[StepItem]) -> Tensor:
        """Logits (sum of n_logits, vocab_size) fp32: the last ``n_logits`` positions of each item, in order."""
        if (self.graph_max and sum(len(it.tokens) for it in items) <= self.graph_max
                and all(len(it.tokens) == it.n_logits <= MAX_ROW_TOKENS for it in items)):
            return self._replay(items)  # per-token rows through a captured graph
        ids, pos, meta = self.prepare(items)
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
    #
    # The graphs read one int64 device buffer, filled each step by ONE host->device copy from a pinned
    # host buffer of the same layout: [ids (G) | positions (G) | slots (G) | lengths (G) | tables (G, MB)].
    # Padded rows (past the step's B) stay in the scratch state (slot in the scratch block, length 1,
    # table all scratch) and are rewritten only when a row stops being used; a row's block table is
    # written only where it grew since the last step (a list identity check: tables only grow in place).
    # Inside the graph, the lengths and tables are cast to the int32 the attention kernel reads, the
    # forward runs, and the greedy ids are taken (argmax below ``vocab_limit``), so a greedy step brings
    # back B ids, not B x V logits. A multi-step graph runs ``decode_steps`` forwards in a row, each
    # feeding its argmax to the next and advancing positions, slots and lengths on the device.
    # A sampled graph ('sample': temperature only; 'top64', 'top1024': top-k thresholds from that many
    # candidates; 'sort': a sort per row, for top-p without top-k; see ``sampling_mode``) also reads
    # a second buffer, [temperature (G, f64 bits) | top_k (G) | top_p (G, f64 bits) | seed (G) |
    # position (G)], filled by a second copy, and feeds the sampler's token to the next step instead
    # of the argmax; step j of a graph draws at position + j. Padded rows are greedy (temperature 0).

    def capture(self, modes: tuple[str, ...] = ("greedy",)) -> None:
        """Capture the decode graphs for every row count in ``graph_batch_sizes`` (largest first, one
        memory pool): one step each, and ``decode_steps`` steps each when that is > 1; greedy, and the
        sampled variants in ``modes`` (``sampling_mode``'s names; otherwise captured at first use).
        Graphs already captured are kept."""
        if not self.graph_max:
            return
        if not self._s:
            self._alloc_static()
        with torch.inference_mode(), self._compile_limit():
            for b in reversed(graph_batch_sizes(self.graph_max)):
                for steps in sorted({1, self.decode_steps}):
                    for mode in ("greedy", *modes):
                        table = (self.graphs if steps == 1 else self.multi_graphs) if mode == "greedy" else None
                        if table is not None and b not in table:
                            table[b] = self._capture_one(b, steps, mode)
                        elif table is None and (b, steps, mode) not in self.sampled_graphs:
                            self.sampled_graphs[b, steps, mode] = self._capture_one(b, steps, mode)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)

    def _capture_one(self, b: int, steps: int, mode: str) -> _Graph:
        """One graph of ``b`` rows running ``steps`` decode steps, ``mode`` 'greedy' or a sampled one
        (``sampling_mode``; emulated on the CPU: an empty entry, the body runs eagerly at launch)."""
        dev = self.device
        if dev.type != "cuda":  # emulation for tests: the same static buffers, run eagerly
            return _Graph(None, None, None)
        if steps == 1 or mode != "greedy":  # warm-up outside the graph (Triton compiles, cuBLAS picks,
            stream = torch.cuda.Stream(device=dev)  # torch.compile); a sampled graph's warm-up runs the
            stream.wait_stream(torch.cuda.current_stream(dev))  # step it is captured for: the same
            with torch.cuda.stream(stream):  # keys/values written twice, nothing else changed
                self._graph_body(b, 1, mode, count=False)  # a processed row's counts stay as they are
            torch.cuda.current_stream(dev).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits, ids = self._graph_body(b, steps, mode)
        self._pool = graph.pool() if self._pool is None else self._pool
        return _Graph(graph, logits if steps == 1 else None, ids)  # K steps: ids only

    def _alloc_static(self) -> None:
        """The pinned host buffer, its device twin (both in the padded state) and the int32 views."""
        G, MB = self.graph_max, self.max_blocks_per_seq
        pin = self.device.type == "cuda"
        self._host = torch.zeros(4 * G + G * MB, dtype=torch.long, pin_memory=pin)
        self._np = self._host.numpy()
        self._row_tables = [None] * G
        self._row_lens = [0] * G
        self._rows_used = G
        self._pad_rows(0)
        self._inp = self._host.to(self.device)
        inp = self._inp
        self._s = {"ids": inp[:G], "pos": inp[G:2 * G], "slots": inp[2 * G:3 * G], "lens64": inp[3 * G:4 * G],
                   "tables64": inp[4 * G:].view(G, MB),
                   "lens": torch.ones(G, dtype=torch.int32, device=self.device),
                   "tables": torch.full((G, MB), self.cache.scratch_block, dtype=torch.int32, device=self.device)}
        self._host_sp = torch.zeros(5 * G, dtype=torch.long, pin_memory=pin)  # the sampling rows (see above)
        self._np_sp = self._host_sp.numpy()
        self._np_sp.view(np.float64)[2 * G:3 * G] = 1.0  # top_p 1: none
        sp = self._host_sp.to(self.device)
        self._s.update(sp=sp, temp64=sp[:G].view(torch.float64), top_k=sp[G:2 * G],
                       top_p64=sp[2 * G:3 * G].view(torch.float64), seed=sp[3 * G:4 * G], draw_pos=sp[4 * G:])
        self._host_pp = torch.zeros(6 * G, dtype=torch.long, pin_memory=pin)  # the processed rows
        self._np_pp = self._host_pp.numpy()  # [slot | presence | frequency | repetition | min_p (f64 bits) | ban_steps]
        self._s["pp"] = self._host_pp.to(self.device)

    def _pad_rows(self, start: int) -> None:
        """Rows ``start..`` (up to the last used one) of the host buffer back to the scratch state."""
        G, MB, a, np_ = self.graph_max, self.max_blocks_per_seq, self._rows_used, self._np
        if start >= a:
            return
        np_[start:a] = 0
        np_[G + start:G + a] = 0
        np_[2 * G + start:2 * G + a] = self.cache.scratch_block * self.block_size
        np_[3 * G + start:3 * G + a] = 1
        np_[4 * G + start * MB:4 * G + a * MB] = self.cache.scratch_block
        for r in range(start, a):
            self._row_tables[r], self._row_lens[r] = None, 0
        self._rows_used = start

    def _write_rows(self, rows: list[tuple[int, int, list[int]]]) -> None:
        """Host buffer rows 0..B-1 from (token id, position, block table) each; rows past B padded."""
        G, MB, bs, np_ = self.graph_max, self.max_blocks_per_seq, self.block_size, self._np
        if self._uploaded is not None:  # the last step's copy out of the pinned buffer has finished
            self._uploaded.synchronize()  # (callers sync on the results anyway: this costs nothing)
        for i, (tok, p, table) in enumerate(rows):
            np_[i], np_[G + i], np_[3 * G + i] = tok, p, p + 1
            np_[2 * G + i] = table[p // bs] * bs + p % bs
            base, n = 4 * G + i * MB, len(table)
            if self._row_tables[i] is not table:  # another sequence (or a new table) in this row
                np_[base:base + n] = table
                np_[base + n:base + max(n, self._row_lens[i])] = self.cache.scratch_block
            elif self._row_lens[i] < n:  # the same table, grown: only the new block ids
                np_[base + self._row_lens[i]:base + n] = table[self._row_lens[i]:]
            self._row_tables[i], self._row_lens[i] = table, n
        self._rows_used = max(self._rows_used, len(rows))
        self._pad_rows(len(rows))

    def _write_sampling(self, rows: list[RowSampling]) -> None:
        """Sampling rows 0..B-1 of the host buffer from ``rows``; rows past B greedy; then its upload."""
        G, B, np_ = self.graph_max, len(rows), self._np_sp
        f64 = np_.view(np.float64)
        temp, top_k, top_p, seed, pos = zip(*rows)
        f64[:B], np_[G:G + B], f64[2 * G:2 * G + B] = temp, top_k, top_p
        np_[3 * G:3 * G + B], np_[4 * G:4 * G + B] = seed, pos
        f64[B:G] = 0.0
        self._s["sp"].copy_(self._host_sp, non_blocking=True)  # the event _upload records covers it

    def _write_proc(self, rows: list[ProcRow]) -> None:
        """Processing rows 0..B-1 of the host buffer from ``rows``; rows past B in the table's dummy
        slot (logits unchanged); then its upload."""
        G, B, np_ = self.graph_max, len(rows), self._np_pp
        f64 = np_.view(np.float64)
        slot, pres, freq, rep, min_p, ban = zip(*rows)
        np_[:B], np_[5 * G:5 * G + B] = slot, ban
        f64[G:G + B], f64[2 * G:2 * G + B], f64[3 * G:3 * G + B], f64[4 * G:4 * G + B] = pres, freq, rep, min_p
        np_[B:G], np_[5 * G + B:] = self.procs.dummy, 0
        f64[G + B:2 * G], f64[2 * G + B:3 * G], f64[3 * G + B:4 * G], f64[4 * G + B:5 * G] = 0.0, 0.0, 1.0, 0.0
        self._s["pp"].copy_(self._host_pp, non_blocking=True)  # the event _upload records covers it

    def _proc_rows(self, b: int) -> ProcTensors:
        """The first ``b`` processing rows of the device buffer, cast for ``process_logits``."""
        G, pp = self.graph_max, self._s["pp"]
        f32 = [pp[k * G:k * G + b].view(torch.float64).float() for k in (1, 2, 3, 4)]
        return ProcTensors(pp[:b], *f32, pp[5 * G:5 * G + b])

    def _upload(self, b: int) -> None:
        """One host->device copy: every row's ids/positions/slots/lengths and the first b tables."""
        n = 4 * self.graph_max + b * self.max_blocks_per_seq
        self._inp[:n].copy_(self._host[:n], non_blocking=True)
        if self.device.type == "cuda":
            self._uploaded = torch.cuda.Event()
            self._uploaded.record()

    def _meta(self, b: int) -> PagedMetadata:
        """Metadata over the first ``b`` static rows. On CUDA one object per b (torch.compile guards on
        it; the kernel reads the device lengths); emulated on the CPU, a fresh one with the host copy of
        the lengths (the PyTorch attention path sizes its gather by them)."""
        s, dev = self._s, self.device
        if dev.type == "cuda" and b in self._metas:
            return self._metas[b]
        lens = s["lens"][:b].tolist() if dev.type != "cuda" else [1] * b
        meta = PagedMetadata(s["slots"][:b], s["tables"][:b], s["lens"][:b],
                             torch.arange(b + 1, dtype=torch.int32, device=dev), [1] * b, lens)
        if dev.type == "cuda":
            self._metas[b] = meta
        return meta

    def _graph_body(self, b: int, steps: int, mode: str = "greedy", count: bool = True) -> tuple[Tensor, Tensor]:
        """What a graph holds: cast the inputs, then ``steps`` forwards, each fed the previous token
        (the argmax; with a sampled ``mode``, the sampler's draw at the row's position + j; with a
        '+proc' one, of the processed logits, each drawn token counted in its row's slot unless
        ``count`` is False: the warm-up before a capture).
        Returns the last step's logits (b, V) fp32 and the ids (b, steps) int64."""
        s = self._s
        s["lens"][:b].copy_(s["lens64"][:b])
        s["tables"][:b].copy_(s["tables64"][:b])
        out = torch.empty(b, steps, dtype=torch.long, device=self.device)
        base, proc = mode.removesuffix("+proc"), mode.endswith("+proc")
        if base != "greedy":  # the settings cast and every step's random number hashed once per graph
            temp, top_p = s["temp64"][:b].float(), s["top_p64"][:b].float()  # (b,) fp32
            draw_pos = s["draw_pos"][:b, None] + torch.arange(steps, device=self.device)  # (b, steps)
            u = uniform(row_keys(s["seed"][:b, None], draw_pos))  # (b, steps) float64
        pr = self._proc_rows(b) if proc else None
        for j in range(steps):
            self.cache.meta = self._meta(b)
            logits, nxt = self._decode(s["ids"][:b], s["pos"][:b])
            drawn = logits[:, :self.vocab_limit]
            if proc:  # penalties, bias, bans with the tokens of steps < j counted
                drawn = process_logits(drawn, self.procs, pr, j)
                nxt = drawn.argmax(dim=-1)
            if base != "greedy":
                nxt = self._sample_fn(drawn, temp, s["top_k"][:b], top_p, u[:, j], *mode_args(base),
                                      min_p=pr.min_p if proc else None)
            if proc and count:
                count_tokens(self.procs, pr.slot, nxt)
            out[:, j] = nxt
            if j + 1 < steps:
                self._advance_fn(b, nxt)
        return logits, out

    def _advance(self, b: int, nxt: Tensor) -> None:
        """On the device: the next step's ids, positions (clamped inside the context: rows past their
        last real token compute throw-away tokens), lengths and slots."""
        s, bs = self._s, self.block_size
        s["ids"][:b].copy_(nxt)
        pos = s["pos"][:b]
        pos.add_(1).clamp_(max=self.max_pos)
        s["lens"][:b].copy_(pos + 1)
        block = s["tables64"][:b].gather(1, (pos // bs)[:, None])[:, 0]
        s["slots"][:b].copy_(block * bs + pos % bs)

    def _decode_core(self, ids: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        """ids, pos (b,) -> logits (b, V) fp32 and their greedy ids (b,) below ``vocab_limit``, one token
        per row (the cache's ``meta`` is set). Compiled, the argmax fuses into the head's kernel."""
        h = self.model.hidden_states(ids[None], pos, self.cache)
        logits = self.model.lm_head(h[0]).float()
        return logits, logits[:, :self.vocab_limit].argmax(dim=-1)

    def _compile_limit(self) -> Any:
        """Where the compiled step is traced (the capture; emulated graphs' first use): one compilation
        per batch size, so dynamo's recompile limit (8) is lifted, or the sizes past the eighth would
        silently run uncompiled inside their graphs."""
        return torch._dynamo.config.patch(recompile_limit=4 * len(graph_batch_sizes(self.graph_max)) + 8)

    def _launch(self, b: int, steps: int, mode: str = "greedy") -> tuple[Tensor, Tensor]:
        if mode == "greedy":
            g = (self.graphs if steps == 1 else self.multi_graphs)[b]
        elif (b, steps, mode) in self.sampled_graphs:
            g = self.sampled_graphs[b, steps, mode]
        else:  # a sampled graph is captured at its first use (most runs need few of them)
            with self._compile_limit():
                g = self.sampled_graphs[b, steps, mode] = self._capture_one(b, steps, mode)
        if g.graph is None:  # emulated on the CPU (tests): traced here, at first use
            with self._compile_limit():
                return self._graph_body(b, steps, mode)
        g.graph.replay()
        return g.logits, g.ids

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence], steps: int = 1, proc: list[ProcRow] | None = None,
               logits_only: bool = False) -> tuple[list[list[int]], Tensor | None]:
        """A decode step of every sequence in ``seqs`` (each has exactly one uncomputed token, and
        blocks for ``steps`` more tokens) through a captured graph. Greedy sequences take the argmax,
        sampled ones (temperature > 0) the sampler's draw at their seed and the position of the token
        (``len(token_ids)``, + j at step j). ``proc``: each row's processing (``ProcessorTable.rows``;
        the logits are processed before the draw). ``logits_only``: one greedy step whatever the
        rows' settings, for a caller that draws from the logits itself (structured output's masks
        come from the host each token). Returns the ids, B lists of ``steps`` (one device->host
        copy), and for ``steps == 1`` the logits (B, V) fp32 on the device, unprocessed (for
        log-probabilities; None after a multi-step CUDA graph)."""
        if not self.graphs:
            self.capture()
        if steps not in (1, self.decode_steps):
            raise ValueError(f"steps={steps}: this runner captured 1 and {self.decode_steps}")
        B = len(seqs)
        b = min(g for g in self.graphs if g >= B)
        self._write_rows([(seq.token_ids[-1], seq.num_computed, seq.block_table) for seq in seqs])
        sampling, mode = None, "greedy"
        if logits_only:
            proc = None
        elif any(seq.params.temperature > 0 for seq in seqs):
            sampling = [row_sampling(seq.params, seq.seed, len(seq.token_ids)) for seq in seqs]
            mode = sampling_mode(sampling)
        if mode != "greedy":
            self._write_sampling(sampling)
        if proc is not None:
            self._write_proc(proc)
            mode += "+proc"
        self._upload(b)
        logits, ids = self._launch(b, steps, mode)
        return ids[:B].tolist(), None if logits is None else logits[:B]

    def _replay(self, items: list[StepItem]) -> Tensor:
        """Run per-token rows (decode, or speculative verification) through the one-step graph that
        holds them: logits (rows, V) fp32."""
        if not self.graphs:
            self.capture()
        rows = [(tok, it.start + j, it.seq.block_table) for it in items for j, tok in enumerate(it.tokens)]
        b = min(g for g in self.graphs if g >= len(rows))
        self._write_rows(rows)
        self._upload(b)
        return self._launch(b, 1)[0][:len(rows)]


class _Graph(NamedTuple):
    """A captured decode graph and its output buffers (all None when emulated on the CPU)."""

    graph: Any
    logits: Any
    ids: Any


def _cumsum(xs: list[int]) -> list[int]:
    out, total = [], 0
    for x in xs:
        total += x
        out.append(total)
    return out
