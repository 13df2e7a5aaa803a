"""Structured output over HTTP: OpenAI's ``response_format`` (json_schema, json_object, text) and vLLM's
``structured_outputs`` and ``guided_*`` on both routes, through the official ``openai`` client against
``kiln serve`` with the engine in its own process (the default) and in a thread: whatever the tiny
model would say, the reply is in the language asked for and ends with 'stop'. A bad schema, regex or
grammar, or two constraints at once, is a 400 naming its field, streaming or not."""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("llguidance")

from kiln.generate import RequestOutput, SamplingParams, StructuredOutput  # noqa: E402
from serve_helpers import StubEngine, openai_client  # noqa: E402

MODEL = "kiln-chat-tiny"
HI = [{"role": "user", "content": "hi"}]
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}},
          "required": ["n", "tag"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "pick", "schema": SCHEMA, "strict": True}}


def _client(s):  # ``srv``: conftest's server, the engine in a process or in a thread
    return openai_client(s, timeout=60)


def _check_schema(text: str) -> None:
    obj = json.loads(text)
    assert set(obj) == {"n", "tag"} and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99, text
    assert obj["tag"] in ("red", "green"), text


# ---- end to end, both engine modes ----------------------------------------------------------------
def test_json_schema_response_format_on_both_routes(srv):
    client = _client(srv)
    r = client.chat.completions.create(model=MODEL, messages=HI, response_format=JSON_SCHEMA, max_tokens=60,
                                       temperature=0)
    c = r.choices[0]
    assert not c.message.content.startswith("Hello")  # the model's own reply is not JSON
    _check_schema(c.message.content)
    assert c.finish_reason == "stop"
    sampled = client.chat.completions.create(model=MODEL, messages=HI, response_format=JSON_SCHEMA, max_tokens=60,
                                             temperature=1.5, top_p=1, n=3, seed=1)
    for c in sampled.choices:  # sampled hot, each choice with its own matcher
        _check_schema(c.message.content)
        assert c.finish_reason == "stop"
    comp = client.completions.create(model=MODEL, prompt="Once upon", max_tokens=60, temperature=0,
                                     extra_body={"response_format": JSON_SCHEMA})
    _check_schema(comp.choices[0].text)
    assert comp.choices[0].finish_reason == "stop"
    plain = client.chat.completions.create(model=MODEL, messages=HI, response_format={"type": "text"},
                                           max_tokens=60, temperature=0)
    assert plain.choices[0].message.content == "Hello! I am Kiln, a small model."  # text: no constraint


def test_json_object_gives_a_json_object_or_its_cut_prefix(srv):
    r = _client(srv).chat.completions.create(model=MODEL, messages=HI, response_format={"type": "json_object"},
                                             max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.message.content.startswith("{")
    if c.finish_reason == "stop":
        assert isinstance(json.loads(c.message.content), dict)
    else:  # a tiny model may write a long string: cut at max_tokens, still JSON's prefix
        assert c.finish_reason == "length" and r.usage.completion_tokens == 40


@pytest.mark.parametrize("body, check", [
    ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
    ({"guided_choice": ["a.b (c)", "d+"]}, lambda t: t in ("a.b (c)", "d+")),
    ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    ({"structured_outputs": {"regex": r"(cat|dog)s?"}}, lambda t: re.fullmatch(r"(cat|dog)s?", t)),
    ({"guided_json": SCHEMA}, lambda t: _check_schema(t) is None),
    ({"guided_json": json.dumps(SCHEMA)}, lambda t: _check_schema(t) is None),
    ({"structured_outputs": {"json": SCHEMA}}, lambda t: _check_schema(t) is None),
    ({"structured_outputs": {"json_object": True}}, lambda t: isinstance(json.loads(t), dict)),
    ({"guided_grammar": 'start: "<" num ">"\nnum: /[1-9][0-9]?/'}, lambda t: re.fullmatch(r"<[1-9][0-9]?>", t)),
    ({"structured_outputs": {"grammar": 'start: "x" | "y" "z"'}}, lambda t: t in ("x", "yz")),
])
def test_vllms_structured_outputs_and_guided_fields(srv, body, check):
    client = _client(srv)
    chat = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=60, temperature=0, extra_body=body)
    comp = client.completions.create(model=MODEL, prompt="tell me", max_tokens=60, temperature=0.8, seed=3,
                                     extra_body=body)
    for text, finish in ((chat.choices[0].message.content, chat.choices[0].finish_reason),
                         (comp.choices[0].text, comp.choices[0].finish_reason)):
        if finish == "length" and "json_object" in json.dumps(body):
            continue  # an open JSON object may run to max_tokens
        assert check(text) and finish == "stop", (body, text, finish)


