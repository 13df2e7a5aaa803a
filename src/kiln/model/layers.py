"""From-scratch building blocks of a Llama-style transformer, in raw PyTorch.

Each block is a pure function where one exists (``silu``, ``softmax``, ``rms_norm``,
``scaled_dot_product_attention``, ``apply_rotary``) plus a thin ``nn.Module`` holding the parameters.
Parameter names and shapes follow Hugging Face Llama so weights copy across unchanged.
Tests check every block against its PyTorch reference, values and gradients (tests/model/).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn


def trunc_normal_(w: Tensor, std: float) -> Tensor:
    """Fill ``w`` in place from N(0, std^2) truncated at +-3 std; returns ``w``."""
    with torch.no_grad():
        return nn.init.trunc_normal_(w, mean=0.0, std=std, a=-3 * std, b=3 * std)


def matmul_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight^T``: the plain linear (bf16 tensor cores under autocast)."""
    return torch.matmul(x, weight.t())


def fp8_linear(x: Tensor, weight: Tensor) -> Tensor:
    """``x @ weight^T`` with float8 GEMMs in forward and backward (``kiln.kernels.fp8``); falls back
    to the plain matmul, with one warning, where float8 cannot run."""
    from kiln.kernels import fp8  # lazy: the model needs no kernels import otherwise

    return fp8.fp8_linear(x, weight)


# Linear kernels by name, chosen by ModelConfig.linear_impl. Same signature as matmul_linear.
LINEAR_IMPLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"kiln": matmul_linear, "fp8": fp8_linear}


class Linear(nn.Module):
    """``y = x @ W^T`` without bias. ``weight``: (out_features, in_features), as torch and HF store it.

    Init: truncated normal with std sqrt(2 / (in + out)) (Glorot); ``Transformer.init_weights``
    later applies the GPT-2 scheme to the whole model. ``impl`` names the kernel in ``LINEAR_IMPLS``
    ("kiln": plain matmul; "fp8": float8 GEMMs, ``kiln.kernels.fp8``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "kiln",
    ) -> None:
        super().__init__()
        if impl not in LINEAR_IMPLS:
            raise ValueError(f"Linear impl={impl!r} is unknown; use one of {sorted(LINEAR_IMPLS)}")
        self.in_features = in_features
        self.out_features = out_features
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, math.sqrt(2.0 / (self.in_features + self.out_features)))

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        return LINEAR_IMPLS[self.impl](x, self.weight)

    def extra_repr(self) -> str:
        impl = "" if self.impl == "kiln" else f", impl={self.impl!r}"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False{impl}"


class _EmbeddingLookup(torch.autograd.Function):
    """``weight[ids]`` whose backward adds each row's gradients in one fixed order at any thread count.

    The backward of advanced indexing on the CPU (``index_put_`` with ``accumulate=True``) adds the
    rows of repeated ids from several threads in a varying order, so two identical runs with two or
    more torch threads differed in ``embed_tokens.weight``'s gradient from step 2 on (issue 23).
    ``index_add_`` over the flattened ids runs serially over the ids (each row add vectorized over
    the embedding dimension): the order of appearance, the same sums as one thread, bit for bit.
    Measured at the tiny preset's shape (16 x 128 ids, 4096 x 128 table): 0.2 ms, against 1.9 ms
    for indexing's backward and 7.8 ms for ``F.embedding``'s (also deterministic) on one thread.
    On CUDA the module keeps indexing (``TrainConfig.deterministic`` makes torch sort there).
    """

    @staticmethod
    def forward(ctx, weight: Tensor, ids: Tensor) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.num_rows = weight.shape[0]
        return weight[ids]  # (..., d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (ids,) = ctx.saved_tensors
        d = grad.shape[-1]
        dw = grad.new_zeros(ctx.num_rows, d).index_add_(0, ids.reshape(-1), grad.reshape(-1, d))  # (V, d)
        return dw, None


class Embedding(nn.Module):
    """Lookup table. ``weight``: (num_embeddings, embedding_dim); init truncated N(0, 1)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, 1.0)

    def forward(self, token_ids: Tensor) -> Tensor:
        """token_ids: (...) long -> (..., embedding_dim)."""
        if self.weight.device.type == "cpu" and self.weight.requires_grad and torch.is_grad_enabled():
            return _EmbeddingLookup.apply(self.weight, token_ids)
        return self.weight[token_ids]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm (Zhang & Sennrich, arXiv:1910.07467): ``x / sqrt(mean(x^2) + eps) * weight``.

    x: (..., D), weight: (D,). Statistics in fp32 (bf16 squares lose too much precision);
    the result has x's dtype.
    """
    x32 = x.float()
    inv_rms = torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)  # (..., 1)
    return (x32 * inv_rms * weight.float()).to(x.dtype)


def triton_rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Kiln's fused Triton RMSNorm (``kiln.kernels.rmsnorm``); it warns once and runs its reference
    where Triton cannot run."""
    from kiln.kernels.rmsnorm import rmsnorm  # lazy: Triton is optional

    return rmsnorm(x, weight, eps)


