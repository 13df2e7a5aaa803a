"""`kiln bench serve-http`: chat requests through Kiln's HTTP server vs the same engine called
directly, and vs `transformers serve`, on the same weights, same run.

Requests are AlpacaEval instructions (``--prompts``: real text, rendered with the chat template,
each cut to fit the context with room for ``--max-tokens``), ``--max-tokens`` greedy tokens each
(``ignore_eos``: random weights would stop at random places). For each concurrency c, the first
min(``--requests``, max(16, ``--waves`` x c)) requests run closed-loop with c in flight:

- ``kiln direct``: an ``LLMEngine`` loaded by the server's own loader (same ``EngineConfig``),
  driven in-process; TTFT = add_request to the first token, ITL = gaps between a request's tokens.
- ``kiln http``: ``kiln serve`` in a subprocess on 127.0.0.1; streaming ``/v1/chat/completions``
  from client processes (asyncio + httpx; ``--client-procs`` of them so the client is not the
  bottleneck); TTFT = request sent to the first token event, ITL = gaps between token events.
- ``transformers serve`` (``--transformers``): its continuous-batching server on the same weights
  exported in Hugging Face layout with the same chat template, offline; same client.

``http/direct`` is the HTTP path's output tokens/s over the direct engine's (goal: >= 0.90).
Every row runs in a ``try``: a failure becomes a row with its error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ALPACA_EVAL = "data/align/alpaca_eval/alpaca_eval.jsonl"
DEFAULT_PROMPTS = f"../shared/{ALPACA_EVAL}"  # beside the clone; also tried: ./shared/ (the GPU machine's copy)
FALLBACK_PROMPTS = ["Write a short poem about the sea.", "What are the names of some famous actors?",
                    "Explain how a kiln works, step by step, for a curious child.", "Give me three tips for sleep."]


@dataclass
class HttpRow:
    """One way of serving, at one concurrency."""

    impl: str
    concurrency: int
    requests: int = 0
    tok_s: float | None = None
    ttft_p50_ms: float | None = None
    ttft_p99_ms: float | None = None
    itl_p50_ms: float | None = None
    itl_p99_ms: float | None = None
    vs_direct: float | None = None
    note: str = ""
    error: str = ""
    tokens: int = 0  # output tokens counted (from usage for the HTTP rows)
    server_cpu_us: float | None = None  # the server process's CPU time (all threads) per output token
    engine_thread_cpu_us: float | None = None  # of that, the engine thread's ('kiln-engine')
    client_cpu_us: float | None = None  # the HTTP client processes' CPU time per output token
    vs_tserve: float | None = None  # a Kiln HTTP row's tok/s over transformers serve's at the same c
    events: int = 0  # streamed events that carried tokens


@dataclass
class Timings:
    """What a run measured: output tokens, wall seconds, per-request TTFTs and per-token gaps (s)."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    client_cpu_s: float | None = None  # CPU seconds of the HTTP client processes (None: no client)
    events: int = 0  # streamed events that carried tokens (HTTP rows)
    cut: int = 0  # requests not sent: the row's --http-row-s time ran out

    def row(self, impl: str, c: int, n: int) -> HttpRow:
        client = self.client_cpu_s / self.tokens * 1e6 if self.client_cpu_s is not None and self.tokens else None
        notes = [f"{self.errors} failed requests"] * bool(self.errors)
        if self.cut:
            notes.append(f"cut by --http-row-s: {n - self.cut} of {n} requests sent")
        return HttpRow(impl, c, n - self.cut, self.tokens / self.seconds if self.seconds else None,
                       pct(self.ttft, 0.5), pct(self.ttft, 0.99), pct(self.itl, 0.5), pct(self.itl, 0.99),
                       note="; ".join(notes), tokens=self.tokens, client_cpu_us=client)


def pct(xs: list[float], q: float) -> float | None:
    """The q-quantile of ``xs`` (seconds) in milliseconds (nearest rank); None when empty."""
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, math.ceil(q * len(xs)) - 1))] * 1e3


# -- the model folder and the requests ------------------------------------------------------------------


def chat_tokenizer(path: str | None) -> Any:
    """``path`` (a tokenizer.json, a tokenizer artifact folder, or a folder with GPT-2's vocab.json and
    merges.txt) with the chat tokens added; default: a byte-level tokenizer (no files needed)."""
    from kiln.align.chat import add_chat_tokens
    from kiln.tokenizer import Tokenizer

    if not path:
        tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    elif (Path(path) / "vocab.json").is_file() and (Path(path) / "merges.txt").is_file():
        tok = Tokenizer.from_gpt2_files(Path(path) / "vocab.json", Path(path) / "merges.txt")
    else:
        tok = Tokenizer.load(path)
    return add_chat_tokens(tok)


def build_model_dirs(args: argparse.Namespace, device: Any, work: Path) -> tuple[Path, Path | None, Any]:
    """A Kiln model folder (random weights of ``--shape``, the chat tokenizer beside it) and, for the
    transformers row, the same weights and template in Hugging Face layout."""
    import torch

    from kiln.bench.serve_models import serve_shapes
    from kiln.model import build_model, save_pretrained

    tok = chat_tokenizer(args.tokenizer)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = serve_shapes()
    if args.shape not in shapes:
        raise ValueError(f"unknown --shape {args.shape!r}; use one of {sorted(shapes)}")
    # The vocabulary is the tokenizer's, so no server can sample an id its tokenizer cannot decode
    # (transformers samples over every row of the head; Kiln stops at the tokenizer's size anyway).
    cfg = replace(shapes[args.shape], vocab_size=tok.vocab_size,
                  attention_impl="sdpa" if device.type == "cuda" else "kiln")
    torch.manual_seed(0)
    model = build_model(cfg, device=device, dtype=dtype).eval()
    text_only_head(model, tok)
    kiln_dir = save_pretrained(model, work / "kiln-bench-model")
    tok.save(kiln_dir / "tokenizer.json")
    hf_dir = export_hf_dir(model, tok, work / "hf-bench-model") if args.transformers else None
    del model
    return kiln_dir, hf_dir, tok