def test_streaming_with_a_schema_adds_up_to_valid_json(srv):
    client = _client(srv)
    kw = dict(model=MODEL, messages=HI, response_format=JSON_SCHEMA, max_tokens=60, temperature=0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    _check_schema(text)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    comp = list(client.completions.create(model=MODEL, prompt="x", max_tokens=20, temperature=0, stream=True,
                                          extra_body={"guided_choice": ["alpha", "beta"]}))
    assert "".join(c.choices[0].text for c in comp if c.choices) in ("alpha", "beta")


BAD = [  # (body fields, the param named, words in the message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "needs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": "object"}}},
     "response_format", "dictionary"),
    ({"response_format": "json"}, "response_format", ""),
    ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs", "empty"),
    ({"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " *"}}, "structured_outputs",
     "not supported"),
    ({"guided_regex": "[a-"}, "guided_regex", "unclosed"),
    ({"guided_grammar": "start: foo"}, "guided_grammar", "unknown name"),
    ({"guided_json": "not json"}, "guided_json", "not a JSON schema"),
    ({"guided_json": [1, 2]}, "guided_json", ""),
    ({"guided_choice": ["a", 1]}, "guided_choice", ""),
    ({"response_format": {"type": "json_object"}, "guided_choice": ["a"]}, "guided_choice", "give one"),
    ({"structured_outputs": {"choice": ["a"]}, "guided_regex": "a"}, "guided_regex", "both constrain"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_bad_constraints_are_400s_naming_the_field_and_the_server_keeps_serving(server, stream):
    for extra, param, words in BAD:
        for path, base in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})):
            r = httpx.post(server.url + path, timeout=30,
                           json={"model": MODEL, **base, "max_tokens": 5, "stream": stream, **extra})
            assert r.status_code == 400, (extra, r.text)  # a status, before any event: streaming too
            err = r.json()["error"]
            assert err["param"] == param and words in err["message"], (extra, err)
            assert err["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError, match="nonsense"):
        _client(server).chat.completions.create(model=MODEL, messages=HI, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}})
    ok = _client(server).chat.completions.create(model=MODEL, messages=HI, max_tokens=40, temperature=0,
                                                 extra_body={"guided_choice": ["yes", "no"]})
    assert ok.choices[0].message.content in ("yes", "no")
    h = server.health()
    assert h["errors"] == 0 and h["pending"] == 0 and server.proc.poll() is None


# ---- the wiring, with a stand-in engine -----------------------------------------------------------
@dataclass
class RecordingEngine(StubEngine):
    """Keeps each request's SamplingParams; finishes each in one step with 'ok'. ``refuse``: add_request
    raises this ValueError (an engine-side refusal the server's own check did not foresee)."""

    seen: list = field(default_factory=list)
    refuse: str | None = None

    def add_request(self, prompt_ids, params, request_id=None):
        if self.refuse is not None:
            raise ValueError(self.refuse)
        self.seen.append(params)
        return super().add_request(prompt_ids, params, request_id)

    def step(self):
        outs = [RequestOutput(rid, p, [111, 107], [111, 107], "ok", "ok", None, True, "stop", len(p), 2)
                for rid, (p, _, _) in self.live.items()]
        self.live.clear()
        return outs


def _app(engine):
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app
    from kiln.serve.config import ServeConfig
    from kiln.serve.worker import EngineWorker
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    return TestClient(build_app(ServerState(EngineWorker(engine), tok, ServeConfig(model_name="fake"), "fake",
                                            64, 257)))


