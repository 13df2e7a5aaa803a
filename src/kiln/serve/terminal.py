"""``kiln chat``: a terminal conversation with a model, in-process (no server), streamed as it decodes.

Commands typed at the prompt: ``/reset`` forgets the history, ``/system TEXT`` sets a system
message, ``/exit`` (or Ctrl-D) quits. Ctrl-C while a reply streams stops that reply and keeps the
part already shown in the history.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from kiln.serve.prompts import ChatRenderer

HELP = "type a message; /reset forgets the history, /system TEXT sets a system message, /exit quits"


@dataclass(frozen=True)
class ChatSettings:
    """Sampling for ``kiln chat``."""

    max_tokens: int = 256
    """Most tokens per reply (cut to what the context has room for)."""
    temperature: float = 0.7
    """Softmax temperature; 0 is greedy."""
    top_k: int | None = None
    """Sample among the k most likely tokens only."""
    top_p: float | None = 0.95
    """Nucleus sampling: the smallest set of tokens with this probability mass."""
    seed: int | None = None
    """Seed of the first reply (each next reply uses seed + turn); None: random."""
    repetition_penalty: float = 1.0
    """Every token of the conversation or the reply so far has its logit divided by this when
    positive, multiplied when negative (> 0; 1 = none; ``SamplingParams.repetition_penalty``)."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token already in the reply, in [-2, 2] (OpenAI's)."""
    frequency_penalty: float = 0.0
    """Times the token's count in the reply so far, subtracted from its logit, in [-2, 2] (OpenAI's)."""
    min_p: float = 0.0
    """Keep only tokens at least this fraction as likely as the most likely one, in [0, 1] (0 = none)."""
    min_tokens: int = 0
    """The end of a turn cannot come before this many tokens (at most max_tokens; cut, as max_tokens is,
    to what the context has room for)."""
    json_object: bool = False
    """Every reply is a JSON object (structured output; ``--json``)."""

    def __post_init__(self) -> None:
        """Check every value now (as ``SamplingParams`` will for each reply), naming the flag."""
        from kiln.generate import SamplingParams

        try:
            SamplingParams(max_tokens=self.max_tokens, temperature=self.temperature, top_k=self.top_k,
                           top_p=self.top_p, seed=self.seed, repetition_penalty=self.repetition_penalty,
                           presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                           min_p=self.min_p, min_tokens=self.min_tokens)
        except ValueError as e:
            name = str(e).split("=", 1)[0]
            raise ValueError(f"--{name.replace('_', '-')}: {e}") from None
        if self.json_object:
            from kiln.generate import StructuredOutput

            try:
                StructuredOutput(json_object=True).source()  # llguidance is there
            except ImportError as e:
                raise ValueError(f"--json: {e}") from None


def reply(engine: Any, renderer: ChatRenderer, messages: list[dict[str, str]], settings: ChatSettings,
          context_length: int, seed: int | None) -> Iterator[str]:
    """Stream the assistant's reply to ``messages`` as text pieces; aborts the request if the
    consumer stops early (the generator is closed)."""
    from kiln.generate import SamplingParams, StructuredOutput

    prompt = renderer.render(messages)
    room = context_length - len(prompt.ids)
    if room < 1:
        raise ValueError(f"the conversation is {len(prompt.ids)} tokens, the context {context_length}: /reset it")
    max_tokens = min(settings.max_tokens, room)
    params = SamplingParams(max_tokens=max_tokens, temperature=settings.temperature,
                            top_k=settings.top_k, top_p=settings.top_p, seed=seed, stop=prompt.stop,
                            stop_token_ids=prompt.stop_token_ids, repetition_penalty=settings.repetition_penalty,
                            presence_penalty=settings.presence_penalty, frequency_penalty=settings.frequency_penalty,
                            min_p=settings.min_p, min_tokens=min(settings.min_tokens, max_tokens),
                            structured=StructuredOutput(json_object=True) if settings.json_object else None)
    rid = engine.add_request(prompt.ids, params)
    done = False
    try:
        while not done:
            for out in engine.step():
                if out.request_id != rid:
                    continue
                if out.new_text:
                    yield out.new_text
                done = out.finished
    finally:
        if not done:
            engine.abort(rid)


def chat_loop(engine: Any, tokenizer: Any, context_length: int, settings: ChatSettings,
              read: Callable[[str], str] = input, out: TextIO = sys.stdout) -> list[dict[str, str]]:
    """Read messages until /exit or end of input; returns the conversation."""
    renderer = ChatRenderer(tokenizer)
    messages: list[dict[str, str]] = []
    print(f"[{renderer.kind} chat format; {HELP}]", file=out)
    turn = 0
    while True:
        try:
            line = read("you> ")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("[history cleared]", file=out)
            continue
        if text.startswith("/system"):
            messages = [m for m in messages if m["role"] != "system"]
            messages.insert(0, {"role": "system", "content": text[len("/system"):].strip()})
            continue
        messages.append({"role": "user", "content": line})
        seed = None if settings.seed is None else settings.seed + turn
        turn += 1
        out.write("model> ")
        parts: list[str] = []
        try:
            for piece in reply(engine, renderer, messages, settings, context_length, seed):
                parts.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            out.write(" [stopped]")
        except ValueError as e:
            messages.pop()
            print(f"\n[{e}]", file=out)
            continue
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(parts)})
    return messages
