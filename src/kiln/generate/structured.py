"""Structured output: constrain a request's tokens to a JSON schema, any JSON object, a regular
expression, a fixed set of choices or a Lark grammar (vLLM's "structured outputs", OpenAI's
``response_format``).

Each constrained request gets a matcher from llguidance (the Rust grammar engine behind vLLM's and
SGLang's ``guidance`` backend; https://github.com/guidance-ai/llguidance), built over the engine's
tokenizer. Before each draw the matcher gives the set of tokens that keep the output inside the
language (a bitmask of V bits, computed from the token bytes, ~0.1-1 ms), the draw is made among them,
and the drawn token advances the matcher. When the language allows nothing more (the JSON object
closed, the choice complete) the request ends with finish_reason 'stop'. llguidance is an optional
dependency (``pip install 'kiln[serve]'``), imported at the first constrained request.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


JSON_DEFAULTS = {"whitespace_flexible": False}
"""JSON is written without whitespace between tokens ('{"a":1,"b":[2,3]}'): free whitespace lets a
weak model pad forever. A schema's ``"x-guidance"`` object overrides this (llguidance's JSON options,
e.g. ``{"whitespace_flexible": true}`` or ``{"item_separator": ", ", "key_separator": ": "}``)."""


@dataclass(frozen=True)
class StructuredOutput:
    """The language a request's output must belong to: exactly one of the fields (vLLM's
    ``StructuredOutputsParams``)."""

    json: str | None = None
    """A JSON schema (as text; a dict also works). The output is one JSON value it accepts."""
    json_object: bool = False
    """Any JSON object (OpenAI's ``response_format={"type": "json_object"}``)."""
    regex: str | None = None
    """A regular expression the whole output matches."""
    choice: tuple[str, ...] | None = None
    """The output is exactly one of these strings."""
    grammar: str | None = None
    """A context-free grammar in llguidance's Lark dialect (``start: ...``)."""

    def __post_init__(self) -> None:
        if isinstance(self.json, dict):
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(str(c) for c in self.choice))
            if not self.choice:
                raise ValueError("structured output choice=() is empty; give at least one string")
        given = [n for n in ("json", "regex", "choice", "grammar") if getattr(self, n) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured output takes exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")

    def source(self) -> str:
        """The llguidance grammar of this language (raises ValueError on a schema that is not JSON)."""
        llg = _llguidance()
        if self.json is not None or self.json_object:
            try:
                return llg.LLMatcher.grammar_from_json_schema(self.json or {"type": "object"}, defaults=JSON_DEFAULTS)
            except ValueError as e:
                raise ValueError(f"structured output json: not a JSON schema ({e})") from None
        if self.regex is not None:
            return llg.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llg.LLMatcher.grammar_from_regex("|".join(_regex_escape(c) for c in self.choice))
        return llg.LLMatcher.grammar_from_lark(self.grammar or "")


def _regex_escape(s: str) -> str:
    """``s`` as a literal in llguidance's regex syntax (Rust's regex crate)."""
    return "".join("\\" + ch if ch in r"\.+*?()|[]{}^$#&-~" else ch for ch in s)


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as e:
        raise ImportError("structured output needs llguidance: pip install llguidance "
                          "(or pip install 'kiln[serve]')") from e
    return llguidance


class Guide:
    """The engine's side of structured output: one llguidance tokenizer over the engine's tokenizer,
    a matcher per constrained request, and the masks of a step's rows."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos: int | None) -> None:
        """``tokenizer``: a Kiln ``Tokenizer``; ``vocab_size``: the ids the engine samples."""
        from kiln.tokenizer import Tokenizer
        from kiln.tokenizer.interop import to_hf_dict

        if not isinstance(tokenizer, Tokenizer):
            raise ValueError(f"structured output needs a Kiln Tokenizer (its token bytes); the engine has a "
                             f"{type(tokenizer).__name__}")
        llg = _llguidance()
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self.lltok = llg.LLTokenizer(json.dumps(to_hf_dict(tokenizer)), n_vocab=vocab_size, eos_token=eos)
        self._index: tuple[Tensor, Tensor] | None = None  # (V,) each token id's mask word and bit, on the device

    def matcher(self, spec: StructuredOutput) -> Any:
        """A fresh matcher for ``spec``; ValueError naming the problem when the grammar is bad."""
        m = _llguidance().LLMatcher(self.lltok, spec.source(), log_level=0)
        if m.is_error():
            raise ValueError(f"structured output: {m.get_error()}")
        return m

    def apply(self, logits: Tensor, matchers: list[Any], ends: list[tuple[int, ...]] | None = None) -> Tensor:
        """``logits`` (rows, V) with -inf at every token row i's matcher forbids (None: no constraint).
        ``ends``: row i's own stop token ids (a chat template's turn end), allowed besides end-of-text
        wherever its matcher could end (the language is complete there)."""
        if all(m is None for m in matchers):
            return logits
        from llguidance.numpy import fill_next_token_bitmask

        mask = np.full((len(matchers), self.words), -1, dtype=np.int32)  # (rows, W): all allowed
        bits = mask.view(np.uint32)
        for i, m in enumerate(matchers):
            if m is not None:
                fill_next_token_bitmask(m, mask, i)
                if ends and ends[i] and m.is_accepting():
                    for t in ends[i]:
                        if t < self.vocab_size:
                            bits[i, t // 32] |= np.uint32(1 << (t % 32))
        dev = logits.device
        if self._index is None or self._index[0].device != dev:
            ids = torch.arange(self.vocab_size, device=dev)
            self._index = ids // 32, (ids % 32).to(torch.int32)
        word, bit = self._index
        allowed = (torch.from_numpy(mask).to(dev)[:, word] >> bit) & 1  # (rows, V)
        return logits[:, :self.vocab_size].masked_fill(allowed == 0, float("-inf"))
