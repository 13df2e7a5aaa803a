"""Multiple choice by continuation log-likelihood, the way small language models are benchmarked.

An item offers ``n`` (context, continuation) pairs and one gold index. Usually the context is shared
and the continuations differ (HellaSwag, ARC); for WinoGrande the contexts differ and the continuation
is shared ("partial scoring": only the words after the blank are scored). The model picks the pair
whose continuation is most likely under three rules, all reported:

- ``acc``: total log-likelihood of the continuation (nats), unnormalized;
- ``acc_len``: log-likelihood per continuation token;
- ``acc_norm``: log-likelihood per continuation byte (UTF-8), tokenizer-independent. Small models
  need normalization: long endings are otherwise penalized just for being long (Gao et al.,
  lm-evaluation-harness, "acc_norm"; here normalized by bytes rather than characters).

Language-modeling items (LAMBADA) have one pair; they are right when every continuation token is the
model's argmax (``greedy``).

Efficiency: each context is encoded once; requests sharing a context are served by the fewest rows
(a request ``ctx + cont`` only needs the logits at ``ctx + cont[:-1]``, so any row whose input starts
with that is enough: MMLU's four one-token letters cost one row); rows are sorted by length so batches
pad little. Over-long items are truncated from the left of the context and counted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln.eval.lm import Row, context_length, score_rows


@dataclass(frozen=True)
class MCItem:
    """One multiple-choice item: ``pairs[i] = (context, continuation)``; ``gold`` indexes the answer.

    ``kind`` is ``"mc"`` (pick the most likely pair) or ``"lm"`` (one pair, right when the
    continuation is the greedy decode). ``source`` says where the item came from (``file:line``).
    """

    pairs: tuple[tuple[str, str], ...]
    gold: int
    kind: str = "mc"
    source: str = ""

    @staticmethod
    def shared_context(context: str, continuations: Sequence[str], gold: int, source: str = "") -> MCItem:
        """The common case: one context and several continuations."""
        return MCItem(tuple((context, c) for c in continuations), gold, "mc", source)


@dataclass(frozen=True)
class ItemScore:
    """Per-item scores: log-likelihood (nats), token and byte counts of each continuation."""

    logprobs: tuple[float, ...]
    n_tokens: tuple[int, ...]
    n_bytes: tuple[int, ...]
    gold: int
    greedy: tuple[bool, ...]
    truncated: bool
    kind: str = "mc"

    def pred(self, mode: str) -> int:
        """Index picked under ``mode`` in {"acc", "acc_len", "acc_norm"} (first index wins ties)."""
        if mode == "acc":
            s = list(self.logprobs)
        elif mode == "acc_len":
            s = [lp / max(n, 1) for lp, n in zip(self.logprobs, self.n_tokens)]
        elif mode == "acc_norm":
            s = [lp / max(n, 1) for lp, n in zip(self.logprobs, self.n_bytes)]
        else:
            raise ValueError(f"unknown scoring mode {mode!r}; use acc, acc_len or acc_norm")
        return max(range(len(s)), key=lambda i: (s[i], -i))

    def correct(self, mode: str) -> bool:
        """Whether the item is right under ``mode`` (for "lm" items: all tokens greedy)."""
        if self.kind == "lm":
            return all(self.greedy)
        return self.pred(mode) == self.gold


@dataclass
class MCResult:
    """Accuracy of a task under each scoring mode, with its standard error and bookkeeping."""

    n: int
    acc: float
    acc_len: float
    acc_norm: float
    stderr: dict[str, float] = field(default_factory=dict)
    truncated: int = 0
    items: list[ItemScore] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (no per-item scores)."""
        return {
            "n": self.n, "acc": self.acc, "acc_len": self.acc_len, "acc_norm": self.acc_norm,
            "stderr": self.stderr, "truncated": self.truncated,
        }


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context to the front of the continuation.

    BPE tokenizers attach a space to the following word (" cat"), so "The" + " cat" tokenizes as the
    full string does; "The " + "cat" would not.
    """
    stripped = context.rstrip(" ")
    return stripped, context[len(stripped) :] + continuation


@dataclass(frozen=True)
class _Request:
    ctx: tuple[int, ...]
    cont: tuple[int, ...]
    truncated: bool


def encode_pairs(
    items: Sequence[MCItem], tokenizer: Any, max_len: int, bos: int | None = None
) -> list[list[_Request]]:
    """Tokenize every pair once (contexts cached) and truncate to ``max_len`` input tokens.

    A request's input is ``ctx + cont[:-1]``; when longer than ``max_len`` the context loses tokens on
    the left (then, if the continuation alone is too long, so does the continuation). A context that
    encodes to nothing gets ``bos`` (the end-of-text id) so its first token has a predecessor.
    """
    cache: dict[str, tuple[int, ...]] = {}

    def enc(s: str) -> tuple[int, ...]:
        if s not in cache:
            cache[s] = tuple(tokenizer.encode(s))
        return cache[s]

    out = []
    for item in items:
        reqs = []
        for ctx_s, cont_s in item.pairs:
            ctx_s, cont_s = split_whitespace(ctx_s, cont_s)
            ctx, cont = enc(ctx_s), tuple(tokenizer.encode(cont_s))
            if not ctx:
                if bos is None:
                    raise ValueError(f"{item.source or 'item'}: empty context and the tokenizer has no eot_id")
                ctx = (bos,)
            if not cont:
                raise ValueError(f"{item.source or 'item'}: continuation {cont_s!r} encodes to no tokens")
            over = len(ctx) + len(cont) - 1 - max_len
            truncated = over > 0
            if truncated:
                full = ctx + cont
                full = full[len(full) - (max_len + 1) :]
                n_ctx = max(1, len(full) - len(cont))
                ctx, cont = full[:n_ctx], full[n_ctx:]
            reqs.append(_Request(ctx, cont, truncated))
        out.append(reqs)
    return out


def plan_rows(requests: Sequence[_Request]) -> tuple[list[tuple[int, ...]], list[tuple[int, int]]]:
    """Fewest input rows serving requests that share one context: ``rows`` and, per request, (row, start).

    Request ``ctx + cont`` needs the logits at the positions of ``ctx + cont[:-1]``; a row whose input
    begins with that sequence serves it, reading ``cont`` from position ``len(ctx) - 1`` on. With the
    context shared, only the (short) continuation prefixes need comparing.
    """
    ctx = requests[0].ctx
    if any(r.ctx != ctx for r in requests):
        raise ValueError("internal: plan_rows needs requests with one shared context")
    need = [r.cont[:-1] for r in requests]
    rows: list[tuple[int, ...]] = []
    index: dict[tuple[int, ...], int] = {}  # every prefix of every row's continuation part -> row id
    where: list[tuple[int, int]] = [(-1, 0)] * len(requests)
    for i in sorted(range(len(requests)), key=lambda i: -len(need[i])):
        r = index.get(need[i])
        if r is None:
            r = len(rows)
            rows.append(ctx + need[i])
            for k in range(len(need[i]) + 1):
                index.setdefault(need[i][:k], r)
        where[i] = (r, len(ctx) - 1)
    return rows, where


def score_items(
    model: Any,
    tokenizer: Any,
    items: Sequence[MCItem],
    batch_size: int = 16,
    device: Any = None,
) -> MCResult:
    """Score ``items`` with ``model``; returns accuracy under each mode (see the module docstring)."""
    if not items:
        raise ValueError("no items to score")
    T = context_length(model)
    encoded = encode_pairs(items, tokenizer, T, bos=getattr(tokenizer, "eot_id", None))
    flat = [r for reqs in encoded for r in reqs]
    # group requests by context (the pairs of one item usually share it); rows of all groups are
    # then batched together, sorted by length
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    for j, r in enumerate(flat):
        by_ctx.setdefault(r.ctx, []).append(j)
    rows: list[tuple[int, ...]] = []
    where: list[tuple[int, int]] = [(-1, 0)] * len(flat)
    for ids in by_ctx.values():
        g_rows, g_where = plan_rows([flat[j] for j in ids])
        for j, (r, s) in zip(ids, g_where):
            where[j] = (len(rows) + r, s)
        rows.extend(g_rows)
    # each request asks for its continuation tokens at consecutive positions of its row; a query
    # shared by several requests (same row, position and token) is computed once
    users = [0] * len(rows)
    for ri, _ in where:
        users[ri] += 1
    queries: list[dict[tuple[int, int], int]] = [{} for _ in rows]
    req_q: list[range | list[int]] = []
    for j, r in enumerate(flat):
        ri, s = where[j]
        qd = queries[ri]
        if users[ri] == 1:  # the common case: a row of its own, queries in order
            qd.update(((s + i, t), i) for i, t in enumerate(r.cont))
            req_q.append(range(len(r.cont)))
        else:
            req_q.append([qd.setdefault((s + i, t), len(qd)) for i, t in enumerate(r.cont)])
    scored = score_rows(model, [Row(row, tuple(q)) for row, q in zip(rows, queries)],
                        batch_size=batch_size, device=device)
    scores: list[ItemScore] = []
    k = 0
    for item, reqs in zip(items, encoded):
        lps, ntok, nby, greedy = [], [], [], []
        for (ctx_s, cont_s), r in zip(item.pairs, reqs):
            lp_row, gr_row = scored[where[k][0]]
            q = req_q[k]
            k += 1
            lps.append(math.fsum(lp_row[x] for x in q))
            ntok.append(len(r.cont))
            nby.append(len(split_whitespace(ctx_s, cont_s)[1].encode("utf-8")))
            greedy.extend(gr_row[x] for x in q)
        scores.append(ItemScore(tuple(lps), tuple(ntok), tuple(nby), item.gold, tuple(greedy),
                                any(r.truncated for r in reqs), item.kind))
    return summarize(scores)


def summarize(scores: Sequence[ItemScore]) -> MCResult:
    """Accuracy per mode with the binomial standard error sqrt(p(1-p)/(n-1))."""
    n = len(scores)
    accs = {m: sum(s.correct(m) for s in scores) / n for m in ("acc", "acc_len", "acc_norm")}
    stderr = {m: math.sqrt(p * (1 - p) / max(n - 1, 1)) for m, p in accs.items()}
    return MCResult(n, accs["acc"], accs["acc_len"], accs["acc_norm"], stderr,
                    sum(s.truncated for s in scores), list(scores))
