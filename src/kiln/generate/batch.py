"""Batched decoding: many prompts of different lengths decoded together through one KV cache.

Rows are left-padded to a common length, so every row's next token lands in the same cache slot and
one forward pass serves the whole batch. Two things keep each row's numbers what they are alone:

- a per-row key mask hides padded slots from attention (``PaddedAttention``, put in place of the
  model's attention kernel while decoding; a padded query attends only to its own slot, so no
  softmax row is empty and no NaN reaches the cache);
- per-row RoPE positions count from each row's first real token (``slot - pad``).

Rows that finish (end-of-text, a stop condition, their token budget) leave the batch: their cache
rows are dropped, and slots that are padding in every remaining row are trimmed. Prompts are sorted by
length and cut into batches of ``batch_size``, so batches pad little. When the cache reaches the
context length, the remaining rows are re-encoded from their last 3/4 of the context (the sliding
window of ``engine.generate_tokens``).

One ``torch.Generator`` draws every sample in row order, so a seed reproduces the output for the same
prompts, batch size and device (a row's draw depends on which rows share its batch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.generate.engine import prompt_ids, tokenizer_vocab_limit, window_keep
from kiln.generate.sampling import check_sampling_args, sample_next
from kiln.model.attention import causal_mask
from kiln.model.kv_cache import KVCache
from kiln.model.layers import scaled_dot_product_attention


class PaddedAttention:
    """Causal grouped-query attention that also hides padded cache slots (an ``AttentionFn``).

    ``key_valid``: bool (B, S_max), True where a cache slot holds a real token; the caller keeps it
    in step with the cache. ``fused`` uses torch's ``F.scaled_dot_product_attention`` (GPU speed)
    instead of Kiln's from-scratch ``scaled_dot_product_attention`` (the reference).
    """

    def __init__(self, fused: bool = False) -> None:
        self.fused = fused
        self._valid: Tensor | None = None
        self._mask: tuple[tuple[int, int, int], Tensor] | None = None  # built once per forward pass

    @property
    def key_valid(self) -> Tensor | None:
        return self._valid

    @key_valid.setter
    def key_valid(self, valid: Tensor) -> None:
        self._valid = valid
        self._mask = None

    def mark_valid(self, slot: int) -> None:
        """Slot ``slot`` of every row now holds a real token (the decode step's new token)."""
        assert self._valid is not None
        self._valid[:, slot] = True
        self._mask = None

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
        """q: (B, H, T, D); k, v: (B, Hkv, S, D); query i sits at slot q_offset + i -> (B, H, T, D)."""
        B, H, T, D = q.shape
        Hkv, S = k.shape[1], k.shape[2]
        assert self._valid is not None and self._valid.shape[0] == B, "key_valid out of step"
        key = (q_offset, T, S)
        if self._mask is None or self._mask[0] != key:  # every layer of one forward pass shares it
            valid = self._valid[:, :S]  # (B, S)
            q_slot = q_offset + torch.arange(T, device=q.device)  # (T,)
            own = torch.arange(S, device=q.device)[None, :] == q_slot[:, None]  # (T, S)
            causal = causal_mask(T, S, q_offset, device=q.device)  # (T, S)
            self._mask = (key, (causal & (valid[:, None, :] | own))[:, None])  # (B, 1, T, S)
        mask = self._mask[1]
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != Hkv)
        G = H // Hkv
        if G > 1:  # fold the G query heads of one key/value head into the query axis (as kiln_attention)
            q = q.reshape(B, Hkv, G * T, D)
            mask = mask.repeat(1, 1, G, 1)  # (B, 1, G*T, S)
        return scaled_dot_product_attention(q, k, v, mask).reshape(B, H, T, D)


@contextmanager
def padded_attention(model: Any) -> Iterator[PaddedAttention]:
    """Run every attention layer of ``model`` (a Kiln ``Transformer``) through one ``PaddedAttention``.

    The layers' own kernels are put back on exit. Fused (torch SDPA) when the model used ``sdpa`` or
    ``triton``, Kiln's reference otherwise.
    """
    attns = [layer.self_attn for layer in model.layers]
    saved = [a.attention_impl for a in attns]
    pa = PaddedAttention(fused=saved[0] in ("sdpa", "triton"))
    try:
        for a in attns:
            a.attention_impl = pa
        yield pa
    finally:
        for a, s in zip(attns, saved):
            a.attention_impl = s


def prefill_padded(
    model: Any, attn: PaddedAttention, rows: Sequence[Sequence[int]], capacity: int
) -> tuple[KVCache, Tensor, Tensor]:
    """Left-pad ``rows`` into a fresh cache of ``capacity`` slots and run them through ``model``.

    Returns ``(cache, pad (B,) long, hidden (B, L, d_model))``; ``attn.key_valid`` is set. Positions
    are per row, so ``capacity`` may exceed the context length as long as each row fits it.
    """
    cfg = model.config
    p = next(model.parameters())
    dev = p.device
    B, L = len(rows), max(len(r) for r in rows)
    if L > capacity:
        raise ValueError(f"internal: a row of {L} tokens exceeds the cache capacity {capacity}")
    idx = torch.zeros(B, L, dtype=torch.long)  # (B, L); id 0 in the padding is never attended to
    for b, r in enumerate(rows):
        if r:
            idx[b, L - len(r):] = torch.tensor(list(r), dtype=torch.long)
    pad = torch.tensor([L - len(r) for r in rows], dtype=torch.long, device=dev)  # (B,)
    cache = KVCache(cfg.n_layers, B, cfg.n_kv_heads, capacity, cfg.head_dim, device=dev, dtype=p.dtype)
    slots = torch.arange(L, device=dev)
    valid = torch.zeros(B, capacity, dtype=torch.bool, device=dev)  # (B, capacity)
    valid[:, :L] = slots[None, :] >= pad[:, None]
    attn.key_valid = valid
    pos = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, L): 0 at each row's first real token
    return cache, pad, model.hidden_states(idx.to(dev), pos, cache)


