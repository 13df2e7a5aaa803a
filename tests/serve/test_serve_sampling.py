"""The logits-processing fields (presence/frequency/repetition penalties, logit_bias, min_p,
min_tokens) on every surface: the OpenAI request -> ``SamplingParams`` the engine gets, the 400s of
bad values in OpenAI's format naming the field, an engine refusal as a 400, ``kiln chat``'s flags,
and end to end through ``kiln serve`` with the official ``openai`` client."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field

import pytest

pytest.importorskip("fastapi")

from kiln.serve.config import ServeConfig  # noqa: E402
from kiln.tokenizer import Tokenizer  # noqa: E402
from serve_helpers import OneAPerStep  # noqa: E402

VOCAB = 257
PROCESSING = dict(presence_penalty=0.5, frequency_penalty=-1.25, repetition_penalty=1.3, min_p=0.05, min_tokens=2,
                  logit_bias={"97": 5.0, "3": -100})
"""One request's values of every new field (none at its default), as a client sends them."""


@dataclass
class RecordingEngine(OneAPerStep):
    """Keeps every (prompt, SamplingParams) it is given; emits 'a' per step; ``refuse`` makes
    add_request raise it (as LLMEngine refuses a request it cannot take)."""

    refuse: Exception | None = None
    seen: list = field(default_factory=list)

    def add_request(self, prompt_ids, params, request_id=None):
        self.seen.append((list(prompt_ids), params))
        if self.refuse is not None:
            raise self.refuse
        return super().add_request(prompt_ids, params, request_id)

    def stats(self):
        return {"used_blocks": len(self.live)}


def make_client(engine):
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app
    from kiln.serve.worker import EngineWorker

    worker = EngineWorker(engine, max_pending=64)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    state = ServerState(worker, tok, ServeConfig(model_name="fake"), "fake", 64, VOCAB)
    return TestClient(build_app(state)), worker


def post(client, route: str, **kw):
    body = {"model": "fake", "max_tokens": 3, **kw}
    if route == "chat":
        body.setdefault("messages", [{"role": "user", "content": "hi"}])
        return client.post("/v1/chat/completions", json=body)
    body.setdefault("prompt", "hi")
    return client.post("/v1/completions", json=body)


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_every_field_reaches_the_engines_sampling_params(route):
    engine = RecordingEngine()
    client, _ = make_client(engine)
    with client:
        r = post(client, route, n=2, seed=5, **PROCESSING)
        assert r.status_code == 200, r.text
        plain = post(client, route)
        assert plain.status_code == 200, plain.text
    params = [p for _, p in engine.seen]
    assert len(params) == 3
    for p in params[:2]:  # both choices of n=2
        assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (
            0.5, -1.25, 1.3, 0.05, 2)
        assert p.logit_bias == ((3, -100.0), (97, 5.0))  # string keys -> ids, sorted
    p = params[2]  # a request without them gets SamplingParams' defaults: no processing at all
    assert p.logit_bias == () and not p.processed and p.repetition_penalty == 1.0


def test_the_request_models_parse_the_openai_and_vllm_fields():
    from kiln.generate.sampling import MAX_LOGIT_BIAS as ENGINE_MAX
    from kiln.serve.protocol import MAX_LOGIT_BIAS, ChatCompletionRequest, CompletionRequest

    assert MAX_LOGIT_BIAS == ENGINE_MAX
    msgs = [{"role": "user", "content": "x"}]
    for req in (ChatCompletionRequest(model="m", messages=msgs, **PROCESSING),
                CompletionRequest(model="m", prompt="x", **PROCESSING)):
        assert req.bias_pairs() == ((97, 5.0), (3, -100.0))
        assert (req.presence_penalty, req.frequency_penalty, req.repetition_penalty, req.min_p,
                req.min_tokens) == (0.5, -1.25, 1.3, 0.05, 2)
    d = CompletionRequest(model="m", prompt="x")
    assert (d.presence_penalty, d.frequency_penalty, d.repetition_penalty, d.min_p, d.min_tokens,
            d.logit_bias) == (0.0, 0.0, 1.0, 0.0, 0, None)
    edge = CompletionRequest(model="m", prompt="x", presence_penalty=-2, frequency_penalty=2, min_p=1,
                             logit_bias={str(i): i / 1.5 - 100 for i in range(MAX_LOGIT_BIAS)})
    assert len(edge.bias_pairs()) == MAX_LOGIT_BIAS


