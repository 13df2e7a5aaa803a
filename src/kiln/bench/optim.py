"""`kiln bench optim`: one optimizer step of Kiln's Muon and AdamW vs torch.optim's, same run.

Every row updates the same parameters (a model shape's transformer-block matrices, the ones Muon
gets in training) from the same fixed gradients, on one device:

- ``torch.optim.Muon``: PyTorch's Muon (torch >= 2.9; ``adjust_lr_fn="match_rms_adamw"``, the
  update scale Kiln calls "moonshot"; Nesterov, momentum 0.95): one matrix at a time.
- ``kiln Muon eager``: ``kiln.train.muon.Muon`` with ``fused=False``: same-shaped matrices stacked
  and orthogonalized by one batched Newton-Schulz, bookkeeping as eager torch ops.
- ``kiln Muon fused``: ``fused=True``, what ``kiln train`` runs on CUDA: the same with the
  bookkeeping in two Triton passes (``kiln.kernels.muon``).
- ``torch AdamW fused`` / ``kiln AdamW fused``: AdamW on the same matrices, for scale (what an
  AdamW-only run spends on them).

Both Kiln rows pass the device-side guard tensor (``step(ok=...)``) as the trainer does. Columns:
``ms``: CUDA events around ``--steps`` back-to-back steps (host-inclusive: Python and launch cost
show where the GPU outruns the host); ``device ms``: the sum of GPU kernel time per step from
``torch.profiler`` (what the step costs when the host runs ahead, as in training); ``rel diff``:
||Delta W - Delta W_torch|| / ||Delta W_torch|| after one step from the same state, against
torch.optim.Muon for the Muon rows and torch's AdamW for the AdamW rows (bf16 Newton-Schulz:
~1e-2 expected).

A second table times the Newton-Schulz iterations alone on the same matrices: torch.optim.Muon's
formulation (one matrix at a time, ``addmm``) vs Kiln's batched ``baddbmm``.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

ROWS = ("torch.optim.Muon", "kiln Muon eager", "kiln Muon fused", "torch AdamW fused", "kiln AdamW fused")


@dataclass
class OptimRow:
    """One optimizer (or Newton-Schulz variant) on one shape's matrices."""

    table: str
    shape: str
    impl: str
    matrices: int
    params_m: float
    ms: float | None = None
    device_ms: float | None = None
    rel_diff: float | None = None
    note: str = ""
    error: str = ""


def _shape_cfgs() -> dict:
    from kiln.bench.train import shapes
    from kiln.train.config import speedrun

    return {"speedrun": speedrun().model, **shapes()}


def _block_matrices(cfg, device, seed: int = 0):
    """(params, grads): fresh copies of the block matrices of a model of ``cfg`` and fixed random
    gradients of a realistic scale (1e-3 x N(0, 1))."""
    import torch

    from kiln.model import build_model
    from kiln.train.muon import muon_param_groups

    torch.manual_seed(seed)
    model = build_model(cfg, device=device)
    mats = [p for g in muon_param_groups(model, 0.0, 1.0, 1.0)[0] for p in g["params"]]
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    grads = [(1e-3 * torch.randn(p.shape, generator=g)).to(device) for p in mats]
    return [p.detach().clone() for p in mats], grads


def _make_optimizer(impl: str, params, lr: float, wd: float):
    import torch

    from kiln.train.muon import Muon
    from kiln.train.optim import AdamW

    if impl == "torch.optim.Muon":
        if not hasattr(torch.optim, "Muon"):
            raise RuntimeError(f"torch {torch.__version__} has no torch.optim.Muon (added in 2.9)")
        return torch.optim.Muon(params, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True,
                                adjust_lr_fn="match_rms_adamw")
    if impl.startswith("kiln Muon"):
        return Muon(params, lr=lr, weight_decay=wd, momentum=0.95, nesterov=True, scale="moonshot",
                    fused=impl.endswith("fused"))
    if impl == "torch AdamW fused":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.95), fused=params[0].is_cuda)
    if impl == "kiln AdamW fused":
        return AdamW(params, lr=lr, weight_decay=wd, betas=(0.9, 0.95), fused=params[0].is_cuda)
    raise ValueError(f"unknown optimizer row {impl!r}; use one of {ROWS}")


