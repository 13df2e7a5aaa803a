"""A stand-in engine behind Kiln's real server (app, worker, uvicorn), to measure what the server
itself costs per streamed token without a model: ``kiln bench serve-http --stub-engine K``.

Each ``step()`` sleeps ``step_ms`` with the GIL released (a GPU step's wait) and gives every running
request ``tokens_per_step`` tokens (K = the engine's ``decode_steps``: a multi-step decode hands out
K tokens per request per step; K = 1: a single-step engine). Whatever the server process spends
beyond the engine thread is the HTTP path's cost; the engine thread's own CPU is the stub's
bookkeeping, a lower bound of the real engine's.

    python -m kiln.bench.serve_stub --port 8000 --step-ms 20 --tokens-per-step 8
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class StubEngine:
    """``LLMEngine``'s contract (add_request, step, abort, has_unfinished, stats) without a model:
    the tokens are letters a..z in turn, one byte each; a request runs to its ``max_tokens``."""

    step_ms: float = 20.0
    tokens_per_step: int = 8
    max_num_seqs: int = 256
    host_us_per_seq: float = 0.0
    """Python work per running request per step, holding the GIL (a real engine's host side:
    scheduling, stop checks, outputs), before the GIL-free wait."""
    live: dict = field(default_factory=dict)
    finished: int = 0

    def add_request(self, prompt_ids: list[int], params: Any, request_id: str | None = None) -> str:
        self.live[request_id] = (list(prompt_ids), params, [])
        return request_id

    def abort(self, rid: str) -> None:
        self.live.pop(rid, None)

    def has_unfinished(self) -> bool:
        return bool(self.live)

    def stats(self) -> dict:
        n = len(self.live)
        return {"used_blocks": n, "free_blocks": 0, "running": min(n, self.max_num_seqs),
                "waiting": max(0, n - self.max_num_seqs), "finished": self.finished}

    def step(self) -> list:
        from kiln.generate import RequestOutput

        busy_until = time.perf_counter() + self.host_us_per_seq * min(len(self.live), self.max_num_seqs) / 1e6
        while time.perf_counter() < busy_until:  # pure Python: holds the GIL, as the engine's host code does
            pass
        time.sleep(self.step_ms / 1e3)
        outs = []
        for rid in list(self.live)[: self.max_num_seqs]:
            prompt, params, gen = self.live[rid]
            k = min(self.tokens_per_step, params.max_tokens - len(gen))
            new = [97 + (len(gen) + j) % 26 for j in range(k)]
            gen += new
            done = len(gen) >= params.max_tokens
            text = "".join(map(chr, new))
            outs.append(RequestOutput(rid, prompt, list(gen), new, "", text, None, done,
                                      "length" if done else None, len(prompt), len(gen)))
            if done:
                del self.live[rid]
                self.finished += 1
        return outs


@dataclass(frozen=True)
class StubSpec:
    """What ``load_stub`` builds (``model_dir`` only names it in messages). With ``pace`` (A, B, P in
    ms), Kiln's real engine with its model's work replaced by sleeps (``paced_engine``) instead of a
    ``StubEngine``; ``tokens_per_step`` is then its decode steps per graph."""

    step_ms: float = 20.0
    tokens_per_step: int = 8
    max_num_seqs: int = 256
    host_us_per_seq: float = 0.0
    model_dir: str = "stub"
    pace: tuple[float, ...] = ()
    tokenizer: str = ""
    """``chat_tokenizer``'s path (a tokenizer.json or GPT-2's files); "": byte-level."""


def load_stub(spec: StubSpec) -> Any:
    """A ``Loaded`` over a ``StubEngine``, or with ``spec.pace`` a ``paced_engine`` (the loader
    ``kiln serve --engine-process`` runs in its child)."""
    from kiln.bench.serve_http import chat_tokenizer
    from kiln.serve.server import Loaded

    tok = chat_tokenizer(spec.tokenizer or None)
    if spec.pace:
        from kiln.bench.serve_paced import paced_engine

        engine: Any = paced_engine(spec.pace, spec.max_num_seqs, spec.tokens_per_step, tok)
    else:
        engine = StubEngine(spec.step_ms, spec.tokens_per_step, spec.max_num_seqs, spec.host_us_per_seq)
    return Loaded(engine, tok, None, "stub", "cpu", context_length(spec), tok.vocab_size)


def context_length(spec: StubSpec) -> int:
    """The served context: the paced engine's model has 1,024 positions; the stub has no limit."""
    return 1024 if spec.pace else 1 << 16


def main(argv: list[str] | None = None) -> int:
    """Serve the stub on 127.0.0.1 with the chat tokenizer (byte-level + chat tokens) until killed."""
    import logging

    from kiln.bench.serve_http import chat_tokenizer
    from kiln.serve.app import ServerState
    from kiln.serve.config import ServeConfig
    from kiln.serve.server import serve
    from kiln.serve.worker import EngineWorker

    p = argparse.ArgumentParser(prog="python -m kiln.bench.serve_stub", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--step-ms", type=float, default=20.0, help="sleep per step (GIL released)")
    p.add_argument("--tokens-per-step", type=int, default=8, help="tokens per running request per step")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests advanced per step")
    p.add_argument("--max-pending", type=int, default=1088)
    p.add_argument("--host-us", type=float, default=0.0, help="Python work per running request per step (GIL held)")
    p.add_argument("--engine-process", action="store_true", help="the stub in its own process, as kiln serve's")
    p.add_argument("--pace", default="", metavar="A,B,P", help="Kiln's real engine with sleeps for its model "
                   "(paced_engine): ms per step, per decode row, per prompt token")
    p.add_argument("--tokenizer", default="", help="the chat tokenizer's base (tokenizer.json or a folder with "
                   "GPT-2's vocab.json + merges.txt); default byte-level")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from kiln.bench.serve_paced import parse_pace

    pace = parse_pace(args.pace) if args.pace else ()
    spec = StubSpec(args.step_ms, args.tokens_per_step, args.max_num_seqs, args.host_us, pace=pace,
                    tokenizer=args.tokenizer)
    if args.engine_process:
        from kiln.serve.engine_process import EngineClient

        engine: Any = EngineClient(spec, load_stub)
    else:
        engine = load_stub(spec).engine
    tok = chat_tokenizer(args.tokenizer or None)
    cfg = ServeConfig(port=args.port, model_name="stub", max_pending=args.max_pending, request_timeout_s=3600)
    state = ServerState(EngineWorker(engine, cfg.max_pending, cfg.request_timeout_s), tok, cfg, "stub",
                        context_length(spec), tok.vocab_size)
    serve(state, cfg, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
