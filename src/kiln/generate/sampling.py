"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling,
and ``SamplingParams``, one request's decoding settings for the engine."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def check_sampling_args(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError naming the bad sampling argument and its valid range."""
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be a positive integer or None (no top-k filter)")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1] or None (no nucleus filter)")


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus. logits: (..., V).

    Top-p keeps the smallest set of most likely tokens whose probability sums to at least top_p
    (Holtzman et al., arXiv:1904.09751); the most likely token is always kept.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (..., 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (..., V)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # probability of the better tokens
        drop_sorted = mass_before >= top_p  # the nucleus already holds top_p without this token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Pick the next token id from ``logits`` (..., V): returns long (...).

    temperature 0 is greedy (argmax; top-k/top-p are then moot). Otherwise the logits are divided by
    the temperature, filtered by top-k then top-p (the Hugging Face order), and one token is drawn
    with ``generator`` (on the logits' device) for reproducibility. Computed in fp32.
    """
    check_sampling_args(temperature, top_k, top_p)
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])  # (N, V)
    ids = torch.multinomial(flat, num_samples=1, generator=generator)  # (N, 1)
    return ids.reshape(probs.shape[:-1])


def sample_rows(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
                generators: list[torch.Generator]) -> Tensor:
    """One token per row of ``logits`` (N, V), row i drawn with ``generators[i]``: long (N,).

    The rows' distributions are filtered and normalized in one batched pass; each generator draws
    one uniform number (the only per-row work), and row i's token is the first whose cumulative
    probability exceeds it (inverse-CDF sampling: token k with probability p_k). A row's token
    depends on its logits and its generator only, never on the other rows, so a seeded request
    samples the same alone or in any batch. The engine draws a decode step's rows this way: one
    ``sample_next`` per row cost ~6 kernel launches per sequence per token, most of a 128-sequence
    GRPO rollout's decode step (docs/LOG.md, 2026-12-07).
    """
    check_sampling_args(temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sample_rows is for sampled rows (temperature > 0); greedy rows take argmax")
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)  # (N, V)
    cdf = torch.cumsum(probs, dim=-1)  # (N, V)
    u = torch.cat([torch.rand(1, device=logits.device, generator=g) for g in generators])  # (N,)
    ids = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1), right=True).squeeze(-1)  # first cdf > u
    return ids.clamp(max=logits.shape[-1] - 1)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded by the engine (``kiln.generate.LLMEngine``)."""

    max_tokens: int = 16
    """Most tokens to generate (the request ends with finish_reason 'length')."""
    temperature: float = 1.0
    """Softmax temperature; 0 is greedy (argmax)."""
    top_k: int | None = None
    """Sample among the k most likely tokens only (None: no top-k filter)."""
    top_p: float | None = None
    """Nucleus sampling: the smallest set of tokens holding this probability (None: no filter)."""
    seed: int | None = None
    """Seeds this request's own torch.Generator: same seed, same tokens, whatever else is batched."""
    stop: tuple[str, ...] = ()
    """Stop strings: the text ends before the first one (needs the engine's tokenizer)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the request (kept in token_ids, not in text), besides end-of-text."""
    ignore_eos: bool = False
    """Keep going past the end-of-text token."""
    logprobs: int | None = None
    """Return log-probabilities (of the model's distribution, before temperature and filters) for each
    new token: 0 = only the sampled token's, k = also the k most likely alternatives."""

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 0")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or self.logprobs < 0):
            raise ValueError(f"logprobs={self.logprobs!r} must be None or an integer >= 0")
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
