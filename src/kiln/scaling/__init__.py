"""Scaling laws: shapes for a parameter count, IsoFLOP sweeps through Kiln's trainer, and
Chinchilla's three fits with bootstrap intervals (docs/scaling.md).

- ``shapes``: ``ShapeRule``, ``shape_for_params``, ``count_params`` (N as "compute", "total" or
  "non_embedding"), ``flops_per_token`` ("exact" or "6N");
- ``sweep``: ``ScalingConfig`` (presets ``cpu_toy``, ``gutenberg_h100``), ``plan``, ``run_point``;
- ``executors``: ``LocalExecutor``, ``ProcessExecutor`` (one process per GPU slot), ``RayExecutor``;
- ``fit``: ``load_runs``, ``approach1``, ``approach2``, ``approach3``, ``fit_all``, ``predict``;
- ``study``: ``run_study`` (sweep, fit, check run, report); ``plots``: the PNGs;
- ``lr_check``: one lr across widths; ``data``: ``subset_shards`` (a token budget to carry).
"""

from kiln.scaling.fit import (
    FitReport,
    Parametric,
    Prediction,
    Run,
    approach1,
    approach2,
    approach3,
    compute_optimal,
    fit_all,
    load_runs,
    predict,
)
from kiln.scaling.shapes import (
    N_KINDS,
    ShapeRule,
    count_params,
    flops_per_token,
    shape_for_params,
)
from kiln.scaling.sweep import PRESETS, Point, ScalingConfig, plan, run_point

__all__ = [
    "N_KINDS",
    "PRESETS",
    "FitReport",
    "Parametric",
    "Point",
    "Prediction",
    "Run",
    "ScalingConfig",
    "ShapeRule",
    "approach1",
    "approach2",
    "approach3",
    "compute_optimal",
    "count_params",
    "fit_all",
    "flops_per_token",
    "load_runs",
    "plan",
    "predict",
    "run_point",
    "shape_for_params",
]
