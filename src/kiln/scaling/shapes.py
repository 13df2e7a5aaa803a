"""Model shapes for a parameter count, the three ways to count N, and FLOPs per token.

**The shape rule** (``ShapeRule``): a ladder of Llama-style shapes indexed by width. Width
``d_model = k * head_dim`` (k = 1, 2, ...), depth ``n_layers = max(1, round(d_model / aspect))``
(the aspect ratio d_model / n_layers is held near ``aspect``: 64 as nanochat's ``model_dim = depth *
64``, inside the flat optimum Kaplan et al. report for aspect ratios 20-200, arXiv:2001.08361 fig. 5),
heads of ``head_dim`` channels (``n_heads = d_model / head_dim``), the SwiGLU width Kiln's
``ModelConfig`` defaults to (8/3 d_model rounded up to 64), tied embeddings, the data's vocab and the
run's context. ``shape_for_params`` picks the rung whose N is nearest the target in log space: N
moves in steps of the ladder (about 1.5-2x apart at small widths), so a sweep records the N it got,
never the N it asked for.

**Which N** (``N_KINDS``), because Kaplan and Chinchilla differ exactly here:

- ``"total"``: every parameter, the tied table counted once (Chinchilla, arXiv:2203.15556);
- ``"non_embedding"``: without the token table (Kaplan et al.; with tied embeddings the output head is
  that table, so it goes too): the blocks and the final norm;
- ``"compute"``: the parameters that cost FLOPs per token, the blocks plus the output head (the
  embedding lookup is free): what ``Transformer.flops_per_token``'s 6N counts. Porian et al. 2024
  ("Resolving Discrepancies in Compute-Optimal Scaling of Language Models", arXiv:2406.19146) trace
  much of the Kaplan/Chinchilla gap to leaving the head out; this is Kiln's default.

**FLOPs per token** (``flops_per_token``): ``"6N"`` is 6 x the chosen N (forward 2N, backward 4N);
``"exact"`` is ``Transformer.flops_per_token`` (the MFU accounting: 6 x compute-N plus 12 L d T for
the attention scores and their product with the values, PaLM's appendix B).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from kiln.model.config import ModelConfig

N_KINDS = ("compute", "total", "non_embedding")
FLOPS_RULES = ("exact", "6N")


@dataclass(frozen=True)
class ShapeRule:
    """How a parameter count becomes a model shape (see the module docstring)."""

    vocab_size: int = 8192
    """Token ids the model covers (the shards' vocab, padded to 64)."""
    context_length: int = 512
    """Sequence length of training windows (tokens); sets the attention FLOPs."""
    head_dim: int = 64
    """Channels per attention head; widths are multiples of it."""
    aspect: int = 64
    """Target d_model / n_layers (nanochat: 64)."""
    max_width: int = 4096
    """Widest rung considered."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "head_dim", "aspect", "max_width"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"ShapeRule.{name}={v!r} must be a positive integer")
        if self.head_dim % 2:
            raise ValueError(f"ShapeRule.head_dim={self.head_dim} must be even (RoPE rotates channel pairs)")

    def shape(self, d_model: int) -> ModelConfig:
        """The rung of width ``d_model`` (a multiple of head_dim)."""
        if d_model % self.head_dim:
            raise ValueError(f"d_model={d_model} is not a multiple of head_dim={self.head_dim}")
        return ModelConfig(vocab_size=self.vocab_size, context_length=self.context_length, d_model=d_model,
                           n_layers=max(1, round(d_model / self.aspect)), n_heads=d_model // self.head_dim,
                           tie_embeddings=True)

    def ladder(self) -> list[ModelConfig]:
        """Every rung, narrowest first."""
        return [self.shape(w) for w in range(self.head_dim, self.max_width + 1, self.head_dim)]


def count_params(cfg: ModelConfig, kind: str = "compute") -> int:
    """N of ``cfg`` by ``kind`` (one of ``N_KINDS``), counted on a meta-device model (no memory)."""
    if kind not in N_KINDS:
        raise ValueError(f"unknown N kind {kind!r}; use one of {N_KINDS}")
    return _counts(cfg)[kind]


@functools.lru_cache(maxsize=4096)
def _counts(cfg: ModelConfig) -> dict[str, int]:
    import torch

    from kiln.model import Transformer

    with torch.device("meta"):
        m = Transformer(cfg)
    compute = m.num_params(exclude_embeddings=True)  # the blocks, final norm and output head
    # Kaplan leaves the token tables out: the input table is already gone, and the output head is
    # a token table too (the same one when tied).
    non_embedding = compute - cfg.vocab_size * cfg.d_model
    return {"total": m.num_params(), "compute": compute, "non_embedding": non_embedding}


def flops_per_token(cfg: ModelConfig, rule: str = "exact", kind: str = "compute") -> float:
    """Training FLOPs per token (forward + backward) at ``cfg.context_length``.

    rule "exact": ``Transformer.flops_per_token`` (6 x compute-N + 12 L d T); "6N": 6 x the N of ``kind``."""
    import torch

    from kiln.model import Transformer

    if rule not in FLOPS_RULES:
        raise ValueError(f"unknown FLOPs rule {rule!r}; use one of {FLOPS_RULES}")
    if rule == "6N":
        return 6.0 * count_params(cfg, kind)
    with torch.device("meta"):
        return Transformer(cfg).flops_per_token(cfg.context_length)


def shape_for_params(n_target: float, rule: ShapeRule, kind: str = "compute") -> ModelConfig:
    """The rung of ``rule.ladder()`` whose N (of ``kind``) is nearest ``n_target`` in log space."""
    if not n_target > 0:
        raise ValueError(f"target parameter count {n_target} must be > 0")
    best, best_gap = None, math.inf
    for cfg in rule.ladder():
        n = count_params(cfg, kind)
        if n <= 0:
            continue
        gap = abs(math.log(n / n_target))
        if gap < best_gap:
            best, best_gap = cfg, gap
        elif n > n_target:  # N grows along the ladder: past the target and worse, stop
            break
    assert best is not None
    return best


def describe(cfg: ModelConfig) -> str:
    """``L4 d256 h4 ff704`` for tables."""
    return f"L{cfg.n_layers} d{cfg.d_model} h{cfg.n_heads} ff{cfg.d_ff}"