def export_hf_dir(model: Any, tok: Any, out: Path) -> Path:
    """``model`` in Hugging Face Llama layout (``export_for_references``: bf16, head untied) with the
    chat tokenizer files (``tokenizer.json``, ``tokenizer_config.json`` carrying the chat template)
    and ``<|end|>`` as its end-of-sequence id: a folder ``transformers serve`` loads offline."""
    from kiln.align.chat import save_hf_tokenizer
    from kiln.bench.serve_models import export_for_references

    hf_dir = export_for_references(model, out)
    save_hf_tokenizer(tok, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(eos_token_id=tok.special_tokens["<|end|>"], pad_token_id=tok.eot_id)
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    return hf_dir


def text_only_head(model: Any, tok: Any) -> int:
    """Zero the output head's rows (lm_head.weight: (vocab, d_model)) of the ids that decode to no text
    alone: special tokens and byte pieces that are not whole UTF-8 characters. Returns how many.

    Why: a random model's greedy reply repeats one id, here the chat template's ``<|assistant|>``;
    ``transformers serve`` streams text with special tokens skipped, so it sent no event to time
    (only the final usage). With those logits at 0 and ~all others random, the argmax is a text
    token, every server streams an event per token, and the speed of a step is unchanged."""
    import torch

    specials = set(tok.special_tokens.values())
    bad = []
    for i in range(model.lm_head.weight.shape[0]):
        b = tok.vocab.get(i)
        try:
            ok = i not in specials and b is not None and bool(b.decode("utf-8"))
        except UnicodeDecodeError:
            ok = False
        if not ok:
            bad.append(i)
    with torch.no_grad():
        model.lm_head.weight[torch.tensor(bad, dtype=torch.long, device=model.lm_head.weight.device)] = 0
    return len(bad)


def chat_requests(path: str, n: int, tok: Any, context: int, max_tokens: int) -> list[tuple[list, list[int]]]:
    """``n`` requests ``(messages, prompt ids)`` from the AlpacaEval instructions (cycled), each
    instruction cut so that its rendered prompt leaves ``max_tokens`` of the context."""
    from kiln.align.chat import ChatTemplate

    tpl = ChatTemplate.from_tokenizer(tok)
    p = Path(path)
    if not p.is_file() and path == DEFAULT_PROMPTS and Path("shared", ALPACA_EVAL).is_file():
        p = Path("shared", ALPACA_EVAL)
    texts = [json.loads(line)["instruction"] for line in p.read_text(encoding="utf-8").splitlines()
             if line.strip()] if p.is_file() else []
    if not texts:
        print(f"--prompts {path} is absent: using {len(FALLBACK_PROMPTS)} built-in prompts", file=sys.stderr)
        texts = FALLBACK_PROMPTS
    room = context - max_tokens
    if room < 8:
        raise ValueError(f"--max-tokens {max_tokens} leaves {room} tokens of the {context}-token context for prompts")
    out = []
    for i in range(n):
        text = texts[i % len(texts)]
        ids = tpl.render([{"role": "user", "content": text}])
        while len(ids) > room:  # cut the instruction's tokens (a cut may split a character: re-render)
            body = tok.encode_ordinary(text)
            text = tok.decode(body[: max(1, len(body) - (len(ids) - room))]).rstrip("\ufffd")
            ids = tpl.render([{"role": "user", "content": text}])
        out.append(([{"role": "user", "content": text}], ids))
    return out


# -- direct engine ----------------------------------------------------------------------------------------


def engine_overrides(args: argparse.Namespace) -> dict[str, str]:
    """The EngineConfig both Kiln rows use (the server gets the same via --engine)."""
    c = max(args.concurrency)
    return {"max_num_seqs": str(c), "max_num_batched_tokens": str(max(2048, c)), **args.engine}


def check_server_stack() -> None:
    """Raise at once, before any row runs, when ``kiln serve``'s packages do not import here: the
    server subprocess would otherwise fail row by row, minutes into a run (as on a GPU machine whose
    wheels were installed without their dependencies: fastapi 0.165 imports ``opentelemetry``)."""
    import importlib

    for mod in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            raise RuntimeError(f"the HTTP rows need the server's packages, and importing {mod} failed: {e}. "
                               "Install them with their dependencies: pip install 'kiln[serve]'") from e


def run_direct(engine: Any, prompts: list[list[int]], c: int, max_tokens: int, temperature: float = 0.0,
               top_p: float | None = None) -> Timings:
    """Closed loop: keep ``c`` requests in the engine until every prompt is done (greedy, or sampled
    at ``temperature`` / ``top_p``, request i seeded i)."""
    from kiln.generate import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, ignore_eos=True)
    pending = list(reversed(prompts))
    start: dict[str, float] = {}
    last: dict[str, float] = {}
    t = Timings()
    t0 = time.perf_counter()
    while pending or start:
        while pending and len(start) < c:
            p = params if temperature == 0 else replace(params, seed=len(prompts) - len(pending))
            start[engine.add_request(pending.pop(), p)] = time.perf_counter()
        outs = engine.step()
        now = time.perf_counter()
        for o in outs:
            n = len(o.new_token_ids)
            t.tokens += n
            if n and o.request_id not in last:
                t.ttft.append(now - start[o.request_id])
            elif n:
                t.itl.append((now - last[o.request_id]) / n)
            if n:
                last[o.request_id] = now
            if o.finished:
                start.pop(o.request_id, None)
                last.pop(o.request_id, None)
    t.seconds = time.perf_counter() - t0
    return t


