"""The engine in its own process (the layout of vLLM V1's engine core), behind ``kiln serve
--engine-process``.

In one process the engine thread and the event loop share one GIL: every eager torch op, every
``.tolist()`` waiting on the GPU, hands the GIL to the event loop and waits to get it back, so the
engine thread costs 30-55% more CPU per token inside the server than driven directly (measured on
the CPU, docs/benchmarks.md). Here the engine steps in a child process with its own interpreter,
as fast as it would alone, and the server only unpickles one message per engine step.

``EngineClient`` has ``LLMEngine``'s interface (``add_request``, ``abort``, ``step``,
``has_unfinished``, ``stats``), so ``EngineWorker`` drives it unchanged: its thread sends commands
down a pipe and ``step()`` returns whatever outputs the child has sent since the last call (several
engine steps' worth when the server fell behind; the stream merges them into one chunk).

    server process                                   engine process (engine_main)
    EngineWorker thread -- ("add", rid, ids, params) -->  engine.add_request
                        -- ("abort", rid) ------------->  engine.abort
                        <-- ("out", [slim outputs], stats) -- engine.step(), every step
                        <-- ("refused", (rid, why), stats) -- a request the engine refused

Outputs cross the pipe slim: a ``RequestOutput`` with its new tokens, new text and log-probs, but
empty ``prompt_token_ids``, ``token_ids`` and ``text`` (the server uses only the new parts and the
counts), so a step's message does not grow with the sequences' length. Prompt log-probs (asked for
with ``SamplingParams.prompt_logprobs``; the engine puts the same list on each output once the
prompt is computed) cross once, with the request's first output; the client puts them on each of
its later outputs, as the engine does.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import wait
from typing import Any

log = logging.getLogger(__name__)


def _slim(out: Any) -> tuple:
    # A request's first output is the one whose generated tokens are all new (the engine's first
    # output comes once its prompt is computed): only it carries the prompt log-probs.
    first = len(out.new_token_ids) == out.num_generated_tokens
    return (out.request_id, out.new_token_ids, out.new_text, out.logprobs, out.finished, out.finish_reason,
            out.num_prompt_tokens, out.num_generated_tokens, out.prompt_logprobs if first else None,
            out.metrics)  # a finished output's phase times (a frozen dataclass of four floats), else None


def engine_main(spec: Any, load: Callable[[Any], Any], conn: Any) -> None:
    """The child: ``load(spec)`` (``kiln.serve.server.load`` of a ``ModelSpec``: a ``Loaded``), say
    ready, then step while any request is unfinished and read commands between steps; exits on
    'stop' or when the server's end closes."""
    from kiln.serve.worker import _name_os_thread

    _name_os_thread("kiln-engine-core")
    try:
        loaded = load(spec)
    except Exception as e:  # the server reports it and exits
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}", None))
        return
    engine = loaded.engine
    gc.collect()  # the model and torch live as long as the process: keep them out of the collector's scans
    gc.freeze()
    conn.send(("ready", {"context_length": loaded.context_length, "vocab_size": loaded.vocab_size,
                         "device": str(loaded.device), "name": loaded.name}, engine.stats()))
    try:
        while True:
            if conn.poll(0 if engine.has_unfinished() else None):
                if _commands(engine, conn):
                    return
                if not engine.has_unfinished():  # idle after aborts: send the freed counts anyway
                    conn.send(("out", [], engine.stats()))
            if engine.has_unfinished():
                _step(engine, conn)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the server is gone: nothing to answer
        return


def _commands(engine: Any, conn: Any) -> bool:
    """Apply every queued command; True on 'stop'."""
    while True:
        cmd = conn.recv()
        if cmd[0] == "add":
            _, rid, ids, params = cmd
            try:
                engine.add_request(ids, params, request_id=rid)
            except Exception as e:  # a request the engine refuses ends alone
                conn.send(("refused", (rid, f"{type(e).__name__}: {e}"), engine.stats()))
        elif cmd[0] == "abort":
            engine.abort(cmd[1])
        elif cmd[0] == "stop":
            return True
        if not conn.poll(0):
            return False


def _step(engine: Any, conn: Any) -> None:
    try:
        outs = engine.step()
    except Exception as e:  # fail what is in flight, keep serving the next requests
        log.exception("engine step failed")
        for rid in list(getattr(engine, "_seqs", {})):
            engine.abort(rid)
        conn.send(("failed", f"{type(e).__name__}: {e}", engine.stats()))
        return
    conn.send(("out", [_slim(o) for o in outs], engine.stats()))


