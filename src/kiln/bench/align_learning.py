"""`kiln bench align --learning`: does each stage learn, and GRPO's reward per GPU-second against trl's.

One small model (a byte-level tokenizer, so digits are single ids and any text encodes; context
2048 on a GPU) goes through the chain, each stage timed on the device with the GPU drained at both ends
("GPU s": wall seconds on the one GPU, the stage's own start-up included):

1. **SFT** on seeded one-digit addition conversations, in rounds of ``sft_round_steps`` until the
   greedy held-out accuracy reaches ``sft_target`` (GRPO learns only from a model that already
   gets some sums right: a group whose samples all score the same has zero advantages). Held-out
   loss on 200 held-out conversations before and after.
2. **DPO** on hh-rlhf harmless-base pairs (the shared copy holds only the test split: a seeded
   ``dpo_heldout`` of its pairs is held out, the rest trains). Held-out preference accuracy: the
   share of held-out pairs whose chosen reply has the higher summed log-prob under the model,
   before (the SFT model) and after DPO, and DPO's implicit-reward accuracy after
   (``beta * (log pi - log ref)`` chosen > rejected; before training every pair ties).
3. **GRPO** on the addition task from the SFT model (``kiln.align.grpo.grpo_addition_cpu``'s
   settings: 8 prompts x 8 samples, one on-policy AdamW step per batch at lr 3e-4, temperature
   0.7) for ``grpo_seconds`` of training, then **trl's GRPOTrainer** on the same model, task and
   settings (a child process; ``loss_type="grpo"``, no vLLM) for the same time. Held-out greedy
   reward (``eval_prompts`` prompts, the stage's own held-out seed) before and after, each side's
   mean rollout reward against seconds of training (``grpo_reward_vs_seconds.png``).
4. **GSM8K** (with ``--gsm8k FILE``): greedy accuracy on its first ``gsm8k_n`` questions before
   (the SFT model) and after GRPO. A model this small scores ~0 on both; it is reported as measured.

Writes ``learning.md``, ``learning.json`` and the PNG to ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LearnPlan:
    """Sizes of one learning check (``PLANS``)."""

    d_model: int
    n_layers: int
    n_heads: int
    context: int
    """Context in tokens (bytes, nearly): hh-rlhf pairs longer than this are dropped, counted."""
    sft_first_steps: int
    """SFT steps of the first round (batch 16 rows of 64 tokens, lr 3e-3: ``kiln.align.learning``'s SFT)."""
    sft_round_steps: int
    """SFT steps of each later round."""
    sft_max_rounds: int
    """Most SFT rounds."""
    sft_target: float
    """Greedy held-out accuracy at which SFT stops."""
    dpo_heldout: int
    """hh-rlhf pairs held out for the preference accuracy."""
    dpo_max_pairs: int
    """Most hh-rlhf pairs trained on (0: all the rest)."""
    dpo_epochs: float
    """Passes over the training pairs (batch 16, lr ``dpo_lr``)."""
    dpo_lr: float
    grpo_seconds: float
    """Seconds of GRPO training per side."""
    grpo_max_rollouts: int
    """Most rollout batches per side (the time budget usually ends the run first)."""
    eval_prompts: int
    """Held-out addition prompts scored greedily."""
    gsm8k_n: int
    """GSM8K questions scored greedily (with ``--gsm8k``)."""


PLANS = {
    "tiny": LearnPlan(64, 2, 2, 1024, sft_first_steps=30, sft_round_steps=20, sft_max_rounds=2, sft_target=0.15,
                      dpo_heldout=16, dpo_max_pairs=32, dpo_epochs=1, dpo_lr=1e-4, grpo_seconds=6,
                      grpo_max_rollouts=4, eval_prompts=16, gsm8k_n=4),
    # the model and the SFT/GRPO settings measured to learn on a CPU (docs/align.md, "GRPO that learns")
    "small": LearnPlan(64, 2, 2, 2048, sft_first_steps=60, sft_round_steps=20, sft_max_rounds=6, sft_target=0.15,
                       dpo_heldout=256, dpo_max_pairs=0, dpo_epochs=1, dpo_lr=1e-4, grpo_seconds=30,
                       grpo_max_rollouts=1500, eval_prompts=128, gsm8k_n=64),
}


class GpuClock:
    """Wall seconds with the GPU drained at both ends (one GPU: its seconds)."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda

    def now(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


def find_hh_rlhf(given: str) -> Path | None:
    """The hh-rlhf harmless-base test file: ``given``, the shared copy, or the device carry; None
    (no DPO row) when none is found or ``given`` is 'none'."""
    if given == "none":
        return None
    tail = Path("hh-rlhf") / "harmless-base" / "test.jsonl.gz"
    for p in ([Path(given)] if given else []) + [Path("../shared/data/align") / tail, Path(".devcarry") / tail]:
        if p.is_file():
            return p
    return None


def run_learning(args: argparse.Namespace, device: Any) -> int:
    """``kiln bench align --learning`` (see the module docstring)."""
    from kiln.bench.report import report

    plan = PLANS["tiny" if args.size == "tiny" else "small"]
    if getattr(args, "grpo_seconds", 0):
        plan = replace(plan, grpo_seconds=args.grpo_seconds)
    hh = find_hh_rlhf(args.hh_rlhf)
    gsm = Path(args.gsm8k) if args.gsm8k else None
    with tempfile.TemporaryDirectory(prefix="kiln-bench-align-learn-") as tmp:
        out = Path(tmp)
        res = learning_check(plan, out, str(device), args.seed, hh, gsm, Path(args.out) if args.out else None)
        if args.out:
            dest = Path(args.out)
            dest.mkdir(parents=True, exist_ok=True)
            for name in ("grpo_reward_vs_seconds.png", "learning.json"):
                if (out / name).is_file():
                    shutil.copy(out / name, dest / name)
    table = learning_table(res)
    blurb = (f"Learning check, plan `{'tiny' if args.size == 'tiny' else 'small'}` {asdict(plan)}; byte-level "
             f"tokenizer. GPU s: wall seconds of the stage on the device, drained at both ends.")
    report("align_learning", device, blurb, table, [], args.out)
    return 0


def learning_check(plan: LearnPlan, out: Path, device: str, seed: int, hh: Path | None,
                   gsm: Path | None, partial: Path | None = None) -> dict[str, Any]:
    """Run the chain in ``out``; every number of the report, also written to ``out/learning.json``.

    With ``partial``, the numbers so far are written to ``partial/learning.partial.json`` after each
    stage and the stage is announced on stderr, so a run cut short still leaves what it measured."""
    clock = GpuClock(device.startswith("cuda"))
    base = build_base(out / "base", plan, seed)
    res: dict[str, Any] = {"device": device, "plan": asdict(plan)}

    def done(stage: str) -> None:
        print(f"[learning] {stage}: {json.dumps(res[stage], default=str)[:400]}", file=sys.stderr, flush=True)
        if partial is not None:
            partial.mkdir(parents=True, exist_ok=True)
            (partial / "learning.partial.json").write_text(json.dumps(res, indent=1))

    sft_model, res["sft"] = sft_rounds(plan, base, out, device, seed, clock)
    done("sft")
    res["dpo"] = dpo_hh(plan, sft_model, hh, out, device, seed, clock) if hh else {"skipped": "no hh-rlhf file"}
    done("dpo")
    grpo_model, res["grpo_kiln"] = grpo_kiln(plan, sft_model, out, device, seed, clock)
    done("grpo_kiln")
    res["grpo_trl"] = grpo_trl(plan, sft_model, out, device, seed)
    done("grpo_trl")
    if gsm is not None:
        res["gsm8k"] = {"before": gsm8k_accuracy(sft_model, gsm, plan, device),
                        "after_grpo": gsm8k_accuracy(grpo_model, gsm, plan, device), "questions": plan.gsm8k_n}
        done("gsm8k")
    plot_curves(res, out / "grpo_reward_vs_seconds.png")
    (out / "learning.json").write_text(json.dumps(res, indent=1))
    return res


def build_base(out: Path, plan: LearnPlan, seed: int) -> Path:
    """A random model with a byte-level tokenizer (chat tokens added) in ``out``."""
    import torch

    from kiln.align.chat import add_chat_tokens, save_hf_tokenizer
    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model
    from kiln.tokenizer import Tokenizer, train_bpe

    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    # merges among letters only: digits stay single ids ("112" is "1", "1", "2"; branch grpo2's finding)
    corpus.write_text("What is the sum? What is it? + ?\n" * 50)
    vocab, merges = train_bpe(corpus, 262, ["<|endoftext|>"])
    tok = add_chat_tokens(Tokenizer(vocab, merges, ["<|endoftext|>"]))
    torch.manual_seed(seed)
    V = -(-tok.vocab_size // 64) * 64
    model = build_model(ModelConfig(vocab_size=V, context_length=plan.context, d_model=plan.d_model,
                                    n_layers=plan.n_layers, n_heads=plan.n_heads))
    save_pretrained(model, out)
    save_hf_tokenizer(tok, out)
    return out


def greedy_reward(model_dir: Path, problems: list, reward: str, max_new_tokens: int, device: str) -> dict[str, float]:
    """``kiln.align.grpo.evaluate_reward`` of the model in ``model_dir`` on ``problems`` (greedy)."""
    from kiln.align.grpo import evaluate_reward
    from kiln.align.rewards import REWARDS
    from kiln.align.stage import load_policy, pick_device

    model, tok, tpl = load_policy(model_dir, None, False, pick_device(device))
    return evaluate_reward(model.eval(), tpl, problems, REWARDS[reward], max_new_tokens, tok.vocab_size)


def held_addition(plan: LearnPlan, seed: int) -> list[tuple[str, str]]:
    """The GRPO stage's own held-out prompts (seed ``train.seed + 10**6``)."""
    from kiln.align.rewards import addition_problems

    return addition_problems(plan.eval_prompts, seed + 10**6, 1)


def sft_rounds(plan: LearnPlan, base: Path, out: Path, device: str, seed: int, clock: GpuClock) -> tuple[Path, dict]:
    """SFT in rounds until the greedy held-out accuracy reaches ``plan.sft_target``; (model, numbers)."""
    from kiln.align.rewards import addition_conversations
    from kiln.align.sft import SFTConfig, run_sft

    data, held = out / "sft_train.jsonl", out / "sft_held.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_conversations(4000, 1, 1)))  # as kiln.align.learning
    held.write_text("".join(json.dumps(r) + "\n" for r in addition_conversations(200, seed + 2, 1)))
    model, rounds, t0 = base, [], clock.now()
    for r in range(plan.sft_max_rounds):
        steps = plan.sft_first_steps if r == 0 else plan.sft_round_steps
        cfg = SFTConfig(data=(str(data),), heldout=(str(held),), seq_len=64, max_steps=steps, eval_every=steps,
                        sample_every=0,
                        train=replace(SFTConfig().train, lr=3e-3, min_lr=3e-4, warmup_steps=5, batch_size=16,
                                      seed=SFTConfig().train.seed + r, device=device, save_every=0, log_every=50))
        run = run_sft(cfg, model, out / f"sft{r}", resume=False)
        stats = json.loads((run / "manifest.json").read_text())["stats"]
        model = run / "model"
        acc = greedy_reward(model, held_addition(plan, seed), "addition", 16, device)["heldout_accuracy"]
        rounds.append({"round": r, "steps": steps, "heldout_loss_first": stats["heldout_loss_first"],
                       "heldout_loss": stats["heldout_loss"], "greedy_accuracy": acc})
        if acc >= plan.sft_target:
            break
    gpu_s = clock.now() - t0
    return model, {"heldout_loss_before": rounds[0]["heldout_loss_first"], "heldout_loss_after": rounds[-1]["heldout_loss"],
                   "greedy_accuracy_after": rounds[-1]["greedy_accuracy"], "steps": sum(x["steps"] for x in rounds),
                   "rounds": rounds, "gpu_s": round(gpu_s, 2)}


def split_hh(hh: Path, plan: LearnPlan, out: Path, seed: int) -> tuple[Path, Path]:
    """Seeded split of the hh-rlhf lines into (train, held-out) files in ``out``."""
    import random

    with gzip.open(hh, "rt", encoding="utf-8") as f:
        lines = [x if x.endswith("\n") else x + "\n" for x in f if x.strip()]
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    held = [lines[i] for i in order[: plan.dpo_heldout]]
    train = [lines[i] for i in order[plan.dpo_heldout :]]
    train = train[: plan.dpo_max_pairs] if plan.dpo_max_pairs else train
    (out / "hh_train.jsonl").write_text("".join(train))
    (out / "hh_held.jsonl").write_text("".join(held))
    return out / "hh_train.jsonl", out / "hh_held.jsonl"


def likelihood_preference(model_dir: Path, held: Path, device: str, context: int) -> tuple[float, int]:
    """Share of ``held``'s pairs whose chosen reply has the higher summed log-prob; (share, pairs)."""
    from kiln.align.data import ReadReport, encode_preference, read_preferences
    from kiln.align.dpo import compute_reference_logps
    from kiln.align.stage import load_policy, pick_device

    model, tok, tpl = load_policy(model_dir, None, False, pick_device(device))
    enc = [e for e in (encode_preference(p, tpl, context + 1, ReadReport()) for p in read_preferences([held]))
           if e is not None]
    lp = compute_reference_logps(model, enc, 16, tok.eot_id or 0)  # (N, 2)
    return float((lp[:, 0] > lp[:, 1]).float().mean()) if len(enc) else 0.0, len(enc)


def dpo_hh(plan: LearnPlan, model: Path, hh: Path, out: Path, device: str, seed: int, clock: GpuClock) -> dict:
    """DPO on hh-rlhf pairs from the SFT model; held-out preference accuracy before and after."""
    from kiln.align.dpo import DPOConfig, dpo_train_defaults, run_dpo

    train, held = split_hh(hh, plan, out, seed)
    before, n_held = likelihood_preference(model, held, device, plan.context)
    cfg = DPOConfig(data=(str(train),), heldout=(str(held),), max_heldout=plan.dpo_heldout, epochs=plan.dpo_epochs,
                    eval_every=10**9, beta=0.1,
                    train=replace(dpo_train_defaults(), lr=plan.dpo_lr, min_lr=plan.dpo_lr / 10, batch_size=16,
                                  seed=seed, device=device, save_every=0, log_every=50))
    t0 = clock.now()
    run = run_dpo(cfg, model, out / "dpo", resume=False)
    gpu_s = clock.now() - t0
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    after, _ = likelihood_preference(run / "model", held, device, plan.context)
    last = stats.get("last_eval") or {}
    return {"pairs": stats["pairs"], "heldout_pairs": n_held, "steps": stats["steps"], "read": stats["read"],
            "likelihood_accuracy_before": before, "likelihood_accuracy_after": after,
            "reward_accuracy_after": last.get("heldout_accuracy"), "reward_margin_after": last.get("heldout_margin"),
            "gpu_s": round(gpu_s, 2)}


def grpo_settings(plan: LearnPlan, seed: int, device: str) -> Any:
    """The GRPO config both sides follow: ``grpo_addition_cpu()`` under a time budget."""
    from kiln.align.grpo import grpo_addition_cpu

    base = grpo_addition_cpu()
    return replace(base, rollouts=plan.grpo_max_rollouts, eval_every=0, eval_prompts=plan.eval_prompts,
                   train=replace(base.train, seed=seed, device=device, max_seconds=plan.grpo_seconds,
                                 save_every=0, log_every=1))


def grpo_kiln(plan: LearnPlan, model: Path, out: Path, device: str, seed: int, clock: GpuClock) -> tuple[Path, dict]:
    """Kiln's GRPO for ``plan.grpo_seconds``; held-out greedy reward before/after and the curve."""
    from kiln.align.grpo import run_grpo

    cfg = grpo_settings(plan, seed, device)
    held = held_addition(plan, seed)
    before = greedy_reward(model, held, "addition", cfg.max_new_tokens, device)
    t0 = clock.now()
    run = run_grpo(cfg, model, out / "grpo", resume=False)
    gpu_s = clock.now() - t0
    after = greedy_reward(run / "model", held, "addition", cfg.max_new_tokens, device)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    step_time = {r["step"]: r["time"] for r in rows if "time" in r and "loss" in r}
    # rollout k is sampled inside step k (0-based) and done when step k + 1 is logged
    done = [r for r in rows if "reward_mean" in r and r["rollout"] + 1 in step_time]
    curve = [[step_time[r["rollout"] + 1], r["reward_mean"]] for r in done]
    lengths = [[step_time[r["rollout"] + 1], r["reply_tokens"]] for r in done]  # stop token included
    return run / "model", {"heldout_reward_before": before["heldout_reward"], "heldout_reward_after": after["heldout_reward"],
                           "rollouts": len(curve), "train_seconds": curve[-1][0] if curve else 0.0,
                           "gpu_s": round(gpu_s, 2), "curve": curve, "reply_tokens": lengths}


def grpo_trl(plan: LearnPlan, model: Path, out: Path, device: str, seed: int) -> dict:
    """trl's GRPOTrainer on the same model, task and settings for the same seconds (a child process)."""
    spec = {"model": str(model), "out": str(out / "grpo-trl"), "device": device, "seed": seed, "plan": asdict(plan)}
    proc = subprocess.run([sys.executable, "-m", "kiln.bench.align_learning", json.dumps(spec)],
                          capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1][:300]}
    res = json.loads((out / "grpo-trl" / "curve.json").read_text())
    held = held_addition(plan, seed)
    after = greedy_reward(out / "grpo-trl" / "model", held, "addition", grpo_settings(plan, seed, device).max_new_tokens,
                          device)
    return {**res, "heldout_reward_after": after["heldout_reward"]}


