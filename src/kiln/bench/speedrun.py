"""`kiln bench speedrun`: Kiln's speedrun recipe vs the plain PyTorch baseline at the same wall time.

Both sides train the same model shape on the same token shards for the same number of seconds of
training steps (the first step, which compiles, and evaluation excluded), then score the same held-out windows
(loss in nats per token and bits per byte, ``kiln.model.heldout.evaluate_heldout``):

- ``kiln``: ``kiln.train.train`` with a preset (default ``speedrun``) and ``max_seconds`` set: the
  real trainer, every choice of the preset (optimizer, schedule, document-aligned windows...).
- ``torch``: ``kiln.bench.baseline.PlainLlama`` (torch.compile, SDPA, fused torch AdamW, bf16
  autocast) with nanoGPT's recipe: random windows, linear warm-up then cosine decay to 10% of the
  peak over the time budget, the preset's peak lr, batch, warm-up and ``weight_decay`` (keys of
  Kiln's own recipe, such as ``optimizer`` or ``muon_weight_decay``, do not apply to it).

The held-out set is the first ``--eval-tokens`` tokens of ``val_*.bin`` (2,097,152 by default) in
context-length windows: the same tokens for both sides and for every batch size, so a batch-size
ablation compares like with like (the older ``--eval-batches`` sized it in batches, which moved
it with the batch size).

``--repeats`` runs each side several times with different seeds; the spread of the repeats is the
run-to-run noise the comparison has to beat.

``--time-limit`` fits the benchmark into time slots shorter than itself (a 10-minute run per side
does not fit a 10-minute job): when this process reaches the limit, the run in progress writes
a checkpoint (Kiln: the trainer's own; the baseline: model, optimizer, data position, clock) and
the command exits with status 75. The same command then resumes it; finished runs are reused
(``OUT/<side>_seed<seed>/row.json``), so the table fills over several calls. The training clock
of a resumed run excludes each process's first (compiling) step. A row is reused only for the
same *recipe*: each run's key holds the settings it resolved to (``recipe``), not just the preset's
name, so a preset whose values changed trains again; the finished run it replaces is moved to
``OUT/.replaced/`` and the command says which settings differed.

``kiln bench speedrun-report FOLDER[=LABEL] ...`` trains nothing: it joins the finished runs of
several ``--out`` folders (seeds run in separate slots or on separate machines, ablations run one
setting at a time) into one table, groups them by recipe (or by the labels given), and weighs every
Kiln setting against every baseline setting with ``compare_sides``. Runs scored on different
held-out tokens or trained for different budgets are refused, not mixed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kiln.artifacts import config_to_dict, write_json_atomic, write_text_atomic


@dataclass
class SpeedrunRow:
    side: str
    seed: int
    seconds: float
    steps: int
    tokens: int
    val_loss: float
    val_bpb: float | None


def run_torch(cfg, tokens_dir: Path, seconds: float, seed: int, device, val, token_bytes,
              run_dir: Path | None = None, stop=None) -> SpeedrunRow | None:
    """The plain baseline for ``seconds`` of training steps, then the held-out score. With ``stop``
    (a ``StopRequest``) and ``run_dir``, a pause saves ``run_dir/state.pt`` and returns None; the
    next call resumes from it."""
    import torch

    from kiln.bench.baseline import build_plain
    from kiln.model.heldout import evaluate_heldout
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
    state_path = run_dir / "state.pt" if run_dir is not None else None
    step, before = 0, 0.0  # steps and training seconds of earlier processes (a resumed run)
    if state_path is not None and state_path.is_file():
        st = torch.load(state_path, map_location="cpu", weights_only=True)  # our own file; no pickled code
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sampler.load_state_dict(st["sampler"])
        step, before = int(st["step"]), float(st["seconds"])
        torch.set_rng_state(st["rng"])
        if device.type == "cuda" and "cuda_rng" in st:
            torch.cuda.set_rng_state(st["cuda_rng"], device)
        print(f"torch seed {seed}: resumed at step {step} ({before:.0f}/{seconds:g} s)", flush=True)
    t0, elapsed = time.perf_counter(), before
    every = 10 if device.type == "cuda" else 1
    first, start = 0.0, step  # each process's first step (compilation) is off the clock, as in kiln.train
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
        if step % every == 0 or step < start + 3:
            loss.item()  # the clock must see the GPU: sync every 10 steps (the host runs ahead otherwise)
            if step == start + 1:
                first = time.perf_counter() - t0
            elapsed = before + time.perf_counter() - t0 - first
            if step % 100 == 0:  # progress, as kiln train's log lines give on the other side
                print(f"torch step {step} | loss {loss.item():.3f} | lr {lr:.1e} | {elapsed:.0f}/{seconds:g} s",
                      flush=True)
            why = stop.reason() if stop is not None and state_path is not None and elapsed < seconds else None
            if why:
                st = {"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
                      "step": step, "seconds": elapsed, "rng": torch.get_rng_state()}
                if device.type == "cuda":
                    st["cuda_rng"] = torch.cuda.get_rng_state(device)
                tmp = state_path.with_suffix(".tmp")
                torch.save(st, tmp)
                os.replace(tmp, state_path)  # atomic: a kill mid-save leaves the previous state
                print(f"torch seed {seed}: paused at step {step} ({why}), {elapsed:.0f}/{seconds:g} s done", flush=True)
                return None
    model.eval()
    r = evaluate_heldout(model, val, token_bytes, cfg.model.context_length, mb, max_batches=None,
                         device=device, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    return SpeedrunRow("torch", seed, round(elapsed, 1), step, step * cfg.tokens_per_step, r["loss"], r["bpb"])


def run_kiln(cfg, tokens_dir: Path, tokenizer: str | None, seconds: float, seed: int, device, val, token_bytes,
             out: Path, stop=None) -> SpeedrunRow | None:
    """Kiln's trainer with ``max_seconds=seconds``, then the same held-out score; None when ``stop``
    paused it (its checkpoint is in ``out/kiln_seed<seed>``, resumed by the next call)."""
    import torch

    from kiln.model.heldout import evaluate_heldout
    from kiln.model import load_pretrained
    from kiln.train import train

    torch._dynamo.reset()
    run_cfg = replace(cfg, max_seconds=seconds, seed=seed, eval_every=0, sample_every=0, save_every=0,
                      device=str(device))
    run_dir = train(run_cfg, tokens_dir, out / f"kiln_seed{seed}", tokenizer_path=tokenizer, resume=True, stop=stop)
    if stop is not None and stop.paused:
        return None
    manifest = json.loads((run_dir / "manifest.json").read_text())
    model = load_pretrained(run_dir / "model", device=device)
    model.eval()
    r = evaluate_heldout(model, val, token_bytes, cfg.model.context_length, cfg.micro_batch, max_batches=None,
                         device=device, autocast_dtype=torch.bfloat16 if device.type == "cuda" else None)
    stats = manifest["stats"]
    steps = stats["steps"]
    train_s = stats.get("train_seconds", stats["seconds"] - stats.get("first_step_seconds", 0.0))
    return SpeedrunRow("kiln", seed, round(train_s, 1), steps, stats["tokens_seen"], r["loss"], r["bpb"])


def _cells(r: SpeedrunRow) -> str:
    """``seed | train s | steps | tokens | val loss | val bpb``: one run's cells in every speedrun table."""
    bpb = f"{r.val_bpb:.4f}" if r.val_bpb is not None else "n/a"
    return f"{r.seed} | {r.seconds:.0f} | {r.steps} | {r.tokens / 1e6:.1f}M | {r.val_loss:.4f} | {bpb}"