# Norm kernels by name, chosen by ModelConfig.norm_impl. Same signature as rms_norm.
NORM_IMPLS: dict[str, Callable[[Tensor, Tensor, float], Tensor]] = {"kiln": rms_norm, "triton": triton_rms_norm}


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim with a learned gain ``weight`` (D,), init ones."""

    def __init__(
        self,
        d_model: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "kiln",
    ) -> None:
        super().__init__()
        if impl not in NORM_IMPLS:
            raise ValueError(f"RMSNorm impl={impl!r} is unknown; use one of {sorted(NORM_IMPLS)}")
        self.d_model = d_model
        self.eps = eps
        self.impl = impl
        self.weight = nn.Parameter(torch.ones(d_model, device=device, dtype=dtype))
        # True (set by kernels_swapped for a norm whose output feeds one matmul): under autocast the
        # "triton" kernel writes autocast's dtype itself, the values the matmul's cast would make
        self.autocast_out = False

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_model) -> same shape and dtype (autocast's dtype with ``autocast_out``)."""
        if self.autocast_out and self.impl == "triton" and torch.is_autocast_enabled(x.device.type):
            from kiln.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, out_dtype=torch.get_autocast_dtype(x.device.type))
        return NORM_IMPLS[self.impl](x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}, impl={self.impl!r}"


def silu(x: Tensor) -> Tensor:
    """SiLU / swish: ``x * sigmoid(x)`` (Elfwing et al., arXiv:1702.03118)."""
    return x * torch.sigmoid(x)


class SwiGLU(nn.Module):
    """Gated MLP ``down(silu(gate(x)) * up(x))`` (Shazeer, arXiv:2002.05202), as in Llama.

    gate_proj, up_proj: (d_ff, d_model); down_proj: (d_model, d_ff). ``impl``: their kernel, a name
    in ``LINEAR_IMPLS``. For inference ``kiln.model.fuse_projections`` replaces gate_proj and up_proj
    (then None) by one ``gate_up_proj`` (2 d_ff, d_model).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        impl: str = "kiln",
    ) -> None:
        super().__init__()
        self.gate_proj = Linear(d_model, d_ff, device=device, dtype=dtype, impl=impl)
        self.up_proj = Linear(d_model, d_ff, device=device, dtype=dtype, impl=impl)
        self.down_proj = Linear(d_ff, d_model, device=device, dtype=dtype, impl=impl)
        self.fused_proj = False  # True: gate and up as one GEMM (fewer launches in a host-bound step)
        self.gate_up_proj: nn.Module | None = None  # gate and up stacked once, for inference (kiln.model.fuse)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., d_model) -> (..., d_model)."""
        if self.gate_up_proj is not None:  # fuse_projections: one GEMV, then two views of its output
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # (..., d_ff) each
            return self.down_proj(silu(gate) * up)
        if self.fused_proj and self.gate_proj.impl == "kiln":
            w = torch.cat((self.gate_proj.weight, self.up_proj.weight))  # (2 d_ff, d_model)
            gate, up = matmul_linear(x, w).chunk(2, dim=-1)
            return self.down_proj(silu(gate) * up)
        return self.down_proj(silu(self.gate_proj(x)) * self.up_proj(x))


