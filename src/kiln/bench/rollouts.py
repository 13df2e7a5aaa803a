"""``kiln bench serve --parts rollouts``: GSM8K generation and GRPO rollouts timed before and after
the engine, same model, same prompts, same token counts.

*Before* is the decoder Kiln had until the engine (commit 4a63a50 removed it): prompts sorted by
length, cut into static batches, left-padded into one dense ``KVCache`` per batch, decoded together
with a per-row key mask (``PaddedAttention``), finished rows dropped from the cache between steps.
``padded_generate`` below is that loop, rebuilt from the tools that remain in ``kiln.generate.batch``
and ``kiln.model.kv_cache`` (without its stop-string and sliding-window branches, which a run of a
fixed token count inside the context never takes). *After* is what Kiln runs today:

- ``gsm8k``: the few-shot GSM8K prompts of ``kiln eval`` ("Question: ...\\nAnswer: ..." shots, taken
  from the head of the same file, then the question), greedy. After: ``one_shot_engine``, the engine
  that ``kiln eval``'s generative tasks build per call (no CUDA graphs; prefix caching, so the shared
  shots are computed once). A third row, ``one at a time``, runs a few prompts through an engine that
  holds one sequence: Kiln's single-request path (``kiln generate``).
- ``grpo``: the questions through the chat template, each sampled ``group`` times at temperature 1
  (a GRPO rollout batch). After: ``kiln.align.rollout.RolloutEngine``, the one GRPO keeps for a run
  (CUDA graphs on a GPU, captured once before the clock starts, as in training).

Replies run to ``max_tokens`` (the end-of-text token is ignored: the weights are random unless
``--model`` is given), so every row generates the same number of tokens.
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DEFAULT_GSM8K = "../shared/data/eval/gsm8k/test.jsonl"


@dataclass
class RolloutRow:
    """One way of generating one workload."""

    table: str
    task: str
    impl: str
    sequences: int = 0
    tokens: int = 0
    seconds: float | None = None
    tok_s: float | None = None
    speedup: float | None = None
    note: str = ""
    error: str = ""


def padded_generate(model: Any, prompts: list[list[int]], max_tokens: int, temperature: float, batch_size: int,
                    seed: int = 0) -> list[list[int]]:
    """The pre-engine batched decoder: exactly ``max_tokens`` new ids per prompt (prompt + reply must fit
    the context), ``batch_size`` prompts at a time, longest first; one generator draws every sample."""
    import torch

    from kiln.generate.batch import padded_attention, prefill_padded
    from kiln.generate.sampling import sample_next

    dev = next(model.parameters()).device
    gen = torch.Generator(device=dev).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    with torch.inference_mode(), padded_attention(model) as attn:
        for s in range(0, len(order), batch_size):
            rows = order[s:s + batch_size]
            cache, pad, h = prefill_padded(model, attn, [prompts[i] for i in rows],
                                           max(len(prompts[i]) for i in rows) + max_tokens)
            for step in range(max_tokens):
                nxt = sample_next(model.lm_head(h[:, -1]), temperature, None, None, gen)  # (B,)
                for b, t in zip(rows, nxt.tolist()):
                    out[b].append(t)
                if step + 1 == max_tokens:
                    break
                attn.mark_valid(cache.length)
                h = model.hidden_states(nxt[:, None], (cache.length - pad)[:, None], cache)
    return out


def gsm8k_prompts(path: str, n: int, shots: int, tokenizer: Any, room: int, chat: bool) -> list[list[int]]:
    """``n`` GSM8K test prompts as token ids, each at most ``room`` tokens (the head cut off, so the
    question stays). ``chat``: the question alone through the chat template (GRPO's prompts);
    otherwise ``kiln eval``'s few-shot text with the file's first ``shots`` items as the examples."""
    from kiln.align.chat import ChatTemplate
    from kiln.eval.generative import gsm8k_prompt, load_gsm8k

    p = Path(path)
    if not p.is_file() and path == DEFAULT_GSM8K and Path("shared/data/eval/gsm8k/test.jsonl").is_file():
        p = Path("shared/data/eval/gsm8k/test.jsonl")
    if not p.is_file():
        raise FileNotFoundError(f"--gsm8k {path} is not a file: give GSM8K's test.jsonl (question/answer lines)")
    items = load_gsm8k(p, limit=shots + n)
    if len(items) <= shots:
        raise ValueError(f"--gsm8k {path} has {len(items)} items; need more than the {shots} shots")
    examples, questions = items[:shots], items[shots:]
    tpl = ChatTemplate.from_tokenizer(tokenizer) if chat else None
    out = []
    for i in range(n):
        q = questions[i % len(questions)]
        ids = (tpl.render([{"role": "user", "content": q.question}]) if tpl is not None
               else tokenizer.encode(gsm8k_prompt(q, examples)))
        out.append(ids[-room:])
    return out


def _timed(device: Any, fn: Any) -> tuple[Any, float]:
    """``fn()`` and its wall seconds, the device synchronised before and after."""
    import torch

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda _d: None)
    sync(device)
    t0 = time.perf_counter()
    res = fn()
    sync(device)
    return res, time.perf_counter() - t0


def _row(task: str, impl: str, outs: list[list[int]], seconds: float, note: str = "") -> RolloutRow:
    n = sum(map(len, outs))
    return RolloutRow("rollouts", task, impl, len(outs), n, seconds, n / seconds if seconds else None, note=note)


def rollout_rows(model: Any, tokenizer: Any, args: Any) -> list[RolloutRow]:
    """Every row of the rollouts table (see the module docstring); a failed row carries its error."""
    import torch

    from kiln.align.rollout import RolloutEngine
    from kiln.generate import SamplingParams
    from kiln.generate.engine import one_shot_engine

    dev = next(model.parameters()).device
    M, B = args.max_tokens, args.rollout_batch
    room = model.config.context_length - M
    vocab = min(model.config.vocab_size, tokenizer.vocab_size)
    evalp = gsm8k_prompts(args.gsm8k, args.gsm8k_prompts, args.gsm8k_shots, tokenizer, room, chat=False)
    grpop = [p for p in gsm8k_prompts(args.gsm8k, max(1, args.gsm8k_prompts // args.group), 0, tokenizer, room,
                                      chat=True) for _ in range(args.group)]
    greedy = SamplingParams(max_tokens=M, temperature=0.0, ignore_eos=True)
    rows: list[RolloutRow] = []

    def add(task: str, impl: str, fn: Any, note: str = "") -> None:
        try:
            outs, secs = _timed(dev, fn)
            rows.append(_row(task, impl, outs, secs, note))
        except Exception as e:  # noqa: BLE001 - a failed row is reported, not fatal
            traceback.print_exc()
            rows.append(RolloutRow("rollouts", task, impl, error=f"{type(e).__name__}: {str(e)[:300]}"))
        r = rows[-1]
        print(f"  rollouts {task} {impl}: {r.tok_s or 0:.1f} tok/s in {r.seconds or 0:.2f} s {r.error}", flush=True)

    def engine_greedy(eng: Any, prompts: list[list[int]]) -> list[list[int]]:
        return [list(o.token_ids) for o in eng.generate(prompts, greedy)]

    padded_generate(model, evalp[:2], 2, 0.0, 2)  # warm-up: kernels, allocator
    add("gsm8k", f"before: padded batches of {B}", lambda: padded_generate(model, evalp, M, 0.0, B))
    eng = one_shot_engine(model, vocab, None, B, tokenizer)
    add("gsm8k", f"after: engine, {B} running", lambda: engine_greedy(eng, evalp),
        f"kiln eval's engine (no CUDA graphs), {eng.config.max_num_seqs} running, prefix caching")
    k = min(len(evalp), args.sequential_prompts)
    one = one_shot_engine(model, vocab, None, 1, tokenizer)
    add("gsm8k", "one at a time", lambda: engine_greedy(one, evalp[:k]), f"first {k} prompts")
    eng = one = None  # free their KV pools before the next engine

    add("grpo", f"before: padded batches of {B}", lambda: padded_generate(model, grpop, M, 1.0, B, seed=1),
        f"{len(grpop) // args.group} prompts x {args.group} samples, temperature 1")
    roll = RolloutEngine(model, max_num_seqs=B, vocab_limit=vocab)
    roll.generate(grpop[:2], 2, 1.0, 0, ())  # warm-up outside the clock: CUDA graphs, as GRPO's first call
    add("grpo", f"after: RolloutEngine, {B} running", lambda: roll.generate(grpop, M, 1.0, 0, ()),
        "kiln grpo's engine" + (" (CUDA graphs)" if dev.type == "cuda" else ""))
    roll = None
    for task in ("gsm8k", "grpo"):
        base = next((r.tok_s for r in rows if r.task == task and r.impl.startswith("before") and r.tok_s), None)
        for r in rows:
            if r.task == task and r.tok_s and base:
                r.speedup = r.tok_s / base
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


def format_rollouts(rows: list[RolloutRow]) -> str:
    from kiln.bench.serve_http import _f

    out = ["| task | impl | sequences | output tokens | s | output tok/s | vs before | note |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        note = r.note + (f" ERROR {r.error}" if r.error else "")
        out.append(f"| {r.task} | {r.impl} | {r.sequences} | {r.tokens} | {_f(r.seconds, '.2f')} | {_f(r.tok_s)} | "
                   f"{_f(r.speedup, '.2f')}{'x' if r.speedup else ''} | {note} |")
    return "\n".join(out)