# -- HTTP client (runs in --client-procs processes) ---------------------------------------------------------


class _Conn:
    """One keep-alive HTTP/1.1 connection, spoken by hand over asyncio streams: a streamed request
    costs the client a few JSON parses, not a general-purpose client's layers (httpx spent ~200 us of
    CPU per token here, more than the server it measured)."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.keep = True  # the last response left the connection open

    async def post(self, path: str, body: bytes) -> tuple[int, Any]:
        """Send ``body``; returns (status, an async iterator over the response body's pieces)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\nContent-Type: application/json"
                          f"\r\nAccept: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        status = int((await self.reader.readline()).split()[1])
        headers = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            k, _, v = line.decode("latin-1").partition(":")
            headers[k.strip().lower()] = v.strip().lower()
        self.keep = headers.get("connection") != "close"
        return status, self._body(headers)

    async def _body(self, headers: dict) -> Any:
        r = self.reader
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await r.readline()).split(b";")[0], 16)
                if size == 0:
                    await r.readline()
                    break
                yield (await r.readexactly(size + 2))[:-2]
        else:
            yield await r.readexactly(int(headers.get("content-length", 0)))
        if not self.keep:
            self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _one(conn: _Conn, path: str, body: dict, t: Timings, continuous: bool = True) -> None:
    """One streamed request. ``continuous``: the server puts the running ``completion_tokens`` in every
    chunk (``continuous_usage_stats``, vLLM's and Kiln's extension), so a chunk of several tokens (Kiln
    sends one per request per engine step) counts them all and its gap is spread over them (ITL per
    token, as the direct rows measure it: one entry per chunk). Otherwise (``transformers serve``:
    usage only at the end) each event with text is one token event for the gaps, and the tokens
    come from the final usage; ``t.events`` counts the token events either way."""
    t0 = time.perf_counter()
    prev = None
    seen = 0  # completion tokens accounted for so far
    usage_tokens = None
    buf = b""
    try:
        status, pieces = await conn.post(path, json.dumps(body).encode())
        if status != 200:
            async for _ in pieces:
                pass
            t.errors += 1
            return
        async for piece in pieces:
            buf += piece
            *events, buf = buf.split(b"\n\n")
            for ev in events:
                if not ev.startswith(b"data: ") or ev == b"data: [DONE]":
                    continue
                chunk = json.loads(ev[6:])
                if "error" in chunk and not chunk.get("choices"):
                    raise RuntimeError(f"error event: {chunk['error']}")
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                choices = chunk.get("choices") or []
                delta = (choices[0].get("delta") or {}) if choices else {}
                if not choices or "role" in delta and not delta.get("content"):
                    continue  # the role-only first event and the usage event carry no token
                if not continuous and not delta.get("content"):
                    continue  # the finish event (transformers 5.17 puts its usage there)
                now = time.perf_counter()
                k = max(1, usage_tokens - seen) if continuous and usage and usage_tokens is not None else 1
                seen += k
                t.events += 1
                if prev is None:
                    t.ttft.append(now - t0)
                else:
                    t.itl.append((now - prev) / k)
                prev = now
    except Exception:  # noqa: BLE001 - a failed request is counted, the run goes on
        conn.close()
        t.errors += 1
        return
    t.tokens += usage_tokens if usage_tokens is not None else seen


