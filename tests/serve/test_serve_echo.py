"""Prompt log-probs over HTTP: OpenAI's ``echo`` (with ``logprobs``, and ``max_tokens: 0`` to score a
prompt) on /v1/completions and vLLM's ``prompt_logprobs`` on both routes, through ``kiln serve`` with
the engine in its own process (the default) and in a thread, checked against the fixture model's
uncached forward; then lm-evaluation-harness's ``local-completions`` log-likelihood on the server."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from kiln.generate import RequestOutput  # noqa: E402
from serve_helpers import StubEngine, openai_client  # noqa: E402

MODEL = "kiln-chat-tiny"
CHAT = "<|user|>tell me a story<|end|><|assistant|>"
PROMPT = CHAT + "Once upon a time"


def _client(s):  # ``srv``: conftest's server, the engine in a process or in a thread
    return openai_client(s, timeout=30)


@dataclass
class Reference:
    """The fixture model run once over a whole prompt, no cache: what every number must equal."""

    model: torch.nn.Module
    tok: object

    @torch.no_grad()
    def logsoftmax(self, ids: list[int]) -> torch.Tensor:
        return torch.log_softmax(self.model(torch.tensor([ids]))[0].float(), dim=-1)  # (T, V)

    def prompt(self, ids: list[int]) -> list[float]:
        """Each prompt token's log-prob given the ones before it (the first has none)."""
        lp = self.logsoftmax(ids)
        return [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]


@pytest.fixture(scope="module")
def ref(chat_model_dir) -> Reference:
    from kiln.model import load_pretrained
    from kiln.tokenizer import load_tokenizer

    return Reference(load_pretrained(chat_model_dir).eval(), load_tokenizer(chat_model_dir))


def _approx(got, want):
    assert got == pytest.approx(want, abs=1e-4)


# ---- end to end, both engine modes ----------------------------------------------------------------
def test_echo_with_max_tokens_0_scores_the_prompt(srv, ref):
    ids = ref.tok.encode(PROMPT)
    r = _client(srv).completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0)
    c = r.choices[0]
    assert c.text == PROMPT and c.finish_reason == "length"
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = c.logprobs
    assert "".join(lp.tokens) == PROMPT and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI: nothing before it
    _approx(lp.token_logprobs[1:], ref.prompt(ids))
    table = ref.logsoftmax(ids)
    for i, top in enumerate(lp.top_logprobs[1:]):  # logprobs=1: the most likely token at each position
        best = int(table[i].argmax())
        assert list(top) == [ref.tok.decode([best])]
        _approx(list(top.values()), [float(table[i, best])])
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(ids))]


def test_echo_of_token_id_prompts_as_lm_eval_sends_them(srv, ref):
    """lm-eval's request: token ids, echo, logprobs=1, max_tokens=1; the prompt's entries, then the one
    generated token's (which lm-eval drops)."""
    prompts = [ref.tok.encode(PROMPT), ref.tok.encode(CHAT + "Hello")]
    r = _client(srv).completions.create(model=MODEL, prompt=prompts, echo=True, logprobs=1, max_tokens=1,
                                        temperature=0)
    assert [c.index for c in r.choices] == [0, 1]
    for ids, c in zip(prompts, r.choices):
        lp = c.logprobs
        assert len(lp.tokens) == len(ids) + 1 and c.finish_reason == "length"
        assert c.text == ref.tok.decode(ids) + lp.tokens[-1]
        _approx(lp.token_logprobs[1:len(ids)], ref.prompt(ids))
        greedy = int(ref.logsoftmax(ids)[-1].argmax())  # temperature 0: the generated token is the argmax
        assert lp.tokens[-1] == ref.tok.decode([greedy])
        assert lp.token_logprobs[-1] == pytest.approx(max(lp.top_logprobs[-1].values()), abs=1e-6)
    one = _client(srv).completions.create(model=MODEL, prompt=prompts[0], echo=True, logprobs=1, max_tokens=0)
    assert one.choices[0].logprobs.token_logprobs == pytest.approx(r.choices[0].logprobs.token_logprobs[:-1])


