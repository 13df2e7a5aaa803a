"""GRPO's learning check on the synthetic addition task, end to end on a CPU in about a minute.

``python -m kiln.align.learning OUT [--digits 1|2] [--sft-steps N] [--set KEY=VALUE ...]``: builds a
2-layer d=64 model with a byte-level tokenizer (digits are single tokens), SFTs it on seeded
addition conversations to a modest greedy accuracy (``kiln.align.sft.run_sft``), then runs
``kiln.align.grpo.run_grpo`` with ``grpo_addition_cpu()`` (one digit) or ``grpo_addition2_cpu()``
(two digits), plus ``--set`` overrides, and prints the held-out greedy accuracy and the mean rollout
reward before and after, the evaluation curve, and the CPU seconds of each stage. The held-out
prompts are the stage's own (seed ``train.seed + 10**6``). ``--sft-more N``: the baseline, N more SFT
steps from the same SFT model (lr 3e-4 constant, the run's seed) scored on the same held-out prompts.
"""

from __future__ import annotations

import argparse
import json
import resource
from dataclasses import replace
from pathlib import Path
from typing import Any


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def build_base(out: Path) -> Path:
    """A random 2-layer d=64 model and a 262-id byte-level tokenizer in ``out`` (kept if present)."""
    import torch

    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model
    from kiln.tokenizer import Tokenizer, train_bpe

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus.txt"
    # Merges among letters only: a corpus with numbers in it merged "1" "2" into one id, so "112"
    # read as "1", "12" and the model had to learn two spellings of the same digits.
    corpus.write_text("What is the sum? What is it? + ?\n" * 50)
    vocab, merges = train_bpe(corpus, 262, ["<|endoftext|>"])
    tok = Tokenizer(vocab, merges, ["<|endoftext|>"])
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=64, n_layers=2, n_heads=2))
    save_pretrained(model, out, tokenizer=tok)
    return out


SFT_STEPS = {1: 60, 2: 1000}
"""SFT steps per operand size: ~0.2 greedy accuracy on one-digit sums, ~0.5 on two-digit ones."""