async def _client(url: str, bodies: list[dict], c: int, continuous: bool = True, stop_at: float = math.inf,
                  hard_at: float = math.inf) -> Timings:
    """``c`` workers, each over its own keep-alive connection, until ``bodies`` are all answered, or
    until ``stop_at`` (time.time()): no request starts after it, those in flight finish (counted in
    ``cut``: the requests never sent); at ``hard_at`` the ones still in flight are abandoned as errors
    (a server that stopped answering ends the row, not the bench)."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    t = Timings()
    queue = list(reversed(bodies))
    busy = [0]

    async def worker() -> None:
        conn = _Conn(u.hostname, u.port)
        try:
            while queue and time.time() < stop_at:
                busy[0] += 1
                try:
                    await _one(conn, u.path, queue.pop(), t, continuous)
                finally:
                    busy[0] -= 1
        finally:
            conn.close()

    try:
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(c))),
                               None if hard_at == math.inf else max(0.0, hard_at - time.time()))
    except asyncio.TimeoutError:
        t.errors += busy[0]
    t.cut = len(queue)
    return t


def _client_proc(args: tuple) -> tuple[float, float, Timings]:
    url, bodies, c, start_at, continuous, row_s = args
    time.sleep(max(0.0, start_at - time.time()))  # every client process starts together
    start, cpu0 = time.time(), time.process_time()
    stop_at, hard_at = (start + row_s, start + 2 * row_s + 60) if row_s else (math.inf, math.inf)
    t = asyncio.run(_client(url, bodies, c, continuous, stop_at, hard_at))
    t.client_cpu_s = time.process_time() - cpu0
    return start, time.time(), t


def run_http(url: str, model: str, requests: list[tuple[list, list[int]]], c: int, max_tokens: int,
             procs: int, ignore_eos: bool = True, row_s: float = 0.0) -> Timings:
    """Stream every request through ``url``/v1/chat/completions with ``c`` in flight, split over
    ``procs`` client processes. ``ignore_eos`` is an extension (vLLM's, Kiln's) that `transformers
    serve` refuses; it takes a ``generation_config`` JSON field instead, where ``eos_token_id: -1``
    means no end-of-sequence id (``ignore_eos=False`` sends that, and reads tokens per text event:
    that server sends its usage only at the end). Tokens are counted from ``usage``
    (``continuous_usage_stats``: in every chunk, so chunks of several tokens count right).
    ``row_s`` > 0: no request starts after that many seconds (the row's rate is over what ran;
    ``cut`` says how many were not sent), and requests still open at 2 x ``row_s`` + 60 s are errors."""
    if ignore_eos:  # Kiln: also the running usage in every chunk
        extra = {"ignore_eos": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    else:
        extra = {"generation_config": json.dumps({"eos_token_id": -1, "do_sample": False}),
                 "stream_options": {"include_usage": True}}
    bodies = [{"model": model, "messages": m, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
               **extra} for m, _ in requests]
    k = max(1, min(procs, c))
    shares = [(c // k) + (1 if i < c % k else 0) for i in range(k)]
    slices = [bodies[i::k] for i in range(k)]
    start_at = time.time() + (5.0 if k > 1 else 0.0)  # time for the spawned processes to import
    jobs = [(url + "/v1/chat/completions", s, sh, start_at, ignore_eos, row_s) for s, sh in zip(slices, shares) if s]
    if len(jobs) == 1:
        results = [_client_proc(jobs[0])]
    else:
        with mp.get_context("spawn").Pool(len(jobs)) as pool:
            results = pool.map(_client_proc, jobs)
    t = Timings(client_cpu_s=0.0)
    for _, _, r in results:
        t.client_cpu_s += r.client_cpu_s or 0.0
        t.tokens += r.tokens
        t.ttft += r.ttft
        t.itl += r.itl
        t.errors += r.errors
        t.events += r.events
        t.cut += r.cut
    t.seconds = max(e for _, e, _ in results) - min(s for s, _, _ in results)
    return t


# -- servers ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, ready once GET /health answers 200. It leads its own process group, so
    ``stop`` also ends whatever it started (an engine process, compile workers): no orphans, also
    when it fails to start or the bench is interrupted while it starts."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, wait_s: float = 600.0) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        deadline = time.monotonic() + wait_s
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{' '.join(cmd[:4])} exited with {self.proc.returncode}: "
                                       f"{self.output()[-2000:]}")
                try:
                    if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{' '.join(cmd[:4])} did not answer /health in {wait_s:.0f} s: "
                                       f"{self.output()[-2000:]}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self, timeout_s: float = 60.0) -> None:
        """SIGTERM to the server (its graceful shutdown), SIGKILL after ``timeout_s``; then SIGKILL to
        anything left in its process group."""
        import signal

        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the group outlives its leader while members live
        except (ProcessLookupError, PermissionError, AttributeError):
            return
        deadline = time.monotonic() + 10
        while group_members(self.proc.pid) and time.monotonic() < deadline:  # SIGKILL lands asynchronously
            time.sleep(0.05)


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of process group ``pgid`` (Linux /proc; [] elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def child_pids(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Linux /proc; [] elsewhere): e.g. ``kiln serve --engine-process``'s engine."""
    out = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for c in (task / "children").read_text().split():
                out += [int(c), *child_pids(int(c))]
    except (OSError, ValueError):
        pass
    return out


