"""The demo's last stage: a short SFT that turns the demo's base model into one that answers.

Chat data a fresh install has offline, made from what the demo already holds:

- "Continue the text: <the first words of a sentence of the corpus>" answered with the rest of that
  sentence (the model knows the corpus; SFT teaches it the turn format and when to stop);
- the synthetic addition task with one-digit operands ("What is 3 + 4?" -> "7").

Three of four conversations are additions and rows are 64 tokens: with the earlier mix (two of
three continuations, whose replies are ~12 tokens against an addition's 2, so additions were ~8%
of the loss) and 128-token rows, 80 steps answered 3 of 20 fresh sums right; this mix and row
length learn the table at the same compute (docs/align.md, "The demo's chat stage").

``run_chat_demo`` writes those conversations, runs ``kiln.align.sft.run_sft`` on the base model (the
chat tokens are added at its start) and returns the SFT run and a chat exchange to print.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

EXCHANGE = ("What is 3 + 4?", "Continue the text: And God said", "What is 5 + 2?")
HELDOUT_QUESTIONS = 20
"""Fresh one-digit questions (a seed the training data does not use) scored greedily after the SFT."""


def corpus_conversations(
    train: Path | Iterable[str], n: int, seed: int, words: int = 5, max_words: int = 14
) -> list[dict]:
    """``n`` "Continue the text" conversations from sentences of a corpus split: a ``{"text"}`` JSONL
    file, or the split's texts (``kiln.data.readers.read_texts`` over a corpus artifact)."""
    sentences = []
    if isinstance(train, (str, Path)):
        with open(train, encoding="utf-8") as f:
            texts: Iterable[str] = [json.loads(line).get("text", "") for line in f]
    else:
        texts = train
    for text in texts:
        for s in re.split(r"(?<=[.;:?!])\s+|\n+", text):
            w = s.split()
            if words + 2 <= len(w) <= words + max_words:
                sentences.append(w)
    rng = random.Random(seed)
    rng.shuffle(sentences)
    return [{"messages": [{"role": "user", "content": "Continue the text: " + " ".join(w[:words])},
                          {"role": "assistant", "content": " ".join(w[words:])}]} for w in sentences[:n]]


def chat_data(corpus_dir: Path, out: Path, seed: int, n_corpus: int = 1500, n_add: int = 4500) -> Path:
    """Write the demo's SFT conversations (corpus continuations + addition) to ``out`` (JSONL)."""
    from kiln.align.rewards import addition_conversations
    from kiln.data.readers import read_texts

    # the corpus artifact's train split in whatever format the corpus stage wrote (train_*.jsonl.zst)
    recs = corpus_conversations(read_texts(corpus_dir, split="train"), n_corpus, seed)
    recs += addition_conversations(n_add, seed, 1)
    random.Random(seed).shuffle(recs)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
    tmp.replace(out)
    return out


def run_chat_demo(model_dir: Path, corpus_dir: Path, out: Path, steps: int, seed: int, device: str = "auto",
                  force: bool = False, n_corpus: int = 1500, n_add: int = 4500, seq_len: int = 64,
                  lr: float = 2e-3, save_every: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """SFT the demo model on ``chat_data`` for ``steps`` steps; (the SFT run, [(question, reply)]).

    ``n_corpus``/``n_add``: conversations of each kind; ``seq_len``: packed row length (0: the
    model's context); ``lr``: peak learning rate (cosine to a tenth)."""
    from kiln.align.sft import SFTConfig, run_sft
    from kiln.align.stage import chat_reply, load_policy, pick_device

    data = chat_data(corpus_dir, out / "chat.jsonl", seed, n_corpus, n_add)
    config = Path(model_dir) / "config.json"
    context = json.loads(config.read_text()).get("max_position_embeddings", 0) if config.is_file() else 0
    seq_len = min(seq_len, context) if seq_len and context else seq_len  # a demo run with a short context
    base = SFTConfig()
    cfg = SFTConfig(data=(str(data),), max_steps=steps, add_chat_tokens=True, eval_every=max(steps // 2, 1),
                    sample_every=0, heldout_frac=0.05, max_heldout=64, seq_len=seq_len,
                    train=replace(base.train, lr=lr, min_lr=lr / 10, warmup_steps=min(5, steps), batch_size=16,
                                  seed=seed, device=device, save_every=save_every or max(steps // 2, 1)))
    run_dir = run_sft(cfg, model_dir, out / "sft", resume=not force)
    model, _, tpl = load_policy(run_dir / "model", None, False, pick_device(device))
    model.eval()
    exchange = [(q, chat_reply(model, tpl, [{"role": "user", "content": q}], max_tokens=24)) for q in EXCHANGE]
    _write_json(out / "heldout.json", addition_accuracy(model, tpl, HELDOUT_QUESTIONS, seed + 10**6))
    return run_dir, exchange


def addition_accuracy(model: Any, tpl: Any, n: int, seed: int) -> dict[str, Any]:
    """Greedy exact-answer accuracy on ``n`` one-digit questions drawn with ``seed``."""
    from kiln.align.grpo import evaluate_reward
    from kiln.align.rewards import addition_problems, addition_reward

    r = evaluate_reward(model, tpl, addition_problems(n, seed, 1), addition_reward, 8,
                        getattr(tpl.tokenizer, "vocab_size", None))
    return {"questions": n, "correct": round(r["heldout_accuracy"] * n), "accuracy": r["heldout_accuracy"],
            "seed": seed}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    tmp.replace(path)


def format_exchange(exchange: list[tuple[str, str]], heldout: dict[str, Any] | None = None) -> str:
    """The exchange as the demo prints it; with ``heldout`` (``stats(run)["heldout"]``), the measured
    accuracy on fresh questions under it."""
    text = "\n".join(f"user:      {q}\nassistant: {a}" for q, a in exchange)
    if heldout:
        text += (f"\n({heldout['correct']}/{heldout['questions']} right on newly drawn one-digit sums, greedy, "
                 f"seed {heldout['seed']}; all 100 such sums occur in the SFT data)")
    return text


def stats(run_dir: Path) -> dict[str, Any]:
    """The SFT run's held-out loss before and after (from its manifest)."""
    from kiln.artifacts import read_manifest

    s = read_manifest(run_dir)["stats"]
    acc = Path(run_dir).parent / "heldout.json"
    return {"heldout_loss_before": s.get("heldout_loss_first"), "heldout_loss_after": s.get("heldout_loss"),
            "steps": s.get("steps"), "conversations": s.get("conversations"),
            "heldout": json.loads(acc.read_text()) if acc.is_file() else None}
