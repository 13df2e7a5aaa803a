"""The ``"eval"`` stage: score a model on held-out text and benchmarks, write results and a report.

``run_eval(cfg, out_dir)`` loads a model directory (``save_pretrained`` output) and its tokenizer,
refuses a vocabulary mismatch, runs every task in ``cfg.tasks`` and writes, through ``StageRun``:
``results.json`` (every metric), ``results.md`` (a table with random baselines and centered scores)
and ``results.png`` (a bar chart). ``QuickEval`` is the same scoring on a small fixed subset, built
once and called by the trainer every N steps.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.tokenizer.folder import find_tokenizer  # also kiln.eval.stage.find_tokenizer, its old home

log = logging.getLogger(__name__)

GENERATIVE = ("gsm8k", "math500")
DEFAULT_TASKS = ("hellaswag", "arc_easy", "arc_challenge", "piqa", "winogrande", "lambada",
                 "openbookqa", "copa", "boolq")


def expand_tasks(names: Sequence[str]) -> tuple[str, ...]:
    """Task names with the suites spelled out: ``all`` (every registered task, then gsm8k and
    math500), ``core`` (the CORE-style tasks), ``mc`` (every multiple-choice task)."""
    from kiln.eval.tasks import TASKS

    suites = {"all": (*TASKS, *GENERATIVE), "core": tuple(n for n, t in TASKS.items() if t.core),
              "mc": tuple(TASKS)}
    out: list[str] = []
    for n in names:
        for t in suites.get(n, (n,)):
            if t not in out:
                out.append(t)
    return tuple(out)


def default_data_dir() -> str:
    """``$KILN_EVAL_DATA`` or ``../shared/data/eval`` beside the checkout (where the test data lives)."""
    env = os.environ.get("KILN_EVAL_DATA")
    if env:
        return env
    return str(Path(__file__).resolve().parents[3].parent / "shared" / "data" / "eval")


@dataclass(frozen=True)
class EvalConfig:
    """What ``kiln eval`` scores and how."""

    model: str = ""
    """Model directory written by save_pretrained (a train run's model/)."""
    tokenizer: str = ""
    """Tokenizer file or artifact dir; empty: found beside the model or through its manifests."""
    tasks: tuple[str, ...] = DEFAULT_TASKS
    """Benchmarks: names from kiln.eval.tasks.TASKS, plus gsm8k and math500; suites all, core, mc."""
    data_dir: str = ""
    """Folder holding hellaswag/, llm_foundry_local_data/, mmlu/, gsm8k/, math/ (default: shared data)."""
    limit: int | None = None
    """At most this many items per task (None: all)."""
    gen_limit: int | None = None
    """At most this many problems per generative task (gsm8k, math500); None: --limit."""
    text: tuple[str, ...] = ()
    """Held-out text/jsonl files or token shards (.bin) for loss, perplexity and bits per byte."""
    stride: int | None = None
    """Sliding-window stride for held-out text (default: half the context)."""
    batch_size: int = 16
    """Rows per forward pass (multiple choice: choices per batch)."""
    scoring: str = "auto"
    """Multiple choice: rows (each choice with its context), cache (context once, choices from its
    KV cache), auto (cache for Kiln models)."""
    gen_batch_size: int = 64
    """Prompts decoded together for gsm8k/math500 (KV-cache batched decoding)."""
    device: str = "auto"
    """cpu, cuda, cuda:1... ("auto": cuda when available)."""
    dtype: str = "auto"
    """Weights' dtype: float32, bfloat16 ("auto": bfloat16 on cuda, float32 on cpu)."""
    max_new_tokens: int = 256
    """Generation budget per answer for gsm8k/math500."""
    samples: int = 0
    """Sampled solutions per problem for pass@k (0: greedy only)."""
    pass_k: tuple[int, ...] = (1,)
    """k values for pass@k (each <= samples)."""
    contamination: tuple[str, ...] = ()
    """Token shards to check every task's items against (13-gram overlap)."""
    ngram: int = 13
    """n of the contamination n-grams."""

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit {self.limit} must be >= 1")
        if self.gen_limit is not None and self.gen_limit < 1:
            raise ValueError(f"--gen-limit {self.gen_limit} must be >= 1")
        if self.batch_size < 1 or self.gen_batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size} and --gen-batch-size {self.gen_batch_size} must be >= 1")
        if self.scoring not in ("auto", "rows", "cache"):
            raise ValueError(f"--scoring {self.scoring!r} is not one of auto, rows, cache")
        if self.samples and max(self.pass_k) > self.samples:
            raise ValueError(f"pass@{max(self.pass_k)} needs --samples >= {max(self.pass_k)}")


