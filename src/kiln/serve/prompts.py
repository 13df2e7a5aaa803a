"""Turning chat messages into prompt token ids: the model's chat template when its tokenizer has
chat tokens (``kiln.align.chat.ChatTemplate``), plain text for a base model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A base model has no chat tokens: the conversation is written as a transcript and the reply ends
# where the model starts the user's next turn.
PLAIN_ROLES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool", "developer": "System"}
PLAIN_STOP = ("\nUser:", "\nSystem:")


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the prompt ids and what ends the reply."""

    ids: list[int]
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()


class ChatRenderer:
    """Renders ``[{"role", "content"}, ...]`` for one tokenizer (the template is looked up once)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.template = load_chat_template(tokenizer)

    @property
    def kind(self) -> str:
        """'template' (the tokenizer has chat tokens) or 'plain' (a base model)."""
        return "plain" if self.template is None else "template"

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> ChatPrompt:
        """Prompt ids ending where the assistant's reply starts (``add_generation_prompt=False``: where
        the last message ends, as ``POST /tokenize`` may ask)."""
        if self.template is not None:
            # OpenAI's "developer" role is the system message of newer clients.
            messages = [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]
            # a bad message raises ValueError naming it
            ids = self.template.render(messages, add_generation_prompt=add_generation_prompt)
            return ChatPrompt(list(ids), (), tuple(self.template.stop_token_ids))
        return ChatPrompt(self.tokenizer.encode(render_plain(messages, add_generation_prompt)), PLAIN_STOP)


def load_chat_template(tokenizer: Any) -> Any | None:
    """``ChatTemplate.from_tokenizer(tokenizer)``, or None for a base model (or before kiln.align
    has its chat module)."""
    try:
        from kiln.align.chat import ChatTemplate
    except ImportError:
        return None
    return ChatTemplate.from_tokenizer(tokenizer)


def render_plain(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """A transcript ``'User: hi\\nAssistant:'`` for a base model; the last line asks for the reply
    (left out with ``add_generation_prompt=False``)."""
    lines = [f"{PLAIN_ROLES.get(m['role'], m['role'].title())}: {m['content']}" for m in messages]
    return "\n".join(lines) + ("\nAssistant:" if add_generation_prompt else "")
