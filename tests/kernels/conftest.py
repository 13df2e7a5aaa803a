"""Kernel tests run where the Triton kernels can: a CUDA GPU, or the CPU under TRITON_INTERPRET=1
(set before Python starts, as CI does: ``TRITON_INTERPRET=1 pytest tests/kernels``). Elsewhere the
kernel-vs-reference tests skip; the fallback tests run everywhere."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def dev() -> torch.device:
    """The device the Triton kernels run on here (CUDA if present), or skip."""
    from kiln.kernels import unsupported_reason

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reason = unsupported_reason(torch.empty(0, device=device))
    if reason is not None:
        pytest.skip(f"Triton kernels cannot run here: {reason}")
    return device
