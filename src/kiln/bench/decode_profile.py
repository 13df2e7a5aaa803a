"""`kiln bench serve --parts profile`: where a batch-1 decode token's GPU time goes, kernel by kernel,
Kiln's engine beside gpt-fast's ``decode_one_token``.

Kiln's decode runs as the latency rows run it (``torch.compile``d decode step, CUDA graphs,
``decode_steps`` tokens per graph). After a warm request (compilation, graph capture) and a few warm
steps of a second one, ``--profile-tokens`` tokens are recorded under ``torch.profiler``; the Chrome
trace is written and read back, and every GPU activity in it (kernels, memcpy, memset) is summed by
name and divided by the tokens decoded in the window: calls per token, microseconds per token, share
of the GPU time of a step. Two Kiln tables on CUDA:

- ``kiln graphs``: the CUDA graph replays themselves. Whether CUPTI traces the kernels inside a
  replayed graph has depended on when the profiler first started: torch's workaround for graphs
  captured before the first profiler use is ``torch.profiler._utils._init_for_cuda_graphs()`` (an
  empty session before capture; ``--profile-init``), while on CUDA 13 stacks that early session is
  reported to turn kernel tracing off for the process (lightseekorg/tokenspeed#1348: zero kernel
  events with it, all of them without). The default is no early session (the device runs torch
  2.11+cu130); a table that comes back without GPU kernels is measured again in a fresh process
  with the other setting (``bench.serve._profile_again``), so one GPU call answers either way.
  Kineto also notes that kernel times inside graphs can be off (pytorch/kineto#1165). Hence:
- ``kiln no graph``: the same compiled decode step over the same static buffers, launched kernel by
  kernel without the graph (``ModelRunner._graph_body``, as the CPU emulation runs it). The kernels
  are the graph's; only the launch gaps differ, so this is the fallback when the first table is
  empty, and the check of it otherwise.

gpt-fast (``--gpt-fast DIR``): its own ``generate.main`` in the bench's subprocess driver, with
``decode_n_tokens`` wrapped so that its last call (after the compile
warm-up: ``--profile-tokens`` tokens) runs under the profiler; the parent reads that trace the same way.

On the CPU (tests, no CUDA) the profiler records CPU ops; a row is an op's self time, and the ops
inside Kiln's paged attention (a ``kiln::paged_attention`` range) and LM head (``kiln::lm_head``)
count as those, so the table has the same shape. Categories are read from kernel names (and, for the
LM head and sampling softmax, from calls per token: one per token rather than one per layer); they
are a guide, the names are the truth.
"""

from __future__ import annotations

import contextlib
import json
import time
import traceback
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CATEGORIES = ("matmul/GEMV", "attention", "norm/rope/elementwise", "lm_head", "sampling/argmax", "copies", "other")
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


@dataclass
class KernelRow:
    """One kernel (GPU) or op (CPU), summed over the profiled window and divided by its tokens."""

    name: str
    category: str
    calls_per_token: float
    us_per_token: float
    share: float
    """Fraction of the step's summed kernel (op) time."""


@dataclass
class ProfileTable:
    """One implementation's decode profile."""

    impl: str
    shape: str
    tokens: int = 0
    """Decode tokens in the profiled window."""
    busy_us_per_token: float = 0.0
    """Summed kernel (CPU: op self) time per token."""
    wall_us_per_token: float = 0.0
    """Host wall time of the window per token (profiler overhead included); 0 when not measured."""
    rows: list[KernelRow] = field(default_factory=list)
    categories: dict[str, float] = field(default_factory=dict)
    """us per token by category (every kernel, not only the printed top rows)."""
    trace: str = ""
    note: str = ""
    error: str = ""

    @classmethod
    def from_dict(cls, d: dict) -> ProfileTable:
        """Back from ``dataclasses.asdict`` (the part's JSON)."""
        return cls(**{**d, "rows": [KernelRow(**r) for r in d.get("rows", [])]})


# -- reading a Chrome trace -----------------------------------------------------------------------------


def short_name(name: str, width: int = 64) -> str:
    """A kernel name without ``void``, template arguments and parameter lists, at most ``width`` chars."""
    n = name.strip()
    n = n.removeprefix("void ")
    for cut in ("(", "<"):
        i = n.find(cut)
        if i > 0:
            n = n[:i]
    return n if len(n) <= width else n[:width - 1] + "~"