def format_table(rows: list[SpeedrunRow]) -> str:
    out = ["| side | seed | train s | steps | tokens | val loss | val bpb |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.side} | {_cells(r)} |")
    summary = []
    for side in ("torch", "kiln"):
        losses = [r.val_loss for r in rows if r.side == side]
        if losses:
            spread = f" (spread {max(losses) - min(losses):.4f} over {len(losses)} runs)" if len(losses) > 1 else ""
            summary.append(f"- {side}: mean val loss {statistics.mean(losses):.4f}{spread}")
    verdict = compare_sides(rows)
    return "\n".join(out + [""] + summary + ([f"- {verdict}"] if verdict else []))


def compare_sides(rows: list[SpeedrunRow]) -> str | None:
    """One line: Kiln's margin over the baseline against run-to-run noise, or None without both sides.

    Noise is the larger of the two sides' seed spreads (max - min of val loss). The margin counts as
    larger than the noise only when it exceeds that spread *and* Kiln is lower for every seed both
    sides ran (there must be at least one such seed: unpaired runs cannot show it). Welch's t
    (margin over its standard error) is printed too: with two seeds per side a spread is a rough
    noise estimate, and t says how rough. With one run on either side the noise is unknown, and the
    line says so (naming the side) instead of guessing."""
    kiln = {r.seed: r.val_loss for r in rows if r.side == "kiln"}
    base = {r.seed: r.val_loss for r in rows if r.side == "torch"}
    if not kiln or not base:
        return None
    margin = statistics.mean(base.values()) - statistics.mean(kiln.values())  # > 0: Kiln lower
    head = f"margin (torch - kiln, mean val loss): {margin:+.4f}"
    if len(kiln) < 2 or len(base) < 2:
        return (head + f"; noise unknown: kiln has {len(kiln)} run(s), torch {len(base)}; each side needs two or "
                "more seeds (--repeats 2 or more)")
    noise = max(max(v.values()) - min(v.values()) for v in (kiln, base))
    se = math.sqrt(sum(statistics.variance(v.values()) / len(v) for v in (kiln, base)))
    t = f"{margin / se:.1f}" if se > 0 else "inf"
    paired = [base[s] - kiln[s] for s in sorted(kiln.keys() & base.keys())]
    every = bool(paired) and all(d > 0 for d in paired)
    pairs = ", ".join(f"{d:+.4f}" for d in paired) or "n/a"
    if margin <= 0:
        verdict = "Kiln not lower"
    elif margin > noise and every:
        verdict = "Kiln lower by more than the noise"
    else:
        verdict = "not shown: the margin does not exceed the noise"
    return (f"{head}; noise (largest seed spread) {noise:.4f}; per seed {pairs}; "
            f"Welch t {t} ({len(kiln)} + {len(base)} runs): {verdict}")


