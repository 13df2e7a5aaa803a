"""Profile a few training steps: a Chrome trace plus a per-op table of where the time goes.

``profile_steps(step_fn, out_dir)`` runs ``step_fn()`` ``warmup`` times untraced, then ``steps`` times
under ``torch.profiler.profile``, and writes to ``out_dir`` (each file atomically: a temporary name,
then a rename):

    trace.json     Chrome trace (open in https://ui.perfetto.dev or chrome://tracing)
    ops.md         per-op table: op, category, calls, time total and per step, % of op time
                   (top 40 rows and one row for the rest), after a per-category table
    ops.csv        the same columns, every op
    summary.json   step time, op time per step, time per category, device, torch version

Which time: on CUDA, the GPU kernels' own durations (kernels, memcpy, memset), so the table
answers "what is the GPU busy with" (kernels on different streams may overlap, e.g. NCCL under
compute, so their sum can exceed the step time). On the CPU, each op's *self* CPU time (its time
minus its children's), so nothing is counted twice. Percentages are of the table's total, so they
sum to 100; ``summary.json`` also gives the wall time per step, so the share of the step that ops
cover (the rest: Python and launch overhead, idle) is ``op_time_ms_per_step / step_time_ms.mean``.
Profiling adds overhead of its own, most of all with ``record_shapes``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kiln.artifacts import write_text_atomic

CATEGORIES = (
    "matmul", "attention", "norm", "softmax/cross-entropy", "optimizer", "communication", "memory",
    "elementwise/other",
)
"""Op categories, as they appear in the tables."""

# (category, substrings, whole tokens) in precedence order: the first rule that matches wins, so
# "flash ... sm90 ... gemm" is attention, "_foreach_norm" is optimizer and "linear_cross_entropy" is
# cross-entropy. Tokens are the lowercase runs of letters and digits in the name ("aten::_to_copy" ->
# aten, to, copy), for words too short to match safely as substrings ("to", "mm", "cat", "ce").
_RULES: tuple[tuple[str, tuple[str, ...], frozenset[str]], ...] = (
    ("communication", ("nccl", "all_reduce", "allreduce", "reduce_scatter", "reducescatter", "all_gather",
                       "allgather", "all_to_all", "alltoall", "c10d"), frozenset()),
    ("attention", ("flash", "sdpa", "scaled_dot_product", "attention", "fmha", "attn"), frozenset()),
    ("softmax/cross-entropy", ("cross_entropy", "crossentropy", "log_softmax", "logsoftmax", "softmax", "nll"),
     frozenset({"ce"})),
    ("optimizer", ("foreach", "multi_tensor_apply", "adam", "lerp", "addcdiv", "addcmul", "muon", "newton",
                   "optimizer"), frozenset()),
    ("matmul", ("gemm", "gemv", "cutlass", "cublas", "xmma", "nvjet", "sm90_", "sm80_", "matmul"),
     frozenset({"mm", "addmm", "bmm", "baddbmm", "addbmm", "mv", "addmv", "dot", "linear"})),
    ("norm", ("rms", "norm"), frozenset()),
    ("memory", ("copy", "memcpy", "memset", "fill", "catarray", "empty_strided", "contiguous"),
     frozenset({"to", "zero", "zeros", "cat", "stack", "empty", "clone", "pad"})),
)


def categorize(name: str) -> str:
    """Category of an op or kernel name (one of ``CATEGORIES``), by the rules in ``_RULES``."""
    low = name.lower()
    tokens = set(re.split(r"[^a-z0-9]+", low))
    for category, substrings, words in _RULES:
        if any(s in low for s in substrings) or tokens & words:
            return category
    return "elementwise/other"


@dataclass(frozen=True)
class OpStat:
    """One row of the op table: an op (CPU) or kernel (CUDA) name, summed over the profiled steps."""

    name: str
    category: str
    calls: int
    total_ms: float
    """Self CPU time (CPU) or kernel time (CUDA) over all profiled steps, in milliseconds."""
    per_step_ms: float
    percent: float
    """Share of the table's total time, in percent (rows sum to 100)."""


@dataclass(frozen=True)
class ProfileReport:
    """What ``profile_steps`` wrote: the file paths, the summary (as in summary.json) and every op row."""

    out_dir: Path
    trace: Path
    ops_md: Path
    ops_csv: Path
    summary_json: Path
    summary: dict[str, Any]
    ops: tuple[OpStat, ...]


