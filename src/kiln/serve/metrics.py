"""``GET /metrics``: the server's counters in Prometheus' text exposition format (version 0.0.4),
named as vLLM names them (``vllm:num_requests_running`` is ``kiln:num_requests_running`` here), so a
vLLM dashboard works after a rename of the prefix.

Three parts, each a few dozen lines:

    Histogram, Family, render   the format, written by hand (no prometheus_client dependency)
    RequestStats                per-sequence times and sizes; the engine thread records them
    families(...)               a snapshot of the worker and the engine -> the metric families

Where the numbers come from: queue lengths, KV blocks, steps and the prefix cache are the engine's
``stats()`` (the worker keeps the last one: read from the engine in a thread, or from the engine
process's last message); finish reasons, tokens and latencies are recorded by ``EngineWorker``'s
thread, which sees every sequence's submission (the route passes the moment the request arrived),
first output and end in the server process, whichever mode the engine runs in. That is a few float
operations per sequence and one integer addition per sequence per step: no per-token work.
"""

from __future__ import annotations

import math
import threading
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's buckets (vllm/v1/metrics/loggers.py), with finer ones below its smallest for Kiln's small,
# fast models (a 124M model decodes a token in ~0.5 ms on an H100; a tiny one answers in ~10 ms).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
               50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def one_two_five(limit: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``limit`` (vLLM's token-count buckets): ``one_two_five(100)`` ->
    (1, 2, 5, 10, 20, 50, 100)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > limit:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


# ---------------------------------------------------------------------------------------------
# The text format
# ---------------------------------------------------------------------------------------------
class Histogram:
    """Observations counted in buckets: ``counts[i]`` holds those <= ``bounds[i]`` and above the bound
    before (not cumulative: ``render`` adds them up), the last entry those above every bound (+Inf)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        assert list(bounds) == sorted(set(bounds)), "bucket bounds must increase"
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket le=b holds value <= b
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        h = Histogram.__new__(Histogram)
        h.bounds, h.counts, h.sum = self.bounds, list(self.counts), self.sum
        return h


@dataclass(frozen=True)
class Family:
    """One metric: its name (a counter's ends in ``_total``), type ('counter', 'gauge' or
    'histogram'), help text, and samples ``(labels, value)`` (a ``Histogram`` for a histogram)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], Any]]


def number(v: float) -> str:
    """A sample value as Prometheus reads it: integers bare, floats in Python's shortest round-trip
    form, +Inf / -Inf / NaN spelled as the format spells them."""
    if isinstance(v, (bool, int)):
        return str(int(v))
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def escape_label(value: str) -> str:
    """A label value inside double quotes: backslash, double quote and line feed escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """HELP text: backslash and line feed escaped (quotes stay as they are)."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(str(v))}"' for k, v in labels.items()) + "}"


