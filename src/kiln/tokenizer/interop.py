"""Hugging Face ``tokenizer.json`` and tiktoken mergeable-ranks export/import.

Hugging Face: a byte-level BPE model (vocab and merges spelled with GPT-2's byte alphabet), a
``Split`` pre-tokenizer with Kiln's split regex followed by ``ByteLevel`` without its own regex,
and special tokens as ``added_tokens``. tiktoken: ``mergeable_ranks`` maps each ordinary token's
bytes to its id (tiktoken's rank is the token id); a ``.tiktoken`` file holds one
``base64(token) rank`` per line. tiktoken merges by the rank of the merged bytes, which equals
merge order for Kiln's layout (merge k makes id 256 + k) and for GPT-2's.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kiln.tokenizer.formats import bytes_to_str, str_to_bytes
from kiln.tokenizer.pretokenize import GPT2_PATTERN, PATTERNS, resolve_pattern
from kiln.tokenizer.tokenizer import Tokenizer


def _ordinary(tok: Tokenizer) -> dict[int, bytes]:
    specials = set(tok.special_tokens.values())
    seen: set[bytes] = set()
    out: dict[int, bytes] = {}
    for i, b in sorted(tok.vocab.items()):
        if i not in specials and b not in seen:  # a duplicate spelling keeps its lowest id
            seen.add(b)
            out[i] = b
    return out


# ------------------------------------------------------------------ Hugging Face
def to_hf_dict(tok: Tokenizer) -> dict[str, Any]:
    """The Hugging Face ``tokenizers`` JSON (byte-level BPE) for ``tok``."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for s, i in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
        ],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": resolve_pattern(tok.pattern)}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {bytes_to_str(b): i for i, b in _ordinary(tok).items()},
            "merges": [f"{bytes_to_str(a)} {bytes_to_str(b)}" for a, b in tok.merges],
        },
    }


def save_hf(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write a Hugging Face ``tokenizer.json`` (loadable by ``tokenizers.Tokenizer.from_file``)."""
    p = Path(path)
    p.write_text(json.dumps(to_hf_dict(tok), ensure_ascii=False) + "\n", encoding="utf-8")
    return p


def from_hf_json(path: str | os.PathLike, backend: str = "auto") -> Tokenizer:
    """Load a Hugging Face byte-level BPE ``tokenizer.json`` (GPT-2, Llama-3, Kiln exports...)."""
    p = Path(path)
    if p.is_dir():
        p = p / "tokenizer.json"
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"Hugging Face tokenizer file {p} does not exist") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e})") from e
    model = d.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix"):
        raise ValueError(f"{p} is not a byte-level BPE tokenizer (model {model.get('type')!r}); Kiln reads byte-level BPE only")
    vocab = {int(i): str_to_bytes(s, f"{p} token") for s, i in model["vocab"].items()}
    merges = []
    for m in model["merges"]:
        a, b = m.split(" ") if isinstance(m, str) else m
        merges.append((str_to_bytes(a, f"{p} merge"), str_to_bytes(b, f"{p} merge")))
    specials = sorted(((t["content"], t["id"]) for t in d.get("added_tokens", [])), key=lambda kv: kv[1])
    for s, i in specials:
        vocab[int(i)] = s.encode("utf-8")
    return Tokenizer(vocab, merges, [s for s, _ in specials], pattern=_hf_pattern(d.get("pre_tokenizer"), p), backend=backend)


def _hf_pattern(pre: Mapping[str, Any] | None, where: Path) -> str:
    steps = list(pre.get("pretokenizers", [])) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    for step in steps:
        if step.get("type") == "Split" and "Regex" in step.get("pattern", {}):
            regex = step["pattern"]["Regex"]
            return next((name for name, r in PATTERNS.items() if r == regex), regex)
        if step.get("type") == "ByteLevel" and step.get("use_regex", True):
            if step.get("add_prefix_space"):
                raise ValueError(f"{where}: ByteLevel add_prefix_space=True is not supported; Kiln never adds a space")
            return "gpt2"
    raise ValueError(f"{where}: no split regex in pre_tokenizer; Kiln needs a Split regex or ByteLevel(use_regex=True)")


# ------------------------------------------------------------------ tiktoken
def to_tiktoken_ranks(tok: Tokenizer) -> dict[bytes, int]:
    """tiktoken ``mergeable_ranks`` (token bytes -> id) of the ordinary tokens."""
    return {b: i for i, b in _ordinary(tok).items()}


def to_tiktoken(tok: Tokenizer, name: str = "kiln") -> Any:
    """A ``tiktoken.Encoding`` equal to ``tok`` (needs ``pip install tiktoken``)."""
    try:
        import tiktoken
    except ImportError as e:
        raise RuntimeError("to_tiktoken needs the tiktoken package: pip install tiktoken") from e
    return tiktoken.Encoding(name, pat_str=resolve_pattern(tok.pattern), mergeable_ranks=to_tiktoken_ranks(tok),
                             special_tokens=dict(tok.special_tokens))


def save_tiktoken(tok: Tokenizer, path: str | os.PathLike) -> Path:
    """Write a ``.tiktoken`` file: ``base64(token) rank`` per line (special tokens are not included)."""
    p = Path(path)
    lines = [f"{base64.b64encode(b).decode()} {i}" for b, i in sorted(to_tiktoken_ranks(tok).items(), key=lambda kv: kv[1])]
    p.write_text("\n".join(lines) + "\n")
    return p


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file into mergeable ranks."""
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
        except ValueError as e:
            raise ValueError(f"{path}:{lineno} is not 'base64 rank': {line[:60]!r}") from e
    return ranks


def from_tiktoken(
    ranks: Mapping[bytes, int] | str | os.PathLike,
    pattern: str = GPT2_PATTERN,
    special_tokens: Mapping[str, int] | None = None,
    backend: str = "auto",
) -> Tokenizer:
    """A ``Tokenizer`` from tiktoken mergeable ranks (a dict or a ``.tiktoken`` file).

    The merges are recovered as in tiktoken's own BPE: each multi-byte token, in rank order, splits
    into the two parts that tiktoken's algorithm reaches using only lower-ranked tokens.
    """
    if not isinstance(ranks, Mapping):
        ranks = load_tiktoken_ranks(ranks)
    merges: list[tuple[bytes, bytes]] = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) == 1:
            continue
        # Usually only one split has both halves ranked lower; else replay tiktoken's BPE.
        splits = [i for i in range(1, len(token)) if ranks.get(token[:i], rank) < rank and ranks.get(token[i:], rank) < rank]
        parts = [token[: splits[0]], token[splits[0] :]] if len(splits) == 1 else _tiktoken_bpe(ranks, token, max_rank=rank)
        if len(parts) != 2:
            raise ValueError(f"tiktoken token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
        merges.append((parts[0], parts[1]))
    vocab = {r: t for t, r in ranks.items()}
    specials = dict(special_tokens or {})
    for s, i in specials.items():
        vocab[i] = s.encode("utf-8")
    pattern = next((name for name, r in PATTERNS.items() if r == pattern), pattern)
    return Tokenizer(vocab, merges, list(specials), pattern=pattern, backend=backend)


def _tiktoken_bpe(ranks: Mapping[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < max_rank and (best is None or r < best[0]):
                best = (r, i)
        if best is None:
            return parts
        i = best[1]
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
