"""Readers for conversation and preference data, with bad records counted, never fatal.

Sources: local ``.jsonl`` (``.gz``), ``.json`` (a list of records), ``.parquet``, and the Hugging
Face hub as ``hf:NAME[:SPLIT]`` (``datasets.load_dataset``; cached datasets work offline).

Conversation formats (detected per record):

- messages lists: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI) or ShareGPT
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value"}, ...]}``;
- Alpaca: ``{"instruction", "input", "output"}`` (the input, when given, follows the instruction);
- LIMA: ``{"conversations": ["user turn", "assistant turn", ...]}``;
- ``{"prompt", "completion"}`` strings.

Preference formats: ``{"prompt", "chosen", "rejected"}`` (strings or message lists, trl's
layouts); hh-rlhf's ``{"chosen", "rejected"}`` transcripts ("\\n\\nHuman: ... \\n\\nAssistant: ...");
LLaMA-Factory's ``{"conversations", "chosen": {"from", "value"}, "rejected": {...}}``.

Every record that cannot be used is counted under a reason in a ``ReadReport`` with its file and
line (``no_assistant_turn``, ``empty_response``, ``chosen_equals_rejected``, ``malformed_json``,
``unknown_format``, ``longer_than_context``...); the run goes on.
"""

from __future__ import annotations

import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]

_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system", "bot": "assistant", "model": "assistant"}


@dataclass
class ReadReport:
    """Counts of kept and dropped records, and the first few drops with where they came from."""

    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    max_examples: int = 20
    truncated: int = 0
    """Records cut to fit the context (``truncate=True`` in SFT and DPO) and kept."""

    def drop(self, where: str, reason: str, detail: str = "") -> None:
        """Count one unusable record at ``where`` (``file:line``) under ``reason``."""
        self.dropped[reason] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: {reason}{' (' + detail + ')' if detail else ''}")

    def truncate(self, where: str, detail: str) -> None:
        """Count one record cut to fit (it stays kept); the first few go to ``examples`` too."""
        self.truncated += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(f"{where}: truncated ({detail})")

    def to_dict(self) -> dict[str, Any]:
        out = {"kept": self.kept, "dropped": dict(self.dropped), "examples": list(self.examples)}
        return {**out, "truncated": self.truncated} if self.truncated else out

    def summary(self) -> str:
        """One line per reason, then the examples (what a stage prints and writes to its manifest)."""
        total = sum(self.dropped.values())
        lines = [f"kept {self.kept} records, dropped {total}" + (f", truncated {self.truncated}" if self.truncated else "")]
        lines += [f"  {reason}: {n}" for reason, n in self.dropped.most_common()]
        lines += [f"  e.g. {e}" for e in self.examples[:5]]
        return "\n".join(lines)


def require_usable(items: list, what: str, sources: Any, report: ReadReport) -> list:
    """``items`` if any; else a ValueError that says what the read found in ``sources`` (every reason
    and the first examples with file:line), checked before a stage spends time on the data."""
    if not items:
        names = ", ".join(str(x) for x in sources) if isinstance(sources, (list, tuple)) else str(sources)
        raise ValueError(f"no usable {what} in {names}; the read found:\n{report.summary()}")
    return items