def process_cpu_s(pid: int, thread: str | None = None, children: bool = False) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, all threads, or only its threads whose OS
    name is ``thread`` (e.g. the server's 'kiln-engine'); ``children``: its live descendants' too
    (all their threads); Linux /proc, None elsewhere."""
    try:
        if thread is None:
            paths = [Path(f"/proc/{pid}/stat")]
        else:
            paths = [t / "stat" for t in Path(f"/proc/{pid}/task").iterdir()
                     if (t / "comm").read_text().strip() == thread]
        total = 0
        for path in paths:
            fields = path.read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        kids = sum(process_cpu_s(c) or 0.0 for c in child_pids(pid)) if children else 0.0
        return total / os.sysconf("SC_CLK_TCK") + kids
    except (OSError, ValueError, IndexError):
        return None


def _thread_env(args: argparse.Namespace) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}


def kiln_server(args: argparse.Namespace, model_dir: Path, device: Any, engine_process: bool = False) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "kiln.cli.main", "serve", str(model_dir), "--port", str(port),
           "--device", str(device), "--max-pending", str(4 * max(args.concurrency) + 64),
           "--request-timeout", "3600", "--log-level", "warning"]
    cmd.append("--engine-process" if engine_process else "--no-engine-process")  # the default is the process
    if not getattr(args, "fuse_projections", True):
        cmd.append("--no-fuse-projections")
    for k, v in engine_overrides(args).items():
        cmd += ["--engine", f"{k}={v}"]
    return Server(cmd, port, env=_thread_env(args))


TRANSFORMERS_OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                            "HF_HUB_DISABLE_UPDATE_CHECK": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def transformers_serve_cmd(hf_dir: Path, port: int, device: Any, max_requests: int, max_batch_tokens: int) -> list[str]:
    """``transformers serve`` (5.x's typer CLI: the model folder is the positional ``force_model``,
    loaded at start-up and never unloaded) on 127.0.0.1 with continuous batching, run as
    ``python -m transformers.cli.transformers`` so no console script on PATH is needed. Its KV cache
    and batch sizes take its defaults on a GPU (a share of free memory, as Kiln's engine sizes its
    pool); on the CPU those defaults, sized from the RAM, cost 20 s (5.25) to 40 s (5.17) of zeroing
    static tensors, so it gets ``max_requests`` full contexts of 256-token blocks (as the in-process
    ``transformers cb`` row) and Kiln's engine's ``max_batch_tokens`` tokens per step.
    Raises naming the module when one of its serving packages (fastapi, uvicorn, pydantic, openai)
    does not import, before a server is started."""
    import importlib

    missing = []
    for mod in ("fastapi", "uvicorn", "pydantic", "openai", "typer"):  # what its serve command imports
        try:
            importlib.import_module(mod)
        except ImportError as e:  # e.g. openai 3.x without its httpx2 wheel: "No module named 'httpx2'"
            missing.append(f"{mod} ({e})")
    if missing:
        raise RuntimeError(f"transformers serve cannot run here: importing {', '.join(missing)} failed; "
                           "pip install 'transformers[serving]' (with dependencies)")
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(hf_dir), "--continuous-batching",
           "--host", "127.0.0.1", "--port", str(port), "--device", device.type,
           "--dtype", "bfloat16" if device.type == "cuda" else "float32", "--log-level", "warning"]
    if device.type != "cuda":
        context = json.loads((Path(hf_dir) / "config.json").read_text())["max_position_embeddings"]
        cmd += ["--cb-num-blocks", str(max_requests * -(-context // 256) + 2),
                "--cb-max-batch-tokens", str(max_batch_tokens)]
    return cmd


def transformers_server(args: argparse.Namespace, hf_dir: Path, device: Any) -> Server:
    port = _free_port()
    batch = int(engine_overrides(args)["max_num_batched_tokens"])
    cmd = transformers_serve_cmd(hf_dir, port, device, max(args.concurrency), batch)
    return Server(cmd, port, env={**TRANSFORMERS_OFFLINE_ENV, **_thread_env(args)},
                  wait_s=getattr(args, "server_wait_s", 600.0))


# -- the table ----------------------------------------------------------------------------------------------


def _count(args: argparse.Namespace, c: int, total: int) -> int:
    waves = getattr(args, "waves", 8)  # keep c in flight; c=1 stays short
    return min(total, max(getattr(args, "min_requests", 16), waves * c))


def _safe(impl: str, c: int, n: int, fn: Any) -> HttpRow:
    try:
        row = fn().row(impl, c, n)
    except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
        traceback.print_exc()
        row = HttpRow(impl, c, n, error=f"{type(e).__name__}: {str(e)[:300]}")
    print(f"  c={c} {impl}: {row.tok_s or 0:.1f} tok/s {row.error}", flush=True)
    return row


def engine_note(before: dict, after: dict, seconds: float, tokens: int) -> str:
    """What the engine did during a row, from two ``LLMEngine.stats()`` snapshots: steps, lean (graph
    decode) and general (prefill, admission) ones with their mean milliseconds and the prompt tokens a
    general step computed, output tokens a step, and the share of the row's ``seconds`` (the requests'
    own span, not the set-up around them) spent inside ``step`` (the rest: the engine waiting for work,
    or its driver's own time). "" without the counters (an engine that lacks them)."""
    if "steps" not in before or "steps" not in after or not seconds:
        return ""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in
         ("steps", "lean_steps", "mixed_steps", "step_seconds", "general_seconds", "mixed_seconds", "prefill_tokens")}
    if d["steps"] <= 0:
        return ""
    general = d["steps"] - d["lean_steps"] - d["mixed_steps"]
    parts = [f"engine: {d['steps']} steps"]
    if "general_seconds" in after:
        lean_ms = (d["step_seconds"] - d["general_seconds"] - d["mixed_seconds"]) / max(1, d["lean_steps"]) * 1e3
        mixed = (f"{d['mixed_steps']} mixed at {d['mixed_seconds'] / d['mixed_steps'] * 1e3:.1f} ms, "
                 if d["mixed_steps"] > 0 else "")
        parts.append(f"{d['lean_steps']} lean at {lean_ms:.1f} ms, {mixed}{general} general at "
                     f"{d['general_seconds'] / max(1, general) * 1e3:.1f} ms "
                     f"({d['prefill_tokens'] / max(1, general + d['mixed_steps']):.0f} prompt tok each)")
    else:
        parts.append(f"{d['lean_steps'] / d['steps']:.0%} lean")
    parts += [f"{tokens / d['steps']:.1f} tok/step", f"busy {d['step_seconds'] / seconds:.0%}"]
    return ", ".join(parts)


def row_seconds(row: HttpRow) -> float:
    """A row's own wall seconds (its output tokens over its rate): the span of its requests."""
    return row.tokens / row.tok_s if row.tokens and row.tok_s else 0.0


def _health_engine(url: str) -> dict:
    """The engine's counters from the server's /health ({} when it does not answer)."""
    import httpx

    try:
        return dict(httpx.get(url + "/health", timeout=5).json().get("engine", {}))
    except Exception:  # noqa: BLE001 - a note, not a measurement that may fail the row
        return {}


def measure(args: argparse.Namespace, device: Any, work: Path) -> list[HttpRow]:
    """Every row: direct engine at each c, then the Kiln server, then transformers serve; with
    ``--pairs R`` the direct rows run in turn with each Kiln server's rows instead (``server_rows``)."""
    from kiln.serve.server import ModelSpec, load

    kiln_dir, hf_dir, tok = build_model_dirs(args, device, work)
    spec = ModelSpec(str(kiln_dir), device=str(device), engine=engine_overrides(args),
                     fuse_projections=getattr(args, "fuse_projections", True))
    loaded = load(spec)
    reqs = chat_requests(args.prompts, args.requests, tok, loaded.model.config.context_length, args.max_tokens)
    warm = [ids for _, ids in reqs[:4]]
    rows = []
    run_direct(loaded.engine, warm, 4, 4)  # warm-up: kernels, CUDA graphs
    pairs = max(1, getattr(args, "pairs", 1))
    if pairs == 1:  # every direct row first; the engine then leaves the GPU to the servers
        rows += [direct_row(args, loaded.engine, reqs, c) for c in args.concurrency]
        del loaded
        _free(device)
    servers = []
    for mode, impl in engine_modes(args):  # the engine as a thread of the server, or in its own process
        servers.append((impl, lambda ep=mode == "process": kiln_server(args, kiln_dir, device, ep), kiln_dir.name))
    if hf_dir is not None:
        servers.append(("transformers serve", lambda: transformers_server(args, hf_dir, device), str(hf_dir)))
    for impl, start, name in servers:
        before = None if pairs == 1 or not impl.startswith("kiln") else (
            lambda c, engine=loaded.engine: direct_row(args, engine, reqs, c))
        rows += server_rows(args, impl, start, name, reqs, before, pairs)
    paired = [r for r in rows if r.vs_direct is not None]  # ratios already taken pair by pair
    direct = {r.concurrency: r.tok_s for r in rows if r.impl == "kiln direct"}
    tserve = {r.concurrency: r.tok_s for r in rows if r.impl == "transformers serve"}
    for r in rows:
        if r.tok_s and direct.get(r.concurrency) and r not in paired:
            r.vs_direct = r.tok_s / direct[r.concurrency]
        if r.tok_s and tserve.get(r.concurrency) and r.impl.startswith("kiln http"):
            r.vs_tserve = r.tok_s / tserve[r.concurrency]
    return rows


