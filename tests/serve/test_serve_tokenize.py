"""vLLM's tokenizer routes on ``kiln serve``: ``POST /tokenize`` (a prompt, or chat messages rendered
as a chat request renders them), ``POST /detokenize``, ``GET /tokenizer_info``; their errors in
OpenAI's format; and lm-evaluation-harness's ``local-completions`` taking its tokenizer from the server
(``tokenizer_backend=remote``, which it picks by itself when the server has these routes)."""

from __future__ import annotations

import pytest
import torch

httpx = pytest.importorskip("httpx")

MODEL = "kiln-chat-tiny"
CHAT = "<|user|>tell me a story<|end|><|assistant|>"


@pytest.fixture(scope="module")
def tok(chat_model_dir):
    from kiln.tokenizer import load_tokenizer

    return load_tokenizer(chat_model_dir)


def _post(server, path, body, **kw):
    return httpx.post(server.url + path, json=body, timeout=30, **kw)


def test_tokenize_a_prompt_and_detokenize_it_back(server, tok):
    text = CHAT + "Once upon a time, héllo"
    r = _post(server, "/tokenize", {"model": MODEL, "prompt": text})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"count": len(tok.encode(text)), "max_model_len": 128, "tokens": tok.encode(text),
                    "token_strs": None}
    assert body["tokens"][0] == tok.special_tokens["<|user|>"]  # special tokens in the text are their ids
    # as lm-eval sends it: no model, add_special_tokens false (Kiln adds none either way)
    bare = _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == body["tokens"]
    assert "".join(bare["token_strs"][1:7]) == "tell m" and bare["token_strs"][0] == "<|user|>"
    back = _post(server, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    assert _post(server, "/detokenize", {"tokens": []}).json() == {"prompt": ""}
    # the count is the completion route's prompt_tokens
    usage = _post(server, "/v1/completions", {"model": MODEL, "prompt": text, "max_tokens": 1}).json()["usage"]
    assert usage["prompt_tokens"] == body["count"]
    long = _post(server, "/tokenize", {"prompt": "x" * 300}).json()  # longer than the context: still counted
    assert long["count"] == 300 and long["max_model_len"] == 128


def test_tokenize_chat_messages_as_the_chat_route_renders_them(server, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    r = _post(server, "/tokenize", {"model": MODEL, "messages": messages}).json()
    chat = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert r["count"] == chat["usage"]["prompt_tokens"]
    assert r["tokens"] == tok.encode("<|system|>Be brief.<|end|><|user|>hi<|end|><|assistant|>")
    parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
    open_ = _post(server, "/tokenize", {"messages": parts, "add_generation_prompt": False}).json()
    assert open_["tokens"] == tok.encode("<|user|>hi<|end|>")


def test_tokenizer_info_is_the_tokenizers_hugging_face_config(server, tok):
    import jinja2

    info = httpx.get(server.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|end|>" and info["bos_token"] == "<|endoftext|>"  # a chat model ends at <|end|>
    assert info["model_max_length"] == 128 and info["tokenizer_class"] == "PreTrainedTokenizerFast"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "?"}]
    text = jinja2.Environment().from_string(info["chat_template"]).render(messages=messages, add_generation_prompt=True)
    assert text == "<|user|>hi<|end|><|assistant|>yo<|end|><|user|>?<|end|><|assistant|>"  # plain Jinja renders it


def test_bad_tokenizer_requests_are_openai_errors(server):
    cases = [
        ("/tokenize", {"model": MODEL}, 400, "prompt", "exactly one"),
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 400, "messages", "exactly one"),
        ("/tokenize", {"messages": []}, 400, "messages", "empty"),
        ("/tokenize", {"prompt": 5}, 400, "prompt", "string"),
        ("/tokenize", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role"),
        ("/tokenize", {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True}, 400,
         "continue_final_message", "not supported"),
        ("/tokenize", {"model": "gpt-9", "prompt": "a"}, 404, "model", "does not exist"),
        ("/detokenize", {"tokens": [1, 999]}, 400, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": [-1]}, 400, "tokens", "outside the vocabulary"),
        ("/detokenize", {"tokens": ["a"]}, 400, "tokens", "integer"),
        ("/detokenize", {}, 400, "tokens", "required"),
        ("/detokenize", {"model": "gpt-9", "tokens": [1]}, 404, "model", "does not exist"),
    ]
    for path, body, status, param, words in cases:
        r = _post(server, path, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], (body, err)
    bad = httpx.post(server.url + "/tokenize", content=b'{"prompt": ', timeout=30)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    huge = httpx.post(server.url + "/tokenize", timeout=30, json={"prompt": "x" * (2 << 20)})
    assert huge.status_code == 413 and "limit" in huge.json()["error"]["message"]  # the body limit of every route
    assert server.proc.poll() is None


def test_the_api_key_guards_the_tokenizer_routes():
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from kiln.serve.app import ServerState, build_app
    from kiln.serve.config import ServeConfig
    from kiln.serve.worker import EngineWorker
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    state = ServerState(EngineWorker(None), tok, ServeConfig(model_name="fake", api_key="secret-key-123"), "fake",
                        64, 257)
    client = TestClient(build_app(state))  # no lifespan: these routes never touch the engine
    for send in (lambda h: client.post("/tokenize", json={"prompt": "ab"}, headers=h),
                 lambda h: client.post("/detokenize", json={"tokens": [97]}, headers=h),
                 lambda h: client.get("/tokenizer_info", headers=h)):
        assert send({}).status_code == 401
        assert send({"Authorization": "Bearer secret-key-123"}).status_code == 200
    plain = client.post("/tokenize", headers={"Authorization": "Bearer secret-key-123"}, json={
        "messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}).json()
    assert plain["tokens"] == tok.encode("User: hi")  # a base model's transcript, without the reply's opening
    info = client.get("/tokenizer_info", headers={"Authorization": "Bearer secret-key-123"}).json()
    assert info["eos_token"] == "<|endoftext|>" and "chat_template" not in info and info["model_max_length"] == 64


# ---- lm-evaluation-harness with the server's tokenizer ------------------------------------------
def test_lm_eval_local_completions_takes_the_tokenizer_from_the_server(server, tok, chat_model_dir, monkeypatch):
    """No tokenizer given: lm-eval finds /tokenizer_info and /tokenize and uses them (``remote``); its
    log-likelihoods equal the model's own."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("tenacity")  # lm-eval's [api] extra
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from kiln.model import load_pretrained

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # nothing may come from the Hub
    lm = LocalCompletionsAPI(base_url=server.url + "/v1/completions", model=MODEL, max_length=128, max_retries=1)
    assert lm.tokenizer_backend == "remote"
    assert lm.eot_token_id == tok.special_tokens["<|end|>"] and lm.prefix_token_id == tok.eot_id
    model = load_pretrained(chat_model_dir).eval()
    pairs = [(CHAT, "Once upon a time"), ("<|user|>hi<|end|><|assistant|>", "Hello!")]
    got = lm.loglikelihood([Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)])
    for (context, continuation), (ll, greedy) in zip(pairs, got):
        ctx, whole = tok.encode(context), tok.encode(context + continuation)
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), dim=-1)  # (T, V)
        want = [float(lp[i - 1, whole[i]]) for i in range(len(ctx), len(whole))]
        assert ll == pytest.approx(sum(want), abs=1e-3)
        assert greedy == all(int(lp[i - 1].argmax()) == whole[i] for i in range(len(ctx), len(whole)))
    assert [greedy for _, greedy in got] == [False, True]
    rolling = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("Once upon a time",), 0)])
    ids = tok.encode("Once upon a time")
    with torch.no_grad():  # the first token is scored after the prefix token (end-of-text)
        lp = torch.log_softmax(model(torch.tensor([[tok.eot_id, *ids]]))[0].float(), dim=-1)
    assert rolling[0] == pytest.approx(sum(float(lp[i, t]) for i, t in enumerate(ids)), abs=1e-3)