# What does not change what a run learns: set per run by this benchmark, or logging and sampling.
_NOT_RECIPE = {"seed", "max_seconds", "device", "eval_every", "eval_batches", "eval_tokens", "sample_every",
               "sample_prompt", "sample_tokens", "sample_temperature", "save_every", "keep_last", "log_every"}
# The baseline's whole recipe: the model's shape and these keys (see run_torch and build_plain).
_BASELINE_KEYS = ("batch_size", "micro_batch_size", "lr", "weight_decay", "betas", "warmup_steps", "grad_clip")
_KILN_ONLY_MODEL_KEYS = {"attention_impl", "norm_impl", "linear_impl", "qk_norm"}


def recipe(cfg, side: str) -> dict:
    """The resolved settings a run of ``side`` trains with, flat (``model.d_model``) and JSON-plain:
    part of each run's key, so a finished row is reused only for the same recipe (not merely the
    same preset name and ``--set`` list: a preset's values change between versions), and what
    ``speedrun-report`` groups runs by. The baseline's recipe holds only what it reads, so Kiln-only
    keys (``optimizer``, ``muon_weight_decay``...) never split or invalidate its runs."""
    full = config_to_dict(cfg)
    flat = {f"model.{k}": v for k, v in full.pop("model").items()}
    if side == "torch":
        flat = {k: v for k, v in flat.items() if k.removeprefix("model.") not in _KILN_ONLY_MODEL_KEYS}
        flat.update({k: full[k] for k in _BASELINE_KEYS})
    else:
        flat.update({k: v for k, v in full.items() if k not in _NOT_RECIPE})
    return dict(sorted(flat.items()))


def _key_diff(old: object, new: dict) -> str:
    """The key fields (recipe fields by name) in which ``old`` differs from ``new``."""
    if not isinstance(old, dict):
        return "an unreadable key"
    fields = [k for k in sorted(set(old) | set(new)) if k != "recipe" and old.get(k) != new.get(k)]
    ro, rn = old.get("recipe") or {}, new.get("recipe") or {}
    if "recipe" not in old:
        fields.append("recipe (not recorded: an older Kiln)")
    else:
        fields += [k for k in sorted(set(ro) | set(rn)) if ro.get(k) != rn.get(k)]
    return ", ".join(fields) or "nothing"