def profile_steps(
    step_fn: Callable[[], Any],
    out_dir: str | os.PathLike,
    *,
    steps: int = 5,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    record_shapes: bool = True,
) -> ProfileReport:
    """Run ``step_fn()`` ``warmup`` times, then profile ``steps`` calls; write the trace and tables.

    ``step_fn``: one full training step (forward, backward, optimizer step, zero_grad), no
    arguments. ``device``: where the step runs; on CUDA the GPU is traced too and synchronized at
    the end of every step, so each step's kernels fall inside its own time. Returns a
    ``ProfileReport``; see the module docstring for the files.
    """
    if steps < 1:
        raise ValueError(f"profile_steps steps={steps} must be >= 1")
    if warmup < 0:
        raise ValueError(f"profile_steps warmup={warmup} must be >= 0")
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise ValueError(f"profile_steps device={device!r} but CUDA is not available; use device='cpu'")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    for _ in range(warmup):
        step_fn()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    step_s: list[float] = []
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
        for i in range(steps):
            t0 = time.perf_counter()
            with torch.profiler.record_function(f"kiln.profile.step_{i}"):
                step_fn()
                sync()
            step_s.append(time.perf_counter() - t0)

    ops = _op_table(prof.events(), cuda, steps)
    total_ms = sum(o.total_ms for o in ops)
    per_cat = {c: 0.0 for c in CATEGORIES}
    for o in ops:
        per_cat[o.category] += o.total_ms
    summary = {
        "device": str(dev),
        "time_kind": "cuda_kernel" if cuda else "self_cpu",
        "steps": steps,
        "warmup": warmup,
        "record_shapes": record_shapes,
        "step_time_ms": {"mean": 1e3 * statistics.fmean(step_s), "min": 1e3 * min(step_s),
                         "max": 1e3 * max(step_s), "all": [1e3 * s for s in step_s]},
        "op_time_ms_per_step": total_ms / steps,
        "categories": {c: {"total_ms": t, "per_step_ms": t / steps,
                           "percent": 100.0 * t / total_ms if total_ms else 0.0}
                       for c, t in sorted(per_cat.items(), key=lambda kv: -kv[1])},
        "n_ops": len(ops),
        "torch": torch.__version__,
    }
    paths = {name: out / name for name in ("trace.json", "ops.md", "ops.csv", "summary.json")}
    tmp_trace = out / f".trace.json.tmp-{uuid.uuid4().hex[:8]}"
    try:
        prof.export_chrome_trace(str(tmp_trace))
        os.replace(tmp_trace, paths["trace.json"])
    finally:
        tmp_trace.unlink(missing_ok=True)
    write_text_atomic(paths["ops.md"], _ops_markdown(ops, summary))
    write_text_atomic(paths["ops.csv"], _ops_csv(ops))
    write_text_atomic(paths["summary.json"], json.dumps(summary, indent=2) + "\n")
    return ProfileReport(out_dir=out, trace=paths["trace.json"], ops_md=paths["ops.md"], ops_csv=paths["ops.csv"],
                         summary_json=paths["summary.json"], summary=summary, ops=tuple(ops))


def _op_table(events, cuda: bool, steps: int) -> list[OpStat]:
    """Aggregate profiler events by name into ``OpStat`` rows, largest time first.

    CUDA: device-side events (kernels, memcpy, memset), by duration, leaving out the GPU copies of
    ``record_function`` ranges (same names as the CPU annotations). CPU: CPU ops by self time, leaving
    out ``record_function`` ranges (step markers, ``Optimizer.step#...``), whose self time is Python.
    """
    from torch.autograd import DeviceType

    annotations = {e.name for e in events if getattr(e, "is_user_annotation", False)}
    calls: dict[str, int] = {}
    us: dict[str, float] = {}
    for e in events:
        if e.name in annotations or getattr(e, "is_user_annotation", False):
            continue
        if cuda:
            if e.device_type == DeviceType.CPU:
                continue
            t = e.time_range.elapsed_us()
        else:
            if e.device_type != DeviceType.CPU or e.is_async:  # async: cross-thread ranges, no self time
                continue
            t = e.self_cpu_time_total
        calls[e.name] = calls.get(e.name, 0) + 1
        us[e.name] = us.get(e.name, 0.0) + t
    total = sum(us.values())
    rows = [OpStat(name=n, category=categorize(n), calls=calls[n], total_ms=t / 1e3, per_step_ms=t / 1e3 / steps,
                   percent=100.0 * t / total if total else 0.0) for n, t in us.items()]
    return sorted(rows, key=lambda r: (-r.total_ms, r.name))


def _ops_markdown(ops: list[OpStat], summary: dict[str, Any], top: int = 40) -> str:
    kind = "CUDA kernel time" if summary["time_kind"] == "cuda_kernel" else "self CPU time"
    st = summary["step_time_ms"]
    lines = [
        f"# Op profile: {summary['steps']} steps on {summary['device']} (after {summary['warmup']} warm-up)",
        "",
        (f"Step time {st['mean']:.2f} ms mean ({st['min']:.2f}-{st['max']:.2f}, profiler on); "
         f"op time ({kind}) {summary['op_time_ms_per_step']:.2f} ms per step. % is of the op time."),
        "",
        "| category | ms/step | % |",
        "|---|---:|---:|",
    ]
    lines += [f"| {c} | {v['per_step_ms']:.3f} | {v['percent']:.1f} |" for c, v in summary["categories"].items()]
    lines += ["", "| # | op | category | calls | total ms | ms/step | % |", "|---:|---|---|---:|---:|---:|---:|"]
    for i, o in enumerate(ops[:top], 1):
        name = o.name if len(o.name) <= 100 else o.name[:99] + "…"
        name = name.replace("|", "\\|")
        lines.append(f"| {i} | `{name}` | {o.category} | {o.calls} | {o.total_ms:.3f} | {o.per_step_ms:.3f} | "
                     f"{o.percent:.1f} |")
    rest = ops[top:]
    if rest:
        t = sum(o.total_ms for o in rest)
        lines.append(f"| | other ({len(rest)} ops) | | {sum(o.calls for o in rest)} | {t:.3f} | "
                     f"{t / summary['steps']:.3f} | {sum(o.percent for o in rest):.1f} |")
    return "\n".join(lines) + "\n"


def _ops_csv(ops: list[OpStat]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(OpStat.__dataclass_fields__), lineterminator="\n")
    w.writeheader()
    for o in ops:
        w.writerow(asdict(o))
    return buf.getvalue()

