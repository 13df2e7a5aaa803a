"""GRPO's learning check on the synthetic addition task, end to end on a CPU in about a minute.

``python -m kiln.align.learning OUT [--digits 1] [--sft-steps 60] [--set KEY=VALUE ...]``: builds a
2-layer d=64 model with a byte-level tokenizer (digits are single tokens), SFTs it on seeded
addition conversations to a modest greedy accuracy (``kiln.align.sft.run_sft``), then runs
``kiln.align.grpo.run_grpo`` with ``grpo_addition_cpu()`` (plus ``--set`` overrides) and prints the
held-out greedy accuracy and the mean rollout reward before and after, with the CPU seconds of
each stage. The held-out prompts are the stage's own (seed ``train.seed + 10**6``).
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


def run(out: Path, digits: int = 1, sft_steps: int = 60, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """SFT then GRPO (see the module docstring); returns the before/after numbers."""
    import torch

    from kiln.align.grpo import grpo_addition_cpu, run_grpo
    from kiln.align.rewards import addition_conversations
    from kiln.align.sft import SFTConfig, run_sft
    from kiln.align.stage import apply_stage_overrides

    torch.set_num_threads(1)
    base = build_base(out / "base")
    data = out / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in addition_conversations(4000, 1, digits)))
    t = _cpu_s()
    sft = SFTConfig(data=(str(data),), max_steps=sft_steps, add_chat_tokens=True, eval_every=0, sample_every=0,
                    train=replace(SFTConfig().train, lr=3e-3, min_lr=3e-4, warmup_steps=5, batch_size=16,
                                  save_every=10**6, log_every=50, device="cpu"))
    sft_dir = run_sft(sft, base, out / "sft", resume=False)
    sft_s, t = _cpu_s() - t, _cpu_s()
    cfg = apply_stage_overrides(replace(grpo_addition_cpu(), digits=digits,
                                        train=replace(grpo_addition_cpu().train, device="cpu")), list(overrides))
    run_dir = run_grpo(cfg, sft_dir / "model", out / "grpo", resume=False)
    s = json.loads((run_dir / "manifest.json").read_text())["stats"]
    rr = s["rollout_rewards"]
    k = max(len(rr) // 4, 1)
    return {"sft_cpu_s": round(sft_s, 1), "grpo_cpu_s": round(_cpu_s() - t, 1),
            "heldout_accuracy_before": s["first_eval"]["heldout_accuracy"],
            "heldout_accuracy_after": s["last_eval"]["heldout_accuracy"],
            "rollout_reward_first_quarter": round(sum(rr[:k]) / k, 4),
            "rollout_reward_last_quarter": round(sum(rr[-k:]) / k, 4), "heldout_prompts": cfg.eval_prompts}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kiln.align.learning", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--digits", type=int, default=1)
    p.add_argument("--sft-steps", type=int, default=60)
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    print(json.dumps(run(a.out, a.digits, a.sft_steps, tuple(a.overrides)), indent=1))


if __name__ == "__main__":
    main()
