"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling,
and ``SamplingParams``, one request's decoding settings for the engine.

The engine draws with ``sample_tokens``: every row of a batch has its own temperature, top-k, top-p
(device tensors, so the draw runs inside a CUDA graph, and over several decode steps per graph) and
its own random number, a stateless hash of (request seed, token position). A
request's tokens then depend only on its seed and its logits: not on the batch around it, not on
CUDA graphs or eager, not on how many steps a graph runs. ``sample_next`` / ``sample_rows`` (a
``torch.Generator`` per call) are the older one-call helpers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kiln.generate.structured import StructuredOutput


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


def uniform(keys: Tensor) -> Tensor:
    """A uniform number in (0, 1), float64 (B,), per row key (B,): 52 bits from two 32-bit hashes of
    the key, (m + 0.5) / 2^52 (exact: never 0 or 1)."""
    a, b = keys >> 6, _mix32(keys ^ 0x3C6EF372) >> 6  # 26 bits each
    return ((a << 26) + b).double().add(0.5).mul(2.0 ** -52)


def filter_thresholds(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor,
                      candidates: int | None = None) -> Tensor:
    """Per row, the smallest raw logit kept by top-k then top-p (``filter_logits``'s sets, the
    Hugging Face order), as a threshold: token i is kept iff logits[b, i] >= thr[b]. logits (B, V)
    fp32; temperature, top_p (B,) fp32; top_k (B,) int64 (0: none). Rows without a filter: -inf.

    ``candidates`` None sorts each row (B, V): the nucleus of top-p without top-k can hold any number
    of tokens. ``candidates`` C: only the C largest logits (``torch.topk``, sorted), exactly the
    sort's first C values, so the same thresholds when every filtering row has top-k <= C (the
    nucleus lies inside the top-k; ``sampling_mode`` checks). Top-k is taken on the raw logits
    (dividing by the temperature keeps the order but can round two logits to one value), top-p on
    the tempered softmax of the top-k survivors, in float64 (its sum then rounds the same over C
    or V columns, for all practical purposes).
    """
    V = logits.shape[-1]
    if candidates is None or candidates >= V:
        vals = torch.sort(logits, dim=-1, descending=True).values  # (B, V)
    else:
        vals = torch.topk(logits, candidates, dim=-1).values  # (B, C), sorted descending
    rank = torch.arange(vals.shape[1], device=logits.device)  # (C,)
    k = torch.where(top_k > 0, top_k.clamp(max=V), V)  # (B,)
    in_k = rank[None, :] < k[:, None]  # (B, C)
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]  # (B, 1)
    probs = torch.softmax((vals / t).double().masked_fill(~in_k, float("-inf")), dim=-1)  # (B, C)
    before = torch.cumsum(probs, dim=-1) - probs  # probability of the better tokens
    keep = in_k & ((before < top_p[:, None]) | (top_p[:, None] >= 1.0))  # the best token: before == 0
    n = keep.sum(-1).clamp(min=1)  # (B,) tokens kept
    thr = vals.gather(1, (n - 1)[:, None])[:, 0]  # (B,)
    filtering = (k < V) | (top_p < 1.0)
    return torch.where(filtering, thr, float("-inf"))


def sample_tokens(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, seed: Tensor,
                  position: Tensor, filtered: bool = True, candidates: int | None = None,
                  min_p: Tensor | None = None) -> Tensor:
    """One token per row of ``logits`` (B, V) fp32: long (B,). Graph-safe (no host sync, no generator).

    Row b is greedy (argmax) when temperature[b] == 0; otherwise it is drawn from softmax(logits / T)
    restricted to what top-k[b] (0: none) and top-p[b] (1: none) keep, by inverse-CDF sampling in
    vocabulary order: the first token whose cumulative probability exceeds u * total, with u =
    ``uniform(row_keys(seed, position))``. The cumulative sum is float64 (in fp32 the increments of
    the ~1e-8-probability tail vanish against a sum near 1, and those tokens would never be drawn).
    Vocabulary order and a per-row u make a row's token independent of the other rows, of the code
    path that ran it and of the batch size. ``position``: the index of the drawn token in its request
    (int64 (B,)); ``seed`` int64 (B,). ``filtered=False`` skips the thresholds (a sort per row): only
    when no sampled row has top-k or top-p; ``candidates``: see ``filter_thresholds``. The variant
    ``sampling_mode`` picks gives every row the tokens the full sort would. ``min_p``: see
    ``sample_with_uniform``.
    """
    u = uniform(row_keys(seed, position))  # (B,) float64
    return sample_with_uniform(logits, temperature, top_k, top_p, u, filtered, candidates, min_p)


