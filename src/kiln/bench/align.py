"""`kiln bench align`: SFT tokens/s, DPO pairs/s, GRPO samples/s, Kiln's stages vs trl's trainers.

Both sides train the same exported model (built here: a random-init Llama of ``--size``, saved in
Hugging Face layout with a chat tokenizer, so no network is needed) on the same generated data
(the seeded addition task as ``--turns``-turn conversations, preference pairs whose prompt is the
conversation so far, and GRPO prompts) with the same settings, one epoch or ``--max-steps`` steps (SFT, DPO) or
``--rollouts`` rollout batches (GRPO), checkpoints off:

- SFT: packed rows of ``--seq-len`` tokens, ``--batch`` rows a step, loss on assistant tokens
  (Kiln ``run_sft``; trl ``SFTTrainer(packing=True, assistant_only_loss=True)``). Rate: tokens of
  the training conversations per second.
- DPO: ``--batch`` pairs a step, sigmoid loss, reference log-probs computed once before training
  (Kiln's cache; trl ``precompute_ref_log_probs=True``). Rate: pairs per second.
- GRPO: ``--prompts`` prompts x ``--group`` samples per rollout batch, ``--max-new-tokens``, one
  optimizer step per batch, no KL, temperature 1, no vLLM (Kiln ``run_grpo`` over its engine; trl
  ``GRPOTrainer(loss_type="grpo")`` generating with ``transformers``). Rate: samples (rollout +
  update) per second.

The same on both sides: bf16 autocast over fp32 weights on a GPU, AdamW (fused on CUDA: Kiln's
Triton kernel, trl's ``adamw_torch_fused``) with betas (0.9, 0.95), no weight decay, gradient clip
1.0, no gradient checkpointing (trl 1.16 turns it on by default; the bench turns it off), torch's
SDPA attention, a log line every 50 steps. The rate is **after warm-up**: each side's clock starts
when step ``--warmup`` has finished (the GPU drained) and stops when the last step has, so
start-up, tokenization, the DPO reference pass, CUDA-graph capture and the first steps' allocator
and kernel warm-up are outside it on both sides (a second table says where that time went); "wall
s" is the row's process from launch to exit, imports included. ``--max-steps`` gives SFT and DPO
the same number of steps on both sides; a row stopped by ``--timeout`` reports its rate over the
steps it finished (``StepClock`` writes its progress to a file after its reads). Each side runs
in its own process, so "peak MiB" is that process's peak: CUDA's max allocated on a GPU
(``torch.cuda.max_memory_allocated``), the resident set on the CPU. "tokens computed / real" (DPO):
the token positions a side's model ran over those with a label, and the positions per step (Kiln:
counted by its batch source; trl: by a counting wrapper around its collator).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SIZES = {  # d_model, n_layers, n_heads, context
    "tiny": (64, 2, 4, 128),
    "small": (512, 8, 8, 512),
    "gpt2": (768, 12, 12, 1024),  # GPT-2 small's shape (the vocabulary is the bench's own, ~580 ids)
}
STAGES = ("sft", "dpo", "grpo")
SIDES = ("kiln", "trl")
UNITS = {"sft": "tokens", "dpo": "pairs", "grpo": "samples"}


@dataclass
class AlignRow:
    """One stage on one side."""

    stage: str
    impl: str
    unit: str
    count: int = 0
    """Units in the whole run (SFT: conversation tokens of one epoch; DPO: pairs; GRPO: samples)."""
    seconds: float | None = None
    """Wall time of the row: its process's launch to its exit (imports included), or to its stop."""
    steps: int = 0
    """Optimizer steps of the run."""
    timed_steps: int = 0
    """Steps inside the clock (after ``--warmup``)."""
    steady_seconds: float | None = None
    """Seconds of the timed steps (the GPU drained at both ends)."""
    rate: float | None = None
    """Units per second over the timed steps: count x timed_steps / steps / steady_seconds."""
    peak_mib: float | None = None
    error: str = ""
    partial: str = ""
    """Set when ``--timeout`` stopped the row: its rate is over the steps it finished ("stopped after N s")."""
    epoch_steps: int = 0
    """Steps of one pass over the data on this side (the rate's units per step: count / epoch_steps)."""
    phases: list = field(default_factory=list)
    """Start-up before the timed steps: [phase, seconds] in order (imports, model load, data, first step...)."""
    tokens: list = field(default_factory=list)
    """DPO: [real, computed(, batches)] token positions of the batches this side drew (real: inputs with a label;
    computed: rows x padded length, what the model runs)."""


