"""`kiln scaling plan|run|fit|predict|lr-check|shards`: IsoFLOP sweeps and Chinchilla fits (docs/scaling.md)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="cpu_toy", help="sweep preset: cpu_toy, gutenberg_h100")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a ScalingConfig field (budgets=1e14,4e14 n_kind=total lr=5e-3 ...)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("scaling", help="scaling laws: IsoFLOP sweeps, Chinchilla's three fits, predictions",
                                   description="Plan and run an IsoFLOP sweep (resumable, parallel), fit it three ways "
                                   "with bootstrap intervals, predict the compute-optimal N, D and loss, check it.")
    sub = parser.add_subparsers(dest="scaling", metavar="ACTION")

    p = sub.add_parser("plan", help="print the sweep's grid (no training)")
    _sweep_args(p)
    p.add_argument("--tokens", help="shard folder (vocab and epochs from it)")
    p.add_argument("--vocab", type=int, default=0, help="vocab size when no --tokens is given")
    p.add_argument("--check-multiple", type=float, default=0.0, help="also show the check budget")
    p.set_defaults(func=_plan)

    p = sub.add_parser("run", help="run the sweep (resuming), fit, predict, check, report")
    _sweep_args(p)
    p.add_argument("--tokens", required=True, help="shard folder (train_*.bin, val_*.bin, tokenizer.json)")
    p.add_argument("--out", required=True, help="study folder")
    p.add_argument("--check-multiple", type=float, default=0.0,
                   help="train a check run at this many times the largest budget (0: none)")
    p.add_argument("--executor", choices=("local", "process", "ray"), default="local",
                   help="where the sweep's points run: this process, one process per device, or ray")
    p.add_argument("--devices", default="0", help="process executor: CUDA devices, comma-separated ('cpu' for none)")
    p.add_argument("--per-device", type=int, default=1, help="process executor: points at once per device")
    p.add_argument("--ray-address", default=None, help="ray executor: cluster address (default: start a local one)")
    p.add_argument("--time-limit", default=None, help="pause cleanly after this long (e.g. 9m); exit status 75")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits per approach")
    p.set_defaults(func=_run)

    p = sub.add_parser("fit", help="fit a sweep folder or a CSV/JSON of (N, D or C, loss) rows")
    p.add_argument("input", help="sweep folder, or .csv/.json rows")
    p.add_argument("--out", default=None, help="write fit.json and the PNGs here")
    p.add_argument("--n-kind", default="compute", choices=("compute", "total", "non_embedding"),
                   help="which N of a sweep's points (rows files give one N)")
    p.add_argument("--flops-rule", default=None, choices=("exact", "6N"), help="a sweep's C: its own rule, or 6N")
    p.add_argument("--target", type=float, default=None, help="predict at this budget (FLOPs)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap refits per approach")
    p.add_argument("--top-starts", type=int, default=16, help="approach 3: L-BFGS starts (0: all 4,500)")
    p.add_argument("--skip-bad", action="store_true", help="leave bad rows out (counted) instead of stopping")
    p.add_argument("--drop-worst", type=int, default=0, help="leave out the K highest-loss rows (outliers)")
    p.set_defaults(func=_fit)

    p = sub.add_parser("predict", help="compute-optimal N, D, loss at budgets, from a fit.json")
    p.add_argument("fit", help="fit.json written by `kiln scaling fit --out` or `run`")
    p.add_argument("--budget", type=float, action="append", required=True, help="FLOPs (repeatable)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("lr-check", help="does the learning rate transfer across width? (widths x lrs)")
    _sweep_args(p)
    p.add_argument("--tokens", required=True, help="shard folder (train_*.bin, val_*.bin)")
    p.add_argument("--out", required=True, help="folder for the runs and the learning-rate table")
    p.add_argument("--widths", default="32,64,128", help="d_model values")
    p.add_argument("--lrs", default="3e-3,1e-2,3e-2", help="peak learning rates")
    p.add_argument("--tokens-per-run", type=int, default=400_000, help="training tokens of every run")
    p.set_defaults(func=_lr_check)

    p = sub.add_parser("shards", help="cut a shard folder down to a budget of tokens (to carry to a GPU)")
    p.add_argument("--tokens", required=True, help="source shard folder (kiln tokenize output)")
    p.add_argument("--out", required=True, help="shard folder to write")
    p.add_argument("--train-tokens", type=int, required=True, help="training tokens to keep")
    p.add_argument("--val-tokens", type=int, default=1_000_000, help="held-out tokens to keep")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to copy in (default: the source's)")
    p.set_defaults(func=_shards)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _config(args):
    from kiln.scaling.sweep import PRESETS, apply_sets

    if args.preset not in PRESETS:
        raise ValueError(f"unknown preset {args.preset!r}; use one of {sorted(PRESETS)}")
    return apply_sets(PRESETS[args.preset](), args.set)


def _plan(args) -> int:
    from kiln.scaling.shapes import shape_for_params
    from kiln.scaling.sweep import data_info, make_point, plan, table

    cfg = _config(args)
    train_tokens = None
    if args.tokens:
        vocab, train_tokens = data_info(args.tokens)
    elif args.vocab:
        vocab = -(-args.vocab // 64) * 64
    else:
        raise ValueError("give --tokens (a shard folder) or --vocab")
    skipped: list[str] = []
    points = plan(cfg, vocab, train_tokens, skipped)
    print(table(points, train_tokens, cfg.n_kind))
    for s in skipped:
        print(f"left out: {s}")
    total = sum(p.flops for p in points)
    print(f"\n{len(points)} points, {total:.3e} FLOPs, {sum(p.tokens for p in points):,} tokens in all")
    if args.check_multiple:
        c = args.check_multiple * max(cfg.budgets)
        guess = (c / (6.0 * cfg.tokens_per_param)) ** 0.5  # the fit picks the real size
        p = make_point(cfg, shape_for_params(guess, cfg.shape_rule(vocab), cfg.n_kind), c, role="check")
        print(f"check at {c:.3e} FLOPs, e.g. {p.id}: {p.tokens:,} tokens"
              + (f" ({p.tokens / train_tokens:.2f} epochs)" if train_tokens else ""))
    return 0


def _executor(args):
    from kiln.scaling.executors import LocalExecutor, ProcessExecutor, RayExecutor
    from kiln.train.stop import parse_duration

    limit = parse_duration(args.time_limit) if args.time_limit else None
    if args.executor == "process":
        return ProcessExecutor([d.strip() for d in args.devices.split(",") if d.strip()], args.per_device, limit)
    if args.executor == "ray":
        return RayExecutor(args.ray_address)
    return LocalExecutor(limit)


def _run(args) -> int:
    from kiln.scaling.study import StudyConfig, run_study
    from kiln.train.stop import PAUSED_EXIT_CODE

    cfg = _config(args)
    rep = run_study(cfg, args.tokens, args.out, StudyConfig(check_multiple=args.check_multiple,
                                                            bootstrap=args.bootstrap), _executor(args))
    if rep["status"] == "paused":
        print(f"paused (time limit): run the same command again to go on ({args.out})")
        return PAUSED_EXIT_CODE
    print((Path(args.out) / "report.md").read_text())
    return 0


def _fit(args) -> int:
    from kiln.scaling.fit import fit_all, load_runs
    from kiln.scaling.study import fit_report_text, sweep_runs

    src = Path(args.input)
    dropped: dict = {}
    if src.is_dir():
        runs = sweep_runs(src, args.n_kind, args.flops_rule)
    else:
        runs, dropped = load_runs(src, skip_bad=args.skip_bad)
    if args.drop_worst:
        runs = sorted(runs, key=lambda r: r.loss)[: -args.drop_worst]
        dropped["highest_loss_outlier"] = args.drop_worst
    rep = fit_all(runs, bootstrap=args.bootstrap, top_starts=args.top_starts, dropped=dropped)
    print(fit_report_text(rep, args.target))
    if args.out:
        from kiln.artifacts import write_json_atomic
        from kiln.scaling.plots import plot_all

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "fit.json", rep.to_dict())
        for p in plot_all(runs, rep, out, args.target):
            print(f"wrote {p}")
    return 0


def _predict(args) -> int:
    from kiln.scaling.fit import FitReport
    from kiln.scaling.study import fit_report_text

    rep = FitReport.from_dict(json.loads(Path(args.fit).read_text()))
    for c in args.budget:
        print(fit_report_text(rep, c).split("\n\n", 1)[-1])
    return 0


def _lr_check(args) -> int:
    from kiln.scaling.lr_check import lr_check

    cfg = _config(args)
    widths = [int(w) for w in args.widths.split(",")]
    lrs = [float(v) for v in args.lrs.split(",")]
    print(lr_check(cfg, args.tokens, args.out, widths, lrs, args.tokens_per_run)["table"])
    return 0


def _shards(args) -> int:
    from kiln.scaling.data import subset_shards

    out = subset_shards(args.tokens, args.out, args.train_tokens, args.val_tokens, args.tokenizer)
    print(f"wrote {out}")
    return 0


