"""Chat format: role and turn-end special tokens, rendering to ids plus a loss mask, HF export.

A conversation renders as, for every message::

    <|role|> content <|end|>

with role one of ``system``, ``user``, ``assistant``; ``add_generation_prompt`` appends
``<|assistant|>`` so the model writes the reply, which it ends with ``<|end|>`` (the stop id). The
content is encoded as plain text (``encode_ordinary``): a user who types ``<|end|>`` gets ordinary
tokens, never a turn boundary. The loss mask is 1 on the assistant's content and on its closing
``<|end|>`` (so the model learns to stop), 0 on everything else (the role tokens included: they are
given by the template, not predicted by the model).

The same template, as Jinja, goes into Hugging Face's ``tokenizer_config.json`` (``chat_template``)
so ``transformers``' ``apply_chat_template`` gives the same ids (tested), with ``{% generation %}``
markers so ``return_assistant_tokens_mask=True`` gives the same mask.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.tokenizer.pretokenize import ENDOFTEXT
from kiln.tokenizer.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
END = "<|end|>"
ROLE_TOKENS = {r: f"<|{r}|>" for r in ROLES}
CHAT_TOKENS = (*ROLE_TOKENS.values(), END)
"""The special tokens a chat tokenizer carries, in the order ``add_chat_tokens`` adds them."""

Message = Mapping[str, str]

# Jinja for Hugging Face: the same strings as ChatTemplate.render (the assistant's content and its
# <|end|> inside {% generation %} so apply_chat_template(..., return_assistant_tokens_mask=True)
# gives ChatTemplate.render_with_mask's mask).
JINJA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|assistant|>' }}{% generation %}{{ message['content'] + '<|end|>' }}{% endgeneration %}"
    "{% else %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def add_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """A copy of ``tokenizer`` with the chat tokens added (ids after its largest; kept if present).

    The ordinary tokens and their ids do not change, so a model trained with ``tokenizer`` reads
    the new one's text the same way; only its embedding and head need rows for the new ids
    (``resize_token_embeddings``).
    """
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.__getitem__)
    specials += [t for t in CHAT_TOKENS if t not in tokenizer.special_tokens]
    vocab = {i: b for i, b in tokenizer.vocab.items() if i not in set(tokenizer.special_tokens.values())}
    for s, i in tokenizer.special_tokens.items():
        vocab[i] = s.encode("utf-8")
    backend = "auto" if tokenizer.backend == "native" else "python"
    return Tokenizer(vocab, tokenizer.merges, specials, pattern=tokenizer.pattern, backend=backend)


def _weights(model: nn.Module) -> tuple[nn.Parameter, nn.Parameter | None]:
    """(input embedding, output head or None when tied) of a Kiln Transformer or an HF causal LM."""
    if hasattr(model, "embed_tokens") and hasattr(model, "lm_head"):  # Kiln Transformer
        emb, head = model.embed_tokens.weight, model.lm_head.weight
    else:
        emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    return emb, None if head is emb else head


@torch.no_grad()
def resize_token_embeddings(model: nn.Module, vocab_size: int, new_ids: Sequence[int] = ()) -> nn.Module:
    """Grow a Kiln Transformer's embedding and head to ``vocab_size`` rows, in place; returns it.

    Rows past the old size and the rows ``new_ids`` (ids added inside an already padded vocab) are
    set to the mean of the other rows: a new token then starts as "an average token", whose logit
    is the average one, instead of a random vector that can dominate the softmax (Hewitt, "Initializing
    new word embeddings for pretrained language models", 2021). ``model.config.vocab_size`` follows.
    A smaller ``vocab_size`` than the model's is an error (ids would be lost).
    """
    import dataclasses

    emb, head = _weights(model)
    old = emb.shape[0]
    if vocab_size < old:
        raise ValueError(f"vocab_size={vocab_size} is below the model's {old}; shrinking would drop trained rows")
    fresh = sorted({i for i in new_ids if i < old} | set(range(old, vocab_size)))
    keep = torch.ones(vocab_size, dtype=torch.bool)
    keep[fresh] = False
    for mod_name, w in (("embed_tokens", emb), ("lm_head", head)):
        if w is None:
            continue
        grown = torch.empty(vocab_size, w.shape[1], device=w.device, dtype=w.dtype)
        grown[:old] = w
        if fresh:
            grown[fresh] = w[keep[:old]].float().mean(0).to(w.dtype)
        mod = getattr(model, mod_name)
        mod.weight = nn.Parameter(grown)
        if hasattr(mod, "num_embeddings"):
            mod.num_embeddings = vocab_size
        if hasattr(mod, "out_features"):
            mod.out_features = vocab_size
    if hasattr(model, "config") and dataclasses.is_dataclass(model.config):
        model.config = dataclasses.replace(model.config, vocab_size=vocab_size)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def prepare_chat_model(tokenizer: Tokenizer, model: nn.Module) -> tuple[Tokenizer, nn.Module]:
    """Add the chat tokens to ``tokenizer`` and the rows for them to ``model`` (``kiln sft`` start).

    Returns ``(tokenizer, model)`` unchanged when the tokenizer already has the chat tokens and the
    model covers them.
    """
    added = ChatTemplate.from_tokenizer(tokenizer) is None
    if added:
        tokenizer = add_chat_tokens(tokenizer)
    new_ids = [tokenizer.special_tokens[t] for t in CHAT_TOKENS]
    rows = _weights(model)[0].shape[0]
    if added or max(new_ids) >= rows:
        resize_token_embeddings(model, max(max(new_ids) + 1, rows), new_ids if added else ())
    return tokenizer, model


@dataclass(frozen=True)
class ChatTemplate:
    """Renders conversations with a tokenizer that carries ``CHAT_TOKENS``.

    Build with ``ChatTemplate.from_tokenizer(tok)`` (None when ``tok`` has no chat tokens: a base
    model, whose messages a server renders as plain text).
    """

    tokenizer: Any
    """A Kiln ``Tokenizer`` (or any object with ``encode_ordinary``/``special_tokens``)."""
    role_ids: Mapping[str, int]
    """Role name -> the id of its ``<|role|>`` token."""
    end_id: int
    """The id of ``<|end|>``, which closes every turn."""

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> ChatTemplate | None:
        """The template of ``tokenizer``, or None if it lacks any of ``CHAT_TOKENS``."""
        specials = getattr(tokenizer, "special_tokens", None) or {}
        if not all(t in specials for t in CHAT_TOKENS):
            return None
        return cls(tokenizer, {r: specials[t] for r, t in ROLE_TOKENS.items()}, specials[END])

    @property
    def stop_token_ids(self) -> list[int]:
        """End-of-turn ids that end a reply (``<|end|>``; also ``<|endoftext|>`` when present)."""
        out = [self.end_id]
        eot = getattr(self.tokenizer, "special_tokens", {}).get(ENDOFTEXT)
        if eot is not None and eot != self.end_id:
            out.append(eot)
        return out

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of ``messages``; with ``add_generation_prompt``, ``<|assistant|>`` at the end."""
        ids, _ = self.render_with_mask(messages, add_generation_prompt=add_generation_prompt)
        return ids

    def render_with_mask(
        self, messages: Sequence[Message], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[int]]:
        """(ids, mask): mask is 1 on each assistant turn's content and closing ``<|end|>``, else 0.

        Raises ValueError naming the message for an unknown role or a non-string content.
        """
        ids: list[int] = []
        mask: list[int] = []
        for k, m in enumerate(messages):
            role, content = _role_content(m, k)
            body = self.tokenizer.encode_ordinary(content) + [self.end_id]
            ids.append(self.role_ids[role])
            ids.extend(body)
            learn = 1 if role == "assistant" else 0
            mask.append(0)
            mask.extend([learn] * len(body))
        if add_generation_prompt:
            ids.append(self.role_ids["assistant"])
            mask.append(0)
        return ids, mask

    def render_text(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The rendered conversation as a string (the Jinja template's output)."""
        parts = []
        for k, m in enumerate(messages):
            role, content = _role_content(m, k)
            parts.append(f"{ROLE_TOKENS[role]}{content}{END}")
        if add_generation_prompt:
            parts.append(ROLE_TOKENS["assistant"])
        return "".join(parts)


def _role_content(m: Message, k: int) -> tuple[str, str]:
    if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
        raise ValueError(f"message {k} is not a {{'role', 'content'}} mapping: {str(m)[:80]!r}")
    role, content = m["role"], m["content"]
    if role not in ROLE_TOKENS:
        raise ValueError(f"message {k} has role {role!r}; use one of {list(ROLES)}")
    if not isinstance(content, str):
        raise ValueError(f"message {k} ({role}) content is {type(content).__name__}, not a string")
    return role, content


def hf_tokenizer_config(tokenizer: Tokenizer) -> dict[str, Any]:
    """The ``tokenizer_config.json`` dict for ``tokenizer`` (``kiln.tokenizer.folder``'s), with
    ``chat_template`` (and ``<|end|>`` as eos) when it has the chat tokens."""
    from kiln.tokenizer.folder import hf_tokenizer_config as folder_config

    has_chat = ChatTemplate.from_tokenizer(tokenizer) is not None
    return folder_config(tokenizer, JINJA_TEMPLATE if has_chat else None)[0]


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> Path:
    """Write the model-folder tokenizer files (Hugging Face's ``tokenizer.json``,
    ``tokenizer_config.json`` with ``chat_template``, ``special_tokens_map.json``, and Kiln's
    ``kiln_tokenizer.json``) into ``out_dir``.

    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` then loads it, and its
    ``apply_chat_template`` gives ``ChatTemplate.render``'s ids.
    """
    from kiln.tokenizer.folder import save_tokenizer_files

    has_chat = ChatTemplate.from_tokenizer(tokenizer) is not None
    return save_tokenizer_files(tokenizer, out_dir, chat_template=JINJA_TEMPLATE if has_chat else None)
