"""``ModelConfig``: the shape of a Llama-style decoder-only transformer, validated on creation."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Kiln transformer (Llama layout: RMSNorm, RoPE, SwiGLU, GQA).

    The defaults build a tiny model that trains on a laptop CPU. ``n_kv_heads=None`` means plain
    multi-head attention (``n_kv_heads = n_heads``); ``d_ff=None`` means the SwiGLU width
    ``8/3 * d_model`` rounded up to a multiple of 64, which keeps the MLP's parameter count equal to a
    4x GELU MLP (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202).
    """

    vocab_size: int = 8192
    """Number of token ids the embedding and the output head cover."""
    context_length: int = 256
    """Longest sequence (tokens) the model attends over; the RoPE tables are this long."""
    d_model: int = 256
    """Width of the residual stream."""
    n_layers: int = 4
    """Number of transformer blocks."""
    n_heads: int = 4
    """Query heads per attention layer; must divide d_model."""
    n_kv_heads: int | None = None
    """Key/value heads (grouped-query attention); must divide n_heads. None: equal to n_heads."""
    d_ff: int | None = None
    """Hidden width of the SwiGLU MLP. None: 8/3 * d_model rounded up to a multiple of 64."""
    rope_theta: float = 10000.0
    """RoPE base frequency (RoFormer, arXiv:2104.09864; Llama 2 uses 1e4, Llama 3 5e5)."""
    norm_eps: float = 1e-5
    """Epsilon inside RMSNorm's square root."""
    tie_embeddings: bool = False
    """Share one matrix between the input embedding and the output head."""
    attention_impl: str = "kiln"
    """Attention kernel: "kiln" (from-scratch reference, default), "triton" (Kiln's FlashAttention-2
    kernel, GPU) or "sdpa" (torch's fused SDPA: an option, not Kiln's own). See
    ``kiln.model.attention.ATTENTION_IMPLS``."""
    qk_norm: bool = False
    """RMSNorm on each query and key head before RoPE (QK-norm; exported as Qwen3's q_norm/k_norm)."""
    norm_impl: str = "kiln"
    """RMSNorm kernel: "kiln" (from-scratch reference, default) or "triton" (Kiln's fused kernel,
    GPU). See ``kiln.model.layers.NORM_IMPLS``."""
    linear_impl: str = "kiln"
    """Kernel of the block matrices (attention q/k/v/o, MLP gate/up/down): "kiln" (matmul; bf16
    tensor cores under autocast) or "fp8" (float8 e4m3 GEMMs with row-wise scales in forward and
    backward, ``kiln.kernels.fp8``; sm_89+ GPUs). The embedding and the output head stay bf16.
    See ``kiln.model.layers.LINEAR_IMPLS``."""

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 64 * -(-(8 * self.d_model // 3) // 64))
        for name in ("vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"ModelConfig.{name}={v!r} must be a positive integer")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig: n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                f"pick n_heads from {_divisors(self.d_model)[:12]} or change d_model"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads}; "
                f"pick n_kv_heads from {_divisors(self.n_heads)}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"ModelConfig: head dimension d_model/n_heads={self.head_dim} is odd, but RoPE rotates "
                "pairs of channels; choose d_model and n_heads so that d_model/n_heads is even"
            )
        if not self.rope_theta > 0:
            raise ValueError(f"ModelConfig.rope_theta={self.rope_theta} must be > 0 (e.g. 10000.0)")
        if not self.norm_eps > 0:
            raise ValueError(f"ModelConfig.norm_eps={self.norm_eps} must be > 0 (e.g. 1e-5)")
        from kiln.model.attention import ATTENTION_IMPLS
        from kiln.model.layers import LINEAR_IMPLS, NORM_IMPLS

        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(
                f"ModelConfig.attention_impl={self.attention_impl!r} is unknown; use one of {sorted(ATTENTION_IMPLS)}"
            )
        if self.norm_impl not in NORM_IMPLS:
            raise ValueError(
                f"ModelConfig.norm_impl={self.norm_impl!r} is unknown; use one of {sorted(NORM_IMPLS)}"
            )
        if self.linear_impl not in LINEAR_IMPLS:
            raise ValueError(
                f"ModelConfig.linear_impl={self.linear_impl!r} is unknown; use one of {sorted(LINEAR_IMPLS)}"
            )

    @property
    def head_dim(self) -> int:
        """Channels per attention head (d_model / n_heads)."""
        return self.d_model // self.n_heads

    def to_dict(self) -> dict:
        """Plain JSON-able dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Inverse of ``to_dict``; unknown keys are an error naming them."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"ModelConfig has no field(s) {unknown}; known fields: {sorted(names)}")
        return cls(**d)
