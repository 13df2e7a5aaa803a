"""`kiln bench speedrun`: Kiln's speedrun recipe vs the plain PyTorch baseline at the same wall time.

Both sides train the same model shape on the same token shards for the same number of seconds of
training steps (the first step, which compiles, and evaluation excluded), then score the same held-out windows
(loss in nats per token and bits per byte, ``kiln.eval.heldout.evaluate_heldout``):

- ``kiln``: ``kiln.train.train`` with a preset (default ``speedrun``) and ``max_seconds`` set: the
  real trainer, every choice of the preset (optimizer, schedule, document-aligned windows...).
- ``torch``: ``kiln.bench.baseline.PlainLlama`` (torch.compile, SDPA, fused torch AdamW, bf16
  autocast) with nanoGPT's recipe: random windows, linear warm-up then cosine decay to 10% of the
  peak over the time budget, the preset's peak lr, batch and warm-up.

``--repeats`` runs each side several times with different seeds; the spread of the repeats is the
run-to-run noise the comparison has to beat.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass
class SpeedrunRow:
    side: str
    seed: int
    seconds: float
    steps: int
    tokens: int
    val_loss: float
    val_bpb: float | None


def _val_tokens(tokens_dir: Path, n: int):
    import numpy as np

    from kiln.shards import read_shard

    parts, have = [], 0
    for p in sorted(tokens_dir.glob("val_*.bin")):
        s = read_shard(p)
        parts.append(np.asarray(s.tokens[: n - have]))
        have += len(parts[-1])
        if have >= n:
            break
    if not parts:
        raise FileNotFoundError(f"no val_*.bin shards in {tokens_dir}: the comparison needs held-out tokens")
    return np.concatenate(parts)


def run_torch(cfg, tokens_dir: Path, seconds: float, seed: int, device, val, token_bytes, eval_batches: int) -> SpeedrunRow:
    """The plain baseline for ``seconds`` of training steps, then the held-out score."""
    import torch

    from kiln.bench.baseline import build_plain
    from kiln.eval.heldout import evaluate_heldout
    from kiln.shards import read_shard
    from kiln.train.data import TokenSampler

    torch._dynamo.reset()
    torch.manual_seed(seed)
    train = [read_shard(p).tokens for p in sorted(tokens_dir.glob("train_*.bin"))]
    sampler = TokenSampler(train, cfg.model.context_length, seed)
    model, opt = build_plain(cfg.model, device, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas)
    compiled = torch.compile(model) if device.type == "cuda" else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    mb = cfg.micro_batch
    accum = cfg.batch_size // mb
    min_lr = 0.1 * cfg.lr
    step, t0, elapsed = 0, time.perf_counter(), 0.0
    every = 10 if device.type == "cuda" else 1
    first = 0.0  # the first step (compilation) is off the clock, as in kiln.train (max_seconds)
    while elapsed < seconds:
        frac = min(elapsed / seconds, 1.0)
        lr = cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))
        if step >= cfg.warmup_steps:
            lr = min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        for _ in range(accum):
            x, y = sampler.next_batch(mb, device)
            with amp:
                loss = compiled(x, y)
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % every == 0 or step < 3:
            loss.item()  # the clock must see the GPU: sync every 10 steps (the host runs ahead otherwise)
            if step == 1:
                first = time.perf_counter() - t0
            elapsed = time.perf_counter() - t0 - first
            if step % 100 == 0:  # progress, as kiln train's log lines give on the other side
                print(f"torch step {step} | loss {loss.item():.3f} | lr {lr:.1e} | {elapsed:.0f}/{seconds:g} s",
                      flush=True)
    model.eval()
    r = evaluate_heldout(model, val, token_bytes, cfg.model.context_length, mb, max_batches=eval_batches,
                         device=device, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return SpeedrunRow("torch", seed, round(elapsed, 1), step, step * cfg.tokens_per_step, r["loss"], r["bpb"])


def run_kiln(cfg, tokens_dir: Path, tokenizer: str | None, seconds: float, seed: int, device, val, token_bytes,
             eval_batches: int, out: Path) -> SpeedrunRow:
    """Kiln's trainer with ``max_seconds=seconds``, then the same held-out score."""
    import torch

    from kiln.eval.heldout import evaluate_heldout
    from kiln.model import load_pretrained
    from kiln.train import train

    torch._dynamo.reset()
    run_cfg = replace(cfg, max_seconds=seconds, seed=seed, eval_every=0, sample_every=0, save_every=0,
                      device=str(device))
    run_dir = train(run_cfg, tokens_dir, out / f"kiln_seed{seed}", tokenizer_path=tokenizer, resume=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model = load_pretrained(run_dir / "model", device=device)
    model.eval()
    r = evaluate_heldout(model, val, token_bytes, cfg.model.context_length, cfg.micro_batch, max_batches=eval_batches,
                         device=device, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    stats = manifest["stats"]
    steps = stats["steps"]
    return SpeedrunRow("kiln", seed, round(stats["seconds"] - stats.get("first_step_seconds", 0.0), 1), steps, stats["tokens_seen"], r["loss"], r["bpb"])


def format_table(rows: list[SpeedrunRow]) -> str:
    out = ["| side | seed | train s | steps | tokens | val loss | val bpb |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bpb = f"{r.val_bpb:.4f}" if r.val_bpb is not None else "n/a"
        out.append(f"| {r.side} | {r.seed} | {r.seconds:.0f} | {r.steps} | {r.tokens / 1e6:.1f}M | {r.val_loss:.4f} | {bpb} |")
    summary = []
    for side in ("torch", "kiln"):
        losses = [r.val_loss for r in rows if r.side == side]
        if losses:
            spread = f" (spread {max(losses) - min(losses):.4f} over {len(losses)} runs)" if len(losses) > 1 else ""
            summary.append(f"- {side}: mean val loss {statistics.mean(losses):.4f}{spread}")
    return "\n".join(out + [""] + summary)


def run(args: argparse.Namespace) -> int:
    import torch

    from kiln.tokenizer import Tokenizer
    from kiln.train import PRESETS, apply_overrides

    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in ("kiln", "torch")]
    if unknown or args.repeats < 1 or args.seconds <= 0:
        print(f"--sides takes kiln and/or torch (got {unknown or sides}), --repeats >= 1, --seconds > 0",
              file=sys.stderr)
        return 2
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = apply_overrides(PRESETS[args.preset](), args.overrides)
    tokens_dir = Path(args.tokens)
    token_bytes = Tokenizer.load(args.tokenizer).token_bytes() if args.tokenizer else None
    val = _val_tokens(tokens_dir, args.eval_batches * cfg.micro_batch * cfg.model.context_length + 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[SpeedrunRow] = []
    for i in range(args.repeats):
        seed = cfg.seed + i
        for side in sides:
            print(f"{side} seed {seed}: training for {args.seconds:g} s...", flush=True)
            if side == "kiln":
                row = run_kiln(cfg, tokens_dir, args.tokenizer, args.seconds, seed, device, val, token_bytes,
                               args.eval_batches, out)
            else:
                row = run_torch(cfg, tokens_dir, args.seconds, seed, device, val, token_bytes, args.eval_batches)
            rows.append(row)
            print(f"{side} seed {seed}: val loss {row.val_loss:.4f} after {row.steps} steps", flush=True)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    text = (f"# kiln bench speedrun ({dt.date.today()}, {hw}, torch {torch.__version__})\n\n"
            f"preset {args.preset} {' '.join(args.overrides)}; {args.seconds:g} s of training steps per run; "
            f"val: {val.size - 1} held-out tokens\n\n" + format_table(rows))
    print(text)
    (out / "bench_speedrun.md").write_text(text + "\n")
    (out / "bench_speedrun.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    return 0


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench speedrun``."""
    p = bench_subparsers.add_parser(
        "speedrun",
        help="Kiln's speedrun preset vs the plain PyTorch baseline: held-out loss at the same training time",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--tokens", required=True, help="token shards directory (train_*.bin, val_*.bin)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (for bits per byte)")
    p.add_argument("--preset", default="speedrun", help="Kiln's training preset")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a preset key (both sides share shape, batch, lr, warm-up)")
    p.add_argument("--seconds", type=float, default=600.0, help="training seconds per run")
    p.add_argument("--sides", default="torch,kiln", help="comma list of kiln, torch")
    p.add_argument("--repeats", type=int, default=1, help="runs per side (seeds seed, seed+1, ...)")
    p.add_argument("--eval-batches", type=int, default=32, help="held-out batches (micro-batch x context each)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--out", required=True, help="directory for run folders and bench_speedrun.md/json")
    p.set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.speedrun ...``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.speedrun")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    return run(parser.parse_args(["speedrun", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
