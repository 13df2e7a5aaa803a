"""The OpenAI wire format: request bodies (validated with pydantic), errors, and the pieces of
responses (logprobs, usage). Field meanings follow https://platform.openai.com/docs/api-reference.

Unknown fields are ignored (clients send many); fields Kiln cannot honour are refused by name.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
"""Most ``logit_bias`` entries a request may give: ``kiln.generate.sampling.MAX_LOGIT_BIAS`` (kept here
so that parsing a request imports no torch; a test checks the two agree)."""
_TOKEN_ID = re.compile(r"[0-9]{1,10}")


class APIError(Exception):
    """An error answered in OpenAI's format: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False
    """Extension (vLLM's): every chunk carries the running usage, so a client counts the tokens of a
    chunk that holds several (Kiln sends one chunk per sequence per engine step)."""


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema``: OpenAI's named schema (``name`` optional here)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None
    """Accepted and not needed: the output always matches the schema (every token is masked to it)."""


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``{"type": "text"}`` (no constraint), ``{"type": "json_object"}``
    (any JSON object) or ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs "json_schema": {"name": ..., "schema": {...}}')
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of ``json`` (a schema, object or text), ``regex``,
    ``choice``, ``grammar`` (Lark, llguidance's dialect) or ``json_object: true``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    json_: str | dict[str, Any] | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def kwargs(self) -> dict[str, Any]:
        """``StructuredOutput``'s keyword arguments (it checks that exactly one is given)."""
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(self, name) is not None:
                raise APIError(400, f"structured_outputs.{name} is not supported; JSON is written without "
                                    "whitespace (a schema's \"x-guidance\" object changes that)",
                               param="structured_outputs")
        given: dict[str, Any] = {"json": self.json_, "regex": self.regex, "grammar": self.grammar,
                                 "choice": None if self.choice is None else tuple(self.choice),
                                 "json_object": True if self.json_object else None}
        return {k: v for k, v in given.items() if v is not None}


_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


class _Sampling(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, description="extension (vLLM's): -1 or 0 means off")
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    """Token id (a string key, as JSON objects have) -> bias in [-100, 100] added to its logit."""
    repetition_penalty: float = Field(1.0, gt=0.0, description="extension (vLLM's): 1 is none")
    min_p: float = Field(0.0, ge=0.0, le=1.0, description="extension (vLLM's): 0 is none")
    min_tokens: int = Field(0, ge=0, description="extension (vLLM's): no end before this many tokens")
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    """Extension (vLLM's): each prompt token's log-prob given the ones before it, and the k most likely
    alternatives' (``prompt_prob_entries``); not with ``stream`` (as vLLM)."""
    response_format: ResponseFormat | None = None
    """OpenAI's: the reply is any JSON object or one a JSON schema accepts (structured output)."""
    structured_outputs: StructuredOutputs | None = None
    """Extension (vLLM's): a JSON schema, JSON object, regex, choice or grammar the output belongs to."""
    guided_json: str | dict[str, Any] | None = None
    """vLLM's older names for ``structured_outputs``' fields (still sent by many clients)."""
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if not v:
            return None
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"{len(v)} entries given; at most {MAX_LOGIT_BIAS}")
        for key, bias in v.items():
            if not _TOKEN_ID.fullmatch(key):
                raise ValueError(f"key {key!r} is not a token id; keys are token ids as strings, e.g. \"50256\"")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"the bias of token {key} is {bias}; biases must be in [-100, 100]")
        return v

    def structured_request(self) -> tuple[str, dict[str, Any]] | None:
        """The one output constraint asked for, as (its request field, ``StructuredOutput``'s keyword
        arguments), or None; a 400 naming both when two fields ask for one."""
        asked: list[tuple[str, dict[str, Any]]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_schema" and rf.json_schema is not None:
            asked.append(("response_format", {"json": rf.json_schema.schema_}))
        elif rf is not None and rf.type == "json_object":
            asked.append(("response_format", {"json_object": True}))
        if self.structured_outputs is not None:
            asked.append(("structured_outputs", self.structured_outputs.kwargs()))
        for name, key in _GUIDED:
            value = getattr(self, name)
            if value is not None:
                asked.append((name, {key: tuple(value) if key == "choice" else value}))
        if len(asked) > 1:
            raise APIError(400, f"{asked[0][0]} and {asked[1][0]} both constrain the output; give one of them",
                           param=asked[1][0])
        return asked[0] if asked else None

    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as SamplingParams takes it: (token id, bias) pairs."""
        return tuple((int(k), float(b)) for k, b in (self.logit_bias or {}).items())

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is None or v in (-1, 0):
            return None
        if v < 1:
            raise ValueError("top_k must be a positive integer, or -1/0 for no top-k filter")
        return v

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = ""
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant turn's calls (rendered as the JSON they were made of: ``kiln.serve.tools``)."""
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        for part in self.content:
            if part.type != "text":
                raise APIError(400, f"message content of type {part.type!r} is not supported; send text",
                               param="messages")
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[dict[str, Any]] | None = None
    """Functions a forced ``tool_choice`` calls ("required", or one by name; ``kiln.serve.tools``)."""
    tool_choice: str | dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    """The prompt's text before the completion's, and with ``logprobs`` its tokens' entries before the
    completion's (the first prompt token's log-prob null: nothing comes before it)."""
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions
    """0 only scores the prompt: allowed with ``echo`` or ``prompt_logprobs`` (OpenAI's legacy API took
    max_tokens=0 with echo, and lm-eval's log-likelihood requests are that), else a 400."""


class TokenizeRequest(BaseModel):
    """vLLM's ``POST /tokenize``: a ``prompt`` (encoded as /v1/completions encodes a string prompt) or
    chat ``messages`` (rendered as /v1/chat/completions renders them)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool | None = None
    """Accepted; Kiln's tokenizers add no special token to a prompt either way (no BOS)."""
    add_generation_prompt: bool = True
    """``messages`` only: end with the assistant's turn opening, as a chat request's prompt does."""
    continue_final_message: bool = False
    return_token_strs: bool = False
    """Also give each token's text (``token_strs``)."""


class DetokenizeRequest(BaseModel):
    """vLLM's ``POST /detokenize``: token ids -> text."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int]


def validation_message(err: Any) -> tuple[str, str | None]:
    """One readable line from a pydantic ValidationError: 'max_tokens: Input should be >= 1 (got -5)'."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int) or True)
    got = first.get("input")
    msg = first.get("msg", "invalid value")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    extra = f"; and {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    return f"{loc}: {msg}{shown}{extra}", (str(first["loc"][0]) if first.get("loc") else None)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


LOGPROB_FLOOR = -9999.0
"""What a log-prob of -inf is sent as (JSON has no infinity; OpenAI and vLLM send this)."""


def _finite(lp: float) -> float:
    return LOGPROB_FLOOR if lp < LOGPROB_FLOOR else lp


def token_logprobs(token_ids: list[int], entries: list[Any] | None,
                   k: int) -> list[tuple[int, float, list[tuple[int, float]]]]:
    """The engine's per-token log-probs as ``[(token_id, logprob, [(alt_id, logprob), ...k])]``.

    An engine entry is a dict ``{token_id: logprob}`` holding the sampled token and the k most
    likely ids (k + 1 entries when the sampled token is not among them); the alternatives are the
    k most likely, as OpenAI's ``top_logprobs`` are. An object or (logprob, top) pair also works.
    """
    out = []
    for tok, e in zip(token_ids, entries or []):
        if isinstance(e, dict):
            alts = sorted(((int(i), float(v)) for i, v in e.items()), key=lambda kv: -kv[1])[:k]
            lp = float(e.get(tok, float("nan")))
        elif hasattr(e, "logprob"):
            lp = float(e.logprob)
            alts = [(int(i), float(v)) for i, v in (getattr(e, "top", None) or [])][:k]
        elif isinstance(e, (tuple, list)) and len(e) == 2:
            lp, top = e
            lp = float(lp)
            alts = [(int(i), float(v)) for i, v in (top.items() if isinstance(top, dict) else top or [])][:k]
        else:
            lp, alts = float(e), []
        out.append((int(tok), _finite(lp), [(a, _finite(v)) for a, v in alts]))
    return out


def echo_logprobs(prompt_ids: list[int], entries: list[dict[int, float] | None] | None,
                  k: int) -> list[tuple[int, float | None, list[tuple[int, float]] | None]]:
    """The prompt's tokens as ``token_logprobs`` entries, for ``echo`` with ``logprobs``: the first
    ``(id, None, None)`` (OpenAI's null: nothing comes before it), then each from the engine's
    ``RequestOutput.prompt_logprobs`` (None, then ``{prompt id: logprob, alternatives...}``)."""
    if entries is None or len(entries) != len(prompt_ids):
        raise RuntimeError(f"the engine gave {'no' if entries is None else len(entries)} prompt log-probs for "
                           f"a prompt of {len(prompt_ids)} tokens")
    return [(prompt_ids[0], None, None), *token_logprobs(prompt_ids[1:], entries[1:], k)]


def prompt_prob_entries(prompt_ids: list[int], entries: list[dict[int, float] | None] | None, k: int,
                        k_engine: int) -> list[list[tuple[int, float, int | None]] | None]:
    """vLLM's ``prompt_logprobs`` before rendering: None for the first prompt token, then per token
    ``[(its id, logprob, rank), then the k most likely other ids (id, logprob, rank)]``, rank 1 the
    most likely (vLLM's ``Logprob.rank``). The engine was asked for the top ``k_engine`` >= k: its
    entry is ``{prompt id: lp, then the top k_engine ids}``, k_engine entries when the prompt token is
    among them, k_engine + 1 when not; then its rank is unknown (> k_engine) and given as None."""
    if entries is None or len(entries) != len(prompt_ids):
        raise RuntimeError(f"the engine gave {'no' if entries is None else len(entries)} prompt log-probs for "
                           f"a prompt of {len(prompt_ids)} tokens")
    out: list[list[tuple[int, float, int | None]] | None] = [None]
    for tok, e in zip(prompt_ids[1:], entries[1:]):
        lp = _finite(float(e[tok]))
        in_top = 0 < len(e) <= k_engine
        top = sorted(((int(i), float(v)) for i, v in e.items() if in_top or i != tok), key=lambda kv: -kv[1])
        rank = next((r for r, (i, _) in enumerate(top, 1) if i == tok), None)
        out.append([(tok, lp, rank)] + [(i, _finite(v), r) for r, (i, v) in enumerate(top[:k], 1) if i != tok])
    return out
