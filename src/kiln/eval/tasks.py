"""Benchmark task files -> ``MCItem`` lists, and the registry of known tasks.

Loaders read the formats found in ``../shared/data/eval/`` (and their public homes):

- HellaSwag: llama.cpp's text format (6 lines per item: ``label: ctx``, gold, 4 endings; plain or
  ``.bz2``) or the original jsonl (``ctx``, ``endings``, ``label``);
- llm-foundry's jsonl schemas: ``query``/``choices``/``gold`` (ARC, PIQA, OpenBookQA, COPA, BoolQ,
  SIQA, CommonsenseQA), ``context_options``/``continuation``/``gold`` (WinoGrande, WSC: partial
  scoring), ``context``/``continuation`` (LAMBADA: last word, greedy);
- MMLU csv (question, A, B, C, D, answer letter), 0- or k-shot from the ``dev`` split, scored by the
  logits of " A".." D".

A malformed row is an error naming ``file:line``. Every file may also be stored bzip2-compressed as
``<name>.bz2`` (e.g. a packed copy of the data carried to a GPU machine).
"""

from __future__ import annotations

import bz2
import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.eval.multiple_choice import MCItem

LETTERS = "ABCDEFGHIJ"


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _check_file(path: str | os.PathLike) -> Path:
    """``path``, or its bzip2-compressed sibling ``path.bz2`` (a packed copy of the eval data)."""
    p = Path(path)
    if p.is_file():
        return p
    packed = p.with_name(p.name + ".bz2")
    if packed.is_file():
        return packed
    raise FileNotFoundError(f"task file {p} does not exist; pass --data-dir pointing at the eval data")


def read_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line_number, object)`` for each non-blank line; invalid JSON is an error naming file:line."""
    p = _check_file(path)
    with _open_text(p) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{p}:{i}: expected a JSON object, got {type(obj).__name__}")
            yield i, obj


def _field(obj: dict, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise ValueError(f"{where}: missing field {key!r} (has {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, typ) or isinstance(v, bool) and typ is int:
        raise ValueError(f"{where}: field {key!r} should be {getattr(typ, '__name__', typ)}, got {v!r:.60}")
    return v


def _gold(obj: dict, key: str, n: int, where: str) -> int:
    g = obj.get(key)
    if isinstance(g, str) and g.strip().isdigit():
        g = int(g)
    if not isinstance(g, int) or isinstance(g, bool) or not 0 <= g < n:
        raise ValueError(f"{where}: {key!r}={g!r} is not an index into the {n} choices")
    return g


def _str_list(obj: dict, key: str, where: str) -> list[str]:
    v = _field(obj, key, list, where)
    if len(v) < 1 or not all(isinstance(c, str) for c in v):
        raise ValueError(f"{where}: field {key!r} should be a non-empty list of strings")
    return v


def clean_hellaswag(text: str) -> str:
    """Kiln's variant: WikiHow artifacts out of a HellaSwag string (" [title]" becomes ". ", other
    [tags] go), stripped at both ends."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ").strip()


def lm_eval_hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's ``hellaswag/utils.py: preprocess``, step for step: strip, " [title]"
    becomes ". ", [tags] go, one double space becomes one; no strip at the end (a space a removed
    tag leaves stays, as lm-eval keeps it)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_pair(obj: dict, where: str, prompt: str) -> tuple[str, list[str]]:
    """(context, continuations) of one original-format record, in lm-eval's or Kiln's form."""
    ends = _str_list(obj, "endings", where)
    label = obj.get("activity_label")
    if prompt == "kiln":  # the context as one field, lower-case second part, both ends stripped
        ctx = _field(obj, "ctx", str, where)
        ctx = clean_hellaswag(f"{label}: {ctx}" if isinstance(label, str) and label else ctx)
        return ctx, [" " + clean_hellaswag(e) for e in ends]
    # lm-eval's process_docs: ctx_a + " " + ctx_b.capitalize(), the label always in front, and the
    # target delimiter " " before each choice.
    ctx = _field(obj, "ctx_a", str, where) + " " + _field(obj, "ctx_b", str, where).capitalize()
    query = lm_eval_hellaswag_preprocess(f"{label if isinstance(label, str) else ''}: {ctx}")
    return query, [" " + lm_eval_hellaswag_preprocess(e) for e in ends]


HELLASWAG_PROMPTS = ("lm_eval", "kiln")


