"""`kiln bench align`: SFT tokens/s, DPO pairs/s, GRPO samples/s, Kiln's stages vs trl's trainers.

Both sides train the same exported model (built here: a random-init Llama of ``--size``, saved in
Hugging Face layout with a chat tokenizer, so no network is needed) on the same generated data
(the seeded addition task as conversations, preference pairs and GRPO prompts) with the same
settings, one epoch (SFT, DPO) or ``--rollouts`` rollout batches (GRPO), checkpoints off:

- SFT: packed rows of ``--seq-len`` tokens, ``--batch`` rows a step, loss on assistant tokens
  (Kiln ``run_sft``; trl ``SFTTrainer(packing=True, assistant_only_loss=True)``). Rate: tokens of
  the training conversations per second.
- DPO: ``--batch`` pairs a step, sigmoid loss, reference log-probs computed once before training
  (Kiln's cache; trl ``precompute_ref_log_probs=True``). Rate: pairs per second.
- GRPO: ``--prompts`` prompts x ``--group`` samples per rollout batch, ``--max-new-tokens``, one
  optimizer step per batch, no KL (Kiln ``run_grpo`` over its engine; trl ``GRPOTrainer``
  generating with ``transformers``). Rate: samples (rollout + update) per second.

Each side runs in its own process, so "peak MiB" is that process's peak: CUDA's max allocated on a
GPU, the resident set on the CPU. "s" is the stage's wall time from loading the model to trained
weights (tokenization and the reference pass included on both sides).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIZES = {  # d_model, n_layers, n_heads, context
    "tiny": (64, 2, 4, 128),
    "small": (512, 8, 8, 512),
}
STAGES = ("sft", "dpo", "grpo")
SIDES = ("kiln", "trl")


@dataclass
class AlignRow:
    """One stage on one side."""

    stage: str
    impl: str
    unit: str
    count: int = 0
    seconds: float | None = None
    rate: float | None = None
    peak_mib: float | None = None
    error: str = ""


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("align", help="SFT/DPO/GRPO throughput: Kiln's stages vs trl's trainers",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model shape (tiny: CPU; small: ~30M, GPU)")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="stages to time")
    p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES), help="kiln and/or trl")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--conversations", type=int, default=256, help="SFT conversations / DPO pairs (one epoch)")
    p.add_argument("--batch", type=int, default=8, help="SFT rows / DPO pairs per step")
    p.add_argument("--seq-len", type=int, default=0, help="SFT row length (0: the size's context)")
    p.add_argument("--prompts", type=int, default=8, help="GRPO prompts per rollout batch")
    p.add_argument("--group", type=int, default=8, help="GRPO samples per prompt")
    p.add_argument("--rollouts", type=int, default=4, help="GRPO rollout batches")
    p.add_argument("--max-new-tokens", type=int, default=32, help="GRPO reply length limit")
    p.add_argument("--seed", type=int, default=0, help="seed of the model, data and sampling")
    p.add_argument("--out", default=None, help="write bench_align.md/.json here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.bench.report import pick_device, report

    device = pick_device(args.device)
    seq = args.seq_len or SIZES[args.size][3]
    with tempfile.TemporaryDirectory(prefix="kiln-bench-align-") as tmp:
        work = Path(tmp)
        counts = prepare(work, args.size, args.conversations, seq, args.seed)
        spec_base = {"work": str(work), "device": str(device), "batch": args.batch, "seq": seq, "seed": args.seed,
                     "prompts": args.prompts, "group": args.group, "rollouts": args.rollouts,
                     "max_new_tokens": args.max_new_tokens}
        rows = []
        for stage in args.stages:
            for side in args.sides:
                rows.append(_child(stage, side, spec_base, counts))
    table = _table(rows)
    blurb = (f"Model `{args.size}` {SIZES[args.size]} (d_model, layers, heads, context), random init, exported to "
             f"Hugging Face layout; {args.conversations} conversations / pairs, batch {args.batch}, rows of {seq} "
             f"tokens; GRPO {args.prompts} prompts x {args.group} samples, {args.rollouts} rollouts, "
             f"{args.max_new_tokens} new tokens. Same data, settings and device per stage; one process per row.")
    report("align", device, blurb, table, rows, args.out)
    return 0


def prepare(work: Path, size: str, n: int, seq: int, seed: int) -> dict[str, int]:
    """Write the model folder (weights, HF tokenizer files, Kiln's kiln_tokenizer.json) and the data."""
    import torch

    from kiln.align.chat import ChatTemplate, add_chat_tokens, save_hf_tokenizer
    from kiln.align.rewards import addition_problems
    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model
    from kiln.tokenizer import Tokenizer, train_bpe

    probs = addition_problems(n, seed, digits=3)
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
    sft = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"The answer is {a}."}]}
           for q, a in probs]
    dpo = [{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": f"The answer is {a}."}],
            "rejected": [{"role": "assistant", "content": f"The answer is {int(a) + 7}."}]} for q, a in probs]
    (work / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (work / "dpo.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dpo))
    tpl = ChatTemplate.from_tokenizer(tok)
    return {"sft_tokens": sum(len(tpl.render(r["messages"], add_generation_prompt=False)) for r in sft),
            "pairs": len(dpo)}


def _child(stage: str, side: str, spec: dict, counts: dict) -> AlignRow:
    unit = {"sft": "tokens", "dpo": "pairs", "grpo": "samples"}[stage]
    row = AlignRow(stage, "Kiln" if side == "kiln" else "trl", unit)
    cmd = [sys.executable, "-m", "kiln.bench.align", json.dumps({**spec, "stage": stage, "side": side})]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{\"result\"")]
    if proc.returncode or not lines:
        row.error = (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]
        return row
    res = json.loads(lines[-1])["result"]
    row.seconds, row.peak_mib = res["seconds"], res["peak_mib"]
    row.count = {"sft": counts["sft_tokens"], "dpo": counts["pairs"],
                 "grpo": spec["prompts"] * spec["group"] * spec["rollouts"]}[stage]
    row.rate = row.count / row.seconds
    return row


def _table(rows: list[AlignRow]) -> str:
    lines = ["| stage | impl | rate | unit/s | s | peak MiB | vs trl |", "|---|---|---:|---|---:|---:|---:|"]
    ref = {r.stage: r.rate for r in rows if r.impl == "trl" and r.rate}
    for r in rows:
        if r.error:
            lines.append(f"| {r.stage} | {r.impl} | - | {r.unit} | - | - | error: {r.error} |")
            continue
        vs = f"{r.rate / ref[r.stage]:.2f}x" if r.stage in ref and r.impl == "Kiln" else ""
        lines.append(f"| {r.stage} | {r.impl} | {r.rate:,.1f} | {r.unit} | {r.seconds:.1f} | {r.peak_mib:,.0f} | {vs} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ child processes (one stage, one side)
def _peak_mib(device: str) -> float:
    import resource

    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_child(spec: dict[str, Any]) -> dict[str, float]:
    """Run one stage on one side; its wall time and peak memory."""
    import torch

    torch.manual_seed(spec["seed"])
    work, out = Path(spec["work"]), Path(spec["work"]) / f"{spec['stage']}-{spec['side']}"
    fn = {("sft", "kiln"): _kiln_sft, ("dpo", "kiln"): _kiln_dpo, ("grpo", "kiln"): _kiln_grpo,
          ("sft", "trl"): _trl_sft, ("dpo", "trl"): _trl_dpo, ("grpo", "trl"): _trl_grpo}[(spec["stage"], spec["side"])]
    t = time.perf_counter()
    fn(spec, work, out)
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t, "peak_mib": _peak_mib(spec["device"])}


def _train(spec: dict, base: Any, **kw: Any) -> Any:
    from dataclasses import replace

    return replace(base, device=spec["device"], seed=spec["seed"], save_every=0, log_every=50, **kw)


def _kiln_sft(spec: dict, work: Path, out: Path) -> None:
    from kiln.align.sft import SFTConfig, run_sft

    base = SFTConfig()
    cfg = SFTConfig(data=(str(work / "sft.jsonl"),), seq_len=spec["seq"], heldout_frac=0.0, eval_every=0,
                    sample_every=0, train=_train(spec, base.train, batch_size=spec["batch"]))
    run_sft(cfg, work / "model", out, resume=False)


def _kiln_dpo(spec: dict, work: Path, out: Path) -> None:
    from kiln.align.dpo import DPOConfig, run_dpo

    base = DPOConfig()
    cfg = DPOConfig(data=(str(work / "dpo.jsonl"),), seq_len=spec["seq"], heldout_frac=0.0, eval_every=0,
                    train=_train(spec, base.train, batch_size=spec["batch"]))
    run_dpo(cfg, work / "model", out, resume=False)


def _kiln_grpo(spec: dict, work: Path, out: Path) -> None:
    from kiln.align.grpo import GRPOConfig, run_grpo

    base = GRPOConfig()
    n = spec["prompts"] * spec["group"]
    cfg = GRPOConfig(task="addition", digits=3, group_size=spec["group"], prompts_per_rollout=spec["prompts"],
                     rollouts=spec["rollouts"], max_new_tokens=spec["max_new_tokens"], eval_every=0,
                     train=_train(spec, base.train, batch_size=n))
    run_grpo(cfg, work / "model", out, resume=False)


def _trl_common(spec: dict, out: Path) -> dict:
    cuda = spec["device"].startswith("cuda")
    return {"output_dir": str(out), "report_to": [], "save_strategy": "no", "use_cpu": not cuda, "bf16": cuda,
            "logging_steps": 50, "seed": spec["seed"], "lr_scheduler_type": "cosine", "weight_decay": 0.0,
            "dataloader_num_workers": 0, "disable_tqdm": True}


def _trl_model(work: Path, spec: dict) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype="float32")
    return model.to(spec["device"]), AutoTokenizer.from_pretrained(work / "model")


