"""Kernel tests run where the Triton kernels can: a CUDA GPU, or the CPU under TRITON_INTERPRET=1
(set before Python starts, as CI does: ``TRITON_INTERPRET=1 pytest tests/kernels``). Elsewhere the
kernel-vs-reference tests skip; the fallback tests run everywhere.

A kernel that falls back to its reference would compare the reference with itself: in these tests
the fallback warning is an error (a test that expects the fallback says so with ``pytest.warns``,
which records the warning instead)."""

from __future__ import annotations

import warnings

import pytest
import torch

from kiln.kernels import KernelFallbackWarning


@pytest.fixture(autouse=True)
def fallback_is_an_error():
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        yield


@pytest.fixture
def dev() -> torch.device:
    """The device the Triton kernels run on here (CUDA if present), or skip."""
    from kiln.kernels import unsupported_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = unsupported_reason(torch.empty(0, device=device))
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run here: {reason}")
    return device