def direct_row(args: argparse.Namespace, engine: Any, reqs: list, c: int) -> HttpRow:
    """The engine driven in this process at concurrency ``c`` (``run_direct``), with this process's CPU
    per token (all of it drives the engine) and the engine's note."""
    n = _count(args, c, len(reqs))
    cpu0, st0 = time.process_time(), engine.stats()
    row = _safe("kiln direct", c, n, lambda: run_direct(engine, [i for _, i in reqs[:n]], c, args.max_tokens))
    if row.tokens:
        row.server_cpu_us = row.engine_thread_cpu_us = (time.process_time() - cpu0) / row.tokens * 1e6
        _add_note(row, engine_note(st0, engine.stats(), row_seconds(row), row.tokens))
    return row


def paired_summary(rows: list[HttpRow], impl: str, c: int) -> HttpRow | None:
    """``--pairs R``: one line for ``impl`` at ``c`` over its R (direct row, HTTP row) pairs: the median
    HTTP tok/s and the median of the pairs' ratios, with their range in the note."""
    http = [r for r in rows if r.impl == impl and r.concurrency == c and r.vs_direct is not None]
    if len(http) < 2:
        return None
    ratios = sorted(r.vs_direct for r in http)
    tok = sorted(r.tok_s for r in http)
    mid = len(http) // 2
    med = (lambda xs: xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2)
    return HttpRow(f"{impl}: median of {len(http)} pairs", c, http[0].requests, med(tok), vs_direct=med(ratios),
                   note=f"vs direct {ratios[0]:.2f}-{ratios[-1]:.2f} over the pairs (each HTTP row over the "
                        "direct row run just before it)")


def server_rows(args: argparse.Namespace, impl: str, start: Any, name: str, reqs: list,
                before: Any = None, pairs: int = 1) -> list[HttpRow]:
    """One server's rows: ``start()`` it, warm it up (max c requests of 4 tokens at once: batch shapes
    and lazily built state, e.g. transformers 5.17's batch processor, before the clock), one row per
    concurrency, stop it. With ``before`` (``--pairs R``): at each concurrency, R times, the direct row
    ``before(c)`` and then the HTTP row, each HTTP row's ``vs_direct`` over its own pair's direct row,
    then a median line (``paired_summary``): the engine's run-to-run spread cancels pair by pair.
    Any failure (start-up, warm-up, a hung server) becomes rows with its error; the server is stopped
    in any case."""
    kiln = impl.startswith("kiln")
    rows: list[HttpRow] = []
    server = None
    try:
        server = start()
        w = min(max(4, max(args.concurrency)), len(reqs))
        warm = run_http(server.url, name, reqs[:w], w, 4, 1, kiln, row_s=getattr(args, "http_row_s", 0.0))
        if warm.errors or not warm.tokens:
            raise RuntimeError(f"warm-up: {warm.errors} of {w} requests failed, {warm.tokens} tokens; server log: "
                               f"{server.output()[-1500:]}")
        for c in args.concurrency:
            for _ in range(pairs if before is not None else 1):
                d = before(c) if before is not None else None
                if d is not None:
                    d.vs_direct = 1.0 if d.tok_s else None  # its own pair's reference
                    rows.append(d)
                rows.append(http_row(args, impl, server, name, reqs, c, kiln))
                if d is not None and d.tok_s and rows[-1].tok_s:
                    rows[-1].vs_direct = rows[-1].tok_s / d.tok_s
            if before is not None and (summary := paired_summary(rows, impl, c)) is not None:
                rows.append(summary)
            if not kiln and rows[-1].tokens:
                ev = rows[-1].events
                rows[-1].note = (f"eos_token_id -1 via its generation_config field; TTFT/ITL per text event "
                                 f"({rows[-1].tokens / ev if ev else 0:.2f} tokens per event)"
                                 + (f"; {rows[-1].note}" if rows[-1].note else ""))
    except Exception as e:  # noqa: BLE001 - a server that fails is reported, not fatal
        traceback.print_exc()
        done = {r.concurrency for r in rows}
        rows += [HttpRow(impl, c, error=f"{type(e).__name__}: {str(e)[:300]}") for c in args.concurrency if c not in done]
        print(f"  {impl} failed: {str(e)[:300]}", flush=True)
    finally:
        if server is not None:
            server.stop()
    return rows


def engine_modes(args: argparse.Namespace) -> list[tuple[str, str]]:
    """``--server-engine``'s comma list as ``(mode, row name)``: 'thread' (the default server),
    'process' (``kiln serve --engine-process``)."""
    modes = [m for m in str(getattr(args, "server_engine", "thread")).split(",") if m]
    bad = [m for m in modes if m not in ("thread", "process")]
    if bad or not modes:
        raise ValueError(f"--server-engine {bad or modes}: give thread, process or thread,process")
    return [(m, "kiln http" if m == "thread" else "kiln http, engine process") for m in modes]