def _device_ms(fn: Callable[[], None], iters: int) -> float | None:
    """GPU kernel time per call (ms), summed over the profiler's kernels; None without a GPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    total_us = sum(e.self_device_time_total for e in prof.key_averages())
    return total_us / 1e3 / iters


def bench_shape(shape: str, cfg, device, steps: int, warmup: int, rows: tuple[str, ...]) -> list[OptimRow]:
    """Every optimizer row, then the Newton-Schulz table, for one model shape."""
    import warnings

    import torch

    from kiln.bench.kernels import _time_ms
    from kiln.kernels import KernelFallbackWarning

    params0, grads = _block_matrices(cfg, device)
    n_mats, n_m = len(params0), sum(p.numel() for p in params0) / 1e6
    out: list[OptimRow] = []
    deltas: dict[str, list] = {}
    ok = torch.ones((), dtype=torch.bool, device=device)
    for impl in rows:
        row = OptimRow("step", shape, impl, n_mats, n_m)
        try:
            params = [torch.nn.Parameter(p.clone()) for p in params0]
            for p, g in zip(params, grads, strict=True):
                p.grad = g
            opt = _make_optimizer(impl, params, lr=1e-3, wd=0.1)
            step = (lambda o=opt: o.step(ok=ok)) if impl.startswith("kiln") else opt.step
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always", KernelFallbackWarning)
                step()  # one step from the shared start: the update compared across rows
            fell_back = [w for w in said if issubclass(w.category, KernelFallbackWarning)]
            if fell_back:  # e.g. "fused" on a CPU without TRITON_INTERPRET: say what was timed
                row.note = "ran the eager fallback: " + str(fell_back[0].message).split("reference: ")[-1]
            deltas[impl] = [p.detach() - p0 for p, p0 in zip(params, params0, strict=True)]
            row.ms = _time_ms(step, warmup, steps)
            row.device_ms = _device_ms(step, min(steps, 10))
        except Exception as e:  # noqa: BLE001 - a missing reference must not end the table
            row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            traceback.print_exc()
        out.append(row)
    for row in out:
        ref = "torch.optim.Muon" if "Muon" in row.impl else "torch AdamW fused"
        if row.impl != ref and row.impl in deltas and ref in deltas:
            num = sum(float((a - b).float().square().sum()) for a, b in zip(deltas[row.impl], deltas[ref], strict=True))
            den = sum(float(b.float().square().sum()) for b in deltas[ref])
            row.rel_diff = (num / den) ** 0.5 if den > 0 else None
    out.extend(bench_newton_schulz(shape, params0, device, steps, warmup))
    return out


def bench_newton_schulz(shape: str, mats, device, steps: int, warmup: int) -> list[OptimRow]:
    """Five Newton-Schulz steps on every matrix: torch.optim.Muon's per-matrix ``addmm`` form vs
    Kiln's batched ``baddbmm`` over same-shaped stacks."""
    import torch

    from kiln.bench.kernels import _time_ms
    from kiln.train.muon import NS_COEFFS, newton_schulz_iterations

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xs = [(m / m.norm()).to(dtype) for m in mats]
    stacks: dict[tuple, list] = {}
    for x in xs:
        stacks.setdefault(tuple(x.shape), []).append(x)
    stacked = [torch.stack(v) for v in stacks.values()]
    a, b, c = NS_COEFFS

    def per_matrix() -> list:
        outs = []
        for x in xs:
            t = x.size(0) > x.size(1)
            x = x.mT if t else x
            for _ in range(5):
                gram = x @ x.mT
                upd = torch.addmm(gram, gram, gram, beta=b, alpha=c)
                x = torch.addmm(x, upd, x, beta=a)
            outs.append(x.mT if t else x)
        return outs

    def batched() -> list:
        return [newton_schulz_iterations(s, 5) for s in stacked]

    rows = []
    got = torch.cat([o.flatten().float() for o in (t for s in batched() for t in s)])
    # per_matrix keeps the model's order; batched is grouped by shape: compare bucket by bucket
    order = [x for v in stacks.values() for x in v]
    ref = torch.cat([o.flatten().float() for o in _reorder(per_matrix(), xs, order)])
    n_m = sum(m.numel() for m in mats) / 1e6
    for impl, fn in (("per-matrix addmm (torch.optim.Muon's form)", per_matrix), ("kiln batched baddbmm", batched)):
        row = OptimRow("newton-schulz x5", shape, impl, len(mats), n_m)
        row.ms = _time_ms(fn, warmup, steps)
        row.device_ms = _device_ms(fn, min(steps, 10))
        if fn is batched:
            row.rel_diff = float((got - ref).norm() / ref.norm())
        rows.append(row)
    return rows


