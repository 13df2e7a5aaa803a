"""The server's pieces in-process: config checks, API key, queue limit, timeout, engine failure,
shutdown, plain-text chat for base models, and `kiln chat`'s loop. Engines here are small fakes
that keep to LLMEngine's contract, so each behaviour is forced deterministically."""

from __future__ import annotations

import asyncio
import io
import time
from dataclasses import dataclass, field

import pytest

pytest.importorskip("fastapi")

from kiln.generate import SamplingParams  # noqa: E402
from kiln.serve.config import ServeConfig  # noqa: E402
from kiln.serve.prompts import PLAIN_STOP, ChatRenderer  # noqa: E402
from kiln.serve.worker import End, EngineWorker, QueueFull, ShuttingDown  # noqa: E402
from kiln.tokenizer import Tokenizer  # noqa: E402
from serve_helpers import OneAPerStep  # noqa: E402


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


@dataclass
class FakeEngine(OneAPerStep):
    """Emits 'a' per step per request; finishes at max_tokens. ``fail_next`` makes step() raise once."""

    step_s: float = 0.0
    fail_next: bool = False
    aborted: list = field(default_factory=list)

    def abort(self, rid):
        if rid in self.live:
            self.aborted.append(rid)
        super().abort(rid)

    def stats(self):
        return {"used_blocks": len(self.live), "free_blocks": 100 - len(self.live), "running": len(self.live),
                "waiting": 0}

    def step(self):
        time.sleep(self.step_s)
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().step()


@dataclass
class FakeConfig:
    vocab_size: int = 257
    context_length: int = 64


def make_client(engine, **cfg):
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app

    config = ServeConfig(model_name="fake", **cfg)
    worker = EngineWorker(engine, max_pending=config.max_pending, request_timeout_s=config.request_timeout_s)
    state = ServerState(worker, byte_tokenizer(), config, "fake", 64, 257)
    return TestClient(build_app(state)), worker


def chat(client, headers=None, **kw):
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}
    return client.post("/v1/chat/completions", json=body, headers=headers or {})