BAD = [  # (field values, the param the 400 names, words in its message)
    ({"presence_penalty": 2.5}, "presence_penalty", "less than or equal to 2"),
    ({"presence_penalty": -2.01}, "presence_penalty", "greater than or equal to -2"),
    ({"frequency_penalty": -3}, "frequency_penalty", "greater than or equal to -2"),
    ({"frequency_penalty": "lots"}, "frequency_penalty", "number"),
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"repetition_penalty": -1.5}, "repetition_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"min_p": -0.1}, "min_p", "greater than or equal to 0"),
    ({"min_tokens": -1}, "min_tokens", "greater than or equal to 0"),
    ({"min_tokens": 1.5}, "min_tokens", "integer"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens", "min_tokens=9 must be <= max_tokens=4"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "'abc' is not a token id"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "'-1' is not a token id"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias", "'1.5' is not a token id"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"5": "up"}}, "logit_bias", "number"),
    ({"logit_bias": [5, 1]}, "logit_bias", "dictionary"),
    ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias", "at most 300"),
    ({"logit_bias": {str(VOCAB): 1}}, "logit_bias", f"token id {VOCAB} is outside the vocabulary of {VOCAB}"),
]


@pytest.mark.parametrize("route", ["chat", "completions"])
def test_bad_values_are_400s_naming_the_field_and_the_server_keeps_serving(route):
    engine = RecordingEngine()
    client, worker = make_client(engine)
    with client:
        for kw, param, words in BAD:
            r = post(client, route, **kw)
            assert r.status_code == 400, (kw, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error", (kw, err)
            assert words in err["message"], (kw, err["message"])
            assert post(client, route).status_code == 200
        # min_tokens over the max_tokens a request leaves out (what the context has room for, here 64 - 2)
        r = post(client, route, max_tokens=None, min_tokens=63)
        assert r.status_code == 400 and r.json()["error"]["param"] == "min_tokens", r.text
    assert len(engine.seen) == len(BAD)  # only the good requests in between reached the engine
    assert worker.stats()["errors"] == 0


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_refusing_a_request_with_a_value_error_is_a_400(stream):
    """``LLMEngine.add_request`` refuses what only it can check (a logit_bias id outside the model's
    vocabulary): a ValueError is the client's error, 400 naming the field; anything else stays a 500."""
    from kiln.serve.worker import End, refusal

    engine = RecordingEngine(refuse=ValueError("logit_bias token id 250 is outside the vocabulary of 250"))
    client, worker = make_client(engine)
    with client:
        r = post(client, "chat", logit_bias={"250": 1}, stream=stream)
        if stream:  # the stream had begun: its one event is the error
            events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
            err = json.loads(events[-1])["error"]
        else:
            assert r.status_code == 400, r.text
            err = r.json()["error"]
        assert err["param"] == "logit_bias" and "outside the vocabulary" in err["message"], err
        assert worker.stats()["invalid"] == 1 and worker.stats()["errors"] == 0
        engine.refuse = None
        assert post(client, "chat").status_code == 200
    why = "min_tokens=3 must be <= max_tokens=2"
    assert refusal(f"ValueError: {why}") == End("invalid", why)
    assert refusal("RuntimeError: CUDA out of memory") == End("error", "RuntimeError: CUDA out of memory")


def test_kiln_chat_flags_reach_the_engine():
    from kiln.cli.main import build_parser
    from kiln.cli.serve import chat_settings
    from kiln.serve.prompts import ChatRenderer
    from kiln.serve.terminal import ChatSettings, chat_loop

    args = build_parser().parse_args(["chat", "M", "--repetition-penalty", "1.2", "--presence-penalty", "0.5",
                                      "--frequency-penalty", "-0.5", "--min-p", "0.1", "--min-tokens", "3",
                                      "--max-tokens", "4"])
    settings = chat_settings(args)
    assert (settings.repetition_penalty, settings.presence_penalty, settings.frequency_penalty, settings.min_p,
            settings.min_tokens) == (1.2, 0.5, -0.5, 0.1, 3)
    default = chat_settings(build_parser().parse_args(["chat", "M"]))
    assert default == ChatSettings(max_tokens=256, temperature=0.7, top_p=0.95)

    class StepEngine(RecordingEngine):
        def add_request(self, prompt_ids, params, request_id=None):  # LLMEngine picks the id
            return super().add_request(prompt_ids, params, request_id=f"r{len(self.seen)}")

    engine = StepEngine()
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    lines = iter(["hello", "/exit"])
    chat_loop(engine, tok, 64, settings, read=lambda _: next(lines), out=io.StringIO())
    (_, p), = engine.seen
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.min_p, p.min_tokens, p.max_tokens) == (
        1.2, 0.5, -0.5, 0.1, 3, 4)
    # min_tokens is cut with max_tokens to what the context has room for
    engine = StepEngine()
    prompt_len = len(ChatRenderer(tok).render([{"role": "user", "content": "hello"}]).ids)
    lines = iter(["hello", "/exit"])
    chat_loop(engine, tok, prompt_len + 2, settings, read=lambda _: next(lines), out=io.StringIO())
    (_, p), = engine.seen
    assert p.max_tokens == 2 and p.min_tokens == 2


