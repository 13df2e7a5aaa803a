"""Coalesced streaming: one SSE chunk per sequence per engine step (a multi-step engine hands out
several tokens a step), queued steps merged into one chunk, non-streaming requests handed over once,
and the engine in its own process (``kiln serve``'s default; ``--no-engine-process``: a thread)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

import torch

from kiln.generate import EngineConfig, LLMEngine, RequestOutput, SamplingParams
from kiln.model import ModelConfig, Transformer
from kiln.serve.config import ServeConfig
from kiln.serve.worker import EngineWorker, Mailbox, merge_outputs
from kiln.tokenizer import Tokenizer
from serve_helpers import OneAPerStep

PROMPT = [72, 105, 33, 32, 200, 150]  # token ids: bytes, one of them a lone UTF-8 continuation byte


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(3)
    cfg = ModelConfig(vocab_size=257, context_length=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    return Transformer(cfg).eval()


def multi_step_engine(model: Transformer, decode_steps: int = 4) -> LLMEngine:
    eng = LLMEngine(model, byte_tokenizer(), EngineConfig(block_size=4, max_num_seqs=8, decode_steps=decode_steps))
    eng.runner.graph_max = 8  # what a CUDA engine gets; on the CPU the graph body runs eagerly
    return eng


def client_over(engine: LLMEngine):
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app

    cfg = ServeConfig(model_name="m")
    state = ServerState(EngineWorker(engine, cfg.max_pending, cfg.request_timeout_s), byte_tokenizer(), cfg, "m", 96, 257)
    return TestClient(build_app(state))


def sse(resp) -> list[dict]:
    return [json.loads(ln[6:]) for ln in resp.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]


def greedy_text(model: Transformer, max_tokens: int, stop: tuple = ()) -> tuple[str, int]:
    """Single-step engine, token by token: the reference text and token count."""
    eng = LLMEngine(model, byte_tokenizer(), EngineConfig(block_size=4, max_num_seqs=8, decode_steps=1))
    out = eng.generate([PROMPT], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, stop=stop))[0]
    return out.text, out.num_generated_tokens


def test_coalesced_stream_equals_non_stream_and_per_token_greedy(model):
    ref, n_ref = greedy_text(model, 30)
    assert n_ref == 30 and "\ufffd" in ref  # the lone continuation byte and random bytes: partial characters
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 30, "temperature": 0, "ignore_eos": True, "n": 2}
    with client_over(multi_step_engine(model)) as client:
        full = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={
                **body, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}) as r:
            chunks = sse(r)
    assert [c["text"] for c in full["choices"]] == [ref, ref]
    assert full["usage"] == {"prompt_tokens": 6, "completion_tokens": 60, "total_tokens": 66}
    for i in range(2):
        mine = [c for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(c["choices"][0]["text"] for c in mine) == ref
        assert [c["choices"][0]["finish_reason"] for c in mine][-1] == "length"
        assert len(mine) < 30  # several tokens per chunk: 1 (prefill) + 4 per multi-step, not one per token
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == full["usage"]
    running = [c["usage"]["completion_tokens"] for c in chunks[:-1]]
    assert running == sorted(running) and running[-1] == 60  # the running usage ends exact


def test_stop_string_inside_a_coalesced_chunk_is_cut_exactly(model):
    ref, _ = greedy_text(model, 40)
    k = next(k for k in range(9, 30) if k % 4 != 1 and "\ufffd" not in ref[k:k + 2] and ref.find(ref[k:k + 2]) == k)
    stop = ref[k:k + 2]
    want, n_want = greedy_text(model, 40, stop=(stop,))
    assert want == ref[:k]
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stop": [stop]}
    with client_over(multi_step_engine(model)) as client:
        full = client.post("/v1/completions", json=body).json()
        with client.stream("POST", "/v1/completions", json={**body, "stream": True,
                                                             "stream_options": {"include_usage": True}}) as r:
            chunks = sse(r)
    assert full["choices"][0]["text"] == want and full["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == want
    assert full["usage"]["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == n_want


def test_queued_steps_merge_into_one_chunk_with_every_logprob():
    """A loop that fell behind finds two steps of one sequence queued: one chunk, both tokens'
    log-probs, text offsets running on."""
    from kiln.serve.app import _completion_logprobs, _Plan, _stream, _TokenText

    tok = byte_tokenizer()
    tt = _TokenText(tok)

    def out(ids, text, n, done=False):
        lps = [{t: -0.5, 120: -1.0} for t in ids]
        return RequestOutput("r", [1], [], ids, "", text, lps, done, "length" if done else None, 1, n)

    async def main():
        from kiln.serve.worker import Batch

        batch = Batch(["r"], Mailbox(), asyncio.get_running_loop(), time.monotonic() + 60, open={0})
        for item in (out([104], "h", 1), out([105, 33], "i!", 3), out([63], "?", 4, True)):
            batch.queue.put_nowait((0, item))
        plan = _Plan([[1]], [SamplingParams(max_tokens=4)], 1, 1)
        offsets = [0]

        def chunk(i, text, lps, finish):
            lp = _completion_logprobs(tt, lps, offsets[i])
            offsets[i] += sum(len(s) for s in lp["tokens"])
            return {"choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

        return [e async for e in _stream(None, batch, plan, chunk, None, True)]

    events = asyncio.run(main())
    data = [json.loads(e[6:]) for e in "".join(events).split("\n\n") if e.startswith("data: {")]
    assert len(data) == 2  # the merged chunk and the usage chunk
    c = data[0]["choices"][0]
    assert c["text"] == "hi!?" and c["finish_reason"] == "length"
    assert c["logprobs"]["tokens"] == ["h", "i", "!", "?"] and c["logprobs"]["text_offset"] == [0, 1, 2, 3]
    assert data[1]["usage"]["completion_tokens"] == 4


class OneTokenEngine(OneAPerStep):
    """One token ('a', id 97) per step per request, with log-probs; finishes at max_tokens."""

    def token_logprobs(self, generated):
        return [{97: -0.1 * len(generated)}]


def test_worker_hands_a_non_streaming_sequence_over_once_merged():
    async def main():
        worker = EngineWorker(OneTokenEngine(), max_pending=8)
        worker.start()
        quiet = worker.submit([([1], SamplingParams(max_tokens=6))], stream=False)
        loud = worker.submit([([1], SamplingParams(max_tokens=6))])
        deadline = time.monotonic() + 10
        while (loud.queue.qsize() < 6 or quiet.queue.qsize() < 1) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        worker.drain(0.0)
        return [quiet.queue.get_nowait()[1] for _ in range(quiet.queue.qsize())], loud.queue.qsize()

    items, streamed = asyncio.run(main())
    assert streamed == 6  # one item per step for a stream
    assert len(items) == 1  # one for the non-streaming request: every step merged into it
    (o,) = items
    assert o.finished and o.new_token_ids == [97] * 6 and o.new_text == "aaaaaa" and o.num_generated_tokens == 6
    assert [round(next(iter(e.values())), 3) for e in o.logprobs] == [-0.1, -0.2, -0.3, -0.4, -0.5, -0.6]


def test_merge_outputs_keeps_the_last_state():
    a = RequestOutput("r", [1], [5], [5], "x", "x", None, False, None, 1, 1)
    b = RequestOutput("r", [1], [5, 6, 7], [6, 7], "xyz", "yz", None, True, "stop", 1, 3)
    m = merge_outputs([a, b])
    assert (m.new_token_ids, m.new_text, m.finished, m.finish_reason, m.num_generated_tokens) == \
        ([5, 6, 7], "xyz", True, "stop", 3)
    assert m.logprobs is None and merge_outputs([a]) is a


def test_engine_process_server_answers_like_the_thread_server(chat_model_dir, server_process):
    import httpx

    from kiln.bench.serve_http import child_pids

    s = server_process(chat_model_dir, "--engine-process")
    kids = child_pids(s.proc.pid)
    try:
        msgs = [{"role": "user", "content": "hi"}]
        body = {"model": "kiln-chat-tiny", "messages": msgs, "temperature": 0, "max_tokens": 60}
        full = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert full["choices"][0]["message"]["content"] == "Hello! I am Kiln, a small model."
        assert full["usage"]["completion_tokens"] == 33
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=30, json={
                **body, "stream": True, "stream_options": {"continuous_usage_stats": True}}) as r:
            chunks = sse(r)
        assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
            full["choices"][0]["message"]["content"]
        assert chunks[-1]["usage"] == full["usage"]
        # a client hanging up mid-stream frees the engine process's blocks
        with httpx.stream("POST", s.url + "/v1/completions", timeout=30, json={
                "model": "kiln-chat-tiny", "prompt": "Once", "max_tokens": 120, "ignore_eos": True,
                "stream": True}) as r:
            next(r.iter_lines())
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            h = s.health()
            if h["pending"] == 0 and h["engine"]["used_blocks"] == 0:
                break
            time.sleep(0.1)
        assert h["pending"] == 0 and h["engine"]["used_blocks"] == 0 and h["aborted"] >= 1
    finally:
        out = s.stop()
    assert "Application shutdown complete" in out
    deadline = time.monotonic() + 10  # multiprocessing's resource tracker leaves when it reads EOF
    while any(Path(f"/proc/{k}").exists() for k in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [Path(f"/proc/{k}/cmdline").read_bytes() for k in kids if Path(f"/proc/{k}").exists()]
    assert kids and not left, left  # the engine process is gone too


def test_no_engine_process_serves_from_a_thread_with_the_same_reply(chat_model_dir, server_process):
    """``kiln serve --no-engine-process``: the engine in a thread of the server (no child process; the
    default is the engine process), and the same greedy reply."""
    import httpx

    from kiln.bench.serve_http import child_pids

    s = server_process(chat_model_dir, "--no-engine-process")
    try:
        kids = [k for k in child_pids(s.proc.pid)
                if b"resource_tracker" not in Path(f"/proc/{k}/cmdline").read_bytes()]
        body = {"model": "kiln-chat-tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
                "max_tokens": 60}
        full = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=30).json()
    finally:
        s.stop()
    assert kids == []
    assert full["choices"][0]["message"]["content"] == "Hello! I am Kiln, a small model."
