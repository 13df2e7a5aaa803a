"""`GET /metrics`: the Prometheus text format written exactly, and the counters moving by what the
requests did: in-process over a stand-in engine (exact counts, errors, timings, the API key), and
through `kiln serve` with the engine in its own process and in a thread (the fixture model)."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from kiln.generate import RequestOutput  # noqa: E402
from kiln.serve.metrics import (  # noqa: E402
    CONTENT_TYPE,
    Family,
    Histogram,
    RequestStats,
    one_two_five,
    render,
)
from serve_helpers import StubEngine  # noqa: E402

MODEL = "kiln-chat-tiny"


# ---------------------------------------------------------------------------------------------
# A small parser of the text format (prometheus_client is not a dependency): checks the structure
# as it reads, so a malformed exposition fails here
# ---------------------------------------------------------------------------------------------
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)')


def _unescape(v: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), v)


def _labels(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    pairs = _LABEL.findall(text)
    assert ",".join(f'{k}="{v}"' for k, v in pairs) == text, f"bad labels {text!r}"
    return {k: _unescape(v) for k, v in pairs}


class Scrape:
    """One /metrics body: ``types`` and ``helps`` by family, samples as (name, labels, value)."""

    def __init__(self, text: str) -> None:
        assert text.endswith("\n")
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for line in text.splitlines():
            if line.startswith("# HELP "):
                name, _, help = line[7:].partition(" ")
                self.helps[name] = help
            elif line.startswith("# TYPE "):
                name, _, kind = line[7:].partition(" ")
                assert name in self.helps and name not in self.types, f"TYPE of {name} without HELP, or twice"
                assert kind in ("counter", "gauge", "histogram"), line
                self.types[name] = kind
            else:
                m = _SAMPLE.match(line)
                assert m, f"not a sample line: {line!r}"
                name, labels, value = m.group(1), _labels(m.group(2)), float(m.group(3))
                family = self.family_of(name)
                assert family is not None, f"{name} has no TYPE line before it"
                if self.types[family] == "counter":
                    assert name.endswith("_total") and value >= 0, line
                self.samples.append((name, labels, value))
        for name, kind in self.types.items():
            if kind == "histogram":
                self._check_histogram(name)

    def family_of(self, sample: str) -> str | None:
        if sample in self.types:
            return sample
        for suffix in ("_bucket", "_sum", "_count"):
            base = sample.removesuffix(suffix)
            if sample.endswith(suffix) and self.types.get(base) == "histogram":
                return base
        return None

    def _check_histogram(self, name: str) -> None:
        les = [(lb["le"], v) for n, lb, v in self.samples if n == name + "_bucket"]
        assert les and les[-1][0] == "+Inf", les
        bounds = [float(le) for le, _ in les]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
        counts = [v for _, v in les]
        assert counts == sorted(counts), f"{name}: buckets not cumulative {counts}"
        assert counts[-1] == self.value(name + "_count")

    def value(self, name: str, **labels: str) -> float:
        """The sum of ``name``'s samples whose labels include ``labels``; KeyError when none."""
        hits = [v for n, lb, v in self.samples if n == name and labels.items() <= lb.items()]
        if not hits:
            raise KeyError(f"{name} {labels}")
        return sum(hits)


def scrape(client) -> Scrape:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    return Scrape(r.text)


# ---------------------------------------------------------------------------------------------
# The format
# ---------------------------------------------------------------------------------------------
def test_render_writes_the_text_format_exactly():
    h = Histogram((0.5, 1.0))
    for v in (0.25, 0.5, 0.75, 4.0):  # 0.5 lands in le="0.5": a bucket counts values <= its bound
        h.observe(v)
    text = render([
        Family("kiln:a_total", "counter", 'Things "done".\nSecond line \\ here.',
               [({"model_name": 'm"1\\x\ny', "why": "stop"}, 3), ({"model_name": "m", "why": "length"}, 0)]),
        Family("kiln:g", "gauge", "A gauge.", [({}, 0.25), ({"k": "v"}, math.inf)]),
        Family("kiln:h_seconds", "histogram", "A histogram.", [({"model_name": "m"}, h)]),
    ])
    assert text == (
        '# HELP kiln:a_total Things "done".\\nSecond line \\\\ here.\n'
        "# TYPE kiln:a_total counter\n"
        'kiln:a_total{model_name="m\\"1\\\\x\\ny",why="stop"} 3\n'
        'kiln:a_total{model_name="m",why="length"} 0\n'
        "# HELP kiln:g A gauge.\n"
        "# TYPE kiln:g gauge\n"
        "kiln:g 0.25\n"
        'kiln:g{k="v"} +Inf\n'
        "# HELP kiln:h_seconds A histogram.\n"
        "# TYPE kiln:h_seconds histogram\n"
        'kiln:h_seconds_bucket{model_name="m",le="0.5"} 2\n'
        'kiln:h_seconds_bucket{model_name="m",le="1.0"} 3\n'
        'kiln:h_seconds_bucket{model_name="m",le="+Inf"} 4\n'
        'kiln:h_seconds_sum{model_name="m"} 5.5\n'
        'kiln:h_seconds_count{model_name="m"} 4\n'
    )
    s = Scrape(text)  # and the test's parser reads it back, escapes undone
    assert s.value("kiln:a_total", model_name='m"1\\x\ny') == 3
    assert s.value("kiln:h_seconds_count") == 4 and s.value("kiln:g", k="v") == math.inf


