"""Helpers shared by the kernel tests (imported by name: pytest puts this folder on sys.path)."""

from __future__ import annotations

import torch


def compute_dtypes(device: torch.device) -> list[torch.dtype]:
    """bf16 on the GPU (the training dtype) and fp32 everywhere; the interpreter runs fp32 only."""
    return [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, rel: float, what: str = "") -> None:
    """||actual - expected|| / ||expected|| <= rel, NaN never passes (METHOD.md's check)."""
    a, e = actual.double(), expected.double()
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = ((a - e).norm() / e.norm().clamp_min(1e-30)).item()
    assert err <= rel, f"{what}: relative error {err:.2e} > {rel:.0e}"


def tol(dtype: torch.dtype, device: torch.device | str) -> float:
    """Relative-norm tolerance for the device and dtype. fp32 on the CPU (Triton's interpreter, numpy
    arithmetic): about 1e-7 is what the kernels reach, so 1e-5 -- tight enough that an RMSNorm eps of
    1e-2, a division by d + 1 or a softmax scale 0.5% off all fail. A GPU's fp32 dots run in tf32
    (~3e-4 each, and attention's backward chains four of them): 5e-3. bf16 operands land between
    1e-3 and 1e-2: 2e-2."""
    if torch.device(device).type == "cpu" and dtype == torch.float32:
        return 1e-5
    return {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}[dtype]
