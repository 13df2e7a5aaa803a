"""The row type of ``kiln bench kernels``' tables (a module of its own: ``kiln.bench.kernels`` and
``kiln.bench.gemv`` both build rows, and kernels calls gemv)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Row:
    """One implementation on one shape."""

    kernel: str
    shape: str
    impl: str
    ms: float
    metric: float | None  # TB/s, TFLOP/s or None
    metric_name: str
    extra_gb: float
    max_rel_err: float | None = None  # vs the eager reference's output and gradients on this shape
    note: str = ""
    extra: dict = field(default_factory=dict)