def _prepare_run_dir(run_dir: Path, key: dict) -> SpeedrunRow | None:
    """A finished row with this key (reused), else None. A paused run of other settings is
    cleared; a *finished* run of other settings is moved to ``<out>/.replaced/<name>`` (the last
    one replaced is kept there), and both say what differs."""
    saved = None
    try:
        saved = json.loads((run_dir / "row.json").read_text())
        if saved.get("key") == key:
            return SpeedrunRow(**saved["row"])
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    try:
        old_key = json.loads((run_dir / "key.json").read_text())
        if old_key == key:
            return None  # a paused run of these settings: resume it
    except (OSError, ValueError):
        old_key = None
    if saved is not None:
        kept = run_dir.parent / ".replaced" / run_dir.name
        shutil.rmtree(kept, ignore_errors=True)
        kept.parent.mkdir(exist_ok=True)
        os.replace(run_dir, kept)
        print(f"{run_dir}: its finished run had other settings (differs in: "
              f"{_key_diff(saved.get('key') if isinstance(saved, dict) else None, key)}); moved to {kept}, "
              "training again", flush=True)
    elif old_key is not None:
        print(f"{run_dir}: a paused run of other settings (differs in: {_key_diff(old_key, key)}); "
              "starting over", flush=True)
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    write_json_atomic(run_dir / "key.json", key)
    return None