def test_each_field_becomes_the_engines_structured_output():
    engine = RecordingEngine()
    cases = [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": JSON_SCHEMA}, StructuredOutput(json=SCHEMA)),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},  # no name: accepted
         StructuredOutput(json=SCHEMA)),
        ({"response_format": {"type": "json_object"}}, StructuredOutput(json_object=True)),
        ({"structured_outputs": {"json": SCHEMA}}, StructuredOutput(json=SCHEMA)),
        ({"structured_outputs": {"json_object": True}}, StructuredOutput(json_object=True)),
        ({"structured_outputs": {"regex": "a+", "json_object": False}}, StructuredOutput(regex="a+")),
        ({"structured_outputs": {"choice": ["y", "n"]}}, StructuredOutput(choice=("y", "n"))),
        ({"structured_outputs": {"grammar": 'start: "x"'}}, StructuredOutput(grammar='start: "x"')),
        ({"guided_json": json.dumps(SCHEMA)}, StructuredOutput(json=SCHEMA)),
        ({"guided_regex": "b?"}, StructuredOutput(regex="b?")),
        ({"guided_choice": ["p", "q"]}, StructuredOutput(choice=("p", "q"))),
        ({"guided_grammar": 'start: "z"'}, StructuredOutput(grammar='start: "z"')),
    ]
    with _app(engine) as client:
        for body, _ in cases:
            for path, base in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "x"})):
                r = client.post(path, json={"model": "fake", **base, "n": 2, **body})
                assert r.status_code == 200, (body, r.text)
    got = [p.structured for p in engine.seen]
    want = [s for _, s in cases for _ in range(4)]  # two routes, n=2
    assert got == want
    for p in engine.seen:  # what crosses the pipe to an engine process
        assert pickle.loads(pickle.dumps(p)) == p
    p = SamplingParams(structured=StructuredOutput(choice=("a",)))
    assert pickle.loads(pickle.dumps(p)).structured.choice == ("a",)


def test_an_engine_refusal_is_a_400_naming_the_field_streaming_or_not():
    engine = RecordingEngine(refuse="structured output: the grammar needs a token the vocabulary lacks")
    with _app(engine) as client:
        for field_, value in (("guided_regex", "a"), ("response_format", {"type": "json_object"}),
                              ("structured_outputs", {"choice": ["a"]})):
            r = client.post("/v1/chat/completions", json={"model": "fake", "messages": HI, field_: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field_, r.text
            with client.stream("POST", "/v1/completions", json={"model": "fake", "prompt": "x", "stream": True,
                                                                  field_: value}) as s:
                events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
            assert events[-1]["error"]["param"] == field_ and "vocabulary" in events[-1]["error"]["message"]
        engine.refuse = "logit_bias token id 999 is outside the vocabulary"  # other refusals name their own field
        r = client.post("/v1/completions", json={"model": "fake", "prompt": "x", "guided_regex": "a"})
        assert r.json()["error"]["param"] == "logit_bias"


def test_kiln_chat_json_flag_makes_every_reply_a_json_object(chat_model_dir):
    import io

    from kiln.cli.main import build_parser
    from kiln.cli.serve import chat_settings
    from kiln.generate import LLMEngine
    from kiln.model import load_pretrained
    from kiln.serve.terminal import chat_loop
    from kiln.tokenizer import load_tokenizer

    settings = chat_settings(build_parser().parse_args(["chat", "M", "--json", "--temperature", "0",
                                                        "--max-tokens", "40"]))
    assert settings.json_object and not chat_settings(build_parser().parse_args(["chat", "M"])).json_object
    tok = load_tokenizer(chat_model_dir)
    engine = LLMEngine(load_pretrained(chat_model_dir).eval(), tok)
    lines = iter(["hi", "who are you?", "/exit"])
    msgs = chat_loop(engine, tok, 128, settings, read=lambda _: next(lines), out=io.StringIO())
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    assert len(replies) == 2 and all(r.startswith("{") for r in replies), replies  # the model would say "Hello!..."
