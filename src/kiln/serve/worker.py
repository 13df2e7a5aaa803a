"""The engine thread: one background thread owns the (single-threaded) engine; requests talk to it
through queues.

The event loop calls ``submit`` (never the engine): it puts a command in a thread-safe inbox and
gets back a ``Batch`` whose ``Mailbox`` the thread fills with ``loop.call_soon_threadsafe``.
The thread drains the inbox between engine steps (adds, aborts), runs ``engine.step()`` while any
request is unfinished, routes each ``RequestOutput`` to its batch, and aborts requests past their
deadline. Nothing but this thread touches the engine, so the engine needs no locks; ``stats()``
returns a snapshot the thread refreshes after every step. The thread also records, for ``GET
/metrics`` (``requests``: ``kiln.serve.metrics.RequestStats``), each sequence's first token and end
(times from the request's arrival, token counts, finish reason): it sees every output, streaming or
not, with the engine in a thread or in its own process.

    event loop (uvicorn)              engine thread
    ---------------------             ----------------------------------------------
    submit(prompts) ---inbox--->      engine.add_request(...)
    abort(batch)    ---inbox--->      engine.abort(rid): its blocks are freed at once
    await batch.get() <--call_soon_threadsafe-- RequestOutput of each engine.step()

What crosses is one item per sequence per engine step, never one per token: a multi-step decode
(``EngineConfig.decode_steps``) already puts several tokens in one ``RequestOutput``, and a
non-streaming batch (``submit(..., stream=False)``) gets only its final output, every step's tokens,
text and log-probs merged into it in the engine thread (``merge_outputs``): the event loop wakes once
per such request, not once per step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from kiln.serve.metrics import RequestStats

log = logging.getLogger(__name__)


class QueueFull(Exception):
    """The server already holds ``max_pending`` sequences; the client should retry later (429)."""


class ShuttingDown(Exception):
    """The server is draining for shutdown and admits no new requests (503)."""


@dataclass(frozen=True)
class End:
    """A sequence ended without a final engine output: ``reason`` is 'timeout', 'abort',
    'shutdown', 'invalid' (the engine refused the request with a ValueError: a bad request, 400) or
    'error' (then ``message`` says what failed)."""

    reason: str
    message: str = ""


class Mailbox:
    """The items of one ``Batch``, for one consumer on one event loop (what ``asyncio.Queue`` does,
    less its per-item cost: a put wakes the consumer only if it is waiting, and ``take_all`` hands
    over everything queued in one go, so a consumer that fell behind catches up in one wake-up)."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: deque = deque()
        self._waiter: asyncio.Future | None = None

    def put_nowait(self, item: Any) -> None:
        """Append ``item`` (call on the consumer's event loop)."""
        self._items.append(item)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    def get_nowait(self) -> Any:
        if not self._items:
            raise asyncio.QueueEmpty
        return self._items.popleft()

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    async def _wait(self) -> None:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    async def get(self) -> Any:
        """The oldest item, waiting for one."""
        await self._wait()
        return self._items.popleft()

    async def take_all(self) -> list:
        """Every queued item (at least one, waiting for it), oldest first."""
        await self._wait()
        items = list(self._items)
        self._items.clear()
        return items


@dataclass
class Batch:
    """The sequences of one HTTP request (``n`` choices, or several prompts); one mailbox of
    ``(index, RequestOutput | End)`` items filled by the engine thread, in step order."""

    request_ids: list[str]
    queue: Mailbox
    loop: asyncio.AbstractEventLoop
    deadline: float
    open: set[int] = field(default_factory=set)
    arrival: float = field(default_factory=time.monotonic)
    """When the request arrived (``time.monotonic()``): where its latencies in /metrics start."""

    async def get(self) -> tuple[int, Any]:
        """The next item; callers stop once every index has finished or ended."""
        return await self.queue.get()

    async def take_all(self) -> list[tuple[int, Any]]:
        """Every item queued so far (at least one)."""
        return await self.queue.take_all()


@dataclass
class _Seq:
    batch: Batch
    index: int
    stream: bool = True
    held: list = field(default_factory=list)  # non-streaming: earlier outputs' new parts (engine thread only)
    first: float | None = None  # when its first token reached this thread (time.monotonic())


def merge_outputs(outs: list[Any]) -> Any:
    """One ``RequestOutput`` covering consecutive outputs of one request: the last one's state with
    every one's new tokens, new text and log-probs in order (what a consumer that read them all has
    seen). One pass: linear in the tokens."""
    last = outs[-1]
    if len(outs) == 1:
        return last
    lps = None
    if last.logprobs is not None:
        lps = [e for o in outs for e in (o.logprobs or ())]
    return dataclasses.replace(last, new_token_ids=[t for o in outs for t in o.new_token_ids],
                               new_text="".join(o.new_text for o in outs), logprobs=lps)


@dataclass
class _Part:
    """What a held output adds (its new tokens, text and log-probs), without its O(length) state."""

    new_token_ids: list
    new_text: str
    logprobs: list | None


