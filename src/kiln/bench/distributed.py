"""``kiln bench distributed``: Kiln's DataParallel vs PyTorch DDP, scaling 1 -> N ranks, ZeRO-1 memory.

Run on N GPUs of one node (the target is N = 2)::

    torchrun --standalone --nproc_per_node 2 -m kiln.bench.distributed --shape gpt2_small

``kiln bench distributed --nproc 2`` launches exactly that itself. Every rank builds the same model;
rank 0 first trains alone (the 1-rank baseline, the others wait), then all ranks train with Kiln's
DataParallel and with torch DDP at each bucket size, then with ZeRO-1. Per-rank batch is fixed (weak
scaling), so the scaling efficiency is tokens/s on N ranks / (N x tokens/s on one).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Model shapes (a registry is a plain dict literal). d_ff follows SwiGLU's 8/3 x d_model, rounded.
SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 512, "context_length": 64, "d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 192},
    "gpt2_small": {"vocab_size": 50304, "context_length": 1024, "d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 2048},
    "350m": {"vocab_size": 50304, "context_length": 1024, "d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 2816},
}


@dataclass
class Row:
    """One benchmark configuration's result."""

    name: str
    ranks: int
    bucket_mb: float | None
    tokens_per_s: float
    step_ms: float
    opt_state_mib_per_rank: float | None = None
    peak_mem_mib: float | None = None


def add_bench_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``distributed`` to ``kiln bench``'s subcommands."""
    p = bench_subparsers.add_parser(
        "distributed",
        help="Kiln DDP vs torch DDP, 1 -> N rank scaling, bucket sizes, ZeRO-1 memory",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="model shape (default tiny)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank per step (default: 8 on GPU, 4 on CPU)")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the shape's context)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per configuration (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--buckets", default="1,10,100", help="bucket sizes in MiB, comma-separated (default 1,10,100)")
    p.add_argument("--nproc", type=int, default=2, help="ranks to launch when not already under torchrun (default 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if available")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per rank on the CPU (default 1)")
    p.add_argument("--out", type=Path, default=None, help="also write the rows as JSON here")


def _launch_under_torchrun(args: argparse.Namespace, argv: list[str]) -> int:
    """Re-run this module under ``torchrun --standalone`` with ``args.nproc`` ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "kiln.bench.distributed", *argv]
    print("launching: " + " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _argv_from_args(args: argparse.Namespace) -> list[str]:
    """The module's own command line for ``args`` (what each torchrun rank parses)."""
    argv = ["--shape", args.shape, "--steps", str(args.steps), "--warmup", str(args.warmup), "--buckets", args.buckets,
            "--device", args.device, "--threads", str(args.threads)]
    for flag, value in (("--batch", args.batch), ("--context", args.context), ("--out", args.out)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


def run(args: argparse.Namespace) -> int:
    """Entry point for ``kiln bench distributed`` (launches torchrun unless already under it)."""
    if "WORLD_SIZE" not in os.environ and args.nproc > 1:
        return _launch_under_torchrun(args, _argv_from_args(args))
    return bench(args)


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(args: argparse.Namespace) -> int:
    """Run every configuration on this rank; rank 0 prints the table."""
    import torch
    from torch import nn

    from kiln.distributed import (
        DataParallel,
        DistConfig,
        DistEnv,
        Runtime,
        ShardedOptimizer,
        all_reduce_max,
        apply_fsdp,
        init_distributed,
        optimizer_state_bytes,
        setup_rank_logging,
        shutdown_distributed,
        wrap_model,
    )
    from kiln.model import ModelConfig, Transformer

    device_type = None if args.device == "auto" else args.device
    env = DistEnv.from_environment(device_type=device_type)
    setup_rank_logging(env)
    if env.device_type == "cpu":
        torch.set_num_threads(args.threads)
    init_distributed(env, timeout_s=3600)  # rank 0's solo baseline keeps the others waiting
    device = env.device
    rt = Runtime(env)  # barrier() for the phases
    shape = dict(SHAPES[args.shape])
    T = args.context or shape["context_length"]
    B = args.batch or (8 if env.device_type == "cuda" else 4)
    cfg = ModelConfig(**{**shape, "context_length": T})
    torch.manual_seed(0)
    base = Transformer(cfg).to(device)
    n_params = sum(p.numel() for p in base.parameters())
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if env.device_type == "cuda" else None
    W = env.world_size
    g = torch.Generator(device="cpu").manual_seed(1 + env.rank)
    data = torch.randint(0, cfg.vocab_size, (4, B, T + 1), generator=g).to(device)

    def train(model: nn.Module, opt: Any, steps: int, all_ranks: bool = True) -> float:
        """Seconds for ``steps`` optimizer steps (after warm-up); ``all_ranks``: every rank trains."""
        def step(i: int) -> None:
            xy = data[i % data.shape[0]]
            opt.zero_grad(set_to_none=True)
            if amp is not None:
                with amp:
                    logits = model(xy[:, :-1])
            else:
                logits = model(xy[:, :-1])
            nn.functional.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten()).backward()
            opt.step()

        for i in range(args.warmup):
            step(i)
        _sync(device)
        if all_ranks:
            rt.barrier()  # start the clock together
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        _sync(device)
        return time.perf_counter() - t0

    def adamw(params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1)

    def peak() -> float | None:
        if env.device_type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(device) / 2**20

    def reset_peak() -> None:
        if env.device_type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    rows: list[Row] = []
    tokens = B * T * args.steps

    # 1 rank: rank 0 alone, no wrapper, no communication.
    if env.is_main:
        m = copy.deepcopy(base)
        opt = adamw(m.parameters())
        reset_peak()
        s = train(m, opt, args.steps, all_ranks=False)
        rows.append(Row("single (1 rank)", 1, None, tokens / s, 1000 * s / args.steps,
                        optimizer_state_bytes(opt) / 2**20, peak()))
        del m, opt
    rt.barrier()
    if W > 1:
        buckets = [float(b) for b in args.buckets.split(",") if b]
        for mb in buckets:
            for name in ("kiln DDP", "torch DDP"):
                m = copy.deepcopy(base)
                if name == "kiln DDP":
                    wrapped: nn.Module = DataParallel(m, env, bucket_mb=mb)
                else:
                    wrapped = wrap_model(m, env, DistConfig(strategy="torch_ddp", bucket_mb=mb))
                opt = adamw(wrapped.parameters())
                reset_peak()
                s = all_reduce_max(env, train(wrapped, opt, args.steps))
                rows.append(Row(f"{name} {mb:g} MiB", W, mb, W * tokens / s, 1000 * s / args.steps, None, peak()))
                del wrapped, m, opt
        # ZeRO-1: Kiln DDP (25 MiB buckets) + sharded AdamW; optimizer state per rank, max over ranks.
        m = copy.deepcopy(base)
        wrapped = DataParallel(m, env, bucket_mb=25)
        zopt = ShardedOptimizer(wrapped.parameters(), torch.optim.AdamW, env, lr=1e-4, weight_decay=0.1)
        reset_peak()
        s = all_reduce_max(env, train(wrapped, zopt, args.steps))
        zbytes = all_reduce_max(env, float(zopt.state_bytes()))
        rows.append(Row("kiln DDP 25 MiB + ZeRO-1", W, 25, W * tokens / s, 1000 * s / args.steps, zbytes / 2**20, peak()))
        del wrapped, m, zopt
        # FSDP2: parameters, gradients and optimizer state sharded (ZeRO-3), one unit per block.
        m = apply_fsdp(copy.deepcopy(base), env, DistConfig(strategy="fsdp"))
        opt = adamw(m.parameters())
        reset_peak()
        s = all_reduce_max(env, train(m, opt, args.steps))
        fbytes = all_reduce_max(env, float(optimizer_state_bytes(opt)))
        rows.append(Row("FSDP2 (fully_shard)", W, None, W * tokens / s, 1000 * s / args.steps, fbytes / 2**20, peak()))
        del m, opt
    if env.is_main:
        table = format_table(rows, args, env, n_params, B, T)
        print(table, flush=True)
        if args.out is not None:
            args.out.write_text(json.dumps({"shape": args.shape, "params": n_params, "batch_per_rank": B, "context": T,
                                            "world_size": W, "device": env.device_type, "backend": env.backend,
                                            "rows": [r.__dict__ for r in rows]}, indent=1))
    shutdown_distributed()
    return 0


