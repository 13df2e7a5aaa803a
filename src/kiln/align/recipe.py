"""``kiln recipe chat``: base model -> SFT -> DPO -> GRPO (synthetic task, then GSM8K) -> one report.

The recipe chains the stages on the shared sets (``../shared/data``: LIMA and the LLaMA-Factory
Alpaca demo for SFT, with the addition task mixed in; the LLaMA-Factory DPO pairs for DPO with
hh-rlhf's test pairs held out; the seeded addition task and GSM8K's train split for GRPO, its test
split for the before/after accuracy). The base model is a folder (``--base``), or the recipe first
runs the demo pipeline (corpus, tokenizer, pretraining with ``preset``) on ``pretrain_data``
(``kiln recipe chat`` does that step: ``kiln.demo`` sits above ``kiln.align``).
SFT and DPO cut conversations and pairs longer than ``seq_len`` to fit (``truncate=True``, as trl
does) rather than drop them: at the CPU preset's 128 tokens, dropping kept 3 of the DPO pairs.
Every stage is resumable and reused when finished, so a killed recipe continues where it stopped.
``report.md`` has a table per stage (its manifest's statistics and time) and each stage's curve.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ChatRecipeConfig:
    """The chat recipe's knobs; ``gpu()`` and ``cpu()`` are its presets."""

    out: str = "runs/chat"
    """Directory receiving one folder per stage and report.md."""
    base: str = ""
    """Base model folder (``kiln recipe chat`` without ``--base`` pretrains one first with the demo
    pipeline on ``pretrain_data`` and ``preset``)."""
    pretrain_data: str = "kjv"
    """Corpus for the pretraining step when ``base`` is empty (as ``kiln demo --data``)."""
    preset: str = "tiny"
    """Training preset of the pretraining step."""
    pretrain_steps: int | None = None
    """Pretraining steps (None: the preset's)."""
    shared: str = "../shared/data"
    """The shared data folder (align/ and eval/gsm8k/ are read from it)."""
    digits: int = 2
    """Operand digits of the addition task (its SFT conversations and its GRPO prompts)."""
    additions: int = 2000
    """Addition conversations mixed into the SFT data."""
    sft_steps: int = 200
    dpo_steps: int = 100
    grpo_addition_rollouts: int = 30
    grpo_gsm8k_rollouts: int = 0
    """GSM8K GRPO rollouts (0: skip; a small base model scores ~0 on GSM8K, so rewards never vary)."""
    gsm8k_eval: int = 100
    """GSM8K test questions for the before/after accuracy (0: skip)."""
    batch_size: int = 16
    seq_len: int = 512
    device: str = "auto"
    seed: int = 1337
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """Stage overrides, ``sft.epochs=2``, ``dpo.beta=0.2``, ``grpo.train.lr=1e-5`` ..."""


def gpu() -> ChatRecipeConfig:
    """One GPU, about an hour: the gpt2_small pretraining preset cut to 4,000 steps, then the stages."""
    return ChatRecipeConfig(preset="gpt2_small", pretrain_steps=4000, sft_steps=1000, dpo_steps=400,
                            grpo_addition_rollouts=100, grpo_gsm8k_rollouts=50, gsm8k_eval=500, batch_size=32,
                            seq_len=1024)


def cpu() -> ChatRecipeConfig:
    """A laptop CPU, a few minutes: the demo's tiny model, one-digit sums, SFT at the demo chat stage's
    lr, GRPO at ``grpo_addition2_cpu``'s lr and temperature (docs/align.md, "The chat recipe")."""
    return ChatRecipeConfig(digits=1, additions=6000, sft_steps=160, dpo_steps=30, grpo_addition_rollouts=60,
                            gsm8k_eval=0, seq_len=128,
                            overrides=("sft.train.lr=2e-3", "sft.train.min_lr=2e-4", "grpo.train.lr=3e-5",
                                       "grpo.train.min_lr=3e-5", "grpo.temperature=0.7"))