class EngineClient:
    """``LLMEngine``'s interface over a pipe to ``engine_main`` in a spawned process (see the module
    docstring). Used from one thread (``EngineWorker``'s)."""

    def __init__(self, spec: Any, load: Callable[[Any], Any], start_timeout_s: float = 900.0) -> None:
        """Start the engine process: it runs ``load(spec)`` (a module-level function, e.g.
        ``kiln.serve.server.load``); waits until it is ready or raises RuntimeError with its error."""
        ctx = mp.get_context("spawn")  # a fresh interpreter: no CUDA state or locks inherited
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=engine_main, args=(spec, load, child), name="kiln-engine-core", daemon=True)
        self.proc.start()
        child.close()
        deadline = time.monotonic() + start_timeout_s
        while not self._conn.poll(0.5):
            if not self.proc.is_alive() or time.monotonic() > deadline:
                self.shutdown()
                raise RuntimeError(f"the engine process {'exited' if not self.proc.is_alive() else 'did not start'} "
                                   f"(exit code {self.proc.exitcode}) before loading {spec.model_dir}")
        kind, info, stats = self._conn.recv()
        if kind != "ready":
            self.shutdown()
            raise RuntimeError(f"the engine process could not load {spec.model_dir}: {info}")
        self.info: dict = info
        self._stats: dict = stats
        # submit/abort write a byte here (wake), so a step() waiting on the pipe returns at once and
        # the worker forwards the command before the engine's next step, not after it.
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._live: set[str] = set()  # added, not yet finished, aborted or refused
        self._prompt_logprobs: dict[str, list] = {}  # live requests' prompt log-probs, once they came
        self._ready: list[Any] = []  # outputs read from the pipe, not yet returned by step()
        self._refused: list[tuple[str, str]] = []

    def add_request(self, prompt_ids: list[int], params: Any, request_id: str) -> str:
        self._conn.send(("add", request_id, list(prompt_ids), params))
        self._live.add(request_id)
        return request_id

    def abort(self, request_id: str) -> None:
        if request_id in self._live:
            self._live.discard(request_id)
            self._prompt_logprobs.pop(request_id, None)
            self._conn.send(("abort", request_id))

    def wake(self) -> None:
        """End a ``step()`` that is waiting (any thread): a command is queued for the engine."""
        if self._wake_w is None:
            return
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: a wake-up is pending anyway; closed: shutting down
            pass

    def has_unfinished(self) -> bool:
        return bool(self._live or self._ready or self._refused)

    def stats(self) -> dict:
        """The engine's counters as of its last message (read now, without waiting; a dead process
        is reported by the next ``step``)."""
        try:
            self._read(0.0)
        except RuntimeError:
            pass
        return self._stats

    def pop_refused(self) -> list[tuple[str, str]]:
        """``(request_id, reason)`` of the requests the engine refused since the last call."""
        out, self._refused = self._refused, []
        return out

    def step(self, wait_s: float = 0.05) -> list[Any]:
        """Every output the engine process sent since the last call, waiting up to ``wait_s`` for one
        (the pipe wait releases the GIL). Raises RuntimeError when a step failed or the process died."""
        self._read(wait_s)
        outs, self._ready = self._ready, []
        return outs

    def _read(self, wait_s: float) -> None:
        """Move every message waiting in the pipe into ``_ready`` / ``_refused`` / ``_stats``."""
        from kiln.generate import RequestOutput

        if wait_s:
            ready = wait([self._conn, self._wake_r], timeout=wait_s)
        else:
            ready = [self._conn] if self._conn.poll(0) else []
        if self._wake_r in ready:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        if self._conn not in ready:
            if not self.proc.is_alive():
                self._live.clear()
                self._prompt_logprobs.clear()
                raise RuntimeError(f"the engine process died (exit code {self.proc.exitcode})")
            return
        while True:
            try:
                kind, payload, self._stats = self._conn.recv()
            except EOFError:
                self._live.clear()
                self._prompt_logprobs.clear()
                raise RuntimeError(f"the engine process died (exit code {self.proc.exitcode})") from None
            if kind == "out":
                for rid, new, text, lps, done, reason, n_prompt, n_gen, plps, metrics in payload:
                    if rid in self._live:
                        if plps is not None:
                            self._prompt_logprobs[rid] = plps
                        plps = self._prompt_logprobs.pop(rid, None) if done else self._prompt_logprobs.get(rid)
                        self._ready.append(RequestOutput(rid, [], [], new, "", text, lps, done, reason, n_prompt, n_gen,
                                                         plps, metrics))
                        if done:
                            self._live.discard(rid)
            elif kind == "refused":
                self._live.discard(payload[0])
                self._refused.append(payload)
            elif kind == "failed":
                self._live.clear()
                self._prompt_logprobs.clear()
                raise RuntimeError(payload)
            if not self._conn.poll(0):
                return

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine process (politely, then by force)."""
        try:
            self._conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.proc.join(timeout_s)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        for fd in (getattr(self, "_wake_r", None), getattr(self, "_wake_w", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._wake_r = self._wake_w = None
