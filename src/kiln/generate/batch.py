"""Many prompts at once: ``generate_batch`` and ``generate_texts`` run them through the engine
(``kiln.generate.LLMEngine``: paged KV cache, continuous batching), and the left-padded batch tools that
scoring (``kiln.eval.multiple_choice``) still uses to run many prompts through one dense ``KVCache``.

Left padding (``PaddedAttention``, ``prefill_padded``): rows are left-padded to a common length, a
per-row key mask hides padded slots from attention (a padded query attends only to its own slot, so no
softmax row is empty and no NaN reaches the cache), and per-row RoPE positions count from each row's
first real token (``slot - pad``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.generate.engine import one_shot_engine, prompt_ids, tokenizer_vocab_limit
from kiln.generate.sampling import SamplingParams, check_sampling_args
from kiln.model.attention import attention_swapped, causal_mask
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
    pa = PaddedAttention(fused=model.layers[0].self_attn.attention_impl in ("sdpa", "triton"))
    with attention_swapped(model, pa):
        yield pa


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
    """New token ids for each of ``prompts`` (token lists of any lengths), through the engine
    (``LLMEngine``) with up to ``batch_size`` sequences running at once.

    Greedy when ``temperature == 0``; otherwise temperature, top-k, top-p as ``sample_next``, prompt i
    drawing from its own generator seeded ``seed + i`` (so its text does not depend on the batch). A
    row ends before ``eot_id``, after ``max_new_tokens`` tokens, or once ``stop(new_ids)`` is true (the
    token that made it true is kept). ``model`` is a Kiln ``Transformer``. Returned in prompt order.
    """
    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    out: list[list[int]] = [[] for _ in prompts]
    engine = one_shot_engine(model, vocab_limit, eot_id, max_num_seqs=batch_size)
    base = int(torch.randint(0, 2**62, ())) if seed is None else seed
    rids = {}
    for n, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {n} is empty; give at least one token (e.g. the end-of-text id)")
        params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=base + n, ignore_eos=eot_id is None)
        try:
            rids[engine.add_request(list(p), params)] = n
        except ValueError as e:
            raise ValueError(f"prompt {n}: {e}") from None
    while engine.has_unfinished():
        for o in engine.step():
            new = out[rids[o.request_id]]
            for t in o.new_token_ids:
                if not (o.finish_reason == "stop" and t == eot_id):
                    new.append(t)
            if not o.finished and stop is not None and stop(new):
                engine.abort(o.request_id)
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
    **processing: Any,
) -> list[str]:
    """Continuations of ``prompts`` (text), each cut before its first stop string; see ``generate_batch``.

    A row stops decoding as soon as its text contains a stop string (the engine's stop strings). An
    empty prompt starts from the end-of-text token. ``processing``: more ``SamplingParams`` fields
    (penalties, logit bias, min-p, min-tokens).
    """
    check_sampling_args(temperature, top_k, top_p)
    eot = getattr(tokenizer, "eot_id", None)
    engine = one_shot_engine(model, tokenizer_vocab_limit(model, tokenizer), eot, max(1, batch_size), tokenizer)
    base = int(torch.randint(0, 2**62, ())) if seed is None else seed
    reqs = [engine.add_request(prompt_ids(tokenizer, p),
                               SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                              top_p=top_p, seed=base + n, stop=tuple(stop),
                                              ignore_eos=not stop_at_eot, **processing))
            for n, p in enumerate(prompts)]
    texts = {r: "" for r in reqs}
    while engine.has_unfinished():
        for o in engine.step():
            texts[o.request_id] = o.text
    return [texts[r] for r in reqs]
