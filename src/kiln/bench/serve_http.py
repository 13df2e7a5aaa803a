"""`kiln bench serve-http`: chat requests through Kiln's HTTP server vs the same engine called
directly, and vs `transformers serve`, on the same weights, same run.

Requests are AlpacaEval instructions (``--prompts``: real text, rendered with the chat template,
each cut to fit the context with room for ``--max-tokens``), ``--max-tokens`` greedy tokens each
(``ignore_eos``: random weights would stop at random places). For each concurrency c, the first
min(``--requests``, max(16, 8c)) requests run closed-loop with c in flight:

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
import shutil
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


@dataclass
class Timings:
    """What a run measured: output tokens, wall seconds, per-request TTFTs and per-token gaps (s)."""

    tokens: int = 0
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    errors: int = 0
    client_cpu_s: float | None = None  # CPU seconds of the HTTP client processes (None: no client)

    def row(self, impl: str, c: int, n: int) -> HttpRow:
        client = self.client_cpu_s / self.tokens * 1e6 if self.client_cpu_s is not None and self.tokens else None
        return HttpRow(impl, c, n, self.tokens / self.seconds if self.seconds else None,
                       pct(self.ttft, 0.5), pct(self.ttft, 0.99), pct(self.itl, 0.5), pct(self.itl, 0.99),
                       note=f"{self.errors} failed requests" if self.errors else "", tokens=self.tokens,
                       client_cpu_us=client)


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

    from kiln.align.chat import save_hf_tokenizer
    from kiln.bench.serve_models import export_for_references, serve_shapes
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
    kiln_dir = save_pretrained(model, work / "kiln-bench-model")
    tok.save(kiln_dir / "tokenizer.json")
    hf_dir = None
    if args.transformers:
        hf_dir = export_for_references(model, work / "hf-bench-model")
        save_hf_tokenizer(tok, hf_dir)
        cfg = json.loads((hf_dir / "config.json").read_text())
        cfg.update(eos_token_id=tok.special_tokens["<|end|>"], pad_token_id=tok.eot_id)
        (hf_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    del model
    return kiln_dir, hf_dir, tok


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


async def _one(conn: _Conn, path: str, body: dict, t: Timings) -> None:
    """One streamed request. Tokens come from ``usage``: with ``continuous_usage_stats`` (vLLM's and
    Kiln's extension) every chunk carries the running ``completion_tokens``, so a chunk of several
    tokens (Kiln sends one per request per engine step) counts them all and its gap is spread over
    them (ITL per token, as the direct rows measure it: one entry per chunk); a server that sends
    usage only at the end (or none) counts one token per text chunk for the gaps."""
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
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                choices = chunk.get("choices") or []
                if not choices or "role" in (choices[0].get("delta") or {}) and not choices[0]["delta"].get("content"):
                    continue  # the role-only first event and the usage event carry no token
                now = time.perf_counter()
                k = max(1, usage_tokens - seen) if usage and usage_tokens is not None else 1
                seen += k
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


async def _client(url: str, bodies: list[dict], c: int) -> Timings:
    """``c`` workers, each over its own keep-alive connection, until ``bodies`` are all answered."""
    from urllib.parse import urlsplit

    u = urlsplit(url)
    t = Timings()
    queue = list(reversed(bodies))

    async def worker() -> None:
        conn = _Conn(u.hostname, u.port)
        try:
            while queue:
                await _one(conn, u.path, queue.pop(), t)
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(c)))
    return t


def _client_proc(args: tuple) -> tuple[float, float, Timings]:
    url, bodies, c, start_at = args
    time.sleep(max(0.0, start_at - time.time()))  # every client process starts together
    start, cpu0 = time.time(), time.process_time()
    t = asyncio.run(_client(url, bodies, c))
    t.client_cpu_s = time.process_time() - cpu0
    return start, time.time(), t


def run_http(url: str, model: str, requests: list[tuple[list, list[int]]], c: int, max_tokens: int,
             procs: int, ignore_eos: bool = True) -> Timings:
    """Stream every request through ``url``/v1/chat/completions with ``c`` in flight, split over
    ``procs`` client processes. ``ignore_eos`` is an extension (vLLM's, Kiln's) that `transformers
    serve` refuses; it takes a ``generation_config`` JSON field instead, where ``eos_token_id: -1``
    means no end-of-sequence id (``ignore_eos=False`` sends that). Tokens are counted from ``usage``
    (``continuous_usage_stats``: in every chunk, so chunks of several tokens count right)."""
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
    jobs = [(url + "/v1/chat/completions", s, sh, start_at) for s, sh in zip(slices, shares) if s]
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
    t.seconds = max(e for _, e, _ in results) - min(s for s, _, _ in results)
    return t


# -- servers ------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess, ready once GET /health answers 200."""

    def __init__(self, cmd: list[str], port: int, env: dict | None = None, wait_s: float = 600.0) -> None:
        import httpx

        self.url = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        deadline = time.monotonic() + wait_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {self.proc.returncode}: {self.output()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{cmd[0]} did not answer /health in {wait_s:.0f} s: {self.output()[-2000:]}")
            time.sleep(0.5)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
    if engine_process:
        cmd.append("--engine-process")
    for k, v in engine_overrides(args).items():
        cmd += ["--engine", f"{k}={v}"]
    return Server(cmd, port, env=_thread_env(args))


def transformers_server(args: argparse.Namespace, hf_dir: Path, device: Any) -> Server:
    exe = shutil.which("transformers") or str(Path(sys.executable).with_name("transformers"))
    port = _free_port()
    cmd = [exe, "serve", str(hf_dir), "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
           "--device", str(device), "--dtype", "bfloat16" if device.type == "cuda" else "float32",
           "--log-level", "warning"]
    return Server(cmd, port, env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                                  **_thread_env(args)})


# -- the table ----------------------------------------------------------------------------------------------


def _count(args: argparse.Namespace, c: int, total: int) -> int:
    return min(total, max(getattr(args, "min_requests", 16), 8 * c))  # keep c in flight; c=1 stays short


def _safe(impl: str, c: int, n: int, fn: Any) -> HttpRow:
    try:
        row = fn().row(impl, c, n)
    except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
        traceback.print_exc()
        row = HttpRow(impl, c, n, error=f"{type(e).__name__}: {str(e)[:300]}")
    print(f"  c={c} {impl}: {row.tok_s or 0:.1f} tok/s {row.error}", flush=True)
    return row


def measure(args: argparse.Namespace, device: Any, work: Path) -> list[HttpRow]:
    """Every row: direct engine at each c, then the Kiln server, then transformers serve."""
    from kiln.serve.server import ModelSpec, load

    kiln_dir, hf_dir, tok = build_model_dirs(args, device, work)
    spec = ModelSpec(str(kiln_dir), device=str(device), engine=engine_overrides(args))
    loaded = load(spec)
    reqs = chat_requests(args.prompts, args.requests, tok, loaded.model.config.context_length, args.max_tokens)
    warm = [ids for _, ids in reqs[:4]]
    rows = []
    run_direct(loaded.engine, warm, 4, 4)  # warm-up: kernels, CUDA graphs
    for c in args.concurrency:
        n = _count(args, c, len(reqs))
        cpu0 = time.process_time()
        rows.append(_safe("kiln direct", c, n, lambda: run_direct(loaded.engine, [i for _, i in reqs[:n]], c,
                                                                    args.max_tokens)))
        if rows[-1].tokens:  # this process's CPU per token: all of it is driving the engine
            rows[-1].server_cpu_us = (time.process_time() - cpu0) / rows[-1].tokens * 1e6
            rows[-1].engine_thread_cpu_us = rows[-1].server_cpu_us
    del loaded
    _free(device)
    servers = []
    for mode, impl in engine_modes(args):  # the engine as a thread of the server, or in its own process
        servers.append((impl, lambda ep=mode == "process": kiln_server(args, kiln_dir, device, ep), kiln_dir.name))
    if hf_dir is not None:
        servers.append(("transformers serve", lambda: transformers_server(args, hf_dir, device), str(hf_dir)))
    for impl, start, name in servers:
        try:
            server = start()
        except Exception as e:  # noqa: BLE001
            rows += [HttpRow(impl, c, error=f"{type(e).__name__}: {str(e)[:300]}") for c in args.concurrency]
            print(f"  {impl} did not start: {e}", flush=True)
            continue
        try:
            kiln = impl.startswith("kiln")
            run_http(server.url, name, reqs[:4], 4, 4, 1, kiln)  # warm-up
            for c in args.concurrency:
                rows.append(http_row(args, impl, server, name, reqs, c, kiln))
                if not kiln:
                    rows[-1].note = ("eos_token_id -1 via its generation_config field; TTFT/ITL per text event"
                                     + (f"; {rows[-1].note}" if rows[-1].note else ""))
        finally:
            server.stop()
    direct = {r.concurrency: r.tok_s for r in rows if r.impl == "kiln direct"}
    for r in rows:
        if r.tok_s and direct.get(r.concurrency):
            r.vs_direct = r.tok_s / direct[r.concurrency]
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
    row = _safe(impl, c, n, lambda: run_http(server.url, name, reqs[:n], c, args.max_tokens, args.client_procs, kiln))
    cpu, eng = process_cpu_s(pid, children=True), engine_cpu()
    if cpu is not None and cpu0 is not None and row.tokens:
        row.server_cpu_us = (cpu - cpu0) / row.tokens * 1e6
        if kiln and eng is not None and eng0 is not None:
            row.engine_thread_cpu_us = (eng - eng0) / row.tokens * 1e6
    return row


def measure_stub(args: argparse.Namespace) -> list[HttpRow]:
    """``--stub-engine K``: Kiln's server over ``serve_stub.StubEngine`` (K tokens per request per
    step, ``--stub-step-ms`` per step, GIL released); ``vs direct`` is over the stub's own rate
    (c x K tokens a step), so it says how much of the engine's pace the HTTP path keeps."""
    tok = chat_tokenizer(None)
    reqs = chat_requests(args.prompts, args.requests, tok, 4096, args.max_tokens)
    seqs = max(args.concurrency)
    rows = []
    for mode, name in engine_modes(args):
        port = _free_port()
        cmd = [sys.executable, "-m", "kiln.bench.serve_stub", "--port", str(port), "--step-ms", str(args.stub_step_ms),
               "--tokens-per-step", str(args.stub_engine), "--max-num-seqs", str(seqs), "--max-pending",
               str(4 * seqs + 64), "--host-us", str(args.stub_host_us)]
        server = Server(cmd + (["--engine-process"] if mode == "process" else []), port)
        impl = f"{name}, stub {args.stub_engine} tok/step"
        try:
            run_http(server.url, "stub", reqs[:4], 4, 4, 1)  # warm-up
            for c in args.concurrency:
                row = http_row(args, impl, server, "stub", reqs, c)
                # tokens/s with a free server: the sleep plus the GIL-holding host work, per step
                step_s = args.stub_step_ms / 1e3 + args.stub_host_us * min(c, seqs) / 1e6
                pace = c * args.stub_engine / step_s
                row.vs_direct = row.tok_s / pace if row.tok_s else None
                row.note = (f"stub pace {pace:,.0f} tok/s" + (f"; {row.note}" if row.note else ""))
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
    out = ["| impl | concurrency | requests | output tok/s | vs direct | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
           "ITL p99 ms | server CPU us/token | engine thread us/token | client CPU us/token | note |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.concurrency, r.impl != "kiln direct", r.impl)):
        note = r.note + (f" ERROR {r.error}" if r.error else "")
        out.append(f"| {r.impl} | {r.concurrency} | {r.requests} | {_f(r.tok_s)} | {_f(r.vs_direct, '.2f')} | "
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
    args.engine = parse_overrides(args.engine)
    args.shape = args.shape or ("gpt2_small" if device.type == "cuda" else "preset_tiny")
    if args.stub_engine:
        rows = measure_stub(args)
    else:
        with tempfile.TemporaryDirectory(prefix="kiln_bench_serve_http_") as tmp:
            rows = measure(args, device, Path(tmp))
    blurb = (f"Chat requests (AlpacaEval instructions through the chat template, cut to fit), {args.max_tokens} "
             f"greedy output tokens each, kept c in flight (min({args.requests}, max(16, 8c)) requests per c); "
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
    p.add_argument("--concurrency", default="1,16,64,256", help="comma list of requests kept in flight")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                   help="EngineConfig override for both Kiln rows (repeatable)")
    p.add_argument("--client-procs", type=int, default=4, help="HTTP client processes")
    p.add_argument("--transformers", action="store_true", help="add transformers serve (continuous batching)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads for every row (0: torch's "
                   "default). On a busy CPU, 1: a spinning second thread can slow small matmuls 10-30x")
    p.add_argument("--server-engine", default="thread,process", help="the Kiln server's engine: 'thread' (in the "
                   "server process), 'process' (kiln serve --engine-process) or both, one row set each")
    p.add_argument("--stub-engine", type=int, default=0, metavar="K", help="instead of a model: Kiln's server over "
                   "a stub engine giving each running request K tokens a step (what the server costs per token)")
    p.add_argument("--stub-step-ms", type=float, default=20.0, help="--stub-engine: milliseconds per step (GIL released)")
    p.add_argument("--stub-host-us", type=float, default=0.0, help="--stub-engine: Python work per running request "
                   "per step, holding the GIL (a real engine's host side; what the event loop competes with)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default=None, help="directory for bench_serve-http.md and .json")
    p.set_defaults(func=run)