VIEW_OPS = ("aten::view", "aten::as_strided", "aten::t", "aten::transpose", "aten::reshape", "aten::slice",
            "aten::empty", "aten::expand", "aten::select", "aten::unsqueeze", "aten::detach", "aten::alias",
            "aten::_unsafe_view", "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg")
MATMUL_KEYS = ("gemm", "gemv", "nvjet", "cutlass", "cublas", "matmul", "aten::mm", "aten::addmm", "_mm", "mm_",
               "addmm", "linear", "int8", "int4", "quant", "xmma", "splitk")
COPY_KEYS = ("memcpy", "memset", "copy", "fill", "index_put", "index_copy", "index_select", "scatter", "gather",
             "aten::cat", "catarray", "clone", "aten::to", "_to_copy")


def categorize(name: str, calls_per_token: float) -> str:
    """The category of a kernel or op by its name. A batched matmul (``bmm``) is attention: a decode
    step's projections are plain matmuls. A matmul (softmax) run about once per token rather than once
    per layer is the LM head (the sampling softmax). Inductor's fused kernels (``triton_*``) name the
    ops they fuse, ``_to_copy`` casts included: they count as copies only if nothing else is fused."""
    n = name.lower()
    once = calls_per_token < 1.5
    if n.startswith("kiln::lm_head"):
        return "lm_head"
    if n.startswith("kiln::paged_attention") or "bmm" in n or any(
            k in n for k in ("paged_decode", "paged_reduce", "paged_prefill", "flash", "fmha", "attention", "sdpa", "attn")):
        return "attention"
    if any(k in n for k in MATMUL_KEYS):
        return "lm_head" if once else "matmul/GEMV"
    if any(k in n for k in ("argmax", "topk", "sort", "multinomial", "exponential", "philox", "sample")):
        return "sampling/argmax"
    if "softmax" in n:
        return "sampling/argmax" if once else "attention"
    if n in VIEW_OPS:
        return "other"  # views and allocations: no kernel on the GPU
    if n.startswith("triton_"):
        fused = n.split("fused", 1)[-1]
        rest = fused
        for k in ("_to_copy", "index_put", "copy", "clone", "cat", "scatter", "gather", "index", "select", "slice",
                  "view", "unsqueeze", "squeeze", "expand", "_"):
            rest = rest.replace(k, "")
        return "copies" if not rest.strip("0123456789") else "norm/rope/elementwise"
    if any(k in n for k in COPY_KEYS):
        return "copies"
    if any(k in n for k in ("elementwise", "vectorized", "reduce", "norm", "rope", "rotary", "silu", "mul", "add",
                            "aten::")):
        return "norm/rope/elementwise"
    return "other"


def _gpu_activity(events: list[dict]) -> dict[str, list[float]]:
    """name -> durations (us) of every GPU kernel, memcpy and memset."""
    out: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in GPU_CATS:
            out[e["name"]].append(float(e.get("dur", 0.0)))
    return out


def _cpu_self_times(events: list[dict]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """name -> self times (us) of CPU ops, and name -> calls; the ops inside a ``kiln::`` range count
    (time only) under that range's name, and the range itself as one call."""
    by_tid: dict[Any, list[dict]] = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation"):
            by_tid[(e.get("pid"), e.get("tid"))].append(e)
    times: dict[str, list[float]] = defaultdict(list)
    calls: dict[str, int] = defaultdict(int)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (float(e["ts"]), -float(e.get("dur", 0.0))))
        stack: list[list[Any]] = []  # [event, end, child time, label]
        for e in evs:
            ts, end = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
            while stack and stack[-1][1] <= ts:
                _close(stack, times)
            outer = next((s[3] for s in stack if s[3].startswith("kiln::")), None)
            label = outer or e["name"]
            if outer is None and (e.get("cat") == "cpu_op" or label.startswith("kiln::")):
                calls[label] += 1
            stack.append([e, end, 0.0, label])
        while stack:
            _close(stack, times)
    return times, calls


