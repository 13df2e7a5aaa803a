"""Shared test fixtures. Tests that need ../shared/data use the ``shared_data`` fixture and skip
cleanly where it is absent (a user's clone has no shared/ folder beside it)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$KILN_SHARED_DATA`` or ``<repo>/../shared/data``, if it exists."""
    env = os.environ.get("KILN_SHARED_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("../shared/data is absent (set KILN_SHARED_DATA to run tests on the real datasets)")
    return d


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op torch thread per test: the tensors here are tiny, CI runs two pytest workers on two
    cores, and a second spinning thread per worker makes small matmuls 10-50x slower."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