def sample_with_uniform(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, u: Tensor,
                        filtered: bool = True, candidates: int | None = None, min_p: Tensor | None = None) -> Tensor:
    """``sample_tokens`` with each row's uniform number u (B,) float64 given (``uniform(row_keys(seed,
    position))``): a K-step graph hashes the numbers of all its steps at once, ~40 tiny integer
    kernels per graph instead of per step. ``min_p`` (B,) fp32 (0: none): also drop the tokens whose
    tempered probability is below min_p times the most likely one's, i.e. whose logit is below
    max + T ln(min_p) (a ratio of probabilities, so the same before or after top-k and top-p)."""
    V = logits.shape[-1]
    greedy = logits.argmax(dim=-1)  # (B,)
    t = torch.where(temperature > 0, temperature, 1.0)[:, None]  # (B, 1)
    scaled = logits / t  # (B, V)
    if filtered:
        thr = filter_thresholds(logits, temperature, top_k, top_p, candidates)  # (B,)
        scaled = scaled.masked_fill(logits < thr[:, None], float("-inf"))
    if min_p is not None:
        floor = logits.max(dim=-1).values + t[:, 0] * torch.log(min_p)  # (B,): -inf where min_p is 0
        scaled = scaled.masked_fill(logits < floor[:, None], float("-inf"))
    cdf = torch.cumsum(torch.softmax(scaled, dim=-1), dim=-1, dtype=torch.float64)  # (B, V) non-decreasing
    target = u * cdf[:, -1]  # (B,) in [0, total)
    idx = (cdf <= target[:, None]).sum(dim=-1)  # (B,) the first token whose cdf exceeds the target
    idx = torch.where(idx < V, idx, greedy)  # u * total rounded up to total: p ~ 2^-53, never seen
    return torch.where(temperature > 0, idx, greedy)


MAX_LOGIT_BIAS = 300
"""Most ``logit_bias`` entries of one request (a bound on the per-request table the decode graphs read)."""

RowSampling = tuple[float, int, float, int, int]
"""One row's (temperature, top_k (0: none), top_p (1.0: none), seed (int64), position)."""


def row_sampling(params: SamplingParams, seed: int, position: int) -> RowSampling:
    """The sampler's per-row values for a request with ``params`` and ``seed`` drawing the token at
    ``position`` (its index in the request's tokens, prompt included)."""
    seed = (int(seed) + (1 << 63)) % (1 << 64) - (1 << 63)  # any Python int -> its int64 bits
    return (float(params.temperature), params.top_k or 0, 1.0 if params.top_p is None else float(params.top_p),
            seed, int(position))


CANDIDATES = (64, 1024)
"""Candidate-set sizes of the top-k variants (``sampling_mode``): few, each one more set of graphs."""


def sampling_mode(rows: list[RowSampling]) -> str:
    """The variant of ``sample_tokens`` a batch needs: 'greedy' (no row samples: plain argmax),
    'sample' (no sampled row filters: no thresholds), 'top64' / 'top1024' (every filtering row has a
    top-k within that many: ``torch.topk`` of that many candidates instead of a sort) or 'sort' (some
    row has top-p without top-k, or a larger top-k). Every variant gives each row the same token;
    the cheaper ones skip work no row needs."""
    sampled = [r for r in rows if r[0] > 0]
    if not sampled:
        return "greedy"
    filtering = [r for r in sampled if r[1] > 0 or r[2] < 1.0]
    if not filtering:
        return "sample"
    if all(r[1] > 0 for r in filtering):
        kmax = max(r[1] for r in filtering)
        for c in CANDIDATES:
            if kmax <= c:
                return f"top{c}"
    return "sort"


def mode_args(mode: str) -> tuple[bool, int | None]:
    """``sample_tokens``' (filtered, candidates) for a sampled ``mode`` of ``sampling_mode``."""
    return mode != "sample", int(mode[3:]) if mode.startswith("top") else None