def _close(stack: list[list[Any]], times: dict[str, list[float]]) -> None:
    """Pop the innermost open event: its self time (duration less its children's) to its label; its
    duration to its parent's child time."""
    ev, _, child, label = stack.pop()
    if ev.get("cat") == "cpu_op":
        times[label].append(max(0.0, float(ev.get("dur", 0.0)) - child))
    if stack:
        stack[-1][2] += float(ev.get("dur", 0.0))


def table_from_trace(trace: Path, tokens: int, impl: str, shape: str, top: int = 25, gpu: bool = False) -> ProfileTable:
    """``trace`` (a torch.profiler Chrome trace) summed per kernel (GPU activity; without ``gpu``, CPU op
    self times when the trace has none) over ``tokens`` decode tokens: the top ``top`` rows and every
    category's total."""
    events = json.loads(Path(trace).read_text())
    events = events.get("traceEvents", []) if isinstance(events, dict) else events
    times = _gpu_activity(events)
    calls = {k: len(v) for k, v in times.items()}
    kind = "GPU kernels"
    t = ProfileTable(impl, shape, tokens=tokens, trace=str(trace))
    if gpu and not times:
        launches = sum(1 for e in events if e.get("name") in ("cudaGraphLaunch", "cuGraphLaunch"))
        t.error = (f"no GPU kernels in the trace ({len(events)} events, {launches} graph launches): CUPTI traced "
                   "nothing on the GPU; run with --profile-init flipped (see kiln.bench.decode_profile)")
        return t
    if not times:
        (times, calls), kind = _cpu_self_times(events), "CPU ops (self time)"
    total = sum(sum(v) for v in times.values())
    if not times or total <= 0 or tokens <= 0:
        t.error = f"no kernels or ops in the trace ({len(events)} events)"
        return t
    merged: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])  # short name -> [us, calls]
    for name, durs in times.items():
        m = merged[short_name(name)]
        m[0] += sum(durs)
        m[1] += calls.get(name, len(durs))
    rows = []
    for name, (us, n) in merged.items():
        cpt = n / tokens
        rows.append(KernelRow(name, categorize(name, cpt), cpt, us / tokens, us / total))
    rows.sort(key=lambda r: -r.us_per_token)
    heads = [r for r in rows if r.category == "lm_head" and not r.name.startswith("kiln::")]
    for r in heads[1:]:  # once-per-token matmuls: the largest is the head (V x d), the rest (e.g. layer 0's
        r.category = "matmul/GEMV"  # projection fused with the embedding) are layers'
    t.busy_us_per_token = total / tokens
    cats: dict[str, float] = {c: 0.0 for c in CATEGORIES}
    for r in rows:
        cats[r.category] += r.us_per_token
    t.categories = {c: v for c, v in cats.items() if v > 0}
    if len(rows) > top:  # the rest in one row, so the shares still sum to 100%
        rest = rows[top:]
        rows = rows[:top] + [KernelRow(f"({len(rest)} others)", "", sum(r.calls_per_token for r in rest),
                                       sum(r.us_per_token for r in rest), sum(r.share for r in rest))]
    t.rows = rows
    t.note = kind
    return t


# -- Kiln's decode under the profiler ---------------------------------------------------------------------