PHASES = {  # start-up phases in order, as each side's child marks their ends
    "kiln": ("imports", "set-up: model load, tokenize, pack (DPO: reference pass; GRPO: engine)", "first step",
             "warm-up steps"),
    "trl": ("imports", "model load", "trainer init: load, tokenize, pack (DPO: reference pass)",
            "train() set-up (accelerate, optimizer, dataloader)", "first step", "warm-up steps"),
}
MIN_PARTIAL_STEPS = 3
"""Timed steps a row stopped by ``--timeout`` needs before its partial rate is shown and compared."""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="SFT/DPO/GRPO throughput: Kiln's stages vs trl's trainers",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (tiny: CPU; small: ~30M, GPU)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to time")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="kiln and/or trl")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--conversations", type=int, default=256, help="SFT conversations / DPO pairs (one epoch)")
    p.add_argument("--turns", type=int, default=1, help="question-answer turns per conversation (DPO: the last is the pair)")
    p.add_argument("--batch", type=int, default=8, help="SFT rows / DPO pairs per step")
    p.add_argument("--seq-len", type=int, default=0, help="SFT row length (0: the size's context)")
    p.add_argument("--prompts", type=int, default=8, help="GRPO prompts per rollout batch")
    p.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    p.add_argument("--rollouts", type=int, default=4, help="GRPO rollout batches")
    p.add_argument("--max-new-tokens", type=int, default=32, help="GRPO reply length limit")
    p.add_argument("--max-steps", type=int, default=0,
                   help="SFT and DPO optimizer steps per row, the same on both sides (0: one epoch); GRPO: --rollouts")
    p.add_argument("--warmup", type=int, default=2, help="steps (GRPO: rollout batches) before each side's clock starts")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and sampling")
    p.add_argument("--timeout", type=float, default=0, help="seconds per row before it is stopped (0: none)")
    p.add_argument("--learning", action="store_true",
                   help="instead of speed: the learning check (SFT, DPO on hh-rlhf, GRPO vs trl's GRPO; "
                        "kiln.bench.align_learning)")
    p.add_argument("--hh-rlhf", default="", help="--learning: hh-rlhf harmless-base test.jsonl.gz (default: "
                   "../shared/data/align/hh-rlhf/... or .devcarry/hh-rlhf/...; 'none': no DPO row)")
    p.add_argument("--gsm8k", default="", help="--learning: GSM8K test.jsonl for the accuracy before/after (optional)")
    p.add_argument("--grpo-seconds", type=float, default=0,
                   help="--learning: seconds of GRPO training per side (0: the plan's, 30 for small)")
    p.add_argument("--out", default=None, help="write bench_align.md/.json here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report

    device = pick_device(args.device)
    if args.learning:
        from kiln.bench.align_learning import run_learning

        return run_learning(args, device)
    seq = args.seq_len or SIZES[args.size][3]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-align-") as tmp:
        work = Path(tmp)
        counts = prepare(work, args.size, args.conversations, seq, args.seed, args.turns)
        spec_base = {"work": str(work), "device": str(device), "batch": args.batch, "seq": seq, "seed": args.seed,
                     "prompts": args.prompts, "group": args.group, "rollouts": args.rollouts,
                     "max_new_tokens": args.max_new_tokens, "warmup": args.warmup,
                     "max_steps": args.max_steps}
        rows = []
        for stage in args.stages:
            for side in args.sides:
                rows.append(_child(stage, side, spec_base, counts, args.timeout or None))
                print(_table(rows[-1:]).splitlines()[-1], flush=True)
    table = _table(rows) + "\n\n" + _phase_table(rows)
    blurb = (f"Model `{args.size}` {SIZES[args.size]} (d_model, layers, heads, context), random init, exported to "
             f"Hugging Face layout; {args.conversations} conversations / pairs of {args.turns} turn(s) "
             f"({counts['sft_tokens']:,} SFT tokens), batch {args.batch}, rows of {seq} tokens; GRPO {args.prompts} "
             f"prompts x {args.group} samples, {args.rollouts} rollouts, {args.max_new_tokens} new tokens. Rates over "
             f"the steps after the first {args.warmup} (each side's clock starts with the GPU drained after step "
             f"{args.warmup}); wall s: the row's process from launch to exit (or stop). "
             + (f"SFT and DPO: {args.max_steps} steps on both sides. " if args.max_steps else "SFT and DPO: one epoch. ")
             + "Start-up (imports, model load, tokenization and packing, DPO's reference pass, the first steps) is "
             "outside every rate, on both sides; the second table says where it went. A row stopped by --timeout "
             f"reports its rate over the steps it finished (partial; compared when it has >= {MIN_PARTIAL_STEPS} "
             "timed steps). Same data, settings and device per stage; one process per row.")
    report("align", device, blurb, table, rows, args.out)
    return 0


def _qa(q: str, a: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}]


