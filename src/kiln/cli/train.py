"""`kiln train`: pretrain a model on token shards (see docs/train.md)."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import textwrap
from pathlib import Path


def _fields_from_source(path: Path, cls: str) -> list[tuple[str, str, str]]:
    """(name, default source, docstring) of a dataclass's fields, read without importing it (so
    `kiln --help` never loads torch)."""
    try:
        tree = ast.parse(path.read_text())
    except OSError:
        return []
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            out = []
            body = node.body
            for i, a in enumerate(body):
                if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name):
                    doc = ""
                    if i + 1 < len(body) and isinstance(body[i + 1], ast.Expr) and isinstance(
                        getattr(body[i + 1], "value", None), ast.Constant
                    ):
                        doc = " ".join(str(body[i + 1].value.value).split())
                    default = ast.unparse(a.value) if a.value is not None else ""
                    out.append((a.target.id, default, doc))
            return out
    return []


def _config_epilog() -> str:
    spec = importlib.util.find_spec("kiln")
    root = Path(spec.origin).parent if spec and spec.origin else None
    if root is None:
        return ""
    lines = ["config keys for --set KEY=VALUE (TrainConfig defaults; a preset changes some):"]
    groups = [("", root / "train" / "config.py", "TrainConfig"), ("model.", root / "model" / "config.py", "ModelConfig")]
    for prefix, path, cls in groups:
        for name, default, doc in _fields_from_source(path, cls):
            if name == "model":
                continue
            if default.startswith("field("):
                default = "(see preset)"
            head = f"  {prefix}{name} = {default}"
            lines.append(head)
            lines.extend(textwrap.wrap(doc, 96, initial_indent="      ", subsequent_indent="      "))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="pretrain a model on token shards (checkpoints, exact resume, metrics, samples)",
        description=textwrap.fill(
            "Train a Kiln transformer on the train_*.bin shards of a tokens artifact; validate on "
            "val_*.bin (loss and bits per byte). Writes OUT/{train.log, metrics.jsonl, tb/, checkpoints/, "
            "model/, loss.png, manifest.json}, the manifest last. Re-running resumes from the newest "
            "checkpoint in OUT; a finished run with the same config and inputs is reused.", 96),
        epilog=_config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--tokens", required=True, metavar="DIR", help="tokens artifact directory (from `kiln tokenize`)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory to write (and resume from)")
    p.add_argument("--preset", default="tiny", help="starting config: tiny (CPU, minutes) or gpt2_small (GPU)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="optimizer steps to run (overrides the preset's max_steps and max_tokens)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer.json or tokenizer artifact (default: found via the tokens manifest); "
                   "enables bits per byte and samples")
    p.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set lr=3e-4 --set model.n_layers=6; "
                   "keys are listed below")
    p.add_argument("--no-resume", action="store_true",
                   help="start from step 0, deleting OUT's previous checkpoints and metrics")
    p.add_argument("--time-limit", default=None, metavar="DURATION",
                   help="pause after this much wall time of this process (540, 9m, 3h50m): write a checkpoint "
                   "at the next step and exit with status 75; the same command resumes. SIGTERM and SIGUSR1 "
                   "pause the same way (leave room for one checkpoint save)")
    d = p.add_argument_group("many processes (under torchrun; see docs/distributed.md)")
    d.add_argument("--dist-strategy", choices=("ddp", "torch_ddp", "fsdp"), default="ddp",
                   help="ddp: Kiln's bucketed, overlapped all-reduce; torch_ddp: PyTorch DDP; "
                   "fsdp: FSDP2 (parameters, gradients and optimizer state sharded)")
    d.add_argument("--zero1", action="store_true", help="shard optimizer state over ranks (ZeRO-1; ddp/torch_ddp)")
    d.add_argument("--bucket-mb", type=float, default=25.0, metavar="MIB", help="gradient bucket size (ddp, torch_ddp)")
    d.add_argument("--dist-timeout", type=float, default=600.0, metavar="S",
                   help="seconds before a collective that a dead or stuck rank never joins fails")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.train.config import PRESETS, apply_overrides
    from kiln.train.trainer import train

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; choose one of {sorted(PRESETS)}")
    from kiln.train.stop import PAUSED_EXIT_CODE, StopRequest, parse_duration

    cfg = apply_overrides(PRESETS[args.preset](), args.overrides)
    stop = StopRequest(parse_duration(args.time_limit) if args.time_limit else None)
    kw = {"tokenizer_path": args.tokenizer, "resume": not args.no_resume, "max_steps_override": args.max_steps,
          "stop": stop}
    env = _dist_env(cfg.device)
    if not env.is_distributed:
        with stop.signals_handled():
            out = train(cfg, args.tokens, args.out, **kw)
        if stop.paused:
            print(_paused_message(stop, out))
            return PAUSED_EXIT_CODE
        print(f"kiln train: wrote {out}")
        return 0
    from kiln.artifacts import code_version, config_to_dict
    from kiln.distributed import DistConfig, Runtime, per_rank_batch, setup_rank_logging

    per_rank_batch(cfg.batch_size, env.world_size, cfg.micro_batch_size or None)  # every rank fails alike, before joining
    dcfg = DistConfig(strategy=args.dist_strategy, zero1=args.zero1, bucket_mb=args.bucket_mb, timeout_s=args.dist_timeout)
    rt = Runtime.start(dcfg, env=env, config=config_to_dict(cfg), code=code_version())
    try:
        setup_rank_logging(env)
        with stop.signals_handled():
            out = train(cfg, args.tokens, args.out, dist=rt, **kw)
        rt.barrier()
    finally:
        rt.close()
    if stop.paused:
        if env.is_main:
            print(_paused_message(stop, out))
        return PAUSED_EXIT_CODE
    if env.is_main:
        print(f"kiln train: wrote {out} ({env.world_size} ranks, {dcfg.strategy}{' + zero1' if dcfg.zero1 else ''})")
    return 0


def _paused_message(stop, out) -> str:
    return (f"kiln train: paused at step {stop.paused_at} ({stop.reason()}); checkpoint in {out}/checkpoints. "
            "Run the same command again to resume.")


def _dist_env(device: str):
    """torchrun's variables, read once here; one GPU per rank unless the config asks for the CPU."""
    from kiln.distributed import DistEnv

    return DistEnv.from_environment(device_type="cpu" if device == "cpu" else None)
