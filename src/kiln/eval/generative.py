"""Generative math benchmarks: GSM8K and MATH-500, greedy accuracy and sampled pass@k.

The model writes a solution after a few-shot prompt; the answer is extracted (``#### 42`` or the
last number for GSM8K, the last ``\\boxed{}`` for MATH) and checked against the reference
(``kiln.eval.answers``). A Kiln ``Transformer`` decodes many prompts at once through the engine
(``kiln.generate.LLMEngine``: paged KV cache, continuous batching); any other ``model(idx) -> logits`` goes through ``decode``, one prompt at a
time. Both stop at end-of-text or at a stop string such as the next few-shot "Question:".
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kiln.eval.answers import answers_match, extract_boxed, extract_gsm8k
from kiln.eval.lm import context_length, model_device, uses_kv_cache
from kiln.eval.tasks import read_jsonl


@dataclass(frozen=True)
class GenItem:
    """A generative problem: ``question``, reference ``answer`` (already extracted), ``source``."""

    question: str
    answer: str
    solution: str = ""
    source: str = ""


def load_gsm8k(path: str | os.PathLike, limit: int | None = None) -> list[GenItem]:
    """GSM8K jsonl (``question``, ``answer`` ending in ``#### N``)."""
    out = []
    for i, obj in read_jsonl(path):
        where = f"{path}:{i}"
        q, a = obj.get("question"), obj.get("answer")
        if not isinstance(q, str) or not isinstance(a, str) or "####" not in a:
            raise ValueError(f"{where}: expected 'question' and an 'answer' ending in '#### <number>'")
        out.append(GenItem(q, extract_gsm8k(a) or "", a, where))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_math(path: str | os.PathLike, limit: int | None = None) -> list[GenItem]:
    """MATH jsonl (``problem``, ``solution`` with a ``\\boxed{}``, optional ``answer``)."""
    out = []
    for i, obj in read_jsonl(path):
        where = f"{path}:{i}"
        q, sol = obj.get("problem"), obj.get("solution")
        ans = obj.get("answer")
        if not isinstance(q, str) or not isinstance(sol, str):
            raise ValueError(f"{where}: expected string fields 'problem' and 'solution'")
        if not isinstance(ans, str):
            ans = extract_boxed(sol)
        if ans is None:
            raise ValueError(f"{where}: no 'answer' field and no \\boxed{{}} in the solution")
        out.append(GenItem(q, ans, sol, where))
        if limit is not None and len(out) >= limit:
            break
    return out


GSM8K_SHOTS = 4


def gsm8k_prompt(item: GenItem, shots: Sequence[GenItem]) -> str:
    """Few-shot prompt: "Question: ...\\nAnswer: <solution>\\n\\n" per shot, then the question."""
    s = "".join(f"Question: {e.question}\nAnswer: {e.solution}\n\n" for e in shots)
    return s + f"Question: {item.question}\nAnswer:"


def math_prompt(item: GenItem, shots: Sequence[GenItem]) -> str:
    """Few-shot prompt for MATH: "Problem: ...\\nSolution: ..." per shot, then the problem."""
    s = "".join(f"Problem: {e.question}\nSolution: {e.solution}\n\n" for e in shots)
    return s + f"Problem: {item.question}\nSolution:"


def decode(
    model: Any,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_k: int | None = None,
    stop: Sequence[str] = (),
    seed: int = 0,
) -> str:
    """Continue ``prompt``; greedy when ``temperature == 0``. Stops at end-of-text or a stop string.

    Returns the new text only, cut before the first stop string. Ids past the tokenizer's vocabulary
    (a model's vocabulary is often padded to a multiple of 64) are never produced.
    """
    text = ""
    for piece in _decode_pieces(model, tokenizer, prompt, max_new_tokens, temperature, top_k, seed):
        text += piece
        cut = [text.find(s) for s in stop if s in text]
        if cut:
            return text[: min(cut)]
    return text


@torch.no_grad()
def _decode_pieces(
    model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, temperature: float,
    top_k: int | None, seed: int,
) -> Iterator[str]:
    """Token-by-token decoding; yields text as it becomes decodable.

    A Kiln ``Transformer`` decodes through the engine (``kiln.generate``, paged KV cache); any other
    model of the protocol re-runs its last ``context_length`` tokens every step.
    """
    T = context_length(model)
    dev = model_device(model)
    eot = getattr(tokenizer, "eot_id", None)
    n_vocab = getattr(tokenizer, "vocab_size", None)
    ids = list(tokenizer.encode(prompt)) or ([eot] if eot is not None else [])
    ids = ids[-(T - 1):]
    new: list[int] = []
    shown = ""
    if hasattr(model, "hidden_states"):  # a Kiln Transformer: one request through the engine
        from kiln.generate import generate_tokens

        tokens: Iterator[int] = generate_tokens(model, ids, max_new_tokens, temperature, top_k, None, seed,
                                                eot, n_vocab)
    else:
        tokens = _uncached_tokens(model, ids, max_new_tokens, temperature, top_k, seed, eot, n_vocab, T, dev)
    for nxt in tokens:
        new.append(nxt)
        text = tokenizer.decode(new)
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
            shown = text


def _uncached_tokens(
    model: Any, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None, seed: int,
    eot: int | None, n_vocab: int | None, T: int, dev: torch.device,
) -> Iterator[int]:
    """Token ids from a ``model(idx) -> logits`` that has no cache: re-runs its last T - 1 tokens a step."""
    from kiln.generate import sample_next

    gen = torch.Generator(device=dev).manual_seed(seed)
    for _ in range(max_new_tokens):
        out = model(torch.tensor([ids[-(T - 1):]], dtype=torch.long, device=dev))
        logits = (out[0] if isinstance(out, tuple) else out)[0, -1].float()  # (V,)
        if n_vocab is not None and logits.numel() > n_vocab:
            logits[n_vocab:] = float("-inf")
        nxt = int(sample_next(logits, temperature, top_k, None, gen))
        if eot is not None and nxt == eot:
            return
        ids = ids + [nxt]
        yield nxt


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct: 1 - C(n-c, k) / C(n, k).

    (Chen et al., "Evaluating Large Language Models Trained on Code", arXiv:2107.03374.)
    """
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@dataclass
class GenResult:
    """Greedy accuracy, and pass@k over ``samples`` sampled solutions when ``samples > 0``."""

    n: int
    accuracy: float
    pass_at_k: dict[str, float] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary with the first few generations for inspection."""
        se = math.sqrt(self.accuracy * (1 - self.accuracy) / max(self.n, 1))
        return {"n": self.n, "acc": self.accuracy, "stderr": {"acc": se}, "pass_at_k": self.pass_at_k,
                "examples": self.examples[:5]}


def evaluate_generative(
    model: Any,
    tokenizer: Any,
    items: Sequence[GenItem],
    kind: str,
    shots: Sequence[GenItem] = (),
    max_new_tokens: int = 256,
    samples: int = 0,
    ks: Sequence[int] = (1,),
    temperature: float = 0.8,
    seed: int = 0,
    decode_fn: Callable[..., str] | None = None,
    batch_size: int = 32,
) -> GenResult:
    """Greedy accuracy (and sampled pass@k) of ``model`` on GSM8K (``kind="gsm8k"``) or MATH.

    A Kiln ``Transformer`` decodes with up to ``batch_size`` prompts running at once in the engine
    (``kiln.generate.generate_texts``); any other model, or a given ``decode_fn(model, tokenizer,
    prompt, max_new_tokens=, stop=, [temperature=, seed=]) -> str``, goes one prompt at a time.
    """
    if kind not in ("gsm8k", "math"):
        raise ValueError(f"kind={kind!r}; use 'gsm8k' or 'math'")
    make_prompt = gsm8k_prompt if kind == "gsm8k" else math_prompt
    extract = extract_gsm8k if kind == "gsm8k" else extract_boxed
    stop = ("\n\nQuestion:", "Question:") if kind == "gsm8k" else ("\n\nProblem:", "Problem:")
    prompts = [make_prompt(item, shots) for item in items]
    if decode_fn is None and uses_kv_cache(model):
        from kiln.generate import generate_texts

        def run(ps: list[str], temp: float, sd: int) -> list[str]:
            return generate_texts(model, tokenizer, ps, max_new_tokens, temperature=temp, seed=sd,
                                  stop=stop, batch_size=batch_size)

        greedy = run(prompts, 0.0, seed)
        sampled = run([p for p in prompts for _ in range(samples)], temperature, seed) if samples else []
    else:
        fn = decode if decode_fn is None else decode_fn
        greedy = [fn(model, tokenizer, p, max_new_tokens=max_new_tokens, stop=stop) for p in prompts]
        sampled = [fn(model, tokenizer, p, max_new_tokens=max_new_tokens, temperature=temperature, stop=stop,
                      seed=seed + n * samples + j)
                   for n, p in enumerate(prompts) for j in range(samples)]
    correct = 0
    pass_sums = {k: 0.0 for k in ks}
    examples = []
    for n, (item, out) in enumerate(zip(items, greedy)):
        pred = extract(out)
        ok = answers_match(pred, item.answer)
        correct += ok
        examples.append({"source": item.source, "gold": item.answer, "pred": pred, "correct": ok,
                         "output": out[:500]})
        if samples:
            c = sum(answers_match(extract(o), item.answer) for o in sampled[n * samples : (n + 1) * samples])
            for k in ks:
                pass_sums[k] += pass_at_k(samples, c, k)
    n = len(items)
    return GenResult(n, correct / max(n, 1),
                     {f"pass@{k}": v / max(n, 1) for k, v in pass_sums.items()} if samples else {},
                     examples)


def load_generative_task(name: str, data_dir: str | os.PathLike, limit: int | None) -> tuple[list[GenItem], list[GenItem]]:
    """``(items, few-shot examples)`` for ``gsm8k`` (4 train shots) or ``math500`` (0 shots)."""
    d = Path(data_dir)
    if name == "gsm8k":
        shots = load_gsm8k(d / "gsm8k" / "train.jsonl", GSM8K_SHOTS)
        return load_gsm8k(d / "gsm8k" / "test.jsonl", limit), shots
    if name == "math500":
        return load_math(d / "math" / "MATH500_test.jsonl", limit), []
    raise ValueError(f"unknown generative task {name!r}; use gsm8k or math500")