def prepare(work: Path, size: str, n: int, seq: int, seed: int, turns: int = 1) -> dict[str, int]:
    """Write the model folder (weights, HF tokenizer files, Kiln's kiln_tokenizer.json) and the data:
    ``n`` conversations of ``turns`` question-answer turns (SFT) and ``n`` pairs whose prompt is such a
    conversation up to its last question (DPO: chosen the right sum, rejected one off by 7)."""
    import torch

    from kiln.align.chat import ChatTemplate, add_chat_tokens, save_hf_tokenizer
    from kiln.align.rewards import addition_problems
    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model
    from kiln.tokenizer import Tokenizer, train_bpe

    probs = addition_problems(n * turns, seed, digits=3)
    text = work / "text.txt"
    text.write_text("".join(f"{q} The answer is {a}.\n" for q, a in addition_problems(2000, seed + 1, 3)))
    vocab, merges = train_bpe(text, 512, ["<|endoftext|>"])
    tok = add_chat_tokens(Tokenizer(vocab, merges, ["<|endoftext|>"]))
    d, L, H, ctx = SIZES[size]
    torch.manual_seed(seed)
    V = -(-tok.vocab_size // 64) * 64
    model = build_model(ModelConfig(vocab_size=V, context_length=max(ctx, seq), d_model=d, n_layers=L, n_heads=H))
    mdir = work / "model"
    save_pretrained(model, mdir)
    save_hf_tokenizer(tok, mdir)  # tokenizer.json (HF), tokenizer_config.json (chat template), kiln_tokenizer.json
    convs = [[m for q, a in probs[i * turns : (i + 1) * turns] for m in _qa(q, a)] for i in range(n)]
    sft = [{"messages": c} for c in convs]
    dpo = []
    for c in convs:
        a = c[-1]["content"].removeprefix("The answer is ").removesuffix(".")
        dpo.append({"prompt": c[:-1], "chosen": [c[-1]],
                    "rejected": [{"role": "assistant", "content": f"The answer is {int(a) + 7}."}]})
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (work / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    tpl = ChatTemplate.from_tokenizer(tok)
    lengths = [len(tpl.render(c, add_generation_prompt=False)) for c in convs]
    if max(lengths) > seq + 1:
        raise ValueError(f"a conversation of {max(lengths)} tokens does not fit rows of {seq}; lower --turns")
    return {"sft_tokens": sum(lengths), "pairs": len(dpo)}


def _child(stage: str, side: str, spec: dict, counts: dict, timeout: float | None = None,
           program: list[str] | None = None) -> AlignRow:
    """Run one row in its own process (``program``: this module's child, or a test's stand-in, given the spec
    as its last argument); a row stopped by ``timeout`` reports what its progress file holds."""
    row = AlignRow(stage, "Kiln" if side == "kiln" else "trl", UNITS[stage])
    progress = Path(spec["work"]) / f"progress-{stage}-{side}.json"
    progress.unlink(missing_ok=True)
    cmd = [*(program or [sys.executable, "-m", "kiln.bench.align"]),
           json.dumps({**spec, "stage": stage, "side": side, "progress": str(progress), "t0": time.time()})]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1",  # datasets' cache in the run's
                                                 "HF_DATASETS_CACHE": spec["work"] + "/hf_datasets"})  # temp dir
    row.count = {"sft": counts["sft_tokens"], "dpo": counts["pairs"],
                 "grpo": spec["prompts"] * spec["group"] * spec["rollouts"]}[stage]
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()  # this row's own child only
        proc.communicate()
        row.seconds = time.perf_counter() - t
        return _partial_row(row, progress, spec, f"stopped after {timeout:g} s (--timeout)")
    row.seconds = time.perf_counter() - t  # launch to exit, imports included (as a stopped row's)
    lines = [x for x in out.splitlines() if x.startswith("{\"result\"")]
    if proc.returncode or not lines:
        why = (err.strip().splitlines() or ["failed"])[-1][:200]
        if not progress.exists():
            row.error = why
            return row
        return _partial_row(row, progress, spec, f"failed after {row.seconds:.0f} s: {why}")
    return _fill(row, json.loads(lines[-1])["result"], spec)