def load_hellaswag(path: str | os.PathLike, limit: int | None = None, prompt: str = "lm_eval") -> list[MCItem]:
    """HellaSwag items: a context, then " " + each of the 4 endings.

    ``prompt``: "lm_eval" (default) builds them exactly as lm-evaluation-harness does (its
    ``hellaswag`` task), so accuracies compare with published lm-eval numbers; it needs the original
    jsonl (``ctx_a``/``ctx_b``). "kiln" is Kiln's earlier variant (the ``ctx`` field: second part
    lower-case, ends stripped), and also reads llama.cpp's 6-line txt, which holds only that form.
    """
    if prompt not in HELLASWAG_PROMPTS:
        raise ValueError(f"prompt={prompt!r}; use one of {', '.join(HELLASWAG_PROMPTS)}")
    p = _check_file(path)
    items: list[MCItem] = []
    if p.name.endswith((".jsonl", ".jsonl.bz2")):
        for i, obj in read_jsonl(p):
            where = f"{p}:{i}"
            ctx, conts = _hellaswag_pair(obj, where, prompt)
            items.append(MCItem.shared_context(ctx, conts, _gold(obj, "label", len(conts), where), where))
            if limit is not None and len(items) >= limit:
                break
        return items
    if prompt != "kiln":
        raise ValueError(f"{p}: llama.cpp's HellaSwag txt lost the ctx_a/ctx_b split lm-eval's prompt needs; "
                         "use the original jsonl, or task hellaswag_kiln (Kiln's prompt)")
    with _open_text(p) as f:
        while limit is None or len(items) < limit:
            first = len(items) * 6 + 1
            block = [f.readline() for _ in range(6)]
            if not block[0]:
                break
            if not block[5]:
                n = first - 1 + sum(1 for x in block if x)
                raise ValueError(f"{p}:{n}: the file ends inside an item; expected 6 lines per item "
                                 "(context, gold, 4 endings)")
            block = [x.rstrip("\n") for x in block]
            gold_s = block[1].strip()
            if not gold_s.isdigit() or not 0 <= int(gold_s) < 4:
                raise ValueError(f"{p}:{first + 1}: gold label {gold_s!r} should be 0..3")
            items.append(MCItem.shared_context(block[0], [" " + e for e in block[2:6]], int(gold_s), f"{p}:{first}"))
    return items


def load_foundry(path: str | os.PathLike, delimiter: str = " ", limit: int | None = None) -> list[MCItem]:
    """llm-foundry jsonl: query/choices/gold, context_options/continuation/gold, or context/continuation.

    ``delimiter`` joins the query and each choice (e.g. "\\nAnswer: " for ARC).
    """
    p = _check_file(path)
    items: list[MCItem] = []
    for i, obj in read_jsonl(p):
        where = f"{p}:{i}"
        if "query" in obj:
            q = _field(obj, "query", str, where)
            ch = _str_list(obj, "choices", where)
            items.append(MCItem.shared_context(q + delimiter, ch, _gold(obj, "gold", len(ch), where), where))
        elif "context_options" in obj:  # WinoGrande: the options fill the blank, score what follows
            opts = _str_list(obj, "context_options", where)
            cont = _field(obj, "continuation", str, where)
            gold = _gold(obj, "gold", len(opts), where)
            items.append(MCItem(tuple((o + delimiter, cont) for o in opts), gold, "mc", where))
        elif "context" in obj and "continuation" in obj:  # LAMBADA: the last word, greedy
            ctx = _field(obj, "context", str, where)
            cont = _field(obj, "continuation", str, where)
            items.append(MCItem(((ctx + delimiter, cont),), 0, "lm", where))
        else:
            raise ValueError(f"{where}: unknown schema; expected query/choices/gold, "
                             f"context_options/continuation/gold or context/continuation (has {sorted(obj)})")
        if limit is not None and len(items) >= limit:
            break
    return items


def _read_mmlu_csv(path: Path, max_rows: int | None = None) -> list[tuple[str, list[str], int, str]]:
    rows: list[tuple[str, list[str], int, str]] = []
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        for i, rec in enumerate(csv.reader(f), 1):
            if max_rows is not None and len(rows) >= max_rows:
                break
            where = f"{path}:{i}"
            if len(rec) < 4:
                raise ValueError(f"{where}: expected question, >=2 choices and an answer letter; got {len(rec)} fields")
            q, choices, ans = rec[0], rec[1:-1], rec[-1].strip()
            if ans not in LETTERS[: len(choices)]:
                raise ValueError(f"{where}: answer {ans!r} is not one of {LETTERS[:len(choices)]}")
            rows.append((q, choices, LETTERS.index(ans), where))
    return rows


def _mmlu_block(q: str, choices: list[str]) -> str:
    return q.strip() + "\n" + "".join(f"{LETTERS[j]}. {c}\n" for j, c in enumerate(choices)) + "Answer:"


def load_mmlu(
    data_dir: str | os.PathLike,
    shots: int = 0,
    split: str = "test",
    subjects: list[str] | None = None,
    limit: int | None = None,
) -> list[MCItem]:
    """MMLU items, continuations " A".." D", with the first ``shots`` dev questions of each subject.

    The prompt follows Hendrycks et al. (arXiv:2009.03300): a header naming the subject, the
    few-shot examples with their answers, then the question. Deterministic: dev rows in file order.
    ``limit`` caps the total, taken round-robin over subjects so a small limit still spans them.
    """
    d = Path(data_dir)
    split_dir = d / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir} does not exist; point at the folder holding dev/ and {split}/")
    files = sorted(split_dir.glob(f"*_{split}.csv")) or sorted(split_dir.glob(f"*_{split}.csv.bz2"))
    per_subject: list[list[MCItem]] = []
    for f in files:
        subject = f.name[: f.name.rindex(f"_{split}.csv")]
        if subjects and subject not in subjects:
            continue
        header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
        if shots:
            dev = _read_mmlu_csv(_check_file(d / "dev" / f"{subject}_dev.csv"), shots)
            header += "".join(_mmlu_block(q, c) + f" {LETTERS[g]}\n\n" for q, c, g, _ in dev[:shots])
        items = [
            MCItem.shared_context(header + _mmlu_block(q, c), [f" {LETTERS[j]}" for j in range(len(c))], g, w)
            for q, c, g, w in _read_mmlu_csv(f, limit)  # round-robin takes <= limit per subject
        ]
        per_subject.append(items)
    if not per_subject:
        raise ValueError(f"no MMLU subjects found under {split_dir}")
    out: list[MCItem] = []
    for k in range(max(len(s) for s in per_subject)):
        for s in per_subject:
            if k < len(s):
                out.append(s[k])
    return out[:limit] if limit is not None else out