def http_row(args: argparse.Namespace, impl: str, server: Server, name: str, reqs: list, c: int,
             kiln: bool = True) -> HttpRow:
    """One HTTP row at concurrency ``c``, with the server's CPU per output token (all threads of the
    server process and of its children, i.e. an engine process) and its engine's (the 'kiln-engine'
    thread, or with ``--engine-process`` the engine process), and the client processes'."""
    n = _count(args, c, len(reqs))
    pid = server.proc.pid

    def engine_cpu() -> float | None:
        kids = child_pids(pid)
        return sum(process_cpu_s(k) or 0.0 for k in kids) if "engine process" in impl else process_cpu_s(pid, "kiln-engine")

    cpu0, eng0 = process_cpu_s(pid, children=True), engine_cpu()
    st0 = _health_engine(server.url) if kiln else {}
    row_s = getattr(args, "http_row_s", 0.0)
    timings: list[Timings] = []

    def run() -> Timings:
        timings.append(run_http(server.url, name, reqs[:n], c, args.max_tokens, args.client_procs, kiln, row_s))
        return timings[-1]

    row = _safe(impl, c, n, run)
    row.events = timings[-1].events if timings else 0
    cpu, eng = process_cpu_s(pid, children=True), engine_cpu()
    if cpu is not None and cpu0 is not None and row.tokens:
        row.server_cpu_us = (cpu - cpu0) / row.tokens * 1e6
        if kiln and eng is not None and eng0 is not None:
            row.engine_thread_cpu_us = (eng - eng0) / row.tokens * 1e6
    if kiln and row.tokens:
        _add_note(row, engine_note(st0, _health_engine(server.url), row_seconds(row), row.tokens))
    return row


def _add_note(row: HttpRow, note: str) -> None:
    if note:
        row.note = f"{row.note}; {note}" if row.note else note


def measure_stub(args: argparse.Namespace) -> list[HttpRow]:
    """``--stub-engine K``: Kiln's server over ``serve_stub.StubEngine`` (K tokens per request per
    step, ``--stub-step-ms`` per step, GIL released); ``vs direct`` is over the stub's own rate
    (c x K tokens a step), so it says how much of the engine's pace the HTTP path keeps."""
    tok = chat_tokenizer(args.tokenizer or None)
    paced = bool(args.stub_pace)
    reqs = chat_requests(args.prompts, args.requests, tok, 1024 if paced else 4096, args.max_tokens)
    seqs = max(args.concurrency)
    rows = []
    direct: dict[int, float] = {}
    if paced:  # the same paced engine driven in-process: the direct rows
        from kiln.bench.serve_paced import paced_engine, parse_pace

        eng = paced_engine(parse_pace(args.stub_pace), seqs, args.stub_engine, tok)
        run_direct(eng, [i for _, i in reqs[:4]], 4, 4)
        for c in args.concurrency:
            n = _count(args, c, len(reqs))
            st0 = eng.stats()
            rows.append(_safe(f"kiln direct, paced {args.stub_pace}", c, n,
                              lambda: run_direct(eng, [i for _, i in reqs[:n]], c, args.max_tokens)))
            _add_note(rows[-1], engine_note(st0, eng.stats(), row_seconds(rows[-1]), rows[-1].tokens))
            direct[c] = rows[-1].tok_s or 0.0
    for mode, name in engine_modes(args):
        port = _free_port()
        cmd = [sys.executable, "-m", "kiln.bench.serve_stub", "--port", str(port), "--step-ms", str(args.stub_step_ms),
               "--tokens-per-step", str(args.stub_engine), "--max-num-seqs", str(seqs), "--max-pending",
               str(4 * seqs + 64), "--host-us", str(args.stub_host_us)] + (["--pace", args.stub_pace] if paced else []) \
            + (["--tokenizer", args.tokenizer] if args.tokenizer else [])
        server = Server(cmd + (["--engine-process"] if mode == "process" else []), port)
        impl = f"{name}, " + (f"paced {args.stub_pace}" if paced else f"stub {args.stub_engine} tok/step")
        try:
            run_http(server.url, "stub", reqs[:4], 4, 4, 1)  # warm-up
            for c in args.concurrency:
                row = http_row(args, impl, server, "stub", reqs, c)
                if paced:
                    row.vs_direct = row.tok_s / direct[c] if row.tok_s and direct.get(c) else None
                else:  # tokens/s with a free server: the sleep plus the GIL-holding host work, per step
                    step_s = args.stub_step_ms / 1e3 + args.stub_host_us * min(c, seqs) / 1e6
                    pace_tok_s = c * args.stub_engine / step_s
                    row.vs_direct = row.tok_s / pace_tok_s if row.tok_s else None
                    row.note = (f"stub pace {pace_tok_s:,.0f} tok/s" + (f"; {row.note}" if row.note else ""))
                rows.append(row)
        finally:
            server.stop()
    return rows


def _free(device: Any) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _f(x: float | None, fmt: str = ".1f") -> str:
    return "" if x is None else format(x, fmt)