def _reorder(outs: list, xs: list, order: list) -> list:
    """``outs`` (aligned with ``xs``) rearranged into ``order`` (the same tensors, bucketed by shape)."""
    pos = {id(x): i for i, x in enumerate(xs)}
    return [outs[pos[id(x)]] for x in order]


def format_table(rows: list[OptimRow]) -> str:
    """Markdown: one row per optimizer (or Newton-Schulz form) and shape; ``vs first`` is the first
    row's ms over this row's (per table and shape)."""
    out = ["| shape | table | impl | matrices | params | ms | vs first | device ms | rel diff | note |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    first: dict[tuple, float] = {}
    for r in rows:
        key = (r.shape, r.table)
        if r.error:
            out.append(f"| {r.shape} | {r.table} | {r.impl} | {r.matrices} | {r.params_m:.1f}M | failed: {r.error} | | | | |")
            continue
        first.setdefault(key, r.ms)
        dev = f"{r.device_ms:.3f}" if r.device_ms is not None else "n/a"
        rel = f"{r.rel_diff:.1e}" if r.rel_diff is not None else ""
        out.append(f"| {r.shape} | {r.table} | {r.impl} | {r.matrices} | {r.params_m:.1f}M | {r.ms:.3f} "
                   f"| {first[key] / r.ms:.2f}x | {dev} | {rel} | {r.note} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report

    device = pick_device(args.device)
    table = _shape_cfgs()
    if args.steps < 1 or args.warmup < 0:
        print(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})", file=sys.stderr)
        return 2
    names = args.shapes.split(",")
    wanted = tuple(args.rows.split(","))
    for name in names:
        if name not in table:
            print(f"unknown shape {name!r}; use one of {sorted(table)}", file=sys.stderr)
            return 2
    for impl in wanted:
        if impl not in ROWS:
            print(f"unknown row {impl!r}; use one of {ROWS}", file=sys.stderr)
            return 2
    rows: list[OptimRow] = []
    for name in names:
        print(f"{name}: {len(wanted)} optimizers, {args.warmup} warm-up + {args.steps} timed steps each...", flush=True)
        rows.extend(bench_shape(name, table[name], device, args.steps, args.warmup, wanted))
    report("optim", device, "One optimizer step on each shape's transformer-block matrices (fp32 parameters, "
           f"fixed gradients); {args.steps} timed steps after {args.warmup} warm-up steps.", format_table(rows),
           rows, args.out)
    return 0 if not any(r.error for r in rows if not r.impl.startswith("torch")) else 1


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench optim``."""
    p = bench_subparsers.add_parser(
        "optim",
        help="one step of Kiln's Muon and AdamW vs torch.optim's on a model's block matrices",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shapes", default="speedrun,350m", help="comma list of model shapes "
                   "(speedrun, gpt2_small, 350m, tiny)")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma list from {','.join(ROWS)}")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (Triton compilation)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", default=None, help="directory for bench_optim.md and bench_optim.json")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.optim ...``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.optim")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    return run(parser.parse_args(["optim", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