def test_config_refuses_a_public_host_without_a_key():
    with pytest.raises(ValueError, match="--api-key"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", api_key="k" * 16).host == "0.0.0.0"
    assert ServeConfig(host="::1").api_key is None
    with pytest.raises(ValueError, match="max-pending"):
        ServeConfig(max_pending=0)


def test_api_key_guards_the_api_but_not_health():
    client, _ = make_client(FakeEngine(), api_key="secret-key-123")
    with client:
        assert chat(client).status_code == 401
        r = chat(client, {"Authorization": "Bearer secret-key-124"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        ok = chat(client, {"Authorization": "Bearer secret-key-123"})
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "aaa"
        assert client.get("/v1/models").status_code == 401
        assert client.get("/health").status_code == 200


def test_queue_limit_answers_429_and_counts_n():
    client, worker = make_client(FakeEngine(), max_pending=2)
    with client:
        r = chat(client, n=3)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "max-pending" in r.json()["error"]["message"]
        assert chat(client, n=2).status_code == 200
        assert worker.stats()["rejected"] == 1 and worker.pending == 0


def test_timeout_aborts_and_frees_the_request():
    engine = FakeEngine(step_s=0.02)
    client, worker = make_client(engine, request_timeout_s=0.3)
    with client:
        r = chat(client, max_tokens=40)  # 40 steps of 20 ms: past the 0.3 s timeout
        assert r.status_code == 504 and "request-timeout" in r.json()["error"]["message"]
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "fake", "messages": [{"role": "user", "content": "x"}], "max_tokens": 40,
                "stream": True}) as s:
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
        assert '"timeout"' in lines[-1] and "[DONE]" not in lines[-1]
        assert len(engine.aborted) == 2 and not engine.live and worker.stats()["timed_out"] == 2


def test_engine_failure_is_a_500_and_the_next_request_is_served():
    engine = FakeEngine(fail_next=True)
    client, worker = make_client(engine)
    with client:
        r = chat(client)
        assert r.status_code == 500 and "boom" in r.json()["error"]["message"]
        assert chat(client).status_code == 200
        assert worker.stats()["errors"] == 1 and not engine.live


def test_drain_cancels_what_does_not_finish_in_the_grace_period():
    async def main():
        engine = FakeEngine(step_s=0.01)
        worker = EngineWorker(engine, max_pending=8)
        worker.start()
        quick = worker.submit([([1, 2], SamplingParams(max_tokens=2))])
        slow = worker.submit([([1, 2], SamplingParams(max_tokens=10_000))])
        await asyncio.sleep(0.1)
        await asyncio.to_thread(worker.drain, 0.2)
        with pytest.raises(ShuttingDown):
            worker.submit([([1], SamplingParams())])
        items = [quick.queue.get_nowait()[1] for _ in range(quick.queue.qsize())]
        last = [slow.queue.get_nowait()[1] for _ in range(slow.queue.qsize())][-1]
        return items, last, engine

    items, last, engine = asyncio.run(main())
    assert items[-1].finished and items[-1].finish_reason == "length"  # finished within the grace
    assert isinstance(last, End) and last.reason == "shutdown"  # cancelled after it
    assert not engine.live


def test_worker_queue_full_without_http():
    async def main():
        worker = EngineWorker(FakeEngine(step_s=0.01), max_pending=3)
        worker.start()
        worker.submit([([1], SamplingParams(max_tokens=50))] * 3)
        with pytest.raises(QueueFull):
            worker.submit([([1], SamplingParams())])
        worker.drain(0.0)

    asyncio.run(main())


def test_base_model_chat_is_plain_text():
    tok = byte_tokenizer()
    r = ChatRenderer(tok)
    assert r.kind == "plain"
    p = r.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert tok.decode(p.ids) == "System: Be brief.\nUser: hi\nAssistant:"
    assert p.stop == PLAIN_STOP and p.stop_token_ids == ()


def test_chat_template_renderer_uses_the_stop_id():
    from kiln.align.chat import add_chat_tokens

    tok = add_chat_tokens(byte_tokenizer())
    r = ChatRenderer(tok)
    p = r.render([{"role": "developer", "content": "sys"}, {"role": "user", "content": "hi"}])
    assert r.kind == "template" and tok.decode(p.ids) == "<|system|>sys<|end|><|user|>hi<|end|><|assistant|>"
    assert tok.special_tokens["<|end|>"] in p.stop_token_ids


def test_ignore_eos_drops_the_templates_ends_but_keeps_the_requests_stop():
    """vLLM's ``ignore_eos`` runs a reply to max_tokens: the chat template's turn end (an id, or the
    plain prompt's strings) no longer ends it; a ``stop`` the request gives still does."""
    from kiln.align.chat import add_chat_tokens
    from kiln.serve.app import chat_stops
    from kiln.serve.protocol import ChatCompletionRequest

    msgs = [{"role": "user", "content": "hi"}]
    end = add_chat_tokens(byte_tokenizer())
    templ, plain = ChatRenderer(end).render(msgs), ChatRenderer(byte_tokenizer()).render(msgs)
    req = ChatCompletionRequest(model="m", messages=msgs, stop=["###"])
    stop, ids = chat_stops(templ, req)
    assert stop == ["###"] and end.special_tokens["<|end|>"] in ids
    assert chat_stops(plain, req) == ([*PLAIN_STOP, "###"], ())
    req = ChatCompletionRequest(model="m", messages=msgs, stop=["###"], ignore_eos=True)
    assert chat_stops(templ, req) == (["###"], ()) and chat_stops(plain, req) == (["###"], ())


def test_kiln_chat_loop_keeps_history_and_streams(tmp_path):
    import torch

    from kiln.generate import LLMEngine
    from kiln.model import ModelConfig, Transformer
    from kiln.serve.terminal import ChatSettings, chat_loop

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, context_length=96, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    tok = byte_tokenizer()
    engine = LLMEngine(model.eval(), tokenizer=tok)
    lines = iter(["hello", "/system be nice", "again", "/reset", "third", "/exit", "never read"])
    out = io.StringIO()
    msgs = chat_loop(engine, tok, 96, ChatSettings(max_tokens=5, temperature=0.0), read=lambda _: next(lines), out=out)
    # /reset dropped the first exchanges but kept the system message
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == "third" and len(msgs[2]["content"].encode()) <= 5 * 4
    assert out.getvalue().count("model> ") == 3 and "[history cleared]" in out.getvalue()
    assert not engine.has_unfinished() and engine.stats()["used_blocks"] == 0


def test_load_fuses_projections_unless_told_not_to(chat_model_dir):
    """``kiln serve`` / ``kiln chat`` load the model with q/k/v and gate/up fused (``fuse_projections``),
    with the same greedy replies; ``--no-fuse-projections`` keeps them apart."""
    from kiln.cli.main import build_parser
    from kiln.cli.serve import _spec
    from kiln.model import is_fused
    from kiln.serve.server import ModelSpec, load

    fused = load(ModelSpec(str(chat_model_dir), device="cpu", warmup="off"))
    plain = load(ModelSpec(str(chat_model_dir), device="cpu", warmup="off", fuse_projections=False))
    assert is_fused(fused.model) and not is_fused(plain.model)
    p = SamplingParams(max_tokens=12, temperature=0)
    prompts = [[104, 105], [119, 104, 111]]
    assert ([o.token_ids for o in fused.engine.generate(prompts, p)]
            == [o.token_ids for o in plain.engine.generate(prompts, p)])
    for cmd in ("serve", "chat"):
        assert _spec(build_parser().parse_args([cmd, "M"])).fuse_projections
        assert not _spec(build_parser().parse_args([cmd, "M", "--no-fuse-projections"])).fuse_projections


def test_tool_choice_auto_is_refused_by_name_and_none_is_served():
    """Kiln's chat format has no tool-call syntax: tools with tool_choice "auto" (the default) get a 400
    saying so (never a reply that silently ignores them); "none" is served, the tools unused; a named
    function that is not among the tools, or a tool that is not a function, is a 400 too."""
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    client, _ = make_client(FakeEngine())
    with client:
        for choice, param, words in ((None, "tools", "not supported"), ("auto", "tool_choice", "not supported"),
                                     ({"type": "function", "function": {"name": "mul"}}, "tool_choice",
                                      "not among the tools"), ("sometimes", "tool_choice", "is not")):
            r = chat(client, tools=tools, **({} if choice is None else {"tool_choice": choice}))
            err = r.json()["error"]
            assert r.status_code == 400 and err["param"] == param and words in err["message"], err
        r = chat(client, tools=[{"type": "function", "function": {}}], tool_choice="required")
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        r = chat(client, tools=tools, tool_choice="none")
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "aaa"
        assert chat(client, tools=[]).status_code == 200  # an empty list asks for nothing


def test_a_constraint_compiles_off_the_event_loop(monkeypatch):
    """A structured-output language is compiled in a worker thread (a large schema takes up to a second,
    which the event loop must not spend while other replies stream); plain requests skip the hop."""
    import threading

    from kiln.serve import app as app_mod

    seen = {}
    compile_now, plan = app_mod._constraint_now, app_mod._plan
    monkeypatch.setattr(app_mod, "_constraint_now",
                        lambda *a: seen.setdefault("compile", threading.get_ident()) and compile_now(*a))
    monkeypatch.setattr(app_mod, "_plan", lambda *a, **k: seen.setdefault("loop", threading.get_ident()) and plan(*a, **k))
    client, _ = make_client(FakeEngine())
    with client:
        assert chat(client).status_code == 200 and "compile" not in seen
        seen.clear()
        r = chat(client, response_format={"type": "json_object"})
        assert r.status_code == 200 and seen["compile"] != seen["loop"]