def test_echo_without_logprobs_prepends_the_prompt(srv):
    client = _client(srv)
    plain = client.completions.create(model=MODEL, prompt=CHAT, max_tokens=12, temperature=0)
    echoed = client.completions.create(model=MODEL, prompt=CHAT, max_tokens=12, temperature=0, echo=True)
    assert echoed.choices[0].text == CHAT + plain.choices[0].text
    assert plain.choices[0].text.startswith("Once upon")
    assert echoed.choices[0].logprobs is None
    assert echoed.usage.completion_tokens == plain.usage.completion_tokens
    zero = client.completions.create(model=MODEL, prompt=CHAT, max_tokens=0, echo=True)
    assert zero.choices[0].text == CHAT and zero.choices[0].finish_reason == "length"


def test_streaming_echo_sends_the_prompt_first(srv, ref):
    client = _client(srv)
    kw = dict(model=MODEL, prompt=[CHAT, "Once"], echo=True, logprobs=2, max_tokens=6, temperature=0)
    full = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True))
    for i, want in enumerate(full.choices):
        mine = [c for ch in chunks for c in ch.choices if c.index == i]
        prompt = [CHAT, "Once"][i]
        assert mine[0].text.startswith(prompt)  # the first chunk carries the prompt (and its log-probs)
        assert len(mine[0].logprobs.tokens) > len(ref.tok.encode(prompt))
        assert "".join(c.text for c in mine) == want.text
        tokens = [t for c in mine for t in c.logprobs.tokens]
        lps = [v for c in mine for v in c.logprobs.token_logprobs]
        offsets = [o for c in mine for o in c.logprobs.text_offset]
        assert tokens == want.logprobs.tokens and offsets == want.logprobs.text_offset
        assert lps[0] is None and lps[1:] == pytest.approx(want.logprobs.token_logprobs[1:], abs=1e-5)
    zero = list(client.completions.create(model=MODEL, prompt=CHAT, echo=True, max_tokens=0, stream=True))
    assert "".join(c.text for ch in zero for c in ch.choices) == CHAT