def test_request_stats_buckets_and_time_per_output_token():
    assert one_two_five(100) == (1, 2, 5, 10, 20, 50, 100) and one_two_five(128)[-1] == 100
    r = RequestStats(max_model_len=64)
    assert r.prompt_len.bounds == (1, 2, 5, 10, 20, 50)
    r.first_token(0.02, 7)
    r.finish("length", e2e_s=0.5, decode_s=0.3, prompt_tokens=7, generated=4)  # 3 tokens after the first
    r.finish("stop", e2e_s=0.1, decode_s=0.0, prompt_tokens=7, generated=1)  # one token: no TPOT
    s = r.snapshot()
    assert s["finished"] == {"stop": 1, "length": 1} and s["prompt_tokens"] == 7
    assert s["tpot"].count == 1 and s["tpot"].sum == pytest.approx(0.1)
    assert s["e2e"].count == 2 and s["gen_len"].sum == 5 and s["ttft"].count == 1
    r.finish("stop", 1.0, 0.5, 7, 2)
    assert s["e2e"].count == 2  # a snapshot is a copy


# ---------------------------------------------------------------------------------------------
# In-process, over a stand-in engine: exact counts
# ---------------------------------------------------------------------------------------------
@dataclass
class TickEngine(StubEngine):
    """One 'a' (id 97) per step per request, ``step_s`` seconds a step; finishes with 'stop' after 3
    tokens, or with 'length' at max_tokens when that comes first or ``ignore_eos`` is set. ``stats``
    gives fixed step and prefix-cache counts (blocks of 4 tokens)."""

    step_s: float = 0.0
    fail_next: bool = False

    def stats(self):
        return {"running": len(self.live), "waiting": 0, "num_blocks": 8, "used_blocks": len(self.live),
                "block_size": 4, "steps": 10, "lean_steps": 3, "mixed_steps": 2, "step_seconds": 1.5,
                "general_seconds": 1.0, "mixed_seconds": 0.25, "prefix_cache_queries": 6, "prefix_cache_hits": 2,
                "preemptions": 1}

    def step(self):
        time.sleep(self.step_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        outs = []
        for rid, (prompt, params, gen) in list(self.live.items()):
            gen.append(97)
            length = len(gen) >= params.max_tokens
            stop = len(gen) >= 3 and not params.ignore_eos
            done = length or stop
            reason = ("length" if length else "stop") if done else None
            outs.append(RequestOutput(rid, prompt, list(gen), [97], "a" * len(gen), "a", None, done, reason,
                                      len(prompt), len(gen)))
            if done:
                del self.live[rid]
        return outs


def make_client(engine, **cfg):
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app
    from kiln.serve.config import ServeConfig
    from kiln.serve.worker import EngineWorker
    from kiln.tokenizer import Tokenizer

    config = ServeConfig(model_name="fake", **cfg)
    worker = EngineWorker(engine, max_pending=config.max_pending, request_timeout_s=config.request_timeout_s,
                          max_model_len=64)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    return TestClient(build_app(ServerState(worker, tok, config, "fake", 64, 257))), worker


def complete(client, prompt="abcd", **kw):
    return client.post("/v1/completions", json={"model": "fake", "prompt": prompt, **kw},
                       headers={"Authorization": "Bearer secret-key-123"})


def test_counters_and_histograms_move_by_what_the_requests_did():
    client, worker = make_client(TickEngine(step_s=0.01), api_key="secret-key-123", max_pending=4)
    with client:
        assert client.get("/v1/models").status_code == 401  # the API is behind the key...
        before = scrape(client)  # ...and /metrics is not, as vLLM's
        assert before.value("kiln:time_to_first_token_seconds_count", model_name="fake") == 0
        usage = [complete(client, max_tokens=8).json()["usage"],  # stop after 3
                 complete(client, "xy", max_tokens=2).json()["usage"],  # length at 2
                 complete(client, "pqrstu", max_tokens=5, ignore_eos=True, n=2).json()["usage"]]  # 2 x length at 5
        with client.stream("POST", "/v1/completions", headers={"Authorization": "Bearer secret-key-123"}, json={
                "model": "fake", "prompt": "abcd", "max_tokens": 8, "stream": True}) as r:
            assert [ln for ln in r.iter_lines() if ln.startswith("data: ")][-1] == "data: [DONE]"  # stop after 3
        assert complete(client, max_tokens=8, n=5).status_code == 429  # over --max-pending 4
        s = scrape(client)
    assert [u["completion_tokens"] for u in usage] == [3, 2, 10]
    gen = sum(u["completion_tokens"] for u in usage) + 3
    prompt = 4 + 2 + 2 * 6 + 4  # each of n sequences counts its prompt (usage counts it once)
    assert s.value("kiln:generation_tokens_total") == gen
    assert s.value("kiln:prompt_tokens_total") == prompt
    assert s.value("kiln:request_success_total", finished_reason="stop") == 2
    assert s.value("kiln:request_success_total", finished_reason="length") == 3
    assert s.value("kiln:request_success_total", finished_reason="abort") == 0
    assert s.value("kiln:requests_rejected_total") == 1
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_prompt_tokens",
                 "request_generation_tokens"):
        assert s.value(f"kiln:{name}_count") == 5, name
    assert s.value("kiln:request_time_per_output_token_seconds_count") == 5  # all made >= 2 tokens
    assert s.value("kiln:request_generation_tokens_sum") == gen
    assert s.value("kiln:request_prompt_tokens_sum") == prompt
    assert s.value("kiln:request_prompt_tokens_bucket", le="5.0") == 3  # 4, 2, 4 tokens; the 6s above
    assert s.value("kiln:request_generation_tokens_bucket", le="2.0") == 1
    # times: a token every >= 10 ms, so the first takes >= 10 ms and each later one >= 10 ms
    assert s.value("kiln:time_to_first_token_seconds_sum") >= 5 * 0.01
    assert s.value("kiln:time_to_first_token_seconds_bucket", le="0.005") == 0
    assert s.value("kiln:request_time_per_output_token_seconds_sum") >= 5 * 0.01 * 0.9
    assert s.value("kiln:e2e_request_latency_seconds_sum") >= s.value("kiln:time_to_first_token_seconds_sum")
    # the engine's own counters, as its stats() gives them (prefix-cache blocks of 4 -> tokens)
    assert s.value("kiln:engine_steps_total", kind="lean") == 3 and s.value("kiln:engine_steps_total") == 10
    assert s.value("kiln:engine_steps_total", kind="general") == 5
    assert s.value("kiln:engine_step_seconds_total", kind="lean") == pytest.approx(0.25)
    assert s.value("kiln:prefix_cache_queries_total") == 24 and s.value("kiln:prefix_cache_hits_total") == 8
    assert s.value("kiln:num_preemptions_total") == 1
    assert s.value("kiln:num_requests_running", model_name="fake") == 0
    assert s.value("kiln:kv_cache_usage_perc") == 0 and s.value("kiln:num_requests_pending") == 0
    assert s.value("kiln:resident_memory_bytes", process="server") > 10 * 2**20
    assert s.types["kiln:time_to_first_token_seconds"] == "histogram"
    assert s.types["kiln:generation_tokens_total"] == "counter" and s.types["kiln:kv_cache_usage_perc"] == "gauge"


