"""``LLMEngine``: many requests decoded together over one paged KV cache (the layout of nano-vllm).

    engine = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=64))
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=100, temperature=0.7, seed=1))
    while engine.has_unfinished():
        for out in engine.step():            # one scheduler step: outputs of requests that advanced
            print(out.request_id, out.new_text, out.finished)

A step asks the ``Scheduler`` which sequences run and how many tokens each (continuous batching,
chunked prefill, preemption by recompute), the ``ModelRunner`` runs them as one packed forward over the
``PagedKVCache`` whose blocks the ``BlockManager`` hands out (prefix sharing), then every sequence whose
window is fully computed draws its next token (``sampling.sample_tokens``: a hash of the request's seed
and the token's position, so the same on every path; penalties, logit bias and min-tokens applied
first by ``processors``) and checks its stop conditions.
The engine is single-threaded; a server wraps it in its own thread. See docs/engine.md.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kiln.generate.block_manager import BlockManager
from kiln.generate.model_runner import MAX_ROW_TOKENS, ModelRunner, StepItem
from kiln.generate.processors import ProcessorTable, ProcRow, check_processing, process_logits
from kiln.generate.sampling import (
    RowSampling,
    SamplingParams,
    draw_tokens,
    row_sampling,
)
from kiln.generate.scheduler import Scheduler
from kiln.generate.structured import Guide
from kiln.generate.sequence import Sequence, Status
from kiln.generate.speculative import make_proposer
from kiln.generate.streamer import TextStreamer
from kiln.model import Transformer


def window_keep(context_length: int) -> int:
    """Tokens kept when a full context slides: the most recent 3/4, re-encoded from position 0
    (one re-encode per ``context_length // 4`` new tokens instead of one per token)."""
    return max(1, context_length - context_length // 4)


@dataclass(frozen=True)
class EngineConfig:
    """Sizes and switches of one ``LLMEngine``."""

    block_size: int = 16
    """Tokens per KV-cache block (a power of two for the Triton decode kernel)."""
    num_blocks: int | None = None
    """Blocks in the pool. None: room for ``max_num_seqs`` full contexts, capped on CUDA at
    ``gpu_memory_fraction`` of the free memory."""
    max_num_seqs: int = 64
    """Most sequences running at once (the largest decode batch)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: prompts longer than what is left are prefilled in chunks."""
    enable_prefix_caching: bool = True
    """Share full KV blocks between requests with the same prefix (hash-chained, reference-counted)."""
    cuda_graphs: bool = True
    """On CUDA, replay a captured graph for decode steps of up to ``max_num_seqs`` sequences."""
    compile_decode: bool = False
    """Also ``torch.compile`` the captured decode step (fusing the elementwise work between matmuls, and
    at one row the matmuls with it; coordinate-descent tuning, as gpt-fast: slower to compile; one
    compilation per captured batch size, so best with a small ``max_num_seqs``)."""
    decode_steps: int = 8
    """Multi-step decode (as vLLM's multi-step scheduling): when no running sequence wants
    log-probabilities and nothing waits, one CUDA graph runs this many decode steps, each feeding its
    token (argmax, or the sampler's draw inside the graph) to the next, and the host checks stops
    afterwards (tokens past a stop are dropped). Output is token for token the single-step one,
    greedy and sampled alike. 1: single-step. CUDA graphs only."""
    compile_sampler: bool = False
    """On CUDA, ``torch.compile`` the sampler inside the sampled decode graphs (its softmax, cumulative
    sum and count fuse into fewer kernels; one compilation per variant, dynamic in the batch). Off,
    the sampler runs as ~10 eager kernels inside the graph. Same tokens either way, up to the
    rounding of the softmax."""
    gpu_memory_fraction: float = 0.5
    """With ``num_blocks=None`` on CUDA: at most this fraction of the free GPU memory for the cache."""
    eos_token_id: int | None = None
    """End-of-text id that ends a request; None: the tokenizer's ``eot_id`` (if any)."""
    vocab_limit: int | None = None
    """Never sample ids >= this (a model's vocabulary padded past the tokenizer's); None: the
    tokenizer's ``vocab_size`` if it has one, else the model's."""
    speculative: str = "none"
    """Speculative decoding of greedy requests: 'none', 'ngram' (prompt lookup: drafts copied from an
    earlier occurrence of the last few tokens) or 'draft' (a small Kiln model, ``LLMEngine(draft_model=)``).
    The output is exactly plain greedy decoding's; sampled requests speculate only with ``speculative_sampling``."""
    speculative_sampling: bool = False
    """Also speculate for sampled requests (temperature > 0): a draft is kept when it equals the
    sampler's draw at its position (a deterministic proposal is accepted with probability p(draft),
    as rejection sampling does), so a seed draws the same tokens as without speculation."""
    num_speculative_tokens: int = 4
    """Draft tokens verified per step and sequence."""
    ngram_max: int = 3
    """Prompt lookup: the longest tail n-gram searched for (then shorter ones, down to 1)."""
    context_overflow: str = "stop"
    """When a sequence fills the context: 'stop' ends it (finish_reason 'length') and refuses longer
    prompts; 'slide' re-encodes its most recent 3/4 and goes on (old ``kiln generate`` behaviour)."""
    admission_wait_ms: float = 0.0
    """While sequences decode on the lean path (CUDA graphs), a request that arrives waits up to this
    long before a general step admits it, the running ones taking lean steps meanwhile; requests that
    arrive close together are then admitted by one general step instead of one each (a server's
    arrivals are spread in time; a general step runs its forward eagerly and advances every running
    sequence by one token, a lean one by ``decode_steps``). No wait when nothing runs or the waiting
    requests fill the free slots. 0: admitted at the next step. vLLM v0's ``scheduler_delay_factor``
    in milliseconds. Greedy output is unchanged; time to first token grows by at most the wait."""

    prefill_kernel: bool = True
    """On CUDA, steps with prompt chunks run attention through Kiln's Triton prefill kernel
    (``kiln.kernels.paged_attention.paged_prefill_attention``: query tiles of one sequence each, keys
    read through the block table), whose work grows with the real tokens. False: the padded path,
    which pads every chunk to the longest and every context to the longest (one masked call a layer).
    Measured on an H100 (docs/benchmarks.md, "The Triton prefill kernel on the H100"): 4.9x torch
    SDPA on the padded batch for a chat wave of 64 prompts at GPT-2-small's heads, 15x at
    Llama-2-7B's; the c=64 chat rows' prompt-admitting steps 13-19 ms instead of 39-120 ms, direct
    throughput 1.3x. Elsewhere (CPU) the readable PyTorch paths run either way."""
    mixed_steps: bool = False
    """On the lean path (CUDA graphs): when requests are admitted, or prompts are still being
    prefilled, while others decode, run the decoding ones' ``decode_steps`` tokens through the decode
    graph and the prompts through an eager forward of their own in the same step (a *mixed* step),
    instead of one general step that runs everything eagerly and advances each decoding sequence by
    one token. A server's arrivals come spread in time, so without it every arrival costs the running
    sequences a multi-step round. Same tokens either way (greedy and seeded sampling)."""

    def __post_init__(self) -> None:
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps={self.decode_steps} must be >= 1 (1 = single-step decode)")
        if self.block_size < 1 or self.max_num_seqs < 1:
            raise ValueError(f"block_size={self.block_size} and max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.speculative not in ("none", "ngram", "draft"):
            raise ValueError(f"speculative={self.speculative!r}; use 'none', 'ngram' or 'draft'")
        if self.num_speculative_tokens < 1 or self.ngram_max < 1:
            raise ValueError("num_speculative_tokens and ngram_max must be >= 1")
        if self.context_overflow not in ("stop", "slide"):
            raise ValueError(f"context_overflow={self.context_overflow!r}; use 'stop' or 'slide'")
        if self.admission_wait_ms < 0:
            raise ValueError(f"admission_wait_ms={self.admission_wait_ms} must be >= 0")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= "
                             f"max_num_seqs={self.max_num_seqs} (every running sequence decodes one token a step)")


@dataclass(frozen=True)
class RequestMetrics:
    """When a finished request reached each phase, on the engine's clock (``LLMEngine.clock``,
    ``time.monotonic`` by default; seconds). A request aborted before a phase has None there."""

    arrival: float
    first_scheduled: float | None
    first_token: float | None
    finished: float

    @property
    def queue_time(self) -> float | None:
        """Waiting before its first step (vLLM's ``time_in_queue``)."""
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def prefill_time(self) -> float | None:
        """From its first step to its first token (the prompt's chunks, and any wait between them)."""
        return None if self.first_token is None or self.first_scheduled is None else self.first_token - self.first_scheduled

    @property
    def decode_time(self) -> float | None:
        """From its first token to its end."""
        return None if self.first_token is None else self.finished - self.first_token


@dataclass
class RequestOutput:
    """A request's state after a step (``step`` returns one per request that advanced)."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    """Every token generated so far (a stop token id or end-of-text that ended it included)."""
    new_token_ids: list[int]
    """Tokens generated in this step."""
    text: str
    """Decoded text so far ('' without a tokenizer), cut before a stop string; while a stop string
    could still be completing, its possible start is held back."""
    new_text: str
    """The part of ``text`` new in this step."""
    logprobs: list[dict[int, float]] | None
    """One dict per new token {token id: log-prob}: the sampled token first, then the top
    alternatives (``SamplingParams.logprobs``); None when not asked for."""
    finished: bool
    finish_reason: str | None
    """'stop' (end-of-text, stop token or string), 'length' (max_tokens or context), 'abort', or None."""
    num_prompt_tokens: int
    num_generated_tokens: int
    prompt_logprobs: list[dict[int, float] | None] | None = None
    """With ``SamplingParams.prompt_logprobs``: None for the first prompt token, then one dict per prompt
    token {its id: log-prob, then the top alternatives}, once the whole prompt is computed."""
    metrics: RequestMetrics | None = None
    """On a finished request's output: when it arrived, first ran, drew its first token and ended."""


class LLMEngine:
    """Continuous-batching generation over a paged KV cache for a Kiln ``Transformer``."""

    def __init__(self, model: Transformer, tokenizer: Any = None, config: EngineConfig | None = None,
                 draft_model: Transformer | None = None) -> None:
        """``draft_model``: the small model that drafts tokens when ``config.speculative == 'draft'``
        (same vocabulary; it gets its own paged cache with the same block tables)."""
        config = EngineConfig() if config is None else config
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        mc = model.config
        self.context_length = mc.context_length
        self.device = next(model.parameters()).device
        self.eos = config.eos_token_id if config.eos_token_id is not None else getattr(tokenizer, "eot_id", None)
        tok_vocab = getattr(tokenizer, "vocab_size", None)
        limit = config.vocab_limit if config.vocab_limit is not None else tok_vocab
        self.vocab_limit = mc.vocab_size if not isinstance(limit, int) else min(limit, mc.vocab_size)
        num_blocks = config.num_blocks or self._default_num_blocks()
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, config.max_num_seqs, config.max_num_batched_tokens, self._lookahead)
        rows = config.max_num_seqs * (1 + config.num_speculative_tokens if config.speculative != "none" else 1)
        graphs = rows if config.cuda_graphs else 0
        self.runner = ModelRunner(model, num_blocks, config.block_size, graphs, config.compile_decode,
                                  config.decode_steps if config.speculative == "none" else 1, self.vocab_limit,
                                  config.compile_sampler, config.prefill_kernel and self.device.type == "cuda")
        self.max_seq_tokens = min(mc.context_length, num_blocks * config.block_size)
        self.proposer = make_proposer(config, model, draft_model, num_blocks, self.vocab_limit)
        if config.num_speculative_tokens + 1 > MAX_ROW_TOKENS and config.speculative != "none":
            raise ValueError(f"num_speculative_tokens must be <= {MAX_ROW_TOKENS - 1}")
        self.spec_counts = {"proposed": 0, "accepted": 0}
        # step() calls, of which 'lean_steps' took the lean (graph) decode path; wall seconds inside
        # step() (with a run's wall time: how busy the engine was), of which 'general_seconds' in
        # general steps (and in mixed ones); and the prompt tokens general and mixed steps computed
        self.counters = _zero_counters()
        self.clock = time.monotonic  # when requests arrive (``admission_wait_ms``); tests set their own
        self._seqs: dict[str, Sequence] = {}
        self.procs: ProcessorTable | None = None  # made at the first request with processed logits
        self.guide: Guide | None = None  # made at the first request with structured output
        self._ids = itertools.count()
        self.num_finished = 0

    def _default_num_blocks(self) -> int:
        cfg, mc = self.config, self.model.config
        want = cfg.max_num_seqs * -(-mc.context_length // cfg.block_size)
        if self.device.type != "cuda":
            return want
        itemsize = next(self.model.parameters()).element_size()
        per_block = 2 * mc.n_layers * cfg.block_size * mc.n_kv_heads * mc.head_dim * itemsize
        free, _ = torch.cuda.mem_get_info(self.device)
        return max(1, min(want, int(free * cfg.gpu_memory_fraction) // per_block))

    # -- requests ---------------------------------------------------------------------------------------

    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a request; returns its id (``request_id`` or a fresh one). Raises ValueError on a bad
        prompt (empty, an id outside the vocabulary, too long for the context or the cache)."""
        params = SamplingParams() if params is None else params
        rid = str(next(self._ids)) if request_id is None else str(request_id)
        if rid in self._seqs:
            raise ValueError(f"request_id {rid!r} is already in the engine")
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("prompt is empty; give at least one token (e.g. the end-of-text id)")
        V = self.model.config.vocab_size
        bad = [t for t in prompt if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the model's vocabulary of {V}; "
                             "the tokenizer does not match this model")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine to have a tokenizer; use stop_token_ids instead")
        if params.processed:
            check_processing(params, self.vocab_limit, self.eos)
        seed = params.seed if params.seed is not None else secrets.randbits(64)  # unseeded: a random one
        streamer = None
        if self.tokenizer is not None:
            streamer = TextStreamer(self.tokenizer)
        seq = Sequence(rid, prompt, params, seed, streamer)
        if params.structured is not None:
            seq.matcher = self._guide().matcher(params.structured)
        seq.arrival = self.clock()
        if self.config.context_overflow == "slide":
            seq.window_start = max(0, len(prompt) - self.max_seq_tokens)
        elif len(prompt) > self.max_seq_tokens:
            raise ValueError(f"prompt of {len(prompt)} tokens exceeds the context of {self.max_seq_tokens} tokens "
                             "(the model's context_length, or the KV cache); shorten it")
        if seq.window_start and params.prompt_logprobs is not None:
            raise ValueError(f"prompt_logprobs need the whole prompt in the context ({len(prompt)} tokens > "
                             f"{self.max_seq_tokens}); shorten it")
        self._seqs[rid] = seq
        self.scheduler.add(seq)
        return rid

    def _guide(self) -> Guide:
        if self.tokenizer is None:
            raise ValueError("structured output needs the engine's tokenizer (LLMEngine(model, tokenizer))")
        if self.guide is None:
            self.guide = Guide(self.tokenizer, self.vocab_limit, self.eos)
        return self.guide

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancel a request: its blocks are freed at once. Returns its last output (finish_reason
        'abort'), or None if the id is unknown or already finished."""
        seq = self._seqs.pop(str(request_id), None)
        if seq is None:
            return None
        self.scheduler.finish(seq)
        if self.procs is not None:
            self.procs.release(seq.request_id)
        seq.finish_reason, seq.finished_time = "abort", self.clock()
        self.num_finished += 1
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix block (call after changing the model's weights in place)."""
        for block in self.blocks.blocks:
            if block.ref_count == 0:
                block.hash, block.token_ids = None, ()
        self.blocks.hash_to_block = {h: b for h, b in self.blocks.hash_to_block.items()
                                     if self.blocks.blocks[b].ref_count > 0}

    # -- the step ---------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; outputs for the requests that produced a token (or finished)."""
        t0, k = time.perf_counter(), self.counters
        kind = "general"
        try:
            fast = self._decode_step()
            if fast is not None:
                kind = "lean"
                return fast
            mixed = self._mixed_step() if self.config.mixed_steps else None
            if mixed is not None:
                kind = "mixed"
                return mixed
            return self._general_step()
        finally:
            dt = time.perf_counter() - t0
            k["steps"] += 1
            k["step_seconds"] += dt
            if kind == "lean":
                k["lean_steps"] += 1
            elif kind == "mixed":
                k["mixed_steps"] += 1
                k["mixed_seconds"] += dt
            else:  # general steps: those neither lean nor mixed
                k["general_seconds"] += dt

    def _admit_now(self) -> bool:
        """Whether waiting requests go in at this step: some wait, and either no admission wait is set,
        nothing runs, they fill the free slots, or the oldest has waited ``admission_wait_ms``."""
        sched, wait = self.scheduler, self.config.admission_wait_ms
        if not sched.waiting:
            return False
        if not wait or not sched.running or len(sched.waiting) >= self.config.max_num_seqs - len(sched.running):
            return True
        return (self.clock() - sched.waiting[0].arrival) * 1e3 >= wait

    def _general_step(self) -> list[RequestOutput]:
        """A step through the scheduler: prefill chunks, decodes, speculation, log-probabilities."""
        batch = self.scheduler.schedule()
        if not batch:
            if self.scheduler.waiting and not self.scheduler.running and self.blocks.num_free == self.blocks.num_blocks:
                seq = self.scheduler.waiting[0]
                raise RuntimeError(f"request {seq.request_id!r} cannot fit the KV cache ({self.blocks.num_blocks} "
                                   f"blocks of {self.blocks.block_size}); raise EngineConfig.num_blocks")
            return []
        return self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Sequence, int]]) -> list[RequestOutput]:
        """One forward through ``ModelRunner.run`` (eager, any mix of prefill chunks, decodes and
        verifications): the scheduled tokens of each (sequence, count), then each sequence's token."""
        drafts = self._propose(batch)
        items, now = [], self.clock()
        for seq, n in batch:
            if seq.first_scheduled is None:  # every request's first step is one of these (prefill)
                seq.first_scheduled = now
            c, d = seq.num_computed, drafts.get(seq.request_id, [])
            items.append(StepItem(seq, c, seq.window[c:c + n - len(d)] + d if d else seq.window[c:c + n], 1 + len(d)))
        self.counters["prefill_tokens"] += sum(len(it.tokens) for it in items if it.n_logits == 1 and len(it.tokens) > 1)
        for it in items:
            if it.seq.needs_prompt_logprobs:  # every position's logits (a prompt chunk: never drafts)
                it.n_logits, it.prompt_rows = len(it.tokens), True
        logits = self.runner.run(items)[:, :self.vocab_limit]  # (rows, V) fp32: one row per wanted position
        logits = self._take_prompt_logprobs(items, logits)  # then each item's last row only
        drawn = self._draw(items, logits)  # (rows,) the token each row's position gets
        outputs = []
        row = 0
        for it, (seq, n) in zip(items, batch):
            rows = range(row, row + it.n_logits)
            row += it.n_logits
            if it.n_logits > 1:  # speculative: keep the drafts the model agrees with, then its own token
                self._accept(seq, it.tokens[1:], [drawn[r] for r in rows], logits[rows.start:rows.stop])
                outputs.append(self._output(seq))
                continue
            seq.num_computed += len(it.tokens)  # n, or 1 when speculation found no draft
            self.blocks.publish_full_blocks(seq)
            if seq.num_uncomputed > 0:  # a prefill chunk: the prompt's end is still to come
                continue
            p, i = seq.params, rows.start
            if p.max_tokens == 0:
                self._finish(seq, "length")
                outputs.append(self._output(seq))
                continue
            tok = drawn[i]
            if p.logprobs is not None:
                seq.logprobs.append(_logprobs(logits[i], tok, p.logprobs))
            self._append(seq, tok)
            outputs.append(self._output(seq))
        return outputs

    # -- the lean decode step (CUDA graphs): one copy in, tokens computed in the graph, one copy out --

    def _decode_step(self) -> list[RequestOutput] | None:
        """A step where every running sequence decodes and nothing waits, through ``ModelRunner.decode``:
        ``decode_steps`` tokens per sequence unless one wants log-probabilities, else one; greedy and
        sampled rows alike are drawn inside the graph. None when the step is not such a step (prefill,
        waiting requests, speculation, no graphs): ``step`` then runs the general path."""
        sched, runner = self.scheduler, self.runner
        if (self.proposer is not None or not runner.graph_max or self._admit_now()
                or len(sched.running) > runner.graph_max):
            return None
        k = self._steps_for(sched.running)
        seqs = sched.schedule_decode(k, defer_waiting=True)  # waiting ones, if any, wait (``_admit_now``)
        if seqs is None:
            return None
        return self._decode(seqs, k)

    def _mixed_step(self) -> list[RequestOutput] | None:
        """Prefill beside a lean decode (``EngineConfig.mixed_steps``): the running sequences that decode
        take ``decode_steps`` tokens through the decode graph, while new prompts (admitted now) and
        prompt chunks still to compute run one eager forward of their own. None when that does not
        apply (speculation, no graphs, nothing decoding or nothing to prefill, blocks short): ``step``
        then takes a general step."""
        sched, runner = self.scheduler, self.runner
        if self.proposer is not None or not runner.graph_max:
            return None
        k = self._steps_for([s for s in sched.running if s.num_uncomputed == 1])
        plan = sched.schedule_mixed(k, runner.graph_max, self._admit_now())
        if plan is None:
            return None
        seqs, batch = plan
        outputs = self._run_batch(batch) if batch else []
        return outputs + self._decode(seqs, k)

    def _decode(self, seqs: list[Sequence], k: int) -> list[RequestOutput]:
        """``k`` decode steps of ``seqs`` (their blocks already grown) through the graphs; their outputs."""
        if any(seq.matcher is not None for seq in seqs):  # k == 1: the masks come from the host each token
            _, logits = self.runner.decode(seqs, 1, logits_only=True)
            items = [StepItem(seq, seq.num_computed, [seq.token_ids[-1]]) for seq in seqs]
            ids = [[t] for t in self._draw(items, logits[:, :self.vocab_limit])]
        else:
            proc = self._proc_rows(seqs)
            ids, logits = self.runner.decode(seqs, k, proc)  # sampled and processed rows are drawn in the graph too
            if proc is not None:
                self.procs.counted(proc, k)
        outputs = []
        for i, seq in enumerate(seqs):
            c, p = seq.num_computed, seq.params
            for j, tok in enumerate(ids[i]):
                seq.num_computed = c + j + 1  # the token before ``tok`` is now in the cache
                if p.logprobs is not None:
                    seq.logprobs.append(_logprobs(logits[i, :self.vocab_limit], tok, p.logprobs))
                self._append(seq, tok)
                if seq.finished or not seq.block_table:  # stopped (later tokens are dropped) or slid
                    break
            if not seq.finished:
                self.blocks.publish_full_blocks(seq)
            outputs.append(self._output(seq))
        return outputs

    def _steps_for(self, running: list[Sequence]) -> int:
        """Decode steps this round: ``decode_steps`` when no sequence wants log-probs (they need each
        step's logits on the host), every one has room in the context for them, and one of them wants
        more than one token; else 1. Sampled sequences draw inside the graph, as greedy ones do."""
        K = self.runner.decode_steps
        if K == 1:
            return 1
        more = False
        for seq in running:
            p = seq.params
            if (p.logprobs is not None or seq.matcher is not None
                    or seq.num_window_tokens + K - 1 > self.max_seq_tokens):
                return 1
            more = more or p.max_tokens - len(seq.token_ids) + seq.num_prompt_tokens > 1
        return K if more else 1

    def _draw(self, items: list[StepItem], logits: Tensor) -> list[int]:
        """The token each logits row (N, V) gives its position: the argmax for greedy requests, the
        sampler's draw at (seed, position) for sampled ones; one batched call, one host sync. Row j of
        an item's last ``n_logits`` predicts window index ``start + len(tokens) - n_logits + j + 1``."""
        proc = self._proc_rows([it.seq for it in items])
        min_p = None
        if proc is not None:  # one row per logits row (a processed sequence never speculates: n_logits 1)
            dummy = ProcRow(self.procs.dummy, 0.0, 0.0, 1.0, 0.0, 0)
            proc = [r for it, r in zip(items, proc) for r in [r] + [dummy] * (it.n_logits - 1)]
            pt = self.procs.tensors(proc)
            logits, min_p = process_logits(logits, self.procs, pt), pt.min_p
        if self.guide is not None:  # structured output: only the tokens its language allows
            rows = [it.seq for it in items for _ in range(it.n_logits)]
            logits = self.guide.apply(logits, [s.matcher for s in rows], [s.params.stop_token_ids for s in rows])
        if all(it.seq.params.temperature == 0 for it in items):
            return logits.argmax(dim=-1).tolist()
        rows: list[RowSampling] = []
        for it in items:
            seq = it.seq
            first = seq.window_start + it.start + len(it.tokens) - it.n_logits + 1  # index in token_ids
            rows += [row_sampling(seq.params, seq.seed, first + j) for j in range(it.n_logits)]
        return draw_tokens(logits, rows, min_p).tolist()

    def _take_prompt_logprobs(self, items: list[StepItem], logits: Tensor) -> Tensor:
        """Record the prompt log-probs of the items with ``prompt_rows`` (row j of a chunk at window
        position c predicts prompt token c + j + 1; positions recorded before a preemption are not
        recorded twice) and make them one-row items again: the logits rows left (rows, V)."""
        if not any(it.prompt_rows for it in items):
            return logits
        keep: list[int] = []
        row = 0
        for it in items:
            n = it.n_logits
            if it.prompt_rows:
                seq, k = it.seq, it.seq.params.prompt_logprobs
                for j in range(n):
                    target = it.start + j + 1  # its index in the prompt (the window starts at 0)
                    if target < seq.num_prompt_tokens and target == len(seq.prompt_logprobs):
                        seq.prompt_logprobs.append(_logprobs(logits[row + j], seq.token_ids[target], k))
                it.n_logits, it.prompt_rows = 1, False
                keep.append(row + n - 1)
            else:
                keep += range(row, row + n)
            row += n
        return logits[keep]

    def _proc_rows(self, seqs: list[Sequence]) -> list[ProcRow] | None:
        """Each sequence's processing row (``ProcessorTable.rows``: slots brought up to date), or None
        when no sequence's logits are processed. The table is made at the first need."""
        if not any(seq.processed for seq in seqs):
            return None
        if self.procs is None:
            self.procs = ProcessorTable(self.config.max_num_seqs, self.vocab_limit, self.eos, self.device)
            self.runner.procs = self.procs
        return self.procs.rows(seqs)

    # -- speculative decoding (greedy: exactly plain greedy decoding's output; sampled: the same distribution) --

    def _lookahead(self, seq: Sequence) -> int:
        """Draft tokens worth verifying for a decoding ``seq`` (0: plain decoding)."""
        p = seq.params
        if (self.proposer is None or (p.temperature != 0 and not self.config.speculative_sampling) or seq.processed
                or seq.matcher is not None):
            return 0  # processed logits depend on every token before: drafts are not verified row by row
        room = min(p.max_tokens - len(seq.output_token_ids), self.max_seq_tokens - seq.num_window_tokens) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    def _propose(self, batch: list[tuple[Sequence, int]]) -> dict[str, list[int]]:
        """Draft tokens per request id, for the decoding sequences the scheduler gave room to speculate."""
        want = [(seq, n - 1) for seq, n in batch if n > 1 and seq.num_uncomputed == 1]
        if not want:
            return {}
        return self.proposer.propose(want)

    def _accept(self, seq: Sequence, draft: list[int], target: list[int], logits: Tensor) -> None:
        """Verify ``draft`` (Leviathan et al., arXiv:2211.17192; Chen et al., arXiv:2302.01318): row i
        of ``logits`` is the model's distribution after the last real token and ``draft[:i]``. Greedy:
        drafts are kept while they equal the model's argmax ``target[i]``, then one more token of the
        model's own, so the output is exactly greedy decoding's. Sampled: ``target[i]`` is the
        sampler's draw from row i at its position, the token plain decoding would draw there, so the
        drafts are kept while they equal it: draft i is kept with probability p_i(draft i), as
        rejection sampling keeps a deterministic proposal, and the output is plain sampling's. Rejected
        drafts' keys/values stay in the blocks past ``num_computed`` and are overwritten later."""
        c = seq.num_computed
        self.spec_counts["proposed"] += len(draft)
        for i in range(len(draft) + 1):
            d = draft[i] if i < len(draft) else None
            tok = target[i]
            if seq.params.logprobs is not None:
                seq.logprobs.append(_logprobs(logits[i], tok, seq.params.logprobs))
            self._append(seq, tok)
            if seq.finished or not seq.block_table:  # done, or slid to a new window (blocks released)
                return
            seq.num_computed = c + i + 1  # the token before ``tok`` is now in the cache
            if tok != d:
                break
            self.spec_counts["accepted"] += 1
        seq.draft_computed = min(seq.draft_computed, seq.num_computed)
        self.blocks.publish_full_blocks(seq)

    def _append(self, seq: Sequence, tok: int) -> None:
        """Add a sampled token to ``seq`` and finish or slide it when a limit is reached."""
        p = seq.params
        seq.token_ids.append(tok)
        if seq.first_token is None:
            seq.first_token = self.clock()
        if (tok == self.eos and not p.ignore_eos) or tok in p.stop_token_ids:
            return self._finish(seq, "stop")
        if seq.matcher is not None:
            seq.matcher.consume_token(tok)  # allowed by the mask it gave
        if seq.streamer is not None:
            before = len(seq.text)
            seq.text += seq.streamer.push(tok)
            if p.stop and len(seq.output_token_ids) >= p.min_tokens and self._cut_at_stop(seq, before):
                return self._finish(seq, "stop", flush=False)
        if seq.matcher is not None and seq.matcher.is_stopped():  # the language allows nothing more
            return self._finish(seq, "stop")
        if len(seq.output_token_ids) >= p.max_tokens:
            return self._finish(seq, "length")
        if seq.num_window_tokens > self.max_seq_tokens:  # the next token has no position left
            if self.config.context_overflow == "stop":
                return self._finish(seq, "length")
            self.blocks.release(seq)  # slide: recompute the most recent 3/4 of the context
            seq.window_start = len(seq.token_ids) - window_keep(self.max_seq_tokens)
        return None

    def _cut_at_stop(self, seq: Sequence, before: int) -> bool:
        """Cut ``seq.text`` before the first stop string that the new text completes."""
        longest = max(map(len, seq.params.stop))
        start = max(0, before - longest + 1)
        hits = [i for i in (seq.text.find(s, start) for s in seq.params.stop) if i >= 0]
        if not hits:
            return False
        seq.text = seq.text[:min(hits)]
        return True

    def _finish(self, seq: Sequence, reason: str, flush: bool = True) -> None:
        """End ``seq``: free its blocks; the streamer's held-back bytes join the text unless a stop
        string cut it."""
        seq.finish_reason, seq.finished_time = reason, self.clock()
        if flush and seq.streamer is not None:
            seq.text += seq.streamer.flush()
        self.scheduler.finish(seq)
        if self.procs is not None:
            self.procs.release(seq.request_id)
        self._seqs.pop(seq.request_id, None)
        self.num_finished += 1

    def _output(self, seq: Sequence) -> RequestOutput:
        out = seq.output_token_ids
        new = out[seq.num_tokens_emitted:]
        seq.num_tokens_emitted = len(out)
        visible = len(seq.text)
        if seq.params.stop and not seq.finished:  # hold back what may be the start of a stop string
            visible = max(seq.num_text_emitted, visible - max(map(len, seq.params.stop)) + 1)
        new_text = seq.text[seq.num_text_emitted:visible]
        seq.num_text_emitted = visible
        lps = None
        if seq.params.logprobs is not None:
            lps = seq.logprobs[len(seq.logprobs) - len(new):] if new else []
        plps = None
        if seq.params.prompt_logprobs is not None and not seq.needs_prompt_logprobs:
            plps = seq.prompt_logprobs
        metrics = None
        if seq.finished_time is not None:
            metrics = RequestMetrics(seq.arrival, seq.first_scheduled, seq.first_token, seq.finished_time)
        return RequestOutput(seq.request_id, seq.prompt_token_ids, list(out), new, seq.text[:visible], new_text,
                             lps, seq.finished, seq.finish_reason, seq.num_prompt_tokens, len(out), plps, metrics)

    # -- conveniences -------------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Run ``prompts`` (token lists) to completion; final outputs in the order of ``prompts``.

        Each output covers its whole request: ``new_token_ids``, ``new_text`` and ``logprobs`` hold
        every generated token, not only the last step's."""
        params = SamplingParams() if params is None else params
        plist = params if isinstance(params, list) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        rids = [self.add_request(p, sp) for p, sp in zip(prompts, plist)]
        final: dict[str, RequestOutput] = {}
        lps: dict[str, list[dict[int, float]]] = {r: [] for r in rids}
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(rids), desc="generate", unit="req")
        try:
            while self.has_unfinished():
                for out in self.step():
                    lps[out.request_id] += out.logprobs or []
                    if out.finished:
                        final[out.request_id] = out
                        out.new_token_ids, out.new_text = list(out.token_ids), out.text
                        out.logprobs = None if out.logprobs is None else lps[out.request_id]
                        if bar is not None:
                            bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        return [final[r] for r in rids]

    def warmup(self, lengths: list[int] | None = None) -> float:
        """Run throwaway requests through every path a first user request would compile, so it is not
        the one that pays: prefills of several lengths (Triton specializes its kernels on integer
        arguments divisible by 16, and ``torch.compile`` on shapes), alone and packed together, greedy
        multi-step and sampled decode, and the temperature-only sampled graphs (the other sampled
        variants are captured when first used); with a tokenizer, structured output's tokenizer too.
        Afterwards the prefix cache and the counters are as before.
        ``lengths``: prompt lengths (default: 1 to ~1k tokens, capped by the context and step budget).
        Returns the seconds it took (a server prints it; a benchmark keeps it out of its timing)."""
        import random
        import time

        if self.has_unfinished():
            raise RuntimeError("warmup() runs on an idle engine: call it before adding requests")
        t0 = time.perf_counter()
        cap = min(self.max_seq_tokens - 2 * self.runner.decode_steps - 2, self.config.max_num_batched_tokens)
        lengths = lengths or [n for n in (1, 2, 7, 16, 17, 33, 100, 128, 129, 256, 513, 1024) if n <= cap] or [1]
        rng = random.Random(0)
        prompts = [[rng.randrange(self.vocab_limit) for _ in range(n)] for n in lengths]  # (n,) each
        greedy = SamplingParams(max_tokens=2 * self.runner.decode_steps + 1, temperature=0, ignore_eos=True)
        sampled = SamplingParams(max_tokens=3, temperature=1.0, top_k=50, top_p=0.9, seed=0, ignore_eos=True)
        saved = (self.num_finished, self.scheduler.num_preemptions, self.blocks.prefix_hits,
                 self.blocks.prefix_queries, dict(self.spec_counts), self._ids, self.counters)
        self.counters = _zero_counters()
        self._ids = (f"warmup-{i}" for i in itertools.count())
        try:
            for p in prompts:  # one at a time: batch-1 prefill and decode at every length
                self.generate([p], greedy)
            self.generate(prompts, [greedy] * (len(prompts) - 1) + [sampled])  # packed, mixed settings
        finally:
            (self.num_finished, self.scheduler.num_preemptions, self.blocks.prefix_hits,
             self.blocks.prefix_queries, self.spec_counts, self._ids, self.counters) = saved
            self.reset_prefix_cache()
        self.runner.capture(("sample",))  # temperature-only sampling (OpenAI's default) at every size
        if self.tokenizer is not None and self.guide is None:  # structured output's tokenizer (~0.3 s at
            try:  # GPT-2's vocabulary), so the first JSON-mode request does not stall the engine for it
                self._guide()
            except (ImportError, ValueError):  # no llguidance, or not a Kiln tokenizer: such requests will say so
                pass
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - t0

    def stats(self) -> dict[str, Any]:
        """Cache and queue counters: free/used blocks, waiting/running, preemptions, prefix-cache hits;
        steps taken (all, and lean: the graph decode path), the wall seconds spent inside ``step`` (all,
        and in general and in mixed steps) and the prompt tokens those computed."""
        b = self.blocks
        return {
            "num_blocks": b.num_blocks, "free_blocks": b.num_free, "used_blocks": b.num_blocks - b.num_free,
            "block_size": b.block_size, "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running), "preemptions": self.scheduler.num_preemptions,
            "prefix_cache_hits": b.prefix_hits, "prefix_cache_queries": b.prefix_queries,
            "finished": self.num_finished, "spec_proposed": self.spec_counts["proposed"],
            "spec_accepted": self.spec_counts["accepted"],
            **{k: round(v, 6) if isinstance(v, float) else v for k, v in self.counters.items()},
        }

    @property
    def num_steps(self) -> int:
        return self.counters["steps"]

    @property
    def num_lean_steps(self) -> int:
        return self.counters["lean_steps"]

    @property
    def step_seconds(self) -> float:
        return self.counters["step_seconds"]


def _zero_counters() -> dict[str, Any]:
    return {"steps": 0, "lean_steps": 0, "mixed_steps": 0, "step_seconds": 0.0, "general_seconds": 0.0,
            "mixed_seconds": 0.0, "prefill_tokens": 0}


def _logprobs(logits: Tensor, tok: int, k: int) -> dict[int, float]:
    """{sampled id: log-prob, then the k most likely ids: log-prob} under the model's distribution."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    out = {tok: float(lp[tok]) if tok < lp.shape[-1] else float("-inf")}  # a prompt id past the sampled vocabulary
    if k:
        vals, ids = lp.topk(k)
        for v, i in zip(vals.tolist(), ids.tolist()):
            out.setdefault(i, v)
    return out


__all__ = ["EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams", "Status"]