def _decode_chunk(
    model: Any,
    prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator,
    eot_id: int | None,
    vocab_limit: int,
    stop: Callable[[list[int]], bool] | None,
) -> list[list[int]]:
    """Decode one batch of prompts together; returns each row's new tokens (end-of-text excluded)."""
    ctx = model.config.context_length
    keep = window_keep(ctx)  # the same sliding window as one-at-a-time decoding
    ids = [list(p[-ctx:]) for p in prompts]
    new: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # prompt index of each cache row
    dev = next(model.parameters()).device
    with padded_attention(model) as attn:
        cap = min(ctx, max(map(len, ids)) + max_new_tokens)
        cache, pad, h = prefill_padded(model, attn, ids, cap)
        logits = model.lm_head(h[:, -1]).float()  # (B, V)
        for _ in range(max_new_tokens):
            nxt = sample_next(logits[:, :vocab_limit], temperature, top_k, top_p, generator).tolist()
            stay: list[int] = []  # cache rows that go on
            for b, i in enumerate(active):
                t = nxt[b]
                if eot_id is not None and t == eot_id:
                    continue
                new[i].append(t)
                ids[i].append(t)
                if len(new[i]) < max_new_tokens and not (stop is not None and stop(new[i])):
                    stay.append(b)
            if not stay:
                break
            tokens = [nxt[b] for b in stay]
            if len(stay) < len(active):  # drop finished rows; trim slots now padding in every row
                sel = torch.tensor(stay, dtype=torch.long, device=dev)
                pad = pad[sel]
                trim = int(pad.min())
                old = attn.key_valid[sel]  # (B', cap)
                cache.select(sel, trim)
                pad = pad - trim
                valid = torch.zeros_like(old)
                valid[:, : cache.length] = old[:, trim : trim + cache.length]
                attn.key_valid = valid
                active = [active[b] for b in stay]
            if cache.length >= cache.max_seq_len:  # context full: re-encode the most recent tokens
                left = max_new_tokens - min(len(new[i]) for i in active)
                rows = [ids[i][-keep:] for i in active]
                cache, pad, h = prefill_padded(model, attn, rows, min(ctx, max(map(len, rows)) + left))
            else:
                attn.mark_valid(cache.length)
                pos = (cache.length - pad)[:, None]  # (B, 1)
                x = torch.tensor(tokens, dtype=torch.long, device=dev)[:, None]  # (B, 1)
                h = model.hidden_states(x, pos, cache)
            logits = model.lm_head(h[:, -1]).float()
    return new


def generate_batch(
    model: Any,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    vocab_limit: int | None = None,
    stop: Callable[[list[int]], bool] | None = None,
    batch_size: int = 32,
) -> list[list[int]]:
    """New token ids for each of ``prompts`` (token lists of any lengths), decoded ``batch_size`` at a time.

    Greedy when ``temperature == 0``; otherwise temperature, top-k, top-p as ``sample_next``. A row
    ends before ``eot_id``, after ``max_new_tokens`` tokens, or once ``stop(new_ids)`` is true (the
    token that made it true is kept). ``model`` is a Kiln ``Transformer``; it is in eval mode while
    decoding. Returned in the order of ``prompts``.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    V = model.config.vocab_size
    for n, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {n} is empty; give at least one token (e.g. the end-of-text id)")
        bad = [t for t in p if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt {n}: token id {bad[0]} is outside the model's vocabulary of {V}; "
                             "the tokenizer does not match this model")
    out: list[list[int]] = [[] for _ in prompts]
    if max_new_tokens == 0 or not prompts:
        return out
    device = next(model.parameters()).device
    generator = torch.Generator(device=device)
    if seed is not None:
        generator.manual_seed(seed)
    else:
        generator.seed()
    limit = V if vocab_limit is None else min(V, vocab_limit)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # longest first: little padding
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                chunk = order[s : s + batch_size]
                got = _decode_chunk(model, [list(prompts[i]) for i in chunk], max_new_tokens, temperature,
                                    top_k, top_p, generator, eot_id, limit, stop)
                for i, g in zip(chunk, got):
                    out[i] = g
    finally:
        model.train(was_training)
    return out


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first occurrence of any of ``stop`` (all of it when none occurs)."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def generate_texts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_at_eot: bool = True,
    batch_size: int = 32,
) -> list[str]:
    """Continuations of ``prompts`` (text), each cut before its first stop string; see ``generate_batch``.

    A row stops decoding as soon as its text contains a stop string. An empty prompt starts from the
    end-of-text token.
    """
    eot = getattr(tokenizer, "eot_id", None)
    tok_vocab = tokenizer_vocab_limit(model, tokenizer)
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    stops = [s for s in stop if s]
    check = None
    if stops:
        # A stop string must end in the newest token (else it was seen a step earlier); each token is
        # at least one byte and a character at most four, so the last 4*len+4 tokens hold it.
        window = 4 * max(map(len, stops)) + 4

        def check(new: list[int]) -> bool:
            tail = tokenizer.decode(new[-window:])
            return any(s in tail for s in stops)

    new = generate_batch(model, ids, max_new_tokens, temperature, top_k, top_p, seed,
                         eot if stop_at_eot else None,
                         tok_vocab, check, batch_size)
    return [cut_at_stop(tokenizer.decode(n), stops) for n in new]