def format_table(rows: list[Row], args: argparse.Namespace, env: Any, n_params: int, B: int, T: int) -> str:
    """Markdown table: tokens/s, step time, scaling efficiency, Kiln/torch ratio, memory."""
    import torch

    single = next((r for r in rows if r.ranks == 1), None)
    torch_by_bucket = {r.bucket_mb: r.tokens_per_s for r in rows if r.name.startswith("torch DDP")}
    dev = torch.cuda.get_device_name(env.device) if env.device_type == "cuda" else "CPU"
    lines = [
        (f"shape {args.shape} ({n_params / 1e6:.1f}M params), batch {B} x {T} tokens per rank, {env.world_size} ranks, "
        f"{dev}, backend {env.backend}, torch {torch.__version__}, {args.steps} timed steps"),
        "",
        "| configuration | ranks | tokens/s | step ms | scaling eff. | vs torch DDP | opt. state MiB/rank | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eff = f"{r.tokens_per_s / (r.ranks * single.tokens_per_s):.1%}" if single and r.ranks > 1 else ""
        vs = ""
        if r.name.startswith("kiln DDP") and "ZeRO" not in r.name and r.bucket_mb in torch_by_bucket:
            vs = f"{r.tokens_per_s / torch_by_bucket[r.bucket_mb]:.3f}x"
        opt_mib = f"{r.opt_state_mib_per_rank:.2f}" if r.opt_state_mib_per_rank is not None else ""
        pk = f"{r.peak_mem_mib:.0f}" if r.peak_mem_mib is not None else ""
        lines.append(f"| {r.name} | {r.ranks} | {r.tokens_per_s:,.0f} | {r.step_ms:.1f} | {eff} | {vs} | {opt_mib} | {pk} |")
    zero = next((r for r in rows if "ZeRO" in r.name), None)
    if single and zero and single.opt_state_mib_per_rank:
        ideal = single.opt_state_mib_per_rank / zero.ranks
        lines.append("")
        lines.append(f"ZeRO-1 optimizer state per rank: {zero.opt_state_mib_per_rank:.2f} MiB vs unsharded "
                     f"{single.opt_state_mib_per_rank:.2f} MiB / {zero.ranks} = {ideal:.2f} MiB "
                     f"({zero.opt_state_mib_per_rank / ideal - 1:+.1%} from ideal)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.distributed`` (what torchrun runs on every rank)."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.distributed", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if "WORLD_SIZE" not in os.environ and args.nproc > 1:
        return _launch_under_torchrun(args, sys.argv[1:] if argv is None else argv)
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())