def draw_tokens(logits: Tensor, rows: list[RowSampling], min_p: Tensor | None = None) -> Tensor:
    """``sample_tokens`` over ``logits`` (N, V) with row i's settings ``rows[i]`` (and ``min_p`` (N,),
    or None): long (N,) on the logits' device. All-greedy batches are a plain argmax."""
    mode = sampling_mode(rows)
    if mode == "greedy":
        return logits.argmax(dim=-1)
    dev = logits.device
    temp, top_k, top_p, seed, pos = zip(*rows)
    return sample_tokens(logits, torch.tensor(temp, dtype=torch.float32, device=dev),
                         torch.tensor(top_k, dtype=torch.long, device=dev),
                         torch.tensor(top_p, dtype=torch.float32, device=dev),
                         torch.tensor(seed, dtype=torch.long, device=dev),
                         torch.tensor(pos, dtype=torch.long, device=dev), *mode_args(mode), min_p=min_p)


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
    presence_penalty: float = 0.0
    """OpenAI's: subtracted from the logit of every token already in the output, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """OpenAI's: times the token's count in the output so far, subtracted from its logit, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """CTRL's (Keskar et al., arXiv:1909.05858; Hugging Face's and vLLM's): every token of the prompt or
    the output so far has its logit divided by this when positive, multiplied when negative (> 0;
    1 = none, > 1 discourages repeats)."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """OpenAI's: (token id, bias in [-100, 100]) pairs added to those tokens' logits; a dict also works.
    At most ``MAX_LOGIT_BIAS`` entries."""
    min_p: float = 0.0
    """Min-p sampling (Nguyen et al., arXiv:2407.01082): keep only tokens whose probability is at least
    this fraction of the most likely one's, in [0, 1] (0 = none). Applies after top-k and top-p."""
    min_tokens: int = 0
    """End-of-text, the stop token ids and stop strings cannot end the request before this many tokens
    (vLLM's). At most ``max_tokens``."""
    structured: StructuredOutput | None = None
    """Constrain the output to a JSON schema, any JSON object, a regex, a set of choices or a grammar
    (``StructuredOutput``); the request ends ('stop') when the language allows nothing more."""
    prompt_logprobs: int | None = None
    """Also return the log-probability of each prompt token given the ones before it (vLLM's; the first
    has none): 0 = the prompt token's only, k = also the k most likely alternatives'. The prompt is
    then computed in full (no prefix-cache hits) until they are all taken."""

    def __post_init__(self) -> None:
        check_sampling_args(self.temperature, self.top_k, self.top_p)
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 0")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name}={v!r} must be None or an integer >= 0")
        if isinstance(self.stop, str):  # a lone string is one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._check_processing()
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise ValueError(f"structured={self.structured!r} must be a StructuredOutput")

    def _check_processing(self) -> None:
        """Validate (and normalize ``logit_bias`` to sorted (id, bias) pairs) the logits-processing fields."""
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not -2.0 <= v <= 2.0:
                raise ValueError(f"{name}={v} must be in [-2, 2] (0 = none)")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1 = none)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p} must be in [0, 1] (0 = none)")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise ValueError(f"min_tokens={self.min_tokens!r} must be an integer >= 0")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        items = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        bias: dict[int, float] = {}
        for tok, b in items:
            if isinstance(tok, bool) or int(tok) != tok or int(tok) < 0:
                raise ValueError(f"logit_bias key {tok!r} must be a token id (an integer >= 0)")
            if not -100.0 <= float(b) <= 100.0:
                raise ValueError(f"logit_bias[{tok}]={b} must be in [-100, 100]")
            bias[int(tok)] = float(b)
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}")
        object.__setattr__(self, "logit_bias", tuple(sorted(bias.items())))

    @property
    def processed(self) -> bool:
        """Whether the logits are processed before the draw (penalties, bias, min-tokens, min-p)."""
        return self.needs_history or self.min_p > 0

    @property
    def needs_history(self) -> bool:
        """Whether processing needs per-request state (the output's token counts, bias, banned ids)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or bool(self.logit_bias) or self.min_tokens > 0)
