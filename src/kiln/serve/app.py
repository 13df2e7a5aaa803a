"""The OpenAI-compatible HTTP server: FastAPI routes over an ``EngineWorker``.

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
(engine and queue statistics, resident memory), ``GET /metrics`` (the same and request latencies, in
Prometheus' text format: ``kiln.serve.metrics``), ``GET /`` (the chat page), and vLLM's tokenizer
routes ``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info`` (what lm-eval's remote
tokenizer reads). Every error is answered in OpenAI's format with its status code (400 bad request,
401 bad key, 404 unknown model or route, 413 body too large, 429 queue full, 503 shutting down, 504
timed out, 500 engine failure).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from kiln.serve import metrics as prom
from kiln.serve.config import ServeConfig
from kiln.serve.prompts import ChatRenderer
from kiln.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    echo_logprobs,
    prompt_prob_entries,
    token_logprobs,
    usage,
    validation_message,
)
from kiln.serve.tools import ToolPlan, plan_tools, render_message
from kiln.serve.worker import Batch, End, EngineWorker, QueueFull, ShuttingDown, merge_outputs

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes need: the engine thread, the tokenizer, the model's limits."""

    worker: EngineWorker
    tokenizer: Any
    config: ServeConfig
    model_name: str
    context_length: int
    vocab_size: int
    renderer: ChatRenderer = field(init=False)
    tokenizer_config: dict = field(init=False)
    """What ``GET /tokenizer_info`` answers (made once)."""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self) -> None:
        self.renderer = ChatRenderer(self.tokenizer)
        self.tokenizer_config = tokenizer_config(self.tokenizer, self.renderer, self.context_length)


def tokenizer_config(tokenizer: Any, renderer: ChatRenderer, context_length: int) -> dict:
    """The tokenizer's ``tokenizer_config.json`` (its Hugging Face form: what vLLM's /tokenizer_info
    gives), with the chat template when the model has one and ``model_max_length`` = the context;
    ``bos_token`` / ``eos_token`` / ``pad_token`` always present (None when the tokenizer has none)."""
    config: dict = {"bos_token": None, "eos_token": None, "pad_token": None}
    if hasattr(tokenizer, "special_tokens"):  # a Kiln tokenizer
        from kiln.tokenizer.folder import hf_tokenizer_config

        template = None
        if renderer.kind == "template":
            from kiln.align.chat import JINJA_TEMPLATE

            # without transformers' {% generation %} marks (they only mask training labels; the text
            # is the same), so a client renders it with plain Jinja, as lm-eval's remote tokenizer does
            template = re.sub(r"\{%-? *(end)?generation *-?%\}", "", JINJA_TEMPLATE)
        config.update(hf_tokenizer_config(tokenizer, template)[0])
    return {**config, "model_max_length": context_length}


@dataclass
class _Plan:
    """One request turned into engine work: a prompt per sequence and its sampling parameters."""

    prompts: list[list[int]]  # one per distinct prompt
    params: list[Any]  # SamplingParams per sequence (len(prompts) * n)
    n: int
    logprobs: int | None
    prompt_logprobs: int | None = None
    """What the engine is asked for (``SamplingParams.prompt_logprobs``): the largest k wanted."""
    structured_param: str | None = None
    """The request field that asked for structured output (what an engine refusal of it names)."""