PRESETS = {"gpu": gpu, "cpu": cpu}


def recipe_config(preset: str, overrides: list[str] | tuple[str, ...] = (), **fields: Any) -> ChatRecipeConfig:
    """The preset, then ``fields`` (``base``, ``out``, ``shared``...: empty ones ignored), then
    ``overrides`` (``KEY=VALUE``): stage keys (``sft.``, ``dpo.``, ``grpo.``) go after the preset's own
    stage overrides, so the user's win; recipe keys (``sft_steps=500``) set the field."""
    from kiln.align.stage import apply_stage_overrides

    cfg = PRESETS[preset]()
    stage = tuple(o for o in overrides if o.split("=", 1)[0].split(".")[0] in ("sft", "dpo", "grpo"))
    own = [o for o in overrides if o not in stage]
    cfg = replace(cfg, overrides=cfg.overrides + stage, **{k: v for k, v in fields.items() if v})
    return apply_stage_overrides(cfg, own) if own else cfg


def _with(cfg: Any, prefix: str, overrides: tuple[str, ...]) -> Any:
    from kiln.align.stage import apply_stage_overrides

    mine = [o[len(prefix) + 1 :] for o in overrides if o.startswith(prefix + ".")]
    return apply_stage_overrides(cfg, mine) if mine else cfg