def test_prompt_logprobs_on_both_routes_in_vllms_format(srv, ref):
    client = _client(srv)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "tell me a story"}],
                                          max_tokens=3, temperature=0, extra_body={"prompt_logprobs": 2})
    ids = ref.tok.encode(CHAT)  # the chat template's rendering of that message
    assert chat.usage.prompt_tokens == len(ids)
    plps = chat.model_extra["prompt_logprobs"]  # vLLM puts a chat request's on the response
    _check_vllm_format(plps, ids, 2, ref)
    comp = client.completions.create(model=MODEL, prompt=[PROMPT, "Once"], max_tokens=2, n=2, temperature=0,
                                     extra_body={"prompt_logprobs": 0})
    for c in comp.choices:  # on each choice; choice index = prompt x n + j
        _check_vllm_format(c.model_extra["prompt_logprobs"], ref.tok.encode([PROMPT, "Once"][c.index // 2]), 0, ref)
    plain = client.completions.create(model=MODEL, prompt="Once", max_tokens=1)
    assert "prompt_logprobs" not in plain.choices[0].model_extra  # only when asked for
    score = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0, extra_body={"prompt_logprobs": 1})
    assert score.choices[0].text == "" and score.choices[0].finish_reason == "length"
    _check_vllm_format(score.choices[0].model_extra["prompt_logprobs"], ref.tok.encode(PROMPT), 1, ref)


def _check_vllm_format(plps: list, ids: list[int], k: int, ref: Reference) -> None:
    """``[null, {"<id>": {"logprob", "rank", "decoded_token"}}, ...]``: the prompt token first, then the
    k most likely others with ranks 1..k (the prompt token's rank known when among them)."""
    table = ref.logsoftmax(ids)
    assert len(plps) == len(ids) and plps[0] is None
    for i, pos in enumerate(plps[1:]):
        order = table[i].argsort(descending=True).tolist()
        keys = [int(t) for t in pos]
        assert keys[0] == ids[i + 1]
        assert keys[1:] == [t for t in order[:k] if t != ids[i + 1]]
        for t, v in zip(keys, pos.values()):
            assert set(v) == {"logprob", "rank", "decoded_token"}
            assert v["decoded_token"] == ref.tok.decode([t])
            _approx(v["logprob"], float(table[i, t]))
            rank = order.index(t) + 1
            assert v["rank"] == (rank if rank <= k else None)  # outside the top k the engine does not rank it


def test_bad_values_are_400s_in_openais_format(server):
    cases = [
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": -1}, "prompt_logprobs", "greater than or equal to 0"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs", "less than or equal to 20"),
        ("/v1/chat/completions", {"prompt_logprobs": -2}, "prompt_logprobs", "greater than or equal to 0"),
        ("/v1/chat/completions", {"prompt_logprobs": 25}, "prompt_logprobs", "less than or equal to 20"),
        ("/v1/chat/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
        ("/v1/completions", {"prompt": "x", "prompt_logprobs": 0, "stream": True}, "prompt_logprobs", "stream"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "echo"),
        ("/v1/completions", {"prompt": "x", "max_tokens": -1, "echo": True}, "max_tokens",
         "greater than or equal to 0"),
        ("/v1/completions", {"prompt": "x", "echo": True, "logprobs": 21}, "logprobs", "less than or equal to 20"),
        ("/v1/chat/completions", {"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ("/v1/completions", {"prompt": "x" * 129, "max_tokens": 0, "echo": True}, "prompt", "context"),
    ]
    for path, extra, param, words in cases:
        body = {"model": MODEL, **extra}
        if "chat" in path:
            body["messages"] = [{"role": "user", "content": "hi"}]
        r = httpx.post(server.url + path, json=body, timeout=30)
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"] and err["type"] == "invalid_request_error", err
    # a prompt that fills the context exactly can still be scored
    full = httpx.post(server.url + "/v1/completions", timeout=30, json={
        "model": MODEL, "prompt": "x" * 128, "max_tokens": 0, "echo": True, "logprobs": 0}).json()
    assert len(full["choices"][0]["logprobs"]["tokens"]) == 128
    assert server.health()["errors"] == 0


# ---- lm-evaluation-harness's local-completions against the server ---------------------------------
def test_lm_eval_local_completions_loglikelihood_equals_the_model(server, ref, chat_model_dir, tmp_path, monkeypatch):
    """lm-eval's own client (``LocalCompletionsAPI``: token-id prompts, echo, logprobs=1, max_tokens=1,
    its ``parse_logprobs``) with the model folder's tokenizer in Hugging Face's format."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's [api] extra
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from kiln.tokenizer.folder import save_tokenizer_files

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    save_tokenizer_files(ref.tok, tmp_path)  # what a model folder Kiln writes carries
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=MODEL, tokenizer=str(tmp_path),
                             tokenizer_backend="huggingface", max_length=128, max_retries=1)
    pairs = [(CHAT, "Once upon a time"), ("<|user|>hi<|end|><|assistant|>", "Hello!")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, whole = ref.tok.encode(context), ref.tok.encode(context + continuation)
        want = ref.prompt(whole)[len(ctx) - 1:]  # the continuation's tokens given everything before
        assert ll == pytest.approx(sum(want), abs=1e-3)
        table = ref.logsoftmax(whole)
        argmax = [int(table[i - 1].argmax()) for i in range(len(ctx), len(whole))]
        assert greedy == (argmax == whole[len(ctx):])
    assert [greedy for _, greedy in got] == [False, True]  # the fixture model says "Once upon t time"


# ---- the wiring, with a stand-in engine -----------------------------------------------------------
@dataclass
class ScoringEngine(StubEngine):
    """Keeps the SamplingParams it gets; each request ends in one step with ``max_tokens`` 'a's and,
    when asked, made-up prompt log-probs: each prompt token -2.0 (token 'z': -inf), the top k ids
    'A', 'B', ... at -0.5, -1.0, ... (so every prompt token is outside the top k)."""

    seen: list = field(default_factory=list)

    def add_request(self, prompt_ids, params, request_id=None):
        self.seen.append(params)
        return super().add_request(prompt_ids, params, request_id)

    def step(self):
        outs = []
        for rid, (prompt, p, _) in self.live.items():
            plps = None
            if p.prompt_logprobs is not None:
                plps = [None] + [{t: float("-inf") if t == ord("z") else -2.0,
                                  **{65 + j: -0.5 * (j + 1) for j in range(p.prompt_logprobs)}} for t in prompt[1:]]
            gen = [97] * p.max_tokens
            lps = [{97: -0.25}] * len(gen) if p.logprobs is not None else None
            outs.append(RequestOutput(rid, prompt, gen, gen, "a" * len(gen), "a" * len(gen), lps, True, "length",
                                      len(prompt), len(gen), plps))
        self.live.clear()
        return outs


def test_which_requests_ask_the_engine_for_prompt_logprobs():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app
    from kiln.serve.config import ServeConfig
    from kiln.serve.worker import EngineWorker
    from kiln.tokenizer import Tokenizer

    engine = ScoringEngine()
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    state = ServerState(EngineWorker(engine), tok, ServeConfig(model_name="fake"), "fake", 64, 257)
    bodies = [  # (request fields, the engine's prompt_logprobs)
        ({"echo": True, "max_tokens": 2}, None),  # echo without logprobs: the text only
        ({"echo": True, "logprobs": 2, "max_tokens": 0}, 2),
        ({"logprobs": 3}, None),  # logprobs without echo: the generated tokens only
        ({"echo": True, "logprobs": 1, "prompt_logprobs": 4}, 4),  # the larger k
        ({"prompt_logprobs": 0, "max_tokens": 0}, 0),
    ]
    with TestClient(build_app(state)) as client:
        answers = [client.post("/v1/completions", json={"model": "fake", "prompt": "yz", **b}) for b, _ in bodies]
        chat = client.post("/v1/chat/completions", json={
            "model": "fake", "messages": [{"role": "user", "content": "z"}], "prompt_logprobs": 1, "max_tokens": 1})
    assert [p.prompt_logprobs for p in engine.seen[:len(bodies)]] == [k for _, k in bodies]
    assert [p.max_tokens for p in engine.seen[:len(bodies)]] == [2, 0, 16, 16, 0]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    a = [a.json()["choices"][0] for a in answers]
    assert a[0]["text"] == "yzaa" and a[0]["logprobs"] is None and "prompt_logprobs" not in a[0]
    assert a[1]["text"] == "yz" and a[1]["logprobs"] == {
        "tokens": ["y", "z"], "token_logprobs": [None, -9999.0], "top_logprobs": [None, {"A": -0.5, "B": -1.0}],
        "text_offset": [0, 1]}  # -inf is sent as -9999.0 (JSON has no infinity), as OpenAI and vLLM do
    assert a[3]["logprobs"]["top_logprobs"][1] == {"A": -0.5}  # cut to logprobs=1 of the engine's 4
    assert a[3]["prompt_logprobs"][1] == {
        "122": {"logprob": -9999.0, "rank": None, "decoded_token": "z"},
        **{str(65 + j): {"logprob": -0.5 * (j + 1), "rank": j + 1, "decoded_token": chr(65 + j)} for j in range(4)}}
    assert a[4]["text"] == "" and a[4]["prompt_logprobs"] == [None, {"122": {"logprob": -9999.0, "rank": None,
                                                                              "decoded_token": "z"}}]
    assert chat.status_code == 200 and engine.seen[-1].prompt_logprobs == 1
    body = chat.json()
    assert json.dumps(body)  # finite numbers only
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["prompt_logprobs"][0] is None


def test_the_engine_process_sends_prompt_logprobs_once_and_keeps_them():
    """``_slim`` puts them on a request's first output only; ``EngineClient`` gives them on each later
    output, as the engine does."""
    from kiln.serve.engine_process import _slim

    first = RequestOutput("r", [1, 2], [5], [5], "x", "x", None, False, None, 2, 1, [None, {2: -1.0}])
    later = RequestOutput("r", [1, 2], [5, 6], [6], "xy", "y", None, True, "stop", 2, 2, [None, {2: -1.0}])
    score = RequestOutput("s", [1, 2], [], [], "", "", None, True, "length", 2, 0, [None, {2: -1.0}])
    plps = 8  # the slim tuple's prompt log-probs field
    assert _slim(first)[plps] == [None, {2: -1.0}] and _slim(later)[plps] is None
    assert _slim(score)[plps] == [None, {2: -1.0}]
    plain = RequestOutput("p", [1, 2], [5], [5], "x", "x", None, False, None, 2, 1)
    assert _slim(plain)[plps] is None