def run(out: Path, digits: int = 1, sft_steps: int | None = None, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """SFT then GRPO (see the module docstring); returns the before/after numbers and the curve."""
    import torch

    from kiln.align.grpo import grpo_addition2_cpu, grpo_addition_cpu, run_grpo
    from kiln.align.rewards import addition_conversations
    from kiln.align.sft import run_sft
    from kiln.align.stage import apply_stage_overrides

    torch.set_num_threads(1)
    steps = sft_steps or SFT_STEPS.get(digits, 1000)
    base = build_base(out / "base")
    data = out / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_conversations(max(4000, 20 * steps), 1, digits)))
    t = _cpu_s()
    sft = _sft_config(data, steps, lr=3e-3, min_lr=3e-4, warmup_steps=5 if digits == 1 else 10)
    sft_dir = run_sft(sft, base, out / "sft")  # reused by the next seed's call (same config, same data)
    sft_s, t = _cpu_s() - t, _cpu_s()
    preset = grpo_addition_cpu() if digits == 1 else replace(grpo_addition2_cpu(), digits=digits)
    cfg = apply_stage_overrides(replace(preset, train=replace(preset.train, device="cpu")), list(overrides))
    run_dir = run_grpo(cfg, sft_dir / "model", out / "grpo", resume=False)
    s = json.loads((run_dir / "manifest.json").read_text())["stats"]
    rr = s["rollout_rewards"]
    k = max(len(rr) // 4, 1)
    return {"sft_steps": steps, "sft_cpu_s": round(sft_s, 1), "grpo_cpu_s": round(_cpu_s() - t, 1),
            "heldout_accuracy_before": s["first_eval"]["heldout_accuracy"],
            "heldout_accuracy_after": s["last_eval"]["heldout_accuracy"],
            "rollout_reward_first_quarter": round(sum(rr[:k]) / k, 4),
            "rollout_reward_last_quarter": round(sum(rr[-k:]) / k, 4), "heldout_prompts": cfg.eval_prompts,
            "curve": eval_curve(run_dir / "metrics.jsonl")}


def _sft_config(data: Path, steps: int, lr: float, min_lr: float, warmup_steps: int, seed: int | None = None) -> Any:
    """The learning check's SFT settings: 16 packed rows a step, no evaluation, spike guard off."""
    from kiln.align.sft import SFTConfig
    from kiln.align.stage import NO_SPIKE_GUARD

    # The spike guard off: a packed addition batch's loss jumps as the model learns a digit place,
    # and the guard read those jumps as divergence (a 1,500-step two-digit SFT rolled back).
    train = replace(SFTConfig().train, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, batch_size=16,
                    save_every=10**6, log_every=50, device="cpu", **NO_SPIKE_GUARD)
    if seed is not None:
        train = replace(train, seed=seed)
    return SFTConfig(data=(str(data),), max_steps=steps, add_chat_tokens=True, eval_every=0, sample_every=0,
                     train=train)


def sft_more(out: Path, steps: int, seed: int, digits: int = 2, eval_prompts: int = 128,
             lr: float = 3e-4) -> dict[str, Any]:
    """The per-CPU-second baseline for GRPO: ``steps`` more SFT steps from ``run``'s SFT model in
    ``out`` (same data, lr constant, data order from ``seed``), then greedy accuracy on the held-out
    prompts a GRPO run with ``train.seed=seed`` evaluates (seed ``seed + 10**6``)."""
    import torch

    from kiln.align.grpo import GRPOConfig, evaluate_reward, load_problems
    from kiln.align.sft import run_sft
    from kiln.align.stage import load_policy

    torch.set_num_threads(1)
    t = _cpu_s()
    cfg = _sft_config(out / "sft.jsonl", steps, lr=lr, min_lr=lr, warmup_steps=min(10, steps), seed=seed)
    run_dir = run_sft(cfg, out / "sft" / "model", out / f"sft_more{steps}_seed{seed}", resume=False)
    sft_s = _cpu_s() - t
    g = GRPOConfig(digits=digits, eval_prompts=eval_prompts)
    held = load_problems(g, eval_prompts, seed + 10**6)
    model, tok, tpl = load_policy(run_dir / "model", None, True, torch.device("cpu"))
    r = evaluate_reward(model.eval(), tpl, held, g.reward_fn(), g.max_new_tokens, vocab_limit=tok.vocab_size)
    return {"seed": seed, "sft_more_steps": steps, "sft_more_cpu_s": round(sft_s, 1),
            "heldout_accuracy_after_sft_more": r["heldout_accuracy"]}


def eval_curve(metrics: Path) -> list[dict[str, float]]:
    """(step, wall seconds, held-out accuracy and reward) at each evaluation of a GRPO run's log."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    seconds = {r["step"]: r["time"] for r in rows if "time" in r}
    return [{"step": r["step"], "seconds": seconds.get(r["step"], 0.0), "accuracy": r["heldout_accuracy"],
             "reward": r["heldout_reward"]} for r in rows if "heldout_accuracy" in r]


def plot_curves(curves: dict[str, list[dict[str, float]]], out_png: Path, title: str = "",
                baselines: dict[str, float] | None = None) -> Path:
    """Held-out greedy accuracy against GRPO steps and against wall seconds, one line per run;
    ``baselines``: label -> accuracy, drawn as dashed horizontal lines (the more-SFT baseline)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 3.2), dpi=80, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    for label, curve in curves.items():
        for ax, x in zip(axes, ("step", "seconds")):
            ax.plot([c[x] for c in curve], [c["accuracy"] for c in curve], "o-", ms=3, label=label)
    for i, (label, acc) in enumerate((baselines or {}).items()):
        for ax in axes:
            ax.axhline(acc, ls="--", lw=1, color=f"C{i}", label=label)
    axes[0].set_xlabel("GRPO step (one rollout batch each)")
    axes[1].set_xlabel("wall seconds")
    axes[0].set_ylabel("held-out greedy accuracy")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.legend(*axes[1].get_legend_handles_labels(), fontsize=7, loc="outside right center")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.savefig(out_png)
    return out_png


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.align.learning", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--sft-steps", type=int, default=None, help="default: 60 for one digit, 1000 for two")
    p.add_argument("--seeds", type=int, nargs="*", default=None,
                   help="GRPO seeds (train.seed) to run from the one SFT model; writes OUT/curves.png")
    p.add_argument("--sft-more", type=int, default=0, metavar="N",
                   help="per seed, also N more SFT steps from the same SFT model (the baseline)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if a.seeds is None:
        print(json.dumps(run(a.out, a.digits, a.sft_steps, tuple(a.overrides)), indent=1))
        return
    curves, baselines = {}, {}
    for seed in a.seeds:
        r = run(a.out, a.digits, a.sft_steps, (*a.overrides, f"train.seed={seed}"))
        (a.out / f"result_seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        if a.sft_more:
            r.update(sft_more(a.out, a.sft_more, seed, a.digits, r["heldout_prompts"]))
            baselines[f"seed {seed}: {a.sft_more} more SFT steps"] = r["heldout_accuracy_after_sft_more"]
        (a.out / f"result_seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(json.dumps({"seed": seed, **{k: v for k, v in r.items() if k != "curve"}}), flush=True)
        curves[f"seed {seed}"] = r["curve"]
    plot_curves(curves, a.out / "curves.png", f"GRPO on {a.digits}-digit sums (python -m kiln.align.learning)",
                baselines)


if __name__ == "__main__":
    main()