class EngineWorker:
    """Runs ``engine`` in a daemon thread; see the module docstring for the protocol.

    max_pending: most sequences in the engine at once (running + waiting); beyond, ``submit``
    raises ``QueueFull`` rather than letting the queue grow. request_timeout_s: a sequence still
    unfinished this long after submission is aborted and ends with ``End('timeout')``. max_model_len:
    the largest token-count bucket of the length histograms in ``requests`` (0: up to 2**20).
    """

    def __init__(self, engine: Any, max_pending: int = 256, request_timeout_s: float = 600.0,
                 max_model_len: int = 0) -> None:
        self.engine = engine
        self.max_pending = max_pending
        self.request_timeout_s = request_timeout_s
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._seqs: dict[str, _Seq] = {}  # engine thread only
        self._outbox: list[tuple[_Seq, Any]] = []  # engine thread only: items to hand over
        self._lock = threading.Lock()  # guards _pending and _draining (event loop and thread)
        self._pending = 0
        self._draining = False
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._counters = {"submitted": 0, "finished": 0, "aborted": 0, "timed_out": 0, "rejected": 0,
                          "invalid": 0, "errors": 0, "steps": 0}
        self._engine_stats: dict = {}
        self._step_time_s = 0.0
        self.requests = RequestStats(max_model_len)
        """Per-sequence tokens, finish reasons and latencies (``GET /metrics``), recorded by this thread."""

    # ---- event-loop side -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is None:
            self._engine_stats = dict(self.engine.stats())
            self._thread = threading.Thread(target=self._run, name="kiln-engine", daemon=True)
            self._thread.start()

    def submit(self, prompts: list[tuple[list[int], Any]], stream: bool = True,
               arrival: float | None = None) -> Batch:
        """Queue ``[(prompt_ids, SamplingParams), ...]`` as one batch; call from the event loop.
        ``stream=False``: each sequence's mailbox gets one item, its final output with every step merged.
        ``arrival``: when the request arrived (``time.monotonic()``; default now), for its latencies.

        Raises QueueFull when admitting them would pass ``max_pending``, ShuttingDown when draining.
        """
        loop = asyncio.get_running_loop()
        with self._lock:
            if self._draining:
                raise ShuttingDown("the server is shutting down; retry on another replica or later")
            if self._pending + len(prompts) > self.max_pending:
                self._counters["rejected"] += 1
                raise QueueFull(
                    f"the server holds {self._pending} sequences (limit --max-pending {self.max_pending}); "
                    "retry shortly"
                )
            self._pending += len(prompts)
            self._counters["submitted"] += len(prompts)
        n = next(self._ids)
        rids = [f"req-{n}-{i}" for i in range(len(prompts))]
        now = time.monotonic()
        batch = Batch(rids, Mailbox(), loop, now + self.request_timeout_s, open=set(range(len(prompts))),
                      arrival=now if arrival is None else arrival)
        self._inbox.put(("add", batch, (prompts, stream)))
        self._wake()
        return batch

    def abort(self, batch: Batch) -> None:
        """Cancel every unfinished sequence of ``batch`` (client gone): their blocks are freed at once."""
        self._inbox.put(("abort", batch, None))
        self._wake()

    def _wake(self) -> None:
        """An engine in another process (``EngineClient``) may be waiting on its pipe in ``step``:
        end the wait so the command goes down before its next step."""
        wake = getattr(self.engine, "wake", None)
        if wake is not None:
            wake()

    def stats(self) -> dict:
        """The engine's last ``stats()`` and the worker's counters (a snapshot; safe from any thread)."""
        with self._lock:
            out = {"pending": self._pending, "draining": self._draining, **self._counters}
        out["engine"] = dict(self._engine_stats)
        out["last_step_ms"] = round(self._step_time_s * 1e3, 3)
        return out

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def drain(self, grace_s: float) -> None:
        """Graceful shutdown: refuse new requests, let in-flight ones finish for up to ``grace_s``
        seconds, then cancel the rest (they end with End('shutdown')) and stop the thread."""
        with self._lock:
            self._draining = True
        deadline = time.monotonic() + grace_s
        while self.pending and time.monotonic() < deadline and self._thread and self._thread.is_alive():
            time.sleep(0.05)
        self._inbox.put(("stop", None, None))
        if self._thread is not None:
            self._thread.join(timeout=30)
        if hasattr(self.engine, "shutdown"):  # an engine in its own process (EngineClient)
            self.engine.shutdown()

    # ---- engine-thread side ----------------------------------------------------------------
    def _run(self) -> None:
        _name_os_thread("kiln-engine")
        last_deadline_check = 0.0
        while True:
            busy = bool(self._seqs) or self.engine.has_unfinished()
            if self._take_commands(block=not busy):
                self._flush()
                break
            now = time.monotonic()
            if now - last_deadline_check > 0.1:
                last_deadline_check = now
                self._expire(now)
            if self.engine.has_unfinished():
                self._step()
            self._flush()
            self._engine_stats = dict(self.engine.stats())
        self._stopped.set()

    def _take_commands(self, block: bool) -> bool:
        """Apply queued commands; True when told to stop (everything left is then cancelled)."""
        try:
            cmd = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
        except queue.Empty:
            return False
        while True:
            kind, batch, payload = cmd
            if kind == "add":
                self._add(batch, payload)
            elif kind == "abort":
                for i, rid in enumerate(batch.request_ids):
                    self._end(rid, End("abort"))
            elif kind == "stop":
                for rid in list(self._seqs):
                    self._end(rid, End("shutdown", "the server shut down before this request finished"))
                return True
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return False

    def _add(self, batch: Batch, payload: tuple[list[tuple[list[int], Any]], bool]) -> None:
        prompts, stream = payload
        for i, (rid, (ids, params)) in enumerate(zip(batch.request_ids, prompts)):
            self._seqs[rid] = _Seq(batch, i, stream)
            try:
                self.engine.add_request(ids, params, request_id=rid)
            except Exception as e:  # a request the engine refuses ends alone; the thread goes on
                log.warning("engine refused %s: %s", rid, e)
                self._end(rid, refusal(f"{type(e).__name__}: {e}"), abort=False)

    def _step(self) -> None:
        t0 = time.perf_counter()
        try:
            outs = self.engine.step()
        except Exception as e:  # fail the in-flight requests, keep serving the next ones
            log.exception("engine step failed; cancelling %d in-flight sequences", len(self._seqs))
            for rid in list(self._seqs):
                self._end(rid, End("error", f"engine step failed: {type(e).__name__}: {e}"))
            return
        self._step_time_s = time.perf_counter() - t0
        self._counters["steps"] += 1
        for rid, why in self.engine.pop_refused() if hasattr(self.engine, "pop_refused") else ():
            log.warning("engine refused %s: %s", rid, why)  # an engine in another process refuses late
            self._end(rid, refusal(why), abort=False)
        now, requests = time.monotonic(), self.requests
        for out in outs:
            seq = self._seqs.get(out.request_id)
            if seq is None:  # aborted between the step and now
                continue
            requests.generation_tokens += len(out.new_token_ids)  # one addition per sequence per step
            if seq.first is None and (out.new_token_ids or out.finished):
                seq.first = now
                requests.first_token(now - seq.batch.arrival, out.num_prompt_tokens)
            if not seq.stream:  # hold until it finishes: one item in all
                if not out.finished:
                    seq.held.append(_Part(out.new_token_ids, out.new_text, out.logprobs))
                    continue
                out = merge_outputs([*seq.held, out])
            self._deliver(seq, out)
            if out.finished:
                del self._seqs[out.request_id]
                requests.finish(out.finish_reason, now - seq.batch.arrival, now - seq.first, out.num_prompt_tokens,
                                out.num_generated_tokens, getattr(out, "metrics", None))
                self._release(1, "finished")

    def _expire(self, now: float) -> None:
        for rid, seq in list(self._seqs.items()):
            if now > seq.batch.deadline:
                self._end(rid, End("timeout", f"the request ran past --request-timeout "
                                              f"{self.request_timeout_s:g} s and was cancelled"))

    def _end(self, rid: str, end: End, abort: bool = True) -> None:
        seq = self._seqs.pop(rid, None)
        if seq is None:
            return
        if abort:
            try:
                self.engine.abort(rid)
            except Exception:  # an abort must never take the thread down
                log.exception("engine.abort(%s) failed", rid)
        self._deliver(seq, end)
        self._release(1, {"timeout": "timed_out", "error": "errors", "invalid": "invalid"}.get(end.reason, "aborted"))

    def _release(self, n: int, counter: str) -> None:
        with self._lock:
            self._pending -= n
            self._counters[counter] += n

    def _deliver(self, seq: _Seq, item: Any) -> None:
        self._outbox.append((seq, item))

    def _flush(self) -> None:
        """Hand this iteration's items to the event loop in one wake-up per loop (not one per token)."""
        by_loop: dict[Any, list] = {}
        for seq, item in self._outbox:
            by_loop.setdefault(seq.batch.loop, []).append((seq.batch.queue, (seq.index, item)))
        self._outbox = []
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the event loop is closed (server stopping): nobody is listening
                pass


def refusal(why: str) -> End:
    """How a request ``add_request`` refused ends, from ``why`` ('ValueError: ...'): a ValueError is
    the engine saying the request is invalid (a logit_bias id outside the vocabulary, a prompt it
    cannot hold): 'invalid', answered 400; anything else is the engine failing: 'error', 500."""
    if why.startswith("ValueError: "):
        return End("invalid", why[len("ValueError: "):])
    return End("error", why)


def _put_all(items: list[tuple[Mailbox, Any]]) -> None:
    for q, item in items:
        q.put_nowait(item)


def _name_os_thread(name: str) -> None:
    """Give the calling thread an OS-level name (Linux ``prctl(PR_SET_NAME)``, 15 bytes), so ``top -H``
    and ``/proc/PID/task/*/comm`` show it (``kiln bench serve-http`` reads its CPU time there)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(15, name.encode()[:15], 0, 0, 0)  # 15 = PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: the name is cosmetic
        pass