def format_table(rows: list[HttpRow]) -> str:
    tserve = any(r.impl == "transformers serve" for r in rows)
    out = ["| impl | concurrency | requests | output tok/s | vs direct | " + "vs transformers serve | " * tserve
           + "TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
           "ITL p99 ms | server CPU us/token | engine thread us/token | client CPU us/token | note |",
           "|---|---|---|---|---|" + "---|" * tserve + "---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.concurrency, r.impl != "kiln direct", r.impl)):
        note = r.note + (f" ERROR {r.error}" if r.error else "")
        out.append(f"| {r.impl} | {r.concurrency} | {r.requests} | {_f(r.tok_s)} | {_f(r.vs_direct, '.2f')} | "
                   + (f"{_f(r.vs_tserve, '.2f')} | " if tserve else "") +
                   f"{_f(r.ttft_p50_ms)} | {_f(r.ttft_p99_ms)} | {_f(r.itl_p50_ms, '.2f')} | "
                   f"{_f(r.itl_p99_ms, '.2f')} | {_f(r.server_cpu_us, '.0f')} | {_f(r.engine_thread_cpu_us, '.0f')} | "
                   f"{_f(r.client_cpu_us, '.0f')} | {note} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report
    from kiln.serve.server import parse_overrides

    device = pick_device(args.device)
    if args.threads:  # the same intra-op thread count in-process and in the servers (OMP_NUM_THREADS)
        import torch

        torch.set_num_threads(args.threads)
    args.concurrency = [int(c) for c in str(args.concurrency).split(",") if c]
    if not args.concurrency or min(args.concurrency) < 1:
        raise ValueError(f"--concurrency {args.concurrency}: give positive integers, e.g. 1,16,64,256")
    if args.waves < 1:
        raise ValueError(f"--waves {args.waves}: give a positive integer (requests per slot of concurrency)")
    if args.pairs < 1:
        raise ValueError(f"--pairs {args.pairs}: give a positive integer (1: direct rows first, then the servers)")
    if args.pairs > 1 and args.stub_engine:
        raise ValueError("--pairs pairs the real engine's direct and HTTP rows; drop it with --stub-engine")
    args.engine = parse_overrides(args.engine)
    args.shape = args.shape or ("gpt2_small" if device.type == "cuda" else "preset_tiny")
    if args.stub_pace and not args.stub_engine:
        raise ValueError("--stub-pace paces the real engine behind --stub-engine K (K decode steps per graph); "
                         "add --stub-engine 8, say")
    if args.stub_engine:
        rows = measure_stub(args)
    else:
        with tempfile.TemporaryDirectory(prefix="kiln_bench_serve_http_") as tmp:
            rows = measure(args, device, Path(tmp))
    blurb = (f"Chat requests (AlpacaEval instructions through the chat template, cut to fit), {args.max_tokens} "
             f"greedy output tokens each, kept c in flight (min({args.requests}, max(16, {getattr(args, 'waves', 8)}c)) requests per c); "
             f"shape {args.shape}, random weights, tokenizer {args.tokenizer or 'byte-level'} + chat tokens; "
             f"{args.client_procs} client processes for the HTTP rows; torch threads {args.threads or 'default'}. "
             "'vs direct': output tok/s over the direct engine's at the same c. 'server CPU us/token': CPU time "
             "(all threads) of the server process per output token; for 'kiln direct', of the bench process "
             "driving the engine: the difference is what HTTP costs per token.")
    report("serve-http", device, blurb, format_table(rows), rows, args.out)
    return 0 if not any(r.error for r in rows if r.impl.startswith("kiln")) else 1


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    p = bench_subparsers.add_parser(
        "serve-http", help="kiln serve over HTTP vs the engine directly vs transformers serve (tok/s, TTFT, ITL)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="", help="model shape (kiln bench serve's shapes; default gpt2_small on "
                   "CUDA, preset_tiny on the CPU)")
    p.add_argument("--tokenizer", default="", help="tokenizer.json, or a folder with GPT-2's vocab.json + "
                   "merges.txt (chat tokens are added); default byte-level")
    p.add_argument("--prompts", default=DEFAULT_PROMPTS, help="AlpacaEval jsonl (its 'instruction' field)")
    p.add_argument("--requests", type=int, default=1000, help="most requests per concurrency")
    p.add_argument("--waves", type=int, default=8, help="requests per slot of concurrency: c runs "
                   "min(--requests, max(16, waves x c)); longer rows average out more noise")
    p.add_argument("--concurrency", default="1,16,64,256", help="comma list of requests kept in flight")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--pairs", type=int, default=1, help="R > 1: the direct engine stays loaded beside each "
                   "Kiln server, and at each c a direct row and an HTTP row run R times in turn; each HTTP "
                   "row is compared with its own pair's direct row, and a median line follows")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                   help="EngineConfig override for both Kiln rows (repeatable)")
    p.add_argument("--client-procs", type=int, default=4, help="HTTP client processes")
    p.add_argument("--transformers", action="store_true", help="add transformers serve (continuous batching)")
    p.add_argument("--http-row-s", type=float, default=0.0, help="an HTTP row sends no request after this many "
                   "seconds (its rate is over the requests that ran; the note says how many); 0: no limit")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for every row (0: torch's "
                   "default). On a busy CPU, 1: a spinning second thread can slow small matmuls 10-30x")
    p.add_argument("--server-engine", default="thread,process", help="the Kiln server's engine: 'thread' (in the "
                   "server process), 'process' (kiln serve --engine-process) or both, one row set each")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="the Kiln rows with q/k/v and gate/up fused (kiln serve's default); "
                   "--no-fuse-projections: separate, for an A/B")
    p.add_argument("--stub-engine", type=int, default=0, metavar="K", help="instead of a model: Kiln's server over "
                   "a stub engine giving each running request K tokens a step (what the server costs per token)")
    p.add_argument("--stub-step-ms", type=float, default=20.0, help="--stub-engine: milliseconds per step (GIL released)")
    p.add_argument("--stub-host-us", type=float, default=0.0, help="--stub-engine: Python work per running request "
                   "per step, holding the GIL (a real engine's host side; what the event loop competes with)")
    p.add_argument("--stub-pace", default="", metavar="A,B,P", help="with --stub-engine K: Kiln's real engine "
                   "(K decode steps per graph, emulated) with its model's work replaced by sleeps of A ms per step "
                   "+ B ms per decode row + P ms per prompt token, direct and behind the server")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default=None, help="directory for bench_serve-http.md and .json")
    p.set_defaults(func=run)