def _fill(row: AlignRow, res: dict, spec: dict) -> AlignRow:
    """The row's steps, clock and rate from a child's result (or progress) record."""
    row.seconds = row.seconds or res.get("seconds")
    row.peak_mib = res.get("peak_mib")
    row.steps, row.timed_steps, row.steady_seconds = res["steps"], res["timed_steps"], res["steady_seconds"]
    row.epoch_steps, row.phases = res.get("epoch_steps") or 0, res.get("phases", [])
    row.tokens = res.get("tokens") or []
    if row.timed_steps <= 0 or not row.steady_seconds:
        if not row.partial:
            row.error = f"{row.steps} steps: none after the {spec['warmup']} warm-up steps; give it more data"
        return row
    per_step = row.count / (row.epoch_steps or row.steps)  # units of one step on this side
    row.rate = per_step * row.timed_steps / row.steady_seconds
    return row


def _partial_row(row: AlignRow, progress: Path, spec: dict, why: str) -> AlignRow:
    """A row that did not finish: the steps it timed before it stopped, from its progress file."""
    row.partial = why
    try:
        res = json.loads(progress.read_text())
    except (OSError, ValueError):
        res = None
    if res is None:
        row.error = row.error or f"{why}; no step reached"
        return row
    _fill(row, res, spec)
    names = PHASES["kiln" if row.impl == "Kiln" else "trl"]
    done = sum(sec for _, sec in row.phases)
    if row.seconds and len(row.phases) < len(names) and row.seconds > done:  # the phase it was stopped in
        row.phases.append([f"{names[len(row.phases)]} (unfinished)", row.seconds - done])
    if row.rate is None or row.timed_steps < MIN_PARTIAL_STEPS:
        row.rate = None
        row.error = row.error or f"{why}; {row.timed_steps} timed step(s), too few for a rate"
    return row