def pick_device(device: str) -> str:
    """Resolve "auto" to cuda when available, else cpu (``kiln.distributed.pick_device``, as a string)."""
    from kiln.distributed import pick_device as pick

    return str(pick(device))


def load_model(model_dir: str | os.PathLike, device: str = "auto", dtype: str = "auto") -> Any:
    """``load_pretrained`` in eval mode; on cuda, bfloat16 weights and torch's fused attention."""
    import torch

    from kiln.model import load_pretrained

    dev = pick_device(device)
    cuda = dev.startswith("cuda")
    if dtype == "auto":
        dtype = "bfloat16" if cuda else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"--dtype {dtype} is not one of auto, float32, bfloat16, float16")
    model = load_pretrained(model_dir, device=dev, dtype=getattr(torch, dtype),
                            attention_impl="sdpa" if cuda else None)
    return model.eval()


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | os.PathLike,
    limit: int | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 256,
    samples: int = 0,
    pass_k: Sequence[int] = (1,),
    gen_limit: int | None = None,
    gen_batch_size: int = 64,
    scoring: str = "auto",
) -> dict[str, Any]:
    """Score ``model`` on each task; returns ``{"tasks": {name: metrics}, "core": float | None}``.

    Multiple-choice metrics hold acc, acc_len, acc_norm, their standard errors, the task's headline
    ``metric`` and ``score``, its random ``baseline`` and ``centered`` score, and the count of
    left-truncated items. ``core`` averages ``centered`` over the CORE tasks present. Task names
    may be suites (``expand_tasks``); ``gen_limit`` caps gsm8k/math500 (default ``limit``).
    """
    from kiln.eval.core import centered
    from kiln.eval.generative import evaluate_generative, load_generative_task
    from kiln.eval.multiple_choice import score_items
    from kiln.eval.tasks import get_task, random_baseline

    d = Path(data_dir or default_data_dir())
    out: dict[str, Any] = {}
    for name in expand_tasks(tasks):
        t0 = time.time()
        if name in GENERATIVE:
            items, shots = load_generative_task(name, d, limit if gen_limit is None else gen_limit)
            g = evaluate_generative(model, tokenizer, items, "gsm8k" if name == "gsm8k" else "math",
                                    shots, max_new_tokens, samples, pass_k, batch_size=gen_batch_size)
            res = {**g.to_dict(), "metric": "acc", "score": g.accuracy, "baseline": 0.0,
                   "centered": g.accuracy, "core": False}
        else:
            spec = get_task(name)
            items = spec.load(d, limit)
            r = score_items(model, tokenizer, items, batch_size=batch_size, method=scoring)
            base = random_baseline(spec, items)
            score = getattr(r, spec.metric)
            res = {**r.to_dict(), "metric": spec.metric, "score": score, "baseline": base,
                   "centered": centered(score, base), "core": spec.core}
        res["seconds"] = round(time.time() - t0, 3)
        log.info("eval %s: %s=%.4f (baseline %.3f, n=%d, %.1fs)", name, res["metric"], res["score"],
                 res["baseline"], res["n"], res["seconds"])
        out[name] = res
    core = [v["centered"] for v in out.values() if v["core"]]
    return {"tasks": out, "core": sum(core) / len(core) if core else None}