# ---------------------------------------------------------------------------------------------
# Request -> engine work
# ---------------------------------------------------------------------------------------------
def _sampling_params(state: ServerState, req: Any, prompt_len: int, stop: list[str], stop_ids: tuple,
                     logprobs: int | None, max_tokens: int | None, seed: int | None,
                     prompt_logprobs: int | None = None, structured: Any = None) -> Any:
    from kiln.generate import SamplingParams

    room = state.context_length - prompt_len
    if room < (0 if max_tokens == 0 else 1):  # max_tokens=0 scores a prompt that fills the context
        raise APIError(400, f"the prompt is {prompt_len} tokens; this model's context is "
                            f"{state.context_length} tokens, which leaves no room to generate. Shorten it",
                       param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(state.config.default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(400, f"max_tokens={max_tokens} plus the prompt's {prompt_len} tokens exceeds the "
                            f"context of {state.context_length} tokens; ask for at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_k=req.top_k,
                              top_p=None if req.top_p >= 1.0 else req.top_p, seed=seed, stop=tuple(stop),
                              stop_token_ids=tuple(stop_ids), ignore_eos=req.ignore_eos, logprobs=logprobs,
                              presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                              repetition_penalty=req.repetition_penalty, logit_bias=req.bias_pairs(),
                              min_p=req.min_p, min_tokens=req.min_tokens, prompt_logprobs=prompt_logprobs,
                              structured=structured)
    except ValueError as e:  # a combination pydantic cannot see, e.g. min_tokens over max_tokens
        raise APIError(400, str(e), param=param_of(str(e)))


_PARAMS = {"max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "logprobs", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "logit_bias", "min_p", "min_tokens"}


def param_of(message: str) -> str | None:
    """The request field a ``SamplingParams`` or ``add_request`` ValueError is about: the message's
    first word when it names one ('min_tokens=9 must be <= max_tokens=4' -> 'min_tokens',
    'logit_bias token id 999 is outside ...' -> 'logit_bias'), else None."""
    m = re.match(r"[a-z_]+", message)
    return m.group(0) if m and m.group(0) in _PARAMS else None


def _structured(req: Any) -> tuple[Any, str] | None:
    """The request's output constraint as (``StructuredOutput``, the field that asked for it), or None.
    The language is compiled and checked here (llguidance, without the vocabulary: well under a
    millisecond for a small schema), so a bad schema, regex or grammar is a 400 naming its field before
    any response starts, streaming or not; the engine compiles it again against the vocabulary."""
    asked = req.structured_request()
    if asked is None:
        return None
    return _compiled(*asked)


def _compiled(param: str, kwargs: dict[str, Any]) -> tuple[Any, str]:
    """``StructuredOutput(**kwargs)`` with its language compiled and checked; a 400 naming ``param``."""
    from kiln.generate import StructuredOutput

    try:
        spec = StructuredOutput(**kwargs)
        source = spec.source()  # a JSON schema, regex, choice or grammar as llguidance's grammar
        import llguidance

        problem = llguidance.LLMatcher.validate_grammar(source)
    except ValueError as e:
        raise APIError(400, f"{param}: {e}", param=param)
    except ImportError as e:
        raise APIError(500, f"{param}: {e}", type="server_error", code="missing_dependency")
    if problem:
        raise APIError(400, f"{param}: {problem.strip()}", param=param)
    return spec, param


async def _tool_reply(state: ServerState, request: Request, batch: Batch, plan: _Plan, tools: ToolPlan, req: Any,
                      head: dict, tt: _TokenText) -> Response:
    """A forced tool call's answer: each choice's reply read back as ``tool_calls`` (finish_reason
    "tool_calls"), or as text when ``max_tokens`` cut it. Streamed, the calls come whole in one delta
    after the role's (a call is only a call once its JSON is complete)."""
    choices = await _collect(state, request, batch, plan)
    out = []
    for i, c in enumerate(choices):
        calls = tools.calls(c.text) if c.finish_reason == "stop" else None
        message = ({"role": "assistant", "content": None, "tool_calls": calls} if calls
                   else {"role": "assistant", "content": c.text})
        out.append({"index": i, "message": message, "finish_reason": "tool_calls" if calls else c.finish_reason,
                    "logprobs": _chat_logprobs(tt, c.logprobs) if plan.logprobs is not None else None})
    if not req.stream:
        return JSONResponse({**head, "object": "chat.completion", "choices": out, "usage": _usage_of(plan, choices)})
    events = []
    for o in out:
        m, i = o["message"], o["index"]
        delta = ({"tool_calls": [{"index": k, **call} for k, call in enumerate(m["tool_calls"])]}
                 if m.get("tool_calls") else {"content": m["content"]})
        for d, finish in (({"role": "assistant", "content": None}, None), (delta, None), ({}, o["finish_reason"])):
            events.append(_sse({**head, "choices": [{"index": i, "delta": d, "logprobs": None,
                                                     "finish_reason": finish}]}))
    if _usage_options(req)[0]:
        events.append(_sse({**head, "choices": [], "usage": _usage_of(plan, choices)}))

    async def body() -> AsyncIterator[str]:
        yield "".join(events) + _DONE

    return _EventStream(body(), on_close=lambda: None)


def chat_stops(rendered: Any, req: Any) -> tuple[list[str], tuple[int, ...]]:
    """What ends a chat reply: the template's turn end (ids, or strings for a plain prompt) and the
    request's ``stop``. ``ignore_eos`` (vLLM's extension) drops the template's ends, as vLLM drops the
    generation config's end ids: the reply runs to ``max_tokens`` unless a ``stop`` string matches."""
    if req.ignore_eos:
        return req.stop_list(), ()
    return list(rendered.stop) + req.stop_list(), tuple(rendered.stop_token_ids)


async def _constraint(req: Any, tools: ToolPlan | None) -> tuple[Any, str | None]:
    """The reply's structured-output constraint (``StructuredOutput``, the field that asked for it), or
    (None, None): a response_format / structured_outputs / guided_* field, or a forced tool call's
    schema. Compiled in a worker thread (llguidance drops the GIL): a large schema takes up to a second
    (0.8 s for a 0.7 MB one), which the event loop must not spend while other replies stream."""
    if req.structured_request() is None and tools is None:
        return None, None
    return await asyncio.to_thread(_constraint_now, req, tools)


def _constraint_now(req: Any, tools: ToolPlan | None) -> tuple[Any, str | None]:
    structured, structured_param = _structured(req) or (None, None)
    if tools is not None:  # a forced tool call: the reply held to the call's JSON schema
        if structured is not None:
            raise APIError(400, f"tool_choice and {structured_param} both constrain the reply; give one",
                           param=structured_param)
        structured, structured_param = _compiled("tool_choice", {"json": tools.schema})
    return structured, structured_param


def _plan(state: ServerState, req: Any, prompts: list[list[int]], stop: list[str], stop_ids: tuple,
          logprobs: int | None, max_tokens: int | None, prompt_logprobs: int | None = None,
          constraint: tuple[Any, str | None] = (None, None)) -> _Plan:
    cfg = state.config
    if req.model != state.model_name:
        raise APIError(404, f"the model {req.model!r} does not exist; this server serves {state.model_name!r} "
                            "(GET /v1/models lists it)", param="model", code="model_not_found")
    if req.n > cfg.max_n:
        raise APIError(400, f"n={req.n} is over this server's limit of {cfg.max_n}", param="n")
    if len(stop) > cfg.max_stop:
        raise APIError(400, f"{len(stop)} stop strings given; at most {cfg.max_stop}", param="stop")
    bad = [t for t, _ in req.bias_pairs() if t >= state.vocab_size]
    if bad:
        raise APIError(400, f"logit_bias token id {bad[0]} is outside the vocabulary of {state.vocab_size}",
                       param="logit_bias")
    structured, structured_param = constraint
    params = []
    for ids in prompts:
        bad = [t for t in ids if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary of {state.vocab_size}",
                           param="prompt")
        for j in range(req.n):
            seed = None if req.seed is None else req.seed + j
            params.append(_sampling_params(state, req, len(ids), stop, stop_ids, logprobs, max_tokens, seed,
                                           prompt_logprobs, structured))
    return _Plan(prompts, params, req.n, logprobs, prompt_logprobs, structured_param)


def _check_prompt_logprobs(req: Any) -> None:
    if req.prompt_logprobs is not None and req.stream:
        raise APIError(400, "prompt_logprobs are not available with stream=true (as in vLLM); ask without "
                            "stream, or on /v1/completions use echo=true with logprobs, whose first chunk "
                            "carries the prompt's log-probs", param="prompt_logprobs")


def _completion_prompts(state: ServerState, req: CompletionRequest) -> tuple[list[list[int]], list[str]]:
    """The request's prompts as token ids, and their texts (what ``echo`` sends back: a string prompt
    as given, token ids decoded)."""
    p = req.prompt
    if isinstance(p, str):
        texts: list = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [list(p)]
    else:
        texts = list(p)
    if not texts:
        raise APIError(400, "prompt is an empty list; give a string or token ids", param="prompt")
    out, shown = [], []
    for t in texts:
        ids = state.tokenizer.encode(t) if isinstance(t, str) else list(t)
        if not ids:
            eot = getattr(state.tokenizer, "eot_id", None)
            if eot is None:
                raise APIError(400, "the prompt is empty and the tokenizer has no end-of-text token to start "
                                    "from; give some text", param="prompt")
            ids = [eot]
        out.append(ids)
        if req.echo:
            shown.append(t if isinstance(t, str) else state.tokenizer.decode(ids))
    return out, shown


def _submit(state: ServerState, plan: _Plan, stream: bool, arrival: float) -> Batch:
    seqs = [(plan.prompts[k // plan.n], p) for k, p in enumerate(plan.params)]
    try:
        return state.worker.submit(seqs, stream=stream, arrival=arrival)
    except QueueFull as e:
        raise APIError(429, str(e), type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
    except ShuttingDown as e:
        raise APIError(503, str(e), type="server_error", code="shutting_down")


def _end_error(end: End, plan: _Plan) -> APIError:
    if end.reason == "invalid":
        param = param_of(end.message)
        if param is None and end.message.startswith("structured output"):
            param = plan.structured_param
        return APIError(400, end.message, param=param)
    if end.reason == "timeout":
        return APIError(504, end.message, type="timeout_error", code="timeout")
    if end.reason == "shutdown":
        return APIError(503, end.message, type="server_error", code="shutting_down")
    if end.reason == "abort":
        return APIError(499, "the request was cancelled", type="server_error", code="cancelled")
    return APIError(500, f"generation failed: {end.message}", type="server_error", code="engine_error")


# ---------------------------------------------------------------------------------------------
# Engine outputs -> OpenAI responses
# ---------------------------------------------------------------------------------------------
class _TokenText:
    """A token's text and bytes, as OpenAI's logprobs show them."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        vocab = getattr(tokenizer, "vocab", None)
        self.vocab = vocab if isinstance(vocab, dict) else {}

    def bytes(self, tok: int) -> bytes:
        b = self.vocab.get(tok)
        if isinstance(b, (bytes, bytearray)):
            return bytes(b)
        return self.tokenizer.decode([tok]).encode("utf-8")

    def text(self, tok: int) -> str:
        return self.bytes(tok).decode("utf-8", errors="replace")


@dataclass
class _Choice:
    """What one sequence produced so far (the event loop's side)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    prompt_logprobs: list | None = None  # the engine's, when asked for


def _absorb(choice: _Choice, out: Any, logprobs: int | None) -> tuple[str, list]:
    """Fold one RequestOutput into ``choice``; returns (new text, new logprob entries)."""
    choice.text += out.new_text
    choice.token_ids.extend(out.new_token_ids)
    choice.completion_tokens = out.num_generated_tokens
    new_lp = token_logprobs(list(out.new_token_ids), out.logprobs, logprobs) if logprobs is not None else []
    choice.logprobs.extend(new_lp)
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    if out.finished:
        choice.finish_reason = "length" if out.finish_reason == "length" else "stop"
    return out.new_text, new_lp


def _new_logprobs(out: Any, logprobs: int | None) -> list:
    """The log-prob entries of ``out``'s new tokens (none when not asked for)."""
    return token_logprobs(list(out.new_token_ids), out.logprobs, logprobs) if logprobs is not None else []


def _chat_logprobs(tt: _TokenText, entries: list) -> dict:
    def item(tok: int, lp: float) -> dict:
        return {"token": tt.text(tok), "logprob": lp, "bytes": list(tt.bytes(tok))}

    return {"content": [{**item(t, lp), "top_logprobs": [item(a, alp) for a, alp in alts]}
                        for t, lp, alts in entries]}


def _completion_logprobs(tt: _TokenText, entries: list, offset: int) -> dict:
    """OpenAI's completion ``logprobs``; an entry ``(id, None, None)`` (an echoed prompt's first token)
    has null ``token_logprobs`` and ``top_logprobs``."""
    tokens, lps, tops, offsets = [], [], [], []
    for t, lp, alts in entries:
        s = tt.text(t)
        tokens.append(s)
        lps.append(lp)
        tops.append(None if alts is None else {tt.text(a): alp for a, alp in alts})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _prompt_logprobs(tt: _TokenText, plan: _Plan, prompt: list[int], entries: list | None, k: int) -> list:
    """vLLM's ``prompt_logprobs``: ``[null, {"<token id>": {"logprob", "rank", "decoded_token"}, ...}, ...]``,
    each position's prompt token first, then the k most likely others (``prompt_prob_entries``)."""
    return [None if pos is None else
            {str(t): {"logprob": lp, "rank": rank, "decoded_token": tt.text(t)} for t, lp, rank in pos}
            for pos in prompt_prob_entries(prompt, entries, k, plan.prompt_logprobs)]


async def _until_disconnect(receive: Callable[[], Any], on_gone: Callable[[], None]) -> None:
    """Wait on the ASGI ``receive`` channel (the body is read already) until the client hangs up,
    then call ``on_gone``; a task per request that sleeps in one await, cancelled when the answer ends."""
    while (await receive())["type"] != "http.disconnect":
        pass
    on_gone()


async def _collect(state: ServerState, request: Request, batch: Batch, plan: _Plan) -> list[_Choice]:
    """Wait for every sequence of ``batch`` to finish (non-streaming: the worker hands over one merged
    output per sequence, so the loop wakes once per sequence, not per step); abort if the client goes."""
    choices = [_Choice() for _ in plan.params]
    watcher = asyncio.ensure_future(_until_disconnect(request.receive, lambda: state.worker.abort(batch)))
    try:
        while batch.open:
            for i, item in await batch.take_all():
                if isinstance(item, End):
                    batch.open.discard(i)
                    raise _end_error(item, plan)
                _absorb(choices[i], item, plan.logprobs)
                if item.finished:
                    batch.open.discard(i)
    finally:
        watcher.cancel()
        if batch.open:
            state.worker.abort(batch)
    return choices


def _usage_of(plan: _Plan, choices: list[_Choice]) -> dict:
    return usage(sum(len(p) for p in plan.prompts), sum(c.completion_tokens for c in choices))


class _EventStream(StreamingResponse):
    """Server-sent events written straight to the ASGI ``send`` (no task group per response, as
    Starlette's own streaming response makes); a disconnect watcher aborts the sequences, and so
    does any other end of the response."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        watcher = asyncio.ensure_future(_until_disconnect(receive, self._on_close))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                last = chunk.endswith(_DONE)  # the stream's end: one write with the body's terminator
                await send({"type": "http.response.body", "body": chunk.encode(), "more_body": not last})
                if last:
                    return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self._on_close()


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


_DONE = "data: [DONE]\n\n"
_SLOT = "\u0000kiln-text\u0000"
_USAGE_SLOT = "\u0000kiln-usage\u0000"


class _EventWriter:
    """Formats a chunk's event. The common case (text only, not finished) fills a per-choice template
    made once with ``chunk`` instead of serialising the whole chunk each time: the event loop shares
    the GIL with the engine thread, so each microsecond counts. ``usage_of(i)``: the running usage
    put in every chunk (``stream_options.continuous_usage_stats``), or None."""

    def __init__(self, chunk: Callable[..., dict], usage_of: Callable[[int], dict] | None) -> None:
        self.chunk = chunk
        self.usage_of = usage_of
        self.templates: dict[int, tuple[str, ...]] = {}

    def event(self, i: int, text: str, lps: list, finish: str | None) -> str:
        obj = self.chunk(i, text, lps, finish)
        if self.usage_of is not None:
            obj["usage"] = self.usage_of(i)
        return _sse(obj)

    def text_event(self, i: int, text: str) -> str:
        t = self.templates.get(i)
        if t is None:
            obj = self.chunk(i, _SLOT, [], None)
            if self.usage_of is not None:
                obj["usage"] = _USAGE_SLOT
            pre, _, post = _sse(obj).partition(json.dumps(_SLOT, ensure_ascii=False))
            t = self.templates[i] = (pre, *post.partition(json.dumps(_USAGE_SLOT))[::2])
        text = json.dumps(text, ensure_ascii=False)
        if self.usage_of is None:
            return t[0] + text + t[1]
        u = self.usage_of(i)
        return (f"{t[0]}{text}{t[1]}{{\"prompt_tokens\":{u['prompt_tokens']},\"completion_tokens\":"
                f"{u['completion_tokens']},\"total_tokens\":{u['total_tokens']}}}{t[2]}")


def _coalesce(items: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], End | None]:
    """The mailbox's items as one output per sequence (its consecutive outputs merged, in the order
    the sequences first appear), and the first ``End`` (after which nothing is read)."""
    groups: dict[int, list] = {}
    for i, item in items:
        if isinstance(item, End):
            return [(j, merge_outputs(g)) for j, g in groups.items()], item
        groups.setdefault(i, []).append(item)
    return [(j, merge_outputs(g)) for j, g in groups.items()], None


async def _stream(state: ServerState, batch: Batch, plan: _Plan, chunk: Callable[..., dict],
                  first: Callable[[int], dict] | None, include_usage: bool,
                  continuous_usage: bool = False,
                  echo: Callable[[int, list | None], tuple[str, list]] | None = None) -> AsyncIterator[str]:
    """SSE events: ``chunk(index, text, logprob entries, finish_reason)`` once per sequence per
    wake-up, carrying every token the engine gave it since the last one (a multi-step engine step
    gives several; a loop that fell behind merges several steps), never one event per token; a
    sequence whose new tokens complete no character (a partial UTF-8 byte) waits for the next.
    Everything queued is written in one send, so a lagging client or loop costs one send; the
    role-only first events go with the first text, and the last text, the usage chunk and
    ``[DONE]`` go together (each send is a syscall: a 128-token reply at 8 tokens a step takes 17
    writes, headers included, instead of 21). ``echo(index, its prompt_logprobs)``: the text and log-prob
    entries that go before a sequence's first output, in the same chunk (``echo`` on completions;
    the first output comes once the whole prompt is computed, so its prompt log-probs are there)."""
    counts = [0] * len(plan.params)
    prompt_tokens = sum(len(p) for p in plan.prompts)

    def usage_of(i: int) -> dict:
        done = sum(counts)
        return usage(prompt_tokens, done)

    writer = _EventWriter(chunk, usage_of if continuous_usage else None)
    parts = [] if first is None else [_sse(first(i)) for i in range(len(plan.params))]
    fresh = False  # parts holds a text event (not only the role-only first events)
    echoed: set[int] = set()
    try:
        while batch.open:
            outs, end = _coalesce(await batch.take_all())
            for i, out in outs:
                counts[i] = out.num_generated_tokens
                n = len(parts)
                head, head_lps = "", []
                if echo is not None and i not in echoed:
                    echoed.add(i)
                    head, head_lps = echo(i, out.prompt_logprobs)
                if out.finished:
                    batch.open.discard(i)
                    finish = "length" if out.finish_reason == "length" else "stop"
                    lps = _new_logprobs(out, plan.logprobs)
                    parts.append(writer.event(i, head + out.new_text, head_lps + lps, finish))
                elif plan.logprobs is not None:
                    if out.new_token_ids or head_lps:
                        parts.append(writer.event(i, head + out.new_text, head_lps + _new_logprobs(out, plan.logprobs),
                                                  None))
                elif out.new_text or head:
                    parts.append(writer.text_event(i, head + out.new_text))
                fresh = fresh or len(parts) > n
            if end is not None:
                state.worker.abort(batch)
                parts.append(_sse(_end_error(end, plan).body()))
                yield "".join(parts)
                return
            if fresh and batch.open:  # the last events wait for the tail: one write
                yield "".join(parts)
                parts, fresh = [], False
        if include_usage:
            parts.append(_sse({**chunk(0, "", [], None), "choices": [], "usage": usage_of(0)}))
        parts.append(_DONE)
        yield "".join(parts)
    finally:
        if batch.open:
            state.worker.abort(batch)


# ---------------------------------------------------------------------------------------------
# Routes
# ---------------------------------------------------------------------------------------------
async def _read_json(request: Request, model: type) -> Any:
    body = await request.body()
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e}); send a JSON object", code="invalid_json")
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        msg, param = validation_message(e)
        raise APIError(400, msg, param=param)


def _usage_options(req: Any) -> tuple[bool, bool]:
    """(a usage chunk at the end, the running usage in every chunk): ``stream_options``'
    ``include_usage`` and ``continuous_usage_stats`` (vLLM's extension; implies the first)."""
    o = req.stream_options
    if o is None:
        return False, False
    return o.include_usage or o.continuous_usage_stats, o.continuous_usage_stats


def _check_key(state: ServerState, request: Request) -> None:
    """401 unless the request carries ``Authorization: Bearer <--api-key>`` (when a key is set);
    compared in constant time. Called inline (a FastAPI dependency costs ~0.3 ms a request)."""
    api_key = state.config.api_key
    if api_key is None:
        return
    auth = request.headers.get("authorization", "")
    given = auth[7:] if auth[:7].lower() == "bearer " else ""
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise APIError(401, "missing or wrong API key; send 'Authorization: Bearer KEY'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


async def chat_completions(request: Request) -> Response:
    arrival = time.monotonic()  # where /metrics' latencies start: before the body is read and parsed
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    req: ChatCompletionRequest = await _read_json(request, ChatCompletionRequest)
    tools = plan_tools(req.tools, req.tool_choice)
    try:
        rendered = state.renderer.render([render_message(m) for m in req.messages])
    except ValueError as e:
        raise APIError(400, f"messages: {e}", param="messages")
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    _check_prompt_logprobs(req)
    stop, stop_ids = chat_stops(rendered, req)
    plan = _plan(state, req, [rendered.ids], stop, stop_ids, logprobs, req.max_completion_tokens or req.max_tokens,
                 req.prompt_logprobs, await _constraint(req, tools))
    batch = _submit(state, plan, req.stream and tools is None, arrival)  # a call is read back whole
    rid, created, tt = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), _TokenText(state.tokenizer)
    head = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name}

    if tools is not None:
        return await _tool_reply(state, request, batch, plan, tools, req, head, tt)
    if req.stream:
        def first(i: int) -> dict:
            return {**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]}

        def chunk(i: int, text: str, lps: list, finish: str | None) -> dict:
            delta = {"content": text}
            lp = _chat_logprobs(tt, lps) if plan.logprobs is not None and lps else None
            return {**head, "choices": [{"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}]}

        include, continuous = _usage_options(req)
        return _EventStream(_stream(state, batch, plan, chunk, first, include, continuous),
                            on_close=lambda: batch.open and state.worker.abort(batch))
    choices = await _collect(state, request, batch, plan)
    body = {
        "id": rid, "object": "chat.completion", "created": created, "model": state.model_name,
        "choices": [{"index": i, "message": {"role": "assistant", "content": c.text},
                     "logprobs": _chat_logprobs(tt, c.logprobs) if plan.logprobs is not None else None,
                     "finish_reason": c.finish_reason} for i, c in enumerate(choices)],
        "usage": _usage_of(plan, choices),
    }
    if req.prompt_logprobs is not None:  # one prompt: on the response, as vLLM puts it
        body["prompt_logprobs"] = _prompt_logprobs(tt, plan, rendered.ids, choices[0].prompt_logprobs,
                                                   req.prompt_logprobs)
    return JSONResponse(body)


async def completions(request: Request) -> Response:
    arrival = time.monotonic()
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    req: CompletionRequest = await _read_json(request, CompletionRequest)
    _check_prompt_logprobs(req)
    if req.max_tokens == 0 and not req.echo and req.prompt_logprobs is None:
        raise APIError(400, "max_tokens=0 generates nothing: it only scores the prompt, with echo=true (and "
                            "logprobs) or prompt_logprobs; ask for at least 1 token", param="max_tokens")
    prompts, echo_texts = _completion_prompts(state, req)
    # echo with logprobs shows the prompt tokens' log-probs: the engine computes them (the larger k wins)
    ks = [k for k in (req.logprobs if req.echo else None, req.prompt_logprobs) if k is not None]
    plan = _plan(state, req, prompts, req.stop_list(), (), req.logprobs, req.max_tokens, max(ks) if ks else None,
                 await _constraint(req, None))
    batch = _submit(state, plan, req.stream, arrival)
    rid, created, tt = f"cmpl-{uuid.uuid4().hex}", int(time.time()), _TokenText(state.tokenizer)
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}

    def echo(i: int, prompt_logprobs: list | None) -> tuple[str, list]:
        """Choice i's echoed prompt: its text, and with logprobs its tokens' entries."""
        p = i // plan.n
        if plan.logprobs is None:
            return echo_texts[p], []
        return echo_texts[p], echo_logprobs(plan.prompts[p], prompt_logprobs, plan.logprobs)

    if req.stream:
        offsets = [0] * len(plan.params)

        def chunk(i: int, text: str, lps: list, finish: str | None) -> dict:
            lp = None
            if plan.logprobs is not None:
                lp = _completion_logprobs(tt, lps, offsets[i])
                offsets[i] += sum(len(s) for s in lp["tokens"])
            return {**head, "choices": [{"index": i, "text": text, "logprobs": lp, "finish_reason": finish}]}

        include, continuous = _usage_options(req)
        return _EventStream(_stream(state, batch, plan, chunk, None, include, continuous,
                                    echo if req.echo else None),
                            on_close=lambda: batch.open and state.worker.abort(batch))
    choices = await _collect(state, request, batch, plan)
    out = []
    for i, c in enumerate(choices):
        text, entries = c.text, c.logprobs
        if req.echo:
            head_text, head_lps = echo(i, c.prompt_logprobs)
            text, entries = head_text + text, head_lps + entries
        item = {"index": i, "text": text,
                "logprobs": _completion_logprobs(tt, entries, 0) if plan.logprobs is not None else None,
                "finish_reason": c.finish_reason}
        if req.prompt_logprobs is not None:  # vLLM's extension, on each choice
            item["prompt_logprobs"] = _prompt_logprobs(tt, plan, plan.prompts[i // plan.n], c.prompt_logprobs,
                                                       req.prompt_logprobs)
        out.append(item)
    return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                         "choices": out, "usage": _usage_of(plan, choices)})


def _check_model(state: ServerState, model: str | None) -> None:
    """404 unless ``model`` is this server's (or not given: vLLM's tokenizer routes make it optional)."""
    if model is not None and model != state.model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {state.model_name!r}",
                       param="model", code="model_not_found")


async def tokenize(request: Request) -> Response:
    """vLLM's ``POST /tokenize``: ``{"prompt"}`` (encoded as /v1/completions encodes a string prompt) or
    ``{"messages"}`` (rendered as /v1/chat/completions renders them) -> ``{"count", "max_model_len",
    "tokens", "token_strs"}``. Text longer than the context is counted too (the client compares
    ``count`` with ``max_model_len``; lm-eval cuts its contexts itself); the body limit bounds it."""
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    req: TokenizeRequest = await _read_json(request, TokenizeRequest)
    _check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give exactly one of prompt (a string) or messages (a chat)",
                       param="messages" if req.messages is not None else "prompt")
    if req.prompt is not None:
        ids = state.tokenizer.encode(req.prompt)
    else:
        if not req.messages:
            raise APIError(400, "messages is empty; give at least one message", param="messages")
        if req.continue_final_message:
            raise APIError(400, "continue_final_message is not supported; leave it false",
                           param="continue_final_message")
        try:
            ids = state.renderer.render([{"role": m.role, "content": m.text()} for m in req.messages],
                                        add_generation_prompt=req.add_generation_prompt).ids
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages")
    tt = _TokenText(state.tokenizer)
    return JSONResponse({"count": len(ids), "max_model_len": state.context_length, "tokens": list(ids),
                         "token_strs": [tt.text(t) for t in ids] if req.return_token_strs else None})


async def detokenize(request: Request) -> Response:
    """vLLM's ``POST /detokenize``: ``{"tokens": [ids]}`` -> ``{"prompt": text}``."""
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    req: DetokenizeRequest = await _read_json(request, DetokenizeRequest)
    _check_model(state, req.model)
    bad = [t for t in req.tokens if not 0 <= t < state.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary of {state.vocab_size}", param="tokens")
    return JSONResponse({"prompt": state.tokenizer.decode(req.tokens)})


async def tokenizer_info(request: Request) -> Response:
    """vLLM's ``GET /tokenizer_info``: the tokenizer's Hugging Face configuration (``eos_token``,
    ``bos_token``, ``pad_token``, ``chat_template`` for a chat model, ``model_max_length`` = the
    context), as ``tokenizer_config.json`` of an exported model folder has it. lm-eval's remote
    tokenizer reads it (and looks for it to pick that tokenizer)."""
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    return JSONResponse(state.tokenizer_config)


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.kiln
    _check_key(state, request)
    return JSONResponse({"object": "list", "data": [
        {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "kiln",
         "max_model_len": state.context_length}]})


def resident_mib() -> float:
    """This process's resident memory in MiB (Linux /proc; elsewhere the peak from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def health(request: Request) -> Response:
    state: ServerState = request.app.state.kiln
    stats = state.worker.stats()
    return JSONResponse({"status": "draining" if stats["draining"] else "ok", "model": state.model_name,
                         "chat_format": state.renderer.kind, "context_length": state.context_length,
                         "rss_mib": round(resident_mib(), 1), **stats})


async def metrics(request: Request) -> Response:
    """Prometheus' text format (0.0.4): queue, KV-cache, step and token counters and request latency
    histograms, named as vLLM names them (``kiln:`` for ``vllm:``; ``kiln.serve.metrics``). Not behind
    the API key, as vLLM's is not: it shows counts and timings, never a prompt or a reply."""
    state: ServerState = request.app.state.kiln
    memory = {"server": prom.resident_bytes() or resident_mib() * 2**20}
    proc = getattr(state.worker.engine, "proc", None)  # the engine's own process (EngineClient)
    engine_rss = prom.resident_bytes(proc.pid) if proc is not None and proc.pid else None
    if engine_rss is not None:
        memory["engine"] = engine_rss
    text = prom.render(prom.families(state.model_name, state.worker.stats(), state.worker.requests.snapshot(),
                                     memory))
    return Response(text, media_type=prom.CONTENT_TYPE)


async def chat_page(request: Request) -> Response:
    page = resources.files("kiln.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'self'; style-src 'self' "
                                       "'unsafe-inline'; script-src 'self' 'unsafe-inline'"})


# ---------------------------------------------------------------------------------------------
# App
# ---------------------------------------------------------------------------------------------
class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body over ``max_bytes`` gets 413, by Content-Length or while it streams."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes)(scope, receive, send)
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise BodyTooLarge()
            return message

        await self.app(scope, limited, send)


def _too_large(max_bytes: int) -> Response:
    err = APIError(413, f"the request body is over this server's limit of {max_bytes} bytes (--max-body-bytes)",
                   code="body_too_large")
    return JSONResponse(err.body(), status_code=413)


def _error_response(err: APIError) -> Response:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


class HotRoutes:
    """ASGI in front of the FastAPI app: ``POST /v1/chat/completions`` and ``/v1/completions`` go
    straight to their handlers, skipping FastAPI's middleware, routing and dependency layers (about
    0.4 ms of Python per request on the development CPU: under a closed loop at c = 256 every
    replacement request waits for the event loop to parse the ones before it). Errors are answered
    as the app answers them; everything else (other routes, lifespan) goes to the app."""

    def __init__(self, app: FastAPI, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.routes = {"/v1/chat/completions": chat_completions, "/v1/completions": completions}
        self.state = app.state  # as FastAPI's, for callers that look

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = self.routes.get(scope.get("path")) if scope["type"] == "http" and scope["method"] == "POST" else None
        if handler is None:
            return await self.app(scope, receive, send)
        scope["app"] = self.app  # request.app.state.kiln
        try:
            response = await handler(Request(scope, receive))
        except APIError as e:
            response = _error_response(e)
        except BodyTooLarge:
            response = _too_large(self.max_body_bytes)
        except Exception as e:  # noqa: BLE001 - as the app's catch-all handler
            log.exception("unhandled error on %s", scope.get("path"))
            response = _error_response(APIError(500, f"internal error: {type(e).__name__}: {e}", type="server_error"))
        await response(scope, receive, send)


def build_app(state: ServerState) -> Any:
    """The ASGI app for ``state`` (``HotRoutes`` over FastAPI, behind the body limit); its lifespan
    starts the engine thread and drains it on exit."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.worker.start()
        # Everything loaded so far (torch, the model, FastAPI's tables) lives as long as the server:
        # move it out of the cyclic collector's sight (as vLLM does), so the collections that
        # per-request garbage triggers scan the young objects, not the whole heap.
        gc.collect()
        gc.freeze()
        yield
        # uvicorn has already waited up to --shutdown-grace for open requests; cancel what is left.
        await asyncio.to_thread(state.worker.drain, 1.0)

    app = FastAPI(title="Kiln", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.kiln = state
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    app.add_api_route("/v1/models", list_models, methods=["GET"])
    app.add_api_route("/tokenize", tokenize, methods=["POST"])
    app.add_api_route("/detokenize", detokenize, methods=["POST"])
    app.add_api_route("/tokenizer_info", tokenizer_info, methods=["GET"])
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"])
    app.add_api_route("/", chat_page, methods=["GET"])
    app.add_api_route("/favicon.ico", lambda: Response(status_code=204), methods=["GET"])

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _error_response(exc)

    @app.exception_handler(BodyTooLarge)
    async def _body_too_large(request: Request, exc: BodyTooLarge) -> Response:
        return _too_large(state.config.max_body_bytes)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        msg = {404: f"no route {request.url.path}; see /v1/chat/completions, /v1/completions, /v1/models, "
                    "/tokenize, /detokenize, /tokenizer_info",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return _error_response(APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error"))

    return BodyLimit(HotRoutes(app, state.config.max_body_bytes), state.config.max_body_bytes)