def test_errors_are_counted_by_reason():
    engine = TickEngine(step_s=0.02, fail_next=True)
    client, _ = make_client(engine, request_timeout_s=0.3)
    with client:
        assert client.post("/v1/completions", json={"model": "fake", "prompt": "a"}).status_code == 500
        r = client.post("/v1/completions", json={"model": "fake", "prompt": "a", "max_tokens": 40,
                                                 "ignore_eos": True})
        assert r.status_code == 504  # 40 steps of 20 ms: past the 0.3 s timeout
        s = scrape(client)
    assert s.value("kiln:request_errors_total", reason="error") == 1
    assert s.value("kiln:request_errors_total", reason="timeout") == 1
    assert s.value("kiln:request_errors_total", reason="invalid") == 0
    assert s.value("kiln:request_success_total") == 0
    assert s.value("kiln:e2e_request_latency_seconds_count") == 0  # only finished sequences
    assert s.value("kiln:time_to_first_token_seconds_count") == 1  # the timed-out one had its first token
    assert 1 <= s.value("kiln:generation_tokens_total") <= 40


# ---------------------------------------------------------------------------------------------
# Through `kiln serve`: the engine in its own process (the default) and in a thread
# ---------------------------------------------------------------------------------------------
def _settled(client, timeout_s: float = 20.0) -> Scrape:
    """A scrape once nothing is in flight (the engine's stats are a snapshot: wait for the last)."""
    deadline = time.monotonic() + timeout_s
    while True:
        s = scrape(client)
        idle = s.value("kiln:num_requests_pending") == 0 and s.value("kiln:kv_cache_usage_perc") == 0
        if (idle and s.value("kiln:num_requests_running") == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


def test_metrics_through_kiln_serve(srv):
    c = httpx.Client(base_url=srv.url, timeout=30)
    before = _settled(c)
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 60}
    usages = [c.post("/v1/chat/completions", json=chat).json()["usage"]]
    with c.stream("POST", "/v1/chat/completions", json={
            **chat, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    usages.append(httpx.Response(200, content=events[-2]).json()["usage"])
    once = {"model": MODEL, "prompt": "Once", "max_tokens": 5, "ignore_eos": True, "temperature": 0}
    usages.append(c.post("/v1/completions", json=once).json()["usage"])
    with c.stream("POST", "/v1/completions", json={
            **once, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}) as r:
        events = [ln[6:] for ln in r.iter_lines() if ln.startswith("data: ")]
    usages.append(httpx.Response(200, content=events[-2]).json()["usage"])
    after = _settled(c)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert [u["completion_tokens"] for u in usages][2:] == [5, 4]
    assert moved("kiln:generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert moved("kiln:prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert moved("kiln:request_success_total", finished_reason="stop") == 2  # the chat replies end at <|end|>
    assert moved("kiln:request_success_total", finished_reason="length") == 2
    assert moved("kiln:request_success_total", finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_time_per_output_token_seconds",
                 "request_generation_tokens"):
        assert moved(f"kiln:{name}_count") == 4, name
    assert moved("kiln:request_generation_tokens_sum") == sum(u["completion_tokens"] for u in usages)
    assert 0 < moved("kiln:time_to_first_token_seconds_sum") <= moved("kiln:e2e_request_latency_seconds_sum")
    for phase in ("queue", "prefill", "decode"):  # the engine's own phase times, across the pipe or not
        assert moved(f"kiln:request_{phase}_time_seconds_count") == 4, phase
    engine_s = sum(moved(f"kiln:request_{p}_time_seconds_sum") for p in ("queue", "prefill", "decode"))
    assert 0 < moved("kiln:request_decode_time_seconds_sum") and engine_s <= moved("kiln:e2e_request_latency_seconds_sum")
    assert moved("kiln:engine_steps_total") >= max(u["completion_tokens"] for u in usages)
    assert moved("kiln:engine_step_seconds_total") > 0
    assert after.value("kiln:num_requests_waiting", model_name=MODEL) == 0
    assert after.value("kiln:kv_cache_usage_perc") == 0
    memory = {lb["process"]: v for n, lb, v in after.samples if n == "kiln:resident_memory_bytes"}
    assert memory["server"] > 20 * 2**20
    assert ("engine" in memory) == _engine_process(srv)
    if "engine" in memory:
        assert memory["engine"] > 20 * 2**20  # the model and torch live there

    # a client hanging up mid-stream: counted as an abort, its first token and its tokens so far too
    with c.stream("POST", "/v1/completions", json={**once, "max_tokens": 120, "stream": True}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        end = _settled(c)
        if end.value("kiln:request_success_total", finished_reason="abort") > after.value(
                "kiln:request_success_total", finished_reason="abort"):
            break
        time.sleep(0.05)
    assert end.value("kiln:request_success_total", finished_reason="abort") - \
        after.value("kiln:request_success_total", finished_reason="abort") == 1
    ttft = "kiln:time_to_first_token_seconds_count"
    assert end.value(ttft) - after.value(ttft) == 1
    assert end.value("kiln:e2e_request_latency_seconds_count") == after.value("kiln:e2e_request_latency_seconds_count")
    assert end.value("kiln:generation_tokens_total") > after.value("kiln:generation_tokens_total")
    assert end.value("kiln:kv_cache_usage_perc") == 0 and end.value("kiln:num_requests_running") == 0


def _engine_process(server) -> bool:
    """Whether this ``kiln serve`` runs its engine in a child process (the thread one was started
    with --no-engine-process)."""
    return "--no-engine-process" not in server.proc.args


def test_models_list_max_model_len(server):
    models = httpx.get(server.url + "/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m["max_model_len"]) for m in models] == [(MODEL, 128)]