def render(families: list[Family]) -> str:
    """The families in the text exposition format 0.0.4: per family a ``# HELP`` and a ``# TYPE``
    line, then its samples; a histogram as cumulative ``_bucket`` lines (``le`` last, ending with
    ``+Inf``), then ``_sum`` and ``_count``."""
    lines = []
    for f in families:
        assert f.kind in ("counter", "gauge", "histogram"), f.kind
        lines.append(f"# HELP {f.name} {escape_help(f.help)}")
        lines.append(f"# TYPE {f.name} {f.kind}")
        for labels, value in f.samples:
            if f.kind != "histogram":
                lines.append(f"{f.name}{_labels(labels)} {number(value)}")
                continue
            running = 0
            for bound, n in zip((*value.bounds, math.inf), value.counts):
                running += n
                lines.append(f"{f.name}_bucket{_labels({**labels, 'le': number(float(bound))})} {running}")
            lines.append(f"{f.name}_sum{_labels(labels)} {number(value.sum)}")
            lines.append(f"{f.name}_count{_labels(labels)} {running}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# What the engine thread records per sequence
# ---------------------------------------------------------------------------------------------
class RequestStats:
    """Per-sequence counters and histograms (a sequence: one prompt's one choice; a request with
    ``n`` choices or several prompts counts each, as vLLM counts its engine requests). Written by the
    engine thread only; ``snapshot`` (any thread) copies them under the lock."""

    def __init__(self, max_model_len: int = 0) -> None:
        self.lock = threading.Lock()
        self.generation_tokens = 0
        """Tokens generated, counted as each step's outputs reach the server (aborted sequences' too)."""
        self.prompt_tokens = 0
        """Prompt tokens of the sequences whose first token came (their prompt computed)."""
        self.finished = {"stop": 0, "length": 0}
        lengths = one_two_five(max_model_len if max_model_len > 0 else 1 << 20)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.tpot = Histogram(TPOT_BUCKETS)
        self.prompt_len = Histogram(lengths)
        self.gen_len = Histogram(lengths)
        self.queue = Histogram(E2E_BUCKETS)
        self.prefill = Histogram(E2E_BUCKETS)
        self.decode = Histogram(E2E_BUCKETS)

    def first_token(self, ttft_s: float, prompt_tokens: int) -> None:
        """A sequence's first output came ``ttft_s`` seconds after its request arrived."""
        with self.lock:
            self.ttft.observe(ttft_s)
            self.prompt_tokens += prompt_tokens

    def finish(self, reason: str | None, e2e_s: float, decode_s: float, prompt_tokens: int,
               generated: int, phases: Any = None) -> None:
        """A sequence finished (``reason`` 'stop' or 'length'; anything else counts as 'stop', as the
        routes answer it) ``e2e_s`` after its request arrived, ``decode_s`` after its first token.
        ``phases``: the engine's ``RequestMetrics`` (its queue, prefill and decode times), if it gives them."""
        with self.lock:
            self.finished["length" if reason == "length" else "stop"] += 1
            self.e2e.observe(e2e_s)
            if generated > 1:  # time per output token after the first (vLLM's per-request TPOT)
                self.tpot.observe(decode_s / (generated - 1))
            self.prompt_len.observe(prompt_tokens)
            self.gen_len.observe(generated)
            for hist, name in ((self.queue, "queue_time"), (self.prefill, "prefill_time"),
                               (self.decode, "decode_time")):
                value = getattr(phases, name, None)
                if value is not None:
                    hist.observe(value)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"generation_tokens": self.generation_tokens, "prompt_tokens": self.prompt_tokens,
                    "finished": dict(self.finished), "ttft": self.ttft.copy(), "e2e": self.e2e.copy(),
                    "tpot": self.tpot.copy(), "prompt_len": self.prompt_len.copy(), "gen_len": self.gen_len.copy(),
                    "queue": self.queue.copy(), "prefill": self.prefill.copy(), "decode": self.decode.copy()}


# ---------------------------------------------------------------------------------------------
# The families /metrics serves
# ---------------------------------------------------------------------------------------------
PHASES = (("queue", "in the engine's queue before its first step"),
          ("prefill", "from its first engine step to its first token (its prompt's chunks)"),
          ("decode", "from its first token to its end, in the engine"))
"""The engine's phases of a request (``RequestMetrics``) that /metrics has a histogram of."""


