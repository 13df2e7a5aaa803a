"""``kiln profile``: a torch profiler trace and per-op table of training steps (docs/train.md#profiling)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``profile`` subcommand."""
    p = subparsers.add_parser(
        "profile",
        help="profile training steps: trace.json (Perfetto/chrome://tracing) and a per-op time table",
        description="Run a few training steps of a model shape under torch.profiler, on random tokens, and write "
        "trace.json, ops.md / ops.csv (per-op device time, by category) and summary.json to --out. "
        "The step is Kiln's real training step (the one `kiln train` runs), or the plain PyTorch baseline "
        "of `kiln bench train` with --variant torch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--shape", default=None, help="a `kiln bench train` shape (gpt2_small, 350m, tiny)")
    p.add_argument("--preset", default=None, help="or a training preset whose model to profile (tiny, gpt2_small, speedrun)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset's config key (model.d_model=512...), repeatable")
    p.add_argument("--variant", default="kiln", help="kiln, kiln+triton, torch or torch+liger")
    p.add_argument("--batch", type=int, default=0, help="sequences per step (0: the preset's micro-batch, or 8)")
    p.add_argument("--steps", type=int, default=5, help="profiled steps")
    p.add_argument("--warmup", type=int, default=3, help="unprofiled steps first (compilation)")
    p.add_argument("--compile", default="auto", choices=("auto", "on", "off"), help="torch.compile (auto: on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    import torch

    from kiln.bench.train import VARIANTS, _kiln_runner, _torch_runner, shapes
    from kiln.train import PRESETS, apply_overrides
    from kiln.train.profile import profile_steps

    if (args.shape is None) == (args.preset is None):
        print("give exactly one of --shape or --preset", file=sys.stderr)
        return 2
    if args.variant not in VARIANTS:
        print(f"unknown --variant {args.variant!r}; use one of {VARIANTS}", file=sys.stderr)
        return 2
    if args.shape is not None:
        table = shapes()
        if args.shape not in table:
            print(f"unknown --shape {args.shape!r}; use one of {sorted(table)}", file=sys.stderr)
            return 2
        mcfg, batch = table[args.shape], args.batch or 8
    else:
        if args.preset not in PRESETS:
            print(f"unknown --preset {args.preset!r}; use one of {sorted(PRESETS)}", file=sys.stderr)
            return 2
        cfg = apply_overrides(PRESETS[args.preset](), args.overrides)
        mcfg, batch = cfg.model, args.batch or cfg.micro_batch
    from kiln.bench.report import pick_device

    device = pick_device(args.device)
    compile_ = device.type == "cuda" if args.compile == "auto" else args.compile == "on"
    runner = _kiln_runner if args.variant.startswith("kiln") else _torch_runner
    torch.manual_seed(0)
    _, step = runner(mcfg, args.variant, device, lr=3e-4, compile_=compile_)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, mcfg.vocab_size, (batch, mcfg.context_length + 1), generator=g).to(device)
    counter = iter(range(10**9))

    def one_step() -> None:
        step(next(counter), data[:, :-1], data[:, 1:])

    report = profile_steps(one_step, args.out, steps=args.steps, warmup=args.warmup, device=device)
    print(report.ops_md.read_text())
    print(f"trace: {report.trace}  (open in https://ui.perfetto.dev or chrome://tracing)")
    return 0