def _trl_sft(spec: dict, work: Path, out: Path) -> None:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer

    model, tok = _trl_model(work, spec)
    ds = load_dataset("json", data_files=str(work / "sft.jsonl"), split="train")
    args = SFTConfig(**_trl_common(spec, out), per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                     learning_rate=1e-4, packing=True, max_length=spec["seq"], assistant_only_loss=True)
    SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()


def _trl_dpo(spec: dict, work: Path, out: Path) -> None:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer

    model, tok = _trl_model(work, spec)
    ds = load_dataset("json", data_files=str(work / "dpo.jsonl"), split="train")
    args = DPOConfig(**_trl_common(spec, out), per_device_train_batch_size=spec["batch"], num_train_epochs=1,
                     learning_rate=5e-6, beta=0.1, precompute_ref_log_probs=True, max_length=spec["seq"])
    DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()


def _trl_grpo(spec: dict, work: Path, out: Path) -> None:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from kiln.align.rewards import addition_problems, addition_reward

    model, tok = _trl_model(work, spec)
    n = spec["prompts"] * spec["group"]
    probs = addition_problems(spec["prompts"] * spec["rollouts"], spec["seed"], 3)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in probs])

    def reward(completions: list, answer: list, **_: Any) -> list[float]:
        return [addition_reward(c[0]["content"] if isinstance(c, list) else c, a)["reward"]
                for c, a in zip(completions, answer)]

    args = GRPOConfig(**_trl_common(spec, out), per_device_train_batch_size=n, num_generations=spec["group"],
                      max_completion_length=spec["max_new_tokens"], max_steps=spec["rollouts"], learning_rate=2e-5,
                      beta=0.0, temperature=1.0, loss_type="grpo")
    GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok).train()


if __name__ == "__main__":  # a child process of `kiln bench align`
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(json.dumps({"result": run_child(json.loads(sys.argv[1]))}), flush=True)
