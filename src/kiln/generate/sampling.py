"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling,
and ``SamplingParams``, one request's decoding settings for the engine.

The engine draws with ``sample_tokens``: every row of a batch has its own temperature, top-k, top-p
(device tensors, so the draw runs inside a CUDA graph, and over several decode steps per graph) and
its own random numbers, a stateless hash of (request seed, token position, vocabulary id). A
request's tokens then depend only on its seed and its logits: not on the batch around it, not on
CUDA graphs or eager, not on how many steps a graph runs. ``sample_next`` / ``sample_rows`` (a
``torch.Generator`` per call) are the older one-call helpers.
"""

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


# -- the engine's sampler: counter-based randomness, per-row settings as tensors -----------------------

_M32 = 0xFFFFFFFF


def _mix32(x: Tensor) -> Tensor:
    """A bijective 32-bit avalanche hash (Wellons' "lowbias32", hash-prospector) of int64 tensors
    holding values in [0, 2^32). Both multipliers are below 2^31, so every product stays below 2^63:
    no integer overflow anywhere, and the same bits eager, compiled, on the CPU and on CUDA."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def row_keys(seed: Tensor, position: Tensor) -> Tensor:
    """One 32-bit key (int64 in [0, 2^32)) per row from its 64-bit seed and token position, (B,) each."""
    lo, hi = seed & _M32, (seed >> 32) & _M32  # an arithmetic shift then a mask: the high word's bits
    k = _mix32(hi ^ 0x6A09E667)  # constants: the first words of SHA-256's initial state (any would do)
    k = _mix32(k ^ lo)
    return _mix32(k ^ (position & _M32))


def gumbel_noise(keys: Tensor, V: int) -> Tensor:
    """Standard Gumbel noise (B, V) fp32 from row keys (B,): element (b, i) is a pure function of
    (keys[b], i). Two rounds of ``_mix32`` over (key xor i), 23 bits of it as a uniform v in (0, 1)
    (exact in fp32: v is never 0 or 1), then -log(-log1p(-v)): finite, at most ~16.6 (the top tail
    is cut at probability 2^-24 per element, far below what any test or use can see)."""
    idx = torch.arange(V, device=keys.device)  # (V,)
    k = keys[:, None]  # (B, 1)
    x = _mix32(_mix32(k ^ idx) ^ _mix32(k ^ 0x3C6EF372))  # (B, V)
    v = ((x >> 9).float() + 0.5) * (1.0 / (1 << 23))  # (B, V) uniform in (0, 1)
    return -torch.log(-torch.log1p(-v))


def filter_thresholds(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Per row, the smallest raw logit kept by top-k then top-p (``filter_logits``'s sets, the
    Hugging Face order), as a threshold: token i is kept iff logits[b, i] >= thr[b]. logits (B, V)
    fp32; temperature, top_p (B,) fp32; top_k (B,) int64 (0: none). Rows without a filter: -inf.

    Costs one sort of each row (B, V): the nucleus can hold any number of tokens, so no bounded
    candidate set is exact for top-p without top-k. Top-k is taken on the raw logits (dividing by
    the temperature keeps the order but can round two logits to one value), top-p on the tempered
    softmax of the top-k survivors.
    """
    B, V = logits.shape
    vals = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    rank = torch.arange(V, device=logits.device)  # (V,)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B,)
    in_k = rank[None, :] < k[:, None]  # (B, V)
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]  # (B, 1)
    probs = torch.softmax((vals / t).masked_fill(~in_k, float("-inf")), dim=-1)  # (B, V)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the better tokens
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))  # the best token: before == 0
    n = keep.sum(-1).clamp(min=1)  # (B,) tokens kept
    thr = vals.gather(1, (n - 1)[:, None])[:, 0]  # (B,)
    filtering = (k < V) | (top_p < 1.0)
    return torch.where(filtering, thr, float("-inf"))


def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
                  position: Tensor, filtered: bool = True) -> Tensor:
    """One token per row of ``logits`` (B, V) fp32: long (B,). Graph-safe (no host sync, no generator).

    Row b is greedy (argmax) when temperature[b] == 0; otherwise the Gumbel-max draw (Gumbel 1954;
    the exponential race) over the tokens that top-k[b] (0: none) and top-p[b] (1: none) keep:
    argmax_i logits/T + g_i, with g from ``gumbel_noise(row_keys(seed, position))``. That picks i with
    probability softmax(logits/T) restricted to the kept set, and the noise belongs to the vocabulary
    id, not to a rank or a batch slot, so a row's token does not depend on the other rows, on which
    code path computed the thresholds, or on the batch size. ``position``: the index of the drawn
    token in its request (int64 (B,)); ``seed`` int64 (B,). ``filtered=False`` skips the
    thresholds (a sort per row): only when no sampled row has top-k or top-p (``sampling_mode``).
    """
    greedy = logits.argmax(dim=-1)  # (B,)
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]  # (B, 1)
    scores = logits / t + gumbel_noise(row_keys(seed, position), logits.shape[-1])  # (B, V)
    if filtered:
        thr = filter_thresholds(logits, temperature, top_k, top_p)  # (B,)
        scores = scores.masked_fill(logits < thr[:, None], float("-inf"))
    return torch.where(temperature > 0, scores.argmax(dim=-1), greedy)


RowSampling = tuple[float, int, float, int, int]
"""One row's (temperature, top_k (0: none), top_p (1.0: none), seed (int64), position)."""


def row_sampling(params: "SamplingParams", seed: int, position: int) -> RowSampling:
    """The sampler's per-row values for a request with ``params`` and ``seed`` drawing the token at
    ``position`` (its index in the request's tokens, prompt included)."""
    seed = (int(seed) + (1 << 63)) % (1 << 64) - (1 << 63)  # any Python int -> its int64 bits
    return (float(params.temperature), params.top_k or 0, 1.0 if params.top_p is None else float(params.top_p),
            seed, int(position))


def sampling_mode(rows: list[RowSampling]) -> str:
    """'greedy' (no row samples: plain argmax), 'sample' (no sampled row filters: no sort) or
    'filter' (some sampled row has top-k or top-p): the variant of ``sample_tokens`` a batch needs.
    Every variant gives each row the same token; the cheaper ones skip work no row needs."""
    sampled = [r for r in rows if r[0] > 0]
    if not sampled:
        return "greedy"
    return "filter" if any(r[1] > 0 or r[2] < 1.0 for r in sampled) else "sample"


def draw_tokens(logits: Tensor, rows: list[RowSampling]) -> Tensor:
    """``sample_tokens`` over ``logits`` (N, V) with row i's settings ``rows[i]``: long (N,) on the
    logits' device. All-greedy batches are a plain argmax."""
    mode = sampling_mode(rows)
    if mode == "greedy":
        return logits.argmax(dim=-1)
    dev = logits.device
    temp, top_k, top_p, seed, pos = zip(*rows)
    return sample_tokens(logits, torch.tensor(temp, dtype=torch.float32, device=dev),
                         torch.tensor(top_k, dtype=torch.long, device=dev),
                         torch.tensor(top_p, dtype=torch.float32, device=dev),
                         torch.tensor(seed, dtype=torch.long, device=dev),
                         torch.tensor(pos, dtype=torch.long, device=dev), filtered=mode == "filter")


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
    """The request's random numbers are a hash of (seed, token position): same seed and prompt, same
    tokens, whatever else is batched and however the engine runs (None: a random seed)."""
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
