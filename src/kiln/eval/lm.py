"""What evaluation needs from a model and a tokenizer, and the one batched log-likelihood engine.

Evaluation never depends on a concrete model class. A *scoring model* is anything callable as
``model(idx)`` with ``idx`` a LongTensor (B, T) returning logits (B, T, V), carrying
``model.config.context_length`` (and ideally ``model.config.vocab_size``). A *tokenizer* has
``encode(str) -> list[int]`` and ``decode(list[int]) -> str``; ``eot_id`` and ``vocab_size`` are used
when present. Kiln's ``Transformer`` and ``Tokenizer`` satisfy both; tests use tiny hand-checkable
stand-ins.

``score_sequences`` is the engine under every log-likelihood metric: it takes *rows* (token lists),
sorts them by length so batches pad little, runs the model, and returns per-position log-probabilities
of the requested targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class TokenizerLike(Protocol):
    """The tokenizer surface evaluation uses (Kiln's ``Tokenizer`` satisfies it)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def context_length(model: Any) -> int:
    """The longest input (tokens) ``model`` accepts: ``model.config.context_length``."""
    cfg = getattr(model, "config", None) or getattr(getattr(model, "module", None), "config", None)  # DDP
    T = getattr(cfg, "context_length", None)
    if not isinstance(T, int) or T < 1:
        raise ValueError(
            f"{type(model).__name__} has no config.context_length; evaluation needs a model with "
            "model.config.context_length (a Kiln Transformer has one)"
        )
    return T


def model_device(model: Any) -> torch.device:
    """Device of the model's first parameter (CPU for parameter-free stand-ins)."""
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def check_vocab(model: Any, tokenizer: Any, max_padding: int = 1024) -> None:
    """Refuse a model whose vocabulary does not fit the tokenizer's.

    The model's ``config.vocab_size`` may exceed the tokenizer's (vocabularies are often padded to a
    multiple of 64 or 128 for speed), but by less than ``max_padding``; anything else means the model
    was trained with another tokenizer and every score would be meaningless.
    """
    tok_v = getattr(tokenizer, "vocab_size", None)
    mod_v = getattr(getattr(model, "config", None), "vocab_size", None)
    if tok_v is None or mod_v is None:
        return
    if mod_v < tok_v or mod_v - tok_v >= max_padding:
        raise ValueError(
            f"vocabulary mismatch: the model has vocab_size={mod_v} but the tokenizer has {tok_v} "
            "tokens; pass the tokenizer the model was trained with (--tokenizer DIR)"
        )


def uses_kv_cache(model: Any) -> bool:
    """Whether ``model`` is a Kiln ``Transformer`` (KV cache, per-layer attention kernels), which the
    batched decoder and the shared-context scorer need; a bare ``model(idx)`` stand-in is not."""
    return all(hasattr(model, a) for a in ("hidden_states", "lm_head", "layers", "config"))


def eot_id(tokenizer: Any) -> int | None:
    """The tokenizer's end-of-text id, or None."""
    return getattr(tokenizer, "eot_id", None)


@dataclass(frozen=True)
class Row:
    """One input sequence to score, at most the model's context length.

    ``queries`` are ``(position, token)`` pairs: the log-probability that ``token`` follows
    ``tokens[: position + 1]``. Several queries may share a position (four answer letters after one
    prompt cost one row).
    """

    tokens: tuple[int, ...]
    queries: tuple[tuple[int, int], ...]

    @staticmethod
    def next_tokens(tokens: Sequence[int], first: int = 0) -> "Row":
        """Input ``tokens[:-1]`` querying each next token from position ``first`` on."""
        t = tuple(tokens)
        return Row(t[:-1], tuple((p, t[p + 1]) for p in range(first, len(t) - 1)))


@torch.no_grad()
def score_rows(
    model: Any,
    rows: Sequence[Row],
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> list[tuple[list[float], list[bool]]]:
    """Log-probability (nats) of each query of each row, and whether its token was the argmax.

    Rows are sorted longest first and batched ``batch_size`` at a time, right-padded: the model is
    causal, so padding after a position never changes its logits. Returns, for each row in the
    original order, ``(logprobs, is_greedy)`` aligned with ``row.queries``.
    """
    T_max = context_length(model)
    dev = torch.device(device) if device is not None else model_device(model)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].tokens))
    out: list[tuple[list[float], list[bool]]] = [([], []) for _ in rows]
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        L = len(rows[chunk[0]].tokens)
        if L > T_max:
            raise ValueError(f"internal: a row of {L} tokens exceeds the context length {T_max}")
        idx = torch.zeros(len(chunk), L, dtype=torch.long)
        b_i, p_i, t_i = [], [], []
        for b, i in enumerate(chunk):
            r = rows[i]
            idx[b, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
            for p, t in r.queries:
                b_i.append(b)
                p_i.append(p)
                t_i.append(t)
        logits = model(idx.to(dev))  # (B, L, V)
        if isinstance(logits, tuple):
            logits = logits[0]
        bq = torch.tensor(b_i, dtype=torch.long, device=logits.device)
        pq = torch.tensor(p_i, dtype=torch.long, device=logits.device)
        tq = torch.tensor(t_i, dtype=torch.long, device=logits.device)
        sel = logits[bq, pq].float()  # (Q, V): only the queried positions, in float32
        logp = torch.log_softmax(sel, dim=-1)
        lp = logp.gather(-1, tq.unsqueeze(-1)).squeeze(-1).double().cpu().tolist()
        greedy = (sel.argmax(-1) == tq).cpu().tolist()
        k = 0
        for i in chunk:
            n = len(rows[i].queries)
            out[i] = (lp[k : k + n], greedy[k : k + n])
            k += n
    return out