def run(args: argparse.Namespace) -> int:
    import torch

    from kiln.bench.report import pick_device
    from kiln.tokenizer import Tokenizer
    from kiln.train import PRESETS, apply_overrides
    from kiln.train.data import read_heldout
    from kiln.train.stop import PAUSED_EXIT_CODE, StopRequest, parse_duration

    sides = args.sides.split(",")
    unknown = [s for s in sides if s not in ("kiln", "torch")]
    if unknown or args.repeats < 1 or args.seconds <= 0:
        print(f"--sides takes kiln and/or torch (got {unknown or sides}), --repeats >= 1, --seconds > 0",
              file=sys.stderr)
        return 2
    try:
        stop = StopRequest(parse_duration(args.time_limit) if args.time_limit else None)
    except ValueError as e:
        print(f"--time-limit: {e}", file=sys.stderr)
        return 2
    device = pick_device(args.device)
    cfg = apply_overrides(PRESETS[args.preset](), args.overrides)
    tokens_dir = Path(args.tokens)
    token_bytes = Tokenizer.load(args.tokenizer).token_bytes() if args.tokenizer else None
    # --eval-tokens: the same held-out tokens whatever the batch size (a batch-size ablation needs
    # that); the older --eval-batches counts micro-batches, so its set moves with the batch size.
    for flag, v in (("--eval-tokens", args.eval_tokens), ("--eval-batches", args.eval_batches)):
        if v is not None and v < 1:
            print(f"{flag} {v}: must be a positive count (e.g. --eval-tokens 2097152)", file=sys.stderr)
            return 2
    sizing = (replace(cfg, eval_batches=args.eval_batches, eval_tokens=0) if args.eval_batches is not None
              else replace(cfg, eval_tokens=args.eval_tokens))
    val = read_heldout(tokens_dir, sizing.eval_token_count + 1)
    ctx = cfg.model.context_length
    if val is None or val.size - 1 < ctx:
        have = "no val_*.bin shards" if val is None else f"only {val.size} held-out tokens"
        print(f"--tokens {tokens_dir}: {have}; the comparison needs at least one {ctx}-token window of "
              "held-out tokens (tokenize a corpus with a validation split)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    env = {"device": hw, "torch": torch.__version__, "date": str(dt.date.today())}  # for speedrun-report
    rows: list[SpeedrunRow] = []
    paused = False
    with stop.signals_handled():
        for i in range(args.repeats):
            seed = cfg.seed + i
            for side in sides:
                run_dir = out / f"{side}_seed{seed}"
                key = {"side": side, "seed": seed, "preset": args.preset, "overrides": list(args.overrides),
                       "seconds": args.seconds, "val_tokens": int(val.size - 1), "recipe": recipe(cfg, side)}
                row = _prepare_run_dir(run_dir, key)
                if row is not None:
                    print(f"{side} seed {seed}: finished earlier (val loss {row.val_loss:.4f}): reused", flush=True)
                    rows.append(row)
                    continue
                if stop.reason():
                    paused = True
                    break
                print(f"{side} seed {seed}: training for {args.seconds:g} s...", flush=True)
                if side == "kiln":
                    row = run_kiln(cfg, tokens_dir, args.tokenizer, args.seconds, seed, device, val, token_bytes,
                                   out, stop=stop)
                else:
                    row = run_torch(cfg, tokens_dir, args.seconds, seed, device, val, token_bytes,
                                    run_dir=run_dir, stop=stop)
                if row is None:
                    paused = True
                    break
                write_json_atomic(run_dir / "row.json", {"key": key, "row": asdict(row), "env": env})
                rows.append(row)
                print(f"{side} seed {seed}: val loss {row.val_loss:.4f} after {row.steps} steps", flush=True)
            if paused:
                break
    text = (f"# kiln bench speedrun ({dt.date.today()}, {hw}, torch {torch.__version__})\n\n"
            f"preset {args.preset} {' '.join(args.overrides)}; {args.seconds:g} s of training steps per run; "
            f"val: {val.size - 1} held-out tokens\n\n" + format_table(rows))
    print(text)
    if paused:
        print(f"\npaused ({stop.reason()}): {len(rows)} of {args.repeats * len(sides)} runs finished; "
              "run the same command again to continue", flush=True)
        return PAUSED_EXIT_CODE
    write_text_atomic(out / "bench_speedrun.md", text + "\n")
    write_json_atomic(out / "bench_speedrun.json", [asdict(r) for r in rows])
    return 0


@dataclass(frozen=True)
class FinishedRun:
    """One finished run read back from a speedrun folder: its settings, its row, where it ran."""

    folder: str
    setting: str  # side and what the run trained with, e.g. "kiln speedrun muon_weight_decay=0.8"
    key: dict
    row: SpeedrunRow
    env: str  # "device, torch version, date", or "unrecorded" (rows from before the env field)


_RUN_DIR = re.compile(r"(kiln|torch)_seed\d+")  # what `kiln bench speedrun` names a run's folder


def _override_label(key: dict) -> str:
    """``preset k=v ...``: the last value of each ``--set`` key, sorted, without the seed."""
    last: dict[str, str] = {}
    for o in key.get("overrides", []):
        k, _, v = o.partition("=")
        if k != "seed":
            last[k] = v
    return " ".join([key.get("preset", "?"), *(f"{k}={v}" for k, v in sorted(last.items()))])


def collect_runs(folders: list[str]) -> tuple[list[FinishedRun], list[str]]:
    """Every finished run (``<side>_seed<seed>/row.json``) under the given ``kiln bench speedrun --out``
    folders, grouped into settings, and notes: unfinished runs, unreadable rows, repeats of one
    setting and seed (the first row is kept), and settings that share a name but not a recipe.

    A folder given as ``FOLDER=LABEL`` names its runs' setting ``<side> LABEL`` (runs from several
    folders with one label are one setting: say so only for runs of the same recipe). Otherwise runs
    are grouped by their recorded recipe (see ``recipe``), named by preset and ``--set`` overrides;
    rows from before recipes were recorded are grouped by that name and marked "recipe unrecorded".
    Raises ValueError for a folder with no run folders."""
    found: list[tuple[str, tuple, str, dict, SpeedrunRow, str]] = []  # folder, group, name, key, row, env
    notes: list[str] = []
    for spec in folders:
        folder, _, label = ("", "", "") if Path(spec).is_dir() else spec.partition("=")
        folder = folder or spec  # a folder whose own name holds "=" is taken whole
        base = Path(folder)
        if not base.is_dir():
            raise ValueError(f"{folder}: not a folder; pass folders given to `kiln bench speedrun --out` "
                             "(optionally as FOLDER=LABEL)")
        run_dirs = sorted(d for d in base.iterdir() if d.is_dir() and _RUN_DIR.fullmatch(d.name))
        if not run_dirs:
            raise ValueError(f"{folder}: no <side>_seed<seed> run folders; pass folders given to "
                             "`kiln bench speedrun --out` (optionally as FOLDER=LABEL)")
        for d in run_dirs:
            path = d / "row.json"
            if not path.exists():
                notes.append(f"{d}: not finished (no row.json); run its `kiln bench speedrun` command again")
                continue
            try:
                saved = json.loads(path.read_text())
                key, row = saved["key"], SpeedrunRow(**saved["row"])
                side = key["side"]
                env = saved.get("env")
                env_s = (", ".join(f"{pre}{env.get(k, '?')}" for pre, k in (("", "device"), ("torch ", "torch"),
                                                                          ("", "date")))
                         if isinstance(env, dict) else "unrecorded")
            except (OSError, ValueError, KeyError, TypeError) as e:
                notes.append(f"{path}: unreadable ({type(e).__name__}: {e}); skipped")
                continue
            if label:
                group, name = (side, "label", label), f"{side} {label}"
            elif "recipe" in key:
                group = (side, "recipe", json.dumps(key["recipe"], sort_keys=True))
                name = f"{side} {_override_label(key)}"
            else:
                name = f"{side} {_override_label(key)} (recipe unrecorded)"
                group = (side, "name", name)
            found.append((folder, group, name, key, row, env_s))
    # One name per group: the first run's; groups that share a name get numbered, with a note.
    names: dict[tuple, str] = {}
    for _, group, name, *_ in found:
        names.setdefault(group, name)
    taken: dict[str, list[tuple]] = {}
    for group, name in names.items():
        taken.setdefault(name, []).append(group)
    for name, groups in taken.items():
        if len(groups) > 1:
            for i, g in enumerate(groups, 1):
                names[g] = f"{name} [recipe {i}]"
            recipes = [json.loads(g[2]) for g in groups if g[1] == "recipe"]
            differ = sorted(k for k in set().union(*recipes) if len({json.dumps(r.get(k)) for r in recipes}) > 1)
            why = (f"they differ in: {', '.join(differ)} (the preset changed between the runs?)" if len(recipes) > 1
                   else "a label and recorded recipes share the name")
            notes.append(f"'{name}' names {len(groups)} different settings (numbered); {why}")
    runs: list[FinishedRun] = []
    seen: dict[tuple[str, int], str] = {}
    for folder, group, _, key, row, env_s in found:
        setting = names[group]
        where = f"{folder}/{key['side']}_seed{row.seed}"
        if (setting, row.seed) in seen:
            notes.append(f"{where}: {setting} seed {row.seed} already read from {seen[setting, row.seed]}; skipped")
            continue
        seen[setting, row.seed] = where
        runs.append(FinishedRun(folder, setting, key, row, env_s))
    return runs, notes


def format_report(runs: list[FinishedRun]) -> str:
    """The runs by setting (mean and spread per setting), then ``compare_sides`` for every Kiln
    setting against every baseline setting. Raises ValueError when the runs were scored on
    different held-out sets or trained for different budgets: their losses do not compare."""
    for field in ("val_tokens", "seconds"):
        values = {r.key.get(field) for r in runs}
        if len(values) > 1:
            where = "; ".join(f"{r.folder}/{r.row.side}_seed{r.row.seed}: {r.key.get(field)}" for r in runs)
            raise ValueError(f"the runs differ in {field} ({where}): losses compare only on the same held-out "
                             "tokens and the same training budget; report such folders separately")
    settings = list(dict.fromkeys(r.setting for r in runs))
    out = ["| setting | seed | train s | steps | tokens | val loss | val bpb | ran on |",
           "|---|---|---|---|---|---|---|---|"]
    for s in settings:
        for r in sorted((r for r in runs if r.setting == s), key=lambda r: r.row.seed):
            out.append(f"| {s} | {_cells(r.row)} | {r.env} |")
    out += ["", "| setting | runs | mean val loss | spread |", "|---|---|---|---|"]
    for s in settings:
        losses = [r.row.val_loss for r in runs if r.setting == s]
        spread = f"{max(losses) - min(losses):.4f}" if len(losses) > 1 else "n/a (one run)"
        out.append(f"| {s} | {len(losses)} | {statistics.mean(losses):.4f} | {spread} |")
    sides = {s: next(r.row.side for r in runs if r.setting == s) for s in settings}
    pairs = [(k, t) for k in settings if sides[k] == "kiln" for t in settings if sides[t] == "torch"]
    if pairs:
        out += ["", "Kiln against the baseline, setting by setting (`compare_sides`):", ""]
        for k, t in pairs:
            line = compare_sides([r.row for r in runs if r.setting in (k, t)])
            out.append(f"- **{k}** vs **{t}**: {line}")
    return "\n".join(out)


def _seconds(key: dict) -> str:
    secs = key.get("seconds")
    return f"{secs:g}" if isinstance(secs, (int, float)) else "?"


def plot_report(runs: list[FinishedRun], out_png: Path) -> Path:
    """Held-out loss per setting, one dot per seed and a bar at the mean (Kiln blue, baseline red),
    written atomically: the picture of ``format_report``'s tables."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = list(dict.fromkeys(r.setting for r in runs))
    fig = Figure(figsize=(max(6.0, 1.3 * len(settings) + 2), 4.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, s in enumerate(settings):
        mine = [r.row for r in runs if r.setting == s]
        color = "C0" if mine[0].side == "kiln" else "C3"
        ax.scatter([i] * len(mine), [x.val_loss for x in mine], color=color, zorder=3)
        mean = statistics.mean(x.val_loss for x in mine)
        ax.hlines(mean, i - 0.3, i + 0.3, color=color, lw=2)
        ax.annotate(f"{mean:.4f}", (i + 0.32, mean), fontsize=8, va="center")
    ax.set_xticks(range(len(settings)), settings, rotation=20, ha="right", fontsize=8)
    ax.set_xlim(-0.5, len(settings) - 0.2)
    ax.set_ylabel("held-out loss (nats/token)")
    ax.set_title(f"kiln bench speedrun-report: {_seconds(runs[0].key)} s per run (dots: seeds; bars: means)",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    tmp = out_png.with_name(out_png.stem + ".tmp.png")
    fig.savefig(tmp)
    os.replace(tmp, out_png)
    return out_png


def run_report(args: argparse.Namespace) -> int:
    """``kiln bench speedrun-report``: one table and verdict from runs finished in several folders."""
    try:
        runs, notes = collect_runs(args.folders)
        if not runs:
            raise ValueError("no finished runs in " + ", ".join(args.folders) + "".join(f"\n- {n}" for n in notes))
        table = format_report(runs)
    except ValueError as e:
        print(f"kiln bench speedrun-report: {e}", file=sys.stderr)
        return 2
    first = runs[0].key
    text = (f"# kiln bench speedrun-report ({dt.date.today()})\n\n{len(runs)} finished runs from "
            f"{len(args.folders)} folder(s); {_seconds(first)} s of training steps per run; val: "
            f"{first.get('val_tokens', '?')} held-out tokens\n\n{table}")
    if notes:
        text += "\n\nNotes:\n" + "\n".join(f"- {n}" for n in notes)
    print(text)
    if args.out:
        folder = Path(args.out)
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "bench_speedrun_report.md", text + "\n")
        write_json_atomic(folder / "bench_speedrun_report.json",
                          [{"folder": r.folder, "setting": r.setting, "env": r.env, **asdict(r.row)} for r in runs])
        plot_report(runs, folder / "bench_speedrun_report.png")
    return 0


def add_bench_parser(bench_subparsers: argparse._SubParsersAction) -> None:
    """Register ``kiln bench speedrun`` and ``kiln bench speedrun-report``."""
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
    p.add_argument("--eval-tokens", type=int, default=2_097_152,
                   help="held-out tokens scored (the first ones of val_*.bin, in context-length windows); the "
                   "same set for every batch size")
    p.add_argument("--eval-batches", type=int, default=None,
                   help="older way to size the held-out set: batches of micro-batch x context tokens (so it "
                   "changes with the batch size; use --eval-tokens to compare batch sizes)")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--time-limit", default=None, metavar="DURATION",
                   help="pause after this much wall time of this process (540, 9m): the run in progress "
                   "checkpoints, the command exits with status 75, and the same command continues it")
    p.add_argument("--out", required=True, help="directory for run folders and bench_speedrun.md/json")
    p.set_defaults(func=run)
    r = bench_subparsers.add_parser(
        "speedrun-report",
        help="one table and verdict from speedrun runs finished in several --out folders (no training)",
        description="Reads <side>_seed<seed>/row.json under each folder, groups the runs by setting (side, "
        "preset, --set overrides except the seed), and compares every Kiln setting with every baseline "
        "setting against the seed noise. For runs made in separate slots or on separate machines.",
    )
    r.add_argument("folders", nargs="+", metavar="FOLDER[=LABEL]",
                   help="folders given to `kiln bench speedrun --out`; =LABEL names the setting of the runs in it "
                   "(one label over several folders makes them one setting)")
    r.add_argument("--out", default=None, help="write bench_speedrun_report.md/json/png here")
    r.set_defaults(func=run_report)


def main(argv: list[str] | None = None) -> int:
    """``python -m kiln.bench.speedrun ...``."""
    parser = argparse.ArgumentParser(prog="python -m kiln.bench.speedrun")
    add_bench_parser(parser.add_subparsers(dest="bench", required=True))
    return run(parser.parse_args(["speedrun", *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    sys.exit(main())