def _trl_grpo_child(spec: dict) -> None:
    """The child: trl's GRPOTrainer with Kiln's GRPO settings, stopped after the plan's seconds;
    writes ``curve.json`` ([seconds since training began, mean rollout reward] per step) and the model."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from kiln.align.rewards import addition_problems, addition_reward

    plan, device, out = LearnPlan(**spec["plan"]), spec["device"], Path(spec["out"])
    cfg, cuda = grpo_settings(plan, spec["seed"], device), device.startswith("cuda")
    if cuda:
        torch.set_float32_matmul_precision("high")  # TF32 outside autocast, as Kiln's stages (load_policy)
    n = cfg.group_size * cfg.prompts_per_rollout
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype="float32", attn_implementation="sdpa").to(device)
    tok = AutoTokenizer.from_pretrained(spec["model"])
    probs = addition_problems(cfg.prompts_per_rollout * plan.grpo_max_rollouts, spec["seed"], cfg.digits)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "answer": a} for q, a in probs])

    def reward(completions: list, answer: list, **_: Any) -> list[float]:
        return [addition_reward(c[0]["content"] if isinstance(c, list) else c, a)["reward"]
                for c, a in zip(completions, answer)]

    curve: list[list[float]] = []
    lengths: list[list[float]] = []  # [seconds, mean completion tokens (EOS included, as Kiln counts)]

    class Budget(TrainerCallback):
        t0 = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
            Budget.t0 = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "reward" in logs:
                curve.append([time.perf_counter() - Budget.t0, float(logs["reward"])])
                if "completions/mean_length" in logs:
                    lengths.append([curve[-1][0], float(logs["completions/mean_length"])])
                if curve[-1][0] >= plan.grpo_seconds:
                    control.should_training_stop = True

    t = cfg.train
    args = GRPOConfig(output_dir=str(out), report_to=[], save_strategy="no", use_cpu=not cuda, bf16=cuda,
                      logging_steps=1, seed=spec["seed"], lr_scheduler_type="constant", learning_rate=t.lr,
                      weight_decay=t.weight_decay, adam_beta1=t.betas[0], adam_beta2=t.betas[1], max_grad_norm=t.grad_clip,
                      optim="adamw_torch_fused" if cuda else "adamw_torch", gradient_checkpointing=False,
                      per_device_train_batch_size=n, num_generations=cfg.group_size,
                      max_completion_length=cfg.max_new_tokens, max_steps=plan.grpo_max_rollouts, beta=0.0,
                      temperature=cfg.temperature, top_p=1.0, top_k=0, loss_type="grpo", scale_rewards="group",
                      epsilon=cfg.cliprange, num_iterations=1, use_vllm=False, disable_tqdm=True,
                      dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          callbacks=[Budget()])
    trainer.train()
    trainer.save_model(str(out / "model"))
    for f in Path(spec["model"]).glob("*token*.json"):  # Kiln's tokenizer files, so Kiln scores the result
        shutil.copy(f, out / "model" / f.name)
    (out / "curve.json").write_text(json.dumps({"rollouts": len(curve), "train_seconds": curve[-1][0] if curve else 0.0,
                                                "curve": curve, "reply_tokens": lengths}))


def gsm8k_accuracy(model: Path, path: Path, plan: LearnPlan, device: str) -> float:
    """Greedy GSM8K accuracy on the first ``plan.gsm8k_n`` questions of ``path`` (256 new tokens)."""
    rows = [json.loads(x) for x in path.read_text().splitlines()[: plan.gsm8k_n] if x.strip()]
    return greedy_reward(model, [(r["question"], r["answer"]) for r in rows], "gsm8k", 256, device)["heldout_accuracy"]


def window_mean(curve: list, upto: float) -> float | None:
    """Mean reward over the last fifth of ``[0, upto]`` seconds of a curve (None: no point there)."""
    pts = [r for t, r in curve if 0.8 * upto <= t <= upto]
    return sum(pts) / len(pts) if pts else None


def learning_table(res: dict[str, Any]) -> str:
    """The report's markdown tables."""
    s, d, k, t = res["sft"], res["dpo"], res["grpo_kiln"], res["grpo_trl"]
    lines = ["| stage | measure | before | after | GPU s |", "|---|---|---:|---:|---:|",
             f"| SFT ({s['steps']} steps) | held-out loss (nats/token) | {s['heldout_loss_before']:.3f} | "
             f"{s['heldout_loss_after']:.3f} | {s['gpu_s']:.1f} |",
             f"| SFT | greedy addition accuracy | - | {s['greedy_accuracy_after']:.3f} | |"]
    if "skipped" not in d:
        lines += [f"| DPO ({d['pairs']} hh-rlhf pairs, {d['steps']} steps) | held-out preference accuracy, log-likelihood "
                  f"({d['heldout_pairs']} pairs) | {d['likelihood_accuracy_before']:.3f} | {d['likelihood_accuracy_after']:.3f} "
                  f"| {d['gpu_s']:.1f} |",
                  f"| DPO | held-out implicit-reward accuracy | (ties) | {d['reward_accuracy_after'] or 0:.3f} | |"]
    lines.append(f"| GRPO Kiln ({k['rollouts']} rollouts in {k['train_seconds']:.0f} s) | held-out greedy reward | "
                 f"{k['heldout_reward_before']:.3f} | {k['heldout_reward_after']:.3f} | {k['gpu_s']:.1f} |")
    if "error" in t:
        lines.append(f"| GRPO trl | error: {t['error']} | | | |")
    else:
        lines.append(f"| GRPO trl ({t['rollouts']} rollouts in {t['train_seconds']:.0f} s) | held-out greedy reward | "
                     f"{k['heldout_reward_before']:.3f} | {t['heldout_reward_after']:.3f} | |")
    if "gsm8k" in res:
        g = res["gsm8k"]
        lines.append(f"| GSM8K ({g['questions']} questions, greedy) | accuracy | {g['before']:.3f} | {g['after_grpo']:.3f} | |")
    budget = res["plan"]["grpo_seconds"]
    kw, tw = window_mean(k["curve"], budget), window_mean(t.get("curve", []), budget)
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    kl, tl = window_mean(k.get("reply_tokens", []), budget), window_mean(t.get("reply_tokens", []), budget)
    lines += ["", f"GRPO mean rollout reward over seconds {0.8 * budget:.0f}-{budget:.0f} of training: Kiln {fmt(kw)}, "
              f"trl {fmt(tw)}; rollouts in the budget: Kiln {sum(1 for x, _ in k['curve'] if x <= budget)}, "
              f"trl {sum(1 for x, _ in t.get('curve', []) if x <= budget)}; tokens per reply there (stop token "
              f"included): Kiln {fmt(kl)}, trl {fmt(tl)}."]
    return "\n".join(lines)


def plot_curves(res: dict[str, Any], path: Path) -> None:
    """Mean rollout reward against seconds of training, Kiln and trl (a 10-point moving average)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, key in (("Kiln", "grpo_kiln"), ("trl GRPOTrainer", "grpo_trl")):
        curve = res.get(key, {}).get("curve") or []
        if not curve:
            continue
        xs = [x for x, _ in curve]
        ys = [sum(r for _, r in curve[max(0, i - 9) : i + 1]) / len(curve[max(0, i - 9) : i + 1]) for i in range(len(curve))]
        ax.plot(xs, ys, label=name)
    ax.set_xlabel("seconds of GRPO training (one GPU)" if res["device"].startswith("cuda") else "seconds of GRPO training")
    ax.set_ylabel("mean rollout reward (10-rollout average)")
    ax.set_title("GRPO on one-digit addition: reward per second")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":  # the trl child of grpo_trl
    import logging

    logging.basicConfig(level=logging.WARNING)
    _trl_grpo_child(json.loads(sys.argv[1]))