def run_chat_recipe(cfg: ChatRecipeConfig) -> Path:
    """Run every stage (reusing finished ones) and write ``report.md``; returns its path."""
    from kiln.align.dpo import DPOConfig, run_dpo
    from kiln.align.grpo import GRPOConfig, run_grpo
    from kiln.align.rewards import addition_conversations
    from kiln.align.sft import SFTConfig, run_sft

    out, shared = Path(cfg.out), Path(cfg.shared)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.base:
        raise ValueError("ChatRecipeConfig.base is empty: give a base model folder (kiln recipe chat pretrains "
                         "one first when --base is not given)")
    base = Path(cfg.base)
    add = out / "data" / "addition_chat.jsonl"
    add.parent.mkdir(parents=True, exist_ok=True)
    add.write_text("".join(json.dumps(r) + "\n" for r in addition_conversations(cfg.additions, cfg.seed, cfg.digits)))
    align = shared / "align"
    runs: dict[str, Path] = {}
    t = {}
    tr = lambda c: replace(c.train, batch_size=cfg.batch_size, device=cfg.device, seed=cfg.seed)  # noqa: E731

    s = SFTConfig()
    sft = SFTConfig(data=(str(align / "lima" / "lima.json"), str(align / "llamafactory_demo" / "alpaca_en_demo.json"),
                          str(add)), max_steps=cfg.sft_steps, seq_len=cfg.seq_len, add_chat_tokens=True, truncate=True,
                    eval_every=max(cfg.sft_steps // 5, 1), train=tr(s))
    t["sft"] = time.perf_counter()
    runs["sft"] = run_sft(_with(sft, "sft", cfg.overrides), base, out / "sft")
    t["sft"] = time.perf_counter() - t["sft"]
    d = DPOConfig()
    dpo = DPOConfig(data=(str(align / "llamafactory_demo" / "dpo_en_demo.json"),),
                    heldout=(str(align / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"),), max_steps=cfg.dpo_steps,
                    seq_len=cfg.seq_len, truncate=True, eval_every=max(cfg.dpo_steps // 5, 1), train=tr(d))
    t["dpo"] = time.perf_counter()
    runs["dpo"] = run_dpo(_with(dpo, "dpo", cfg.overrides), runs["sft"] / "model", out / "dpo")
    t["dpo"] = time.perf_counter() - t["dpo"]
    g = GRPOConfig()
    policy = runs["dpo"] / "model"
    if cfg.grpo_addition_rollouts:
        grpo = GRPOConfig(digits=cfg.digits, rollouts=cfg.grpo_addition_rollouts,
                          prompts_per_rollout=cfg.batch_size // 2, group_size=8,
                          rollout_epochs=1, eval_every=max(cfg.grpo_addition_rollouts // 5, 1),
                          train=replace(tr(g), batch_size=cfg.batch_size * 4))
        t["grpo_addition"] = time.perf_counter()
        runs["grpo_addition"] = run_grpo(_with(grpo, "grpo", cfg.overrides), policy, out / "grpo_addition")
        t["grpo_addition"] = time.perf_counter() - t["grpo_addition"]
        policy = runs["grpo_addition"] / "model"
    gsm_train, gsm_test = shared / "eval" / "gsm8k" / "train.jsonl", shared / "eval" / "gsm8k" / "test.jsonl"
    if cfg.grpo_gsm8k_rollouts and gsm_train.is_file():
        grpo = GRPOConfig(task=str(gsm_train), reward="gsm8k", rollouts=cfg.grpo_gsm8k_rollouts, max_new_tokens=256,
                          prompts_per_rollout=cfg.batch_size // 2, group_size=8, eval_prompts=64,
                          eval_every=max(cfg.grpo_gsm8k_rollouts // 5, 1), train=replace(tr(g), batch_size=cfg.batch_size * 4))
        t["grpo_gsm8k"] = time.perf_counter()
        runs["grpo_gsm8k"] = run_grpo(_with(grpo, "grpo", cfg.overrides), policy, out / "grpo_gsm8k")
        t["grpo_gsm8k"] = time.perf_counter() - t["grpo_gsm8k"]
        policy = runs["grpo_gsm8k"] / "model"
    gsm = _gsm8k_before_after(cfg, runs["sft"] / "model", policy, gsm_test) if cfg.gsm8k_eval and gsm_test.is_file() else None
    return write_report(out, base, runs, t, gsm)


def _gsm8k_before_after(cfg: ChatRecipeConfig, before: Path, after: Path, test: Path) -> dict[str, float]:
    """GSM8K test accuracy (greedy, exact final answer) of the SFT model and the final model."""
    from kiln.align.grpo import evaluate_reward
    from kiln.align.rewards import gsm8k_reward
    from kiln.align.stage import load_policy, pick_device

    probs = [(r["question"], r["answer"]) for r in map(json.loads, test.read_text().splitlines()[: cfg.gsm8k_eval])]
    out = {}
    for name, path in (("before", before), ("after", after)):
        model, tok, tpl = load_policy(path, None, False, pick_device(cfg.device))
        out[name] = evaluate_reward(model, tpl, probs, gsm8k_reward, 256, tok.vocab_size)["heldout_accuracy"]
    return out


def write_report(out: Path, base: Path, runs: dict[str, Path], seconds: dict[str, float],
                 gsm: dict[str, float] | None) -> Path:
    """``report.md``: per stage, its statistics and wall time, and its curve."""
    from kiln.artifacts import read_manifest

    lines = ["# Kiln chat recipe", "", f"Base model `{base}`.", ""]
    for name, path in runs.items():
        m = read_manifest(path)
        stats = {k: v for k, v in m.get("stats", {}).items() if k != "read"}
        lines += [f"## {name}", "", f"`{path}`: {seconds.get(name, 0):.0f} s this run, {m.get('seconds') or 0:.0f} s "
                  "the stage's own time.", "", "| statistic | value |", "|---|---|"]
        lines += [f"| {k} | `{json.dumps(v, default=str)[:160]}` |" for k, v in stats.items()]
        if (path / "loss.png").is_file():
            lines += ["", f"![{name} loss]({(path / 'loss.png').relative_to(out) if (path / 'loss.png').is_relative_to(out) else path / 'loss.png'})"]
        lines.append("")
    if gsm is not None:
        lines += ["## GSM8K (test, greedy, exact final answer)", "", "| model | accuracy |", "|---|---:|",
                  f"| after SFT | {gsm['before']:.3f} |", f"| final | {gsm['after']:.3f} |", ""]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    print(f"report: {report}")
    return report