@pytest.mark.parametrize("flag, value", [("--presence-penalty", "3"), ("--frequency-penalty", "-2.5"),
                                         ("--repetition-penalty", "0"), ("--min-p", "2"), ("--min-tokens", "300")])
def test_kiln_chat_refuses_bad_values_naming_the_flag(flag, value):
    from kiln.cli.main import build_parser
    from kiln.cli.serve import chat_settings

    with pytest.raises(ValueError, match=f"^{flag}: "):
        chat_settings(build_parser().parse_args(["chat", "M", flag, value]))


# ---- end to end: `kiln serve` as a subprocess (the engine in its own process), the openai client ----
openai = pytest.importorskip("openai")
MODEL = "kiln-chat-tiny"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_logit_bias_of_100_makes_greedy_decoding_emit_only_that_token(client):
    z = ord("z")  # the fixture's tokenizer is bytes: token id 122 is "z"
    r = client.completions.create(model=MODEL, prompt="<|user|>hi<|end|><|assistant|>", temperature=0,
                                  max_tokens=8, logit_bias={str(z): 100})
    assert r.choices[0].text == "z" * 8 and r.usage.completion_tokens == 8
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                 temperature=0, max_tokens=6, logit_bias={str(z): 100},
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "z" * 6
    # without the bias the same request answers as trained
    plain = client.completions.create(model=MODEL, prompt="<|user|>hi<|end|><|assistant|>", temperature=0,
                                      max_tokens=8)
    assert plain.choices[0].text == "Hello! I"


def test_min_tokens_holds_off_the_end_of_the_reply(client):
    msgs = [{"role": "user", "content": "hi"}]
    base = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=60)
    n = base.usage.completion_tokens  # the trained reply, <|end|> included
    assert base.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=MODEL, messages=msgs, temperature=0, max_tokens=n + 8,
                                       extra_body={"min_tokens": n + 4})
    assert r.usage.completion_tokens >= n + 4
    assert r.choices[0].message.content.startswith(base.choices[0].message.content)


def test_penalties_and_vllm_extensions_are_accepted_over_http(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me a story"}],
                                       temperature=0.8, seed=3, max_tokens=10, presence_penalty=0.5,
                                       frequency_penalty=0.5,
                                       extra_body={"repetition_penalty": 1.2, "min_p": 0.1, "min_tokens": 2})
    assert r.usage.completion_tokens >= 2 and r.choices[0].finish_reason in ("stop", "length")


def test_bad_values_over_http_are_openai_400s(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=2, logit_bias={"99999": 5})
    assert e.value.body["param"] == "logit_bias" and "outside the vocabulary" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                       presence_penalty=2.5)
    assert e.value.body["param"] == "presence_penalty"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       extra_body={"min_tokens": 5})
    assert e.value.body["param"] == "min_tokens"
    assert server.proc.poll() is None
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2).usage.completion_tokens >= 1
