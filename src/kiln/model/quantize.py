"""Weight-only quantization as a module swap (gpt-fast's recipe): every ``Linear`` of a trained model
becomes an ``Int8Linear`` (per-output-channel scales) or an ``Int4Linear`` (asymmetric groups of
``group_size`` input channels), holding compressed weights as buffers; activations stay in the model's
dtype. The kernels and the quantizers are in ``kiln.kernels.quant_linear``. Inference only.

    model = quantize_model(load_pretrained(path, device="cuda", dtype=torch.bfloat16), "int8")

The quality cost is measured, not assumed: ``kiln bench serve`` reports held-out loss per mode.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kiln.kernels.quant_linear import (
    int4_linear,
    int8_linear,
    quantize_int4,
    quantize_int8,
)
from kiln.model.layers import Linear

QUANT_MODES = ("int8", "int4")


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with q int8 (out, in) and scale fp32 (out,)."""

    def __init__(self, weight: Tensor, tuned: bool = False) -> None:
        super().__init__()
        self.tuned = tuned  # Kiln's autotuned GEMV at every row count up to 8 (``int8_linear``)
        self._set(*quantize_int8(weight.detach()))

    @classmethod
    def from_quantized(cls, q: Tensor, scale: Tensor, tuned: bool = False) -> Int8Linear:
        """A layer over weights already quantized (q int8 (out, in), scale fp32 (out,)), kept as they are:
        how ``kiln.model.fuse`` stacks the rows of several layers without quantizing again."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.tuned = tuned
        m._set(q, scale)
        return m

    def _set(self, q: Tensor, scale: Tensor) -> None:
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        return int8_linear(x, self.q, self.scale, tuned=self.tuned)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int4Linear(nn.Module):
    """y = x @ w^T with w[n, k] = q * scale[n, k // group_size] + low[n, k // group_size], q in [0, 15]."""

    def __init__(self, weight: Tensor, group_size: int = 128, tuned: bool = False) -> None:
        super().__init__()
        self.tuned = tuned  # as Int8Linear's
        group_size = largest_group(weight.shape[1], group_size)
        self._set(*quantize_int4(weight.detach(), group_size), group_size)

    @classmethod
    def from_quantized(cls, packed: Tensor, scale: Tensor, low: Tensor, group_size: int,
                       tuned: bool = False) -> Int4Linear:
        """A layer over weights already quantized (packed uint8 (out, in/2), scale and low fp32 (out, in /
        group_size)), kept as they are (see ``Int8Linear.from_quantized``)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.tuned = tuned
        m._set(packed, scale, low, group_size)
        return m

    def _set(self, packed: Tensor, scale: Tensor, low: Tensor, group_size: int) -> None:
        self.in_features, self.out_features, self.group_size = 2 * packed.shape[1], packed.shape[0], group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("low", low)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., in) -> (..., out) in x's dtype."""
        return int4_linear(x, self.packed, self.scale, self.low, tuned=self.tuned)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4, group_size={self.group_size}"


def largest_group(in_features: int, group_size: int) -> int:
    """The largest even group size <= ``group_size`` that divides ``in_features`` (128 -> 64 -> ... -> 2)."""
    g = group_size
    while g > 2 and in_features % g:
        g //= 2
    if in_features % g or g % 2:
        raise ValueError(f"int4 needs an even in_features; got {in_features}")
    return g


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, include_head: bool = True,
                   tuned: bool | None = None) -> nn.Module:
    """Swap ``model``'s ``Linear`` layers (in place) for int8 or int4 ones; returns the model.

    ``include_head``: also the output head (a tied head gets its own compressed copy; the embedding
    lookup keeps the original matrix). At batch 1 the head of a GPT-2-size model is a third of the
    bytes read per token. ``tuned``: the layers run Kiln's autotuned GEMV kernels at every row count
    up to 8, one row under ``torch.compile`` included, instead of Inductor's fused one-row form
    (``kiln.kernels.quant_linear.int8_linear``). None (the default): int4 tuned, int8 not; measured
    on an H100 at Llama-2-7B's shape, Kiln's int4 kernel is 1.56x Inductor's fused form and the int8
    ones are equal (docs/benchmarks.md).
    """
    tuned = mode == "int4" if tuned is None else tuned
    if mode not in QUANT_MODES:
        raise ValueError(f"quantization mode {mode!r} is unknown; use one of {QUANT_MODES}")
    swaps = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, Linear)
             and (include_head or not name.endswith("lm_head"))]
    for name, lin in swaps:
        new = Int8Linear(lin.weight, tuned) if mode == "int8" else Int4Linear(lin.weight, group_size, tuned)
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
    return model


def weight_bytes(model: nn.Module, per_token: bool = True) -> int:
    """Bytes a decode step reads for weights: every parameter and quantized buffer, except the
    embedding table (one row is read per token) when ``per_token``."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if id(t) in seen or (per_token and name.startswith("embed_tokens")) or name.endswith(("rope.cos", "rope.sin")):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    if per_token and getattr(model.config, "tie_embeddings", False) and not isinstance(getattr(model, "lm_head", None), (Int8Linear, Int4Linear)):
        total += model.embed_tokens.weight.numel() * model.embed_tokens.weight.element_size()  # the tied head
    return total