def families(model_name: str, worker: dict[str, Any], requests: dict[str, Any],
             memory: dict[str, float]) -> list[Family]:
    """The metric families from a snapshot: ``worker`` is ``EngineWorker.stats()`` (its counters and
    ``engine``: the engine's ``stats()``; keys an engine lacks count 0), ``requests`` is
    ``RequestStats.snapshot()``, ``memory`` the resident bytes by process ('server', 'engine')."""
    e = worker.get("engine") or {}
    m = {"model_name": model_name}

    def one(name: str, kind: str, help: str, value: float) -> Family:
        return Family(name, kind, help, [(m, value)])

    def by(name: str, kind: str, help: str, label: str, values: dict[str, float]) -> Family:
        return Family(name, kind, help, [({**m, label: k}, v) for k, v in values.items()])

    steps, lean, mixed = e.get("steps", 0), e.get("lean_steps", 0), e.get("mixed_steps", 0)
    secs, general_s, mixed_s = e.get("step_seconds", 0.0), e.get("general_seconds", 0.0), e.get("mixed_seconds", 0.0)
    block = e.get("block_size", 0)
    num_blocks = e.get("num_blocks", 0)
    return [
        one("kiln:num_requests_running", "gauge", "Sequences in the engine's running batch.", e.get("running", 0)),
        one("kiln:num_requests_waiting", "gauge", "Sequences waiting in the engine's queue.", e.get("waiting", 0)),
        one("kiln:num_requests_pending", "gauge", "Sequences admitted by the server and not yet ended "
            "(running, waiting, or on their way to the engine); at --max-pending new requests get 429.",
            worker.get("pending", 0)),
        one("kiln:kv_cache_usage_perc", "gauge", "KV-cache usage: the fraction of KV blocks in use (1 = full).",
            e.get("used_blocks", 0) / num_blocks if num_blocks else 0.0),
        by("kiln:resident_memory_bytes", "gauge", "Resident memory of the server process, and of the engine "
           "process when the engine runs in its own (--engine-process).", "process", memory),
        by("kiln:request_success_total", "counter", "Sequences ended, by finish reason: stop (end of text, a "
           "stop token or string), length (max_tokens or the context), abort (the client went away, or the "
           "server shut down).", "finished_reason",
           {**requests["finished"], "abort": worker.get("aborted", 0)}),
        by("kiln:request_errors_total", "counter", "Sequences that ended in an error: timeout (past "
           "--request-timeout, 504), invalid (refused by the engine as a bad request, 400), error (the engine "
           "failed, 500).", "reason",
           {"timeout": worker.get("timed_out", 0), "invalid": worker.get("invalid", 0),
            "error": worker.get("errors", 0)}),
        one("kiln:requests_rejected_total", "counter", "HTTP requests refused with 429 because the server held "
            "--max-pending sequences.", worker.get("rejected", 0)),
        one("kiln:prompt_tokens_total", "counter", "Prompt tokens of the sequences whose prompt was computed.",
            requests["prompt_tokens"]),
        one("kiln:generation_tokens_total", "counter", "Tokens generated.", requests["generation_tokens"]),
        by("kiln:engine_steps_total", "counter", "Engine steps, by kind: lean (the decode-only graph path), "
           "mixed (prefill beside a lean decode), general (the packed prefill and decode step).", "kind",
           {"lean": lean, "mixed": mixed, "general": steps - lean - mixed}),
        by("kiln:engine_step_seconds_total", "counter", "Wall seconds inside engine steps, by kind.", "kind",
           {"lean": max(secs - general_s - mixed_s, 0.0), "mixed": mixed_s, "general": general_s}),
        one("kiln:prefix_cache_queries_total", "counter", "Prefix cache queries, in prompt tokens looked up "
            "(full KV blocks).", e.get("prefix_cache_queries", 0) * block),
        one("kiln:prefix_cache_hits_total", "counter", "Prefix cache hits, in prompt tokens found cached "
            "(full KV blocks).", e.get("prefix_cache_hits", 0) * block),
        one("kiln:num_preemptions_total", "counter", "Sequences preempted by the engine (their KV blocks freed "
            "and recomputed later).", e.get("preemptions", 0)),
        one("kiln:spec_decode_num_draft_tokens_total", "counter", "Draft tokens proposed by speculative "
            "decoding.", e.get("spec_proposed", 0)),
        one("kiln:spec_decode_num_accepted_tokens_total", "counter", "Draft tokens accepted.",
            e.get("spec_accepted", 0)),
        one("kiln:time_to_first_token_seconds", "histogram", "Seconds from a request's arrival to each of its "
            "sequences' first token.", requests["ttft"]),
        one("kiln:e2e_request_latency_seconds", "histogram", "Seconds from a request's arrival to each of its "
            "sequences' end (sequences that finished: stop or length).", requests["e2e"]),
        one("kiln:request_time_per_output_token_seconds", "histogram", "Per finished sequence of two tokens or "
            "more: seconds from its first token to its last, over the tokens after the first.", requests["tpot"]),
        *(one(f"kiln:request_{phase}_time_seconds", "histogram", f"Per finished sequence: seconds {what} (the "
              "engine's clock).", requests[phase]) for phase, what in PHASES),
        one("kiln:request_prompt_tokens", "histogram", "Prompt length of each finished sequence, in tokens.",
            requests["prompt_len"]),
        one("kiln:request_generation_tokens", "histogram", "Tokens generated by each finished sequence.",
            requests["gen_len"]),
    ]


def resident_bytes(pid: int | None = None) -> float | None:
    """Resident memory of process ``pid`` (this one when None) from Linux's /proc; None elsewhere."""
    import os

    try:
        with open(f"/proc/{pid or 'self'}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
