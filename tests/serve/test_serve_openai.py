"""`kiln serve` as a subprocess on 127.0.0.1, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import json

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

MODEL = "kiln-chat-tiny"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = server.health()
    assert h["status"] == "ok" and h["chat_format"] == "template" and h["context_length"] == 128


def test_chat_greedy_answers_from_the_chat_template_and_counts_usage(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       temperature=0, max_tokens=60)
    choice = r.choices[0]
    # The fixture model was overfit on this exchange; <|end|> (a stop id) ends the reply.
    assert choice.message.content == "Hello! I am Kiln, a small model."
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    # <|user|> h i <|end|> <|assistant|>: 5 prompt tokens; 32 characters + <|end|> generated.
    assert r.usage.prompt_tokens == 5
    assert r.usage.completion_tokens == len(choice.message.content) + 1
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    msgs = [{"role": "user", "content": "who are you?"}]
    full = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40)
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=40,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # the usage chunk comes last


def test_chat_n_seed_and_length_limit(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "tell me a story"}], temperature=1.5,
              max_tokens=12, n=3, seed=7)
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert texts == [c.message.content for c in b.choices]  # same seed, same samples
    assert len(set(texts)) > 1  # each choice draws with its own seed
    assert 3 <= a.usage.completion_tokens <= 36 and a.usage.prompt_tokens == 18  # <|user|> + 15 bytes + <|end|><|assistant|>: counted once
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)


def test_completions_stop_and_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="<|user|>hi<|end|><|assistant|>", temperature=0,
                                  max_tokens=30, stop=[" am"], logprobs=2)
    c = r.choices[0]
    assert c.text == "Hello! I" and c.finish_reason == "stop"  # cut before the stop string
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) > 0
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(t) == 2 for t in lp.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(lp.top_logprobs, lp.token_logprobs))


def test_completions_stream_several_prompts(client):
    chunks = list(client.completions.create(model=MODEL, prompt=["<|user|>hi<|end|><|assistant|>", "Once"],
                                            temperature=0, max_tokens=8, n=2, stream=True))
    texts = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert sorted(texts) == [0, 1, 2, 3]
    assert texts[0] == texts[1] == "Hello! I"  # greedy: both choices of a prompt agree


def test_chat_logprobs_top_alternatives(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=0,
                                       max_tokens=3, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert "".join(t.token for t in content) == r.choices[0].message.content == "Hel"
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def _post(server, path, content, headers=None):
    return httpx.post(server.url + path, content=content, timeout=30,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _ok(server):
    r = _post(server, "/v1/completions", json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2}))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1


def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(server, client):
    cases = [
        ("/v1/chat/completions", b'{"model": "kiln-chat-tiny", "messages": [', 400, "not valid JSON"),
        ("/v1/chat/completions", json.dumps({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}),
         404, "does not exist"),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                             "max_tokens": -5}), 400, "max_tokens"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 200}), 400, "context"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * 100, "max_tokens": 60}), 400,
         "ask for at most"),
        ("/v1/completions", json.dumps({"model": MODEL, "prompt": "x" * (2 << 20)}), 413, "limit"),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": []}), 400, "messages"),
        ("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "function", "content": "x"}]}),
         400, "role"),
        ("/v1/nothing", b"{}", 404, "no route"),
    ]
    for path, body, status, words in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (path, body[:80], r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["type"], err
        _ok(server)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model=MODEL, prompt="x" * 200)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert server.proc.poll() is None
    h = server.health()
    assert h["errors"] == 0 and h["pending"] == 0