class QuickEval:
    """A fixed, pre-loaded subset of tasks the trainer scores every N steps.

    Usage: ``qe = QuickEval(tokenizer, tasks=("hellaswag",), limit=200)`` once, then
    ``metrics = qe(model)`` -> ``{"eval/hellaswag": 0.27, "eval/core": 0.01}``; the model's
    train/eval mode is restored afterwards.
    """

    def __init__(
        self,
        tokenizer: Any,
        tasks: Sequence[str] = ("hellaswag", "arc_easy", "piqa"),
        limit: int = 200,
        data_dir: str | os.PathLike | None = None,
        batch_size: int = 16,
        autocast_dtype: Any = None,
    ) -> None:
        from kiln.eval.tasks import get_task, random_baseline

        d = Path(data_dir or default_data_dir())
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.autocast_dtype = autocast_dtype
        self.items = {}
        for name in tasks:
            spec = get_task(name)
            items = spec.load(d, limit)
            self.items[name] = (spec, items, random_baseline(spec, items))

    def __call__(self, model: Any) -> dict[str, float]:
        """Headline accuracy per task and the centered mean, keys prefixed with ``eval/``."""
        import contextlib

        import torch

        from kiln.eval.core import centered
        from kiln.eval.lm import model_device
        from kiln.eval.multiple_choice import score_items

        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()
        amp = (torch.autocast(model_device(model).type, dtype=self.autocast_dtype)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        try:
            out, cen = {}, []
            with amp:
                for name, (spec, items, base) in self.items.items():
                    # rows, not the KV-cache path: that swaps attention kernels, which a compiled
                    # training model should not see mid-run
                    acc = getattr(score_items(model, self.tokenizer, items, self.batch_size, method="rows"),
                                  spec.metric)
                    out[f"eval/{name}"] = acc
                    cen.append(centered(acc, base))
            out["eval/core"] = sum(cen) / len(cen)
            return out
        finally:
            if was_training and hasattr(model, "train"):
                model.train()


def run_info(model: Any, seconds: float) -> dict[str, Any]:
    """Where and how the scores were computed: device, dtype, parameters, torch version, wall time."""
    import platform

    import torch

    from kiln.eval.lm import model_device

    dev = model_device(model)
    p = next(model.parameters())
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})",
            "dtype": str(p.dtype).removeprefix("torch."), "params": sum(x.numel() for x in model.parameters()),
            "torch": torch.__version__, "seconds": round(seconds, 1)}


def write_report(results: dict[str, Any], out_dir: str | os.PathLike, title: str = "Kiln eval") -> None:
    """``results.md`` (table of tasks) and ``results.png`` (bar chart of centered scores)."""
    out = Path(out_dir)
    tasks = results.get("tasks", {})
    lines = [f"# {title}", "",
             "| task | n | metric | score | ± stderr | random | (score - random) / stderr | centered | truncated | s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in tasks.items():
        se = r.get("stderr", {}).get(r["metric"])
        z = "" if not se else f"{(r['score'] - r['baseline']) / se:+.1f}"
        lines.append(f"| {name} | {r['n']} | {r['metric']} | {r['score']:.4f} | "
                     f"{'' if se is None else f'{se:.4f}'} | {r['baseline']:.3f} | {z} | {r['centered']:.4f} | "
                     f"{r.get('truncated', 0)} | {r.get('seconds', 0):.1f} |")
    if results.get("core") is not None:
        n_core = sum(1 for r in tasks.values() if r.get("core"))
        lines += ["", f"**CORE-style centered mean** over {n_core} tasks: {results['core']:.4f} (chance 0, perfect 1)"]
    passk = {n: r["pass_at_k"] for n, r in tasks.items() if r.get("pass_at_k")}
    if passk:
        lines += ["", "| task | " + " | ".join(next(iter(passk.values()))) + " |",
                  "|---|" + "---:|" * len(next(iter(passk.values())))]
        lines += [f"| {n} | " + " | ".join(f"{v:.4f}" for v in pk.values()) + " |" for n, pk in passk.items()]
    info = results.get("run")
    if info:
        lines += ["", (f"{info['device']}, {info['dtype']}, {info['params']:,} parameters, torch {info['torch']}, "
                       f"{info['seconds']} s. stderr = sqrt(p(1-p)/n); random = expected accuracy of a uniform guess.")]
    text = results.get("text")
    if text:
        lines += ["", "| held-out text | loss (nats/token) | perplexity | bits/byte | tokens |",
                  "|---|---:|---:|---:|---:|",
                  f"| {', '.join(text.get('paths', []))} | {text['loss']:.4f} | {text['perplexity']:.2f} | "
                  f"{text['bits_per_byte']:.4f} | {text['tokens']} |"]
    cont = results.get("contamination")
    if cont:
        lines += ["", "| task | items | contaminated | 13-gram share |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v['items']} | {v['contaminated']} | {v['ngram_frac']:.4%} |" for k, v in cont.items()]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    if tasks:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(tasks)
        fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(names) + 1), 3.5))
        se = [tasks[n].get("stderr", {}).get(tasks[n]["metric"]) or 0.0 for n in names]
        ax.bar(names, [tasks[n]["score"] for n in names], yerr=se, capsize=3, color="tab:blue",
               label="score ± stderr")
        ax.scatter(names, [tasks[n]["baseline"] for n in names], color="tab:red", marker="_", s=400,
                   zorder=3, label="random")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.legend(loc="upper right")
        plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
        fig.tight_layout()
        fig.savefig(out / "results.png", dpi=120)
        plt.close(fig)