def _table(rows: list[AlignRow]) -> str:
    lines = ["| stage | impl | rate | unit/s | steps (timed) | timed s | wall s | peak MiB | tokens computed / real | vs trl |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    ref = {r.stage: r.rate for r in rows if r.impl == "trl" and r.rate}
    for r in rows:
        if r.rate is None:
            lines.append(f"| {r.stage} | {r.impl} | - | {r.unit} | {r.steps or '-'} | - | "
                         f"{_f(r.seconds, '.1f')} | {_f(r.peak_mib, ',.0f')} | {_tokens(r)} | error: {r.error} |")
            continue
        vs = f"{r.rate / ref[r.stage]:.2f}x" if r.stage in ref and r.impl == "Kiln" else ""
        if r.partial:
            vs = "; ".join(x for x in (vs, f"partial: {r.partial}") if x)
        lines.append(f"| {r.stage} | {r.impl} | {r.rate:,.1f} | {r.unit} | {r.steps} ({r.timed_steps}) | "
                     f"{r.steady_seconds:.2f} | {_f(r.seconds, '.1f')} | {_f(r.peak_mib, ',.0f')} | {_tokens(r)} | {vs} |")
    return "\n".join(lines)


def _tokens(r: AlignRow) -> str:
    """"computed / real = ratio (computed per step)": the padding's share of a side's work, or "-"."""
    if len(r.tokens) < 2 or not r.tokens[0]:
        return "-"
    real, computed = r.tokens[:2]
    batches = r.tokens[2] if len(r.tokens) > 2 else r.steps  # trl's loader may build a batch ahead
    per_step = f" ({computed / batches:,.0f}/step)" if batches else ""
    return f"{computed / real:.3f}{per_step}"


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def _phase_table(rows: list[AlignRow]) -> str:
    """Where each row's time went before its clock started (seconds per start-up phase)."""
    lines = ["| stage | impl | start-up before the timed steps (s) |", "|---|---|---|"]
    for r in rows:
        total = sum(s for _, s in r.phases)
        parts = ", ".join(f"{n} {s:.1f}" for n, s in r.phases) or "-"
        lines.append(f"| {r.stage} | {r.impl} | {parts}" + (f" (total {total:.1f})" if r.phases else "") + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------ child processes (one stage, one side)
def _peak_mib(device: str) -> float:
    import resource

    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class StepClock:
    """Times the steps after ``warmup`` and writes its progress as it goes.

    The clock reads at the end of step ``warmup`` and of the last step, and every couple of seconds in
    between (every ``progress_every`` s), each time after draining the GPU; a read that is not due costs
    nothing, so Kiln's runtime keeps its one queued step ahead between reads. Every read also writes
    ``progress`` (a JSON file, atomically: a temporary file then a rename) with the steps done, the
    timed steps and seconds so far, the start-up phases and the peak memory, so a row stopped by
    ``--timeout`` still reports what it measured. A ``kiln.train.Hook`` for Kiln's stages
    (``extra_hooks``); ``step_end`` is what trl's callback calls after every step, ``phase`` marks the
    end of a start-up phase (imports, model load, dataset preparation, ...)."""

    def __init__(self, warmup: int, cuda: bool, progress: Path | None = None, t0: float | None = None,
                 progress_every: float = 2.0) -> None:
        self.warmup, self.cuda, self.progress, self.progress_every = warmup, cuda, progress, progress_every
        self.t0 = time.time() if t0 is None else t0  # the parent's launch time (wall clock, seconds)
        self.marks: list[tuple[int, float]] = []  # (steps done, perf_counter)
        self.phases: list[tuple[str, float]] = []  # (phase, wall seconds since t0 when it ended)
        self.epoch_steps = 0  # steps of one pass over the data (0: unknown, taken as the run's steps)
        self._last_read = -1e30
        self._due: tuple[int, bool] | None = None
        self.at_step0: Callable[[], int] | None = None  # Kiln: reads epoch_steps once the stage has set up
        self.tokens: list[int] = []  # DPO: [real, computed] token positions drawn so far (trl: counted live)

    def due(self, step: int, last: bool) -> bool:  # the runtime's Hook protocol (asked twice per boundary)
        if self._due is None or self._due[0] != step or last:
            now = time.perf_counter()
            read = step in (0, 1, self.warmup) or last or (step > self.warmup and now - self._last_read >= self.progress_every)
            self._due = (step, read)
        return self._due[1]

    def fn(self, step: int) -> None:
        self.mark(step)

    def step_end(self, step: int, last: bool) -> None:
        """trl's callback: after every optimizer step; reads the clock when it is due."""
        if self.due(step, last):
            self.mark(step)

    def phase(self, name: str) -> None:
        """The start-up phase ``name`` ended now (its length: from the previous phase's end or launch)."""
        self.phases.append((name, time.time() - self.t0))
        self.write()

    def mark(self, step: int) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        now = time.perf_counter()
        self._last_read = now
        if not self.marks or self.marks[-1][0] != step:
            self.marks.append((step, now))
        if step == 0:
            if self.at_step0 is not None:
                self.epoch_steps = self.at_step0() or self.epoch_steps
            self.phase(PHASES["kiln"][1])
        elif step == 1:
            self.phase("first step")
        elif step == self.warmup:
            self.phase("warm-up steps")
        else:
            self.write()

    def result(self) -> dict[str, Any]:
        """steps (done), timed_steps and steady_seconds (0 when no step after warm-up), epoch_steps,
        and the start-up phases as [name, seconds] (each phase's own length)."""
        last = self.marks[-1] if self.marks else (0, 0.0)
        start = next((m for m in self.marks if m[0] == self.warmup), None)
        res: dict[str, Any] = {"steps": last[0], "timed_steps": 0, "steady_seconds": 0.0}
        if start is not None and last[0] > self.warmup:
            res.update(timed_steps=last[0] - start[0], steady_seconds=last[1] - start[1])
        ends = [0.0, *(t for _, t in self.phases)]
        res["phases"] = [[n, round(b - a, 3)] for (n, _), a, b in zip(self.phases, ends, ends[1:])]
        res["epoch_steps"] = self.epoch_steps
        if self.tokens:
            res["tokens"] = list(self.tokens)
        return res

    def write(self) -> None:
        """The progress file, atomically (a reader never sees half of it)."""
        if self.progress is None:
            return
        res = {**self.result(), "peak_mib": _peak_mib("cuda" if self.cuda else "cpu")}
        tmp = self.progress.with_name(self.progress.name + ".tmp")
        tmp.write_text(json.dumps(res))
        os.replace(tmp, self.progress)


def run_child(spec: dict[str, Any]) -> dict[str, float]:
    """Run one stage on one side; its wall time, timed steps and peak memory."""
    import torch

    torch.manual_seed(spec["seed"])
    if spec["device"].startswith("cuda"):  # TF32 for fp32 matmuls outside autocast on both sides, as Kiln's
        torch.set_float32_matmul_precision("high")  # stages set it (load_policy): trl's generation runs fp32 weights
    work, out = Path(spec["work"]), Path(spec["work"]) / f"{spec['stage']}-{spec['side']}"
    fn = {("sft", "kiln"): _kiln_sft, ("dpo", "kiln"): _kiln_dpo, ("grpo", "kiln"): _kiln_grpo,
          ("sft", "trl"): _trl_sft, ("dpo", "trl"): _trl_dpo, ("grpo", "trl"): _trl_grpo}[(spec["stage"], spec["side"])]
    progress = Path(spec["progress"]) if spec.get("progress") else None
    clock = StepClock(spec["warmup"], spec["device"].startswith("cuda"), progress, spec.get("t0"))
    if spec["stage"] == "grpo":  # one optimizer step per rollout batch on both sides
        clock.epoch_steps = spec["rollouts"]
    t = time.perf_counter()
    fn(spec, work, out, clock)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t, "peak_mib": _peak_mib(spec["device"]), **clock.result()}


def _kiln_epoch_steps(out: Path, batch: int) -> int:
    """Steps of one pass on Kiln's side, from the stage's first log line (``sft: N training conversations
    in R rows`` / ``dpo: N training pairs``); 0 when it cannot be read."""
    import re

    try:
        text = (out / "train.log").read_text()
    except OSError:
        return 0
    m = re.search(r"training conversations in (\d+) rows", text) or re.search(r"dpo: (\d+) training pairs", text)
    return -(-int(m.group(1)) // batch) if m else 0


def _train(spec: dict, base: Any, **kw: Any) -> Any:
    from dataclasses import replace

    return replace(base, device=spec["device"], seed=spec["seed"], save_every=0, log_every=50, betas=(0.9, 0.95),
                   weight_decay=0.0, grad_clip=1.0, **kw)


def _kiln_sft(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from kiln.align.sft import SFTConfig, run_sft

    base = SFTConfig()
    cfg = SFTConfig(data=(str(work / "sft.jsonl"),), seq_len=spec["seq"], heldout_frac=0.0, eval_every=0,
                    sample_every=0, max_steps=spec.get("max_steps", 0),
                    train=_train(spec, base.train, batch_size=spec["batch"], lr=1e-4, warmup_steps=5))
    clock.phase("imports")
    clock.at_step0 = lambda: _kiln_epoch_steps(out, spec["batch"])
    run_sft(cfg, work / "model", out, resume=False, extra_hooks=[clock])


def _kiln_dpo(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from kiln.align.dpo import DPOConfig, run_dpo

    base = DPOConfig()
    cfg = DPOConfig(data=(str(work / "dpo.jsonl"),), seq_len=spec["seq"], heldout_frac=0.0, eval_every=0,
                    max_steps=spec.get("max_steps", 0),
                    train=_train(spec, base.train, batch_size=spec["batch"], lr=5e-6, warmup_steps=5))
    clock.phase("imports")
    clock.at_step0 = lambda: _kiln_epoch_steps(out, spec["batch"])
    run_dpo(cfg, work / "model", out, resume=False, extra_hooks=[clock])
    clock.tokens = _kiln_dpo_tokens(out)


def _kiln_dpo_tokens(out: Path) -> list[int]:
    """[real, computed] token positions of Kiln's DPO batches, from the run's last reward log line."""
    import re

    try:
        found = re.findall(r"tokens real (\d+) computed (\d+)", (out / "train.log").read_text())
    except OSError:
        return []
    return [int(x) for x in found[-1]] if found else []


def _kiln_grpo(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from kiln.align.grpo import GRPOConfig, run_grpo

    base = GRPOConfig()
    n = spec["prompts"] * spec["group"]
    cfg = GRPOConfig(task="addition", digits=3, group_size=spec["group"], prompts_per_rollout=spec["prompts"],
                     rollouts=spec["rollouts"], max_new_tokens=spec["max_new_tokens"], eval_every=0, temperature=1.0,
                     kl_coef=0.0, loss_type="grpo_clip", normalize_by_std=True,
                     train=_train(spec, base.train, batch_size=n, lr=2e-5, warmup_steps=0))
    clock.phase("imports")
    run_grpo(cfg, work / "model", out, resume=False, extra_hooks=[clock])


def _trl_common(spec: dict, out: Path) -> dict:
    """TrainingArguments both trainers share, set to Kiln's (see the module docstring)."""
    cuda = spec["device"].startswith("cuda")
    return {"output_dir": str(out), "report_to": [], "save_strategy": "no", "use_cpu": not cuda, "bf16": cuda,
            "logging_steps": 50, "seed": spec["seed"], "lr_scheduler_type": "cosine", "weight_decay": 0.0,
            "adam_beta1": 0.9, "adam_beta2": 0.95, "adam_epsilon": 1e-8, "max_grad_norm": 1.0,
            "optim": "adamw_torch_fused" if cuda else "adamw_torch", "gradient_checkpointing": False,
            "dataloader_num_workers": 0, "disable_tqdm": True}


def _trl_callbacks(clock: StepClock) -> list:
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            loader = kw.get("train_dataloader")
            if not clock.epoch_steps and loader is not None:
                clock.epoch_steps = -(-len(loader) // args.gradient_accumulation_steps)
            clock.phase(PHASES["trl"][3])

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.step_end(state.global_step, state.global_step == state.max_steps)

    return [Clock()]


def _trl_model(work: Path, spec: dict) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype="float32", attn_implementation="sdpa")
    return model.to(spec["device"]), AutoTokenizer.from_pretrained(work / "model")


def _trl_sft(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    clock.phase("imports")
    model, tok = _trl_model(work, spec)
    clock.phase(PHASES["trl"][1])
    ds = load_dataset("json", data_files=str(work / "sft.jsonl"), split="train")
    args = SFTConfig(**_trl_common(spec, out), per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                     max_steps=spec.get("max_steps") or -1, learning_rate=1e-4, warmup_steps=5, packing=True, max_length=spec["seq"],
                     assistant_only_loss=True)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=_trl_callbacks(clock))
    clock.phase(PHASES["trl"][2])
    trainer.train()


def _trl_dpo(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    clock.phase("imports")
    model, tok = _trl_model(work, spec)
    clock.phase(PHASES["trl"][1])
    ds = load_dataset("json", data_files=str(work / "dpo.jsonl"), split="train")
    args = DPOConfig(**_trl_common(spec, out), per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                     max_steps=spec.get("max_steps") or -1, learning_rate=5e-6, warmup_steps=5, beta=0.1, loss_type=["sigmoid"],
                     precompute_ref_log_probs=True, max_length=spec["seq"])
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, callbacks=_trl_callbacks(clock))
    trainer.data_collator = _counting_collator(trainer.data_collator, clock)
    clock.phase(PHASES["trl"][2])
    trainer.train()


def _counting_collator(collate: Callable[[list], dict], clock: StepClock) -> Callable[[list], dict]:
    """trl's collator, counting into ``clock.tokens`` the real (attention mask) and computed (rows x padded
    length) token positions of every batch it builds: chosen and rejected rows, padded to the longest."""
    clock.tokens = [0, 0, 0]

    def counted(features: list) -> dict:
        batch = collate(features)
        ids, attn = batch["input_ids"], batch.get("attention_mask")
        real = int(attn.sum()) if attn is not None else ids.numel()
        clock.tokens[0] += real - ids.shape[0]  # as Kiln counts: a row of n tokens has n - 1 labelled inputs
        clock.tokens[1] += ids.numel()
        clock.tokens[2] += 1
        return batch

    return counted


def _trl_grpo(spec: dict, work: Path, out: Path, clock: StepClock) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from kiln.align.rewards import addition_problems, addition_reward

    clock.phase("imports")
    model, tok = _trl_model(work, spec)
    clock.phase(PHASES["trl"][1])
    n = spec["prompts"] * spec["group"]
    probs = addition_problems(spec["prompts"] * spec["rollouts"], spec["seed"], 3)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in probs])

    def reward(completions: list, answer: list, **_: Any) -> list[float]:
        return [addition_reward(c[0]["content"] if isinstance(c, list) else c, a)["reward"]
                for c, a in zip(completions, answer)]

    args = GRPOConfig(**_trl_common(spec, out), per_device_train_batch_size=n, num_generations=spec["group"],
                      max_completion_length=spec["max_new_tokens"], max_steps=spec["rollouts"], learning_rate=2e-5,
                      warmup_steps=0, beta=0.0, temperature=1.0, top_p=1.0, top_k=0, loss_type="grpo",
                      scale_rewards="group", num_iterations=1, epsilon=0.2, use_vllm=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=_trl_callbacks(clock))
    clock.phase(PHASES["trl"][2])
    trainer.train()


if __name__ == "__main__":  # a child process of `kiln bench align`
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps({"result": run_child(json.loads(sys.argv[1]))}), flush=True)