@dataclass(frozen=True)
class TaskSpec:
    """A registered multiple-choice task: how to load it and its random-guess accuracy.

    ``baseline`` None means "expected accuracy of a uniform guess", computed from the items
    (mean of 1/number-of-choices); LAMBADA-style tasks have baseline 0.
    """

    name: str
    load: Callable[[Path, int | None], list[MCItem]]
    metric: str = "acc_norm"
    baseline: float | None = None
    core: bool = True


def _foundry(rel: str, delimiter: str = " ") -> Callable[[Path, int | None], list[MCItem]]:
    return lambda d, limit: load_foundry(d / "llm_foundry_local_data" / rel, delimiter, limit)


def _hellaswag(d: Path, limit: int | None) -> list[MCItem]:
    """lm-eval's prompt over the original jsonl: the full validation set where present, else the
    1000-item subset (the llama.cpp txt holds only Kiln's form of the context)."""
    full = d / "hellaswag" / "hellaswag_val.jsonl"
    if full.is_file():
        return load_hellaswag(full, limit)
    return load_hellaswag(d / "hellaswag" / "hellaswag_val_subset1000_original_format.jsonl", limit)


def _hellaswag_kiln(d: Path, limit: int | None) -> list[MCItem]:
    full = d / "hellaswag" / "hellaswag_val_full.txt.bz2"
    if full.is_file():
        return load_hellaswag(full, limit, prompt="kiln")
    return load_hellaswag(d / "hellaswag" / "hellaswag_val_subset1000_original_format.jsonl", limit, prompt="kiln")


# The CORE-style suite (DCLM, arXiv:2406.11794, as nanochat uses it) over the files at hand.
# Delimiters follow llm-foundry's gauntlet: question-style queries get "\nAnswer: ".
TASKS: dict[str, TaskSpec] = {
    "hellaswag": TaskSpec("hellaswag", _hellaswag),  # lm-evaluation-harness's prompt
    "hellaswag_kiln": TaskSpec("hellaswag_kiln", _hellaswag_kiln, core=False),  # Kiln's earlier prompt
    "arc_easy": TaskSpec("arc_easy", _foundry("world_knowledge/arc_easy.jsonl", "\nAnswer: ")),
    "arc_challenge": TaskSpec("arc_challenge", _foundry("world_knowledge/arc_challenge.jsonl", "\nAnswer: ")),
    "piqa": TaskSpec("piqa", _foundry("commonsense_reasoning/piqa.jsonl", "Answer: ")),
    "winogrande": TaskSpec("winogrande", _foundry("language_understanding/winogrande.jsonl"), "acc"),
    "winograd": TaskSpec("winograd", _foundry("language_understanding/winograd_wsc.jsonl"), "acc"),
    "lambada": TaskSpec("lambada", _foundry("language_understanding/lambada_openai.jsonl"), "acc", 0.0),
    "openbookqa": TaskSpec("openbookqa", _foundry("commonsense_reasoning/openbook_qa.jsonl")),
    "copa": TaskSpec("copa", _foundry("commonsense_reasoning/copa.jsonl"), "acc"),
    "boolq": TaskSpec("boolq", _foundry("reading_comprehension/boolq.jsonl", "\nAnswer: "), "acc"),
    "commonsense_qa": TaskSpec("commonsense_qa", _foundry("commonsense_reasoning/commonsense_qa.jsonl"), "acc"),
    "siqa": TaskSpec("siqa", _foundry("commonsense_reasoning/siqa.jsonl"), "acc"),
    "mmlu": TaskSpec("mmlu", lambda d, limit: load_mmlu(d / "mmlu", 0, limit=limit), "acc", core=False),
    "mmlu_5shot": TaskSpec("mmlu_5shot", lambda d, limit: load_mmlu(d / "mmlu", 5, limit=limit), "acc", core=False),
}


def random_baseline(spec: TaskSpec, items: list[MCItem]) -> float:
    """Accuracy of uniform guessing on ``items`` (or the spec's fixed baseline)."""
    if spec.baseline is not None:
        return spec.baseline
    return sum(1 / len(it.pairs) for it in items) / max(len(items), 1)


def get_task(name: str) -> TaskSpec:
    """The registered task ``name``; an unknown name lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (and gsm8k, math500)")
    return TASKS[name]