def run_eval(cfg: EvalConfig, out_dir: str | os.PathLike, force: bool = False) -> Path:
    """The eval stage: load ``cfg.model``, score everything, write the artifact; returns ``out_dir``."""
    from kiln.artifacts import StageRun, write_json_atomic
    from kiln.eval.lm import check_vocab
    from kiln.tokenizer import load_tokenizer

    if not cfg.model:
        raise ValueError("no model given; pass --model DIR (a directory written by save_pretrained)")
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else find_tokenizer(cfg.model)
    data_dir = cfg.data_dir or default_data_dir()
    with StageRun(out_dir, "eval", cfg, inputs=[cfg.model, tok_path, *cfg.text, *cfg.contamination],
                  force=force) as run:
        if run.reused:
            log.info("eval: %s is up to date (reused)", out_dir)
            return Path(out_dir)
        tokenizer = load_tokenizer(tok_path)
        model = load_model(cfg.model, cfg.device, cfg.dtype)
        check_vocab(model, tokenizer)
        t0 = time.time()
        results = evaluate_tasks(model, tokenizer, cfg.tasks, data_dir, cfg.limit, cfg.batch_size,
                                 cfg.max_new_tokens, cfg.samples, cfg.pass_k, cfg.gen_limit,
                                 cfg.gen_batch_size, cfg.scoring)
        results["run"] = run_info(model, time.time() - t0)
        if cfg.text:
            from kiln.eval.perplexity import evaluate_text

            tl = evaluate_text(model, tokenizer, cfg.text, cfg.stride, cfg.batch_size)
            results["text"] = {**tl.to_dict(), "paths": [os.fspath(p) for p in cfg.text]}
        if cfg.contamination:
            results["contamination"] = check_contamination(tokenizer, cfg.tasks, data_dir, cfg.contamination,
                                                           cfg.ngram, cfg.limit)
        write_json_atomic(run.tmp / "results.json", results)
        write_report(results, run.tmp, title=f"Kiln eval: {Path(cfg.model).name}")
        run.stats.update({k: v["score"] for k, v in results["tasks"].items()})
        run.stats["core"] = results["core"]
    return Path(out_dir)


def check_contamination(
    tokenizer: Any,
    tasks: Sequence[str],
    data_dir: str | os.PathLike,
    shards: Sequence[str | os.PathLike],
    n: int = 13,
    limit: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Per-task n-gram overlap between each task's items (context + gold answer) and token shards."""
    from kiln.eval.contamination import contamination, shard_token_arrays
    from kiln.eval.generative import load_generative_task
    from kiln.eval.tasks import get_task

    d = Path(data_dir)
    texts: dict[str, list[list[int]]] = {}
    for name in tasks:
        if name in GENERATIVE:
            items, _ = load_generative_task(name, d, limit)
            texts[name] = [tokenizer.encode(f"{it.question} {it.solution}") for it in items]
        else:
            items = get_task(name).load(d, limit)
            texts[name] = [tokenizer.encode("".join(it.pairs[it.gold])) for it in items]
    return {k: v.to_dict() for k, v in contamination(texts, shard_token_arrays(shards), n).items()}