class _Softmax(torch.autograd.Function):
    """Softmax with its gradient written out, so backward keeps one tensor (the output) instead of
    every intermediate of the exp/sum/divide chain: less memory and fewer passes in eager mode."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int) -> Tensor:  # type: ignore[override]
        x_max = x.amax(dim=dim, keepdim=True)
        # A slice of all -inf has max -inf; shifting by it would turn every entry into NaN. Keeping
        # the shift finite leaves such a slice to give 0/0 = NaN below, as torch.softmax does.
        x_max = torch.where(torch.isfinite(x_max), x_max, torch.zeros_like(x_max))
        y = torch.exp(x - x_max)
        y /= y.sum(dim=dim, keepdim=True)
        ctx.dim = dim
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (y,) = ctx.saved_tensors
        # dL/dx_i = y_i * (g_i - sum_j g_j y_j): the Jacobian of softmax is diag(y) - y y^T.
        return y * (grad_y - (grad_y * y).sum(dim=ctx.dim, keepdim=True)), None


def softmax(x: Tensor, dim: int) -> Tensor:
    """Numerically stable softmax: subtract the max along ``dim`` before exp.

    Entries equal to -inf get probability 0. A slice that is entirely -inf has no defined softmax
    and gives NaN, as torch.softmax does. The gradient is the closed form ``y * (g - sum(g * y))``.
    """
    return _Softmax.apply(x, dim)


def scaled_dot_product_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """``softmax(q k^T / sqrt(D) + mask) v`` (Vaswani et al., arXiv:1706.03762).

    q: (..., T, D), k: (..., S, D), v: (..., S, Dv); mask: bool, broadcastable to (..., T, S),
    True where a query may attend to a key. Returns (..., T, Dv) in q's dtype. Scores and the
    softmax are computed in at least fp32. A query row whose mask is all False gives NaN.
    """
    q = q * (1.0 / math.sqrt(q.shape[-1]))  # scale the (T, D) queries, not the (T, S) scores
    scores = torch.matmul(q, k.transpose(-2, -1))  # (..., T, S)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"attention mask must be bool (True = may attend), got {mask.dtype}")
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = softmax(scores, dim=-1).to(v.dtype)  # (..., T, S)
    return torch.matmul(probs, v)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (Llama/HF convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x by per-position angles: ``x * cos + rotate_half(x) * sin``.

    x: (..., T, D); cos, sin: broadcastable to x, each (…, T, D) with the D/2 frequencies repeated
    twice (``cat(f, f)``), i.e. channel i is paired with channel i + D/2.
    """
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE; Su et al., RoFormer, arXiv:2104.09864).

    Convention: Llama/Hugging Face "rotate_half", which pairs channel i with channel i + d_k/2
    (not the interleaved pairs (2i, 2i+1) of the RoFormer paper and Meta's original code). HF's
    Llama weights are stored for this convention, so they load without permuting q/k projections.
    Frequency of pair i: ``theta ** (-2i / d_k)``.

    Buffers ``cos``, ``sin``: (max_seq_len, d_k), fp32, not saved in state dicts.
    """

    def __init__(
        self,
        theta: float,
        d_k: int,
        max_seq_len: int,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if d_k % 2:
            raise ValueError(f"RotaryEmbedding d_k={d_k} must be even (RoPE rotates channel pairs)")
        self.theta = theta
        self.d_k = d_k
        self.max_seq_len = max_seq_len
        self.impl = "kiln"  # "triton": training-shaped attention calls rotate q and k in one fused launch
        self.register_buffer("cos", torch.empty(max_seq_len, d_k, device=device), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, d_k, device=device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the cos/sin tables, e.g. after ``to_empty`` from the meta device."""
        if self.cos.is_meta:
            return
        dev = self.cos.device
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.d_k, 2, device=dev, dtype=torch.float64) / self.d_k))
        pos = torch.arange(self.max_seq_len, device=dev, dtype=torch.float64)
        angles = torch.outer(pos, inv_freq)  # (max_seq_len, d_k/2)
        angles = torch.cat((angles, angles), dim=-1)  # (max_seq_len, d_k)
        with torch.no_grad():
            self.cos.copy_(angles.cos())
            self.sin.copy_(angles.sin())

    def forward(self, x: Tensor, token_positions: Tensor) -> Tensor:
        """x: (..., T, d_k); token_positions: (T,) or (B, T) long, each < max_seq_len.

        With x of shape (B, H, T, d_k) and positions (B, T), the positions broadcast over heads.
        Returns x rotated, same shape and dtype.
        """
        cos = self.cos[token_positions].to(x.dtype)  # (..., T, d_k)
        sin = self.sin[token_positions].to(x.dtype)
        if 2 < cos.ndim < x.ndim:  # (B, T, D) against (B, H, T, D): insert the head dims
            shape = cos.shape[:-2] + (1,) * (x.ndim - cos.ndim) + cos.shape[-2:]
            cos, sin = cos.view(shape), sin.view(shape)
        return apply_rotary(x, cos, sin)

    def extra_repr(self) -> str:
        return f"theta={self.theta}, d_k={self.d_k}, max_seq_len={self.max_seq_len}"