@contextlib.contextmanager
def _cpu_ranges(model: Any) -> Iterator[None]:
    """On the CPU: the paged attention and the LM head inside named profiler ranges (restored after)."""
    import torch

    import kiln.model.attention as attn

    orig_attn, head = attn.paged_attention, model.lm_head

    def paged(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function("kiln::paged_attention"):
            return orig_attn(*a, **k)

    def head_fwd(*a: Any, **k: Any) -> Any:
        with torch.profiler.record_function("kiln::lm_head"):
            return type(head).forward(head, *a, **k)

    attn.paged_attention = paged
    head.forward = head_fwd
    try:
        yield
    finally:
        attn.paged_attention = orig_attn
        del head.forward


def _profiler(device: Any) -> Any:
    import torch
    from torch.profiler import ProfilerActivity

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    return torch.profiler.profile(activities=acts, record_shapes=False)


def _decode_window(eng: Any, rid: str, tokens: int, device: Any) -> tuple[int, float]:
    """Step the engine until request ``rid`` has ``tokens`` more tokens; (tokens decoded, wall s)."""
    import torch

    seq = eng._seqs[rid]
    start = len(seq.token_ids) - seq.num_prompt_tokens
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while len(seq.token_ids) - seq.num_prompt_tokens - start < tokens and not seq.finished:
        eng.step()
    sync()
    return len(seq.token_ids) - seq.num_prompt_tokens - start, time.perf_counter() - t0


def kiln_profiles(model: Any, prompt: list[int], tokens: int, warm: int, device: Any, out: Path, shape: str,
                  init_for_graphs: bool = False, prefill_only: bool = False) -> list[ProfileTable]:
    """Kiln's default decode path under the profiler: graph replays, then (CUDA) the same compiled step
    launched without the graph; then speculation and prefill steps (``prefill_tables``). Traces
    ``out/kiln_*.json``. ``prefill_only``: the prefill steps alone."""
    if prefill_only:
        return prefill_tables(model, prompt, device, out, shape)
    import torch

    from kiln.generate import EngineConfig, LLMEngine, SamplingParams
    from kiln.generate.model_runner import _Graph

    cuda = device.type == "cuda"
    if cuda and init_for_graphs:
        import torch.profiler._utils

        torch.profiler._utils._init_for_cuda_graphs()  # before capture: CUPTI then sees the graphs' kernels
    cfg = EngineConfig(max_num_seqs=1, max_num_batched_tokens=max(2048, len(prompt) + 8), num_blocks=None,
                       enable_prefix_caching=False, compile_decode=cuda)
    eng = LLMEngine(model, None, cfg)
    eng.generate([prompt], SamplingParams(max_tokens=warm + 8, temperature=0, ignore_eos=True))  # compile, capture
    windows = [("kiln graphs" if eng.runner.graph_max else "kiln", "kiln_graphs" if cuda else "kiln_cpu")]
    if cuda:
        windows.append(("kiln no graph", "kiln_nograph"))
    total = len(windows) * (tokens + warm) + 8  # + 8: a multi-step graph may run past the window's end
    rid = eng.add_request(prompt, SamplingParams(max_tokens=total, temperature=0, ignore_eos=True))
    tables = []
    ctx = contextlib.nullcontext() if cuda else _cpu_ranges(model)
    with ctx:
        for impl, stem in windows:
            if impl == "kiln no graph":  # the graphs' own compiled body, launched op by op (ModelRunner._launch)
                r = eng.runner
                r.graphs = {b: _Graph(None, None, None) for b in r.graphs}
                r.multi_graphs = {b: _Graph(None, None, None) for b in r.multi_graphs}
            _decode_window(eng, rid, warm, device)  # prefill (first window) and warm steps
            with _profiler(device) as prof:
                n, wall = _decode_window(eng, rid, tokens, device)
            trace = out / f"{stem}.json"
            prof.export_chrome_trace(str(trace))
            t = table_from_trace(trace, n, impl, shape, gpu=cuda)
            t.wall_us_per_token = 1e6 * wall / max(n, 1)
            if cuda:
                k = eng.runner.decode_steps
                t.note += (f"; compiled, {k} steps per graph" if impl == "kiln graphs"
                           else "; the same compiled step, no CUDA graph (launch gaps included in wall)")
            tables.append(t)
    eng.abort(rid)
    tables.append(_spec_profile(model, prompt, tokens, warm, device, out, shape))
    return tables + prefill_tables(model, prompt, device, out, shape)


def prefill_tables(model: Any, prompt: list[int], device: Any, out: Path, shape: str) -> list[ProfileTable]:
    """General steps admitting 1 and 64 prompts of like length, and 64 of chat length with one long
    (``prefill_lengths``), padded and (CUDA) through the Triton prefill kernel: one table each."""
    cuda, tables = device.type == "cuda", []
    # (prompts, skewed lengths, Triton prefill kernel): the kernel only where it runs (CUDA)
    for n, skewed, kernel in [(1, False, False), (64, False, False), (64, True, False)] + ([(64, True, True)] if cuda else []):
        name = prefill_name(n, skewed, kernel)
        try:
            tables.append(prefill_profile(model, prompt, n, device, out, shape, skewed, kernel))
        except Exception as e:  # noqa: BLE001 - reported as the table's error; the decode tables stand
            traceback.print_exc()
            tables.append(ProfileTable(name, shape, error=f"{type(e).__name__}: {e}"))
    return tables


def prefill_name(n: int, skewed: bool = False, kernel: bool = False) -> str:
    return f"kiln prefill {n}" + (" skewed" if skewed else "") + (" kernel" if kernel else "")


def prefill_lengths(n: int, plen: int, context: int, skewed: bool = False) -> list[int]:
    """Prompt lengths of a profiled prefill step: ``plen`` // 2 to ``plen``, or (``skewed``) one prompt
    of min(512, context / 2) tokens and the rest 10-40, as a wave of chat prompts is (AlpacaEval with
    GPT-2's tokens: mean 34, max 503), the case where padding every chunk to the longest costs most."""
    if skewed:
        return [min(512, context // 2)] + [10 + (i * 7) % 31 for i in range(n - 1)]
    return [max(1, plen // 2 + (i * 7) % max(1, plen - plen // 2 + 1)) for i in range(n)]


def prefill_profile(model: Any, prompt: list[int], n: int, device: Any, out: Path, shape: str,
                    skewed: bool = False, kernel: bool = False) -> ProfileTable:
    """One general step admitting ``n`` prompts (``prefill_lengths``; the first step of a wave of
    requests: eager prefill, then the first tokens) under the profiler, its attention through the
    padded call or (``kernel``) Kiln's Triton prefill kernel. The table is per step ('tokens' = 1
    step): kernel time against the step's wall says whether the step is bound by the GPU or by the
    host. Trace ``out/kiln_prefill_<n>[_skewed][_kernel].json``."""
    import torch

    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    cuda = device.type == "cuda"
    lens = prefill_lengths(n, len(prompt), model.config.context_length, skewed)
    vocab = min(model.config.vocab_size, 1024)
    base = (prompt * (1 + max(lens) // max(1, len(prompt))))  # long enough for the longest
    prompts = [[(t + i) % vocab for t in base[:k]] for i, k in enumerate(lens)]  # (k,) each, distinct
    cfg = EngineConfig(max_num_seqs=max(n, 1), max_num_batched_tokens=max(2048, sum(lens)), num_blocks=None,
                       enable_prefix_caching=False, prefill_kernel=kernel)
    eng = LLMEngine(model, None, cfg)
    once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    eng.generate(prompts, once)  # warm: the same shapes once
    for p in prompts:
        eng.add_request(p, once)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ctx = contextlib.nullcontext() if cuda else _cpu_ranges(model)
    sync()
    with ctx, _profiler(device) as prof:
        t0 = time.perf_counter()
        eng.step()
        sync()
        wall = time.perf_counter() - t0
    while eng.has_unfinished():
        eng.step()
    trace = out / f"kiln_prefill_{n}{'_skewed' if skewed else ''}{'_kernel' if kernel else ''}.json"
    prof.export_chrome_trace(str(trace))
    t = table_from_trace(trace, 1, prefill_name(n, skewed, kernel), shape, gpu=cuda)
    t.wall_us_per_token = 1e6 * wall
    t.note += (f"; one general step (eager) admitting {n} prompts, {sum(lens)} prompt tokens (longest "
               f"{max(lens)}), attention {'by the Triton prefill kernel' if kernel else 'padded'}: 'token' = the step")
    return t


def _spec_profile(model: Any, prompt: list[int], tokens: int, warm: int, device: Any, out: Path,
                  shape: str) -> ProfileTable:
    """n-gram speculation (k=4) under the profiler, per token: where a verify step's time goes, and
    the host's share (wall minus kernel time). Trace ``out/kiln_spec_ngram.json``."""
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    cuda = device.type == "cuda"
    cfg = EngineConfig(max_num_seqs=1, max_num_batched_tokens=max(2048, len(prompt) + 8), num_blocks=None,
                       enable_prefix_caching=False, compile_decode=cuda, speculative="ngram")
    eng = LLMEngine(model, None, cfg)
    eng.generate([prompt], SamplingParams(max_tokens=warm + 8, temperature=0, ignore_eos=True))  # compile, capture
    rid = eng.add_request(prompt, SamplingParams(max_tokens=tokens + warm + 8, temperature=0, ignore_eos=True))
    _decode_window(eng, rid, warm, device)
    before = eng.stats()
    ctx = contextlib.nullcontext() if cuda else _cpu_ranges(model)
    with ctx, _profiler(device) as prof:
        n, wall = _decode_window(eng, rid, tokens, device)
    after = eng.stats()
    eng.abort(rid)
    trace = out / "kiln_spec_ngram.json"
    prof.export_chrome_trace(str(trace))
    t = table_from_trace(trace, n, "kiln spec ngram", shape, gpu=cuda)
    t.wall_us_per_token = 1e6 * wall / max(n, 1)
    steps, proposed, accepted = (after[k] - before[k] for k in ("steps", "spec_proposed", "spec_accepted"))
    t.note += (f"; n-gram speculation k={cfg.num_speculative_tokens}, one step per graph: {steps} steps, "
               f"{n / max(steps, 1):.2f} tokens/step, {100 * accepted / max(proposed, 1):.0f}% of drafts accepted")
    return t


# -- gpt-fast's decode under the profiler ------------------------------------------------------------------


GPT_FAST_PROFILE_PATCH = r'''
# kiln bench serve --parts profile: gpt-fast's last decode_n_tokens call under torch.profiler.
import torch, time
if device == "cuda" and profile_init == "1":
    torch.profiler._utils._init_for_cuda_graphs()  # before gpt-fast captures its graphs
_orig_decode_n = generate.decode_n_tokens
_calls = [0]
def _profiled_decode_n(model, cur_token, input_pos, num_new_tokens, *a, **k):
    _calls[0] += 1
    if _calls[0] < _profile_call:
        return _orig_decode_n(model, cur_token, input_pos, num_new_tokens, *a, **k)
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    if device == "cuda": torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=acts) as prof:
        out = _orig_decode_n(model, cur_token, input_pos, num_new_tokens, *a, **k)
        if device == "cuda": torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    prof.export_chrome_trace(profile_trace)
    Path(profile_trace + ".meta").write_text(json.dumps({"tokens": num_new_tokens, "wall_s": wall}))
    return out
generate.decode_n_tokens = _profiled_decode_n
'''


def gpt_fast_table(trace: Path, shape: str, cuda: bool) -> ProfileTable:
    """The table of the trace the gpt-fast driver wrote (with ``GPT_FAST_PROFILE_PATCH``; its token count
    and wall time beside it in ``<trace>.meta``)."""
    meta = json.loads(Path(str(trace) + ".meta").read_text())
    t = table_from_trace(trace, int(meta["tokens"]), "gpt-fast", shape, gpu=cuda)
    t.wall_us_per_token = 1e6 * meta["wall_s"] / max(int(meta["tokens"]), 1)
    t.note += "; decode_one_token, compile (reduce-overhead)" if cuda else "; eager"
    return t


# -- the report -------------------------------------------------------------------------------------------


def format_profiles(tables: list[ProfileTable]) -> str:
    """Each implementation's top kernels, then the categories side by side (us per token)."""
    out: list[str] = []
    for t in tables:
        head = f"**{t.shape} / {t.impl}**"
        if t.error:
            out += [f"{head}: ERROR {t.error[:300]}", ""]
            continue
        out += [f"{head}: {t.tokens} tokens profiled; {t.note}; kernel time {t.busy_us_per_token:.1f} us/token"
                + (f", wall {t.wall_us_per_token:.1f} us/token under the profiler" if t.wall_us_per_token else "")
                + f"; trace {Path(t.trace).name}", "",
                "| # | kernel / op | category | calls/token | us/token | % of step |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(t.rows, 1):
            out.append(f"| {i} | `{r.name}` | {r.category} | {r.calls_per_token:.2f} | {r.us_per_token:.2f} | "
                       f"{100 * r.share:.1f} |")
        out.append("")
    ok = [t for t in tables if not t.error]
    if ok:
        out += ["| shape | category | " + " | ".join(f"{t.impl} us/token" for t in ok) + " |",
                "|---|---|" + "---|" * len(ok)]
        shape = ok[0].shape
        for c in (*CATEGORIES, "total"):
            vals = [t.busy_us_per_token if c == "total" else t.categories.get(c, 0.0) for t in ok]
            if c == "total" or any(vals):
                out.append(f"| {shape} | {c} | " + " | ".join(f"{v:.1f}" for v in vals) + " |")
    return "\n".join(out)
