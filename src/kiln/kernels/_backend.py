"""Where Kiln's Triton kernels can run, and the one-warning fallback to the PyTorch reference.

Each kernel file imports Triton inside ``try`` so that ``import kiln.kernels`` works without it;
every public wrapper asks :func:`unsupported_reason` before launching and, when it gets a reason,
warns once (per reason, through the ``warnings`` machinery's default "once per message" rule)
and returns the reference result. Never a silent wrong answer.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch

try:  # Triton is optional: without it every kernel degrades to its reference.
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - exercised only where triton is absent
    HAVE_TRITON = False

# Triton chooses between compiling and interpreting when a kernel is *decorated* (at import of
# the kernel module), reading TRITON_INTERPRET then; we record the same decision here so the
# wrappers know whether CPU tensors can go through the kernels (CI: TRITON_INTERPRET=1, no GPU).
TRITON_INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


class KernelFallbackWarning(UserWarning):
    """A Kiln kernel fell back to its PyTorch reference (slower, same answer)."""


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """None if the Triton kernels can run on these tensors' device, else why not."""
    if not HAVE_TRITON:
        return "triton is not installed (pip install triton)"
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return f"tensors on several devices {sorted(str(d) for d in devices)}"
    device = devices.pop()
    if device.type == "cuda":
        if torch.version.hip is None and _capability(device.index) < (8, 0):
            return "GPU older than sm_80 (bf16 tensor cores needed)"
        return None
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return None
        return "tensors are on the CPU (set TRITON_INTERPRET=1 before import to run the kernels interpreted)"
    return f"device {device.type} has no Triton backend here"


_CAPABILITY: dict[int | None, tuple[int, int]] = {}


def _capability(index: int | None) -> tuple[int, int]:
    # A dict, not functools.lru_cache: torch.compile traces through this and warns about lru_cache.
    if index not in _CAPABILITY:
        _CAPABILITY[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITY[index]


def compiling() -> bool:
    """True while torch.compile traces: the wrappers then call the custom ops (opaque to the
    compiler); in eager mode they call the launchers directly, because a Python custom op costs
    about 60-150 us of host time per call, more than these kernels take on the GPU."""
    return torch.compiler.is_compiling()


def distinct_inputs(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors, each repeated object replaced by a view of it (no copy), for an autograd.Function.

    torch 2.11's torch.compile merges repeated inputs of an ``autograd.Function`` into one graph
    input and keeps only one slot's gradient (pytorch/pytorch#181146, #183604; later versions
    graph-break instead): self-attention called as ``flash_attention(x, x, x)`` lost dq and dk
    under compile on the GPU image (docs/LOG.md, 2026-11-22). Distinct objects sidestep it; a
    view's gradient flows back to its base as usual.
    """
    out: list[torch.Tensor] = []
    for t in tensors:
        if any(t is u for u in out):
            t = t.view(t.shape)
        out.append(t)
    return tuple(out)


def warn_fallback(kernel: str, reason: str) -> None:
    """Warn (once per distinct message) that ``kernel`` runs its PyTorch reference because ``reason``."""
    warnings.warn(
        f"kiln.kernels.{kernel}: falling back to the PyTorch reference: {reason}",
        KernelFallbackWarning,
        stacklevel=3,
    )


_DETERMINISTIC = {"on": False, "untuned": False}
CUBLAS_WORKSPACE = ":4096:8"
"""cuBLAS's workspace setting for reproducible GEMMs (cuBLAS docs, "Results reproducibility"):
8 buffers of 4 MiB, so GEMMs never split their reductions by the workspace at hand."""


def deterministic() -> bool:
    """True inside ``deterministic_mode()`` or ``untuned_mode()``: Kiln's kernels then launch one fixed
    configuration instead of autotuning (a tuner's pick can differ between runs, and with it the order
    of a sum)."""
    return _DETERMINISTIC["on"] or _DETERMINISTIC["untuned"]


@contextlib.contextmanager
def untuned_mode() -> Iterator[None]:
    """Within the block, Kiln's kernels launch their one fixed configuration instead of autotuning.

    For short runs of small shapes: the RMSNorm tuner compiles and times 27 configurations on its
    first call (tens of seconds on a cold machine) to save microseconds per call, and a small model's
    step is bound by the host's launches anyway. Nothing else changes (unlike ``deterministic_mode``).
    """
    saved = _DETERMINISTIC["untuned"]
    _DETERMINISTIC["untuned"] = True
    try:
        yield
    finally:
        _DETERMINISTIC["untuned"] = saved


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Bitwise-reproducible GPU steps within the block (a no-op when ``enabled`` is False).

    ``torch.use_deterministic_algorithms(True)`` (torch's atomics-free paths, e.g. a sorted
    ``index_put_`` and FlashAttention's deterministic backward; an op without one raises),
    ``CUBLAS_WORKSPACE_CONFIG`` set to ``CUBLAS_WORKSPACE`` unless already set (set it before the
    process's first GEMM to be safe), cuDNN deterministic and not benchmarking, and Kiln's own
    kernels (none of which uses atomics) on one fixed launch configuration each. Restores every
    setting on exit. The CPU is deterministic without it (``kiln.model.layers._EmbeddingLookup``).
    """
    if not enabled:
        yield
        return
    saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, _DETERMINISTIC["on"])
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    _DETERMINISTIC["on"] = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, _DETERMINISTIC["on"] = saved[2:]