@dataclass(frozen=True)
class Conversation:
    """One conversation for SFT, ending with an assistant turn."""

    messages: tuple[Mapping[str, str], ...]
    where: str = ""


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages up to the reply) and two replies, the first preferred."""

    prompt: tuple[Mapping[str, str], ...]
    chosen: str
    rejected: str
    where: str = ""


# ------------------------------------------------------------------ records from files
def iter_records(source: str | Path, report: ReadReport) -> Iterator[tuple[str, Any]]:
    """Yield ``(where, record)`` from a file or ``hf:NAME[:SPLIT]``; malformed JSONL lines are counted."""
    s = str(source)
    if s.startswith("hf:"):
        yield from _iter_hf(s[3:])
        return
    p = Path(s)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (give a .jsonl, .json, .parquet file or hf:NAME[:SPLIT])")
    name = p.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{p}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    report.drop(f"{p}:{lineno}", "malformed_json", str(e))
    elif name.endswith((".json", ".json.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON ({e}); for one record per line name it .jsonl") from e
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), [data])
        for k, rec in enumerate(data):
            yield f"{p}:record {k}", rec
    elif name.endswith(".parquet"):
        import pyarrow.parquet as pq

        for k, rec in enumerate(pq.read_table(p).to_pylist()):
            yield f"{p}:row {k}", rec
    else:
        raise ValueError(f"{p}: unknown file type; use .jsonl[.gz], .json, .parquet or hf:NAME[:SPLIT]")


def _iter_hf(spec: str) -> Iterator[tuple[str, Any]]:
    try:
        import datasets
    except ImportError as e:
        raise RuntimeError("reading hf: sources needs the datasets package: pip install datasets") from e
    name, _, split = spec.partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    for k, rec in enumerate(ds):
        yield f"hf:{name}:{split or 'train'}:row {k}", rec


# ------------------------------------------------------------------ record -> messages
def _text(x: Any) -> str | None:
    return x if isinstance(x, str) else None


def record_to_messages(rec: Any) -> Messages | str:
    """Messages of one conversation record, or a drop reason (a string)."""
    if not isinstance(rec, Mapping):
        return "unknown_format"
    if isinstance(rec.get("messages"), list):
        return _norm_messages(rec["messages"])
    conv = rec.get("conversations")
    if isinstance(conv, list):
        if conv and all(isinstance(t, str) for t in conv):  # LIMA: alternating user / assistant
            return [{"role": "user" if k % 2 == 0 else "assistant", "content": t} for k, t in enumerate(conv)]
        return _norm_messages(conv)
    if _text(rec.get("instruction")) is not None and "output" in rec:  # Alpaca
        inst, inp = rec["instruction"], _text(rec.get("input")) or ""
        user = f"{inst}\n\n{inp}" if inp.strip() else inst
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": _text(rec["output"]) or ""}]
        if _text(rec.get("system")):
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs
    if _text(rec.get("prompt")) is not None and _text(rec.get("completion")) is not None:
        return [{"role": "user", "content": rec["prompt"]}, {"role": "assistant", "content": rec["completion"]}]
    return "unknown_format"


def _norm_messages(turns: Sequence[Any]) -> Messages | str:
    out: Messages = []
    for t in turns:
        if not isinstance(t, Mapping):
            return "unknown_format"
        role = t.get("role", t.get("from"))
        content = t.get("content", t.get("value"))
        role = _SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
        if role not in ("system", "user", "assistant") or not isinstance(content, str):
            return "bad_message"
        out.append({"role": role, "content": content})
    return out


def check_conversation(msgs: Messages) -> str | None:
    """A drop reason for messages unusable for SFT, or None."""
    if not any(m["role"] == "assistant" for m in msgs):
        return "no_assistant_turn"
    if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
        return "empty_response"
    return None


def read_conversations(sources: Iterable[str | Path], report: ReadReport | None = None) -> list[Conversation]:
    """All usable conversations from ``sources`` (any mix of formats); drops go to ``report``."""
    report = report if report is not None else ReadReport()
    out = []
    for src in sources:
        for where, rec in iter_records(src, report):
            msgs = record_to_messages(rec)
            reason = msgs if isinstance(msgs, str) else check_conversation(msgs)
            if reason:
                report.drop(where, reason)
                continue
            out.append(Conversation(tuple(msgs), where))
            report.kept += 1
    return out


# ------------------------------------------------------------------ preferences
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")


def parse_hh_transcript(text: str) -> Messages | None:
    """hh-rlhf's "\\n\\nHuman: ...\\n\\nAssistant: ..." transcript as messages (None if unparsable)."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[parts[k]], "content": parts[k + 1].strip()} for k in range(1, len(parts) - 1, 2)]


