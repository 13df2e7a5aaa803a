"""Kiln's Triton kernels, each with its PyTorch reference and an autograd wrapper.

- :func:`rmsnorm` (``rmsnorm.py``): fused RMSNorm, fp32 statistics.
- :func:`flash_attention` (``attention.py``): FlashAttention-2 style causal attention, GQA.
- :func:`linear_cross_entropy` (``linear_cross_entropy.py``): LM head + cross-entropy in chunks.
- :func:`rope_qk` (``rope.py``): rotary embedding of q and k, one launch each way.
- :func:`fp8_linear` (``fp8.py``): a linear layer with float8 GEMMs (cuBLASLt, not Triton).

Optimizer passes, no autograd, imported by ``kiln.train``'s optimizers when ``fused=True``:
``adamw.py`` (AdamW's update, one pass per tensor) and ``muon.py`` (Muon's bookkeeping around
Newton-Schulz, two passes per bucket of same-shaped matrices).

Each public function falls back to its ``*_ref`` with one :class:`KernelFallbackWarning` where the
kernel cannot run (no Triton, CPU without ``TRITON_INTERPRET=1``, unsupported dtype or shape).
Importing this package never requires Triton. ``deterministic_mode()`` makes GPU steps
reproducible bitwise (torch's deterministic algorithms, cuBLAS's workspace, and one fixed launch
configuration per Kiln kernel; no Kiln kernel uses atomics). See docs/kernels.md.
"""

from kiln.kernels._backend import (
    HAVE_TRITON,
    KernelFallbackWarning,
    deterministic_mode,
    unsupported_reason,
    untuned_mode,
)
from kiln.kernels.attention import attention_ref, flash_attention
from kiln.kernels.fp8 import fp8_linear, fp8_linear_ref
from kiln.kernels.linear_cross_entropy import (
    linear_cross_entropy,
    linear_cross_entropy_ref,
)
from kiln.kernels.rmsnorm import rmsnorm, rmsnorm_ref
from kiln.kernels.rope import rope_qk, rope_ref

__all__ = [
    "HAVE_TRITON",
    "KernelFallbackWarning",
    "attention_ref",
    "deterministic_mode",
    "flash_attention",
    "fp8_linear",
    "fp8_linear_ref",
    "linear_cross_entropy",
    "linear_cross_entropy_ref",
    "rmsnorm",
    "rmsnorm_ref",
    "rope_qk",
    "rope_ref",
    "unsupported_reason",
    "untuned_mode",
]
