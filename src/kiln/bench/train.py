"""`kiln bench train`: Kiln's training step vs a plain PyTorch baseline (and Liger), same run.

Every row trains the same model shape on the same random token batches, one GPU, bf16 autocast:

- ``torch``: the plain baseline of ``kiln.bench.baseline`` (torch.compile, SDPA, fused torch
  AdamW, loss inside forward): what a careful PyTorch user writes.
- ``torch+liger``: the same with Liger-Kernel's RMSNorm, RoPE, SwiGLU and fused linear + CE.
- ``kiln``: Kiln's model and Kiln's real training step (``kiln.train.step.TrainStep``, the one
  ``kiln train`` runs): model + loss compiled as one graph, device-side spike guard, gradient
  clipping without a host sync, AdamW update masked by the guard and compiled into fused kernels.
- ``kiln+triton``: the same with Kiln's Triton kernels chosen by config (FlashAttention-2 style
  attention, fused RMSNorm, chunked linear + cross-entropy).
- ``kiln+muon``: ``kiln`` with the optimizer the speedrun preset uses: Muon (fused, ``kiln.kernels.muon``)
  for the block matrices and AdamW for the rest (``kiln.train.muon.muon_with_adamw``).
- ``kiln+det``, ``kiln+triton+det``: ``kiln`` and ``kiln+triton`` in ``TrainConfig.deterministic``'s
  mode (``kiln.kernels.deterministic_mode``: torch's deterministic algorithms, cuBLAS's fixed
  workspace, Kiln's kernels on one fixed launch configuration): the price of bitwise-reproducible
  GPU steps. Not in the default list; run them with their base rows, e.g.
  ``--variants kiln,kiln+det,kiln+triton,kiln+triton+det``.
- ``kiln+fp8``: ``kiln`` with float8 GEMMs for the block matrices (``ModelConfig.linear_impl="fp8"``,
  ``kiln.kernels.fp8``: e4m3, row-wise scales, all three GEMMs of each linear). MFU is still
  counted against the bf16 peak, so it stays comparable with the other rows.

Metrics: tokens/s over the timed steps (CUDA events around the whole span, nothing synced inside),
MFU = flops_per_token x tokens/s / peak (``Transformer.flops_per_token``: 6 N + 12 L d T, the same
formula for every row; peak 989 TFLOP/s dense bf16 on an H100 SXM), mean step time, and peak
memory (``torch.cuda.max_memory_allocated`` over the timed steps). The first ``--warmup`` steps
(compilation) are not timed; compile seconds are reported on their own.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import time
import traceback
from dataclasses import dataclass, replace

DEFAULT_VARIANTS = ("torch", "torch+liger", "kiln", "kiln+triton", "kiln+fp8", "kiln+muon")
VARIANTS = (*DEFAULT_VARIANTS, "kiln+det", "kiln+triton+det")


def shapes() -> dict:
    """Named model shapes (Llama layout, tied embeddings): GPT-2-small, the speedrun preset's, ~350M,
    and a CPU smoke size."""
    from kiln.model import ModelConfig
    from kiln.train.config import gpt2_small, speedrun

    return {
        "gpt2_small": gpt2_small().model,  # the training preset's shape (the runners pick the kernels)
        "speedrun": speedrun().model,  # the 10-minute preset: vocab 8192, head dim 128
        "350m": ModelConfig(vocab_size=50304, context_length=1024, d_model=1024, n_layers=24, n_heads=16,
                            d_ff=2752, tie_embeddings=True),
        "tiny": ModelConfig(vocab_size=512, context_length=64, d_model=64, n_layers=2, n_heads=4,
                            tie_embeddings=True),
    }


@dataclass
class TrainRow:
    """One variant on one shape."""

    shape: str
    variant: str
    params_m: float
    batch: int
    seq: int
    tok_s: float | None = None
    mfu: float | None = None
    step_ms: float | None = None
    peak_gb: float | None = None
    compile_s: float | None = None
    final_loss: float | None = None
    error: str = ""


def _kiln_runner(cfg, variant: str, device, lr: float, compile_: bool):
    import torch

    from kiln.distributed import SingleProcess
    from kiln.model import build_model
    from kiln.train.optim import AdamW, clip_grad_norm_, param_groups
    from kiln.train.step import TrainStep, make_loss_fn

    triton = variant.startswith("kiln+triton")
    mcfg = replace(cfg, attention_impl="triton" if triton else "sdpa", norm_impl="triton" if triton else "kiln",
                   linear_impl="fp8" if variant == "kiln+fp8" else "kiln")
    model = build_model(mcfg, device=device)
    if variant == "kiln+muon":
        from kiln.train.muon import muon_with_adamw

        opt = muon_with_adamw(model, weight_decay=0.1, adamw_lr=lr, betas=(0.9, 0.95))
        for inner in opt.optimizers:
            inner.fused = device.type == "cuda"
        for g in opt.param_groups:
            g["lr_scale"] = g["base_lr"] / lr
    else:
        opt = AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    loss_fn = make_loss_fn(model, model, "fused" if triton else "torch", compile_=compile_)
    step = TrainStep(loss_fn, model, model, opt, clip_grad_norm_, 1.0, SingleProcess(), amp, device)

    def run(i: int, x, y):
        return step(i, lr, lambda: (x, y), 1).loss

    return model, run


def _torch_runner(cfg, variant: str, device, lr: float, compile_: bool):
    import torch

    from kiln.bench.baseline import build_plain, plain_step

    model, opt = build_plain(cfg, device, liger=variant == "torch+liger", lr=lr)
    compiled = torch.compile(model) if compile_ else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()

    def run(i: int, x, y):
        return plain_step(compiled, opt, x, y, amp)

    return model, run


def bench_variant(shape: str, cfg, variant: str, batch: int, steps: int, warmup: int, device,
                  compile_: bool = True) -> TrainRow:
    """Build, compile (``warmup`` steps), then time ``steps`` steps of one variant."""
    import torch

    from kiln.model import Transformer
    from kiln.train.metrics import peak_flops

    row = TrainRow(shape, variant, 0.0, batch, cfg.context_length)
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator(device="cpu").manual_seed(0)
    data = torch.randint(0, cfg.vocab_size, (steps + warmup, batch, cfg.context_length + 1), generator=g)
    data = data.to(device)
    try:
        torch.manual_seed(0)
        runner = _kiln_runner if variant.startswith("kiln") else _torch_runner
        model, run = runner(cfg, variant, device, lr=3e-4, compile_=compile_)
        row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
        t0 = time.perf_counter()
        for i in range(warmup):
            run(i, data[i, :, :-1], data[i, :, 1:])
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        row.compile_s = round(time.perf_counter() - t0, 1)
        loss = None
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t1 = time.perf_counter()
        for i in range(warmup, warmup + steps):
            loss = run(i, data[i, :, :-1], data[i, :, 1:])
        if device.type == "cuda":
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3
            row.peak_gb = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        else:
            seconds = time.perf_counter() - t1
        tokens = steps * batch * cfg.context_length
        row.tok_s = tokens / seconds
        row.step_ms = 1e3 * seconds / steps
        peak = peak_flops(device)
        with torch.device("meta"):
            fpt = Transformer(cfg).flops_per_token(cfg.context_length)
        row.mfu = fpt * row.tok_s / peak if peak else None
        row.final_loss = float(loss) if loss is not None else None
    except Exception as e:  # noqa: BLE001 - one failing variant (e.g. Liger missing) must not end the table
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        traceback.print_exc()
    finally:
        data = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def format_table(rows: list[TrainRow]) -> str:
    """A markdown table; ``vs torch`` is each row's tokens/s over the plain baseline's, same shape."""
    base = {r.shape: r.tok_s for r in rows if r.variant == "torch" and r.tok_s}
    out = ["| shape | variant | params | batch x seq | tokens/s | vs torch | MFU | step ms | peak GB | compile s | loss |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.error:
            out.append(f"| {r.shape} | {r.variant} | {r.params_m:.0f}M | {r.batch} x {r.seq} | failed: {r.error} |"
                       " | | | | | |")
            continue
        ratio = f"{r.tok_s / base[r.shape]:.2f}x" if base.get(r.shape) else ""
        mfu = f"{100 * r.mfu:.1f}%" if r.mfu is not None else "n/a"
        peak = f"{r.peak_gb:.1f}" if r.peak_gb is not None else "n/a"
        out.append(f"| {r.shape} | {r.variant} | {r.params_m:.0f}M | {r.batch} x {r.seq} | {r.tok_s:,.0f} | {ratio} "
                   f"| {mfu} | {r.step_ms:.1f} | {peak} | {r.compile_s} | {r.final_loss:.3f} |")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report
    from kiln.kernels import deterministic_mode

    device = pick_device(args.device)
    table = shapes()
    if args.steps < 1 or args.warmup < 0:
        print(f"--steps must be >= 1 and --warmup >= 0 (got {args.steps}, {args.warmup})", file=sys.stderr)
        return 2
    rows = []
    for name in args.shapes.split(","):
        if name not in table:
            print(f"unknown shape {name!r}; use one of {sorted(table)}", file=sys.stderr)
            return 2
        batch = args.batch or {"gpt2_small": 32, "speedrun": 64, "350m": 16, "tiny": 4}[name]
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                print(f"unknown variant {variant!r}; use one of {VARIANTS}", file=sys.stderr)
                return 2
            compile_ = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
            print(f"{name} {variant}: building{' and compiling' if compile_ else ''}, "
                  f"{args.warmup} warm-up + {args.steps} timed steps...", flush=True)
            with deterministic_mode(variant.endswith("+det")):
                row = bench_variant(name, table[name], variant, batch, args.steps, args.warmup, device, compile_)
            rows.append(row)
            print(f"{name} {variant}: " + (row.error or f"{row.tok_s:,.0f} tok/s"), flush=True)
    report("train", device, f"{args.steps} timed steps after {args.warmup} warm-up steps; bf16 autocast on CUDA.",
           format_table(rows), rows, args.out)
    return 0 if all(not r.error for r in rows if r.variant != "torch+liger") else 1


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench train``."""
    p = bench_subparsers.add_parser(
        "train",
        help="Kiln's training step vs a plain PyTorch baseline and Liger: tokens/s, MFU, memory",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shapes", default="gpt2_small,350m", help=f"comma list from {','.join(shapes())}")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma list from {','.join(VARIANTS)}")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0: 32 for gpt2_small, 64 for speedrun, 16 for 350m)")
    p.add_argument("--steps", type=int, default=30, help="timed steps")
    p.add_argument("--warmup", type=int, default=8, help="untimed steps first (compilation)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"),
                   help="torch.compile every variant (auto: on CUDA only)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu (cpu: a smoke run of the tiny shape)")
    p.add_argument("--out", default=None, help="directory for bench_train.md and bench_train.json")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.train ...``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.train")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    return run(parser.parse_args(["train", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