def record_to_preference(rec: Any) -> tuple[Messages, str, str] | str:
    """(prompt messages, chosen reply, rejected reply) of one record, or a drop reason."""
    if not isinstance(rec, Mapping) or "chosen" not in rec or "rejected" not in rec:
        return "unknown_format"
    ch, rj = rec["chosen"], rec["rejected"]
    if isinstance(ch, Mapping) and isinstance(rj, Mapping):  # LLaMA-Factory
        prompt = _norm_messages(rec.get("conversations") or [])
        if isinstance(prompt, str):
            return prompt
        return prompt, str(ch.get("value", ch.get("content", ""))), str(rj.get("value", rj.get("content", "")))
    if "prompt" in rec:
        p = rec["prompt"]
        prompt = [{"role": "user", "content": p}] if isinstance(p, str) else _norm_messages(p or [])
        if isinstance(prompt, str):
            return prompt
        return prompt, _last_reply(ch), _last_reply(rj)
    if isinstance(ch, str) and isinstance(rj, str):  # hh-rlhf transcripts
        c, r = parse_hh_transcript(ch), parse_hh_transcript(rj)
        if c is None or r is None or c[-1]["role"] != "assistant" or r[-1]["role"] != "assistant":
            return "unparsable_transcript"
        if c[:-1] != r[:-1]:
            return "prompt_mismatch"
        return c[:-1], c[-1]["content"], r[-1]["content"]
    return "unknown_format"


def _last_reply(x: Any) -> str:
    if isinstance(x, str):
        return x
    msgs = _norm_messages(x) if isinstance(x, list) else "bad"
    if isinstance(msgs, str) or not msgs or msgs[-1]["role"] != "assistant":
        return ""
    return msgs[-1]["content"]


def read_preferences(sources: Iterable[str | Path], report: ReadReport | None = None) -> list[PreferencePair]:
    """All usable preference pairs from ``sources``; drops go to ``report``."""
    report = report if report is not None else ReadReport()
    out = []
    for src in sources:
        for where, rec in iter_records(src, report):
            got = record_to_preference(rec)
            if isinstance(got, str):
                report.drop(where, got)
                continue
            prompt, chosen, rejected = got
            reason = None
            if not any(m["role"] == "user" for m in prompt):
                reason = "no_user_turn"
            elif not chosen.strip() or not rejected.strip():
                reason = "empty_response"
            elif chosen.strip() == rejected.strip():
                reason = "chosen_equals_rejected"
            if reason:
                report.drop(where, reason)
                continue
            out.append(PreferencePair(tuple(prompt), chosen, rejected, where))
            report.kept += 1
    return out


# ------------------------------------------------------------------ tokenization
def encode_conversation(conv: Conversation, template: Any, max_len: int, report: ReadReport,
                        truncate: bool = False) -> tuple[list[int], list[int]] | None:
    """(ids, loss mask) of ``conv`` with ``template``; over ``max_len`` tokens: None (counted), or with
    ``truncate`` its first ``max_len`` tokens (trl's SFT default), unless no assistant token is left."""
    ids, mask = template.render_with_mask(conv.messages)
    if len(ids) > max_len:
        if not truncate or not any(mask[1:max_len]):  # position 0 is never a target
            report.drop(conv.where, "longer_than_context", f"{len(ids)} > {max_len} tokens"
                        + (", no assistant token in the first ones" if truncate else ""))
            return None
        report.truncate(conv.where, f"{len(ids)} -> {max_len} tokens")
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


def encode_preference(
    pair: PreferencePair, template: Any, max_len: int, report: ReadReport, truncate: bool = False
) -> tuple[list[int], list[int], list[int]] | None:
    """(prompt ids ending in ``<|assistant|>``, chosen ids + end, rejected ids + end). When prompt +
    the longer reply is over ``max_len`` tokens: None (counted), or with ``truncate`` (as trl's DPO
    does) the prompt keeps its last ``max_len // 2`` tokens at most and each reply is cut to the room
    left; a pair whose cut replies are equal is dropped (``equal_after_truncation``)."""
    prompt = template.render(pair.prompt, add_generation_prompt=True)
    enc = template.tokenizer.encode_ordinary
    chosen = enc(pair.chosen) + [template.end_id]
    rejected = enc(pair.rejected) + [template.end_id]
    n = len(prompt) + max(len(chosen), len(rejected))
    if n > max_len:
        if not truncate:
            report.drop(pair.where, "longer_than_context", f"{n} > {max_len} tokens")
            return None
        prompt = prompt[max(0, len(prompt) - max_len // 2):]  # keep the end: the turn the replies answer
        room = max_len - len(prompt)
        chosen, rejected = chosen[:room], rejected[:room]
        if chosen == rejected:
            report.drop(pair.where, "equal_after_truncation", f"{n} > {max_len} tokens")
            return None
        report.truncate(pair.where, f"{n} -> {len(prompt) + max(len(chosen), len(rejected))} tokens")
    return prompt, chosen, rejected
