"""Helpers shared by the server tests (imported by name: pytest puts this folder on sys.path): stand-in
engines that keep to LLMEngine's contract, and an ``openai`` client for a ``kiln serve``."""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.generate import RequestOutput


@dataclass
class StubEngine:
    """LLMEngine's bookkeeping and nothing more: each request lives in ``live`` by id as
    ``(prompt ids, SamplingParams, ids generated so far)`` until ``step`` (a subclass's) finishes it."""

    live: dict = field(default_factory=dict)

    def add_request(self, prompt_ids, params, request_id=None):
        self.live[request_id] = (list(prompt_ids), params, [])
        return request_id

    def abort(self, rid):
        self.live.pop(rid, None)

    def has_unfinished(self):
        return bool(self.live)

    def stats(self):
        return {}

    def step(self):
        raise NotImplementedError


@dataclass
class OneAPerStep(StubEngine):
    """One token ('a', id 97) per step per request; finishes at max_tokens (finish reason 'length')."""

    def token_logprobs(self, generated: list[int]):
        """The log-probs an output carries (none here), given the ids generated so far."""
        return None

    def step(self):
        outs = []
        for rid, (prompt, params, gen) in list(self.live.items()):
            gen.append(97)
            done = len(gen) >= params.max_tokens
            outs.append(RequestOutput(rid, prompt, list(gen), [97], "a" * len(gen), "a", self.token_logprobs(gen),
                                      done, "length" if done else None, len(prompt), len(gen)))
            if done:
                del self.live[rid]
        return outs


def openai_client(server, timeout: float):
    """The official client on a server's /v1 (``server.url``), no retries."""
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
